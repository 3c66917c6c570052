//! Evaluation: sliding-window inference over whole volumes and post-processing, segmentation
//! metrics, and a trained network loaded from its checkpoint for prediction.

pub mod inference;
pub mod metrics;
pub mod trained;

pub use inference::{argmax, largest_component, predict_probabilities, SlidingWindow};
pub use metrics::{class_metrics, Grid, Metrics};
