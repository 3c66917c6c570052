// Affine warps of NCDHW volumes (zoom, flip, rotation, scaling) and their adjoints.
//
//   warp          out[v, o] = sum_i weight(p(o), i) x[v, i],  p(o) = M (o, 1)  (a 3x4 matrix)
//   warp_adjoint  out[v, i] = sum_o weight(p(o), i) g[v, o]   (the transpose)
//
// o indexes the output grid (dst), i the input grid (src), v = n C + c the volume. Trilinear
// weight(p, i) = prod_k max(0, 1 - |p_k - i_k|) (the input extended by zeros, so voxels outside
// it read 0); nearest: 1 if i = round(p) (p snapped to 1/SNAP voxel first, so that points exactly
// half-way round as the f64 reference does) else 0. NEAREST (override) picks the weight.
//
// Both entries are gathers, one invocation per element written, so no atomics are needed (WGSL
// has no float atomics). The adjoint gathers, for input voxel i, over the output voxels whose
// sample point can fall in i's support (i - 1, i + 1)^3: the image of that cube under the inverse
// map lies in the box centred on M^-1 (i, 1) with half-extents `reach` (row sums of |M^-1| plus a
// rounding margin), both computed on the host, and each row of that box is cut to the interval
// of steps whose point can be close enough (row_range). Each candidate's point is recomputed with
// the very arithmetic of the forward entry, so the adjoint is the forward's transpose in f32 too.
//
// Layout: element (v, d, h, w) at ((v D + d) H + h) W + w; consecutive invocations take consecutive
// w, so neighbours read neighbouring (for a small rotation, nearly consecutive) addresses.
// Workgroup: WG invocations (override, default 256) in a 2D grid of workgroups linearised as in
// elementwise.wgsl. Memory bound: 8 loads per trilinear output; the adjoint visits about
// 2 (2 reach + 1)^2 candidate outputs per input voxel (some 20-40 for the zooms and small
// rotations in use), recomputing each one's point and weight, so it costs several forwards.

override WG: u32 = 256u;
// 1: nearest, 0: trilinear.
override NEAREST: u32 = 0u;

const SNAP: f32 = 1024.0;

struct Params {
    rows: array<vec4<f32>, 3>,     // M: output index -> input point
    inverse: array<vec4<f32>, 3>,  // M^-1: input point -> output index (the adjoint's box)
    reach: vec4<f32>,              // half-extents of the adjoint's box (xyz)
    src: vec4<u32>,                // input D, H, W; N * C
    dst: vec4<u32>,                // output D, H, W; elements this entry writes
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

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

// The affine map of rows r applied to grid point o.
fn apply(r: array<vec4<f32>, 3>, o: vec3<f32>) -> vec3<f32> {
    let h = vec4<f32>(o, 1.0);
    return vec3<f32>(dot(r[0], h), dot(r[1], h), dot(r[2], h));
}

// The input point output voxel o samples.
fn sample_point(o: vec3<u32>) -> vec3<f32> {
    return apply(params.rows, vec3<f32>(o));
}

// round(p) after snapping p to 1/SNAP: floor((floor(p SNAP + 1/2) + SNAP/2) / SNAP), all exact.
fn nearest_index(p: vec3<f32>) -> vec3<i32> {
    return vec3<i32>(floor((floor(p * SNAP + 0.5) + SNAP / 2.0) / SNAP));
}

fn inside(i: vec3<i32>, size: vec3<u32>) -> bool {
    return all(i >= vec3<i32>(0)) && all(i < vec3<i32>(size));
}

@compute @workgroup_size(WG)
fn warp(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let k = invocation(group, groups, lane);
    if k >= params.dst.w { return; }
    let src = params.src.xyz;
    let o = split(k, params.dst.xyz);
    let p = sample_point(o.yzw);
    if NEAREST == 1u {
        let i = nearest_index(p);
        var value = 0.0;
        if inside(i, src) {
            value = x[flat(o.x, vec3<u32>(i), src)];
        }
        out[k] = value;
        return;
    }
    // The 2 x 2 x 2 neighbours, branch-free: a neighbour outside the input gets weight 0 and a
    // clamped (valid) address. Terms of weight 0 are skipped (term), as the Cpu64 reference skips
    // them, so a NaN or infinity reaches exactly the outputs that weigh it.
    let base = floor(p);
    let frac = p - base;
    let lo = vec3<i32>(base);
    let hi = lo + vec3<i32>(1);
    let last = vec3<i32>(src) - 1;
    let w_lo = select(vec3<f32>(0.0), 1.0 - frac, lo >= vec3<i32>(0) & lo <= last);
    let w_hi = select(vec3<f32>(0.0), frac, hi >= vec3<i32>(0) & hi <= last);
    let a = vec3<u32>(clamp(lo, vec3<i32>(0), last));
    let b = vec3<u32>(clamp(hi, vec3<i32>(0), last));
    let row_aa = flat(o.x, vec3<u32>(a.x, a.y, 0u), src);
    let row_ab = flat(o.x, vec3<u32>(a.x, b.y, 0u), src);
    let row_ba = flat(o.x, vec3<u32>(b.x, a.y, 0u), src);
    let row_bb = flat(o.x, vec3<u32>(b.x, b.y, 0u), src);
    let near = term(w_lo.y, term(w_lo.z, x[row_aa + a.z]) + term(w_hi.z, x[row_aa + b.z]))
             + term(w_hi.y, term(w_lo.z, x[row_ab + a.z]) + term(w_hi.z, x[row_ab + b.z]));
    let far = term(w_lo.y, term(w_lo.z, x[row_ba + a.z]) + term(w_hi.z, x[row_ba + b.z]))
            + term(w_hi.y, term(w_lo.z, x[row_bb + a.z]) + term(w_hi.z, x[row_bb + b.z]));
    out[k] = term(w_lo.x, near) + term(w_hi.x, far);
}

// weight * value, or 0 for weight 0 whatever the value.
fn term(weight: f32, value: f32) -> f32 {
    return select(0.0, weight * value, weight != 0.0);
}

// weight(p, i) of the header.
fn weight(p: vec3<f32>, i: vec3<u32>) -> f32 {
    if NEAREST == 1u {
        return select(0.0, 1.0, all(nearest_index(p) == vec3<i32>(i)));
    }
    let f = max(vec3<f32>(0.0), 1.0 - abs(p - vec3<f32>(i)));
    return f.x * f.y * f.z;
}

@compute @workgroup_size(WG)
fn warp_adjoint(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let k = invocation(group, groups, lane);
    if k >= params.dst.w { return; }
    let dst = params.dst.xyz;
    let i = split(k, params.src.xyz);
    let centre = apply(params.inverse, vec3<f32>(i.yzw));
    // The box of candidate output voxels, clipped to the output grid (empty if it misses it).
    let lo = vec3<i32>(max(ceil(centre - params.reach.xyz), vec3<f32>(0.0)));
    let hi = vec3<i32>(min(floor(centre + params.reach.xyz), vec3<f32>(dst) - 1.0));
    var sum = 0.0;
    for (var d = lo.x; d <= hi.x; d++) {
        for (var h = lo.y; h <= hi.y; h++) {
            let row = row_range(vec3<f32>(f32(d), f32(h), 0.0), vec3<f32>(i.yzw), lo.z, hi.z);
            for (var w = row.x; w <= row.y; w++) {
                let o = vec3<u32>(vec3<i32>(d, h, w));
                let f = weight(sample_point(o), i.yzw);
                if f != 0.0 {
                    sum += f * x[flat(i.x, o, dst)];
                }
            }
        }
    }
    out[k] = sum;
}

// Along an output row (d, h fixed) the sample point moves by column 2 of M per step in w, so the
// steps whose point lies within SLACK of input voxel i on every axis form one interval: the inner
// loop of the adjoint visits only it (about 2 of the box's 4 or 5 for a small rotation). SLACK is
// 1 plus a margin for the f32 rounding of the bounds; the weights decide.
const SLACK: f32 = 1.01;

fn row_range(row_start: vec3<f32>, i: vec3<f32>, first: i32, last: i32) -> vec2<i32> {
    let step = vec3<f32>(params.rows[0].z, params.rows[1].z, params.rows[2].z);
    let offset = i - apply(params.rows, row_start);
    var lo = f32(first);
    var hi = f32(last);
    for (var k = 0u; k < 3u; k++) {
        if step[k] != 0.0 {
            let a = (offset[k] - SLACK) / step[k];
            let b = (offset[k] + SLACK) / step[k];
            lo = max(lo, min(a, b));
            hi = min(hi, max(a, b));
        } else if abs(offset[k]) >= SLACK {
            return vec2<i32>(0, -1);
        }
    }
    return vec2<i32>(i32(ceil(lo)), i32(floor(hi)));
}
