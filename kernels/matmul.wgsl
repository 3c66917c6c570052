// Batched matrix product: C[b] = op(A[b]) @ op(B[b]), where op transposes when TRANS_A / TRANS_B.
//
// Layout (row-major): A is [batch_a, M, K], or [batch_a, K, M] when TRANS_A; B is [batch_b, K, N],
// or [batch_b, N, K] when TRANS_B; C is [splits, batch, M, N]. A batch of 1 is shared by every
// batch. With splits > 1 (split-K) split s sums k in [s chunk, (s + 1) chunk) and the host adds
// the splits up (reduce.wgsl): a long K with a small C (the weight gradient of a 1x1x1 head,
// 16 x 32768 x 16) still runs on many invocations.
//
// Register blocking, no workgroup memory: on lavapipe a load from a computed address costs about
// as much whether it is a scalar or a vec4 and far more than a multiply-add, and a barrier ends the
// JIT's straight-line code (see conv.wgsl, variant 2), so what pays is multiply-adds per vec4
// loaded. An invocation owns RM rows x RN columns of C in RM x RN/4 vec4 accumulators and walks
// its k range 4 at a time: it loads op(A)'s RM x 4 block and op(B)'s 4 x RN block as 4 x 4
// matrices of vec4s read along whichever axis is contiguous in memory (transposed in registers
// when that axis is the other one), then does RM x RN x 4 multiply-adds as mat4x4 x vec4
// products: at 8 x 8, 16 vec4 loads feed 256 multiply-adds. With ALIGNED (the host's check: K
// and both operands' contiguous axes multiples of 4) the loads are whole vec4s, edge blocks read
// clamped in-bounds addresses and their extra results are never stored; otherwise every element
// is a bounds-checked scalar load (ragged shapes: correct, four times the loads).
// Invocations: (split, batch, row block, column block) with the column block fastest, WG per
// workgroup on the 2D grid linearised as in elementwise.wgsl. Entry points: `matmul` stores C
// element by element; `matmul4`, where N is a multiple of 4, as whole vec4s (a quarter of the
// stores, which weigh when K is short: the head's W @ X has K = 16).

override WG: u32 = 64u;
override TRANS_A: bool = false;
override TRANS_B: bool = false;
override ALIGNED: bool = false;
override RM: u32 = 8u;   // rows per invocation, a multiple of 4
override RN: u32 = 8u;   // columns per invocation, a multiple of 4

const MAX_ACC: u32 = 32u;   // RM x RN / 4 vec4 accumulators at most

struct Params {
    m: u32,
    k: u32,
    n: u32,
    batch_a: u32,
    batch_b: u32,
    batch: u32,
    chunk: u32,       // k per split, a multiple of 4
    splits: u32,
    row_blocks: u32,  // ceil(M / RM)
    col_blocks: u32,  // ceil(N / RN)
}

@group(0) @binding(0) var<uniform> params: Params;
// The operands as vec4s (the host pads every buffer to whole vec4s); the scalar path picks
// element e as [e / 4][e % 4].
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read_write> c4: array<vec4<f32>>;   // matmul4's view of c

// op(A)[row, kk] with zeros outside, for the scalar path.
fn a_at(base: u32, row: u32, kk: u32) -> f32 {
    if row >= params.m || kk >= params.k { return 0.0; }
    var e = base + row * params.k + kk;
    if TRANS_A { e = base + kk * params.m + row; }
    return a4[e / 4u][e % 4u];
}

fn b_at(base: u32, kk: u32, col: u32) -> f32 {
    if kk >= params.k || col >= params.n { return 0.0; }
    var e = base + kk * params.n + col;
    if TRANS_B { e = base + col * params.k + kk; }
    return b4[e / 4u][e % 4u];
}

// Column r of the result is op(A)[row0 + r, k .. k + 4].
fn a_block(base: u32, row0: u32, k: u32) -> mat4x4<f32> {
    if !ALIGNED {
        var m: mat4x4<f32>;
        for (var r = 0u; r < 4u; r++) {
            m[r] = vec4<f32>(a_at(base, row0 + r, k), a_at(base, row0 + r, k + 1u),
                             a_at(base, row0 + r, k + 2u), a_at(base, row0 + r, k + 3u));
        }
        return m;
    }
    if TRANS_A {
        // Rows are contiguous: load op(A)[row0 .. row0 + 4, k + i] for each i, then transpose.
        let r0 = min(row0, params.m - 4u);
        let first = (base + k * params.m + r0) / 4u;
        let step = params.m / 4u;
        return transpose(mat4x4<f32>(a4[first], a4[first + step], a4[first + 2u * step],
                                     a4[first + 3u * step]));
    }
    let last = params.m - 1u;
    let at = (base + k) / 4u;
    let step = params.k / 4u;
    return mat4x4<f32>(a4[at + min(row0, last) * step], a4[at + min(row0 + 1u, last) * step],
                       a4[at + min(row0 + 2u, last) * step], a4[at + min(row0 + 3u, last) * step]);
}

// Column i of the result is op(B)[k + i, col0 .. col0 + 4].
fn b_block(base: u32, k: u32, col0: u32) -> mat4x4<f32> {
    if !ALIGNED {
        var m: mat4x4<f32>;
        for (var i = 0u; i < 4u; i++) {
            m[i] = vec4<f32>(b_at(base, k + i, col0), b_at(base, k + i, col0 + 1u),
                             b_at(base, k + i, col0 + 2u), b_at(base, k + i, col0 + 3u));
        }
        return m;
    }
    if TRANS_B {
        // k is contiguous: load op(B)[k .. k + 4, col0 + j] for each j, then transpose.
        let last = params.n - 1u;
        let at = (base + k) / 4u;
        let step = params.k / 4u;
        return transpose(mat4x4<f32>(b4[at + min(col0, last) * step],
                                     b4[at + min(col0 + 1u, last) * step],
                                     b4[at + min(col0 + 2u, last) * step],
                                     b4[at + min(col0 + 3u, last) * step]));
    }
    let c0 = min(col0, params.n - 4u);
    let first = (base + k * params.n + c0) / 4u;
    let step = params.n / 4u;
    return mat4x4<f32>(b4[first], b4[first + step], b4[first + 2u * step], b4[first + 3u * step]);
}

// The invocation's block of C: its position (split, batch, row0, col0) and accumulators, where
// acc[r * RN / 4 + j] holds C[row0 + r, col0 + 4 j .. col0 + 4 j + 4].
struct Block {
    split: u32,
    batch: u32,
    row0: u32,
    col0: u32,
    acc: array<vec4<f32>, MAX_ACC>,
}

fn block_of(i: u32) -> Block {
    var blk: Block;
    let blocks = params.row_blocks * params.col_blocks;
    blk.col0 = (i % params.col_blocks) * RN;
    blk.row0 = ((i / params.col_blocks) % params.row_blocks) * RM;
    blk.batch = (i / blocks) % params.batch;
    blk.split = i / (blocks * params.batch);
    let base_a = select(blk.batch, 0u, params.batch_a == 1u) * params.m * params.k;
    let base_b = select(blk.batch, 0u, params.batch_b == 1u) * params.k * params.n;
    let k_end = min((blk.split + 1u) * params.chunk, params.k);
    for (var k = blk.split * params.chunk; k < k_end; k += 4u) {
        var bs: array<mat4x4<f32>, 4>;   // RN / 4 <= 4 column quads
        for (var j = 0u; j < RN / 4u; j++) {
            bs[j] = b_block(base_b, k, blk.col0 + 4u * j);
        }
        for (var r4 = 0u; r4 < RM / 4u; r4++) {
            let ab = a_block(base_a, blk.row0 + 4u * r4, k);
            for (var r = 0u; r < 4u; r++) {
                for (var j = 0u; j < RN / 4u; j++) {
                    blk.acc[(4u * r4 + r) * (RN / 4u) + j] += bs[j] * ab[r];
                }
            }
        }
    }
    return blk;
}

fn invocation(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG + lane;
}

fn invocations() -> u32 {
    return params.splits * params.batch * params.row_blocks * params.col_blocks;
}

// First row of the block's batch and split in C.
fn c_row(blk: Block) -> u32 {
    return (blk.split * params.batch + blk.batch) * params.m + blk.row0;
}

// C stored element by element, any N.
@compute @workgroup_size(WG)
fn matmul(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= invocations() { return; }
    let blk = block_of(i);
    for (var r = 0u; r < RM; r++) {
        if blk.row0 + r >= params.m { break; }
        for (var q = 0u; q < RN; q++) {
            if blk.col0 + q < params.n {
                c[(c_row(blk) + r) * params.n + blk.col0 + q] = blk.acc[r * (RN / 4u) + q / 4u][q % 4u];
            }
        }
    }
}

// C stored as whole vec4s: N a multiple of 4, so a quad of columns is in or out as one.
@compute @workgroup_size(WG)
fn matmul4(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) lane: u32) {
    let i = invocation(group, groups, lane);
    if i >= invocations() { return; }
    let blk = block_of(i);
    let n4 = params.n / 4u;
    for (var r = 0u; r < RM; r++) {
        if blk.row0 + r >= params.m { break; }
        for (var j = 0u; j < RN / 4u; j++) {
            if blk.col0 + 4u * j < params.n {
                c4[(c_row(blk) + r) * n4 + blk.col0 / 4u + j] = blk.acc[r * (RN / 4u) + j];
            }
        }
    }
}
