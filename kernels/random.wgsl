// Counter-based random numbers: element i of the output is a function of (seed, counter + i) only,
// so a draw is reproducible and independent of how the work is split. The hash is the one defined
// in autograd/src/random.rs (lowbias32 applied to the seed's and the counter's 32-bit halves);
// both backends produce the same uniform bits.
// One invocation per element; 2D grid linearised as in elementwise.wgsl.

override WG: u32 = 256u;

struct Params {
    n: u32,
    seed_lo: u32,
    seed_hi: u32,
    counter_lo: u32,
    counter_hi: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const TAU: f32 = 6.283185307179586;

fn mix32(v: u32) -> u32 {
    var h = v;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// 64-bit counter as (lo, hi).
fn random_bits(counter: vec2<u32>) -> u32 {
    var h = mix32(params.seed_lo ^ 0x9e3779b9u);
    h = mix32(h ^ params.seed_hi);
    h = mix32(h ^ counter.y);
    return mix32(h ^ counter.x);
}

// Uniform on (0, 1): the top 23 bits, centred in their bucket; 24 significant bits, exact in f32.
fn uniform_at(counter: vec2<u32>) -> f32 {
    return (f32(random_bits(counter) >> 9u) + 0.5) / 8388608.0;
}

// counter + i with the carry into the high word.
fn element_counter(i: u32) -> vec2<u32> {
    let lo = params.counter_lo + i;
    return vec2<u32>(lo, params.counter_hi + select(0u, 1u, lo < i));
}

@compute @workgroup_size(WG)
fn random_uniform(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= params.n { return; }
    out[i] = uniform_at(element_counter(i));
}

// Box-Muller on the uniforms at counters 2c and 2c + 1.
@compute @workgroup_size(WG)
fn random_normal(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= params.n { return; }
    let c = element_counter(i);
    let doubled = vec2<u32>(c.x << 1u, (c.y << 1u) | (c.x >> 31u));
    let u1 = uniform_at(doubled);
    let u2 = uniform_at(vec2<u32>(doubled.x | 1u, doubled.y));
    out[i] = sqrt(-2.0 * log(u1)) * cos(TAU * u2);
}
