// The adapter's arithmetic ceiling: register-only fused multiply-adds, so a benchmark can state
// every kernel's FLOP/s as a fraction of what this adapter can do. (The bandwidth ceiling is the
// vec4 `copy` of elementwise.wgsl.)
//
// Each invocation advances 8 independent vec4 FMA chains (independent so the pipeline never waits
// on the previous result) ITERATIONS times: 2 * 4 * 8 * ITERATIONS FLOP per invocation. The chains
// are separate variables rather than an array and the loop body is unrolled 4x: on lavapipe an
// array indexed in a loop, or a loop step per FMA, costs as much as the arithmetic and measured
// a third of the peak. The sum is stored so the compiler cannot remove the work.

override WG: u32 = 256u;
override ITERATIONS: u32 = 1024u;   // a multiple of 4

@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn fma_peak(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    let s = f32(i) * 1e-7;
    // Chain c starts at (s + c, s - c, s * c, s).
    var c0 = vec4<f32>(s, s, 0.0, s);
    var c1 = vec4<f32>(s + 1.0, s - 1.0, s, s);
    var c2 = vec4<f32>(s + 2.0, s - 2.0, s * 2.0, s);
    var c3 = vec4<f32>(s + 3.0, s - 3.0, s * 3.0, s);
    var c4 = vec4<f32>(s + 4.0, s - 4.0, s * 4.0, s);
    var c5 = vec4<f32>(s + 5.0, s - 5.0, s * 5.0, s);
    var c6 = vec4<f32>(s + 6.0, s - 6.0, s * 6.0, s);
    var c7 = vec4<f32>(s + 7.0, s - 7.0, s * 7.0, s);
    // A multiplier just below 1 and a small addend keep the values finite for any ITERATIONS.
    let m = vec4<f32>(0.999999);
    let d = vec4<f32>(1e-6);
    for (var it = 0u; it < ITERATIONS; it += 4u) {
        c0 = fma(c0, m, d); c1 = fma(c1, m, d); c2 = fma(c2, m, d); c3 = fma(c3, m, d);
        c4 = fma(c4, m, d); c5 = fma(c5, m, d); c6 = fma(c6, m, d); c7 = fma(c7, m, d);
        c0 = fma(c0, m, d); c1 = fma(c1, m, d); c2 = fma(c2, m, d); c3 = fma(c3, m, d);
        c4 = fma(c4, m, d); c5 = fma(c5, m, d); c6 = fma(c6, m, d); c7 = fma(c7, m, d);
        c0 = fma(c0, m, d); c1 = fma(c1, m, d); c2 = fma(c2, m, d); c3 = fma(c3, m, d);
        c4 = fma(c4, m, d); c5 = fma(c5, m, d); c6 = fma(c6, m, d); c7 = fma(c7, m, d);
        c0 = fma(c0, m, d); c1 = fma(c1, m, d); c2 = fma(c2, m, d); c3 = fma(c3, m, d);
        c4 = fma(c4, m, d); c5 = fma(c5, m, d); c6 = fma(c6, m, d); c7 = fma(c7, m, d);
    }
    out[i] = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7;
}
