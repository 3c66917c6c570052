// Pooling and up-sampling over the three spatial axes of NCDHW tensors, forward and adjoint.
//
// `src` is the input of the forward op (what is pooled or up-sampled), `dst` its output. Forward
// entries write dst from src; the backward entries write src-shaped gradients from dst-shaped ones.
// The general entries are gathers: one invocation per element they write, which reads the few
// elements that element depends on, so no atomics are needed and overlapping windows just add up:
//   max_pool3d            dst[o] = src[argmax o]  (first maximum in d, h, w order, as PyTorch)
//   max_pool3d_gather     dst[o] = v[argmax o], argmax over x's window o
//   max_pool3d_scatter    src[i] = sum of g[o] over the windows o holding i whose argmax is i
//   avg_pool3d            dst[o] = mean of src over window o
//   avg_pool3d_backward   src[i] = sum of g[o] / |window| over the windows o holding i
//   upsample_nearest(_backward), upsample_trilinear(_backward): out[o] = sum_i weight(o, i) x[i]
//     and its transpose; trilinear weights as PyTorch with align_corners = false, computed in exact
//     integer arithmetic: the source coordinate times 2s is t = 2o + 1 - s, clamped at 0. The
//     sums skip the terms of weight 0, as the Cpu64 reference does, so a NaN or infinity reaches
//     exactly the elements that weigh it (0 * NaN would spread it to their neighbours).
// Where each written element has exactly one source (windows that tile the input: the *_tiled
// backward entries; nearest up-sampling), one invocation per source writes its whole block
// instead: one load (and one argmax) per block rather than per element. On lavapipe this took the
// k2 s2 max-pool backward at 2 x 16 x 64^3 from 1.2 s to 0.08 s.
//
// Layout: element (v, d, h, w) with v = n C + c is at ((v D + d) H + h) W + w; consecutive
// invocations take consecutive w, so neighbouring invocations read neighbouring addresses.
// Workgroup: WG invocations (override, default 256) in a 2D grid of workgroups linearised as in
// elementwise.wgsl. These kernels are memory bound (a few loads per element), so no register
// blocking beyond the block writes above.

override WG: u32 = 256u;

struct Params {
    n: u32,        // elements this entry writes
    volumes: u32,  // N * C
    src_d: u32, src_h: u32, src_w: u32,
    dst_d: u32, dst_h: u32, dst_w: u32,
    k_d: u32, k_h: u32, k_w: u32,  // pooling kernel (unused by up-sampling)
    s_d: u32, s_h: u32, s_w: u32,  // pooling stride, or up-sampling scale
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn src_size() -> vec3<u32> { return vec3<u32>(params.src_d, params.src_h, params.src_w); }
fn dst_size() -> vec3<u32> { return vec3<u32>(params.dst_d, params.dst_h, params.dst_w); }
fn kernel_size() -> vec3<u32> { return vec3<u32>(params.k_d, params.k_h, params.k_w); }
fn stride() -> vec3<u32> { return vec3<u32>(params.s_d, params.s_h, params.s_w); }

fn invocation(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG + lane;
}

// Flat index i of a tensor of spatial `size` as (volume, [d, h, w]).
fn split(i: u32, size: vec3<u32>) -> vec4<u32> {
    let w = i % size.z;
    let h = (i / size.z) % size.y;
    let d = (i / (size.z * size.y)) % size.x;
    return vec4<u32>(i / (size.x * size.y * size.z), d, h, w);
}

fn flat(volume: u32, p: vec3<u32>, size: vec3<u32>) -> u32 {
    return ((volume * size.x + p.x) * size.y + p.y) * size.z + p.z;
}

// Whether v is NaN, read from its bits (a compiler may assume floats are never NaN).
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// The flat src index of the first maximum of x over window o of `volume`; a NaN is the maximum
// (the first NaN, if several), as in numpy and PyTorch.
fn argmax(volume: u32, o: vec3<u32>) -> u32 {
    let start = o * stride();
    let k = kernel_size();
    var best = flat(volume, start, src_size());
    var best_value = x[best];
    for (var d = 0u; d < k.x; d++) {
        for (var h = 0u; h < k.y; h++) {
            for (var w = 0u; w < k.z; w++) {
                let i = flat(volume, start + vec3<u32>(d, h, w), src_size());
                let value = x[i];
                if value > best_value || (is_nan(value) && !is_nan(best_value)) {
                    best = i;
                    best_value = value;
                }
            }
        }
    }
    return best;
}

// The range of windows holding position i along each axis, as [first, last + 1).
fn windows_holding(i: vec3<u32>) -> array<vec3<u32>, 2> {
    let k = kernel_size();
    let s = stride();
    // first = ceil((i + 1 - k) / s) when i + 1 >= k, else 0; last = min(i / s, dst - 1).
    let first = select(vec3<u32>(0u), (i + 1u - k + s - 1u) / s, i + 1u >= k);
    let end = min(i / s + 1u, dst_size());
    return array<vec3<u32>, 2>(first, end);
}

@compute @workgroup_size(WG)
fn max_pool3d(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
              @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    out[o] = x[argmax(p.x, p.yzw)];
}

@compute @workgroup_size(WG)
fn max_pool3d_gather(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                     @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    out[o] = v[argmax(p.x, p.yzw)];
}

@compute @workgroup_size(WG)
fn avg_pool3d(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
              @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    let start = p.yzw * stride();
    let k = kernel_size();
    var sum = 0.0;
    for (var d = 0u; d < k.x; d++) {
        for (var h = 0u; h < k.y; h++) {
            for (var w = 0u; w < k.z; w++) {
                sum += x[flat(p.x, start + vec3<u32>(d, h, w), src_size())];
            }
        }
    }
    out[o] = sum / f32(k.x * k.y * k.z);
}

// Nearest: dst[o] = src[o / s]. One invocation per src element writes its s_d s_h s_w block: one
// load instead of one per output.
@compute @workgroup_size(WG)
fn upsample_nearest(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.n { return; }
    write_block(split(i, src_size()), x[i]);
}

// Writes `value` to the stride-sized block of dst at block position p (volume, d, h, w).
fn write_block(p: vec4<u32>, value: f32) {
    let s = stride();
    for (var d = 0u; d < s.x; d++) {
        for (var h = 0u; h < s.y; h++) {
            for (var w = 0u; w < s.z; w++) {
                out[flat(p.x, p.yzw * s + vec3<u32>(d, h, w), dst_size())] = value;
            }
        }
    }
}

// Along one axis of scale s and `size` source positions: the two source indices of output o and
// the weight of the upper one.
struct Lerp {
    lower: u32,
    upper: u32,
    lambda: f32,
}

fn lerp(o: u32, s: u32, size: u32) -> Lerp {
    let t = select(0u, 2u * o + 1u - s, 2u * o + 1u >= s);
    let lower = t / (2u * s);
    let lambda = f32(t - 2u * s * lower) / f32(2u * s);
    return Lerp(lower, min(lower + 1u, size - 1u), lambda);
}

// The weight of source index i in output o along one axis (0 unless i is one of its neighbours).
fn axis_weight(o: u32, i: u32, s: u32, size: u32) -> f32 {
    let l = lerp(o, s, size);
    return select(0.0, 1.0 - l.lambda, i == l.lower) + select(0.0, l.lambda, i == l.upper);
}

@compute @workgroup_size(WG)
fn upsample_trilinear(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                      @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    let src = src_size();
    let ld = lerp(p.y, params.s_d, src.x);
    let lh = lerp(p.z, params.s_h, src.y);
    let lw = lerp(p.w, params.s_w, src.z);
    let ds = array<u32, 2>(ld.lower, ld.upper);
    let hs = array<u32, 2>(lh.lower, lh.upper);
    let ws = array<u32, 2>(lw.lower, lw.upper);
    let wd = array<f32, 2>(1.0 - ld.lambda, ld.lambda);
    let wh = array<f32, 2>(1.0 - lh.lambda, lh.lambda);
    let ww = array<f32, 2>(1.0 - lw.lambda, lw.lambda);
    var sum = 0.0;
    for (var a = 0u; a < 2u; a++) {
        for (var b = 0u; b < 2u; b++) {
            let row = flat(p.x, vec3<u32>(ds[a], hs[b], 0u), src);
            for (var c = 0u; c < 2u; c++) {
                let weight = wd[a] * wh[b] * ww[c];
                sum += select(0.0, weight * x[row + ws[c]], weight != 0.0);
            }
        }
    }
    out[o] = sum;
}

// Backward entries: one invocation per src element; x holds the dst-shaped gradient, except in
// max_pool3d_scatter where x is the pooled input and v the gradient.

@compute @workgroup_size(WG)
fn max_pool3d_scatter(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                      @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.n { return; }
    let p = split(i, src_size());
    let range = windows_holding(p.yzw);
    var sum = 0.0;
    for (var d = range[0].x; d < range[1].x; d++) {
        for (var h = range[0].y; h < range[1].y; h++) {
            for (var w = range[0].z; w < range[1].z; w++) {
                let o = vec3<u32>(d, h, w);
                if argmax(p.x, o) == i {
                    sum += v[flat(p.x, o, dst_size())];
                }
            }
        }
    }
    out[i] = sum;
}

// The tiled variants: when the windows tile src exactly (kernel = stride, src = dst stride), each
// src element lies in one window, so one invocation per window writes the window's elements: one
// argmax per window instead of one per element.
@compute @workgroup_size(WG)
fn max_pool3d_scatter_tiled(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                            @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    let best = argmax(p.x, p.yzw);
    let value = v[o];
    let k = kernel_size();
    for (var d = 0u; d < k.x; d++) {
        for (var h = 0u; h < k.y; h++) {
            for (var w = 0u; w < k.z; w++) {
                let i = flat(p.x, p.yzw * k + vec3<u32>(d, h, w), src_size());
                out[i] = select(0.0, value, i == best);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn avg_pool3d_backward_tiled(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                             @builtin(local_invocation_index) lane: u32) {
    let o = invocation(group, groups, lane);
    if o >= params.n { return; }
    let p = split(o, dst_size());
    let k = kernel_size();
    let value = x[o] / f32(k.x * k.y * k.z);
    for (var d = 0u; d < k.x; d++) {
        for (var h = 0u; h < k.y; h++) {
            for (var w = 0u; w < k.z; w++) {
                out[flat(p.x, p.yzw * k + vec3<u32>(d, h, w), src_size())] = value;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn avg_pool3d_backward(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                       @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.n { return; }
    let p = split(i, src_size());
    let range = windows_holding(p.yzw);
    var sum = 0.0;
    for (var d = range[0].x; d < range[1].x; d++) {
        for (var h = range[0].y; h < range[1].y; h++) {
            for (var w = range[0].z; w < range[1].z; w++) {
                sum += x[flat(p.x, vec3<u32>(d, h, w), dst_size())];
            }
        }
    }
    out[i] = sum / f32(params.k_d * params.k_h * params.k_w);
}

// The s_d s_h s_w block of outputs that copied src[i].
@compute @workgroup_size(WG)
fn upsample_nearest_backward(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                             @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.n { return; }
    let p = split(i, src_size());
    let s = stride();
    let start = p.yzw * s;
    var sum = 0.0;
    for (var d = 0u; d < s.x; d++) {
        for (var h = 0u; h < s.y; h++) {
            for (var w = 0u; w < s.z; w++) {
                sum += x[flat(p.x, start + vec3<u32>(d, h, w), dst_size())];
            }
        }
    }
    out[i] = sum;
}

// The outputs that may read src index i along an axis: those whose lower neighbour is i - 1 or i,
// 2 lower(o) s <= 2o + 1 - s < 2 (lower(o) + 1) s, so o in [ceil((2s(i-1) + s - 1) / 2),
// ceil((2s(i+1) + s - 1) / 2)): 2s outputs. (Outputs below the first clamp to lower 0 with weight 0
// on index 1; the last index also takes the clamped upper neighbours, all below `size`.)
fn readers(i: u32, s: u32, size: u32) -> vec2<u32> {
    let first = select(0u, (2u * s * (i - 1u) + s) / 2u, i >= 1u);
    return vec2<u32>(first, min((2u * s * (i + 1u) + s) / 2u, size));
}

@compute @workgroup_size(WG)
fn upsample_trilinear_backward(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                               @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.n { return; }
    let p = split(i, src_size());
    let src = src_size();
    let dst = dst_size();
    let rd = readers(p.y, params.s_d, dst.x);
    let rh = readers(p.z, params.s_h, dst.y);
    let rw = readers(p.w, params.s_w, dst.z);
    var sum = 0.0;
    for (var d = rd.x; d < rd.y; d++) {
        let wd = axis_weight(d, p.y, params.s_d, src.x);
        if wd == 0.0 { continue; }
        for (var h = rh.x; h < rh.y; h++) {
            let wdh = wd * axis_weight(h, p.z, params.s_h, src.y);
            if wdh == 0.0 { continue; }
            for (var w = rw.x; w < rw.y; w++) {
                let weight = wdh * axis_weight(w, p.w, params.s_w, src.z);
                sum += select(0.0, weight * x[flat(p.x, vec3<u32>(d, h, w), dst)], weight != 0.0);
            }
        }
    }
    out[i] = sum;
}
