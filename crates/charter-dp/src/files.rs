//! The data dir's small files and the one way they are written: atomically (temp file in
//! the same directory, write, fsync, rename, fsync the directory), mode 0600. A crash at
//! any moment leaves the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use charter_license::UnixTime;
use uuid::Uuid;

/// The node id file: a UUID v4, made on first start.
pub const NODE_ID_FILE: &str = "node-id";
/// The clock high-water mark file: Unix seconds, the latest time this node has seen.
pub const CLOCK_MARK_FILE: &str = "clock-mark";
/// The directory in the data dir where new file contents are staged before the rename.
pub const STAGING_DIR: &str = ".tmp";

/// A data-dir file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The operating system refused a read or a write.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "reading", "creating the data dir").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The node id file holds something else than a UUID.
    #[error("{} does not hold a node id (a UUID): found `{found}`; restore it, or delete it to give this node a new identity", path.display())]
    BadNodeId {
        /// The file.
        path: PathBuf,
        /// Its first characters.
        found: String,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the data dir (mode 0700) when it does not exist.
pub fn create_data_dir(dir: &Path) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_error("creating the data dir", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_error("restricting the data dir", dir))
}

/// Replaces `dir/name` with `contents` atomically and durably, mode 0600.
///
/// The new contents are staged in `dir/.tmp/` (same file system, so the rename is atomic)
/// rather than next to the target: a crash mid-write then never leaves a half-written
/// file among the data dir's files for an operator or a tool to mistake for the real one.
/// The staging file has a fixed name per target, so one left by a crash is simply
/// overwritten by the next write; one writer per file is expected (one process per data
/// dir, one task per file).
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<(), FileError> {
    let target = dir.join(name);
    let staging = dir.join(STAGING_DIR);
    if !staging.is_dir() {
        fs::create_dir_all(&staging).map_err(io_error("creating", &staging))?;
        fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
            .map_err(io_error("restricting", &staging))?;
    }
    let temp = staging.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("creating", &temp))?;
    // `mode` only applies when the file is created; a leftover temp file keeps its own.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_error("restricting", &temp))?;
    file.write_all(contents)
        .map_err(io_error("writing", &temp))?;
    file.sync_all().map_err(io_error("syncing", &temp))?;
    drop(file);
    fs::rename(&temp, &target).map_err(io_error("renaming into place", &target))?;
    // The rename is only durable once the target directory's entry is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing the directory", dir))
}

/// Reads a data-dir file, `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

/// The node id from the data dir, made (UUID v4) and persisted on first start.
pub fn node_id(dir: &Path) -> Result<Uuid, FileError> {
    let path = dir.join(NODE_ID_FILE);
    if let Some(text) = read_optional(&path)? {
        return Uuid::parse_str(text.trim()).map_err(|_| FileError::BadNodeId {
            found: text.trim().chars().take(40).collect(),
            path,
        });
    }
    let id = Uuid::new_v4();
    write_atomic(dir, NODE_ID_FILE, format!("{id}\n").as_bytes())?;
    tracing::info!(node_id = %id, path = %path.display(), "new node id made for this data plane");
    Ok(id)
}

/// The persisted clock mark, or `None` when there is none. A mark that does not parse is
/// reported and ignored (the node then starts from its wall clock).
pub fn read_clock_mark(dir: &Path) -> Result<Option<UnixTime>, FileError> {
    let path = dir.join(CLOCK_MARK_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    match text.trim().parse::<UnixTime>() {
        Ok(mark) => Ok(Some(mark)),
        Err(_) => {
            tracing::warn!(path = %path.display(), "the clock mark file does not hold Unix seconds; ignoring it");
            Ok(None)
        }
    }
}

/// Persists the clock mark.
pub fn write_clock_mark(dir: &Path, mark: UnixTime) -> Result<(), FileError> {
    write_atomic(dir, CLOCK_MARK_FILE, format!("{mark}\n").as_bytes())
}
