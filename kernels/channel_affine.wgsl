// Per-channel maps and sums of NCDHW tensors.
//
// channel_affine: out[n, c, s] = x[n, c, s] * a[k] + b[k], where k is c when a and b hold one
// value per channel ([1, C, 1, 1, 1]) and n C + c when they hold one per sample and channel
// ([N, C, 1, 1, 1]). Normalisation (batch and instance norm: a = gamma / std, b = beta - mean a)
// and channel dropout (a = mask / (1 - p), b = 0) are this one pass; with RELU, the ReLU after a
// batch norm too (NaN stays NaN).
//
// Layout: s runs over the D H W elements of a channel (`volume` of them), contiguous; x and out
// are read and written as whole vec4s (buffers are padded to vec4s). When the volume is a multiple
// of 4 (ALIGNED override) a vec4 lies inside one channel: one a and one b per vec4; otherwise each
// lane finds its own channel. Workgroup: WG invocations (override, default 256), one vec4 each, in
// a 2D grid linearised as in elementwise.wgsl; neighbouring invocations touch neighbouring vec4s.
//
// channel_dots: per channel c, partial sums over the batch and space of x m and of m (the
// moments of a batch norm are those of x and x, an affine map's parameter gradients those of x
// and g). Workgroup (t, c) of the grid (x: the N x chunks pieces t of length `chunk` of each
// sample's channel row, y: the channel) strides over its piece with its WG invocations (vec4s
// when ALIGNED), then sums them in a tree in workgroup memory: out[0, t, c] = sum x m,
// out[1, t, c] = sum m, which the host adds up over t (reduce.wgsl). m is bound at 5; with SAME
// (x and m one tensor) each value is loaded once. With MASKED, m is the incoming gradient of a
// batch norm's ReLU and the sums are those of m [y > 0], y (the ReLU's output) bound at 7: the
// mask is applied as the value is loaded, in the same operations as relu_mask and mul
// (elementwise.wgsl), so the sums are those of the masked tensor without it being written.

override WG: u32 = 256u;
override ALIGNED: bool = true;
override RELU: bool = false;
override SAME: bool = false;
override MASKED: bool = false;

struct Params {
    n: u32,       // elements of x
    volume: u32,  // spatial elements per channel
    groups: u32,  // entries of a and b (C, or N C); channel_dots: C
    chunk: u32,   // channel_dots: elements per piece (a multiple of 4)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(5) var<storage, read> m: array<vec4<f32>>;      // channel_dots' second operand
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(7) var<storage, read> relu_out: array<vec4<f32>>;  // MASKED: y of the ReLU
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> sums: array<f32>;   // channel_dots' partials

var<workgroup> tree: array<vec2<f32>, WG>;

// The entry of a and b for element e: its (sample, channel) index, modulo the entries held.
fn entry(e: u32) -> u32 {
    return (e / params.volume) % params.groups;
}

@compute @workgroup_size(WG)
fn channel_affine(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= (params.n + 3u) / 4u { return; }
    let v = x[i];
    if ALIGNED {
        let k = entry(4u * i);
        out[i] = activation(v * a[k] + b[k]);
        return;
    }
    // Padding lanes past n read entry 0's parameters; their values are never read back.
    var scale = vec4<f32>(0.0);
    var shift = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        let e = 4u * i + l;
        let k = select(0u, entry(e), e < params.n);
        scale[l] = a[k];
        shift[l] = b[k];
    }
    out[i] = activation(v * scale + shift);
}

// The ReLU (with RELU). NaN stays NaN, tested from the bits: WGSL lets a compiler assume floats
// are never NaN (llvmpipe's GL turns a NaN into 0 through a compare and select).
fn activation(y: vec4<f32>) -> vec4<f32> {
    if RELU {
        let nan = (bitcast<vec4<u32>>(y) & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u);
        return select(max(y, vec4<f32>(0.0)), y, nan);
    }
    return y;
}

// vec4 i of m, times the ReLU's mask [y > 0] with MASKED (relu_mask then mul of elementwise.wgsl).
fn m_at(i: u32) -> vec4<f32> {
    if MASKED {
        return m[i] * select(vec4<f32>(0.0), vec4<f32>(1.0), relu_out[i] > vec4<f32>(0.0));
    }
    return m[i];
}

// (sum x m, sum m) over elements [first, last) of x and m, this lane's share.
fn lane_dots(first: u32, last: u32, lane: u32) -> vec2<f32> {
    var xm = vec4<f32>(0.0);
    var ms = vec4<f32>(0.0);
    if ALIGNED {
        for (var v = first / 4u + lane; v < last / 4u; v += WG) {
            let xv = x[v];
            var mv = xv;
            if !SAME { mv = m_at(v); }
            xm = fma(xv, mv, xm);
            ms += mv;
        }
    } else {
        for (var e = first + lane; e < last; e += WG) {
            let xv = x[e / 4u][e % 4u];
            var mv = xv;
            if !SAME { mv = m_at(e / 4u)[e % 4u]; }
            xm.x = fma(xv, mv, xm.x);
            ms.x += mv;
        }
    }
    return vec2<f32>((xm.x + xm.y) + (xm.z + xm.w), (ms.x + ms.y) + (ms.z + ms.w));
}

@compute @workgroup_size(WG)
fn channel_dots(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let c = group.y;
    let channels = params.groups;
    let pieces = (params.volume + params.chunk - 1u) / params.chunk;   // per sample
    let n = group.x / pieces;
    let row = (n * channels + c) * params.volume;
    let first = row + (group.x % pieces) * params.chunk;
    let last = min(first + params.chunk, row + params.volume);
    tree[lane] = lane_dots(first, last, lane);
    workgroupBarrier();
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if lane < width {
            tree[lane] += tree[lane + width];
        }
        workgroupBarrier();
    }
    if lane == 0u {
        sums[group.x * channels + c] = tree[0].x;
        sums[(groups.x + group.x) * channels + c] = tree[0].y;
    }
}

// batch_statistic: one per-channel statistic of a batch norm in training mode, from the moments
// [sum x^2; sum x] ([2, C], channel_dots(x, x)) of `count` elements per channel: mean = sum x /
// count, var = max(sum x^2 / count - mean^2, 0) (NaN stays NaN), the scale a = gamma /
// sqrt(var + eps) or the shift b = beta - mean a (STATISTIC 0-3), in the order of operations of
// the composition of small ops it replaces, one invocation per channel: a batch norm's
// statistics cost a launch each, not a dozen.
// batch_statistic_backward: that map's gradient for an incoming g [C], with respect to the
// moments (WRT_MOMENTS: out [2, C]) or to gamma (out [C]); beta's is g itself (shift). With
// (g_a, g_mean, g_var) the parts of g on a, mean and var (the statistic's own; -g mean and -g a
// for the shift) and std = sqrt(var + eps): d gamma = g_a / std, d q = (g_var - g_a a /
// (2 std^2)) [q > 0] with q = var before the max, d sum x^2 = d q / count,
// d sum x = (g_mean - 2 mean d q) / count (the f64 reference: norm.rs, BatchStatistic).
// Bindings: moments at 2, gamma at 4, beta (forward) or g (backward) at 6, out at 3. The uniform
// is Params with groups = C, volume = the bits of the f32 1 / count and chunk those of eps.

override STATISTIC: u32 = 0u;
override WRT_MOMENTS: bool = false;
const STATISTIC_MEAN: u32 = 0u;
const STATISTIC_VARIANCE: u32 = 1u;
const STATISTIC_SCALE: u32 = 2u;
const STATISTIC_SHIFT: u32 = 3u;
const STATISTIC_WG: u32 = 64u;   // one invocation per channel

@group(0) @binding(6) var<storage, read> third: array<f32>;

fn nan_kept(value: f32, source: f32) -> f32 {
    let nan = (bitcast<u32>(source) & 0x7fffffffu) > 0x7f800000u;
    return select(value, source, nan);
}

// mean, q = E[x^2] - mean^2, std and a of channel c, as the composition computes them.
struct Moments {
    mean: f32,
    q: f32,
    deviation: f32,
    a: f32,
}

fn moments_of(c: u32) -> Moments {
    let inv_count = bitcast<f32>(params.volume);
    let mean = a[params.groups + c] * inv_count;
    let q = a[c] * inv_count - mean * mean;
    let deviation = sqrt(nan_kept(max(q, 0.0), q) + bitcast<f32>(params.chunk));
    return Moments(mean, q, deviation, b[c] / deviation);
}

@compute @workgroup_size(STATISTIC_WG)
fn batch_statistic(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    if c >= params.groups { return; }
    let s = moments_of(c);
    switch STATISTIC {
        case STATISTIC_MEAN: { sums[c] = s.mean; }
        case STATISTIC_VARIANCE: { sums[c] = nan_kept(max(s.q, 0.0), s.q); }
        case STATISTIC_SCALE: { sums[c] = s.a; }
        default: { sums[c] = third[c] - s.mean * s.a; }
    }
}

@compute @workgroup_size(STATISTIC_WG)
fn batch_statistic_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    if c >= params.groups { return; }
    let s = moments_of(c);
    let g = third[c];
    var g_a = 0.0;
    var g_mean = 0.0;
    var g_var = 0.0;
    switch STATISTIC {
        case STATISTIC_MEAN: { g_mean = g; }
        case STATISTIC_VARIANCE: { g_var = g; }
        case STATISTIC_SCALE: { g_a = g; }
        default: {
            g_a = -g * s.mean;
            g_mean = -g * s.a;
        }
    }
    if !WRT_MOMENTS {
        sums[c] = g_a / s.deviation;
        return;
    }
    let mask = nan_kept(select(0.0, 1.0, s.q > 0.0), s.q);
    let d_q = (g_var - g_a * s.a / (2.0 * s.deviation * s.deviation)) * mask;
    let inv_count = bitcast<f32>(params.volume);
    sums[c] = d_q * inv_count;
    sums[params.groups + c] = (g_mean - 2.0 * s.mean * d_q) * inv_count;
}

// batch_norm_statistics: batch_statistic's four statistics in one launch, as rows `params.n`
// apart: scale, shift, mean, variance (bindings and uniform as batch_statistic's, beta at 6).
@compute @workgroup_size(STATISTIC_WG)
fn batch_norm_statistics(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    if c >= params.groups { return; }
    let s = moments_of(c);
    let stride = params.n;
    sums[c] = s.a;
    sums[stride + c] = third[c] - s.mean * s.a;
    sums[2u * stride + c] = s.mean;
    sums[3u * stride + c] = nan_kept(max(s.q, 0.0), s.q);
}

// batch_norm_coefficients: a batch norm's first-order gradient in training mode, per channel
// (one invocation each), from the moments (at 2), gamma (at 4) and the sums (d a, d b) =
// channel_dots(x, g') ([2, C] at 6; g' = g [y > 0] after a ReLU): the scale's and the shift's
// gradients as batch_statistic_backward gives them, added (g_a = d a - d b mean, g_mean =
// -d b a), then the moments' own backward. Writes five rows `params.n` apart: d gamma, d beta,
// and a, p = 2 d sum x^2, q = d sum x, the coefficients of d x = g' a + x p + q
// (batch_norm_dx). Uniform as batch_statistic's, with n the row stride.
@compute @workgroup_size(STATISTIC_WG)
fn batch_norm_coefficients(@builtin(global_invocation_id) id: vec3<u32>) {
    let c = id.x;
    if c >= params.groups { return; }
    let s = moments_of(c);
    let d_a = third[c];
    let d_b = third[params.groups + c];
    let g_a = d_a - d_b * s.mean;
    let g_mean = -d_b * s.a;
    let mask = nan_kept(select(0.0, 1.0, s.q > 0.0), s.q);
    let d_q = -g_a * s.a / (2.0 * s.deviation * s.deviation) * mask;
    let inv_count = bitcast<f32>(params.volume);
    let stride = params.n;
    sums[c] = g_a / s.deviation;
    sums[stride + c] = d_b;
    sums[2u * stride + c] = s.a;
    sums[3u * stride + c] = 2.0 * d_q * inv_count;
    sums[4u * stride + c] = (g_mean - 2.0 * s.mean * d_q) * inv_count;
}

// batch_norm_dx: d x = g' a + x p + q per channel, x at 1, g' at 5 (with MASKED: g there and
// g' = g [y > 0] formed as channel_dots forms it, y at 7), the rows of batch_norm_coefficients
// at 2 (`params.chunk` apart); laid out as channel_affine.
@compute @workgroup_size(WG)
fn batch_norm_dx(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                 @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= (params.n + 3u) / 4u { return; }
    let rows = params.chunk;
    if ALIGNED {
        let k = entry(4u * i);
        out[i] = m_at(i) * a[2u * rows + k] + x[i] * a[3u * rows + k] + a[4u * rows + k];
        return;
    }
    var scale = vec4<f32>(0.0);
    var slope = vec4<f32>(0.0);
    var shift = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        let e = 4u * i + l;
        let k = select(0u, entry(e), e < params.n);
        scale[l] = a[2u * rows + k];
        slope[l] = a[3u * rows + k];
        shift[l] = a[4u * rows + k];
    }
    out[i] = m_at(i) * scale + x[i] * slope + shift;
}
