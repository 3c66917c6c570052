// Batched matrix product: C[b] = op(A[b]) @ op(B[b]), where op transposes when TRANS_A / TRANS_B.
//
// Layout (row-major): A is [batch_a, M, K], or [batch_a, K, M] when TRANS_A; B is [batch_b, K, N],
// or [batch_b, N, K] when TRANS_B; C is [batch, M, N]. A batch of 1 is shared by every batch.
//
// Blocking: a workgroup of WG_X x WG_Y invocations owns a TM x TN = (4 WG_Y) x (4 WG_X) tile of C
// and walks K in steps of TK. Each step stages a TK x TM slice of A and a TK x TN slice of B in
// workgroup memory (loaded so that neighbouring invocations read neighbouring addresses, whichever
// way the operand is transposed), then every invocation accumulates a 4 x 4 register block: 8
// workgroup-memory reads feed 16 multiply-adds. Rows of the block are ty + WG_Y r and columns
// tx + WG_X c, so the final stores of a row of invocations are contiguous.
// Grid: x over column tiles, y over row tiles, z over the batch.

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override TK: u32 = 16u;
override TRANS_A: bool = false;
override TRANS_B: bool = false;

const RB: u32 = 4u;   // register block: RB x RB outputs per invocation

struct Params {
    m: u32,
    k: u32,
    n: u32,
    batch_a: u32,
    batch_b: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

var<workgroup> tile_a: array<f32, TK * RB * WG_Y>;   // [TK][TM]
var<workgroup> tile_b: array<f32, TK * RB * WG_X>;   // [TK][TN]

fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if row >= params.m || kk >= params.k { return 0.0; }
    if TRANS_A { return a[base + kk * params.m + row]; }
    return a[base + row * params.k + kk];
}

fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if kk >= params.k || col >= params.n { return 0.0; }
    if TRANS_B { return b[base + col * params.k + kk]; }
    return b[base + kk * params.n + col];
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let tm = RB * WG_Y;
    let tn = RB * WG_X;
    let row0 = group.y * tm;
    let col0 = group.x * tn;
    let batch = group.z;
    let base_a = select(batch, 0u, params.batch_a == 1u) * params.m * params.k;
    let base_b = select(batch, 0u, params.batch_b == 1u) * params.k * params.n;
    let threads = WG_X * WG_Y;

    var acc: array<vec4<f32>, RB>;
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        // Stage the slices: the fastest-varying index follows the operand's contiguous axis.
        for (var l = lane; l < TK * tm; l += threads) {
            var kk: u32; var r: u32;
            if TRANS_A { kk = l / tm; r = l % tm; } else { r = l / TK; kk = l % TK; }
            tile_a[kk * tm + r] = load_a(base_a, row0 + r, k0 + kk);
        }
        for (var l = lane; l < TK * tn; l += threads) {
            var kk: u32; var q: u32;
            if TRANS_B { q = l / TK; kk = l % TK; } else { kk = l / tn; q = l % tn; }
            tile_b[kk * tn + q] = load_b(base_b, k0 + kk, col0 + q);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let bv = vec4<f32>(
                tile_b[kk * tn + local.x],
                tile_b[kk * tn + local.x + WG_X],
                tile_b[kk * tn + local.x + 2u * WG_X],
                tile_b[kk * tn + local.x + 3u * WG_X],
            );
            for (var r = 0u; r < RB; r++) {
                acc[r] += tile_a[kk * tm + local.y + r * WG_Y] * bv;
            }
        }
        workgroupBarrier();
    }

    let base_c = batch * params.m * params.n;
    for (var r = 0u; r < RB; r++) {
        let row = row0 + local.y + r * WG_Y;
        if row >= params.m { continue; }
        for (var q = 0u; q < RB; q++) {
            let col = col0 + local.x + q * WG_X;
            if col < params.n {
                c[base_c + row * params.n + col] = acc[r][q];
            }
        }
    }
}
