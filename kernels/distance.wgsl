// Distance transforms of binary masks (nonzero = foreground): the exact Euclidean distance
// transform (EDT) of every volume, and the per-sample min / max reduction and normalisation that
// turn two EDTs into the signed distance map (SDF) of METHODS.md.
//
// EDT, separable (Felzenszwalb and Huttenlocher, "Distance transforms of sampled functions"): the
// squared EDT of a volume is three 1D transforms, one pass per axis, each the next one's input,
//   d(q) = min_p  w (q - p)^2 + f(p),   w = spacing^2 along that axis,
// i.e. the lower envelope of the parabolas rooted at the points p of the line. All passes write
// squared distances; the last takes the square root.
//   edt_first_axis  along W, from the mask: f is 0 on background and +infinity elsewhere, so the
//                   envelope is just the nearest background point of the line, found by a forward
//                   and a backward sweep (no envelope arrays, any line length).
//   edt_axis        along H, then D (SQRT on the last), in place: the FH lower envelope.
// Layout: volumes [B, D, H, W] row-major. A line along an axis has `len` points `inner` elements
// apart (inner = product of the axes after it); line i starts at (i / inner) len inner + i % inner.
// One invocation per line, consecutive invocations on consecutive i: along H and D they read
// neighbouring addresses (coalesced); along W they are W apart, each walking its own row, which is
// why the cheap sweep pass is the one along W.
// The FH envelope (roots v, their values f(v), and the starts z) lives in per-invocation arrays of
// MAX_LINE entries. WGSL sizes function-scope arrays only with constants (override-sized arrays
// may only be workgroup variables), so MAX_LINE is a const; the host mirrors it and refuses longer
// lines along H or D with an error. 512 covers training patches and cropped volumes; 1024 made
// lavapipe's first compile of this pass take minutes (its JIT keeps the arrays in memory and the
// compile time grows faster than their size: 169 s for the test file's pipelines at 1024, 34 s at
// 512, cold shader cache). An invocation reads its whole line into the envelope before
// writing any of it, so the pass can work in place.
// +infinity ("no background on this line yet", and the EDT of a volume without background) comes
// from the uniform: WGSL has no infinity literal.
//
// SDF, per sample b of [N, 1, D, H, W] (posdis = EDT of the mask, negdis = EDT of its complement):
//   sdf_extrema          per workgroup: min and max of posdis and negdis over a strided chunk of
//                        the sample (grid x = chunk, y = sample), tree-reduced in workgroup memory:
//                        partials [N, groups] of vec4 (min pos, max pos, min neg, max neg).
//   sdf_extrema_combine  one invocation per sample: the partials to [N] vec4.
//   sdf_normalise        one invocation per voxel: (neg - min) / (max - min) - (pos - min) /
//                        (max - min), 0 on the inner boundary (foreground with a background face
//                        neighbour inside the volume); 0 for an empty sample (negdis is +infinity
//                        everywhere), -1 for a sample without background (posdis is).
// Workgroup: WG invocations (override, default 64 for the line passes, whose envelope arrays are
// large; a power of two for the tree reduction), 2D grids linearised as in elementwise.wgsl.

override WG: u32 = 64u;
// edt_first_axis: the zero voxels of the mask are the foreground (the EDT of the complement).
override INVERT: bool = false;
// edt_axis: write distances (the last pass) instead of squared distances.
override SQRT: bool = false;
// Points of the longest line edt_axis handles (src/gpu/distance.rs mirrors it).
const MAX_LINE: u32 = 512u;

struct Params {
    lines: u32,     // line passes: lines; sdf_normalise: elements; sdf_extrema_combine: samples
    len: u32,       // points per line
    inner: u32,     // elements between a line's consecutive points
    weight: f32,    // spacing^2 along the line's axis
    infinity: f32,  // +infinity
    voxels: u32,    // sdf: voxels per sample (D H W)
    groups: u32,    // sdf: workgroups (chunks) per sample of sdf_extrema
    d: u32,
    h: u32,
    w: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> mask: array<f32>;
@group(0) @binding(2) var<storage, read> posdis: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> negdis: array<f32>;
// Per-sample (or per-chunk partial) min pos, max pos, min neg, max neg.
@group(0) @binding(5) var<storage, read> extrema: array<vec4<f32>>;

fn invocation(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG + lane;
}

fn line_start(line: u32) -> u32 {
    return (line / params.inner) * params.len * params.inner + line % params.inner;
}

// Whether v is 0 or -0. Nonzero is foreground, NaN included (numpy's truth value of NaN, and the
// Cpu64 reference's): read from the bits, since a compiler may assume floats are never NaN.
fn is_zero(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) == 0u;
}

fn is_background(at: u32) -> bool {
    return !is_zero(mask[at]) == INVERT;
}

// Squared distance along the line to its nearest background point, +infinity if it has none.
@compute @workgroup_size(WG)
fn edt_first_axis(@builtin(workgroup_id) group: vec3<u32>,
                  @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let line = invocation(group, groups, lane);
    if line >= params.lines { return; }
    let base = line_start(line);
    // Forward: the gap to the nearest background point at or before q (-1: none), kept in out.
    var last = -1;
    for (var q = 0; q < i32(params.len); q++) {
        let at = base + u32(q) * params.inner;
        if is_background(at) { last = q; }
        out[at] = select(-1.0, f32(q - last), last >= 0);
    }
    // Backward: the nearer of that and the nearest background point at or after q.
    var next = -1;
    for (var q = i32(params.len) - 1; q >= 0; q--) {
        let at = base + u32(q) * params.inner;
        if is_background(at) { next = q; }
        var gap = out[at];
        if next >= 0 && (gap < 0.0 || f32(next - q) < gap) {
            gap = f32(next - q);
        }
        out[at] = select(params.infinity, params.weight * gap * gap, gap >= 0.0);
    }
}

// Where the parabolas w (x - p)^2 + fp and w (x - q)^2 + fq (p < q) cross, without the large
// squares p^2, q^2 that would cancel in f32.
fn intersection(p: i32, fp: f32, q: i32, fq: f32) -> f32 {
    return (fq - fp) / (2.0 * params.weight * f32(q - p)) + 0.5 * f32(q + p);
}

// The 1D squared transform of one line in place: d(q) = min_p w (q - p)^2 + f(p).
@compute @workgroup_size(WG)
fn edt_axis(@builtin(workgroup_id) group: vec3<u32>,
            @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let line = invocation(group, groups, lane);
    if line >= params.lines { return; }
    let base = line_start(line);
    var v: array<i32, MAX_LINE>;   // roots of the envelope's parabolas, left to right
    var fv: array<f32, MAX_LINE>;  // f at those roots
    var z: array<f32, MAX_LINE>;   // z[k]: where parabola k becomes the lowest (z[0] unused)
    var k = -1;                    // the last parabola of the envelope
    for (var q = 0; q < i32(params.len); q++) {
        let fq = out[base + u32(q) * params.inner];
        if !(fq < params.infinity) { continue; }
        // Drop the parabolas that q's hides from their start on; the first is never hidden.
        var s = 0.0;
        loop {
            if k < 0 { break; }
            s = intersection(v[k], fv[k], q, fq);
            if k == 0 || s > z[k] { break; }
            k--;
        }
        k++;
        v[k] = q;
        fv[k] = fq;
        z[k] = s;
    }
    if k < 0 { return; }  // no finite point: the line stays +infinity
    var j = 0;
    for (var q = 0; q < i32(params.len); q++) {
        while j < k && z[j + 1] < f32(q) { j++; }
        let dq = f32(q - v[j]);
        var d = params.weight * dq * dq + fv[j];
        if SQRT { d = sqrt(d); }
        out[base + u32(q) * params.inner] = d;
    }
}

fn combine(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(min(a.x, b.x), max(a.y, b.y), min(a.z, b.z), max(a.w, b.w));
}

var<workgroup> partial: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn sdf_extrema(@builtin(workgroup_id) group: vec3<u32>,
               @builtin(local_invocation_index) lane: u32) {
    let inf = params.infinity;
    var m = vec4<f32>(inf, -inf, inf, -inf);
    let sample = group.y * params.voxels;
    for (var v = group.x * WG + lane; v < params.voxels; v += params.groups * WG) {
        let pos = posdis[sample + v];
        let neg = negdis[sample + v];
        m = combine(m, vec4<f32>(pos, pos, neg, neg));
    }
    partial[lane] = m;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lane < half {
            partial[lane] = combine(partial[lane], partial[lane + half]);
        }
        workgroupBarrier();
    }
    if lane == 0u {
        let at = 4u * (group.y * params.groups + group.x);
        for (var c = 0u; c < 4u; c++) {
            out[at + c] = partial[0][c];
        }
    }
}

@compute @workgroup_size(WG)
fn sdf_extrema_combine(@builtin(global_invocation_id) id: vec3<u32>) {
    let b = id.x;
    if b >= params.lines { return; }
    var m = extrema[b * params.groups];
    for (var g = 1u; g < params.groups; g++) {
        m = combine(m, extrema[b * params.groups + g]);
    }
    for (var c = 0u; c < 4u; c++) {
        out[4u * b + c] = m[c];
    }
}

// Foreground voxel i (at v = (d, h, w) of its sample) with a background face neighbour inside.
fn on_inner_boundary(i: u32, v: u32) -> bool {
    if is_zero(mask[i]) { return false; }
    let hw = params.h * params.w;
    let w = v % params.w;
    let h = (v / params.w) % params.h;
    let d = v / hw;
    return (w > 0u && is_zero(mask[i - 1u])) || (w + 1u < params.w && is_zero(mask[i + 1u]))
        || (h > 0u && is_zero(mask[i - params.w])) || (h + 1u < params.h && is_zero(mask[i + params.w]))
        || (d > 0u && is_zero(mask[i - hw])) || (d + 1u < params.d && is_zero(mask[i + hw]));
}

@compute @workgroup_size(WG)
fn sdf_normalise(@builtin(workgroup_id) group: vec3<u32>,
                 @builtin(num_workgroups) groups: vec3<u32>,
                 @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= params.lines { return; }
    let e = extrema[i / params.voxels];
    if !(e.z < params.infinity) {
        out[i] = 0.0;   // empty mask
    } else if !(e.x < params.infinity) {
        out[i] = -1.0;  // no background
    } else if on_inner_boundary(i, i % params.voxels) {
        out[i] = 0.0;
    } else {
        out[i] = (negdis[i] - e.z) / (e.w - e.z) - (posdis[i] - e.x) / (e.y - e.x);
    }
}
