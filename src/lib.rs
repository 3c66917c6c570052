//! metaseg: WGSL compute kernels through wgpu, the backend that runs them, and (later) the networks,
//! methods and tools of semi-supervised medical image segmentation built on them.

pub mod gpu;

pub mod atomic;
pub mod cli;
pub mod data;

pub mod error;
pub mod eval;
pub mod meta;
pub mod nn;
pub mod npy;
pub mod optim;
pub mod report;
pub mod runner;
pub mod train;
