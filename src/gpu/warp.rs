//! Affine warps and their adjoints on the GPU (kernels/warp.wgsl).

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::{Error, Interp, Result, Shape, TensorShape, Warp, WarpBackend};

/// Invocations per workgroup (the `WG` override default of warp.wgsl).
pub(super) const WG: usize = 256;

/// Added to the adjoint box's half-extents: covers the f32 rounding of its centre (about 1e-5 of
/// a voxel at the sizes in use) many times over; a candidate too many only costs a loop trip.
const BOX_MARGIN: f64 = 0.01;

/// The uniform of warp.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct WarpParams {
    pub(super) rows: [[f32; 4]; 3],
    pub(super) inverse: [[f32; 4]; 3],
    pub(super) reach: [f32; 4],
    pub(super) src: [u32; 4],
    pub(super) dst: [u32; 4],
}

fn rows(matrix: &[[f64; 4]; 3]) -> [[f32; 4]; 3] {
    matrix.map(|row| row.map(|v| v as f32))
}

fn params(warp: &Warp, volumes: usize, written: usize, inverse: Option<&Warp>) -> WarpParams {
    let (inverse, reach) = match inverse {
        // The cube (i - 1, i + 1)^3 maps into the box of half-extent sum_j |M^-1_kj| along k.
        Some(inv) => {
            let reach = inv
                .matrix
                .map(|r| (r[0].abs() + r[1].abs() + r[2].abs()) as f32);
            let margin = BOX_MARGIN as f32;
            (
                rows(&inv.matrix),
                [reach[0] + margin, reach[1] + margin, reach[2] + margin, 0.0],
            )
        }
        None => ([[0.0; 4]; 3], [0.0; 4]),
    };
    let size = |s: [usize; 3], last: usize| [s[0] as u32, s[1] as u32, s[2] as u32, last as u32];
    WarpParams {
        rows: rows(&warp.matrix),
        inverse,
        reach,
        src: size(warp.input, volumes),
        dst: size(warp.output, written),
    }
}

impl Gpu {
    fn warp_launch(
        &self,
        entry: &'static str,
        params: &WarpParams,
        interp: Interp,
        input: &GpuTensor,
        out: &Shape,
    ) -> Result<GpuTensor> {
        let result = self.empty(out)?;
        let grid = self.grid(out.numel().div_ceil(WG));
        let nearest = if interp == Interp::Nearest { 1.0 } else { 0.0 };
        let kernel = Kernel::new(KernelFile::Warp, entry).with("NEAREST", nearest);
        self.launch(
            &kernel,
            bytemuck::bytes_of(params),
            &[(1, input)],
            &result,
            grid,
        )?;
        Ok(result)
    }
}

fn too_large(op: &'static str, shape: &Shape) -> Result<()> {
    if shape.numel() >= u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op,
            message: format!("shape {shape} has too many elements for 32-bit indices"),
        });
    }
    Ok(())
}

impl WarpBackend for Gpu {
    fn warp(&self, x: &GpuTensor, warp: &Warp) -> Result<GpuTensor> {
        let out = warp.output_shape(x.shape())?;
        too_large("warp", &out)?;
        let volumes = out.dims()[0] * out.dims()[1];
        let p = params(warp, volumes, out.numel(), None);
        self.warp_launch("warp", &p, warp.interp, x, &out)
    }

    fn warp_adjoint(&self, g: &GpuTensor, warp: &Warp) -> Result<GpuTensor> {
        let out = warp.adjoint_shape(g.shape())?;
        too_large("warp_adjoint", &out)?;
        // The gather goes through the inverse map; a singular matrix has none.
        let inverse = warp.try_inverse().map_err(|e| Error::InvalidArgument {
            op: "warp_adjoint",
            message: format!("{e}: the GPU adjoint needs the inverse map"),
        })?;
        let volumes = out.dims()[0] * out.dims()[1];
        let p = params(warp, volumes, out.numel(), Some(&inverse));
        self.warp_launch("warp_adjoint", &p, warp.interp, g, &out)
    }
}
