//! Small file helpers: reading with context, and writing secrets atomically with mode 0600.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Reads a whole text file, naming it in the error.
pub fn read(path: &Path, what: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// Refuses to overwrite existing files unless `force` is set.
pub fn check_absent(paths: &[&Path], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    for path in paths {
        if path.exists() {
            bail!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename) with the given mode,
/// so a reader never sees a half-written key and a secret is never readable by others.
pub fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Creates a directory (and its parents) if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))
}
