//! Evaluation: sliding-window inference over whole volumes and post-processing.

pub mod inference;

pub use inference::{argmax, largest_component, predict_probabilities, SlidingWindow};
