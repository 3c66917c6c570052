//! The GPU backend on wgpu: device and limits, the kernel registry, the buffer pool, timing.

mod backend;
mod context;
pub mod kernels;
pub mod pool;
pub mod profiler;

pub use backend::{Gpu, GpuTensor};
pub use context::{AdapterSummary, Binding, Context, DeviceError};
pub use kernels::{Access, Kernel, KernelFile};
pub use profiler::{Clock, KernelTime};
