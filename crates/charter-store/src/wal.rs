//! The store's write-ahead log: what makes a write durable before it is acknowledged.
//!
//! sled 0.34 can only make a write durable by flushing its whole log, which it hands to a
//! thread pool and which waits on `sync_file_range` before our `fdatasync`: two device
//! round trips and two thread hand-offs per write. So each durable write is appended here
//! first, as the exact key/value changes it makes, and `fdatasync`ed, and only then applied
//! to sled. The store makes sled durable only at a checkpoint (when this log is full, after
//! a failed append, on open and on a clean close); sled's own background flush writes it
//! out meanwhile, with no guarantee the store relies on.
//!
//! # Format
//!
//! One file of fixed size, [`WAL_FILE`], written full of zeros when it is made, so an
//! append overwrites blocks the file already has: `fdatasync` then writes the record and
//! flushes the device cache, with no file-system metadata to commit (the size and the block
//! map do not change).
//!
//! - A header in the first [`HEADER_LEN`] bytes: `MAGIC`, the generation (`u64` LE) and a
//!   CRC-32 of both.
//! - From [`HEADER_LEN`] on, records back to back: generation (`u64`), LSN (`u64`), body
//!   length (`u32`), CRC-32 of those three and the body (`u32`), then the body: the
//!   operations, each a tree tag (`u8`), a kind (`u8`: 0 remove, 1 insert), the key
//!   (`u32` length, bytes) and for an insert the value (`u32` length, bytes).
//!
//! A checkpoint makes sled durable and then moves the header to the next generation, which
//! makes every record in the file obsolete at once: reading stops at the first record that
//! is not of the header's generation, does not check, or does not fit, which is also where
//! a write torn by a crash ends the log.
//!
//! A corrupt record followed by intact records of the current generation is not a torn end
//! but damage in the middle of the log: reading it fails, naming the offset, rather than
//! dropping the acknowledged writes behind it.
//!
//! # Replay
//!
//! On open, every record of the current generation is applied again, in order. Each was
//! logged after the checkpoint that started the generation, which made everything before it
//! durable in sled, and its operations are absolute (set this key to these bytes, remove
//! that key), so applying the whole generation in order gives every key it touches its
//! value after the last acknowledged write, whatever part of it sled kept. (Only records
//! above sled's `meta/wal_lsn` would be needed if sled always recovered a prefix of its own
//! log; after a power cut it need not, so nothing is skipped.) Nothing reaches sled without
//! a record first, so sled never holds a change the log lacks.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sled::IVec;

use crate::StoreError;

/// The log's file name in the data directory.
pub(crate) const WAL_FILE: &str = "charter.wal";
/// Where records start; the header has the first block to itself.
pub(crate) const HEADER_LEN: u64 = 4096;
/// The log's size: about 2 500 license writes between checkpoints.
pub(crate) const DEFAULT_CAPACITY: u64 = 4 << 20;

const MAGIC: &[u8; 8] = b"CHWAL\x00\x00\x01";
/// generation, LSN, body length, CRC.
const RECORD_HEAD_LEN: usize = 8 + 8 + 4 + 4;

/// The trees an operation can name. Inventory (`data_planes`) is soft state and never
/// logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TreeTag {
    Licenses = 0,
    Checksums = 1,
    Meta = 2,
    Usage = 3,
}

impl TreeTag {
    fn from_byte(byte: u8) -> Option<TreeTag> {
        Some(match byte {
            0 => TreeTag::Licenses,
            1 => TreeTag::Checksums,
            2 => TreeTag::Meta,
            3 => TreeTag::Usage,
            _ => return None,
        })
    }
}

/// One change a write makes: `value` `None` removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Op {
    pub(crate) tree: TreeTag,
    pub(crate) key: IVec,
    pub(crate) value: Option<IVec>,
}

/// One logged write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) lsn: u64,
    pub(crate) ops: Vec<Op>,
}

/// What [`Wal::append`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Appended {
    /// The record is durable.
    Durable,
    /// The record does not fit in what is left of the log, or the log is broken; nothing
    /// was written. After a checkpoint it fits, unless it is larger than
    /// [`Wal::max_record`].
    Full,
}

/// The open log, positioned after its last record.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where the next record goes.
    end: u64,
    capacity: u64,
    /// Set when an append failed: what reached the file is unknown, so nothing more may be
    /// appended until a checkpoint starts a new generation.
    broken: bool,
}

impl Wal {
    /// Makes a fresh, empty log of `capacity` bytes in `dir`, replacing any there: written
    /// to a temporary file, fsynced, renamed over [`WAL_FILE`], and the directory fsynced.
    /// Call only when nothing in the old log is needed any more.
    pub(crate) fn create(dir: &Path, capacity: u64) -> Result<Wal, StoreError> {
        let path = dir.join(WAL_FILE);
        let temp = dir.join(format!("{WAL_FILE}.new"));
        let io = |what: &str, path: &Path| {
            let context = format!("{what} {}", path.display());
            move |source| StoreError::Io { context, source }
        };
        let generation = 1;
        let mut file = File::create(&temp).map_err(io("creating", &temp))?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = capacity.max(HEADER_LEN);
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            // n <= 1 MiB, so the cast cannot truncate.
            file.write_all(&zeros[..n as usize])
                .map_err(io("zero-filling", &temp))?;
            left -= n;
        }
        file.write_all_at(&header(generation), 0)
            .map_err(io("writing the header of", &temp))?;
        file.sync_all().map_err(io("fsyncing", &temp))?;
        std::fs::rename(&temp, &path).map_err(io("renaming into place", &path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsyncing", dir))?;
        Ok(Wal {
            file,
            path,
            generation,
            end: HEADER_LEN,
            capacity: capacity.max(HEADER_LEN),
            broken: false,
        })
    }

    /// The largest record an empty log holds.
    pub(crate) fn max_record(&self) -> u64 {
        self.capacity - HEADER_LEN
    }

    /// Appends `entry` and `fdatasync`s it, unless it does not fit or the log is broken.
    /// A record larger than [`Wal::max_record`] is refused with [`StoreError::TooLarge`].
    pub(crate) fn append(&mut self, entry: &Entry) -> Result<Appended, StoreError> {
        let record = encode(self.generation, entry);
        if record.len() as u64 > self.max_record() {
            return Err(StoreError::TooLarge {
                bytes: record.len() as u64,
                limit: self.max_record(),
            });
        }
        if self.broken || self.end + record.len() as u64 > self.capacity {
            return Ok(Appended::Full);
        }
        let written = self
            .file
            .write_all_at(&record, self.end)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            self.broken = true;
            return Err(StoreError::Io {
                context: format!("appending to {}", self.path.display()),
                source,
            });
        }
        self.end += record.len() as u64;
        Ok(Appended::Durable)
    }

    /// Whether an append failed since the last [`Wal::restart`].
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Starts the next generation, which empties the log. Call only once everything its
    /// records hold is durable elsewhere (after a checkpoint's sled flush).
    pub(crate) fn restart(&mut self) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        // Until the new header is durable the header on disk is unknown, so nothing may be
        // appended under either generation: a failure leaves the log broken.
        self.broken = true;
        self.file
            .write_all_at(&header(generation), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| StoreError::Io {
                context: format!("starting a new generation of {}", self.path.display()),
                source,
            })?;
        self.generation = generation;
        self.end = HEADER_LEN;
        self.broken = false;
        Ok(())
    }
}

/// Reads the records of the log in `dir`, in order: none if there is no log or its header
/// does not check (a log is only ever replaced once sled is durable, so nothing is lost).
pub(crate) fn recover(dir: &Path) -> Result<Vec<Entry>, StoreError> {
    let path = dir.join(WAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                context: format!("reading {}", path.display()),
                source,
            })
        }
    };
    let Some(generation) = read_header(&bytes) else {
        return Ok(Vec::new());
    };
    let mut entries = Vec::new();
    // HEADER_LEN is 4 KiB, so the cast cannot truncate.
    let mut at = HEADER_LEN as usize;
    while let Some((entry, len)) = read_record(&bytes[at.min(bytes.len())..], generation) {
        let entry = entry
            .map_err(|e| StoreError::Corrupt(format!("{} at offset {at}: {e}", path.display())))?;
        if let Some(last) = entries.last().map(|e: &Entry| e.lsn) {
            if entry.lsn <= last {
                return Err(StoreError::Corrupt(format!(
                    "{} at offset {at}: LSN {} after {last}",
                    path.display(),
                    entry.lsn
                )));
            }
        }
        entries.push(entry);
        at += len;
    }
    // Where the log ends: only zeros, older generations and torn bytes may follow.
    // A record starts with its generation, so only those places are candidates.
    let last = entries.last().map_or(0, |e| e.lsn);
    let rest = bytes.get(at + 1..).unwrap_or_default();
    if let Some(later) = memchr::memmem::find_iter(rest, &generation.to_le_bytes())
        .map(|i| at + 1 + i)
        .find(|&i| {
            read_record(&bytes[i..], generation).is_some_and(|(e, _)| e.is_ok_and(|e| e.lsn > last))
        })
    {
        return Err(StoreError::Corrupt(format!(
            "{}: the record at offset {at} is damaged, but an intact later one follows at \
             offset {later}",
            path.display()
        )));
    }
    Ok(entries)
}

fn header(generation: u64) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&header[..16]);
    header[16..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn read_header(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..20)?;
    if &header[..8] != MAGIC || crc32fast::hash(&header[..16]).to_le_bytes() != header[16..20] {
        return None;
    }
    Some(u64::from_le_bytes(header[8..16].try_into().ok()?))
}

/// Encodes one record of `generation`.
pub(crate) fn encode(generation: u64, entry: &Entry) -> Vec<u8> {
    let body_len: usize = entry
        .ops
        .iter()
        .map(|op| 2 + 4 + op.key.len() + op.value.as_ref().map_or(0, |v| 4 + v.len()))
        .sum();
    let mut record = Vec::with_capacity(RECORD_HEAD_LEN + body_len);
    record.extend_from_slice(&generation.to_le_bytes());
    record.extend_from_slice(&entry.lsn.to_le_bytes());
    record.extend_from_slice(&len_u32(body_len).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    for op in &entry.ops {
        record.push(op.tree as u8);
        record.push(u8::from(op.value.is_some()));
        record.extend_from_slice(&len_u32(op.key.len()).to_le_bytes());
        record.extend_from_slice(&op.key);
        if let Some(value) = &op.value {
            record.extend_from_slice(&len_u32(value.len()).to_le_bytes());
            record.extend_from_slice(value);
        }
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&record[..20]);
    crc.update(&record[RECORD_HEAD_LEN..]);
    record[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    record
}

/// A length as stored. Keys and values come from one license write (the API refuses bodies
/// over 1 MiB) and the log is a few MiB, so a length over 4 GiB cannot be appended anyway;
/// saturating makes such a record fail its CRC rather than wrap.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Reads the record at the start of `bytes`: `None` where the log ends (another
/// generation, a failed CRC, a torn or absent record), else the entry, or why a record
/// that checks does not decode, and its length.
pub(crate) fn read_record(bytes: &[u8], generation: u64) -> Option<(Result<Entry, String>, usize)> {
    let head = bytes.get(..RECORD_HEAD_LEN)?;
    let field = |range: std::ops::Range<usize>| &head[range];
    if u64::from_le_bytes(field(0..8).try_into().ok()?) != generation {
        return None;
    }
    let lsn = u64::from_le_bytes(field(8..16).try_into().ok()?);
    let body_len = usize::try_from(u32::from_le_bytes(field(16..20).try_into().ok()?)).ok()?;
    let stored_crc = u32::from_le_bytes(field(20..24).try_into().ok()?);
    let body = bytes.get(RECORD_HEAD_LEN..RECORD_HEAD_LEN.checked_add(body_len)?)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..20]);
    crc.update(body);
    if crc.finalize() != stored_crc {
        return None;
    }
    Some((
        decode_ops(body).map(|ops| Entry { lsn, ops }),
        RECORD_HEAD_LEN + body_len,
    ))
}

fn decode_ops(mut body: &[u8]) -> Result<Vec<Op>, String> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if body.len() < n {
            return Err("operation runs past the end of its record".to_string());
        }
        let (taken, rest) = body.split_at(n);
        *body = rest;
        Ok(taken)
    }
    fn take_len(body: &mut &[u8]) -> Result<usize, String> {
        let bytes: [u8; 4] = take(body, 4)?.try_into().map_err(|_| "short length")?;
        usize::try_from(u32::from_le_bytes(bytes)).map_err(|e| e.to_string())
    }
    let mut ops = Vec::new();
    while !body.is_empty() {
        let [tag, kind] = take(&mut body, 2)? else {
            unreachable!("take returned two bytes")
        };
        let tree = TreeTag::from_byte(*tag).ok_or_else(|| format!("unknown tree tag {tag}"))?;
        let key_len = take_len(&mut body)?;
        let key = IVec::from(take(&mut body, key_len)?);
        let value = match kind {
            0 => None,
            1 => {
                let len = take_len(&mut body)?;
                Some(IVec::from(take(&mut body, len)?))
            }
            other => return Err(format!("unknown operation kind {other}")),
        };
        ops.push(Op { tree, key, value });
    }
    Ok(ops)
}
