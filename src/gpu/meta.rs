//! MLB-Seg's weight normalisation on the GPU: the two launches of kernels/meta_weights.wgsl.

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::meta::{MetaBackend, Normalization};
use metaseg_autograd::{Backend, Result, Shape, TensorShape};

/// The uniform of kernels/meta_weights.wgsl (`Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct MetaWeightsParams {
    pub(super) n: u32,
}

/// The kernel's workgroup size and number of partial sums (its constants WG and GROUPS).
pub(super) const WG: usize = 256;
pub(super) const GROUPS: usize = 256;

/// The kernel's NORM for `normalization` (its NORM_ constants).
pub(super) fn norm_code(normalization: Normalization) -> u32 {
    match normalization {
        Normalization::Clip => 0,
        Normalization::Softmax => 1,
        Normalization::Sigmoid => 2,
        Normalization::Hard => 3,
    }
}

fn kernel(entry: &'static str, normalization: Normalization) -> Kernel {
    Kernel::new(KernelFile::MetaWeights, entry)
        .with("NORM", f64::from(norm_code(normalization)))
        .with("EPS", normalization.eps())
}

impl MetaBackend for Gpu {
    fn meta_weights(&self, g: &GpuTensor, normalization: Normalization) -> Result<GpuTensor> {
        let n = g.shape().numel();
        if n == 0 {
            return self.fill(g.shape(), 0.0);
        }
        let params = MetaWeightsParams { n: n as u32 };
        let params = bytemuck::bytes_of(&params);
        let partials = self.empty(&Shape::from([2 * GROUPS]))?;
        let reduce = kernel("meta_weight_partials", normalization);
        self.launch(&reduce, params, &[(1, g)], &partials, [GROUPS as u32, 1, 1])?;
        let out = self.empty(g.shape())?;
        let normalize = kernel("meta_weights_normalize", normalization);
        let grid = self.grid(n.div_ceil(WG));
        self.launch(&normalize, params, &[(1, g), (2, &partials)], &out, grid)?;
        Ok(out)
    }
}
