//! The convolution family on the GPU: launches of kernels/conv.wgsl for each primitive of
//! `metaseg_autograd::ConvBackend`, in each numbered variant of that file (the bench and the tests
//! call a variant by number; the backend trait runs the default), following the [`ConvPlan`] of
//! the geometry.

pub(in crate::gpu) mod plan;

use plan::WG;
pub use plan::{ConvPlan, ConvVariant, Forward, GradInput, GradWeight, Tiling};

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use super::split::Join;
use metaseg_autograd::conv::check_operands;
use metaseg_autograd::{Backend, Conv3dGeometry, ConvBackend, Result, Shape, TensorShape};

/// The grad-weight kernels split their reduction until about this many invocations run.
const GRAD_WEIGHT_INVOCATIONS: usize = 1 << 16;

/// The uniform of kernels/conv.wgsl (`Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(in crate::gpu) struct ConvParams {
    pub batch: u32,
    pub c_in: u32,
    pub c_out: u32,
    pub rows_per_chunk: u32,
    pub channels_padded: u32,
    pub _pad: [u32; 3],
    pub input: [u32; 4],
    pub kernel: [u32; 4],
    pub output: [u32; 4],
    pub stride: [u32; 4],
    pub padding: [u32; 4],
    pub dilation: [u32; 4],
}

impl ConvParams {
    fn new(g: &Conv3dGeometry) -> ConvParams {
        let v = |a: [usize; 3]| [a[0] as u32, a[1] as u32, a[2] as u32, 0];
        ConvParams {
            batch: g.batch as u32,
            c_in: g.c_in as u32,
            c_out: g.c_out as u32,
            rows_per_chunk: 1,
            channels_padded: 0,
            _pad: [0; 3],
            input: v(g.input),
            kernel: v(g.kernel),
            output: v(g.output),
            stride: v(g.spec.stride),
            padding: v(g.spec.padding),
            dilation: v(g.spec.dilation),
        }
    }
}

impl Gpu {
    /// `bias`, or zeros for `channels` channels: the kernels always read a bias.
    fn bias_or_zeros(&self, bias: Option<&GpuTensor>, channels: usize) -> Result<GpuTensor> {
        match bias {
            Some(b) => Ok(b.clone()),
            None => self.fill(&Shape::from([channels]), 0.0),
        }
    }

    /// One invocation per element of `out_shape` (the direct kernels and the weight arrangement).
    fn conv_launch(
        &self,
        kernel: Kernel,
        params: &ConvParams,
        inputs: &[(u32, &GpuTensor)],
        out_shape: &Shape,
    ) -> Result<GpuTensor> {
        let out = self.empty(out_shape)?;
        let grid = self.grid(out_shape.numel().div_ceil(WG));
        self.launch(&kernel, bytemuck::bytes_of(params), inputs, &out, grid)?;
        Ok(out)
    }

    /// `w` [K, C, ...] arranged for the blocked kernels with `channels_padded` output channels:
    /// [C, taps, K] or, with `flip`, [K, taps (reversed unless `!reverse`), C].
    fn arrange_weight(
        &self,
        w: &GpuTensor,
        g: &Conv3dGeometry,
        flip: bool,
        reverse: bool,
        channels_padded: usize,
    ) -> Result<GpuTensor> {
        let mut params = ConvParams::new(g);
        params.channels_padded = channels_padded as u32;
        let taps: usize = g.kernel.iter().product();
        let ci = if flip { g.c_out } else { g.c_in };
        let kernel = Kernel::new(KernelFile::Conv, "conv3d_arrange_weight")
            .with("FLIP", f64::from(u8::from(flip)));
        let kernel = if reverse {
            kernel
        } else {
            kernel.with("REVERSE", 0.0)
        };
        let shape = Shape::from([ci * taps * channels_padded]);
        self.conv_launch(kernel, &params, &[(2, w)], &shape)
    }

    /// A blocked kernel whose invocations each take `tiling.width` W positions of `blocks`
    /// rows and a block of `tiling.channels` of `channels`, the blocks along the grid's z (times
    /// `z_factor`): `kernel` on (binding 1, the arranged weight, bias).
    #[allow(clippy::too_many_arguments)]
    fn blocked_launch(
        &self,
        kernel: &Kernel,
        tiling: Tiling,
        (channels, z_factor): (usize, usize),
        rows: usize,
        a: &GpuTensor,
        arranged: &GpuTensor,
        bias: &GpuTensor,
        (g, out_shape): (&Conv3dGeometry, &Shape),
    ) -> Result<GpuTensor> {
        let out = self.empty(out_shape)?;
        let mut params = ConvParams::new(g);
        let channel_blocks = channels.div_ceil(tiling.channels);
        params.channels_padded = (channel_blocks * tiling.channels) as u32;
        let mut grid = self.grid(rows.div_ceil(WG));
        grid[2] = (channel_blocks * z_factor) as u32;
        self.launch(
            kernel,
            bytemuck::bytes_of(&params),
            &[(1, a), (2, arranged), (4, bias)],
            &out,
            grid,
        )?;
        Ok(out)
    }

    /// The blocked forward of `g` on `x` with the arranged weight (see `conv3d_blocked`).
    fn conv3d_blocked(
        &self,
        tiling: Tiling,
        x: &GpuTensor,
        arranged: &GpuTensor,
        bias: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let [od, oh, ow] = g.output;
        let rows = g.batch * od * oh * ow.div_ceil(tiling.width);
        let kernel = Forward::Blocked(tiling).kernel(g);
        let shape = g.output_shape();
        self.blocked_launch(
            &kernel,
            tiling,
            (g.c_out, 1),
            rows,
            x,
            arranged,
            bias,
            (g, &shape),
        )
    }

    /// conv3d in the given variant (see [`ConvBackend::conv3d`]).
    pub fn conv3d_variant(
        &self,
        variant: ConvVariant,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        check_operands(
            "conv3d",
            g,
            ("x", x.shape(), g.input_shape()),
            ("w", w.shape(), g.weight_shape()),
            bias.map(|b| (b.shape(), g.c_out)),
        )?;
        let result = (&g.output_shape(), Join::Samples);
        let split = self.by_samples("conv3d", &[x], result, |x, n| {
            self.conv3d_variant(variant, &x[0], w, bias, &with_batch(g, n))
        })?;
        if let Some(y) = split {
            return Ok(y);
        }
        let bias = self.bias_or_zeros(bias, g.c_out)?;
        let forward = ConvPlan::new(variant, g).forward;
        match forward {
            Forward::Blocked(tiling) => {
                let padded = g.c_out.next_multiple_of(tiling.channels);
                let arranged = self.arrange_weight(w, g, false, true, padded)?;
                self.conv3d_blocked(tiling, x, &arranged, &bias, g)
            }
            Forward::Direct => self.conv_launch(
                forward.kernel(g),
                &ConvParams::new(g),
                &[(1, x), (2, w), (4, &bias)],
                &g.output_shape(),
            ),
        }
    }

    /// conv3d_grad_input in the given variant (see [`ConvBackend::conv3d_grad_input`]).
    pub fn conv3d_grad_input_variant(
        &self,
        variant: ConvVariant,
        dy: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        check_operands(
            "conv3d_grad_input",
            g,
            ("dy", dy.shape(), g.output_shape()),
            ("w", w.shape(), g.weight_shape()),
            bias.map(|b| (b.shape(), g.c_in)),
        )?;
        let result = (&g.input_shape(), Join::Samples);
        let split = self.by_samples("conv3d_grad_input", &[dy], result, |dy, n| {
            self.conv3d_grad_input_variant(variant, &dy[0], w, bias, &with_batch(g, n))
        })?;
        if let Some(dx) = split {
            return Ok(dx);
        }
        let bias = self.bias_or_zeros(bias, g.c_in)?;
        let pass = ConvPlan::new(variant, g).grad_input;
        let kernel = pass.kernel(g);
        let shape = g.input_shape();
        match pass {
            GradInput::Flipped { tiling, flipped } => {
                let padded = g.c_in.next_multiple_of(tiling.channels);
                let arranged = self.arrange_weight(w, g, true, true, padded)?;
                self.conv3d_blocked(tiling, dy, &arranged, &bias, &flipped)
            }
            GradInput::Patches(tiling) => {
                // One workgroup row per (channel block, td, th), over the output rows' blocks.
                let padded = g.c_in.next_multiple_of(tiling.channels);
                let arranged = self.arrange_weight(w, g, true, false, padded)?;
                let [od, oh, ow] = g.output;
                let rows = g.batch * od * oh * (ow / tiling.width);
                let z = g.kernel[0] * g.kernel[1];
                let channels = (g.c_in, z);
                let (a, w) = (dy, &arranged);
                self.blocked_launch(&kernel, tiling, channels, rows, a, w, &bias, (g, &shape))
            }
            GradInput::Blocked(tiling) => {
                let padded = g.c_in.next_multiple_of(tiling.channels);
                let arranged = self.arrange_weight(w, g, true, false, padded)?;
                let [d, h, width] = g.input;
                let rows = g.batch * d * h * width.div_ceil(tiling.width);
                let channels = (g.c_in, 1);
                let (a, w) = (dy, &arranged);
                self.blocked_launch(&kernel, tiling, channels, rows, a, w, &bias, (g, &shape))
            }
            GradInput::Direct => self.conv_launch(
                kernel,
                &ConvParams::new(g),
                &[(1, dy), (2, w), (4, &bias)],
                &shape,
            ),
        }
    }

    /// conv3d_grad_weight in the given variant (see [`ConvBackend::conv3d_grad_weight`]).
    pub fn conv3d_grad_weight_variant(
        &self,
        variant: ConvVariant,
        x: &GpuTensor,
        dy: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        check_operands(
            "conv3d_grad_weight",
            g,
            ("x", x.shape(), g.input_shape()),
            ("dy", dy.shape(), g.output_shape()),
            None,
        )?;
        // A sum over the samples: the ranges' gradients add up.
        let result = (&g.weight_shape(), Join::Sum);
        let split = self.by_samples("conv3d_grad_weight", &[x, dy], result, |p, n| {
            self.conv3d_grad_weight_variant(variant, &p[0], &p[1], &with_batch(g, n))
        })?;
        if let Some(dw) = split {
            return Ok(dw);
        }
        let pass = ConvPlan::new(variant, g).grad_weight;
        let weights = g.weight_shape().numel();
        let units = pass.units(g);
        let (partial, per_chunk, chunks) = match pass {
            GradWeight::Rows(tiling) | GradWeight::Blocked(tiling) => {
                // Invocations own (c, ...) combinations along x for a block of output channels
                // (z), and split the reduction's units into chunks (y).
                let combos = pass.combos(g);
                let channel_blocks = g.c_out.div_ceil(tiling.channels);
                let (per_chunk, chunks) = self.chunks(units, combos * channel_blocks, weights);
                let wg = plan::grad_weight_workgroup(combos);
                let grid = [
                    combos.div_ceil(wg) as u32,
                    chunks as u32,
                    channel_blocks as u32,
                ];
                (Some(grid), per_chunk, chunks)
            }
            GradWeight::Direct => {
                let (per_chunk, chunks) = self.chunks(units, weights, weights);
                (None, per_chunk, chunks)
            }
        };
        let mut params = ConvParams::new(g);
        params.rows_per_chunk = per_chunk as u32;
        let shape = Shape::from([chunks, weights]);
        let partial = match partial {
            Some(grid) => {
                let partial = self.empty(&shape)?;
                let bytes = bytemuck::bytes_of(&params);
                self.launch(&pass.kernel(g), bytes, &[(1, x), (2, dy)], &partial, grid)?;
                partial
            }
            None => self.conv_launch(pass.kernel(g), &params, &[(1, x), (2, dy)], &shape)?,
        };
        self.sum_chunks(partial, g)
    }

    /// How a reduction over `units` terms splits into chunks of partial sums so that about
    /// GRAD_WEIGHT_INVOCATIONS invocations run when each chunk has `parallel` of them: the units
    /// per chunk and the number of chunks (at most as many as keep the partial sums of `weights`
    /// weights each within one binding).
    fn chunks(&self, units: usize, parallel: usize, weights: usize) -> (usize, usize) {
        let limits = &self.context().adapter.limits;
        let fit = self.context().max_binding_bytes() as usize / 4 / weights.max(1);
        let max_chunks = (limits.max_compute_workgroups_per_dimension as usize).min(fit.max(1));
        let wanted = GRAD_WEIGHT_INVOCATIONS
            .div_ceil(parallel)
            .clamp(1, units.min(max_chunks));
        let per_chunk = units.div_ceil(wanted);
        (per_chunk, units.div_ceil(per_chunk))
    }

    /// dw from partial sums [chunks, weights].
    fn sum_chunks(&self, partial: GpuTensor, g: &Conv3dGeometry) -> Result<GpuTensor> {
        let summed = if partial.shape().dims()[0] == 1 {
            partial
        } else {
            self.sum_axes(&partial, &[0])?
        };
        self.reshape(&summed, &g.weight_shape())
    }
}

/// `g` over `batch` samples.
fn with_batch(g: &Conv3dGeometry, batch: usize) -> Conv3dGeometry {
    Conv3dGeometry { batch, ..*g }
}

impl ConvBackend for Gpu {
    fn conv3d(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        self.conv3d_variant(ConvVariant::DEFAULT, x, w, bias, g)
    }

    fn conv3d_grad_input(
        &self,
        dy: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        self.conv3d_grad_input_variant(ConvVariant::DEFAULT, dy, w, bias, g)
    }

    fn conv3d_grad_weight(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        self.conv3d_grad_weight_variant(ConvVariant::DEFAULT, x, dy, g)
    }
}
