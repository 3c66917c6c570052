//! Training: configurations and presets, two-stream batches, the training methods (one registry,
//! one type each: [`methods`]), the networks they train ([`network`]), the run loop with its log
//! and checkpoints ([`run`], [`checkpoint`]).

pub mod augment;
pub mod batch;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod methods;
pub mod network;
pub mod profile;
pub mod pseudo_labels;
pub mod run;
pub mod trainer;
