//! The contrastive family on the GPU: dense InfoNCE's streamed log-sum-exp and its backward
//! (kernels/contrastive.wgsl), the primitives of `metaseg_autograd::ContrastiveBackend`. The
//! local contrastive loss needs no kernel of its own (it is composed from matmuls and elementwise
//! ops), so it runs on the existing ones; its anchors are drawn by `sample_anchors`
//! (kernels/random.wgsl).

use super::backend::{Gpu, GpuTensor, RandomParams};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::contrastive::{anchor_dims, infonce_backward_dims, infonce_dims};
use metaseg_autograd::{Backend, ContrastiveBackend, Error, Result, Shape, TensorShape};

/// The uniform of kernels/contrastive.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct InfonceParams {
    pub(super) e: u32,
    pub(super) s: u32,
    pub(super) m: u32,
    pub(super) chunk: u32,
    pub(super) chunks: u32,
    pub(super) inv_tau: f32,
}

/// Invocations per workgroup (the kernel's `WG`).
pub(super) const WG: usize = 64;
/// Most rows per invocation (`MAX_ROWS`) and vec4 registers for them (`MAX_REG`).
pub(super) const MAX_ROWS: usize = 4;
pub(super) const MAX_REG: usize = 32;
/// Row registers of the backward, which holds as many accumulators again: half the forward's, so
/// both passes keep about MAX_REG vec4s live per invocation (for E up to 64).
const BACKWARD_REG: usize = 16;
/// Columns staged per step, at most (fewer when E is large, to fit workgroup memory).
const MAX_TILE: usize = 64;
/// Enough workgroups (row blocks x column chunks) to fill a large GPU.
const TARGET_GROUPS: usize = 256;
/// Fewest tiles per chunk: a workgroup loads its rows once per chunk, so short chunks waste loads.
const MIN_TILES_PER_CHUNK: usize = 4;

/// How one call is laid out: rows per invocation, tile, chunks, and the uniform.
struct Plan {
    params: InfonceParams,
    rows: usize,
    tile: usize,
    e4: usize,
    row_groups: usize,
}

impl Gpu {
    /// The launch plan of [N, E, S] operands for a register budget of `registers` vec4s of rows.
    fn infonce_plan(
        &self,
        (n, e, s): (usize, usize, usize),
        tau: f64,
        registers: usize,
    ) -> Result<Plan> {
        let e4 = e.div_ceil(4).max(1);
        if e4 > MAX_REG {
            return Err(Error::InvalidArgument {
                op: "dense_infonce",
                message: format!(
                    "embeddings of {e} channels; the GPU kernel holds at most {} per location",
                    4 * MAX_REG
                ),
            });
        }
        let rows = (registers / e4).clamp(1, MAX_ROWS);
        // Workgroup memory: the tile (16 bytes per vec4) and two floats per column.
        let budget = self
            .context()
            .adapter
            .limits
            .max_compute_workgroup_storage_size as usize;
        let tile = (budget / (16 * e4 + 8)).min(MAX_TILE);
        let m = n * s;
        let row_groups = m.div_ceil(WG * rows).max(1);
        let wanted = TARGET_GROUPS.div_ceil(row_groups);
        let max_chunks = m.div_ceil(MIN_TILES_PER_CHUNK * tile).max(1);
        let chunk = m
            .div_ceil(wanted.min(max_chunks))
            .next_multiple_of(tile)
            .max(tile);
        let params = InfonceParams {
            e: e as u32,
            s: s as u32,
            m: m as u32,
            chunk: chunk as u32,
            chunks: m.div_ceil(chunk).max(1) as u32,
            inv_tau: (1.0 / tau) as f32,
        };
        Ok(Plan {
            params,
            rows,
            tile,
            e4,
            row_groups,
        })
    }

    fn infonce_kernel(entry: &'static str, plan: &Plan) -> Kernel {
        Kernel::new(KernelFile::Contrastive, entry)
            .with("WG", WG as f64)
            .with("ROWS", plan.rows as f64)
            .with("TILE", plan.tile as f64)
            .with("E4", plan.e4 as f64)
    }

    /// The grid: row blocks in x, y and column chunks in z.
    fn infonce_grid(&self, plan: &Plan) -> [u32; 3] {
        let [x, y, _] = self.grid(plan.row_groups);
        [x, y, plan.params.chunks]
    }
}

impl ContrastiveBackend for Gpu {
    fn sample_anchors(&self, labels: &GpuTensor, per_class: usize, seed: u64) -> Result<GpuTensor> {
        let (n, c, s) = anchor_dims(labels.shape(), per_class)?;
        let mask = self.fill(&labels.shape().reduced(&[1]), 0.0)?;
        let groups = n * c.saturating_sub(1);
        if groups == 0 || per_class == 0 || s == 0 {
            return Ok(mask);
        }
        let limit = self
            .context()
            .adapter
            .limits
            .max_compute_workgroups_per_dimension;
        if groups > limit as usize {
            return Err(Error::InvalidArgument {
                op: "sample_anchors",
                message: format!("{n} images x {} classes: at most {limit}", c - 1),
            });
        }
        let params = RandomParams {
            n: s as u32,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            counter_lo: 0,
            counter_hi: 0,
            classes: c as u32,
        };
        self.launch(
            &Kernel::new(KernelFile::Random, "sample_anchors").with("K", per_class as f64),
            bytemuck::bytes_of(&params),
            &[(1, labels)],
            &mask,
            [groups as u32, 1, 1],
        )?;
        Ok(mask)
    }

    fn infonce_logsumexp(&self, qn: &GpuTensor, kn: &GpuTensor, tau: f64) -> Result<GpuTensor> {
        let dims = infonce_dims("dense_infonce", qn.shape(), kn.shape())?;
        let out_shape = qn.shape().reduced(&[1]);
        if dims.0 * dims.2 == 0 {
            return self.fill(&out_shape, 0.0);
        }
        let plan = self.infonce_plan(dims, tau, MAX_REG)?;
        let p = plan.params;
        let kernel = Self::infonce_kernel("infonce_logsumexp", &plan);
        let partial = self.empty(&Shape::from([p.chunks as usize, p.m as usize]))?;
        let grid = self.infonce_grid(&plan);
        let inputs = [(1, qn), (2, kn)];
        self.launch(&kernel, bytemuck::bytes_of(&p), &inputs, &partial, grid)?;
        if p.chunks == 1 {
            return self.reshape(&partial, &out_shape);
        }
        let lse = self.empty(&out_shape)?;
        let merge = Self::infonce_kernel("infonce_merge", &plan);
        let grid = self.grid((p.m as usize).div_ceil(WG));
        self.launch(&merge, bytemuck::bytes_of(&p), &[(1, &partial)], &lse, grid)?;
        Ok(lse)
    }

    fn infonce_logsumexp_backward(
        &self,
        qn: &GpuTensor,
        kn: &GpuTensor,
        lse: &GpuTensor,
        g: &GpuTensor,
        tau: f64,
    ) -> Result<(GpuTensor, GpuTensor)> {
        let dims = infonce_backward_dims(qn.shape(), kn.shape(), lse.shape(), g.shape())?;
        if dims.0 * dims.1 * dims.2 == 0 {
            return Ok((self.fill(qn.shape(), 0.0)?, self.fill(kn.shape(), 0.0)?));
        }
        let plan = self.infonce_plan(dims, tau, BACKWARD_REG)?;
        // d qn: own rows qn against the keys, weighted by the rows' g; d kn: the transpose.
        let d_q = self.infonce_weighted_sum(&plan, qn, kn, lse, g, false)?;
        let d_k = self.infonce_weighted_sum(&plan, kn, qn, lse, g, true)?;
        Ok((d_q, d_k))
    }
}

impl Gpu {
    /// One backward launch (see kernels/contrastive.wgsl), its chunks' partial sums added.
    fn infonce_weighted_sum(
        &self,
        plan: &Plan,
        rows: &GpuTensor,
        cols: &GpuTensor,
        lse: &GpuTensor,
        g: &GpuTensor,
        shift_streamed: bool,
    ) -> Result<GpuTensor> {
        let p = plan.params;
        let kernel = Self::infonce_kernel("infonce_weighted_sum", plan)
            .with("SHIFT_STREAMED", f64::from(u8::from(shift_streamed)));
        let shape = rows.shape();
        let chunks = p.chunks as usize;
        let partial = self.empty(&Shape::from([chunks, shape.numel()]))?;
        let inputs = [(1, rows), (2, cols), (4, lse), (5, g)];
        let grid = self.infonce_grid(plan);
        self.launch(&kernel, bytemuck::bytes_of(&p), &inputs, &partial, grid)?;
        let total = if chunks == 1 {
            partial
        } else {
            self.sum_axes(&partial, &[0])?
        };
        self.reshape(&total, shape)
    }
}
