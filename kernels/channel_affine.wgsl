// A per-channel affine map of an NCDHW tensor: out[n, c, s] = x[n, c, s] * a[k] + b[k], where k is
// c when a and b hold one value per channel ([1, C, 1, 1, 1]) and n C + c when they hold one per
// sample and channel ([N, C, 1, 1, 1]). Normalisation (batch and instance norm: a = gamma / std,
// b = beta - mean a) and channel dropout (a = mask / (1 - p), b = 0) are this one pass.
//
// Layout: s runs over the D H W elements of a channel (`volume` of them), contiguous; x and out
// are read and written as whole vec4s (buffers are padded to vec4s). When the volume is a multiple
// of 4 (ALIGNED override) a vec4 lies inside one channel: one a and one b per vec4; otherwise each
// lane finds its own channel. Workgroup: WG invocations (override, default 256), one vec4 each, in
// a 2D grid linearised as in elementwise.wgsl; neighbouring invocations touch neighbouring vec4s.

override WG: u32 = 256u;
override ALIGNED: bool = true;

struct Params {
    n: u32,       // elements of x
    volume: u32,  // spatial elements per channel
    groups: u32,  // entries of a and b (C, or N C)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

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
        out[i] = v * a[k] + b[k];
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
    out[i] = v * scale + shift;
}
