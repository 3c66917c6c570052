//! The GPU backend on wgpu: device and limits, the kernel registry, the buffer pool, timing.
//!
//! A kernel family is a WGSL file in `kernels/` (registered in `KernelFile`), its launches as methods
//! of `Gpu` in a module of its own here (using `Gpu::empty`, `Gpu::launch`, `Gpu::grid`), and its
//! primitives in the backend trait the autograd crate defines for it.

mod backend;
mod context;
#[cfg(test)]
mod contract;
mod contrastive;
mod conv;
pub mod denormals;
mod distance;
pub mod kernels;
mod layers;
mod losses;
mod meta;
pub mod pool;
pub mod profiler;
mod split;
mod warp;

pub use backend::{Gpu, GpuTensor};
pub use context::{AdapterSummary, Binding, Context, DeviceError, MAX_BINDING_ENV};
pub use conv::{ConvPlan, ConvVariant, Forward, GradInput, GradWeight, Tiling};
pub use distance::MAX_LINE;
pub use kernels::{Access, Kernel, KernelFile};
pub use profiler::{Clock, KernelTime};
