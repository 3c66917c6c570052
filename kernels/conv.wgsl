// 3D convolution: forward, grad-input and grad-weight (conv_transpose3d is grad-input).
//
// Layout (row-major, as PyTorch): x [N, C, D, H, W], w [K, C, kd, kh, kw], y [N, K, Do, Ho, Wo].
// Along each axis, output o reads input o * stride - padding + t * dilation through tap t; reads
// outside the input are zeros. Bindings: 0 the sizes, 1 and 2 the operands, 3 the result, 4 a
// per-channel bias (the host binds zeros when there is none, so one pipeline serves both).
//
// Three versions, numbered as the host's ConvVariant: 1, the direct kernels, 2, the
// register-blocked ones (described below, after variant 1), and 3, variant 2 with the forward's
// weights staged in workgroup memory (the override STAGED, described after variant 2's forward).
// Variant 1 stays as the reference the blocked kernels are measured against, and runs wherever
// variant 2's conditions do not hold.
//
// Which entry point runs each primitive: per primitive, the first row whose condition holds
// (variant 1 runs the direct rows only). The host's ConvPlan (src/gpu/conv/plan.rs) is this table.
//
//   entry point                 primitive    condition
//   conv3d_blocked              forward      W and Wo multiples of 4; the input segment of WB
//                                            outputs within MAX_SEGMENT vec4s; KB / 4 x WB <=
//                                            MAX_ACC; KW x KB / 4 <= MAX_TAP_WEIGHTS; variant 3:
//                                            kd x kh x KW x KB / 4 <= MAX_STAGED
//   conv3d_direct               forward      otherwise
//   conv3d_blocked, flipped     grad-input   stride 1, padding <= dilation (k - 1), and the row
//                                            above on the flipped convolution
//   conv3d_grad_input_patches   grad-input   stride = kernel, no padding or dilation, D = Do kd,
//                                            H = Ho kh, W = Wo KW, and Wo a multiple of 8
//   conv3d_grad_input_blocked   grad-input   W and Wo multiples of 4; WB (at most PART) a multiple
//                                            of 4 SW; its dy segment within MAX_SEGMENT vec4s
//   conv3d_grad_input_direct    grad-input   otherwise
//   conv3d_grad_weight_rows     grad-weight  kernel 3 tall with stride and dilation 1 along H;
//                                            the forward's condition at KB 8 x WB 4; KW x 2 <=
//                                            ROW_ACC
//   conv3d_grad_weight_blocked  grad-weight  the forward's condition without staging and its
//                                            weight registers, at WB <= PART; KW x KB / 4 <= MAX_ACC
//   conv3d_grad_weight_direct   grad-weight  otherwise
//
// The blocked kernels read the weight rearranged by `conv3d_arrange_weight` first, and the
// grad-weight kernels write partial sums over chunks of the reduction that reduce.wgsl adds up.
//
// Variant 1, the direct kernels (`*_direct`): one result element per invocation, computed from its
// definition with every bound checked. They are the simple, obviously-right version that the
// blocked variant is measured against. Workgroups of WG invocations on the 2D grid the host
// linearises as y * groups.x + x.
//   conv3d_direct             y[n, k, o] = bias[k] + sum over c, t of w[k, c, t] x[n, c, i(o, t)]
//   conv3d_grad_input_direct  dx[n, c, i] = bias[c] + sum over k and the taps t with an output o
//                             such that i = o * stride - padding + t * dilation of w[k, c, t] dy[n, k, o]
//   conv3d_grad_weight_direct partial[r, k, c, t] = sum over the output rows (n, od) of chunk r of
//                             dy[n, k, o] x[n, c, i(o, t)]; the host sums the chunks (reduce.wgsl),
//                             so the long reduction (N Do Ho Wo terms) still runs in parallel.

override WG: u32 = 64u;

struct Params {
    batch: u32,
    c_in: u32,
    c_out: u32,
    rows_per_chunk: u32,     // grad-weight: output rows summed by one partial
    channels_padded: u32,    // blocked: the arranged weight's channel count, a multiple of KB
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    input: vec4<u32>,        // D, H, W, unused
    kernel: vec4<u32>,
    output: vec4<u32>,
    stride: vec4<u32>,
    padding: vec4<u32>,
    dilation: vec4<u32>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

fn invocation(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG + lane;
}

// The input position output o reads through tap t along `axis`, or -1 outside the input.
fn input_at(axis: u32, o: u32, t: u32) -> i32 {
    let i = i32(o * params.stride[axis] + t * params.dilation[axis]) - i32(params.padding[axis]);
    return select(-1, i, i >= 0 && i < i32(params.input[axis]));
}

// Whether tap t lines input i up with an output position along `axis`: (i + padding -
// t dilation) a multiple of the stride. The quotient in floats, rounded, then checked (exact while
// the numbers are below 2^24): an integer division by a value the compiler does not know is not
// vectorised and costs far more.
fn tap_aligned(axis: u32, i: u32, t: u32) -> bool {
    let q = i32(i + params.padding[axis]) - i32(t * params.dilation[axis]);
    let s = i32(params.stride[axis]);
    return i32(round(f32(q) / f32(s))) * s == q;
}

// The output position that reads input i through the aligned tap t along `axis`, or -1 if it
// falls outside the output.
fn output_at(axis: u32, i: u32, t: u32) -> i32 {
    let q = i32(i + params.padding[axis]) - i32(t * params.dilation[axis]);
    let o = i32(round(f32(q) / f32(params.stride[axis])));
    return select(-1, o, q >= 0 && o < i32(params.output[axis]));
}

// a = x, b = w, out = y.
@compute @workgroup_size(WG)
fn conv3d_direct(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                 @builtin(local_invocation_index) lane: u32) {
    let o = params.output.xyz;
    let i = invocation(group, groups, lane);
    if i >= params.batch * params.c_out * o.x * o.y * o.z { return; }
    let ow = i % o.z;
    let oh = (i / o.z) % o.y;
    let od = (i / (o.z * o.y)) % o.x;
    let k = (i / (o.z * o.y * o.x)) % params.c_out;
    let n = i / (o.z * o.y * o.x * params.c_out);
    let sz = params.input.xyz;
    let kz = params.kernel.xyz;
    var sum = bias[k];
    for (var c = 0u; c < params.c_in; c++) {
        for (var td = 0u; td < kz.x; td++) {
            let id = input_at(0u, od, td);
            if id < 0 { continue; }
            for (var th = 0u; th < kz.y; th++) {
                let ih = input_at(1u, oh, th);
                if ih < 0 { continue; }
                let x_row = (((n * params.c_in + c) * sz.x + u32(id)) * sz.y + u32(ih)) * sz.z;
                let w_row = (((k * params.c_in + c) * kz.x + td) * kz.y + th) * kz.z;
                for (var tw = 0u; tw < kz.z; tw++) {
                    let iw = input_at(2u, ow, tw);
                    if iw >= 0 { sum += b[w_row + tw] * a[x_row + u32(iw)]; }
                }
            }
        }
    }
    out[i] = sum;
}

// a = dy, b = w, out = dx.
@compute @workgroup_size(WG)
fn conv3d_grad_input_direct(@builtin(workgroup_id) group: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>,
                            @builtin(local_invocation_index) lane: u32) {
    let sz = params.input.xyz;
    let i = invocation(group, groups, lane);
    if i >= params.batch * params.c_in * sz.x * sz.y * sz.z { return; }
    let iw = i % sz.z;
    let ih = (i / sz.z) % sz.y;
    let id = (i / (sz.z * sz.y)) % sz.x;
    let c = (i / (sz.z * sz.y * sz.x)) % params.c_in;
    let n = i / (sz.z * sz.y * sz.x * params.c_in);
    let o = params.output.xyz;
    let kz = params.kernel.xyz;
    var sum = bias[c];
    // Taps aligned with an output come every `stride` taps from the first aligned one: find it
    // among the first `stride` per axis, then step (at stride 2 and kernel 2, one tap per axis).
    let step = params.stride.xyz;
    let plane = o.x * o.y * o.z;
    for (var td0 = 0u; td0 < min(step.x, kz.x); td0++) {
        if !tap_aligned(0u, id, td0) { continue; }
        for (var td = td0; td < kz.x; td += step.x) {
            let od = output_at(0u, id, td);
            if od < 0 { continue; }
            for (var th0 = 0u; th0 < min(step.y, kz.y); th0++) {
                if !tap_aligned(1u, ih, th0) { continue; }
                for (var th = th0; th < kz.y; th += step.y) {
                    let oh = output_at(1u, ih, th);
                    if oh < 0 { continue; }
                    for (var tw0 = 0u; tw0 < min(step.z, kz.z); tw0++) {
                        if !tap_aligned(2u, iw, tw0) { continue; }
                        for (var tw = tw0; tw < kz.z; tw += step.z) {
                            let ow = output_at(2u, iw, tw);
                            if ow < 0 { continue; }
                            // Every output channel through this tap: the inner loop is plain.
                            var y_at = ((n * params.c_out * o.x + u32(od)) * o.y + u32(oh)) * o.z
                                + u32(ow);
                            var w_at = ((c * kz.x + td) * kz.y + th) * kz.z + tw;
                            for (var k = 0u; k < params.c_out; k++) {
                                sum += b[w_at] * a[y_at];
                                y_at += plane;
                                w_at += params.c_in * kz.x * kz.y * kz.z;
                            }
                        }
                    }
                }
            }
        }
    }
    out[i] = sum;
}

// a = x, b = dy, out = partial sums [chunks, K, C, kd, kh, kw].
@compute @workgroup_size(WG)
fn conv3d_grad_weight_direct(@builtin(workgroup_id) group: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>,
                             @builtin(local_invocation_index) lane: u32) {
    let kz = params.kernel.xyz;
    let weights = params.c_out * params.c_in * kz.x * kz.y * kz.z;
    let o = params.output.xyz;
    let rows = params.batch * o.x;
    let chunks = (rows + params.rows_per_chunk - 1u) / params.rows_per_chunk;
    let i = invocation(group, groups, lane);
    if i >= chunks * weights { return; }
    let tw = i % kz.z;
    let th = (i / kz.z) % kz.y;
    let td = (i / (kz.z * kz.y)) % kz.x;
    let c = (i / (kz.z * kz.y * kz.x)) % params.c_in;
    let k = (i / (kz.z * kz.y * kz.x * params.c_in)) % params.c_out;
    let chunk = i / weights;
    let sz = params.input.xyz;
    var sum = 0.0;
    let first = chunk * params.rows_per_chunk;
    for (var r = first; r < min(first + params.rows_per_chunk, rows); r++) {
        let n = r / o.x;
        let od = r % o.x;
        let id = input_at(0u, od, td);
        if id < 0 { continue; }
        for (var oh = 0u; oh < o.y; oh++) {
            let ih = input_at(1u, oh, th);
            if ih < 0 { continue; }
            let x_row = (((n * params.c_in + c) * sz.x + u32(id)) * sz.y + u32(ih)) * sz.z;
            let y_row = (((n * params.c_out + k) * o.x + od) * o.y + oh) * o.z;
            for (var ow = 0u; ow < o.z; ow++) {
                let iw = input_at(2u, ow, tw);
                if iw >= 0 { sum += b[y_row + ow] * a[x_row + u32(iw)]; }
            }
        }
    }
    out[i] = sum;
}

// ---------------------------------------------------------------------------------------------
// Variant 2, register-blocked (`*_blocked`). On lavapipe a load whose address is not a
// compile-time constant costs about 50 cycles per scalar (100 per vec4) against a fraction of a
// cycle per multiply-add, so what pays is many multiply-adds per load held in registers; the same
// blocking serves real GPUs (no workgroup memory, whose barriers cost more than they save here).
//
// Forward (`conv3d_blocked`): an invocation computes WB consecutive W positions of one output row
// (n, od, oh) for KB output channels, in WB x KB/4 vec4 accumulators. For each input channel and
// each (td, th) it loads the input row segment those WB outputs read as whole vec4s (its first
// element is aligned because W and WB are multiples of 4), and the KW x KB weights as KW x KB/4
// vec4s from a copy of the weight arranged [C, kd, kh, kw, K] (output channels contiguous, padded
// with zeros to a multiple of KB: `conv3d_arrange_weight`). Then KW x WB x KB multiply-adds use
// them. Along W the kernel size, stride, padding and dilation are override constants (KW, SW, PW,
// DW), so once the loops over tw, the WB positions and the KB/4 vec4s are unrolled every register
// index is a constant. The invocations of a workgroup share the channel block (workgroup_id.z), so
// on a GPU the weight loads are one cached address for all of them. At 3x3x3 and the host's KB 8 x
// WB 16 this is 6 vec4 input loads and 6 vec4 weight loads per 384 multiply-adds.
//
// The driver unrolls a loop only while its trip count times its body stays under a limit (Mesa's
// NIR unroller), and past it the accumulators live in indexed memory and the kernel runs several
// times slower. A nest over 16 positions is past the limit, so the positions go through nests of
// at most PART = 8 (`accumulate_part`, `store_part`: functions called with a constant offset,
// inlined, each nest unrolled on its own). On lavapipe the timings fit every load costing about
// the same, input or weight, so what counts is multiply-adds per vec4 loaded: 16 at 8 x 16, 9.6 at
// 8 x 8. Measured (3x3x3 16-16 on 2 x 64^3, cargo bench --bench conv -- "forward v2/3x3x3 16-16
// 2x64", alternating runs): 15.3-16.8 GFLOP/s at KB 8 x WB 16 against 10.3-11.3 at 8 x 8 (k2 s2
// down 16-32: 7.3 against 6.1). Earlier, with one nest for all WB positions: 8 x 8 12.1, 16 x 4 8.0,
// 8 x 4 7.3, 4 x 16 2.7 and 8 x 16 4.4 (not unrolled); 16 x 8 still collapses with parts (1.5).
//
// Variant 3 (STAGED): for each input channel the workgroup copies that channel's weights for its
// channel block ([kd, kh, KW, KB], at most MAX_STAGED vec4s) into workgroup memory between two
// barriers, and the invocations read them there instead of from the storage buffer: on a GPU,
// one global read per weight per workgroup instead of one per invocation. On lavapipe it loses,
// as the issue's earlier measurements said it would (a barrier ends the JIT's straight-line code,
// and every value live across it goes to memory): 3x3x3 16-16 on 1 x 32^3, cargo bench --bench
// conv -- "16-16 1x32", one run: forward 11.4 GFLOP/s against 20.6 for variant 2, grad-input 11.8
// against 14.7. The host runs variant 2 unless asked for 3.
//
// Grad-input at stride 1 is this forward on dy with the weight flipped in space and its channel
// axes swapped (`conv3d_arrange_weight` with FLIP), padding dilation (k - 1) - padding. Where the
// stride equals the kernel (V-Net's k2 s2 down-sampling, whose grad-input is the transposed
// up-sampling's forward) it is `conv3d_grad_input_patches`, at the end of this file: one tap per
// axis per input voxel, a small matrix product with no alignment tests. At other strides it is
// `conv3d_grad_input_blocked`: the same blocking, WB input columns x KB input channels, where
// which taps reach which column is a constant of the unrolled loops (but D and H are tested).
//
// Grad-weight (`conv3d_grad_weight_blocked`): an invocation owns one (c, td, th) and KB output
// channels, for all KW taps tw: KW x KB/4 vec4 accumulators, summed over a chunk of output rows
// (n, od, oh) WB positions at a time. The input segment is loaded as in the forward; dy as WB/4
// vec4s along W for each of the KB channels, which the workgroup's invocations share (it spans
// (c, td, th), not rows), so those loads are broadcast. The host sums the chunks as variant 1's.
// Wider blocks (all kh taps along H per invocation, or 16 output channels) measured 3-20x slower
// on lavapipe: their unrolled body is past what the driver unrolls, and the accumulators then
// live in indexed memory. Any larger tile here has to keep each unrolled loop nest this small.
// Measured again (cargo bench --bench conv -- "grad-weight v2", 3x3x3 16-16 on 2 x 64^3, 9.9
// GFLOP/s here): two kh taps per invocation sharing each dy load ran at 1.1-3.4 GFLOP/s, and
// holding a whole W block of dy in registers first (so more taps could share it) at 6.7 even with
// one tap; only the k2 s2 layers gained (4.2 -> 5.8 GFLOP/s with two taps), too little for a
// second code path.
//
// The blocked kernels need W and Wo to be multiples of 4 and a segment of at most MAX_SEGMENT
// vec4s; the host runs variant 1 otherwise. Their loops over override constants must be unrolled
// by the driver for the accumulators to live in registers: the host creates shader modules without
// wgpu's loop-bounding counter, which hides trip counts (src/gpu/kernels.rs). Only the forward
// splits its positions into parts; the host runs the blocked grad-input and grad-weight kernels at
// WB <= PART.

override KB: u32 = 8u;   // output channels per invocation, a multiple of 4 (at most 16)
override WB: u32 = 8u;   // W positions per invocation, a multiple of 4 (KB / 4 x WB <= MAX_ACC)
override KW: u32 = 3u;   // kernel width
override SW: u32 = 1u;   // stride along W
override PW: u32 = 1u;   // padding along W
override DW: u32 = 1u;   // dilation along W
override FLIP: bool = false;
override REVERSE: bool = true;   // with FLIP: reverse the taps too (off for grad-input at stride > 1)
override STAGED: bool = false;   // variant 3: the forward reads its weights from workgroup memory

const MAX_SEGMENT: u32 = 16u;   // vec4s of one input row segment
const MAX_ACC: u32 = 32u;       // vec4 accumulators
const MAX_TAP_WEIGHTS: u32 = 28u;   // the forward's weight vec4s of one (c, td, th): KW x KB / 4
const PART: u32 = 8u;   // W positions per unrolled loop nest
const MAX_STAGED: u32 = 512u;   // vec4s of one input channel's weights for a channel block

var<workgroup> staged: array<vec4<f32>, MAX_STAGED>;

@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out4: array<vec4<f32>>;

// The segment starts PAD_V (padding rounded up to whole vec4s) before column ow0 * SW.
fn pad_v() -> u32 { return (PW + 3u) / 4u * 4u; }

// The vec4s of input row `row` (its first element's index) covering what outputs ow0..ow0+WB-1
// read; zeros outside the row or when the row itself is outside the input (!inside).
fn load_segment(row: u32, ow0: u32, inside: bool) -> array<vec4<f32>, MAX_SEGMENT> {
    var seg: array<vec4<f32>, MAX_SEGMENT>;
    let vecs = (pad_v() - PW + (WB - 1u) * SW + (KW - 1u) * DW + 4u) / 4u;
    let first = i32(ow0 * SW) - i32(pad_v());
    for (var v = 0u; v < vecs; v++) {
        let col = first + 4 * i32(v);
        if inside && col >= 0 && col < i32(params.input.z) {
            seg[v] = a4[(row + u32(col)) / 4u];
        }
    }
    return seg;
}

// The element of the segment that output ow0 + j reads through tap tw.
fn tap(seg: ptr<function, array<vec4<f32>, MAX_SEGMENT>>, j: u32, tw: u32) -> f32 {
    let q = pad_v() - PW + j * SW + tw * DW;
    return (*seg)[q / 4u][q % 4u];
}

// a4 = x, b4 = the arranged weight [C, kd, kh, KW, channels_padded], out4 = y.
@compute @workgroup_size(WG)
fn conv3d_blocked(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let o = params.output.xyz;
    let sz = params.input.xyz;
    let blocks = (o.z + WB - 1u) / WB;
    // Past the last block, an invocation computes the last one again and does not store it:
    // returning early would make the weight loads below divergent (as in the grad-weight
    // kernels). With the control flow kept uniform, 3x3x3 16-16 on 2 x 64^3 went from 10.6-11.0
    // to 11.8-13.3 GFLOP/s forward and from 10.8-11.2 to 13.0-14.3 grad-input on lavapipe.
    let count = params.batch * o.x * o.y * blocks;
    let s = min((group.y * groups.x + group.x) * WG + lane, count - 1u);
    let ow0 = (s % blocks) * WB;
    let oh = (s / blocks) % o.y;
    let od = (s / (blocks * o.y)) % o.x;
    let n = s / (blocks * o.y * o.x);
    let k0 = group.z * KB;
    let kp = params.channels_padded;

    var acc: array<vec4<f32>, MAX_ACC>;   // acc[j * KB / 4 + q]: channels k0 + 4q.. at ow0 + j
    let taps = params.kernel.x * params.kernel.y * KW;
    for (var c = 0u; c < params.c_in; c++) {
        if STAGED {
            // Channel c's weights for this channel block, [kd, kh, KW, KB], copied by the
            // workgroup together (the barriers sit in uniform control flow: the loop over c is).
            workgroupBarrier();
            for (var i = lane; i < taps * KB / 4u; i += WG) {
                staged[i] = b4[((c * taps + i / (KB / 4u)) * kp + k0) / 4u + i % (KB / 4u)];
            }
            workgroupBarrier();
        }
        for (var td = 0u; td < params.kernel.x; td++) {
            let id = input_at(0u, od, td);
            for (var th = 0u; th < params.kernel.y; th++) {
                let ih = input_at(1u, oh, th);
                let row = (((n * params.c_in + c) * sz.x + u32(max(id, 0))) * sz.y
                    + u32(max(ih, 0))) * sz.z;
                var seg = load_segment(row, ow0, id >= 0 && ih >= 0);
                let tap0 = (td * params.kernel.y + th) * KW;
                let w_tap = ((c * taps + tap0) * kp + k0) / 4u;
                var wv: array<vec4<f32>, MAX_TAP_WEIGHTS>;   // wv[tw * KB / 4 + q]
                for (var tw = 0u; tw < KW; tw++) {
                    for (var q = 0u; q < KB / 4u; q++) {
                        if STAGED {
                            wv[tw * KB / 4u + q] = staged[(tap0 + tw) * KB / 4u + q];
                        } else {
                            wv[tw * KB / 4u + q] = b4[w_tap + tw * kp / 4u + q];
                        }
                    }
                }
                accumulate_part(&acc, &seg, &wv, 0u);
                if WB > PART { accumulate_part(&acc, &seg, &wv, PART); }
            }
        }
    }
    if (group.y * groups.x + group.x) * WG + lane >= count { return; }
    store_part(&acc, n, od, oh, ow0, k0, 0u);
    if WB > PART { store_part(&acc, n, od, oh, ow0, k0, PART); }
}

// The forward's multiply-adds for W positions j0 .. j0 + PART - 1 of the block (those below WB).
fn accumulate_part(acc: ptr<function, array<vec4<f32>, MAX_ACC>>,
                   seg: ptr<function, array<vec4<f32>, MAX_SEGMENT>>,
                   wv: ptr<function, array<vec4<f32>, MAX_TAP_WEIGHTS>>, j0: u32) {
    for (var tw = 0u; tw < KW; tw++) {
        for (var j = j0; j < min(j0 + PART, WB); j++) {
            let xv = tap(seg, j, tw);
            for (var q = 0u; q < KB / 4u; q++) {
                (*acc)[j * KB / 4u + q] = fma(vec4<f32>(xv), (*wv)[tw * KB / 4u + q],
                                              (*acc)[j * KB / 4u + q]);
            }
        }
    }
}

// The forward's stores for the same W positions, as vec4s along W: component r of channel vec4 q
// at positions ow0 + 4v .. + 3.
fn store_part(acc: ptr<function, array<vec4<f32>, MAX_ACC>>, n: u32, od: u32, oh: u32, ow0: u32,
              k0: u32, j0: u32) {
    let o = params.output.xyz;
    for (var q = 0u; q < KB / 4u; q++) {
        for (var r = 0u; r < 4u; r++) {
            let k = k0 + 4u * q + r;
            if k >= params.c_out { continue; }
            let plane = ((n * params.c_out + k) * o.x + od) * o.y + oh;
            for (var j = j0; j < min(j0 + PART, WB); j += 4u) {
                let ow = ow0 + j;
                if ow >= o.z { continue; }
                let y = vec4<f32>((*acc)[j * KB / 4u + q][r], (*acc)[(j + 1u) * KB / 4u + q][r],
                                  (*acc)[(j + 2u) * KB / 4u + q][r], (*acc)[(j + 3u) * KB / 4u + q][r]);
                out4[(plane * o.z + ow) / 4u] = y + bias[k];
            }
        }
    }
}

// The weight arranged for the blocked kernels, [Ci, kd, kh, kw, channels_padded] with the output
// channels contiguous and zeros past them. Without FLIP, Ci = C and the output channels are K:
// out[c, t, k] = w[k, c, t]. With FLIP (the forward that computes grad-input), Ci = K and they are
// C: out[k, t, c] = w[k, c, kernel - 1 - t], or w[k, c, t] without REVERSE (for
// conv3d_grad_input_blocked). One invocation per element of out (scalar stores).
@compute @workgroup_size(WG)
fn conv3d_arrange_weight(@builtin(workgroup_id) group: vec3<u32>,
                         @builtin(num_workgroups) groups: vec3<u32>,
                         @builtin(local_invocation_index) lane: u32) {
    let kz = params.kernel.xyz;
    let taps = kz.x * kz.y * kz.z;
    let co_padded = params.channels_padded;
    let ci_count = select(params.c_in, params.c_out, FLIP);
    let co_count = select(params.c_out, params.c_in, FLIP);
    let i = invocation(group, groups, lane);
    if i >= ci_count * taps * co_padded { return; }
    let co = i % co_padded;
    let t = (i / co_padded) % taps;
    let ci = i / (co_padded * taps);
    var value = 0.0;
    if co < co_count {
        if FLIP {
            value = b[(co + ci * params.c_in) * taps + select(t, taps - 1u - t, REVERSE)];
        } else {
            value = b[(co * params.c_in + ci) * taps + t];
        }
    }
    out[i] = value;
}

// The vec4 of dy at element `at` (a multiple of 4), or zeros past the row or the channels.
fn dy_vec(at: u32, live: bool) -> vec4<f32> {
    if live { return b4[at / 4u]; }
    return vec4<f32>();
}

// dy of channels k .. k + 3 at the 4 W positions from element `at` of channel k (a multiple of 4;
// channels `plane` apart), one vec4 load per channel, transposed: element jj holds the 4 channels
// at position jj. Zeros past the row (!live) or the channels.
fn dy_columns(at: u32, plane: u32, k: u32, live: bool) -> array<vec4<f32>, 4> {
    let d0 = dy_vec(at, live && k < params.c_out);
    let d1 = dy_vec(at + plane, live && k + 1u < params.c_out);
    let d2 = dy_vec(at + 2u * plane, live && k + 2u < params.c_out);
    let d3 = dy_vec(at + 3u * plane, live && k + 3u < params.c_out);
    return array<vec4<f32>, 4>(vec4<f32>(d0.x, d1.x, d2.x, d3.x), vec4<f32>(d0.y, d1.y, d2.y, d3.y),
                               vec4<f32>(d0.z, d1.z, d2.z, d3.z), vec4<f32>(d0.w, d1.w, d2.w, d3.w));
}

// a4 = x, b4 = dy, out = partial sums [chunks, K, C, kd, kh, kw]. Grid: x over the (c, td, th) in
// groups of WG, y over the chunks of rows_per_chunk output rows (n, od, oh), z over the blocks of KB
// output channels; so every invocation of a workgroup reads the same dy.
@compute @workgroup_size(WG)
fn conv3d_grad_weight_blocked(@builtin(workgroup_id) group: vec3<u32>,
                              @builtin(local_invocation_index) lane: u32) {
    let kz = params.kernel.xyz;
    let o = params.output.xyz;
    let sz = params.input.xyz;
    // Past the last (c, td, th), an invocation computes the last one again and does not store it:
    // returning early would make every later load divergent, and dy's loads must stay uniform.
    let combos = params.c_in * kz.x * kz.y;
    let ctt = min(group.x * WG + lane, combos - 1u);
    let th = ctt % kz.y;
    let td = (ctt / kz.y) % kz.x;
    let c = ctt / (kz.y * kz.x);
    let k0 = group.z * KB;
    let plane = o.x * o.y * o.z;
    let blocks = (o.z + WB - 1u) / WB;
    let rows = params.batch * o.x * o.y;
    let first = group.y * params.rows_per_chunk;

    var acc: array<vec4<f32>, MAX_ACC>;   // acc[tw * KB / 4 + q]: dw[k0 + 4q.., c, td, th, tw]
    for (var r = first; r < min(first + params.rows_per_chunk, rows); r++) {
        let oh = r % o.y;
        let od = (r / o.y) % o.x;
        let n = r / (o.y * o.x);
        let id = input_at(0u, od, td);
        let ih = input_at(1u, oh, th);
        let row = (((n * params.c_in + c) * sz.x + u32(max(id, 0))) * sz.y + u32(max(ih, 0))) * sz.z;
        let dy_row = (((n * params.c_out + k0) * o.x + od) * o.y + oh) * o.z;
        for (var blk = 0u; blk < blocks; blk++) {
            let ow0 = blk * WB;
            var seg = load_segment(row, ow0, id >= 0 && ih >= 0);
            for (var v = 0u; v < WB / 4u; v++) {
                for (var q = 0u; q < KB / 4u; q++) {
                    // dy of channels k0 + 4q .. + 3 at ow0 + 4v .. + 3.
                    let at = dy_row + 4u * q * plane + ow0 + 4u * v;
                    let dy = dy_columns(at, plane, k0 + 4u * q, ow0 + 4u * v < o.z);
                    for (var jj = 0u; jj < 4u; jj++) {
                        let d = dy[jj];
                        for (var tw = 0u; tw < KW; tw++) {
                            acc[tw * KB / 4u + q] = fma(vec4<f32>(tap(&seg, 4u * v + jj, tw)), d,
                                                        acc[tw * KB / 4u + q]);
                        }
                    }
                }
            }
        }
    }
    if group.x * WG + lane >= combos { return; }
    for (var q = 0u; q < KB / 4u; q++) {
        for (var r = 0u; r < 4u; r++) {
            let k = k0 + 4u * q + r;
            if k >= params.c_out { continue; }
            let w_row = ((((group.y * params.c_out + k) * params.c_in + c) * kz.x + td) * kz.y + th) * KW;
            for (var tw = 0u; tw < KW; tw++) {
                out[w_row + tw] = acc[tw * KB / 4u + q][r];
            }
        }
    }
}

// Grad-weight sliding down H (`conv3d_grad_weight_rows`), where the kernel is 3 tall with stride
// and dilation 1 along H (V-Net's 3x3x3 layers); the host runs it in place of the blocked one
// there. The blocked kernel uses each dy value for KW taps only, so its dy loads (KB x WB scalars
// per block) outnumber the rest. Here an invocation owns (c, td) and all three kh taps, 3 x KW x
// KB/4 vec4 accumulators, and walks the output rows oh of one (n, od, W block) in order: row oh
// reads input rows oh - PH + 0, 1, 2, so each step loads one new input segment, keeps the two
// before it, and uses every dy vec4 for 3 x KW taps. WB is 4, and the channels go through one
// part of 4 per call of `rows_part` (KB 8: two calls with a constant q, each nest unrolled on its
// own, as the forward's parts): 8 dy and 3 input vec4 loads per 288 multiply-adds, against 20 per
// 192 in the blocked kernel at 8 x 8. Measured (cargo bench --bench conv -- "grad-weight v2"):
// 3x3x3 16-16 on 2 x 64^3 13.4 GFLOP/s at KB = WB = 4 (blocked 9.9), 32-32 on 2 x 32^3 14.2
// (8.0), 1-16 4.5 (4.7); then alternating runs of KB 4 and 8 in parts: 12.6-12.8 against
// 13.9-18.1 (16-16), 12.7-12.8 against 14.3-16.9 (32-32). With KB or WB 8 in one nest it was past
// what lavapipe unrolls and ran at 1.1-2.9. The taps' segments and accumulators are separate
// variables, not a nested array, for the same reason.
const ROW_ACC: u32 = 14u;   // vec4 accumulators per kh tap: KW x KB / 4

fn accumulate_tap(acc: ptr<function, array<vec4<f32>, ROW_ACC>>,
                  seg: ptr<function, array<vec4<f32>, MAX_SEGMENT>>, d: vec4<f32>, j: u32, q: u32) {
    for (var tw = 0u; tw < KW; tw++) {
        (*acc)[tw * KB / 4u + q] = fma(vec4<f32>(tap(seg, j, tw)), d, (*acc)[tw * KB / 4u + q]);
    }
}

// The input row segment at input row ih (maybe outside) of the depth row starting at `depth_row`.
fn segment_at(depth_row: u32, ih: i32, ow0: u32, depth_inside: bool) -> array<vec4<f32>, MAX_SEGMENT> {
    let inside = depth_inside && ih >= 0 && ih < i32(params.input.y);
    return load_segment(depth_row + u32(max(ih, 0)) * params.input.z, ow0, inside);
}

fn store_tap(acc: ptr<function, array<vec4<f32>, ROW_ACC>>, chunk: u32, k0: u32, c: u32, td: u32,
             th: u32) {
    for (var q = 0u; q < KB / 4u; q++) {
        for (var r = 0u; r < 4u; r++) {
            let k = k0 + 4u * q + r;
            if k >= params.c_out { continue; }
            let w_row = ((((chunk * params.c_out + k) * params.c_in + c) * params.kernel.x + td) * 3u
                + th) * KW;
            for (var tw = 0u; tw < KW; tw++) {
                out[w_row + tw] = (*acc)[tw * KB / 4u + q][r];
            }
        }
    }
}

// One output row's multiply-adds for channels k0 + 4q .. + 3 at the block's W positions (WB = 4):
// one dy vec4 per channel, each value for the 3 x KW taps.
fn rows_part(acc0: ptr<function, array<vec4<f32>, ROW_ACC>>,
             acc1: ptr<function, array<vec4<f32>, ROW_ACC>>,
             acc2: ptr<function, array<vec4<f32>, ROW_ACC>>,
             seg0: ptr<function, array<vec4<f32>, MAX_SEGMENT>>,
             seg1: ptr<function, array<vec4<f32>, MAX_SEGMENT>>,
             seg2: ptr<function, array<vec4<f32>, MAX_SEGMENT>>,
             dy_row: u32, ow0: u32, k0: u32, q: u32) {
    let o = params.output.xyz;
    let plane = o.x * o.y * o.z;
    let dy = dy_columns(dy_row + 4u * q * plane + ow0, plane, k0 + 4u * q, ow0 < o.z);
    for (var jj = 0u; jj < 4u; jj++) {
        let d = dy[jj];
        accumulate_tap(acc0, seg0, d, jj, q);
        accumulate_tap(acc1, seg1, d, jj, q);
        accumulate_tap(acc2, seg2, d, jj, q);
    }
}

// a4 = x, b4 = dy, out = partial sums [chunks, K, C, kd, 3, kw]. Grid: x over the (c, td) in
// groups of WG, y over the chunks of rows_per_chunk units (n, od, W block), z over the blocks of
// KB output channels; every invocation of a workgroup reads the same dy.
@compute @workgroup_size(WG)
fn conv3d_grad_weight_rows(@builtin(workgroup_id) group: vec3<u32>,
                           @builtin(local_invocation_index) lane: u32) {
    let kz = params.kernel.xyz;
    let o = params.output.xyz;
    let sz = params.input.xyz;
    // Past the last (c, td), an invocation repeats it and does not store (dy loads stay uniform).
    let combos = params.c_in * kz.x;
    let ct = min(group.x * WG + lane, combos - 1u);
    let td = ct % kz.x;
    let c = ct / kz.x;
    let k0 = group.z * KB;
    let blocks = (o.z + WB - 1u) / WB;
    let units = params.batch * o.x * blocks;
    let first = group.y * params.rows_per_chunk;
    let ph = i32(params.padding.y);

    var acc0: array<vec4<f32>, ROW_ACC>;   // acc_th[tw * KB / 4 + q]: dw[k0 + 4q.., c, td, th, tw]
    var acc1: array<vec4<f32>, ROW_ACC>;
    var acc2: array<vec4<f32>, ROW_ACC>;
    for (var u = first; u < min(first + params.rows_per_chunk, units); u++) {
        let ow0 = (u % blocks) * WB;
        let od = (u / blocks) % o.x;
        let n = u / (blocks * o.x);
        let id = input_at(0u, od, td);
        let depth_row = ((n * params.c_in + c) * sz.x + u32(max(id, 0))) * sz.y * sz.z;
        var seg0 = segment_at(depth_row, -ph, ow0, id >= 0);
        var seg1 = segment_at(depth_row, 1 - ph, ow0, id >= 0);
        for (var oh = 0u; oh < o.y; oh++) {
            var seg2 = segment_at(depth_row, i32(oh) + 2 - ph, ow0, id >= 0);
            let dy_row = (((n * params.c_out + k0) * o.x + od) * o.y + oh) * o.z;
            // KB is 4 or 8 here (the host's ROWS).
            rows_part(&acc0, &acc1, &acc2, &seg0, &seg1, &seg2, dy_row, ow0, k0, 0u);
            if KB > 4u { rows_part(&acc0, &acc1, &acc2, &seg0, &seg1, &seg2, dy_row, ow0, k0, 1u); }
            seg0 = seg1;
            seg1 = seg2;
        }
    }
    if group.x * WG + lane >= combos { return; }
    store_tap(&acc0, group.y, k0, c, td, 0u);
    store_tap(&acc1, group.y, k0, c, td, 1u);
    store_tap(&acc2, group.y, k0, c, td, 2u);
}

// Floor division by a positive divisor (WGSL's / truncates toward zero).
fn floor_div(a: i32, b: i32) -> i32 {
    return select(a / b, (a - b + 1) / b, a < 0);
}

// The first dy element, relative to i0 / SW and rounded down to a whole vec4, that the W-block
// starting at input column i0 reads: the block's taps reach down to (PW - (KW - 1) DW) / SW.
fn dy_first() -> i32 {
    return floor_div(floor_div(i32(PW) - i32((KW - 1u) * DW), i32(SW)), 4) * 4;
}

// Grad-input at any stride, blocked (`conv3d_grad_input_blocked`): an invocation computes WB
// consecutive W positions i0.. of one input row (n, c0.., id, ih) for KB input channels. Along W,
// tap tw carries input column i0 + j to output column (i0 + j + PW - tw DW) / SW when that divides:
// with i0 a multiple of 4 SW, whether it does and where that output sits in the dy segment are
// constants of (j, tw), so the unrolled loops index registers only. Along D and H the aligned taps
// are found at run time as in the direct kernel. a4 = dy, b4 = the weight arranged [K, taps, C]
// (FLIP without REVERSE), out4 = dx.
@compute @workgroup_size(WG)
fn conv3d_grad_input_blocked(@builtin(workgroup_id) group: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>,
                             @builtin(local_invocation_index) lane: u32) {
    let o = params.output.xyz;
    let sz = params.input.xyz;
    let kz = params.kernel.xyz;
    let blocks = (sz.z + WB - 1u) / WB;
    let s = (group.y * groups.x + group.x) * WG + lane;
    if s >= params.batch * sz.x * sz.y * blocks { return; }
    let i0 = (s % blocks) * WB;
    let ih = (s / blocks) % sz.y;
    let id = (s / (blocks * sz.y)) % sz.x;
    let n = s / (blocks * sz.y * sz.x);
    let c0 = group.z * KB;
    let cp = params.channels_padded;
    // dy vec4s the block reads: output columns i0 / SW + dy_first() .. i0 / SW + last.
    let last = floor_div(i32(WB - 1u + PW), i32(SW));
    let vecs = u32(last - dy_first()) / 4u + 1u;
    let first_col = i32(i0 / SW) + dy_first();

    var acc: array<vec4<f32>, MAX_ACC>;   // acc[j * KB / 4 + q]: channels c0 + 4q.. at i0 + j
    for (var k = 0u; k < params.c_out; k++) {
        for (var td = 0u; td < kz.x; td++) {
            if !tap_aligned(0u, id, td) { continue; }
            let od = output_at(0u, id, td);
            if od < 0 { continue; }
            for (var th = 0u; th < kz.y; th++) {
                if !tap_aligned(1u, ih, th) { continue; }
                let oh = output_at(1u, ih, th);
                if oh < 0 { continue; }
                let row = (((n * params.c_out + k) * o.x + u32(od)) * o.y + u32(oh)) * o.z;
                var seg: array<vec4<f32>, MAX_SEGMENT>;
                for (var v = 0u; v < vecs; v++) {
                    let col = first_col + 4 * i32(v);
                    if col >= 0 && col < i32(o.z) { seg[v] = a4[(row + u32(col)) / 4u]; }
                }
                let w_tap = (((k * kz.x + td) * kz.y + th) * KW * cp + c0) / 4u;
                for (var tw = 0u; tw < KW; tw++) {
                    var wv: array<vec4<f32>, 4>;
                    for (var q = 0u; q < KB / 4u; q++) { wv[q] = b4[w_tap + tw * cp / 4u + q]; }
                    for (var j = 0u; j < WB; j++) {
                        let qq = i32(j + PW) - i32(tw * DW);
                        if floor_div(qq, i32(SW)) * i32(SW) != qq { continue; }
                        let e = u32(floor_div(qq, i32(SW)) - dy_first());
                        let dv = seg[e / 4u][e % 4u];
                        for (var q = 0u; q < KB / 4u; q++) {
                            acc[j * KB / 4u + q] = fma(vec4<f32>(dv), wv[q], acc[j * KB / 4u + q]);
                        }
                    }
                }
            }
        }
    }
    for (var q = 0u; q < KB / 4u; q++) {
        for (var r = 0u; r < 4u; r++) {
            let c = c0 + 4u * q + r;
            if c >= params.c_in { continue; }
            let plane = ((n * params.c_in + c) * sz.x + id) * sz.y + ih;
            for (var v = 0u; v < WB / 4u; v++) {
                let iw = i0 + 4u * v;
                if iw >= sz.z { continue; }
                let j = 4u * v;
                let x = vec4<f32>(acc[j * KB / 4u + q][r], acc[(j + 1u) * KB / 4u + q][r],
                                  acc[(j + 2u) * KB / 4u + q][r], acc[(j + 3u) * KB / 4u + q][r]);
                out4[(plane * sz.z + iw) / 4u] = x + bias[c];
            }
        }
    }
}

// Grad-input where the kernel's windows tile the input in disjoint patches (`conv3d_grad_input_
// patches`): stride equal to the kernel along every axis, no padding, no dilation, and the input
// exactly D = Do kd, H = Ho kh, W = Wo KW (V-Net's k2 s2 down-sampling, whose grad-input is also
// the transposed up-sampling's forward). Input voxel i then receives one tap per axis, i mod k,
// from output i div k: dx[n, c, i] = bias[c] + sum over k of w[k, c, i mod k] dy[n, k, i div k], a
// small matrix product per voxel with nothing to test. An invocation takes WB output columns
// (WB / 4 vec4s of dy) of one output row (n, od, oh) and computes the WB x KW input columns they
// feed in input row (od kd + td, oh kh + th) for KB input channels, in WB x KW x KB / 4 vec4
// accumulators. The workgroup's z carries (channel block, td, th), so the weights its invocations
// read, arranged [K, kd, kh, KW, channels_padded] (FLIP without REVERSE), are the same for all of
// them: broadcast loads. Per output channel, WB / 4 vec4 loads of dy and KW x KB / 4 of weights
// feed WB x KW x KB multiply-adds (at k2 and WB = KB = 8: 2 + 4 loads per 128). The host picks
// WB = KB = 8 (measured best on lavapipe, ahead of 4 x 16 and 4 x 8). a4 = dy, b4 = the arranged
// weight, out4 = dx.
@compute @workgroup_size(WG)
fn conv3d_grad_input_patches(@builtin(workgroup_id) group: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>,
                             @builtin(local_invocation_index) lane: u32) {
    let o = params.output.xyz;
    let sz = params.input.xyz;
    let kz = params.kernel.xyz;
    let blocks = o.z / WB;
    let s = (group.y * groups.x + group.x) * WG + lane;
    if s >= params.batch * o.x * o.y * blocks { return; }
    let ow0 = (s % blocks) * WB;
    let oh = (s / blocks) % o.y;
    let od = (s / (blocks * o.y)) % o.x;
    let n = s / (blocks * o.y * o.x);
    let th = group.z % kz.y;
    let td = (group.z / kz.y) % kz.x;
    let c0 = group.z / (kz.y * kz.x) * KB;
    let cp = params.channels_padded;
    let plane = o.x * o.y * o.z;

    // acc[(j * KW + tw) * KB / 4 + q]: channels c0 + 4q .. + 3 at input column (ow0 + j) KW + tw.
    var acc: array<vec4<f32>, MAX_ACC>;
    var y_at = ((n * params.c_out * o.x + od) * o.y + oh) * o.z + ow0;
    var w_at = ((td * kz.y + th) * KW * cp + c0) / 4u;
    for (var k = 0u; k < params.c_out; k++) {
        var dv: array<vec4<f32>, 4>;
        for (var v = 0u; v < WB / 4u; v++) { dv[v] = a4[y_at / 4u + v]; }
        for (var tw = 0u; tw < KW; tw++) {
            var wv: array<vec4<f32>, 4>;
            for (var q = 0u; q < KB / 4u; q++) { wv[q] = b4[w_at + tw * cp / 4u + q]; }
            for (var j = 0u; j < WB; j++) {
                for (var q = 0u; q < KB / 4u; q++) {
                    let a = (j * KW + tw) * KB / 4u + q;
                    acc[a] = fma(vec4<f32>(dv[j / 4u][j % 4u]), wv[q], acc[a]);
                }
            }
        }
        y_at += plane;
        w_at += kz.x * kz.y * KW * cp / 4u;
    }
    // Input columns ow0 KW + m as vec4s (accumulator m = j KW + tw is input column m).
    let id = od * kz.x + td;
    let ih = oh * kz.y + th;
    for (var q = 0u; q < KB / 4u; q++) {
        for (var r = 0u; r < 4u; r++) {
            let c = c0 + 4u * q + r;
            if c >= params.c_in { continue; }
            let row = ((((n * params.c_in + c) * sz.x + id) * sz.y + ih) * sz.z + ow0 * KW) / 4u;
            for (var v = 0u; v < WB * KW / 4u; v++) {
                let m = 4u * v;
                let x = vec4<f32>(acc[m * KB / 4u + q][r], acc[(m + 1u) * KB / 4u + q][r],
                                  acc[(m + 2u) * KB / 4u + q][r], acc[(m + 3u) * KB / 4u + q][r]);
                out4[row + v] = x + bias[c];
            }
        }
    }
}
