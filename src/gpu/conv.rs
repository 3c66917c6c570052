//! The convolution family on the GPU: launches of kernels/conv.wgsl for each primitive of
//! `metaseg_autograd::ConvBackend`, in each numbered variant of that file (the bench and the tests
//! call a variant by number; the backend trait runs the default).

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::conv::check_operands;
use metaseg_autograd::{
    Backend, Conv3dGeometry, ConvBackend, ConvSpec, Result, Shape, TensorShape,
};

/// The versions of the kernels, numbered as in the header of kernels/conv.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvVariant {
    /// 1: one result per invocation, straight from the definition.
    Direct,
    /// 2: register-blocked, `channels` output channels x `width` W positions per invocation of
    /// the forward kernel (at most Wo); the blocked grad-input and grad-weight kernels take at
    /// most 8 of those positions, whose loop nests are not split into parts of 8 as the
    /// forward's (see kernels/conv.wgsl). Grad-input where stride = kernel picks its own
    /// tiling, see `conv3d_grad_input_patches`, and so does grad-weight for kernels 3 tall, see
    /// `conv3d_grad_weight_rows`. Where
    /// its conditions do not hold (W or Wo not a multiple of 4; for grad-input, a stride along W
    /// that does not divide width / 4; kernels too wide for its registers) the direct kernel runs
    /// instead: see [`ConvVariant::runs`].
    ///
    /// With `staged` (variant 3), the forward kernel's workgroup first copies each input
    /// channel's weights for its channel block into workgroup memory and the invocations read
    /// them there: the tiling a real GPU may prefer, switched by an override constant, and
    /// measured slower on lavapipe (see kernels/conv.wgsl). It needs those weights to fit
    /// (kd x kh x kw x channels / 4 vec4s at most 512).
    Blocked {
        channels: usize,
        width: usize,
        staged: bool,
    },
}

impl ConvVariant {
    pub const BLOCKED: ConvVariant = ConvVariant::Blocked {
        channels: 8,
        width: 16,
        staged: false,
    };
    pub const STAGED: ConvVariant = ConvVariant::Blocked {
        channels: 8,
        width: 16,
        staged: true,
    };
    pub const ALL: [ConvVariant; 3] = [
        ConvVariant::Direct,
        ConvVariant::BLOCKED,
        ConvVariant::STAGED,
    ];
    /// What `ConvBackend` runs.
    pub const DEFAULT: ConvVariant = ConvVariant::BLOCKED;

    /// The variant that runs each pass of `g` (forward, grad-input, grad-weight) when this one is
    /// asked for: the blocked kernels give way to the direct ones where their conditions fail,
    /// and the staged variant to the unstaged one outside the forward kernel (the flipped
    /// forward that computes grad-input at stride 1 included).
    pub fn runs(self, g: &Conv3dGeometry) -> [ConvVariant; 3] {
        let unstaged = self.unstaged();
        let forward = Tiling::of(self, g).is_some();
        let grad_input = if flipped(g).is_some_and(|f| Tiling::of(self, &f).is_some()) {
            self
        } else if Tiling::of_patches(unstaged, g).is_some()
            || Tiling::of_grad_input(unstaged, g).is_some()
        {
            unstaged
        } else {
            ConvVariant::Direct
        };
        let grad_weight =
            Tiling::of(unstaged, g).is_some() || Tiling::of_rows(unstaged, g).is_some();
        [
            if forward { self } else { ConvVariant::Direct },
            grad_input,
            if grad_weight {
                unstaged
            } else {
                ConvVariant::Direct
            },
        ]
    }

    /// This variant with the forward's weights read from global memory (variant 3 -> 2).
    pub fn unstaged(self) -> ConvVariant {
        match self {
            ConvVariant::Blocked {
                channels, width, ..
            } => ConvVariant::Blocked {
                channels,
                width,
                staged: false,
            },
            direct => direct,
        }
    }

    /// The number of the variant in the header of kernels/conv.wgsl.
    pub fn number(self) -> u32 {
        match self {
            ConvVariant::Direct => 1,
            ConvVariant::Blocked { staged: false, .. } => 2,
            ConvVariant::Blocked { staged: true, .. } => 3,
        }
    }
}

/// The uniform of kernels/conv.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvParams {
    batch: u32,
    c_in: u32,
    c_out: u32,
    rows_per_chunk: u32,
    channels_padded: u32,
    unused: [u32; 3],
    input: [u32; 4],
    kernel: [u32; 4],
    output: [u32; 4],
    stride: [u32; 4],
    padding: [u32; 4],
    dilation: [u32; 4],
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
            unused: [0; 3],
            input: v(g.input),
            kernel: v(g.kernel),
            output: v(g.output),
            stride: v(g.spec.stride),
            padding: v(g.spec.padding),
            dilation: v(g.spec.dilation),
        }
    }
}

/// Invocations per workgroup of every kernel in conv.wgsl (their `WG` default).
const WG: usize = 64;
/// The grad-weight kernels split their reduction until about this many invocations run.
const GRAD_WEIGHT_INVOCATIONS: usize = 1 << 16;
/// The workgroup size of the blocked grad-weight kernel for `combos` (c, td, th) invocations: the
/// multiple of 8 (lavapipe runs 8 lanes at once) up to `WG` that leaves the fewest idle lanes in
/// the last workgroup, the largest of those. Every lane of a workgroup reads the same dy, so an idle
/// lane costs as much as a working one: at 8 channels (72 combos) a power of two (64) ran 128 lanes
/// for 72 combos, 24 runs 72.
fn grad_weight_workgroup(combos: usize) -> usize {
    (8..=WG)
        .step_by(8)
        .min_by_key(|&wg| (combos.div_ceil(wg) * wg, usize::MAX - wg))
        .expect("WG >= 8")
}
/// Vec4s of one input row segment and vec4 accumulators, as MAX_SEGMENT and MAX_ACC in conv.wgsl.
const MAX_SEGMENT: usize = 16;
const MAX_ACC: usize = 32;
/// W positions per unrolled loop nest of the forward kernel, as PART in conv.wgsl: the most the
/// other blocked kernels take.
const PART: usize = 8;
/// Vec4 accumulators per kh tap of `conv3d_grad_weight_rows`, as ROW_ACC in conv.wgsl.
const ROW_ACC: usize = 14;
/// The blocking of `conv3d_grad_weight_rows`.
const ROWS: ConvVariant = ConvVariant::Blocked {
    channels: 8,
    width: 4,
    staged: false,
};
/// Vec4s of the forward's staged weights, as MAX_STAGED in conv.wgsl.
const MAX_STAGED: usize = 512;
/// Input channels per invocation of `conv3d_grad_input_patches`, at most.
const MAX_CHANNELS: usize = 16;

/// The register tiling of variant 2 for one convolution, if its conditions hold: output channels
/// and W positions per invocation.
#[derive(Clone, Copy, Debug)]
struct Tiling {
    channels: usize,
    width: usize,
    /// The forward's weights staged in workgroup memory (variant 3).
    staged: bool,
}

impl Tiling {
    fn of(variant: ConvVariant, g: &Conv3dGeometry) -> Option<Tiling> {
        let ConvVariant::Blocked {
            channels,
            width,
            staged,
        } = variant
        else {
            return None;
        };
        let width = width.min(g.output[2]);
        let (p, s, d, k) = (
            g.spec.padding[2],
            g.spec.stride[2],
            g.spec.dilation[2],
            g.kernel[2],
        );
        let segment = (p.div_ceil(4) * 4 - p + (width - 1) * s + (k - 1) * d + 4) / 4;
        let fits = g.input[2].is_multiple_of(4)
            && g.output[2].is_multiple_of(4)
            && channels.is_multiple_of(4)
            && (4..=16).contains(&channels)
            && width.is_multiple_of(4)
            && channels / 4 * width <= MAX_ACC
            && segment <= MAX_SEGMENT
            && (!staged || g.kernel.iter().product::<usize>() * channels / 4 <= MAX_STAGED);
        fits.then_some(Tiling {
            channels,
            width,
            staged,
        })
    }

    /// The tiling for `conv3d_grad_weight_rows`, if the kernel is 3 tall with stride and
    /// dilation 1 along H and the W axis meets the blocked kernels' conditions. 8 output channels
    /// (in two parts of 4) x 4 W positions whatever the variant's own sizes: with 8 positions, or
    /// 8 channels in one loop nest, it grew past what lavapipe unrolls and ran at a tenth of the
    /// speed (see conv.wgsl).
    fn of_rows(variant: ConvVariant, g: &Conv3dGeometry) -> Option<Tiling> {
        let ConvVariant::Blocked { .. } = variant else {
            return None;
        };
        let tiling = Tiling::of(ROWS, g)?;
        let tall = g.kernel[1] == 3 && g.spec.stride[1] == 1 && g.spec.dilation[1] == 1;
        (tall && g.kernel[2] * tiling.channels / 4 <= ROW_ACC).then_some(tiling)
    }

    /// The tiling for `conv3d_grad_input_blocked` (grad-input at any stride), if its conditions
    /// hold: blocks of input columns start at multiples of 4 x the stride, and the dy segment
    /// they read fits.
    fn of_grad_input(variant: ConvVariant, g: &Conv3dGeometry) -> Option<Tiling> {
        let ConvVariant::Blocked {
            channels, width, ..
        } = variant
        else {
            return None;
        };
        let width = width.min(PART);
        let [p, s, d, k, w] = [
            g.spec.padding[2],
            g.spec.stride[2],
            g.spec.dilation[2],
            g.kernel[2],
            width,
        ]
        .map(|v| v as i64);
        let first = (p - (k - 1) * d).div_euclid(s).div_euclid(4) * 4;
        let last = (w - 1 + p).div_euclid(s);
        let vecs = ((last - first) / 4 + 1) as usize;
        let fits = g.input[2].is_multiple_of(4)
            && g.output[2].is_multiple_of(4)
            && channels.is_multiple_of(4)
            && (4..=16).contains(&channels)
            && width.is_multiple_of(4 * g.spec.stride[2])
            && channels / 4 * width <= MAX_ACC
            && vecs <= MAX_SEGMENT;
        fits.then_some(Tiling {
            channels,
            width,
            staged: false,
        })
    }

    /// The tiling for `conv3d_grad_input_patches`, if the kernel's windows tile the input in
    /// disjoint patches (stride = kernel, no padding or dilation, D = Do kd and so on) and the
    /// output rows split into blocks of 8: 8 output columns (the KW x 8 input columns they feed)
    /// and as many input channels (a multiple of 4, at most 16) as the accumulators hold. It does
    /// not depend on the variant's own sizes: this kernel's best differ (see conv.wgsl).
    fn of_patches(variant: ConvVariant, g: &Conv3dGeometry) -> Option<Tiling> {
        let ConvVariant::Blocked { .. } = variant else {
            return None;
        };
        let s = &g.spec;
        let disjoint = (0..3).all(|a| {
            s.stride[a] == g.kernel[a]
                && s.padding[a] == 0
                && s.dilation[a] == 1
                && g.input[a] == g.output[a] * g.kernel[a]
        });
        let width = 8;
        let kw = g.kernel[2];
        // Accumulators: width x kw x channels / 4 vec4s.
        let channels = (4 * MAX_ACC / (width * kw) / 4 * 4)
            .min(MAX_CHANNELS)
            .min(g.c_in.next_multiple_of(4));
        let fits = disjoint && g.output[2].is_multiple_of(width) && channels >= 4;
        fits.then_some(Tiling {
            channels,
            width,
            staged: false,
        })
    }

    /// This tiling for the kernels whose loop nests take at most PART W positions.
    fn narrow(self) -> Tiling {
        Tiling {
            width: self.width.min(PART),
            ..self
        }
    }

    /// The blocked kernel `entry` specialised for this tiling and the W axis of `g`.
    fn kernel(self, entry: &'static str, g: &Conv3dGeometry) -> Kernel {
        Kernel::new(KernelFile::Conv, entry)
            .with("KB", self.channels as f64)
            .with("WB", self.width as f64)
            .with("KW", g.kernel[2] as f64)
            .with("SW", g.spec.stride[2] as f64)
            .with("PW", g.spec.padding[2] as f64)
            .with("DW", g.spec.dilation[2] as f64)
    }
}

/// The convolution whose forward is the grad-input of `g` at stride 1: on dy, with the weight
/// flipped and its channel axes swapped, padding dilation (k - 1) - padding. None if a padding
/// is larger than that.
fn flipped(g: &Conv3dGeometry) -> Option<Conv3dGeometry> {
    let mut padding = [0; 3];
    for (a, p) in padding.iter_mut().enumerate() {
        let reach = g.spec.dilation[a] * (g.kernel[a] - 1);
        if g.spec.stride[a] != 1 || g.spec.padding[a] > reach {
            return None;
        }
        *p = reach - g.spec.padding[a];
    }
    Some(Conv3dGeometry {
        batch: g.batch,
        c_in: g.c_out,
        c_out: g.c_in,
        input: g.output,
        kernel: g.kernel,
        output: g.input,
        spec: ConvSpec {
            stride: [1; 3],
            padding,
            dilation: g.spec.dilation,
        },
    })
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
    /// [C, taps, K] or, with `flip`, [K, taps (reversed), C].
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

    /// The blocked forward of `g` on `x` with the arranged weight `w` (see kernels/conv.wgsl).
    fn conv3d_blocked(
        &self,
        tiling: Tiling,
        x: &GpuTensor,
        arranged: &GpuTensor,
        bias: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let out = self.empty(&g.output_shape())?;
        let mut params = ConvParams::new(g);
        let channel_blocks = g.c_out.div_ceil(tiling.channels);
        params.channels_padded = (channel_blocks * tiling.channels) as u32;
        let [od, oh, ow] = g.output;
        let blocks = g.batch * od * oh * ow.div_ceil(tiling.width);
        let mut grid = self.grid(blocks.div_ceil(WG));
        grid[2] = channel_blocks as u32;
        self.launch(
            &tiling
                .kernel("conv3d_blocked", g)
                .with("STAGED", f64::from(u8::from(tiling.staged))),
            bytemuck::bytes_of(&params),
            &[(1, x), (2, arranged), (4, bias)],
            &out,
            grid,
        )?;
        Ok(out)
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
        let bias = self.bias_or_zeros(bias, g.c_out)?;
        if let Some(tiling) = Tiling::of(variant, g) {
            let padded = g.c_out.next_multiple_of(tiling.channels);
            let arranged = self.arrange_weight(w, g, false, true, padded)?;
            return self.conv3d_blocked(tiling, x, &arranged, &bias, g);
        }
        self.conv_launch(
            Kernel::new(KernelFile::Conv, "conv3d_direct"),
            &ConvParams::new(g),
            &[(1, x), (2, w), (4, &bias)],
            &g.output_shape(),
        )
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
        let bias = self.bias_or_zeros(bias, g.c_in)?;
        let blocked = flipped(g).and_then(|f| Some((f, Tiling::of(variant, &f)?)));
        if let Some((f, tiling)) = blocked {
            let padded = g.c_in.next_multiple_of(tiling.channels);
            let arranged = self.arrange_weight(w, g, true, true, padded)?;
            return self.conv3d_blocked(tiling, dy, &arranged, &bias, &f);
        }
        if let Some(tiling) = Tiling::of_patches(variant, g) {
            return self.grad_input_patches(tiling, dy, w, &bias, g);
        }
        if let Some(tiling) = Tiling::of_grad_input(variant, g) {
            return self.grad_input_blocked(tiling, dy, w, &bias, g);
        }
        self.conv_launch(
            Kernel::new(KernelFile::Conv, "conv3d_grad_input_direct"),
            &ConvParams::new(g),
            &[(1, dy), (2, w), (4, &bias)],
            &g.input_shape(),
        )
    }

    /// Variant 2 of grad-input at a stride above 1 (see `conv3d_grad_input_blocked`).
    fn grad_input_blocked(
        &self,
        tiling: Tiling,
        dy: &GpuTensor,
        w: &GpuTensor,
        bias: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let channel_blocks = g.c_in.div_ceil(tiling.channels);
        let padded = channel_blocks * tiling.channels;
        let arranged = self.arrange_weight(w, g, true, false, padded)?;
        let out = self.empty(&g.input_shape())?;
        let mut params = ConvParams::new(g);
        params.channels_padded = padded as u32;
        let [d, h, width] = g.input;
        let blocks = g.batch * d * h * width.div_ceil(tiling.width);
        let mut grid = self.grid(blocks.div_ceil(WG));
        grid[2] = channel_blocks as u32;
        self.launch(
            &tiling.kernel("conv3d_grad_input_blocked", g),
            bytemuck::bytes_of(&params),
            &[(1, dy), (2, &arranged), (4, bias)],
            &out,
            grid,
        )?;
        Ok(out)
    }

    /// Variant 2 of grad-input where the kernel's windows tile the input (see
    /// `conv3d_grad_input_patches`): one workgroup row per (channel block, td, th).
    fn grad_input_patches(
        &self,
        tiling: Tiling,
        dy: &GpuTensor,
        w: &GpuTensor,
        bias: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let channel_blocks = g.c_in.div_ceil(tiling.channels);
        let padded = channel_blocks * tiling.channels;
        let arranged = self.arrange_weight(w, g, true, false, padded)?;
        let out = self.empty(&g.input_shape())?;
        let mut params = ConvParams::new(g);
        params.channels_padded = padded as u32;
        let [od, oh, ow] = g.output;
        let blocks = g.batch * od * oh * (ow / tiling.width);
        let mut grid = self.grid(blocks.div_ceil(WG));
        grid[2] = (channel_blocks * g.kernel[0] * g.kernel[1]) as u32;
        self.launch(
            &tiling.kernel("conv3d_grad_input_patches", g),
            bytemuck::bytes_of(&params),
            &[(1, dy), (2, &arranged), (4, bias)],
            &out,
            grid,
        )?;
        Ok(out)
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
        // No weights to stage here.
        let variant = variant.unstaged();
        // Each blocked kernel: the (c, ...) combinations an invocation owns along x, and the units
        // of the reduction its chunks split.
        let [od, oh, ow] = g.output;
        if let Some(tiling) = Tiling::of_rows(variant, g) {
            let combos = g.c_in * g.kernel[0];
            let units = g.batch * od * ow.div_ceil(tiling.width);
            return self.grad_weight_blocked(
                "conv3d_grad_weight_rows",
                tiling,
                combos,
                units,
                x,
                dy,
                g,
            );
        }
        match Tiling::of(variant, g).map(Tiling::narrow) {
            Some(tiling) => {
                let combos = g.c_in * g.kernel[0] * g.kernel[1];
                let rows = g.batch * od * oh;
                self.grad_weight_blocked(
                    "conv3d_grad_weight_blocked",
                    tiling,
                    combos,
                    rows,
                    x,
                    dy,
                    g,
                )
            }
            None => self.grad_weight_direct(x, dy, g),
        }
    }

    /// How a reduction over `units` terms splits into chunks of partial sums so that about
    /// GRAD_WEIGHT_INVOCATIONS invocations run when each chunk has `parallel` of them: the units
    /// per chunk and the number of chunks.
    fn chunks(&self, units: usize, parallel: usize) -> (usize, usize) {
        let limits = &self.context().adapter.limits;
        let max_chunks = limits.max_compute_workgroups_per_dimension as usize;
        let wanted = GRAD_WEIGHT_INVOCATIONS
            .div_ceil(parallel)
            .clamp(1, units.min(max_chunks));
        let per_chunk = units.div_ceil(wanted);
        (per_chunk, units.div_ceil(per_chunk))
    }

    /// Variant 2 of grad-weight: partial sums over chunks of `units`, each invocation one of
    /// `combos` for a block of output channels, by `entry`: `conv3d_grad_weight_blocked` (units:
    /// output rows (n, od, oh); combos: (c, td, th)) or `conv3d_grad_weight_rows` (units: (n, od,
    /// W block); combos: (c, td), every kh tap).
    #[allow(clippy::too_many_arguments)]
    fn grad_weight_blocked(
        &self,
        entry: &'static str,
        tiling: Tiling,
        combos: usize,
        units: usize,
        x: &GpuTensor,
        dy: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let wg = grad_weight_workgroup(combos);
        let channel_blocks = g.c_out.div_ceil(tiling.channels);
        let (per_chunk, chunks) = self.chunks(units, combos * channel_blocks);
        let mut params = ConvParams::new(g);
        params.rows_per_chunk = per_chunk as u32;
        let partial = self.empty(&Shape::from([chunks, g.weight_shape().numel()]))?;
        let grid = [
            combos.div_ceil(wg) as u32,
            chunks as u32,
            channel_blocks as u32,
        ];
        self.launch(
            &tiling.kernel(entry, g).with("WG", wg as f64),
            bytemuck::bytes_of(&params),
            &[(1, x), (2, dy)],
            &partial,
            grid,
        )?;
        self.sum_chunks(partial, g)
    }

    /// Partial sums of dw over chunks of the output rows (n, od), then their sum: the reduction
    /// over N Do Ho Wo terms is split until enough invocations run.
    fn grad_weight_direct(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<GpuTensor> {
        let weights = g.weight_shape().numel();
        let (rows_per_chunk, chunks) = self.chunks(g.batch * g.output[0], weights);
        let mut params = ConvParams::new(g);
        params.rows_per_chunk = rows_per_chunk as u32;
        let partial = self.conv_launch(
            Kernel::new(KernelFile::Conv, "conv3d_grad_weight_direct"),
            &params,
            &[(1, x), (2, dy)],
            &Shape::from([chunks, weights]),
        )?;
        self.sum_chunks(partial, g)
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
