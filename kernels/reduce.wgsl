// Sums over one run of contiguous axes. The host views the input as [outer, reduce, inner] and
// reduces the middle axis; several runs of axes are reduced one after another.
//
// sum_rows (inner == 1, the reduced elements are contiguous): one workgroup per (row, chunk);
//   WG invocations read the chunk with a stride of WG (neighbours read neighbouring addresses),
//   then a tree reduction in workgroup memory. Output [outer, chunks]. sum_rows4 is the same
//   over vec4s when the rows and chunks are whole vec4s.
// sum_columns (inner > 1): one invocation per (outer, chunk, inner) output, looping down the chunk;
//   neighbouring invocations read neighbouring addresses. Output [outer, chunks, inner].
// A long reduction is split into chunks so every core gets work; the host then sums the partial
// results with a second pass of the same kernels.
// Grid: 2D over workgroups (a dimension holds at most 65535), linearised as in elementwise.wgsl.

override WG: u32 = 256u;

struct Params {
    outer: u32,
    reduce: u32,
    inner: u32,
    chunk: u32,   // reduced elements per chunk
    chunks: u32,  // ceil(reduce / chunk)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;   // sum_rows4's view of x
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

// The workgroup's sum of every lane's `acc`, in lane 0 (a tree in workgroup memory).
fn workgroup_sum(lane: u32, acc: f32) -> f32 {
    partial[lane] = acc;
    workgroupBarrier();
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if lane < width {
            partial[lane] += partial[lane + width];
        }
        workgroupBarrier();
    }
    return partial[0];
}

@compute @workgroup_size(WG)
fn sum_rows(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let task = group.y * groups.x + group.x;   // uniform across the workgroup
    let valid = task < params.outer * params.chunks;
    var acc = 0.0;
    if valid {
        let row = task / params.chunks;
        let start = (task % params.chunks) * params.chunk;
        let end = min(start + params.chunk, params.reduce);
        let base = row * params.reduce;
        for (var r = start + lane; r < end; r += WG) {
            acc += x[base + r];
        }
    }
    let total = workgroup_sum(lane, acc);
    if valid && lane == 0u {
        out[task] = total;
    }
}

// sum_rows over whole vec4s (reduce and chunk multiples of 4): a quarter of the loads, which
// is what the software adapter pays for (each load costs about as much as a vec4 load). A chunk
// is ROW_CHUNK4 long, so the tree at the end is paid once per 64 vec4s of each invocation.
@compute @workgroup_size(WG)
fn sum_rows4(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(local_invocation_index) lane: u32) {
    let task = group.y * groups.x + group.x;
    let valid = task < params.outer * params.chunks;
    var acc = vec4<f32>();
    if valid {
        let row = task / params.chunks;
        let start = (task % params.chunks) * params.chunk;
        let end = min(start + params.chunk, params.reduce);
        let base = row * params.reduce;
        // Four vec4s per step into independent sums: the loop's own cost (its compare and
        // branch, as much as a load on lavapipe) is paid once per four loads.
        var acc1 = vec4<f32>();
        var acc2 = vec4<f32>();
        var acc3 = vec4<f32>();
        let last = (base + end) / 4u;
        var r = (base + start) / 4u + lane;
        for (; r + 3u * WG < last; r += 4u * WG) {
            acc += x4[r];
            acc1 += x4[r + WG];
            acc2 += x4[r + 2u * WG];
            acc3 += x4[r + 3u * WG];
        }
        for (; r < last; r += WG) {
            acc += x4[r];
        }
        acc = (acc + acc1) + (acc2 + acc3);
    }
    let total = workgroup_sum(lane, (acc.x + acc.y) + (acc.z + acc.w));
    if valid && lane == 0u {
        out[task] = total;
    }
}

@compute @workgroup_size(WG)
fn sum_columns(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
               @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= params.outer * params.chunks * params.inner { return; }
    let col = i % params.inner;
    let task = i / params.inner;
    let row = task / params.chunks;
    let start = (task % params.chunks) * params.chunk;
    let end = min(start + params.chunk, params.reduce);
    var acc = 0.0;
    for (var r = start; r < end; r++) {
        acc += x[(row * params.reduce + r) * params.inner + col];
    }
    out[i] = acc;
}
