//! The device layer: the buffer pool, per-kernel timing, limits and the errors a user can cause.

mod common;

use common::{gpu, seeded};
use metaseg::gpu::Clock;
use metaseg_autograd::{Backend, Shape, Tolerance, UnaryOp};

#[test]
fn the_pool_reuses_buffers_across_iterations() {
    let g = gpu();
    let shape = Shape::from([3, 1000]);
    let step = || {
        let x = g.tensor(&seeded(3000, 1, -1.0, 1.0), &shape).unwrap();
        let y = g.unary(UnaryOp::Exp, &x).unwrap();
        g.to_f64(&g.sum_axes(&y, &[1]).unwrap()).unwrap()
    };
    let first = step();
    let created = g.context().pool_stats().created;
    for _ in 0..5 {
        assert_eq!(step(), first);
    }
    // Other tests share the device and may allocate concurrently, so compare reuse, not totals.
    let stats = g.context().pool_stats();
    assert!(stats.reused >= 15, "buffers were not reused: {stats:?}");
    assert!(
        stats.created - created < 15,
        "every iteration allocated: {stats:?}"
    );
}

/// Launches are recorded into a command buffer and submitted in batches: an upload into a pooled
/// buffer that a recorded launch still reads must wait for that launch, and a chain of launches
/// longer than a batch must run in order.
#[test]
fn uploads_and_chains_longer_than_a_batch_keep_the_order_of_launches() {
    let g = gpu();
    let shape = Shape::from([4096]);
    let values = seeded(4096, 9, -1.0, 1.0);
    let expected: Vec<f64> = values.iter().map(|v| v.exp()).collect();
    for _ in 0..8 {
        let x = g.tensor(&values, &shape).unwrap();
        let y = g.unary(UnaryOp::Exp, &x).unwrap();
        drop(x); // back to the pool while the launch reading it may not have run yet
        let _other = g.tensor(&vec![100.0; 4096], &shape).unwrap(); // the same size: its buffer
        Tolerance::F32.assert("exp after an upload", &g.to_f64(&y).unwrap(), &expected);
    }
    let mut y = g.tensor(&values, &shape).unwrap();
    for _ in 0..100 {
        y = g.unary(UnaryOp::AddScalar { value: 0.5 }, &y).unwrap();
    }
    let chained: Vec<f64> = values.iter().map(|v| v + 50.0).collect();
    Tolerance::F32.assert("100 additions", &g.to_f64(&y).unwrap(), &chained);
}

#[test]
fn profiling_names_every_kernel() {
    let g = gpu();
    g.context().start_profiling();
    let x = g.tensor(&[1.0, 2.0, 3.0], &Shape::from([3])).unwrap();
    let y = g.unary(UnaryOp::Exp, &x).unwrap();
    let _ = g.sum_axes(&y, &[0]).unwrap();
    let (times, clock) = g.context().take_kernel_times().unwrap();
    let names: Vec<&str> = times.iter().map(|t| t.kernel.as_str()).collect();
    assert!(names.contains(&"elementwise.wgsl:unary[OP=1]"), "{names:?}");
    assert!(names.contains(&"reduce.wgsl:sum_rows"), "{names:?}");
    assert_eq!(clock == Clock::Timestamps, g.context().has_timestamps());
}

#[test]
fn a_tensor_larger_than_the_adapter_allows_is_an_error_that_says_so() {
    let g = gpu();
    let max = g.context().max_buffer_bytes().min(usize::MAX as u64 / 2) as usize;
    let too_big = Shape::from([max / 4 + 1024]);
    let err = g
        .fill(&too_big, 0.0)
        .err()
        .expect("must not allocate")
        .to_string();
    assert!(err.contains("max_buffer_size"), "{err}");
}

#[test]
fn shape_mismatch_names_the_op_and_both_shapes() {
    let g = gpu();
    let a = g.fill(&Shape::from([2, 3]), 1.0).unwrap();
    let b = g.fill(&Shape::from([4]), 1.0).unwrap();
    let err = g
        .binary(metaseg_autograd::BinaryOp::Mul, &a, &b)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("mul") && err.contains("[2, 3]") && err.contains("[4]"),
        "{err}"
    );
}

#[test]
fn the_adapter_limits_are_the_adapters_own() {
    let g = gpu();
    let ctx = g.context();
    assert_eq!(
        ctx.device.limits().max_storage_buffer_binding_size,
        ctx.adapter.limits.max_storage_buffer_binding_size
    );
}

#[test]
fn a_kernel_that_fails_validation_is_reported_by_name() {
    let g = gpu();
    let x = g.tensor(&[1.0; 8], &Shape::from([8])).unwrap();
    let out = g.empty(&Shape::from([8])).unwrap();
    let missing = metaseg::gpu::Kernel::new(metaseg::gpu::KernelFile::Elementwise, "no_such_entry");
    let bindings = [
        metaseg::gpu::Binding {
            binding: 1,
            access: metaseg::gpu::Access::Read,
            buffer: x.buffer(),
            offset: 0,
            size: 32,
            bytes: 32,
        },
        metaseg::gpu::Binding {
            binding: 3,
            access: metaseg::gpu::Access::ReadWrite,
            buffer: out.buffer(),
            offset: 0,
            size: 32,
            bytes: 32,
        },
    ];
    let err = g
        .context()
        .dispatch(&missing, None, &bindings, [1, 1, 1])
        .unwrap_err();
    assert!(err.contains("elementwise.wgsl:no_such_entry"), "{err}");
}

/// Without an adapter for the requested API, the error says how to get one.
#[cfg(target_os = "linux")]
#[test]
fn no_adapter_is_an_error_that_says_how_to_get_one() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_metaseg"))
        .arg("info")
        .env("WGPU_BACKEND", "metal")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no GPU adapter found") && stderr.contains("mesa-vulkan-drivers"),
        "{stderr}"
    );
}
