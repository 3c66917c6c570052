//! Shared by the GPU test files: one device per test binary, seeded inputs.

#![allow(dead_code)]

use metaseg::gpu::Gpu;
use std::sync::OnceLock;

/// The device every test in this binary shares (pipelines are compiled once per device).
pub fn gpu() -> Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new() {
        Ok(g) => {
            let info = &g.context().adapter.info;
            eprintln!("testing on {} ({:?})", info.name, info.backend);
            g
        }
        Err(e) => panic!("{e}"),
    })
    .clone()
}

/// n values uniform in [lo, hi), from the project's counter-based generator.
pub fn seeded(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| lo + (hi - lo) * metaseg_autograd::random::uniform(seed, i))
        .collect()
}
