//! The distance family on the GPU: launches of kernels/distance.wgsl for each primitive of
//! `metaseg_autograd::DistanceBackend`. An EDT is three passes (W, H, D) over one buffer; an SDF is
//! two EDTs (the mask and its complement), the per-sample extrema in two passes, and the
//! normalisation.

use super::backend::{backend_error, Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::distance::{check_spacing, sample_dims, volume_dims};
use metaseg_autograd::{DistanceBackend, Error, Result, Shape, TensorShape};

/// The uniform of kernels/distance.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct DistanceParams {
    pub(super) lines: u32,
    pub(super) len: u32,
    pub(super) inner: u32,
    pub(super) weight: f32,
    pub(super) infinity: f32,
    pub(super) voxels: u32,
    pub(super) groups: u32,
    pub(super) d: u32,
    pub(super) h: u32,
    pub(super) w: u32,
    pub(super) pad: [u32; 2],
}

/// Points of the longest line the FH pass handles along H and D (`MAX_LINE` in the kernel).
pub const MAX_LINE: usize = 512;
/// Invocations per workgroup of the line passes (the kernel's `WG` default): each holds envelope
/// arrays of 3 MAX_LINE words, so fewer than the usual 256.
pub(super) const LINE_WG: usize = 64;
/// Invocations per workgroup of the SDF kernels (a power of two: a tree reduction).
const SDF_WG: usize = 256;
/// Most workgroups per sample of the extrema reduction: each invocation then reduces
/// voxels / (64 * 256) values, and the combine pass reads at most 64 partials per sample.
const EXTREMA_GROUPS: usize = 64;

fn params() -> DistanceParams {
    DistanceParams {
        infinity: f32::INFINITY,
        ..DistanceParams::default()
    }
}

/// The FH pass keeps a whole line in per-invocation arrays of MAX_LINE entries.
fn check_line(op: &'static str, shape: &Shape, axis: &str, len: usize) -> Result<()> {
    if len <= MAX_LINE {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        op,
        message: format!(
            "shape {shape} has lines of {len} voxels along {axis}; the GPU kernel handles at \
             most {MAX_LINE} along D and H (any number along W)"
        ),
    })
}

impl Gpu {
    /// One launch of a line pass along an axis with `len` points `inner` apart, `lines` lines.
    fn line_pass(
        &self,
        kernel: Kernel,
        inputs: &[(u32, &GpuTensor)],
        out: &GpuTensor,
        (lines, len, inner): (usize, usize, usize),
        spacing: f64,
    ) -> Result<()> {
        let p = DistanceParams {
            lines: lines as u32,
            len: len as u32,
            inner: inner as u32,
            weight: (spacing * spacing) as f32,
            ..params()
        };
        let grid = self.grid(lines.div_ceil(LINE_WG));
        self.launch(&kernel, bytemuck::bytes_of(&p), inputs, out, grid)
    }

    /// The EDT of every [D, H, W] volume of `mask`; with `invert`, of its complement.
    fn edt_volumes(
        &self,
        op: &'static str,
        mask: &GpuTensor,
        spacing: [f64; 3],
        invert: bool,
    ) -> Result<GpuTensor> {
        check_spacing(op, spacing)?;
        let (volumes, [d, h, w]) = volume_dims(op, mask.shape())?;
        check_line(op, mask.shape(), "H", h)?;
        check_line(op, mask.shape(), "D", d)?;
        let out = self.empty(mask.shape())?;
        if mask.shape().numel() == 0 {
            return Ok(out);
        }
        let flag = |on: bool| f64::from(u8::from(on));
        let first =
            Kernel::new(KernelFile::Distance, "edt_first_axis").with("INVERT", flag(invert));
        let along_w = (volumes * d * h, w, 1);
        self.line_pass(first, &[(1, mask)], &out, along_w, spacing[2])?;
        let along_h = (volumes * d * w, h, w);
        let fh = Kernel::new(KernelFile::Distance, "edt_axis");
        self.line_pass(fh.clone().with("SQRT", 0.0), &[], &out, along_h, spacing[1])?;
        let along_d = (volumes * h * w, d, h * w);
        self.line_pass(fh.with("SQRT", 1.0), &[], &out, along_d, spacing[0])?;
        Ok(out)
    }

    /// Per sample: (min, max) of posdis and of negdis as [N, 4], in two passes (partials per
    /// chunk of a sample, then their combination).
    fn sdf_extrema(&self, posdis: &GpuTensor, negdis: &GpuTensor, n: usize) -> Result<GpuTensor> {
        let voxels = posdis.shape().numel() / n;
        let groups = voxels.div_ceil(SDF_WG).clamp(1, EXTREMA_GROUPS);
        let max = self
            .context()
            .adapter
            .limits
            .max_compute_workgroups_per_dimension as usize;
        if n > max {
            return Err(backend_error(format!(
                "sdf: a batch of {n} samples; the adapter dispatches at most {max} workgroups per \
                 dimension"
            )));
        }
        let p = DistanceParams {
            lines: n as u32,
            voxels: voxels as u32,
            groups: groups as u32,
            ..params()
        };
        let wg = ("WG", SDF_WG as f64);
        let partials = self.empty(&Shape::from([n, groups, 4]))?;
        let kernel = Kernel::new(KernelFile::Distance, "sdf_extrema").with(wg.0, wg.1);
        let inputs = [(2, posdis), (4, negdis)];
        let grid = [groups as u32, n as u32, 1];
        self.launch(&kernel, bytemuck::bytes_of(&p), &inputs, &partials, grid)?;
        let extrema = self.empty(&Shape::from([n, 4]))?;
        let kernel = Kernel::new(KernelFile::Distance, "sdf_extrema_combine").with(wg.0, wg.1);
        let grid = self.grid(n.div_ceil(SDF_WG));
        self.launch(
            &kernel,
            bytemuck::bytes_of(&p),
            &[(5, &partials)],
            &extrema,
            grid,
        )?;
        Ok(extrema)
    }
}

impl DistanceBackend for Gpu {
    fn edt(&self, mask: &GpuTensor, spacing: [f64; 3]) -> Result<GpuTensor> {
        self.edt_volumes("edt", mask, spacing, false)
    }

    fn sdf(&self, mask: &GpuTensor, spacing: [f64; 3]) -> Result<GpuTensor> {
        let (n, [d, h, w]) = sample_dims("sdf", mask.shape())?;
        let posdis = self.edt_volumes("sdf", mask, spacing, false)?;
        let negdis = self.edt_volumes("sdf", mask, spacing, true)?;
        let out = self.empty(mask.shape())?;
        if mask.shape().numel() == 0 {
            return Ok(out);
        }
        let extrema = self.sdf_extrema(&posdis, &negdis, n)?;
        let elements = mask.shape().numel();
        let p = DistanceParams {
            lines: elements as u32,
            voxels: (d * h * w) as u32,
            d: d as u32,
            h: h as u32,
            w: w as u32,
            ..params()
        };
        let kernel = Kernel::new(KernelFile::Distance, "sdf_normalise").with("WG", SDF_WG as f64);
        let inputs = [(1, mask), (2, &posdis), (4, &negdis), (5, &extrema)];
        let grid = self.grid(elements.div_ceil(SDF_WG));
        self.launch(&kernel, bytemuck::bytes_of(&p), &inputs, &out, grid)?;
        Ok(out)
    }
}
