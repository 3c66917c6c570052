// Classification losses: softmax / log-softmax over the class axis, per-voxel cross-entropy and
// binary cross-entropy with logits, the per-class sums of softmax-Dice, and the EMA of a flat
// parameter buffer (forward entry points), then the fused gradients of cross-entropy and of the
// softmax-Dice sums with respect to the logits (backward entry points; their own derivatives are
// composed on the host from these kernels and the elementwise ops).
//
// Layout: z (logits) and y (target) are [N, C, S] row-major, S = D*H*W voxels; element (b, k, v)
// is at (b*C + k)*S + v. Buffers are arrays of vec4 (the host pads them to whole vec4s). One
// invocation owns 4 consecutive voxels v..v+3 of sample b and walks their C classes with stride S,
// computing on vec4s (one lane per voxel): when S is a multiple of 4 (ALIGNED) every load and
// store is one 16-byte access and neighbouring invocations touch neighbouring addresses
// (coalesced); otherwise the 4 values are gathered one by one. Lanes past S compute on whatever
// lies there (other classes, padding) and are masked out of every store and sum.
// Softmax statistics use the online form (running max m and sum of exp(z - m), rescaled when m
// grows), written without branches, so they cost one exp per class and one read of the logits.
// The class count is the override CLASSES: a pipeline per C, class loops of constant length.
// Workgroup: WG invocations (override, default 256). The per-voxel kernels run a grid whose z
// index is the sample b and whose x, y (linearised as in elementwise.wgsl, a dimension holds at
// most 65535) cover the S/4 voxel quads of a sample: no integer division per voxel.
// softmax_dice_sums: a fixed number of invocations stride over the quads of each sample, each
// writing its 3*C partial sums; the host sums the [3*C, invocations] partials with the reduce
// kernels. Backward entry points read the incoming gradient at binding 4.

override WG: u32 = 256u;
// S is a multiple of 4: quads are whole aligned vec4s.
override ALIGNED: bool = true;
// softmax_channels writes log-softmax instead of softmax.
override LOG: bool = false;
// The Dice kernels: sums of p^2 and y^2 (squared Dice) instead of p and y.
override SQUARED: bool = true;
// cross_entropy_backward: one gradient for every voxel (the backward of a summed loss), d_out[0].
override G_SCALAR: bool = false;
// Classes (C) of the tensors.
override CLASSES: u32 = 1u;
// Classes the Dice kernels keep in per-invocation arrays; the host checks C against it.
const MAX_CLASSES: u32 = 16u;

struct Params {
    n: u32,       // batch (N); for ema: elements
    s: u32,       // voxels per sample and class (S)
    chunk: u32,   // softmax_dice_sums: invocations (the stride over quads)
    decay: f32,   // ema
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> z: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> y: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
// The incoming gradient of the backward entry points: [3, C] of the class sums for
// softmax_dice_backward, [N, 1, S] per voxel (or one value, G_SCALAR) for cross_entropy_backward.
@group(0) @binding(4) var<storage, read> d_out: array<vec4<f32>>;

fn invocation(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG + lane;
}

// Offset of class 0 of voxel v of sample b.
fn voxel_base(b: u32, v: u32) -> u32 {
    return b * CLASSES * params.s + v;
}

// The 4 values of a buffer from element `at` on (at is a multiple of 4 when ALIGNED).
fn load_z(at: u32) -> vec4<f32> {
    if ALIGNED {
        return z[at / 4u];
    }
    var q: vec4<f32>;
    for (var j = 0u; j < 4u; j++) {
        q[j] = z[(at + j) / 4u][(at + j) % 4u];
    }
    return q;
}

fn load_y(at: u32) -> vec4<f32> {
    if ALIGNED {
        return y[at / 4u];
    }
    var q: vec4<f32>;
    for (var j = 0u; j < 4u; j++) {
        q[j] = y[(at + j) / 4u][(at + j) % 4u];
    }
    return q;
}

fn load_d_out(at: u32) -> vec4<f32> {
    if ALIGNED {
        return d_out[at / 4u];
    }
    var q: vec4<f32>;
    for (var j = 0u; j < 4u; j++) {
        q[j] = d_out[(at + j) / 4u][(at + j) % 4u];
    }
    return q;
}

// Stores the lanes of `value` whose voxel v + j is inside the sample.
fn store(at: u32, v: u32, value: vec4<f32>) {
    if ALIGNED {
        out[at / 4u] = value;
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if v + j < params.s {
            out[(at + j) / 4u][(at + j) % 4u] = value[j];
        }
    }
}

// Running max and sum of exp(z - max) over the classes of the 4 voxels at `base`.
struct Stats {
    m: vec4<f32>,
    total: vec4<f32>,
}

fn softmax_stats(base: u32) -> Stats {
    var m = load_z(base);
    var total = vec4<f32>(1.0);
    for (var k = 1u; k < CLASSES; k++) {
        let x = load_z(base + k * params.s);
        let e = exp(-abs(x - m));
        total = select(total + e, total * e + 1.0, x > m);
        m = max(m, x);
    }
    // An infinite maximum makes z - m NaN for its class (inf - inf), so the whole softmax is NaN,
    // as numpy and the Cpu64 reference compute it. The test is on the bits (a compiler may assume
    // floats are finite), and so is the NaN: the bits of m with every mantissa bit set.
    let bits = bitcast<vec4<u32>>(m);
    let infinite = (bits & vec4<u32>(0x7f800000u)) == vec4<u32>(0x7f800000u);
    total = select(total, bitcast<vec4<f32>>(bits | vec4<u32>(0x007fffffu)), infinite);
    return Stats(m, total);
}

@compute @workgroup_size(WG)
fn softmax_channels(@builtin(workgroup_id) group: vec3<u32>,
                    @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lane: u32) {
    let v = 4u * invocation(group, groups, lane);
    if v >= params.s { return; }
    let base = voxel_base(group.z, v);
    let stats = softmax_stats(base);
    let log_total = log(stats.total);
    let inverse = 1.0 / stats.total;
    for (var k = 0u; k < CLASSES; k++) {
        let at = base + k * params.s;
        let shifted = load_z(at) - stats.m;
        if LOG {
            store(at, v, shifted - log_total);
        } else {
            store(at, v, exp(shifted) * inverse);
        }
    }
}

// -sum_k y_k log softmax(z)_k = sum_k y_k (m - z_k + log total): each class's term as the
// reference computes it, so an infinite target gives the same infinity, not inf - inf.
@compute @workgroup_size(WG)
fn cross_entropy_voxels(@builtin(workgroup_id) group: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>,
                        @builtin(local_invocation_index) lane: u32) {
    let v = 4u * invocation(group, groups, lane);
    if v >= params.s { return; }
    let base = voxel_base(group.z, v);
    let stats = softmax_stats(base);
    let log_total = log(stats.total);
    var sum = vec4<f32>(0.0);
    for (var k = 0u; k < CLASSES; k++) {
        let at = base + k * params.s;
        sum += load_y(at) * ((stats.m - load_z(at)) + log_total);
    }
    store(group.z * params.s + v, v, sum);
}

// sum_k max(z, 0) - z y + log(1 + exp(-|z|)): stable for any z.
@compute @workgroup_size(WG)
fn bce_with_logits_voxels(@builtin(workgroup_id) group: vec3<u32>,
                          @builtin(num_workgroups) groups: vec3<u32>,
                          @builtin(local_invocation_index) lane: u32) {
    let v = 4u * invocation(group, groups, lane);
    if v >= params.s { return; }
    let base = voxel_base(group.z, v);
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < CLASSES; k++) {
        let at = base + k * params.s;
        let x = load_z(at);
        acc += max(x, vec4<f32>(0.0)) - x * load_y(at) + log(1.0 + exp(-abs(x)));
    }
    store(group.z * params.s + v, v, acc);
}

// Per-invocation partial sums: the T = params.chunk invocations stride over the quads of each
// sample in turn, each keeps its 3 C sums (a vec4 lane per voxel of its quads, lanes past S
// masked) and writes their lane totals to out[j * T + t], j = row * C + k, with rows sum p y,
// sum p^2 (or p), sum y^2 (or y). The output is read as scalars: out is [3 C, T] floats.
@compute @workgroup_size(WG)
fn softmax_dice_sums(@builtin(workgroup_id) group: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>,
                     @builtin(local_invocation_index) lane: u32) {
    let t = invocation(group, groups, lane);
    let invocations = params.chunk;
    if t >= invocations { return; }
    var acc: array<vec4<f32>, 48>;   // 3 * MAX_CLASSES
    for (var b = 0u; b < params.n; b++) {
        for (var v = 4u * t; v < params.s; v += 4u * invocations) {
            let inside = vec4<u32>(v) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(params.s);
            let base = voxel_base(b, v);
            let stats = softmax_stats(base);
            let inverse = 1.0 / stats.total;
            for (var k = 0u; k < CLASSES; k++) {
                let at = base + k * params.s;
                let p = select(vec4<f32>(0.0), exp(load_z(at) - stats.m) * inverse, inside);
                let label = select(vec4<f32>(0.0), load_y(at), inside);
                acc[k] += p * label;
                if SQUARED {
                    acc[MAX_CLASSES + k] += p * p;
                    acc[2u * MAX_CLASSES + k] += label * label;
                } else {
                    acc[MAX_CLASSES + k] += p;
                    acc[2u * MAX_CLASSES + k] += label;
                }
            }
        }
    }
    for (var k = 0u; k < CLASSES; k++) {
        for (var row = 0u; row < 3u; row++) {
            let j = (row * CLASSES + k) * invocations + t;
            out[j / 4u][j % 4u] = dot(acc[row * MAX_CLASSES + k], vec4<f32>(1.0));
        }
    }
}

// teacher <- decay * teacher + (1 - decay) * student over a flat buffer (z = teacher, y = student),
// one vec4 per invocation (padding lanes computed on, never read back).
@compute @workgroup_size(WG)
fn ema(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
       @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if 4u * i >= params.n { return; }
    out[i] = params.decay * z[i] + (1.0 - params.decay) * y[i];
}

// d z_k = g (p_k sum_j y_j - y_k), g = d_out of the voxel.
@compute @workgroup_size(WG)
fn cross_entropy_backward(@builtin(workgroup_id) group: vec3<u32>,
                          @builtin(num_workgroups) groups: vec3<u32>,
                          @builtin(local_invocation_index) lane: u32) {
    let v = 4u * invocation(group, groups, lane);
    if v >= params.s { return; }
    let base = voxel_base(group.z, v);
    let stats = softmax_stats(base);
    var sum_y = vec4<f32>(0.0);
    for (var k = 0u; k < CLASSES; k++) {
        sum_y += load_y(base + k * params.s);
    }
    var g = vec4<f32>(d_out[0].x);
    if !G_SCALAR {
        g = load_d_out(group.z * params.s + v);
    }
    let scale = sum_y / stats.total;
    for (var k = 0u; k < CLASSES; k++) {
        let at = base + k * params.s;
        store(at, v, g * (exp(load_z(at) - stats.m) * scale - load_y(at)));
    }
}

// The gradient [3, C] of the class sums at element i.
fn d_sum(i: u32) -> f32 {
    return d_out[i / 4u][i % 4u];
}

// With G = d_out (the gradient of the class sums) and p = softmax(z):
// u_k = G0_k y_k + 2 G1_k p_k (squared) or G0_k y_k + G1_k, d z_k = p_k (u_k - sum_j p_j u_j).
@compute @workgroup_size(WG)
fn softmax_dice_backward(@builtin(workgroup_id) group: vec3<u32>,
                         @builtin(num_workgroups) groups: vec3<u32>,
                         @builtin(local_invocation_index) lane: u32) {
    let v = 4u * invocation(group, groups, lane);
    if v >= params.s { return; }
    let base = voxel_base(group.z, v);
    let stats = softmax_stats(base);
    let inverse = 1.0 / stats.total;
    // p and u of each class, kept from the dot-product pass for the write pass.
    var p: array<vec4<f32>, MAX_CLASSES>;
    var u: array<vec4<f32>, MAX_CLASSES>;
    var pu = vec4<f32>(0.0);
    for (var k = 0u; k < CLASSES; k++) {
        let at = base + k * params.s;
        p[k] = exp(load_z(at) - stats.m) * inverse;
        let g0 = d_sum(k);
        let g1 = d_sum(CLASSES + k);
        if SQUARED {
            u[k] = g0 * load_y(at) + 2.0 * g1 * p[k];
        } else {
            u[k] = g0 * load_y(at) + g1;
        }
        pu += p[k] * u[k];
    }
    for (var k = 0u; k < CLASSES; k++) {
        store(base + k * params.s, v, p[k] * (u[k] - pu));
    }
}
