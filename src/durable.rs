//! Durable file writes: the one place that knows how a file and the folder
//! entry naming it survive a power cut (write under a temporary name,
//! fdatasync, rename or link into place, fsync the folders). The spool's
//! instances and the pipeline's outputs both go through it.
//!
//! A leaf: imports nothing from the crate.

use std::io;
use std::path::Path;

/// fsync a folder, so that the entries created or renamed in it are durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsync `dir` and the `above` folders over it: the entries of folders a
/// write has just created must be durable in their own parents too.
pub fn sync_dir_and_parents(dir: &Path, above: usize) -> io::Result<()> {
    for d in dir.ancestors().take(above + 1) {
        sync_dir(d)?;
    }
    Ok(())
}

/// Write `path` durably except for its folder entry: `write` fills a
/// temporary file beside it (`<path>.part`), which is fdatasync'd (its size
/// is data too) and renamed over `path`. The caller fsyncs the folder once
/// for all the files it writes there ([`sync_dir_and_parents`]).
pub fn write_file_synced(
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = path.with_extension("part");
    let result = write(&tmp)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_data())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
