//! `metaseg train --profile N`: where a training step's time goes, kernel by kernel.
//!
//! The per-dispatch times come from the GPU context's profiler (timestamp queries where the adapter
//! has them). Their sum next to the steps' wall time shows what the kernels leave to the host:
//! batch sampling, uploads, recording the graph, and the launch overhead of every dispatch.
//!
//! Calls can also be timed one against another ([`time_in_turns`]), each split into the parts its
//! code marks with [`part`] (MLB-Seg's iteration against the passes it needs).

use crate::gpu::{Clock, Gpu, KernelTime};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

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

/// What a timed call costs: dispatches, kernel and wall milliseconds, and the kernel milliseconds
/// by kernel (entry point and constants). Means over repeats, hence fractional launches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cost {
    pub launches: f64,
    pub kernel_ms: f64,
    pub wall_ms: f64,
    pub by_kernel: BTreeMap<String, f64>,
}

impl Cost {
    /// `self + c * other`, field by field.
    pub fn plus(&self, c: f64, other: &Cost) -> Cost {
        let mut by_kernel = self.by_kernel.clone();
        for (k, ms) in &other.by_kernel {
            *by_kernel.entry(k.clone()).or_default() += c * ms;
        }
        Cost {
            launches: self.launches + c * other.launches,
            kernel_ms: self.kernel_ms + c * other.kernel_ms,
            wall_ms: self.wall_ms + c * other.wall_ms,
            by_kernel,
        }
    }

    /// Adds `times` and `wall`, each weighted by `c`.
    fn add(&mut self, c: f64, times: &[KernelTime], wall: Duration) {
        self.launches += c * times.len() as f64;
        self.wall_ms += c * wall.as_secs_f64() * 1e3;
        for t in times {
            let ms = c * t.time.as_secs_f64() * 1e3;
            self.kernel_ms += ms;
            *self.by_kernel.entry(t.kernel.clone()).or_default() += ms;
        }
    }
}

/// A call timed by [`time_in_turns`]: the whole, and the parts its code marked with [`part`], in
/// the order they first ran, each over all its occurrences in the call.
#[derive(Clone, Debug, Default)]
pub struct Timed {
    pub label: String,
    pub cost: Cost,
    pub parts: Vec<(&'static str, Cost)>,
}

impl Timed {
    /// A part's cost, zero if the call has no such part.
    pub fn part(&self, name: &str) -> Cost {
        let found = self.parts.iter().find(|(n, _)| *n == name);
        found.map(|(_, c)| c.clone()).unwrap_or_default()
    }
}

/// The name of the part of the call before its first mark, if it launched anything there.
pub const UNMARKED: &str = "(before the first part)";

/// Where a part begins: the dispatches launched before it and the time, the device drained.
struct Mark {
    name: &'static str,
    dispatches: u64,
    at: Instant,
}

/// The marks of the call being timed, on the device that runs it.
struct Recorder {
    gpu: Gpu,
    marks: Vec<Mark>,
    error: Option<String>,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Marks the start of a part named `name` of the code that follows, until the next mark. Nothing
/// unless [`time_in_turns`] is timing a call on this thread; then the device is drained first,
/// so the part's wall time is its own.
pub fn part(name: &'static str) {
    RECORDER.with_borrow_mut(|recorder| {
        let Some(r) = recorder else { return };
        let ctx = r.gpu.context();
        if let Err(e) = ctx.synchronize() {
            r.error.get_or_insert(e);
        }
        r.marks.push(Mark {
            name,
            dispatches: ctx.dispatch_count(),
            at: Instant::now(),
        });
    });
}

/// A call to time, with its label; errors as text.
pub type Call<'a> = (String, Box<dyn FnMut() -> Result<(), String> + 'a>);

/// Each call's cost per call and its parts, the mean over `repeats` after one warm-up call of
/// each. The calls take turns (one of each per round), so a machine whose load drifts during the
/// measurement weighs on all alike.
pub fn time_in_turns(
    gpu: &Gpu,
    repeats: u32,
    calls: &mut [Call<'_>],
) -> Result<Vec<Timed>, String> {
    for (_, f) in calls.iter_mut() {
        f()?;
    }
    let mut timed: Vec<Timed> = calls
        .iter()
        .map(|(label, _)| Timed {
            label: label.clone(),
            ..Timed::default()
        })
        .collect();
    let c = 1.0 / f64::from(repeats.max(1));
    for _ in 0..repeats {
        for ((_, f), out) in calls.iter_mut().zip(&mut timed) {
            time_once(gpu, f, c, out)?;
        }
    }
    Ok(timed)
}

/// Times one call of `f` with the device drained before and after, adding `c` times its cost and
/// its parts' to `out`.
fn time_once(
    gpu: &Gpu,
    f: &mut dyn FnMut() -> Result<(), String>,
    c: f64,
    out: &mut Timed,
) -> Result<(), String> {
    let ctx = gpu.context();
    ctx.synchronize()?;
    ctx.start_profiling();
    let first = ctx.dispatch_count();
    let start = Instant::now();
    RECORDER.set(Some(Recorder {
        gpu: gpu.clone(),
        marks: Vec::new(),
        error: None,
    }));
    let result = f();
    let recorder = RECORDER.take().expect("the recorder of this call");
    let synced = ctx.synchronize();
    let (end, last) = (Instant::now(), ctx.dispatch_count());
    let (times, _) = ctx.take_kernel_times()?;
    result?;
    synced?;
    if let Some(e) = recorder.error {
        return Err(e);
    }
    if times.len() as u64 != last - first {
        return Err(format!(
            "{}: {} kernels timed for {} dispatches",
            out.label,
            times.len(),
            last - first
        ));
    }
    out.cost.add(c, &times, end - start);
    // The parts: from each mark to the next (the first from the call's start, if it launched
    // anything before its first mark; the last to the call's end).
    let mut bounds = vec![(UNMARKED, first, start)];
    bounds.extend(recorder.marks.iter().map(|m| (m.name, m.dispatches, m.at)));
    bounds.push(("", last, end));
    for pair in bounds.windows(2) {
        let ((name, from, at), (_, to, until)) = (pair[0], pair[1]);
        if name == UNMARKED && (to == from || recorder.marks.is_empty()) {
            continue;
        }
        let slice = &times[(from - first) as usize..(to - first) as usize];
        let index = match out.parts.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                out.parts.push((name, Cost::default()));
                out.parts.len() - 1
            }
        };
        out.parts[index].1.add(c, slice, until - at);
    }
    Ok(())
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
