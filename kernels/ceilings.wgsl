// The adapter's arithmetic ceiling: register-only fused multiply-adds, so a benchmark can state
// every kernel's FLOP/s as a fraction of what this adapter can do. (The bandwidth ceiling is the
// vec4 `copy` of elementwise.wgsl.)
//
// Each invocation runs ITERATIONS rounds of CHAINS independent vec4 FMA chains (independent so the
// pipeline never waits on a previous result): 2 * 4 * CHAINS * ITERATIONS FLOP per invocation. The
// result is stored so the compiler cannot remove the work.

override WG: u32 = 256u;
override ITERATIONS: u32 = 1024u;
const CHAINS: u32 = 8u;

@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn fma_peak(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    let seed = f32(i) * 1e-7;
    var acc: array<vec4<f32>, CHAINS>;
    for (var c = 0u; c < CHAINS; c++) {
        acc[c] = vec4<f32>(seed + f32(c), seed - f32(c), seed * f32(c), seed);
    }
    // Multiplier just below 1 and a small addend keep the values finite for any ITERATIONS.
    let m = vec4<f32>(0.999999);
    let d = vec4<f32>(1e-6);
    for (var it = 0u; it < ITERATIONS; it++) {
        for (var c = 0u; c < CHAINS; c++) {
            acc[c] = fma(acc[c], m, d);
        }
    }
    var total = vec4<f32>(0.0);
    for (var c = 0u; c < CHAINS; c++) {
        total += acc[c];
    }
    out[i] = total;
}
