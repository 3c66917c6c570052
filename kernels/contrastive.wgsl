// Dense InfoNCE: the log-sum-exp over every location of the batch of each location's similarities,
// and its backward, streamed so that the M x M similarity matrix is never stored (M = N S
// locations; at 2 x 16^3 the matrix alone would be 268 MB).
//
// Layout: the operands are [N, E, S] (E channels, S locations per image: contiguous NCDHW) and
// location m = n S + s. Channel e of location m lives at (n E + e) S + s, so for every channel,
// neighbouring locations are neighbouring addresses: invocations that own neighbouring locations
// load coalesced, with no transpose to [M, E] first. With s_ij = a_i . b_j * inv_tau, "own" rows
// i come from `rows_in` and streamed columns j from `cols_in`.
//
// Streaming: a workgroup owns WG * ROWS rows (ROWS per invocation, WG apart so loads stay
// coalesced), held in registers as E4 = ceil(E / 4) vec4s each, and walks the columns of its chunk
// TILE at a time. For each tile the workgroup stages TILE columns x E4 vec4s in workgroup memory
// (coalesced loads), then every invocation reads each staged column once (the same address in every
// invocation: a broadcast) and uses it for all ROWS of its rows: E4 reads feed ROWS E4 vec4 dot
// products. The columns are split into chunks (grid z), so that a small M still gives a large GPU
// enough workgroups; each chunk writes its own partial result.
//
// Forward (`infonce_logsumexp`): per row a running maximum mx and sum l of exp(s - mx). A column s
// costs one exponential, x = exp(-|s - mx|): it is exp(s - mx) when s <= mx (l += x), and the
// rescaling exp(mx - s) of the old sum when s is the new maximum (l = l x + 1). Each chunk writes
// mx + log l; `infonce_merge` combines the chunks' partial log-sum-exps per row.
//
// Backward (`infonce_weighted_sum`): out_i = inv_tau sum_j w exp(s_ij - shift) b_j in the same
// tiling, with ROWS x E4 vec4 accumulators in registers. d qn: rows = qn, columns = kn, shift =
// lse_i and w = g_i of the own row. d kn: rows = kn, columns = qn, shift = lse_j and w = g_j of
// the streamed column (SHIFT_STREAMED; staged with the tile). exp(s - lse) <= 1, so no running
// maximum is needed. Each chunk writes its own [N, E, S] partial sum; the host adds them.
//
// The host picks ROWS and TILE from E (ROWS * E4 <= MAX_REG vec4 registers; the tile within the
// adapter's workgroup memory) and checks E4 <= MAX_REG.

override WG: u32 = 64u;
override ROWS: u32 = 4u;      // rows per invocation, at most MAX_ROWS
override TILE: u32 = 64u;     // columns staged per step
override E4: u32 = 8u;        // vec4s of channels, ceil(E / 4)
override SHIFT_STREAMED: bool = false;

const MAX_ROWS: u32 = 4u;
const MAX_REG: u32 = 32u;     // vec4 registers for a thread's rows (and as many accumulators)

struct Params {
    e: u32,          // channels
    s: u32,          // locations per image
    m: u32,          // locations in the batch, N S
    chunk: u32,      // columns per chunk (a multiple of TILE)
    chunks: u32,     // chunks (the grid's z)
    inv_tau: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> rows_in: array<f32>;
@group(0) @binding(2) var<storage, read> cols_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;

var<workgroup> tile: array<vec4<f32>, TILE * E4>;   // [TILE][E4]
var<workgroup> tile_shift: array<f32, TILE>;
var<workgroup> tile_weight: array<f32, TILE>;

// The index of channel 0 of location m; channel e is e * S further.
fn base_of(m: u32) -> u32 {
    return (m / params.s) * params.e * params.s + m % params.s;
}

// Channels 4 e4 .. 4 e4 + 3 of location m, zeros past E or past M.
fn row_vec4(m: u32, e4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if m >= params.m { return v; }
    let base = base_of(m);
    for (var k = 0u; k < 4u; k++) {
        let e = 4u * e4 + k;
        if e < params.e { v[k] = rows_in[base + e * params.s]; }
    }
    return v;
}

fn col_vec4(m: u32, e4: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if m >= params.m { return v; }
    let base = base_of(m);
    for (var k = 0u; k < 4u; k++) {
        let e = 4u * e4 + k;
        if e < params.e { v[k] = cols_in[base + e * params.s]; }
    }
    return v;
}

// Row r of this invocation: rows of a workgroup are WG apart so that lanes load neighbours.
fn row_index(group: vec3<u32>, groups: vec3<u32>, lane: u32, r: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG * ROWS + r * WG + lane;
}

// This invocation's rows, E4 vec4s each: own[r * E4 + e4].
fn load_rows(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> array<vec4<f32>, MAX_REG> {
    var own: array<vec4<f32>, MAX_REG>;
    for (var r = 0u; r < ROWS; r++) {
        let i = row_index(group, groups, lane, r);
        for (var e4 = 0u; e4 < E4; e4++) { own[r * E4 + e4] = row_vec4(i, e4); }
    }
    return own;
}

// Stages columns j0 .. j0 + TILE - 1; consecutive lanes take consecutive columns (coalesced).
fn stage(j0: u32, lane: u32) {
    for (var l = lane; l < TILE * E4; l += WG) {
        let c = l % TILE;
        let e4 = l / TILE;
        tile[c * E4 + e4] = col_vec4(j0 + c, e4);
    }
}

// s for each of this invocation's rows against staged column c.
fn similarities(own: ptr<function, array<vec4<f32>, MAX_REG>>, c: u32) -> array<f32, MAX_ROWS> {
    var d: array<f32, MAX_ROWS>;
    for (var e4 = 0u; e4 < E4; e4++) {
        let t = tile[c * E4 + e4];
        for (var r = 0u; r < ROWS; r++) { d[r] += dot((*own)[r * E4 + e4], t); }
    }
    for (var r = 0u; r < ROWS; r++) { d[r] *= params.inv_tau; }
    return d;
}

// out[chunk * M + i] = log sum_{j in chunk} exp(s_ij).
@compute @workgroup_size(WG)
fn infonce_logsumexp(@builtin(workgroup_id) group: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>,
                     @builtin(local_invocation_index) lane: u32) {
    var own = load_rows(group, groups, lane);
    var mx: array<f32, MAX_ROWS>;
    var l: array<f32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) { mx[r] = -3.0e38; }
    let first = group.z * params.chunk;
    let last = min(first + params.chunk, params.m);
    for (var j0 = first; j0 < last; j0 += TILE) {
        stage(j0, lane);
        workgroupBarrier();
        let count = min(TILE, last - j0);
        for (var c = 0u; c < count; c++) {
            let s = similarities(&own, c);
            for (var r = 0u; r < ROWS; r++) {
                let x = exp(-abs(s[r] - mx[r]));
                l[r] = select(l[r] + x, l[r] * x + 1.0, s[r] > mx[r]);
                mx[r] = max(mx[r], s[r]);
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < ROWS; r++) {
        let i = row_index(group, groups, lane, r);
        if i < params.m { out[group.z * params.m + i] = mx[r] + log(l[r]); }
    }
}

// out[i] = log sum_k exp(partial[k * M + i]) over the chunks k (the partials are `rows_in`).
@compute @workgroup_size(WG)
fn infonce_merge(@builtin(workgroup_id) group: vec3<u32>,
                 @builtin(num_workgroups) groups: vec3<u32>,
                 @builtin(local_invocation_index) lane: u32) {
    let i = (group.y * groups.x + group.x) * WG + lane;
    if i >= params.m { return; }
    var mx = -3.0e38;
    for (var k = 0u; k < params.chunks; k++) { mx = max(mx, rows_in[k * params.m + i]); }
    var total = 0.0;
    for (var k = 0u; k < params.chunks; k++) { total += exp(rows_in[k * params.m + i] - mx); }
    out[i] = mx + log(total);
}

// out[chunk][i's channels] = inv_tau sum_{j in chunk} w exp(s_ij - shift) cols_in_j.
@compute @workgroup_size(WG)
fn infonce_weighted_sum(@builtin(workgroup_id) group: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>,
                        @builtin(local_invocation_index) lane: u32) {
    var own = load_rows(group, groups, lane);
    var acc: array<vec4<f32>, MAX_REG>;
    var shift: array<f32, MAX_ROWS>;
    var weight: array<f32, MAX_ROWS>;
    if !SHIFT_STREAMED {
        for (var r = 0u; r < ROWS; r++) {
            let i = row_index(group, groups, lane, r);
            if i < params.m { shift[r] = lse[i]; weight[r] = g[i]; }
        }
    }
    let first = group.z * params.chunk;
    let last = min(first + params.chunk, params.m);
    for (var j0 = first; j0 < last; j0 += TILE) {
        stage(j0, lane);
        if SHIFT_STREAMED {
            for (var c = lane; c < TILE; c += WG) {
                let j = min(j0 + c, params.m - 1u);   // past M: unused, any valid index
                tile_shift[c] = lse[j];
                tile_weight[c] = g[j];
            }
        }
        workgroupBarrier();
        let count = min(TILE, last - j0);
        for (var c = 0u; c < count; c++) {
            let s = similarities(&own, c);
            var coef: array<f32, MAX_ROWS>;
            for (var r = 0u; r < ROWS; r++) {
                if SHIFT_STREAMED {
                    coef[r] = tile_weight[c] * exp(s[r] - tile_shift[c]);
                } else {
                    coef[r] = exp(s[r] - shift[r]);
                }
            }
            for (var e4 = 0u; e4 < E4; e4++) {
                let t = tile[c * E4 + e4];
                for (var r = 0u; r < ROWS; r++) { acc[r * E4 + e4] = fma(vec4<f32>(coef[r]), t, acc[r * E4 + e4]); }
            }
        }
        workgroupBarrier();
    }
    let partial = group.z * params.m * params.e;
    for (var r = 0u; r < ROWS; r++) {
        let i = row_index(group, groups, lane, r);
        if i >= params.m { continue; }
        var scale = params.inv_tau;
        if !SHIFT_STREAMED { scale *= weight[r]; }
        let base = partial + base_of(i);
        for (var e4 = 0u; e4 < E4; e4++) {
            for (var k = 0u; k < 4u; k++) {
                let e = 4u * e4 + k;
                if e < params.e { out[base + e * params.s] = scale * acc[r * E4 + e4][k]; }
            }
        }
    }
}
