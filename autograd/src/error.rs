use crate::Shape;

/// Everything that can go wrong in an op, named after the op that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shapes {lhs} and {rhs}: {reason}")]
    Shape {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
        reason: String,
    },
    #[error("{op}: {message}")]
    InvalidArgument { op: &'static str, message: String },
    #[error("{op} has no backward rule, so no gradient can flow through it")]
    NoGradient { op: &'static str },
    #[error(
        "{op} has only a first-order backward rule; it cannot be differentiated with create_graph"
    )]
    NoSecondOrder { op: &'static str },
    #[error("{op} has no forward-mode rule, so no tangent can flow through it")]
    NoForwardMode { op: &'static str },
    #[error("{backend} backend: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
