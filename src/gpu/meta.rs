//! MLB-Seg's weight normalisation on the GPU: the two launches of kernels/meta_weights.wgsl.

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use metaseg_autograd::meta::{MetaBackend, Normalization};
use metaseg_autograd::{Backend, Result, Shape, TensorShape};

/// The kernel's workgroup size and number of partial sums (its constants WG and GROUPS).
const WG: usize = 256;
const GROUPS: usize = 256;

fn kernel(entry: &'static str, normalization: Normalization) -> Kernel {
    let code = match normalization {
        Normalization::Clip => 0,
        Normalization::Softmax => 1,
        Normalization::Sigmoid => 2,
        Normalization::Hard => 3,
    };
    Kernel::new(KernelFile::MetaWeights, entry)
        .with("NORM", f64::from(code))
        .with("EPS", normalization.eps())
}

impl MetaBackend for Gpu {
    fn meta_weights(&self, g: &GpuTensor, normalization: Normalization) -> Result<GpuTensor> {
        let n = g.shape().numel();
        if n == 0 {
            return self.fill(g.shape(), 0.0);
        }
        // The uniform's one field, padded to the 16 bytes uniform buffers are laid out in.
        let params: [u8; 16] = bytemuck::cast([n as u32, 0, 0, 0]);
        let partials = self.empty(&Shape::from([2 * GROUPS]))?;
        let reduce = kernel("meta_weight_partials", normalization);
        self.launch(
            &reduce,
            &params,
            &[(1, g)],
            &partials,
            [GROUPS as u32, 1, 1],
        )?;
        let out = self.empty(g.shape())?;
        let normalize = kernel("meta_weights_normalize", normalization);
        let grid = self.grid(n.div_ceil(WG));
        self.launch(&normalize, &params, &[(1, g), (2, &partials)], &out, grid)?;
        Ok(out)
    }
}
