//! Shared by the bench files: the device and its ceilings (measured in the same run), seeded inputs,
//! the check against Cpu64 that a kernel must pass before it is timed, and the timed launch that
//! prints one line per kernel as a fraction of those ceilings.

use criterion::{Criterion, SamplingMode, Throughput};
use metaseg::gpu::{Access, Binding, Gpu, GpuTensor, Kernel, KernelFile};
use metaseg_autograd::{
    random, Backend, Cpu64, CpuTensor, Error, Result, Shape, TensorShape, Tolerance,
};
use std::time::{Duration, Instant};

/// criterion's minimum number of samples; each sample is one or more launches.
const SAMPLES: usize = 10;

/// Short runs (about 5 s per kernel) so a bench file takes a minute or two on a software adapter.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

/// What one launch must do at least: bytes read and written once, and FLOP (0 if memory-bound).
#[derive(Clone, Copy)]
pub struct Work {
    pub bytes: u64,
    pub flop: u64,
}

impl Work {
    pub fn bytes(bytes: u64) -> Work {
        Work { bytes, flop: 0 }
    }
}

/// The device, and the adapter's FLOP/s and bytes/s ceilings once measured.
pub struct Bench {
    pub gpu: Gpu,
    flop_ceiling: Option<f64>,
    bytes_ceiling: Option<f64>,
}

impl Bench {
    /// Opens the device and measures its ceilings (each `None` if criterion's filter skipped it).
    pub fn new(c: &mut Criterion) -> Bench {
        let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
        let info = &gpu.context().adapter.info;
        println!(
            "adapter: {} ({:?}, {})",
            info.name, info.backend, info.driver_info
        );
        let mut bench = Bench {
            gpu,
            flop_ceiling: None,
            bytes_ceiling: None,
        };
        bench.flop_ceiling = bench.fma_peak(c);
        bench.bytes_ceiling = bench.copy_peak(c);
        bench
    }

    /// FLOP/s of `fma_peak` (kernels/ceilings.wgsl): register-only vec4 FMAs. Checked on one
    /// workgroup of the same pipeline against the recurrence in f64 (the timed launch is 256 groups).
    fn fma_peak(&self, c: &mut Criterion) -> Option<f64> {
        const GROUPS: usize = 256;
        const ITERATIONS: u32 = 1024;
        let kernel =
            Kernel::new(KernelFile::Ceilings, "fma_peak").with("ITERATIONS", ITERATIONS as f64);
        let launch = |groups: usize| -> Result<GpuTensor> {
            let out = self.gpu.empty(&Shape::from([groups * 256, 4]))?;
            let ctx = self.gpu.context();
            let binding = Binding {
                binding: 3,
                access: Access::ReadWrite,
                buffer: out.buffer(),
                offset: 0,
                size: 4 * out.shape().numel() as u64,
                bytes: 4 * out.shape().numel() as u64,
            };
            ctx.dispatch(&kernel, None, &[binding], ctx.grid(groups as u32))
                .map_err(|message| Error::Backend {
                    backend: "gpu",
                    message,
                })?;
            Ok(out)
        };
        let expected = Cpu64.tensor(&fma_reference(256, ITERATIONS), &Shape::from([256, 4]));
        self.verify("fma_peak", launch(1), expected, Tolerance::F32_ACCUMULATED);
        let flop = (GROUPS * 256) as u64 * 2 * 4 * 8 * ITERATIONS as u64;
        let label = format!("{GROUPS}x256 invocations");
        let seconds = self.time(c, "fma_peak", &label, Work { bytes: 0, flop }, || {
            launch(GROUPS)
        });
        seconds.map(|s| flop as f64 / s)
    }

    /// Bytes/s of the vec4 `copy` of 32 MiB (read + write), checked in full against Cpu64.
    fn copy_peak(&self, c: &mut Criterion) -> Option<f64> {
        let shape = Shape::from([2, 16, 64, 64, 64]);
        let bytes = 2 * 4 * shape.numel() as u64;
        let (x, x_ref) = self.inputs(&shape, 0);
        let seconds = self.op(
            c,
            "copy",
            "2x16x64^3",
            Work::bytes(bytes),
            Cpu64.copy(&x_ref),
            Tolerance::F32,
            || self.gpu.copy(&x),
        );
        seconds.map(|s| bytes as f64 / s)
    }

    /// The same values in (0, 1), exact in f32, on the device and in the reference backend.
    pub fn inputs(&self, shape: &Shape, seed: u64) -> (GpuTensor, CpuTensor) {
        let values: Vec<f64> = (0..shape.numel() as u64)
            .map(|i| random::uniform(seed, i) as f32 as f64)
            .collect();
        let gpu = self.gpu.tensor(&values, shape).expect("upload");
        (gpu, Cpu64.tensor(&values, shape).expect("reference input"))
    }

    /// Panics, refusing to time the kernel, unless `actual` matches `expected` within `tol`.
    pub fn verify(
        &self,
        what: &str,
        actual: Result<GpuTensor>,
        expected: Result<CpuTensor>,
        tol: Tolerance,
    ) {
        let (actual, expected) = match (actual, expected) {
            (Ok(a), Ok(e)) => (a, e),
            (Err(e), _) | (_, Err(e)) => panic!("{what}: {e}"),
        };
        assert_eq!(actual.shape(), &expected.shape, "{what}: output shape");
        let values = self
            .gpu
            .to_f64(&actual)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let context = format!("{what}: fails its check against Cpu64, so it is not timed");
        tol.assert(&context, &values, &expected.data);
    }

    /// Checks one launch against `expected` (the whole output), then times it. Returns s/launch.
    #[allow(clippy::too_many_arguments)] // criterion, id, work, reference, tolerance, launch
    pub fn op(
        &self,
        c: &mut Criterion,
        name: &str,
        shape: &str,
        work: Work,
        expected: Result<CpuTensor>,
        tol: Tolerance,
        mut launch: impl FnMut() -> Result<GpuTensor>,
    ) -> Option<f64> {
        self.verify(&format!("{name} {shape}"), launch(), expected, tol);
        self.time(c, name, shape, work, launch)
    }

    /// Times `launch` with criterion (group `name`, id `shape`): every iteration dispatches, then
    /// waits for the device. Prints the report line; returns the mean seconds per launch, or `None`
    /// if criterion's filter skipped it.
    fn time<T>(
        &self,
        c: &mut Criterion,
        name: &str,
        shape: &str,
        work: Work,
        mut launch: impl FnMut() -> Result<T>,
    ) -> Option<f64> {
        let ctx = self.gpu.context();
        let mut run = || {
            let _out = launch().unwrap_or_else(|e| panic!("{name}: {e}"));
            ctx.synchronize().unwrap_or_else(|e| panic!("{name}: {e}"));
        };
        run(); // pipelines compiled and buffers pooled before criterion's own warm-up
        let mut group = c.benchmark_group(name);
        group.sampling_mode(SamplingMode::Flat);
        group.throughput(if work.flop > 0 {
            Throughput::Elements(work.flop)
        } else {
            Throughput::Bytes(work.bytes)
        });
        let mut calls: Vec<(u64, Duration)> = Vec::new();
        group.bench_function(shape, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    run();
                }
                let elapsed = start.elapsed();
                calls.push((iters, elapsed));
                elapsed
            })
        });
        group.finish();
        // criterion's samples are its last SAMPLES calls (the earlier ones are its warm-up); in
        // Flat mode they have equal iteration counts, so this is the mean time criterion reports.
        let samples = &calls[calls.len().saturating_sub(SAMPLES)..];
        let iters: u64 = samples.iter().map(|s| s.0).sum();
        if iters == 0 {
            return None;
        }
        let seconds = samples.iter().map(|s| s.1).sum::<Duration>().as_secs_f64() / iters as f64;

        let mut line = format!("{name} {shape}: {:.3} ms", seconds * 1e3);
        if work.flop > 0 {
            line += &rate(
                work.flop as f64 / seconds,
                "FLOP/s",
                "FMA",
                self.flop_ceiling,
            );
        }
        if work.bytes > 0 {
            line += &rate(
                work.bytes as f64 / seconds,
                "B/s",
                "copy",
                self.bytes_ceiling,
            );
        }
        if ctx.has_timestamps() {
            ctx.start_profiling();
            run();
            let (times, _) = ctx.take_kernel_times().expect("kernel times");
            let total: Duration = times.iter().map(|t| t.time).sum();
            line += &format!(
                "; GPU timestamps {:.3} ms in {} dispatch(es)",
                total.as_secs_f64() * 1e3,
                times.len()
            );
        }
        println!("{line}");
        Some(seconds)
    }
}

/// ", 3.15 GB/s = 0.48 of copy ceiling (6.60 GB/s)", the fraction only if the ceiling was measured.
fn rate(value: f64, unit: &str, ceiling_name: &str, ceiling: Option<f64>) -> String {
    let mut s = format!(", {:.2} G{unit}", value / 1e9);
    if let Some(ceiling) = ceiling {
        s += &format!(
            " = {:.2} of {ceiling_name} ceiling ({:.2} G{unit})",
            value / ceiling,
            ceiling / 1e9
        );
    }
    s
}

/// What `fma_peak` stores for invocations 0..n: the same f32 seeds and constants, iterated in f64.
fn fma_reference(invocations: usize, iterations: u32) -> Vec<f64> {
    let (m, d) = (0.999999f32 as f64, 1e-6f32 as f64);
    (0..invocations)
        .flat_map(|i| {
            let seed = i as f32 * 1e-7;
            let mut total = [0.0; 4];
            for c in 0..8 {
                let c = c as f32;
                for (t, v) in total.iter_mut().zip([seed + c, seed - c, seed * c, seed]) {
                    let mut acc = v as f64;
                    for _ in 0..iterations {
                        acc = acc * m + d;
                    }
                    *t += acc;
                }
            }
            total
        })
        .collect()
}
