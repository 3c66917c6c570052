//! Errors of the user-facing tools (reading arrays, running an op by name), each saying what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: file not found", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid .npy file: {reason}", .path.display())]
    MalformedNpy { path: PathBuf, reason: String },
    #[error("{}: Fortran-order arrays are not supported; save a C-order copy (np.ascontiguousarray)", .path.display())]
    FortranOrder { path: PathBuf },
    #[error("{}: unsupported dtype {dtype}; use float32, float64, an integer type or bool", .path.display())]
    UnsupportedDtype { path: PathBuf, dtype: String },
    #[error("unknown op '{name}'; known ops: {}", crate::runner::op_names().join(", "))]
    UnknownOp { name: String },
    /// A call the op cannot take: a missing or unknown input or setting.
    #[error("{op}: {message}")]
    Op { op: &'static str, message: String },
    #[error("setting '{setting}': {message}")]
    Setting { setting: String, message: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Autograd(#[from] metaseg_autograd::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
