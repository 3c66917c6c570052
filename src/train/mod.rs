//! Training: configurations and presets, two-stream batches, the methods' steps, the run loop
//! with its log and checkpoints.

pub mod augment;
pub mod batch;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod dtml;
pub mod ideal;
pub mod local_contrastive;
pub mod mlb_seg;
pub mod online_pl;
pub mod profile;
pub mod pseudo_labels;
pub mod run;
pub mod stages;
pub mod trainer;
