//! Writing an output so that no reader ever sees it half-written: the bytes go to a temporary file
//! beside it, are flushed to the disk (so a full disk fails here, not later), and the file is then
//! renamed over the output (a rename within a directory is atomic). On any failure the temporary
//! file is removed and an earlier file of the output's name is left as it was.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Writes the file at `path`: `write` creates and fills the temporary path it is given (named
/// `metaseg-tmp-PID-N` + `extension` beside `path`, for writers that choose a format by the file's
/// extension); `io_error` turns a failure of the sync or rename into the caller's error.
pub fn write_file<E>(
    path: &Path,
    extension: &str,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io_error: impl FnOnce(io::Error) -> E,
) -> Result<(), E> {
    let tmp = temporary_path(path, extension);
    let written = write(&tmp).and_then(|()| finish(&tmp, path).map_err(io_error));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// [`write_file`] of bytes made by `fill` into a buffered writer (flushed here, errors included).
pub fn write_with<E>(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<std::fs::File>) -> io::Result<()>,
    io_error: impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let write = |tmp: &Path| -> io::Result<()> {
        let mut writer = io::BufWriter::new(std::fs::File::create(tmp)?);
        fill(&mut writer)?;
        io::Write::flush(&mut writer)
    };
    write_file(path, "", |tmp| write(tmp).map_err(&io_error), &io_error)
}

fn temporary_path(path: &Path, extension: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!("metaseg-tmp-{}-{n}{extension}", std::process::id()))
}

/// Flushes the temporary file to the disk, then renames it to `path`.
fn finish(tmp: &Path, path: &Path) -> io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("out.npy");
        std::fs::write(&path, b"old").unwrap();
        let failed = write_with(
            &path,
            |w| {
                io::Write::write_all(w, b"half")?;
                Err(io::Error::other("disk full"))
            },
            |e| e.to_string(),
        );
        assert_eq!(failed, Err("disk full".to_string()));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(files_in(dir.path()), ["out.npy"]);
        write_with(
            &path,
            |w| io::Write::write_all(w, b"new"),
            |e| e.to_string(),
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(files_in(dir.path()), ["out.npy"]);
    }
}
