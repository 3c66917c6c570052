//! MLB-Seg (Wei et al., MICCAI 2023; METHODS.md, section 1): meta-learning per-voxel weights of
//! two label sources for the unlabeled cases, their initial labels and labels enhanced by the
//! consistency of several views, through a one-step look-ahead on the labeled cases.
//!
//! - [`stages`]: stage 0 (supervised on the labeled cases, then the initial labels of every
//!   unlabeled case written as NIfTI) and the main stage, with resumption across both.
//! - [`views`]: the K = 5 views of pseudo-label enhancement, y_ple and L_cons.
//! - [`step`]: one iteration: the meta step, the weighted real update, the supervised step on the
//!   meta batch.

pub mod stages;
pub mod step;
pub mod views;

pub use step::step;
