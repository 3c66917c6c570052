//! Training: checkpoints now; the loop, batches and methods build on them.

pub mod batch;
pub mod checkpoint;
