//! The commands of `metaseg` that train and work on volumes, as library functions with their clap
//! arguments, so `main.rs` only dispatches to them.

pub mod evaluate;
pub mod predict;
pub mod train;

use std::path::{Path, PathBuf};

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

/// A private XDG_RUNTIME_DIR, removed when dropped. Mesa's EGL probes Wayland when the GPU is
/// opened, and libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment." unless the variable holds an absolute path: on a machine without a desktop
/// session that was the first line of every command's output.
pub struct RuntimeDir(Option<PathBuf>);

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Gives the process a private runtime directory (mode 0700, in the temporary directory) when
/// XDG_RUNTIME_DIR is unset or not an absolute path to a directory. Call it before any thread is
/// started, as it sets the environment.
pub fn ensure_runtime_dir() -> RuntimeDir {
    let current = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    if current.is_some_and(|dir| dir.is_absolute() && dir.is_dir()) {
        return RuntimeDir(None);
    }
    let dir = std::env::temp_dir().join(format!("metaseg-runtime-{}", std::process::id()));
    let mut builder = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    match builder.create(&dir) {
        Ok(()) => {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
            RuntimeDir(Some(dir))
        }
        // Left as it was: the worst outcome is Mesa's warning.
        Err(_) => RuntimeDir(None),
    }
}
