//! The commands of `metaseg` that train and work on volumes, as library functions with their clap
//! arguments, so `main.rs` only dispatches to them.

pub mod evaluate;
pub mod predict;
pub mod train;

use std::path::Path;

/// Creates `dir` if needed and checks a file can be created in it, so a command that cannot write
/// its results fails before doing any work.
pub fn ensure_writable_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".metaseg-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}
