//! Which kernel of kernels/conv.wgsl runs each primitive of one convolution: the one place the
//! choice is made, per geometry and variant. The header of kernels/conv.wgsl gives the same table
//! (entry point, primitive, condition); the launches in `super` follow the plan.

use super::super::kernels::{Kernel, KernelFile};
use metaseg_autograd::{Conv3dGeometry, ConvSpec};

/// The versions of the kernels, numbered as in the header of kernels/conv.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvVariant {
    /// 1: one result per invocation, straight from the definition.
    Direct,
    /// 2: register-blocked, `channels` output channels x `width` W positions per invocation of
    /// the forward kernel (at most Wo); the other blocked kernels take their own tilings (see
    /// [`ConvPlan::new`]). Where a blocked kernel's conditions do not hold the direct kernel of
    /// that primitive runs instead.
    ///
    /// With `staged` (variant 3), the forward kernel's workgroup first copies each input
    /// channel's weights for its channel block into workgroup memory and the invocations read
    /// them there: the tiling a real GPU may prefer, switched by an override constant, and
    /// measured slower on lavapipe (see kernels/conv.wgsl). It needs those weights to fit
    /// (kd x kh x kw x channels / 4 vec4s at most MAX_STAGED).
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

/// Invocations per workgroup of every kernel in conv.wgsl (their `WG` default).
pub(in crate::gpu) const WG: usize = 64;
/// Vec4s of one input row segment and vec4 accumulators, as MAX_SEGMENT and MAX_ACC in conv.wgsl.
pub(in crate::gpu) const MAX_SEGMENT: usize = 16;
pub(in crate::gpu) const MAX_ACC: usize = 32;
/// The forward's weight vec4s of one (c, td, th), as MAX_TAP_WEIGHTS in conv.wgsl: KW x KB / 4.
pub(in crate::gpu) const MAX_TAP_WEIGHTS: usize = 28;
/// W positions per unrolled loop nest of the forward kernel, as PART in conv.wgsl: the most the
/// other blocked kernels take.
pub(in crate::gpu) const PART: usize = 8;
/// Vec4 accumulators per kh tap of `conv3d_grad_weight_rows`, as ROW_ACC in conv.wgsl.
pub(in crate::gpu) const ROW_ACC: usize = 14;
/// Vec4s of the forward's staged weights, as MAX_STAGED in conv.wgsl.
pub(in crate::gpu) const MAX_STAGED: usize = 512;
/// Input channels per invocation of `conv3d_grad_input_patches`, at most.
const MAX_CHANNELS: usize = 16;

/// A blocked kernel's register tiling: channels and W positions per invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub channels: usize,
    pub width: usize,
    /// The forward's weights staged in workgroup memory (variant 3).
    pub staged: bool,
}

/// The forward's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// `conv3d_direct`.
    Direct,
    /// `conv3d_blocked`.
    Blocked(Tiling),
}

/// Grad-input's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradInput {
    /// `conv3d_grad_input_direct`.
    Direct,
    /// `conv3d_blocked` on `flipped`: at stride 1, grad-input is the forward of dy with the
    /// weight flipped in space and its channel axes swapped.
    Flipped {
        tiling: Tiling,
        flipped: Conv3dGeometry,
    },
    /// `conv3d_grad_input_patches`: the kernel's windows tile the input.
    Patches(Tiling),
    /// `conv3d_grad_input_blocked`: any stride.
    Blocked(Tiling),
}

/// Grad-weight's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWeight {
    /// `conv3d_grad_weight_direct`.
    Direct,
    /// `conv3d_grad_weight_rows`: kernels 3 tall, sliding down H.
    Rows(Tiling),
    /// `conv3d_grad_weight_blocked`.
    Blocked(Tiling),
}

/// How one convolution runs in one variant: the kernel of each primitive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub forward: Forward,
    pub grad_input: GradInput,
    pub grad_weight: GradWeight,
}

/// The tiling of `conv3d_grad_weight_rows`: 8 output channels (in two parts of 4) x 4 W
/// positions whatever the variant's own sizes; with 8 positions, or 8 channels in one loop nest,
/// it grew past what lavapipe unrolls and ran at a tenth of the speed (see conv.wgsl).
const ROWS: Tiling = Tiling {
    channels: 8,
    width: 4,
    staged: false,
};

impl ConvPlan {
    /// The plan of `g` in `variant`: each primitive's blocked kernels in order of preference,
    /// the first whose conditions hold, else its direct kernel. Variant 3 stages the weights of
    /// `conv3d_blocked` only (grad-input's flipped forward included).
    pub fn new(variant: ConvVariant, g: &Conv3dGeometry) -> ConvPlan {
        let ConvVariant::Blocked {
            channels,
            width,
            staged,
        } = variant
        else {
            return ConvPlan {
                forward: Forward::Direct,
                grad_input: GradInput::Direct,
                grad_weight: GradWeight::Direct,
            };
        };
        let asked = Tiling {
            channels,
            width,
            staged,
        };
        let unstaged = Tiling {
            staged: false,
            ..asked
        };
        let forward = forward_tiling(asked, g).map_or(Forward::Direct, Forward::Blocked);
        let flipped_forward = flipped(g).and_then(|f| Some((forward_tiling(asked, &f)?, f)));
        let grad_input = if let Some((tiling, flipped)) = flipped_forward {
            GradInput::Flipped { tiling, flipped }
        } else if let Some(tiling) = patches(g) {
            GradInput::Patches(tiling)
        } else if let Some(tiling) = any_stride(unstaged, g) {
            GradInput::Blocked(tiling)
        } else {
            GradInput::Direct
        };
        let grad_weight = if let Some(tiling) = rows(g) {
            GradWeight::Rows(tiling)
        } else if let Some(tiling) = weight_blocked(unstaged, g) {
            GradWeight::Blocked(tiling)
        } else {
            GradWeight::Direct
        };
        ConvPlan {
            forward,
            grad_input,
            grad_weight,
        }
    }

    /// The entry point of each primitive (forward, grad-input, grad-weight).
    pub fn entry_points(&self) -> [&'static str; 3] {
        [
            self.forward.entry_point(),
            self.grad_input.entry_point(),
            self.grad_weight.entry_point(),
        ]
    }

    /// The variant each primitive really runs, by number (1 where a blocked kernel's conditions
    /// fail, 2 for the blocked kernels that stage nothing).
    pub fn numbers(&self) -> [u32; 3] {
        let staged = |t: &Tiling| if t.staged { 3 } else { 2 };
        [
            match &self.forward {
                Forward::Direct => 1,
                Forward::Blocked(t) => staged(t),
            },
            match &self.grad_input {
                GradInput::Direct => 1,
                GradInput::Flipped { tiling, .. } => staged(tiling),
                GradInput::Patches(_) | GradInput::Blocked(_) => 2,
            },
            match self.grad_weight {
                GradWeight::Direct => 1,
                GradWeight::Rows(_) | GradWeight::Blocked(_) => 2,
            },
        ]
    }

    /// The kernels each primitive launches for `g`, with their override constants (grad-weight's
    /// partial sums are then summed by reduce.wgsl; the blocked kernels first arrange the weight).
    pub fn kernels(&self, g: &Conv3dGeometry) -> [Kernel; 3] {
        [
            self.forward.kernel(g),
            self.grad_input.kernel(g),
            self.grad_weight.kernel(g),
        ]
    }
}

impl Forward {
    pub fn entry_point(&self) -> &'static str {
        match self {
            Forward::Direct => "conv3d_direct",
            Forward::Blocked(_) => "conv3d_blocked",
        }
    }

    pub fn kernel(&self, g: &Conv3dGeometry) -> Kernel {
        match self {
            Forward::Direct => Kernel::new(KernelFile::Conv, self.entry_point()),
            Forward::Blocked(t) => t.kernel(self.entry_point(), g),
        }
    }
}

impl GradInput {
    pub fn entry_point(&self) -> &'static str {
        match self {
            GradInput::Direct => "conv3d_grad_input_direct",
            GradInput::Flipped { .. } => "conv3d_blocked",
            GradInput::Patches(_) => "conv3d_grad_input_patches",
            GradInput::Blocked(_) => "conv3d_grad_input_blocked",
        }
    }

    pub fn kernel(&self, g: &Conv3dGeometry) -> Kernel {
        let entry = self.entry_point();
        match self {
            GradInput::Direct => Kernel::new(KernelFile::Conv, entry),
            GradInput::Flipped { tiling, flipped } => tiling.kernel(entry, flipped),
            GradInput::Patches(t) | GradInput::Blocked(t) => t.kernel(entry, g),
        }
    }
}

impl GradWeight {
    pub fn entry_point(&self) -> &'static str {
        match self {
            GradWeight::Direct => "conv3d_grad_weight_direct",
            GradWeight::Rows(_) => "conv3d_grad_weight_rows",
            GradWeight::Blocked(_) => "conv3d_grad_weight_blocked",
        }
    }

    pub fn kernel(&self, g: &Conv3dGeometry) -> Kernel {
        match self {
            GradWeight::Direct => Kernel::new(KernelFile::Conv, self.entry_point()),
            GradWeight::Rows(t) | GradWeight::Blocked(t) => t
                .kernel(self.entry_point(), g)
                .with("WG", grad_weight_workgroup(self.combos(g)) as f64),
        }
    }

    /// What the blocked kernels' invocations own along the grid's x: (c, td) for the rows
    /// kernel (every kh tap), (c, td, th) for the blocked one.
    pub(super) fn combos(&self, g: &Conv3dGeometry) -> usize {
        match self {
            GradWeight::Rows(_) => g.c_in * g.kernel[0],
            _ => g.c_in * g.kernel[0] * g.kernel[1],
        }
    }

    /// The units of the reduction the chunks split: (n, od, W block) for the rows kernel, output
    /// rows (n, od, oh) for the others ((n, od) for the direct one).
    pub(super) fn units(&self, g: &Conv3dGeometry) -> usize {
        let [od, oh, ow] = g.output;
        match self {
            GradWeight::Rows(t) => g.batch * od * ow.div_ceil(t.width),
            GradWeight::Blocked(_) => g.batch * od * oh,
            GradWeight::Direct => g.batch * od,
        }
    }
}

/// The workgroup size of the blocked grad-weight kernels for `combos` invocations: the multiple
/// of 8 (lavapipe runs 8 lanes at once) up to `WG` that leaves the fewest idle lanes in the last
/// workgroup, the largest of those. Every lane of a workgroup reads the same dy, so an idle lane
/// costs as much as a working one: at 8 channels (72 combos) a power of two (64) ran 128 lanes for
/// 72 combos, 24 runs 72.
pub(super) fn grad_weight_workgroup(combos: usize) -> usize {
    (8..=WG)
        .step_by(8)
        .min_by_key(|&wg| (combos.div_ceil(wg) * wg, usize::MAX - wg))
        .expect("WG >= 8")
}

impl Tiling {
    /// This tiling for the kernels whose loop nests take at most PART W positions.
    fn narrow(self) -> Tiling {
        Tiling {
            width: self.width.min(PART),
            ..self
        }
    }

    /// The blocked kernel `entry` specialised for this tiling and the W axis of `g`.
    fn kernel(self, entry: &'static str, g: &Conv3dGeometry) -> Kernel {
        let kernel = Kernel::new(KernelFile::Conv, entry)
            .with("KB", self.channels as f64)
            .with("WB", self.width as f64)
            .with("KW", g.kernel[2] as f64)
            .with("SW", g.spec.stride[2] as f64)
            .with("PW", g.spec.padding[2] as f64)
            .with("DW", g.spec.dilation[2] as f64);
        if entry == "conv3d_blocked" {
            kernel.with("STAGED", f64::from(u8::from(self.staged)))
        } else {
            kernel
        }
    }
}

/// `conv3d_blocked`: the blocked kernels' common conditions, the weights of one (c, td, th) in
/// MAX_TAP_WEIGHTS registers, and staged weights within MAX_STAGED.
fn forward_tiling(asked: Tiling, g: &Conv3dGeometry) -> Option<Tiling> {
    let tiling = blocked(asked, g)?;
    let weights = g.kernel[2] * tiling.channels / 4;
    let staged = g.kernel.iter().product::<usize>() * tiling.channels / 4;
    (weights <= MAX_TAP_WEIGHTS && (!tiling.staged || staged <= MAX_STAGED)).then_some(tiling)
}

/// `conv3d_grad_weight_blocked`: the blocked kernels' common conditions, at most PART positions,
/// and KW x KB / 4 accumulators within MAX_ACC.
fn weight_blocked(asked: Tiling, g: &Conv3dGeometry) -> Option<Tiling> {
    let tiling = blocked(asked, g)?.narrow();
    (g.kernel[2] * tiling.channels / 4 <= MAX_ACC).then_some(tiling)
}

/// What every blocked kernel with the forward's blocking needs: W and Wo multiples of 4, the
/// input segment of `asked.width` (at most Wo) outputs within MAX_SEGMENT vec4s, and WB x KB / 4
/// accumulators within MAX_ACC.
fn blocked(asked: Tiling, g: &Conv3dGeometry) -> Option<Tiling> {
    let Tiling {
        channels,
        width,
        staged,
    } = asked;
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
        && segment <= MAX_SEGMENT;
    fits.then_some(Tiling {
        channels,
        width,
        staged,
    })
}

/// `conv3d_grad_weight_rows`: a kernel 3 tall with stride and dilation 1 along H, and the W axis
/// meeting `conv3d_blocked`'s conditions at the ROWS tiling.
fn rows(g: &Conv3dGeometry) -> Option<Tiling> {
    let tiling = blocked(ROWS, g)?;
    let tall = g.kernel[1] == 3 && g.spec.stride[1] == 1 && g.spec.dilation[1] == 1;
    (tall && g.kernel[2] * tiling.channels / 4 <= ROW_ACC).then_some(tiling)
}

/// `conv3d_grad_input_blocked` (grad-input at any stride): blocks of at most PART input columns
/// start at multiples of 4 x the stride, and the dy segment they read fits.
fn any_stride(asked: Tiling, g: &Conv3dGeometry) -> Option<Tiling> {
    let Tiling {
        channels, width, ..
    } = asked;
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

/// `conv3d_grad_input_patches`: the kernel's windows tile the input in disjoint patches (stride
/// = kernel, no padding or dilation, D = Do kd and so on) and the output rows split into blocks
/// of 8: 8 output columns (the KW x 8 input columns they feed) and as many input channels (a
/// multiple of 4, at most 16) as the accumulators hold, whatever the variant's own sizes (this
/// kernel's best differ, see conv.wgsl).
fn patches(g: &Conv3dGeometry) -> Option<Tiling> {
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
