//! The loss family on the GPU: launches of kernels/losses.wgsl for each primitive of
//! `metaseg_autograd::LossBackend`.

use super::backend::{backend_error, Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use super::split::{with_samples, Join};
use metaseg_autograd::losses::{
    channel_dims, cross_entropy_gradient_is_scalar, same_shape, voxel_shape,
};
use metaseg_autograd::{Backend, Error, LossBackend, Result, Shape, TensorShape};

/// The uniform of kernels/losses.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct LossParams {
    pub(super) n: u32,
    pub(super) s: u32,
    pub(super) chunk: u32,
    pub(super) decay: f32,
}

/// Invocations per workgroup (the kernels' `WG` default).
pub(super) const WG: usize = 256;
/// Classes `softmax_dice_sums` accumulates per invocation (`MAX_CLASSES` in the kernel).
pub(super) const MAX_CLASSES: usize = 16;
/// Workgroups of `softmax_dice_sums`: enough to fill a GPU, few enough that the partial sums
/// (3 C per invocation) are a few percent of the traffic.
const DICE_GROUPS: usize = 128;

/// The uniform of a tensor [N, C, S], and the kernel of `entry` specialised to its C classes.
fn launch_of(entry: &'static str, op: &'static str, shape: &Shape) -> Result<(LossParams, Kernel)> {
    let (n, c, s) = channel_dims(op, shape)?;
    let params = LossParams {
        n: n as u32,
        s: s as u32,
        chunk: 0,
        decay: 0.0,
    };
    let kernel = Kernel::new(KernelFile::Losses, entry)
        .with("CLASSES", c as f64)
        .with("ALIGNED", f64::from(u8::from(s.is_multiple_of(4))));
    Ok((params, kernel))
}

/// The per-class accumulators of the Dice kernels hold at most MAX_CLASSES classes.
fn check_dice_classes(shape: &Shape) -> Result<usize> {
    let (_, c, _) = channel_dims("softmax_dice", shape)?;
    if c > MAX_CLASSES {
        return Err(Error::InvalidArgument {
            op: "softmax_dice",
            message: format!("{c} classes; the GPU kernel handles at most {MAX_CLASSES}"),
        });
    }
    Ok(c)
}

impl Gpu {
    /// Kernel `entry` with one invocation per 4 voxels of `inputs[0]` ([N, C, S]), the inputs at
    /// their bindings; the output has `out_shape` (zeros when there are no voxels or classes).
    fn per_voxel(
        &self,
        entry: &'static str,
        op: &'static str,
        inputs: &[(u32, &GpuTensor)],
        out_shape: &Shape,
        constants: &[(&'static str, bool)],
    ) -> Result<GpuTensor> {
        let shape = inputs[0].1.shape();
        if let Some(y) = self.per_voxel_by_samples(entry, op, inputs, out_shape, constants)? {
            return Ok(y);
        }
        let (p, mut kernel) = launch_of(entry, op, shape)?;
        for &(name, on) in constants {
            kernel = kernel.with(name, f64::from(u8::from(on)));
        }
        if p.n * p.s == 0 || shape.dims()[1] == 0 {
            return self.fill(out_shape, 0.0);
        }
        let out = self.empty(out_shape)?;
        let grid = self.sample_grid(&p)?;
        self.launch(&kernel, bytemuck::bytes_of(&p), inputs, &out, grid)?;
        Ok(out)
    }

    /// `per_voxel` on ranges of the samples when a tensor exceeds one binding (`None` when all
    /// fit): the operands of z's shape or of its voxels' are split, the others (a scalar
    /// gradient, the Dice sums' gradient) bound whole.
    fn per_voxel_by_samples(
        &self,
        entry: &'static str,
        op: &'static str,
        inputs: &[(u32, &GpuTensor)],
        out_shape: &Shape,
        constants: &[(&'static str, bool)],
    ) -> Result<Option<GpuTensor>> {
        let z = inputs[0].1.shape();
        let voxels = voxel_shape(z);
        let along = |t: &GpuTensor| t.shape() == z || t.shape() == &voxels;
        let batched: Vec<&GpuTensor> = inputs
            .iter()
            .map(|&(_, t)| t)
            .filter(|t| along(t))
            .collect();
        self.by_samples(op, &batched, (out_shape, Join::Samples), |parts, n| {
            let mut parts = parts.iter();
            let inputs: Vec<(u32, &GpuTensor)> = inputs
                .iter()
                .map(|&(b, t)| (b, if along(t) { parts.next().unwrap() } else { t }))
                .collect();
            let out_shape = with_samples(out_shape, n);
            self.per_voxel(entry, op, &inputs, &out_shape, constants)
        })
    }

    /// Workgroups over the voxel quads (4 voxels per invocation) of a sample in x, y, and over the
    /// samples in z.
    fn sample_grid(&self, p: &LossParams) -> Result<[u32; 3]> {
        let max = self
            .context()
            .adapter
            .limits
            .max_compute_workgroups_per_dimension;
        if p.n > max {
            return Err(backend_error(format!(
                "a batch of {} samples; the adapter dispatches at most {max} workgroups per \
                 dimension",
                p.n
            )));
        }
        let [x, y, _] = self.grid((p.s as usize).div_ceil(4).div_ceil(WG));
        Ok([x, y, p.n])
    }
}

impl LossBackend for Gpu {
    fn softmax_channels(&self, x: &GpuTensor, log: bool) -> Result<GpuTensor> {
        let entry = "softmax_channels";
        self.per_voxel(entry, entry, &[(1, x)], x.shape(), &[("LOG", log)])
    }

    fn cross_entropy_voxels(&self, z: &GpuTensor, y: &GpuTensor) -> Result<GpuTensor> {
        same_shape("cross_entropy", z.shape(), y.shape())?;
        let out = voxel_shape(z.shape());
        self.per_voxel(
            "cross_entropy_voxels",
            "cross_entropy",
            &[(1, z), (2, y)],
            &out,
            &[],
        )
    }

    fn cross_entropy_backward(
        &self,
        z: &GpuTensor,
        y: &GpuTensor,
        g: &GpuTensor,
    ) -> Result<GpuTensor> {
        same_shape("cross_entropy", z.shape(), y.shape())?;
        let scalar = cross_entropy_gradient_is_scalar(z.shape(), g.shape())?;
        let inputs = [(1, z), (2, y), (4, g)];
        let constants = [("G_SCALAR", scalar)];
        let (entry, op) = ("cross_entropy_backward", "cross_entropy");
        self.per_voxel(entry, op, &inputs, z.shape(), &constants)
    }

    fn bce_with_logits_voxels(&self, z: &GpuTensor, y: &GpuTensor) -> Result<GpuTensor> {
        same_shape("binary_cross_entropy", z.shape(), y.shape())?;
        let out = voxel_shape(z.shape());
        let (entry, op) = ("bce_with_logits_voxels", "binary_cross_entropy");
        self.per_voxel(entry, op, &[(1, z), (2, y)], &out, &[])
    }

    fn softmax_dice_sums(&self, z: &GpuTensor, y: &GpuTensor, squared: bool) -> Result<GpuTensor> {
        same_shape("softmax_dice", z.shape(), y.shape())?;
        let c = check_dice_classes(z.shape())?;
        let (mut p, kernel) = launch_of("softmax_dice_sums", "softmax_dice", z.shape())?;
        let kernel = kernel.with("SQUARED", f64::from(u8::from(squared)));
        let voxels = (p.n * p.s) as usize;
        if voxels == 0 || c == 0 {
            return self.fill(&Shape::from([3, c]), 0.0);
        }
        // Sums over the samples: the ranges' sums add up.
        let result = (&Shape::from([3, c]), Join::Sum);
        let split = self.by_samples("softmax_dice", &[z, y], result, |p, _| {
            self.softmax_dice_sums(&p[0], &p[1], squared)
        })?;
        if let Some(sums) = split {
            return Ok(sums);
        }
        let groups = (p.s as usize).div_ceil(4).div_ceil(WG).min(DICE_GROUPS);
        p.chunk = (groups * WG) as u32;
        let partials = self.empty(&Shape::from([3 * c, groups * WG]))?;
        let grid = self.grid(groups);
        self.launch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[(1, z), (2, y)],
            &partials,
            grid,
        )?;
        let total = self.sum_axes(&partials, &[1])?;
        self.reshape(&total, &Shape::from([3, c]))
    }

    fn softmax_dice_backward(
        &self,
        z: &GpuTensor,
        y: &GpuTensor,
        d_sums: &GpuTensor,
        squared: bool,
    ) -> Result<GpuTensor> {
        same_shape("softmax_dice", z.shape(), y.shape())?;
        let c = check_dice_classes(z.shape())?;
        if d_sums.shape() != &Shape::from([3, c]) {
            return Err(Error::Shape {
                op: "softmax_dice_backward",
                lhs: z.shape().clone(),
                rhs: d_sums.shape().clone(),
                reason: "the gradient of the sums must be [3, C]".into(),
            });
        }
        let inputs = [(1, z), (2, y), (4, d_sums)];
        let (entry, squared) = ("softmax_dice_backward", [("SQUARED", squared)]);
        self.per_voxel(entry, "softmax_dice", &inputs, z.shape(), &squared)
    }

    fn ema(&self, teacher: &GpuTensor, student: &GpuTensor, decay: f64) -> Result<GpuTensor> {
        if teacher.shape() != student.shape() {
            return Err(backend_error(format!(
                "ema: teacher {} and student {} differ in shape",
                teacher.shape(),
                student.shape()
            )));
        }
        // Elementwise: a store larger than one binding runs in ranges of elements.
        let out = self.empty(teacher.shape())?;
        let ranges = self.flat_ranges(teacher.shape().numel());
        if ranges.len() > 1 {
            self.context().note_split("ema");
        }
        let kernel = Kernel::new(KernelFile::Losses, "ema");
        for r in ranges {
            let part = |t: &GpuTensor| t.view(r.start, Shape::from([r.len()]));
            let p = LossParams {
                n: r.len() as u32,
                s: 0,
                chunk: 0,
                decay: decay as f32,
            };
            let grid = self.grid(r.len().div_ceil(4).div_ceil(WG).max(1));
            let (t, s, o) = (part(teacher), part(student), part(&out));
            self.launch(
                &kernel,
                bytemuck::bytes_of(&p),
                &[(1, &t), (2, &s)],
                &o,
                grid,
            )?;
        }
        Ok(out)
    }
}
