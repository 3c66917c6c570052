// A window over the channel axis of an NCDHW tensor: out[n, c, s] = x[n, c + start, s] where
// 0 <= c + start < C_in, else 0. With start >= 0 it is a slice of channels; with start < 0 it pads
// zero channels in front (and behind, when C_out is larger), the adjoint of the slice. Concatenation
// is a sum of such paddings, so this one entry serves slice, concat and both their backwards.
//
// Layout: s runs over the D H W spatial elements of a channel (`volume` of them), contiguous.
// One invocation per output element (a channel's volume need not be a multiple of 4, so vec4
// access would straddle channels); consecutive invocations read and write consecutive addresses.
// Workgroup: WG invocations (override, default 256) in a 2D grid linearised as in elementwise.wgsl.

override WG: u32 = 256u;

struct Params {
    n: u32,             // output elements
    volume: u32,        // spatial elements per channel
    channels_in: u32,
    channels_out: u32,
    start: i32,         // input channel of output channel 0
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn channel_window(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= params.n { return; }
    let s = i % params.volume;
    let c = (i / params.volume) % params.channels_out;
    let b = i / (params.volume * params.channels_out);
    let src = i32(c) + params.start;
    var value = 0.0;
    if src >= 0 && src < i32(params.channels_in) {
        value = x[(b * params.channels_in + u32(src)) * params.volume + s];
    }
    out[i] = value;
}
