//! `metaseg train --profile N`: where a training step's time goes, kernel by kernel.
//!
//! The per-dispatch times come from the GPU context's profiler (timestamp queries where the adapter
//! has them). Their sum next to the steps' wall time shows what the kernels leave to the host:
//! batch sampling, uploads, recording the graph, and the launch overhead of every dispatch.

use crate::gpu::{Clock, KernelTime};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// One kernel (entry point and its constants) over the profiled steps.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRow {
    pub kernel: String,
    pub count: usize,
    pub total: Duration,
    /// Bytes of the tensors bound to its dispatches, summed.
    pub bytes: u64,
}

/// The dispatches grouped by kernel, the most expensive first.
pub fn rows(times: &[KernelTime]) -> Vec<KernelRow> {
    let mut by_kernel: BTreeMap<&str, KernelRow> = BTreeMap::new();
    for t in times {
        let row = by_kernel.entry(&t.kernel).or_insert_with(|| KernelRow {
            kernel: t.kernel.clone(),
            count: 0,
            total: Duration::ZERO,
            bytes: 0,
        });
        row.count += 1;
        row.total += t.time;
        row.bytes += t.bytes;
    }
    let mut rows: Vec<KernelRow> = by_kernel.into_values().collect();
    rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.kernel.cmp(&b.kernel)));
    rows
}

/// The table `--profile` prints: each kernel's count, total, mean, share of the kernel time and
/// the rate at which it moves its bound tensors (a lower bound on its memory traffic), then the
/// kernels' sum against the steps' wall time.
pub fn table(rows: &[KernelRow], steps: u64, wall: Duration, clock: Clock) -> String {
    let kernel_time: Duration = rows.iter().map(|r| r.total).sum();
    let width = rows
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{steps} profiled steps, kernels timed by {clock}\n{:<width$} {:>7} {:>11} {:>11} {:>6} {:>9}\n",
        "kernel", "count", "total ms", "mean us", "share", "GB/s"
    );
    for r in rows {
        let seconds = r.total.as_secs_f64();
        let _ = writeln!(
            out,
            "{:<width$} {:>7} {:>11.2} {:>11.1} {:>5.1}% {:>9.2}",
            r.kernel,
            r.count,
            seconds * 1e3,
            seconds * 1e6 / r.count as f64,
            100.0 * seconds / kernel_time.as_secs_f64().max(f64::MIN_POSITIVE),
            if seconds > 0.0 {
                r.bytes as f64 / seconds / 1e9
            } else {
                0.0
            },
        );
    }
    let dispatches: usize = rows.iter().map(|r| r.count).sum();
    let (k, w) = (kernel_time.as_secs_f64(), wall.as_secs_f64());
    let _ = writeln!(
        out,
        "kernels: {dispatches} dispatches, {:.1} ms per step; wall: {:.1} ms per step; \
         outside the kernels (host work, uploads, launches): {:.0}%",
        k * 1e3 / steps as f64,
        w * 1e3 / steps as f64,
        100.0 * (1.0 - k / w.max(f64::MIN_POSITIVE)).max(0.0),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(kernel: &str, ms: u64, bytes: u64) -> KernelTime {
        KernelTime {
            kernel: kernel.into(),
            time: Duration::from_millis(ms),
            bytes,
        }
    }

    #[test]
    fn rows_group_by_kernel_and_sort_by_total() {
        let times = [time("a", 1, 10), time("b", 5, 0), time("a", 2, 30)];
        let rows = rows(&times);
        assert_eq!(rows[0].kernel, "b");
        assert_eq!(
            rows[1],
            KernelRow {
                kernel: "a".into(),
                count: 2,
                total: Duration::from_millis(3),
                bytes: 40,
            }
        );
    }

    #[test]
    fn table_reports_shares_rates_and_the_time_outside_kernels() {
        let rows = rows(&[time("conv", 3, 3_000_000), time("add", 1, 0)]);
        let text = table(&rows, 2, Duration::from_millis(8), Clock::Timestamps);
        let conv = text.lines().find(|l| l.starts_with("conv")).unwrap();
        // 3 ms of 4 ms of kernel time; 3 MB in 3 ms is 1 GB/s.
        assert!(conv.contains("75.0%") && conv.ends_with("1.00"), "{conv}");
        // 4 ms of kernels in 8 ms of wall time over 2 steps.
        assert!(
            text.contains("2.0 ms per step; wall: 4.0 ms per step"),
            "{text}"
        );
        assert!(text.contains(": 50%"), "{text}");
    }
}
