// The per-voxel weights of MLB-Seg's meta step: from meta-gradients g (one flat array holding
// every cost's gradient, both label sources together), w = raw(g) / (sum of raw(g) + eps), where
// raw is max(-g, 0) (NORM_CLIP, the default), exp(-g - max(-g)) (NORM_SOFTMAX), sigmoid(-g)
// (NORM_SIGMOID) or [g < 0] (NORM_HARD). Two entry points, one reduction between them:
//
// meta_weight_partials: GROUPS workgroups of WG invocations stride over the n entries; each
//   invocation keeps a running (max, sum) of -g (the max only matters for softmax, whose sum is
//   rescaled when the max grows), the workgroup combines them in a tree in workgroup memory and
//   writes its pair to partials[2 * group], [2 * group + 1].
// meta_weights_normalize: one invocation per entry. Each workgroup first combines the GROUPS
//   pairs (one load per invocation, a tree in workgroup memory), so no third dispatch and no
//   invocation reads them all; then each invocation writes its normalised weight.
//
// Workgroup memory is sized by the constant WG = GROUPS = 256 (WGSL sizes workgroup arrays by
// constants); the host launches exactly GROUPS workgroups for the partials.

const WG: u32 = 256u;
const GROUPS: u32 = 256u;
const LOWEST: f32 = -3.4e38;
override NORM: u32 = 0u;
override EPS: f32 = 1e-10;
// Values of NORM (the host's codes of Normalization, src/gpu/meta.rs).
const NORM_CLIP: u32 = 0u;
const NORM_SOFTMAX: u32 = 1u;
const NORM_SIGMOID: u32 = 2u;
const NORM_HARD: u32 = 3u;

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> tree_max: array<f32, WG>;
var<workgroup> tree_sum: array<f32, WG>;

// The unnormalised weight of v = -g, relative to the shift (softmax only).
fn raw(v: f32, shift: f32) -> f32 {
    switch NORM {
        case NORM_SOFTMAX: { return exp(v - shift); }
        case NORM_SIGMOID: { return 1.0 / (1.0 + exp(-v)); }
        case NORM_HARD: { return select(0.0, 1.0, v > 0.0); }
        case NORM_CLIP, default: { return max(v, 0.0); }
    }
}

// Merges pair b into pair a: sums relative to the larger max.
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    if NORM != NORM_SOFTMAX {
        return vec2<f32>(0.0, a.y + b.y);
    }
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// Combines the pairs of the workgroup's invocations; the result is at index 0.
fn combine_workgroup(lane: u32, pair: vec2<f32>) -> vec2<f32> {
    tree_max[lane] = pair.x;
    tree_sum[lane] = pair.y;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half = half / 2u) {
        if lane < half {
            let merged = merge(
                vec2<f32>(tree_max[lane], tree_sum[lane]),
                vec2<f32>(tree_max[lane + half], tree_sum[lane + half]),
            );
            tree_max[lane] = merged.x;
            tree_sum[lane] = merged.y;
        }
        workgroupBarrier();
    }
    return vec2<f32>(tree_max[0], tree_sum[0]);
}

@compute @workgroup_size(WG)
fn meta_weight_partials(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    var pair = vec2<f32>(LOWEST, 0.0);
    for (var i = group.x * WG + lane; i < params.n; i = i + GROUPS * WG) {
        let v = -g[i];
        if NORM == NORM_SOFTMAX {
            pair = merge(pair, vec2<f32>(v, 1.0));
        } else {
            pair.y = pair.y + raw(v, 0.0);
        }
    }
    let total = combine_workgroup(lane, pair);
    if lane == 0u {
        out[2u * group.x] = total.x;
        out[2u * group.x + 1u] = total.y;
    }
}

@compute @workgroup_size(WG)
fn meta_weights_normalize(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let total = combine_workgroup(lane, vec2<f32>(partials[2u * lane], partials[2u * lane + 1u]));
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i < params.n {
        out[i] = raw(-g[i], total.x) / (total.y + EPS);
    }
}
