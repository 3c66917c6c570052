// Counter-based random numbers: element i of the output is a function of (seed, counter + i) only,
// so a draw is reproducible and independent of how the work is split. The hash is the one defined
// in autograd/src/random.rs (lowbias32 applied to the seed's and the counter's 32-bit halves);
// both backends produce the same uniform bits.
// One invocation per element; 2D grid linearised as in elementwise.wgsl.

override WG: u32 = 256u;

struct Params {
    n: u32,            // elements; sample_anchors: voxels per image
    seed_lo: u32,
    seed_hi: u32,
    counter_lo: u32,
    counter_hi: u32,
    classes: u32,      // sample_anchors: channels of the labels
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> labels: array<f32>;
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

// Anchor sampling (`sample_anchors`), as the reference in autograd/src/contrastive.rs: per image n
// and class c >= 1, the K voxels v with labels[n, c, v] > 0.5 whose keys random_bits(((n C + c) << 32)
// + v) are smallest, ties by v, marked 1 in the mask [N, S] (zeroed by the host). One workgroup of
// ANCHOR_WG invocations per (n, c): each keeps the K smallest (key, v) of its strided share of the
// voxels in registers (sorted, K <= MAX_K, an unrolled insertion), then invocation 0 merges the
// workgroup's ANCHOR_WG x K candidates the same way and writes the winners. The scan is one
// coalesced pass over the class's plane; the merge is short next to it.

override K: u32 = 3u;
const MAX_K: u32 = 16u;
const ANCHOR_WG: u32 = 64u;
const NONE: u32 = 0xffffffffu;

var<workgroup> candidate_key: array<u32, 1024>;     // ANCHOR_WG x MAX_K
var<workgroup> candidate_voxel: array<u32, 1024>;

struct Best {
    key: array<u32, MAX_K>,
    voxel: array<u32, MAX_K>,
}

fn no_best() -> Best {
    var b: Best;
    for (var k = 0u; k < K; k++) { b.key[k] = NONE; b.voxel[k] = NONE; }
    return b;
}

fn before(key: u32, voxel: u32, other_key: u32, other_voxel: u32) -> bool {
    return key < other_key || (key == other_key && voxel < other_voxel);
}

// `b` with (key, voxel) inserted in order, its largest dropped.
fn insert(b: ptr<function, Best>, key: u32, voxel: u32) {
    if !before(key, voxel, (*b).key[K - 1u], (*b).voxel[K - 1u]) { return; }
    var k = K - 1u;
    while k > 0u && before(key, voxel, (*b).key[k - 1u], (*b).voxel[k - 1u]) {
        (*b).key[k] = (*b).key[k - 1u];
        (*b).voxel[k] = (*b).voxel[k - 1u];
        k--;
    }
    (*b).key[k] = key;
    (*b).voxel[k] = voxel;
}

@compute @workgroup_size(ANCHOR_WG)
fn sample_anchors(@builtin(workgroup_id) group: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let foreground = params.classes - 1u;
    let image = group.x / foreground;
    let plane = image * params.classes + group.x % foreground + 1u;
    var best = no_best();
    for (var v = lane; v < params.n; v += ANCHOR_WG) {
        if labels[plane * params.n + v] > 0.5 {
            insert(&best, random_bits(vec2<u32>(v, plane)), v);
        }
    }
    for (var k = 0u; k < K; k++) {
        candidate_key[lane * K + k] = best.key[k];
        candidate_voxel[lane * K + k] = best.voxel[k];
    }
    workgroupBarrier();
    if lane != 0u { return; }
    var merged = no_best();
    for (var i = 0u; i < ANCHOR_WG * K; i++) {
        insert(&merged, candidate_key[i], candidate_voxel[i]);
    }
    for (var k = 0u; k < K; k++) {
        if merged.voxel[k] != NONE { out[image * params.n + merged.voxel[k]] = 1.0; }
    }
}
