//! Volumes and data sets: NIfTI files, the Medical Segmentation Decathlon layout and its splits,
//! preprocessing (z-score, crop to the foreground and back), and the embedded synthetic data set.

pub mod draw;
pub mod error;
pub mod msd;
pub mod nifti;
pub mod preprocess;
pub mod synthetic;

pub use draw::LabeledDraw;
pub use error::{DataError, Result};
pub use msd::{Case, DatasetInfo, Msd, Split, SplitFile, SplitSpec};
pub use nifti::{Dtype, Volume};
pub use preprocess::{Clip, CropBox};
pub use synthetic::{SyntheticCase, SyntheticConfig};
