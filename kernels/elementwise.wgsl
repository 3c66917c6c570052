// Elementwise kernels: unary functions, binary functions with numpy broadcasting, broadcast copies,
// fill and copy.
//
// Layout: a tensor is its elements in row-major order, stored as array<vec4<f32>>; the host pads
// every buffer to a whole number of vec4s, so an invocation loads and stores 16 bytes at a time.
// Lanes past `n` in the last vec4 are padding: computed on, never read back.
// Workgroup: WG invocations (override, default 256), each handling VECS vec4s (override, default 4)
// spaced WG apart, so at every step neighbouring invocations touch neighbouring addresses (coalesced
// on a GPU) while the per-invocation overhead is paid once for VECS vec4s (what limits lavapipe).
// The grid is 2D because one dimension holds at most 65535 workgroups.
//
// Broadcasting: the host collapses the output shape to at most 8 dimensions (dropping size-1 ones and
// merging neighbours both operands traverse contiguously) and passes, for each operand, its strides
// in elements (0 along broadcast dimensions). An operand with the output's shape (X_FULL, Y_FULL) is
// read as whole vec4s; a broadcast one is gathered lane by lane, its offset stepped along the
// innermost dimension and recomputed from the full index only when a lane crosses into a new row.

override WG: u32 = 256u;
override VECS: u32 = 4u;
// Which function `unary` and `binary` compute: the UNARY_ and BINARY_ codes below, the host's
// codes of UnaryOp and BinaryOp (src/gpu/backend.rs).
override OP: u32 = 0u;
const UNARY_NEG: u32 = 0u;
const UNARY_EXP: u32 = 1u;
const UNARY_LOG: u32 = 2u;
const UNARY_SQRT: u32 = 3u;
const UNARY_SQUARE: u32 = 4u;
const UNARY_RELU: u32 = 5u;
const UNARY_LEAKY_RELU: u32 = 6u;
const UNARY_SIGMOID: u32 = 7u;
const UNARY_TANH: u32 = 8u;
const UNARY_CLAMP: u32 = 9u;
const UNARY_SCALE: u32 = 10u;
const UNARY_ADD_SCALAR: u32 = 11u;
const UNARY_RELU_MASK: u32 = 12u;
const UNARY_LEAKY_RELU_SLOPE: u32 = 13u;
const UNARY_CLAMP_MASK: u32 = 14u;
const BINARY_ADD: u32 = 0u;
const BINARY_SUB: u32 = 1u;
const BINARY_MUL: u32 = 2u;
const BINARY_DIV: u32 = 3u;
// Whether x / y of `binary` have the output's shape (then they are read as whole vec4s).
override X_FULL: bool = true;
override Y_FULL: bool = true;
// Dimensions of the collapsed shape. A pipeline constant rather than a uniform so the index loops
// below unroll and read the shape and strides at constant addresses: on lavapipe a uniform read at
// a computed index costs tens of cycles, and a gather made those reads for every vec4.
override RANK: u32 = 1u;

struct Params {
    n: u32,        // elements in the output
    p0: f32,       // first scalar parameter of the op (slope, min, factor, fill value)
    p1: f32,       // second scalar parameter (max)
    unused: u32,
    shape: array<vec4<u32>, 2>,     // collapsed output shape, outermost first
    stride_a: array<vec4<u32>, 2>,  // strides of x over that shape
    stride_b: array<vec4<u32>, 2>,  // strides of y over that shape
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> y: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

// The first vec4 of this invocation; the others follow at +WG, +2 WG, ...
fn first_vec4(group: vec3<u32>, groups: vec3<u32>, lane: u32) -> u32 {
    return (group.y * groups.x + group.x) * WG * VECS + lane;
}

fn vec4_count() -> u32 {
    return (params.n + 3u) / 4u;
}

// The offset into an operand with `strides` of output element `i`.
fn strided_offset(i: u32, strides: array<vec4<u32>, 2>) -> u32 {
    var rest = i;
    var offset = 0u;
    for (var d = RANK; d > 0u; d--) {
        let extent = params.shape[(d - 1u) / 4u][(d - 1u) % 4u];
        offset += (rest % extent) * strides[(d - 1u) / 4u][(d - 1u) % 4u];
        rest /= extent;
    }
    return offset;
}

// Offsets through `strides` of the 4 elements of output vec4 `i` (0 for padding lanes past n).
// When the 4 elements lie in one row of the innermost dimension (the common case), one index
// decomposition serves all of them; otherwise each lane is decomposed on its own.
fn lane_offsets(i: u32, strides: array<vec4<u32>, 2>) -> vec4<u32> {
    let last = RANK - 1u;
    let extent = params.shape[last / 4u][last % 4u];
    let step = strides[last / 4u][last % 4u];
    let e = 4u * i;
    if e % extent + 3u < extent && e + 3u < params.n {
        return vec4<u32>(strided_offset(e, strides)) + step * vec4<u32>(0u, 1u, 2u, 3u);
    }
    var offsets = vec4<u32>(0u);
    for (var lane = 0u; lane < 4u; lane++) {
        if e + lane < params.n {
            offsets[lane] = strided_offset(e + lane, strides);
        }
    }
    return offsets;
}

// A lane-by-lane gather; one load when all lanes read the same element (a per-channel operand).
fn gather_x(o: vec4<u32>) -> vec4<f32> {
    if all(o == o.xxxx) { return vec4<f32>(x[o.x >> 2u][o.x & 3u]); }
    return vec4<f32>(x[o.x >> 2u][o.x & 3u], x[o.y >> 2u][o.y & 3u],
                     x[o.z >> 2u][o.z & 3u], x[o.w >> 2u][o.w & 3u]);
}

fn gather_y(o: vec4<u32>) -> vec4<f32> {
    if all(o == o.xxxx) { return vec4<f32>(y[o.x >> 2u][o.x & 3u]); }
    return vec4<f32>(y[o.x >> 2u][o.x & 3u], y[o.y >> 2u][o.y & 3u],
                     y[o.z >> 2u][o.z & 3u], y[o.w >> 2u][o.w & 3u]);
}

// Whether each lane is NaN, read from the bits: WGSL lets a compiler assume floats are never NaN,
// and max, min and clamp may return the other operand when one is.
fn is_nan(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u);
}

// NaN in, NaN out (numpy's behaviour, and the Cpu64 reference's): the ops below that would turn
// a NaN into a number (relu, clamp and the derivative masks) pass it through instead.
fn unary_nan_kept(v: vec4<f32>) -> vec4<f32> {
    return select(unary_op(v), v, is_nan(v));
}

fn unary_op(v: vec4<f32>) -> vec4<f32> {
    let a = params.p0;
    let b = params.p1;
    let zero = vec4<f32>(0.0);
    let one = vec4<f32>(1.0);
    switch OP {
        case UNARY_NEG: { return -v; }
        case UNARY_EXP: { return exp(v); }
        case UNARY_LOG: { return log(v); }
        case UNARY_SQRT: { return sqrt(v); }
        case UNARY_SQUARE: { return v * v; }
        case UNARY_RELU: { return max(v, zero); }
        case UNARY_LEAKY_RELU: { return select(a * v, v, v > zero); }          // slope a
        // sigmoid, written so that neither branch overflows: e = exp(-|v|) <= 1.
        case UNARY_SIGMOID: {
            let e = exp(-abs(v));
            return select(e / (one + e), one / (one + e), v >= zero);
        }
        // tanh = sign(v) (1 - e) / (1 + e) with e = exp(-2|v|): no overflow for large |v|.
        case UNARY_TANH: {
            let e = exp(-2.0 * abs(v));
            return sign(v) * (one - e) / (one + e);
        }
        case UNARY_CLAMP: { return clamp(v, vec4<f32>(a), vec4<f32>(b)); }     // min a, max b
        case UNARY_SCALE: { return v * a; }
        case UNARY_ADD_SCALAR: { return v + a; }
        case UNARY_RELU_MASK: { return select(zero, one, v > zero); }
        case UNARY_LEAKY_RELU_SLOPE: { return select(vec4<f32>(a), one, v > zero); }
        case UNARY_CLAMP_MASK: { return select(zero, one, v >= vec4<f32>(a) & v <= vec4<f32>(b)); }
        default: { return v; }
    }
}

fn binary_op(u: vec4<f32>, v: vec4<f32>) -> vec4<f32> {
    switch OP {
        case BINARY_ADD: { return u + v; }
        case BINARY_SUB: { return u - v; }
        case BINARY_MUL: { return u * v; }
        case BINARY_DIV: { return u / v; }
        default: { return u; }
    }
}

@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
         @builtin(local_invocation_index) lane: u32) {
    let first = first_vec4(group, groups, lane);
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= vec4_count() { return; }
        out[i] = unary_nan_kept(x[i]);
    }
}

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let first = first_vec4(group, groups, lane);
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= vec4_count() { return; }
        var u: vec4<f32>;
        var v: vec4<f32>;
        if X_FULL { u = x[i]; } else { u = gather_x(lane_offsets(i, params.stride_a)); }
        if Y_FULL { v = y[i]; } else { v = gather_y(lane_offsets(i, params.stride_b)); }
        out[i] = binary_op(u, v);
    }
}

// out = x broadcast to the output shape (the adjoint of a sum over the broadcast axes).
@compute @workgroup_size(WG)
fn broadcast(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(local_invocation_index) lane: u32) {
    let first = first_vec4(group, groups, lane);
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= vec4_count() { return; }
        out[i] = gather_x(lane_offsets(i, params.stride_a));
    }
}

// out = x broadcast along rows: output [rows, inner] (shape[0] = inner, a multiple of 4), row r
// holding x[r % shape[1]] (a per-channel value, or one per (n, c)). Grid: x over the row's vec4s,
// y over the rows, so the value and its index are uniform across a workgroup and no per-element
// index arithmetic remains (generic `broadcast` pays several integer divisions per vec4).
@compute @workgroup_size(WG)
fn broadcast_rows(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let inner4 = params.shape[0].x / 4u;
    let row = group.y;
    let value = vec4<f32>(x[(row % params.shape[0].y) / 4u][(row % params.shape[0].y) % 4u]);
    let first = group.x * WG * VECS + lane;
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= inner4 { return; }
        out[row * inner4 + i] = value;
    }
}

// out = x op y where one operand holds one value per row: output [rows, inner] (shape[0].x =
// inner, a multiple of 4), the full operand (X_FULL says which) read as vec4s and the other
// holding value r % shape[0].y for row r (a per-channel bias or scale). Grid as broadcast_rows:
// the value and its index are uniform across a workgroup, where `binary` decomposes every vec4's
// index through the strides to find them.
@compute @workgroup_size(WG)
fn binary_rows(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let inner4 = params.shape[0].x / 4u;
    let row = group.y;
    let e = row % params.shape[0].y;
    var value: vec4<f32>;
    if X_FULL { value = vec4<f32>(y[e / 4u][e % 4u]); } else { value = vec4<f32>(x[e / 4u][e % 4u]); }
    let first = group.x * WG * VECS + lane;
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= inner4 { return; }
        let j = row * inner4 + i;
        if X_FULL { out[j] = binary_op(x[j], value); } else { out[j] = binary_op(value, y[j]); }
    }
}

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let first = first_vec4(group, groups, lane);
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= vec4_count() { return; }
        out[i] = vec4<f32>(params.p0);
    }
}

@compute @workgroup_size(WG)
fn copy(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let first = first_vec4(group, groups, lane);
    for (var r = 0u; r < VECS; r++) {
        let i = first + r * WG;
        if i >= vec4_count() { return; }
        out[i] = x[i];
    }
}
