//! Training: configurations and presets, two-stream batches, the methods' steps, the run loop
//! with its log and checkpoints.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod run;
pub mod trainer;
