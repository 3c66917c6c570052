//! The commands of `metaseg` that work on volumes, as library functions with their clap
//! arguments, so `main.rs` only dispatches to them.

pub mod evaluate;
pub mod predict;
