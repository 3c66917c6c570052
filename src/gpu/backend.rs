//! The GPU backend: every primitive of `metaseg_autograd::Backend` as a launch of a WGSL kernel.

use super::context::{Binding, BufferCopy, Context, DeviceError};
use super::kernels::{Access, Kernel, KernelFile};
use super::split::{with_samples, Join};
use metaseg_autograd::{
    Backend, BinaryOp, Distribution, Error, MatmulDims, MatmulSpec, Result, Shape, TensorShape,
    UnaryOp,
};
use std::sync::Arc;

/// A handle to one device; cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<Context>,
}

/// A buffer that returns to the pool when the last tensor using it is dropped.
struct Storage {
    buffer: Option<wgpu::Buffer>,
    ctx: Arc<Context>,
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.ctx.release(b);
        }
    }
}

/// Contiguous f32 data on the device, padded to whole vec4s: the whole of a buffer, or a range of
/// one (a view of some samples or elements of a larger tensor, see `split`).
#[derive(Clone)]
pub struct GpuTensor {
    storage: Arc<Storage>,
    /// Where the tensor starts in the buffer, in bytes.
    offset: u64,
    shape: Shape,
}

impl TensorShape for GpuTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}

impl GpuTensor {
    pub fn buffer(&self) -> &wgpu::Buffer {
        self.storage
            .buffer
            .as_ref()
            .expect("live storage has a buffer")
    }

    /// Where the tensor starts in its buffer, in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bytes a kernel binds: the elements padded to whole vec4s.
    pub(crate) fn bound_bytes(&self) -> u64 {
        4 * self.shape.numel().max(1).next_multiple_of(4) as u64
    }

    /// Elements `start..start + shape.numel()` of this tensor, as a tensor of `shape` sharing its
    /// buffer (`start` must keep the view's offset aligned for binding).
    pub(crate) fn view(&self, start: usize, shape: Shape) -> GpuTensor {
        debug_assert!(start + shape.numel() <= self.shape.numel());
        GpuTensor {
            storage: self.storage.clone(),
            offset: self.offset + 4 * start as u64,
            shape,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct ElementwiseParams {
    pub(super) n: u32,
    pub(super) p0: f32,
    pub(super) p1: f32,
    pub(super) unused: u32,
    pub(super) shape: [u32; MAX_RANK],
    pub(super) stride_a: [u32; MAX_RANK],
    pub(super) stride_b: [u32; MAX_RANK],
}

/// Dimensions a broadcast may keep after collapsing (the size of the arrays in elementwise.wgsl).
pub(super) const MAX_RANK: usize = 8;
type Collapsed = (u32, [[u32; MAX_RANK]; 3]);

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct ReduceParams {
    pub(super) outer: u32,
    pub(super) reduce: u32,
    pub(super) inner: u32,
    pub(super) chunk: u32,
    pub(super) chunks: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct MatmulParams {
    pub(super) m: u32,
    pub(super) k: u32,
    pub(super) n: u32,
    pub(super) batch_a: u32,
    pub(super) batch_b: u32,
    pub(super) batch: u32,
    pub(super) chunk: u32,
    pub(super) splits: u32,
    pub(super) row_blocks: u32,
    pub(super) col_blocks: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct RandomParams {
    pub(super) n: u32,
    pub(super) seed_lo: u32,
    pub(super) seed_hi: u32,
    pub(super) counter_lo: u32,
    pub(super) counter_hi: u32,
    pub(super) classes: u32,
}

/// Invocations per workgroup of the 1D kernels (their `WG` override default).
pub(super) const WG: u32 = 256;
/// vec4s per invocation of the elementwise kernels (their `VECS` override default).
pub(super) const VECS: u32 = 4;
/// Invocations per workgroup of matmul.wgsl (its WG), the rows and columns of C per invocation
/// (its RM and RN defaults) and its bound on their vec4 accumulators (MAX_ACC). 8 x 8 measured
/// best on lavapipe: 8 x 16 and 16 x 8 (32 accumulators) ran 3-4x slower, 12 x 8 5x slower.
pub(super) const MATMUL_WG: usize = 64;
pub(super) const MATMUL_RM: usize = 8;
pub(super) const MATMUL_RN: usize = 8;
pub(super) const MATMUL_MAX_ACC: usize = 32;
const _: () = assert!(MATMUL_RM * MATMUL_RN / 4 <= MATMUL_MAX_ACC && MATMUL_RN <= 16);
/// A matmul with fewer invocations than this splits K (split-K), each split at least
/// MATMUL_MIN_CHUNK long, and sums the splits with reduce.wgsl.
const MATMUL_MIN_INVOCATIONS: usize = 4096;
const MATMUL_MIN_CHUNK: usize = 128;
/// A row reduction longer than this is split into chunks summed by a second pass; over vec4s,
/// ROW_CHUNK4 (a workgroup's tree in workgroup memory costs about as much as 16 loads per
/// invocation, so a chunk holds 64 vec4s per invocation).
const ROW_CHUNK: usize = 16_384;
const ROW_CHUNK4: usize = 4 * 64 * WG as usize;
/// Column reductions are split when fewer than this many outputs would keep the device busy.
const MIN_COLUMN_THREADS: usize = 16_384;

/// A broadcast that repeats one value along each row of the output, as (rows, inner, period):
/// the collapsed output is [.., C, inner] with x varying along C only (strides [0, 1, 0] or
/// [1, 0]), so row r holds x[r % C]. Rows must fit one grid dimension and rows whole vec4s.
fn row_broadcast(
    rank: u32,
    dims: &[u32; MAX_RANK],
    strides: &[u32; MAX_RANK],
) -> Option<(usize, usize, usize)> {
    let rank = rank as usize;
    let (rows, period) = match (rank, &strides[..rank]) {
        (2, [1, 0]) => (dims[0], dims[0]),
        (3, [0, 1, 0]) => (dims[0] * dims[1], dims[1]),
        _ => return None,
    };
    let inner = dims[rank - 1] as usize;
    (inner.is_multiple_of(4) && rows <= u16::MAX as u32).then_some((
        rows as usize,
        inner,
        period as usize,
    ))
}

/// K per split of a matmul with `blocks` invocations: all of K when they are enough to keep the
/// device busy, else K split so that about MATMUL_MIN_INVOCATIONS run, each split a multiple of
/// 4 (whole vec4 steps) and at least MATMUL_MIN_CHUNK long.
fn matmul_chunk(blocks: usize, k: usize) -> usize {
    let wanted = MATMUL_MIN_INVOCATIONS.div_ceil(blocks);
    let splits = wanted.min(k / MATMUL_MIN_CHUNK).max(1);
    k.div_ceil(splits).next_multiple_of(4)
}

/// The `OP` override of elementwise.wgsl for each unary op.
pub(super) fn unary_code(op: UnaryOp) -> u32 {
    match op {
        UnaryOp::Neg => 0,
        UnaryOp::Exp => 1,
        UnaryOp::Log => 2,
        UnaryOp::Sqrt => 3,
        UnaryOp::Square => 4,
        UnaryOp::Relu => 5,
        UnaryOp::LeakyRelu { .. } => 6,
        UnaryOp::Sigmoid => 7,
        UnaryOp::Tanh => 8,
        UnaryOp::Clamp { .. } => 9,
        UnaryOp::Scale { .. } => 10,
        UnaryOp::AddScalar { .. } => 11,
        UnaryOp::ReluMask => 12,
        UnaryOp::LeakyReluSlope { .. } => 13,
        UnaryOp::ClampMask { .. } => 14,
    }
}

pub(super) fn binary_code(op: BinaryOp) -> u32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
    }
}

/// Collapses a broadcast to at most MAX_RANK dimensions: size-1 dimensions go, and neighbours that
/// both operands traverse contiguously merge. Returns the rank and [shape, stride_a, stride_b].
fn collapse(out: &Shape, sa: &[usize], sb: &[usize]) -> Option<Collapsed> {
    let mut dims: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..out.rank() {
        let (n, a, b) = (out.dims()[i], sa[i], sb[i]);
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == a * n && last.2 == b * n => *last = (last.0 * n, a, b),
            _ => dims.push((n, a, b)),
        }
    }
    if dims.len() > MAX_RANK {
        return None;
    }
    let mut r = [[1u32; MAX_RANK], [0; MAX_RANK], [0; MAX_RANK]];
    for (i, &(n, a, b)) in dims.iter().enumerate() {
        r[0][i] = n as u32;
        r[1][i] = a as u32;
        r[2][i] = b as u32;
    }
    Some((dims.len() as u32, r))
}

/// An error of this backend (a failed dispatch, a buffer over the adapter's limit).
pub(crate) fn backend_error(message: String) -> Error {
    Error::Backend {
        backend: "gpu",
        message,
    }
}

impl Gpu {
    /// Opens the default device (see [`Context::new`]).
    pub fn new() -> std::result::Result<Gpu, DeviceError> {
        Ok(Gpu {
            ctx: Arc::new(Context::new()?),
        })
    }

    /// Opens the default device with its binding limit lowered to `bytes` (see
    /// [`Context::with_max_binding_bytes`]): the split paths run with small tensors.
    pub fn with_max_binding_bytes(bytes: u64) -> std::result::Result<Gpu, DeviceError> {
        Ok(Gpu {
            ctx: Arc::new(Context::with_max_binding_bytes(Some(bytes))?),
        })
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// An uninitialised tensor of `shape` from the pool.
    pub fn empty(&self, shape: &Shape) -> Result<GpuTensor> {
        // Counted in u128, and checked, so that no shape makes the count wrap into a small one.
        let n = (shape.dims().iter()).try_fold(1u128, |n, &d| n.checked_mul(d as u128));
        let bytes = n.map(|n| n.max(1).next_multiple_of(4) * 4);
        // Kernels bind a larger tensor in ranges (see `split`); a buffer holds at most this.
        let limit = self.ctx.max_buffer_bytes();
        let fits = n.is_some_and(|n| n < u32::MAX as u128 / 4);
        let bytes = match bytes {
            Some(bytes) if fits && bytes <= limit as u128 => bytes as u64,
            _ => {
                let needs = bytes.map_or("more than 2^128".into(), |b| b.to_string());
                return Err(backend_error(format!(
                    "a tensor of shape {shape} needs {needs} bytes; the adapter's buffers hold at \
                     most {limit} bytes (max_buffer_size)"
                )));
            }
        };
        Ok(GpuTensor {
            storage: Arc::new(Storage {
                buffer: Some(self.ctx.acquire(bytes)),
                ctx: self.ctx.clone(),
            }),
            offset: 0,
            shape: shape.clone(),
        })
    }

    /// Runs `kernel` with `params` as the uniform at binding 0, `inputs` read-only at their bindings
    /// and `output` read-write at binding 3 (the convention of every kernel file).
    pub(crate) fn launch(
        &self,
        kernel: &Kernel,
        params: &[u8],
        inputs: &[(u32, &GpuTensor)],
        output: &GpuTensor,
        workgroups: [u32; 3],
    ) -> Result<()> {
        let mut bindings: Vec<Binding> = inputs
            .iter()
            .map(|&(binding, t)| Binding {
                binding,
                access: Access::Read,
                buffer: t.buffer(),
                offset: t.offset,
                size: t.bound_bytes(),
                bytes: 4 * t.shape().numel() as u64,
            })
            .collect();
        bindings.push(Binding {
            binding: 3,
            access: Access::ReadWrite,
            buffer: output.buffer(),
            offset: output.offset,
            size: output.bound_bytes(),
            bytes: 4 * output.shape().numel() as u64,
        });
        self.ctx
            .dispatch(kernel, Some(params), &bindings, workgroups)
            .map_err(backend_error)
    }

    /// Copies each part to its consecutive piece of `flat` (`into_flat`) or back, in one
    /// submission of buffer copies.
    fn copy_pieces(&self, flat: &GpuTensor, parts: &[&GpuTensor], into_flat: bool) -> Result<()> {
        let mut offset = 0;
        let copies: Vec<BufferCopy> = parts
            .iter()
            .filter(|p| p.shape.numel() > 0)
            .map(|p| {
                let bytes = 4 * p.shape.numel() as u64;
                let (from, from_offset, to, to_offset) = if into_flat {
                    (p.buffer(), p.offset, flat.buffer(), flat.offset + offset)
                } else {
                    (flat.buffer(), flat.offset + offset, p.buffer(), p.offset)
                };
                offset += bytes;
                BufferCopy {
                    from,
                    from_offset,
                    to,
                    to_offset,
                    bytes,
                }
            })
            .collect();
        self.ctx.copy_regions(&copies).map_err(backend_error)
    }

    /// The 2D grid for `groups` workgroups (see `Context::grid`).
    pub(crate) fn grid(&self, groups: usize) -> [u32; 3] {
        self.ctx.grid(groups as u32)
    }

    /// A 1D elementwise launch over `n` elements, one vec4 per invocation; split into ranges of
    /// elements (see `split`) when the output exceeds one binding and every input is as large.
    fn elementwise(
        &self,
        kernel: Kernel,
        params: ElementwiseParams,
        inputs: &[(u32, &GpuTensor)],
        out_shape: &Shape,
    ) -> Result<GpuTensor> {
        let out = self.empty(out_shape)?;
        let n = out_shape.numel();
        let ranges = self.flat_ranges(n);
        if ranges.len() == 1 {
            let grid = self.grid((n.div_ceil(4) as u32).div_ceil(WG * VECS) as usize);
            let params = bytemuck::bytes_of(&params);
            return self
                .launch(&kernel, params, inputs, &out, grid)
                .map(|()| out);
        }
        if inputs.iter().any(|(_, t)| t.shape().numel() != n) {
            return Err(backend_error(format!(
                "{}: a broadcast onto {out_shape} exceeds one binding and is not split here",
                kernel.label()
            )));
        }
        self.ctx.note_split(&kernel.label());
        for r in ranges {
            let part = |t: &GpuTensor| t.view(r.start, Shape::from([r.len()]));
            let parts: Vec<(u32, GpuTensor)> = inputs.iter().map(|&(b, t)| (b, part(t))).collect();
            let parts: Vec<(u32, &GpuTensor)> = parts.iter().map(|(b, t)| (*b, t)).collect();
            let mut p = params;
            p.n = r.len() as u32;
            let vec4s = r.len().div_ceil(4) as u32;
            let grid = self.grid(vec4s.div_ceil(WG * VECS) as usize);
            self.launch(&kernel, bytemuck::bytes_of(&p), &parts, &part(&out), grid)?;
        }
        Ok(out)
    }

    /// A launch of broadcast_rows or binary_rows over an output of `rows` x `inner` elements:
    /// x over the vec4s of a row, y over the rows.
    fn rows_launch(
        &self,
        kernel: Kernel,
        params: ElementwiseParams,
        inputs: &[(u32, &GpuTensor)],
        out_shape: &Shape,
        [rows, inner]: [usize; 2],
    ) -> Result<GpuTensor> {
        let out = self.empty(out_shape)?;
        let grid = [
            (inner / 4).div_ceil((WG * VECS) as usize) as u32,
            rows as u32,
            1,
        ];
        self.launch(&kernel, bytemuck::bytes_of(&params), inputs, &out, grid)?;
        Ok(out)
    }

    /// Whether `t` runs along axis 0 of `out` in a broadcast onto `out` (rather than repeating).
    fn along_samples(t: &GpuTensor, out: &Shape) -> bool {
        let (dims, out) = (t.shape().dims(), out.dims());
        dims.len() == out.len() && !out.is_empty() && dims[0] == out[0]
    }

    fn elementwise_params(n: usize) -> ElementwiseParams {
        ElementwiseParams {
            n: n as u32,
            p0: 0.0,
            p1: 0.0,
            unused: 0,
            shape: [1; MAX_RANK],
            stride_a: [0; MAX_RANK],
            stride_b: [0; MAX_RANK],
        }
    }

    /// A broadcasting `op` whose output exceeds one binding, on ranges of its samples (`None`
    /// when it fits).
    fn binary_by_samples(
        &self,
        op: BinaryOp,
        a: &GpuTensor,
        b: &GpuTensor,
        out: &Shape,
    ) -> Result<Option<GpuTensor>> {
        let (a_along, b_along) = (Self::along_samples(a, out), Self::along_samples(b, out));
        let batched: Vec<&GpuTensor> = [(a, a_along), (b, b_along)]
            .iter()
            .filter(|(_, along)| *along)
            .map(|(t, _)| *t)
            .collect();
        self.by_samples(op.name(), &batched, (out, Join::Samples), |parts, _| {
            let a = if a_along { &parts[0] } else { a };
            let b = if b_along { &parts[parts.len() - 1] } else { b };
            self.binary(op, a, b)
        })
    }

    /// A sum over the middle axis of x viewed as [outer, reduce, inner] larger than one binding:
    /// by ranges of `outer` when a slab [reduce, inner] fits, else (outer = 1) by ranges of
    /// `reduce`, summed. `None` when x fits.
    fn sum_middle_split(
        &self,
        x: &GpuTensor,
        [outer, reduce, inner]: [usize; 3],
    ) -> Result<Option<GpuTensor>> {
        if self.fits(&[x]) {
            return Ok(None);
        }
        let slab_fits = self.shape_fits(&Shape::from([reduce * inner]));
        if outer > 1 || slab_fits {
            let x = self.reshape(x, &Shape::from([outer, reduce, inner]))?;
            let result = Shape::from([outer, 1, inner]);
            return self.by_samples("sum", &[&x], (&result, Join::Samples), |p, n| {
                self.sum_middle(&p[0], n, reduce, inner)
            });
        }
        let x = self.reshape(x, &Shape::from([reduce, inner]))?;
        let result = Shape::from([1, 1, inner]);
        self.by_samples("sum", &[&x], (&result, Join::Sum), |p, n| {
            self.sum_middle(&p[0], 1, n, inner)
        })
    }

    /// One pass of a sum over the middle axis of x viewed as [outer, reduce, inner].
    fn sum_middle(
        &self,
        x: &GpuTensor,
        outer: usize,
        reduce: usize,
        inner: usize,
    ) -> Result<GpuTensor> {
        if let Some(sum) = self.sum_middle_split(x, [outer, reduce, inner])? {
            return Ok(sum);
        }
        if outer * reduce * inner == 0 {
            // A sum over no values is 0 (numpy's); an empty result needs no launch.
            return self.fill(&Shape::from([outer, 1, inner]), 0.0);
        }
        if reduce == 1 {
            return Ok(x.clone());
        }
        let rows = inner == 1;
        let chunk = if rows && reduce.is_multiple_of(4) {
            ROW_CHUNK4
        } else if rows {
            ROW_CHUNK
        } else if outer * inner >= MIN_COLUMN_THREADS {
            reduce
        } else {
            // Enough chunks to fill MIN_COLUMN_THREADS invocations, each summing at least 64 values.
            let chunks = MIN_COLUMN_THREADS.div_ceil(outer * inner);
            reduce.div_ceil(chunks).max(64)
        };
        let chunks = reduce.div_ceil(chunk);
        let params = ReduceParams {
            outer: outer as u32,
            reduce: reduce as u32,
            inner: inner as u32,
            chunk: chunk as u32,
            chunks: chunks as u32,
        };
        let out = self.empty(&Shape::from([outer, chunks, inner]))?;
        let (entry, groups) = if rows {
            let whole_vec4s = reduce.is_multiple_of(4) && chunk.is_multiple_of(4);
            (
                if whole_vec4s { "sum_rows4" } else { "sum_rows" },
                outer * chunks,
            )
        } else {
            (
                "sum_columns",
                (outer * chunks * inner).div_ceil(WG as usize),
            )
        };
        let kernel = Kernel::new(KernelFile::Reduce, entry);
        let grid = self.grid(groups);
        self.launch(&kernel, bytemuck::bytes_of(&params), &[(1, x)], &out, grid)?;
        if chunks == 1 {
            Ok(out)
        } else {
            self.sum_middle(&out, outer, chunks, inner)
        }
    }
}

impl Backend for Gpu {
    type Tensor = GpuTensor;

    fn name(&self) -> &'static str {
        "gpu"
    }

    fn tensor(&self, values: &[f64], shape: &Shape) -> Result<GpuTensor> {
        if values.len() != shape.numel() {
            return Err(Error::InvalidArgument {
                op: "from_f64",
                message: format!("{} values for shape {shape}", values.len()),
            });
        }
        let t = self.empty(shape)?;
        let mut data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        data.resize(values.len().max(1).next_multiple_of(4), 0.0);
        self.ctx
            .write(t.buffer(), bytemuck::cast_slice(&data))
            .map_err(backend_error)?;
        Ok(t)
    }

    fn to_f64(&self, x: &GpuTensor) -> Result<Vec<f64>> {
        let bytes = self
            .ctx
            .read(x.buffer(), x.offset, 4 * x.shape.numel() as u64)
            .map_err(backend_error)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect())
    }

    fn fill(&self, shape: &Shape, value: f64) -> Result<GpuTensor> {
        let mut p = Self::elementwise_params(shape.numel());
        p.p0 = value as f32;
        self.elementwise(Kernel::new(KernelFile::Elementwise, "fill"), p, &[], shape)
    }

    fn copy(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let p = Self::elementwise_params(x.shape.numel());
        self.elementwise(
            Kernel::new(KernelFile::Elementwise, "copy"),
            p,
            &[(1, x)],
            &x.shape,
        )
    }

    fn concat_flat(&self, parts: &[&GpuTensor]) -> Result<GpuTensor> {
        let total: usize = parts.iter().map(|p| p.shape.numel()).sum();
        let flat = self.empty(&Shape::from([total]))?;
        self.copy_pieces(&flat, parts, true)?;
        Ok(flat)
    }

    fn split_flat(&self, flat: &GpuTensor, shapes: &[Shape]) -> Result<Vec<GpuTensor>> {
        metaseg_autograd::backend::check_split(flat.shape.numel(), shapes)?;
        let parts = shapes
            .iter()
            .map(|s| self.empty(s))
            .collect::<Result<Vec<_>>>()?;
        self.copy_pieces(flat, &parts.iter().collect::<Vec<_>>(), false)?;
        Ok(parts)
    }

    fn reshape(&self, x: &GpuTensor, shape: &Shape) -> Result<GpuTensor> {
        if shape.numel() != x.shape.numel() {
            return Err(Error::Shape {
                op: "reshape",
                lhs: x.shape.clone(),
                rhs: shape.clone(),
                reason: "the element counts differ".into(),
            });
        }
        Ok(x.view(0, shape.clone()))
    }

    fn broadcast_to(&self, x: &GpuTensor, shape: &Shape) -> Result<GpuTensor> {
        let along = Self::along_samples(x, shape);
        let batched: &[&GpuTensor] = if along { &[x] } else { &[] };
        let result = (shape, Join::Samples);
        let split = self.by_samples("broadcast_to", batched, result, |parts, n| {
            let x = if along { &parts[0] } else { x };
            self.broadcast_to(x, &with_samples(shape, n))
        })?;
        if let Some(y) = split {
            return Ok(y);
        }
        let sa = x.shape.broadcast_strides(shape);
        let (rank, [dims, stride_a, _]) = collapse(shape, &sa, &sa).ok_or_else(|| {
            backend_error(format!(
                "broadcast of {} to {shape} spans more than {MAX_RANK} dimensions",
                x.shape
            ))
        })?;
        let mut p = Self::elementwise_params(shape.numel());
        if let Some((rows, inner, period)) = row_broadcast(rank, &dims, &stride_a) {
            (p.shape[0], p.shape[1]) = (inner as u32, period as u32);
            let kernel = Kernel::new(KernelFile::Elementwise, "broadcast_rows");
            return self.rows_launch(kernel, p, &[(1, x)], shape, [rows, inner]);
        }
        (p.shape, p.stride_a) = (dims, stride_a);
        self.elementwise(
            Kernel::new(KernelFile::Elementwise, "broadcast").with("RANK", rank as f64),
            p,
            &[(1, x)],
            shape,
        )
    }

    fn unary(&self, op: UnaryOp, x: &GpuTensor) -> Result<GpuTensor> {
        let mut p = Self::elementwise_params(x.shape.numel());
        let [p0, p1] = op.params();
        (p.p0, p.p1) = (p0 as f32, p1 as f32);
        let kernel =
            Kernel::new(KernelFile::Elementwise, "unary").with("OP", unary_code(op) as f64);
        self.elementwise(kernel, p, &[(1, x)], &x.shape)
    }

    fn binary(&self, op: BinaryOp, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let out = Shape::broadcast(op.name(), &a.shape, &b.shape)?;
        let (x_full, y_full) = (a.shape == out, b.shape == out);
        let mut p = Self::elementwise_params(out.numel());
        let mut rank = 1;
        if !(x_full && y_full) {
            if let Some(y) = self.binary_by_samples(op, a, b, &out)? {
                return Ok(y);
            }
            let (sa, sb) = (
                a.shape.broadcast_strides(&out),
                b.shape.broadcast_strides(&out),
            );
            (rank, [p.shape, p.stride_a, p.stride_b]) =
                collapse(&out, &sa, &sb).ok_or_else(|| Error::Shape {
                    op: op.name(),
                    lhs: a.shape.clone(),
                    rhs: b.shape.clone(),
                    reason: format!(
                        "this broadcast spans more than {MAX_RANK} dimensions after merging"
                    ),
                })?;
        }
        let flag = |full: bool| if full { 1.0 } else { 0.0 };
        if x_full != y_full {
            let stride = if x_full { &p.stride_b } else { &p.stride_a };
            if let Some((rows, inner, period)) = row_broadcast(rank, &p.shape, stride) {
                (p.shape[0], p.shape[1]) = (inner as u32, period as u32);
                let kernel = Kernel::new(KernelFile::Elementwise, "binary_rows")
                    .with("OP", binary_code(op) as f64)
                    .with("X_FULL", flag(x_full));
                return self.rows_launch(kernel, p, &[(1, a), (2, b)], &out, [rows, inner]);
            }
        }
        let kernel = Kernel::new(KernelFile::Elementwise, "binary")
            .with("OP", binary_code(op) as f64)
            .with("X_FULL", flag(x_full))
            .with("Y_FULL", flag(y_full))
            .with("RANK", rank as f64);
        self.elementwise(kernel, p, &[(1, a), (2, b)], &out)
    }

    fn sum_axes(&self, x: &GpuTensor, axes: &[usize]) -> Result<GpuTensor> {
        let dims = x.shape.dims().to_vec();
        let mut current = x.clone();
        // Reduce each run of consecutive axes, innermost run first, as [outer, reduce, inner].
        let mut remaining: Vec<usize> = axes.to_vec();
        let mut shape = dims.clone();
        while let Some(&last) = remaining.last() {
            let mut first = last;
            while remaining.len() > 1 && remaining[remaining.len() - 2] == first - 1 {
                remaining.pop();
                first -= 1;
            }
            remaining.pop();
            let outer: usize = shape[..first].iter().product();
            let reduce: usize = shape[first..=last].iter().product();
            let inner: usize = shape[last + 1..].iter().product();
            current = self.sum_middle(&current, outer, reduce, inner)?;
            for d in &mut shape[first..=last] {
                *d = 1;
            }
        }
        self.reshape(&current, &x.shape.reduced(axes))
    }

    fn matmul(&self, a: &GpuTensor, b: &GpuTensor, spec: MatmulSpec) -> Result<GpuTensor> {
        let (d, out_shape) = MatmulDims::new(&a.shape, &b.shape, spec)?;
        if d.m * d.n * d.batch * d.k == 0 {
            return self.fill(&out_shape, 0.0);
        }
        let (row_blocks, col_blocks) = (d.m.div_ceil(MATMUL_RM), d.n.div_ceil(MATMUL_RN));
        let blocks = d.batch * row_blocks * col_blocks;
        let chunk = matmul_chunk(blocks, d.k);
        let splits = d.k.div_ceil(chunk);
        let params = MatmulParams {
            m: d.m as u32,
            k: d.k as u32,
            n: d.n as u32,
            batch_a: d.batch_a as u32,
            batch_b: d.batch_b as u32,
            batch: d.batch as u32,
            chunk: chunk as u32,
            splits: splits as u32,
            row_blocks: row_blocks as u32,
            col_blocks: col_blocks as u32,
        };
        // Whole vec4s along every axis the kernel reads as vec4s: K, and each operand's
        // contiguous axis.
        let contiguous_a = if spec.trans_a { d.m } else { d.k };
        let contiguous_b = if spec.trans_b { d.k } else { d.n };
        let aligned = [d.k, contiguous_a, contiguous_b]
            .iter()
            .all(|v| v.is_multiple_of(4));
        let flag = |t: bool| if t { 1.0 } else { 0.0 };
        let entry = if d.n.is_multiple_of(4) {
            "matmul4"
        } else {
            "matmul"
        };
        let kernel = Kernel::new(KernelFile::Matmul, entry)
            .with("TRANS_A", flag(spec.trans_a))
            .with("TRANS_B", flag(spec.trans_b))
            .with("ALIGNED", flag(aligned));
        let outputs = d.batch * d.m * d.n;
        let partial = self.empty(&Shape::from([splits, outputs]))?;
        let grid = self.grid((splits * blocks).div_ceil(MATMUL_WG));
        let inputs = [(1, a), (2, b)];
        self.launch(
            &kernel,
            bytemuck::bytes_of(&params),
            &inputs,
            &partial,
            grid,
        )?;
        let sum = if splits == 1 {
            partial
        } else {
            self.sum_middle(&partial, 1, splits, outputs)?
        };
        self.reshape(&sum, &out_shape)
    }

    fn random(
        &self,
        shape: &Shape,
        dist: Distribution,
        seed: u64,
        counter: u64,
    ) -> Result<GpuTensor> {
        let out = self.empty(shape)?;
        let entry = match dist {
            Distribution::Uniform => "random_uniform",
            Distribution::Normal => "random_normal",
        };
        // Element i is a function of (seed, counter + i): a range from `start` is the same
        // draw with its counter moved on by `start`.
        let ranges = self.flat_ranges(shape.numel());
        if ranges.len() > 1 {
            self.ctx.note_split(entry);
        }
        for r in ranges {
            let counter = counter.wrapping_add(r.start as u64);
            let params = RandomParams {
                n: r.len() as u32,
                seed_lo: seed as u32,
                seed_hi: (seed >> 32) as u32,
                counter_lo: counter as u32,
                counter_hi: (counter >> 32) as u32,
                classes: 0,
            };
            let grid = self.grid(r.len().div_ceil(WG as usize));
            self.launch(
                &Kernel::new(KernelFile::Random, entry),
                bytemuck::bytes_of(&params),
                &[],
                &out.view(r.start, Shape::from([r.len()])),
                grid,
            )?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{collapse, matmul_chunk, MATMUL_MIN_CHUNK};
    use metaseg_autograd::Shape;

    #[test]
    fn a_long_k_over_few_blocks_splits_into_whole_vec4_chunks() {
        // 512 x 512 x 512: 4096 blocks of 8 x 8 keep the device busy, so K is not split.
        assert_eq!(matmul_chunk(64 * 64, 512), 512);
        // The head's weight gradient 16 x 32768 x 16 (4 blocks): K / MATMUL_MIN_CHUNK splits.
        assert_eq!(matmul_chunk(4, 32768), MATMUL_MIN_CHUNK);
        // Ragged K: 8 splits of 132 (a multiple of 4), the last one shorter.
        assert_eq!(matmul_chunk(1, 1031), 132);
        assert_eq!(1031_usize.div_ceil(132), 8);
        // Short K is never split.
        assert_eq!(matmul_chunk(1, 45), 48);
    }

    #[test]
    fn per_channel_broadcast_collapses_to_three_dimensions() {
        let out = Shape::from([2, 3, 4, 5, 6]);
        let c = Shape::from([1, 3, 1, 1, 1]);
        let r = collapse(
            &out,
            &out.broadcast_strides(&out),
            &c.broadcast_strides(&out),
        )
        .unwrap();
        assert_eq!(r.0, 3);
        assert_eq!(
            (&r.1[0][..3], &r.1[1][..3], &r.1[2][..3]),
            (&[2, 3, 120][..], &[360, 120, 1][..], &[0, 1, 0][..])
        );
    }

    #[test]
    fn same_shape_collapses_to_one_dimension() {
        let out = Shape::from([2, 3, 4]);
        let s = out.broadcast_strides(&out);
        let r = collapse(&out, &s, &s).unwrap();
        assert_eq!((r.0, r.1[0][0], r.1[1][0], r.1[2][0]), (1, 24, 1, 1));
    }
}
