//! Errors of reading and writing volumes and data sets, each naming the file (or case) and what is
//! wrong with it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: file not found", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a NIfTI-1 file, or a header whose fields contradict each other.
    #[error("{}: not a valid NIfTI-1 file: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: truncated: {detail}", .path.display())]
    Truncated { path: PathBuf, detail: String },
    #[error("{}: unsupported NIfTI data type {name} (code {code}); use an integer or float type", .path.display())]
    UnsupportedType {
        path: PathBuf,
        code: i16,
        name: String,
    },
    /// A shape the reader does not take (5D+, header/image pairs, NIfTI-2) or the writer cannot store.
    #[error("{}: unsupported: {reason}", .path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: value {value} (voxel {index}) cannot be stored as {dtype}", .path.display())]
    OutOfRange {
        path: PathBuf,
        value: f32,
        index: usize,
        dtype: &'static str,
    },
    /// An image and its label (or a prediction and its reference) on different voxel grids.
    #[error("{} and {} are not on the same grid: {reason}", .image.display(), .label.display())]
    GridMismatch {
        image: PathBuf,
        label: PathBuf,
        reason: String,
    },
    #[error("{}: label value {value} is not one of the classes declared in dataset.json ({classes})", .path.display())]
    UndeclaredLabel {
        path: PathBuf,
        value: f32,
        classes: String,
    },
    #[error(
        "{}: label value {value} is beyond the {classes} classes in use (data.classes = {classes} \
         takes values 0 to {}); set data.classes to cover it",
        .path.display(), .classes.saturating_sub(1)
    )]
    LabelBeyondClasses {
        path: PathBuf,
        value: f32,
        classes: usize,
    },
    /// A NaN or infinite voxel in a volume read as input.
    #[error(
        "{}: voxel {voxel} is {value}; a volume must hold finite values (replace them first, \
         e.g. with numpy.nan_to_num)",
        .path.display()
    )]
    NonFinite {
        path: PathBuf,
        value: f32,
        voxel: String,
    },
    #[error("{}: {reason}", .path.display())]
    DatasetJson { path: PathBuf, reason: String },
    #[error("case '{case}': {} not found", .path.display())]
    MissingCase { case: String, path: PathBuf },
    #[error("split: {reason}")]
    Split { reason: String },
    /// A bad argument to a data function (sizes, crop boxes, generator settings).
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        DataError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}
