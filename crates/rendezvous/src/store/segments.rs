//! Envelope bodies in append-only segment files beside the database.
//!
//! redb keeps a mailbox's index rows (routing fields and where each body
//! lies); the bodies themselves are appended to the current segment file of
//! the directory `<database file>.bodies/`, named by a 16-digit hex number
//! (`0000000000000001.seg`, …). One group commit writes its bodies with
//! one positioned write and syncs the segment **before** the redb commit that
//! refers to them, so a committed index row always points at synced bytes.
//! The `segments/1` table holds, per segment, how many bodies it still holds
//! and the length committed so far: bytes past that length belong to a batch
//! whose commit never happened and are overwritten by the next one (and cut
//! off at open). A segment whose last body is acknowledged or expired is
//! deleted after the durable commit that recorded it; the newest segment is
//! kept, since it is the one being written. Why: with bodies inside the
//! B-tree each 1 KiB envelope cost about 3.4 KB of page writes and most of
//! the committing thread's time (docs/benchmarks.md §1); here it is written
//! once, sequentially.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{ReadableTable as _, Table};

use super::StoreError;

/// Where a body lies: (segment, offset, length, CRC-32 of the bytes).
pub(super) type BodyLoc = (u64, u64, u32, u32);

/// segment -> (bodies it still holds, their bytes, committed length)
pub(super) type SegmentRow = (u64, u64, u64);

/// Largest gather buffer kept between commits (8 MiB, about 8,000 bodies of
/// 1 KiB: more than a group commit holds); a larger one, made for a rare
/// huge batch, is given back.
const KEPT_BUFFER: usize = 8 * 1024 * 1024;

/// Suffix of segment file names.
const SUFFIX: &str = ".seg";

/// The segment files of one store and an open handle per segment.
pub(super) struct Segments {
    dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// The buffer one commit's bodies are gathered in, kept between commits
    /// (a fresh one per commit was about 400 KiB to allocate and free each
    /// time under load).
    buffer: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segments")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The directory of a database file's segments: `<file name>.bodies`.
pub(super) fn dir_for(database: &Path) -> PathBuf {
    let mut name = database
        .file_name()
        .map_or_else(|| "store".into(), ToOwned::to_owned);
    name.push(".bodies");
    database.with_file_name(name)
}

/// Maps an I/O error of a segment file to a [`StoreError`].
pub(super) fn io_error(op: &'static str, err: io::Error) -> StoreError {
    super::classify(op, redb::Error::Io(err))
}

impl Segments {
    /// Uses `dir`, creating it (and syncing its parent) if needed.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            files: Mutex::new(HashMap::new()),
            buffer: Mutex::new(Vec::new()),
        })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}{SUFFIX}"))
    }

    /// The open handle of a segment, opening it if needed.
    fn file(&self, segment: u64) -> io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = files.get(&segment) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(segment))?,
        );
        files.insert(segment, Arc::clone(&file));
        Ok(file)
    }

    /// Creates an empty segment file (emptying a leftover of the same
    /// number) and syncs the directory, so the file outlives a crash.
    fn create(&self, segment: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path(segment))?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment, Arc::new(file));
        Ok(())
    }

    /// Writes `bytes` at `offset` of a segment and syncs its data.
    fn write_synced(&self, segment: u64, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let file = self.file(segment)?;
        file.write_all_at(bytes, offset)?;
        file.sync_data()
    }

    /// Reads one body and checks its CRC. `Ok(None)` when its segment file
    /// is gone: every body in it was removed after the caller's snapshot.
    pub(super) fn read(&self, loc: BodyLoc) -> Result<Option<Vec<u8>>, StoreError> {
        const OP: &str = "read body";
        let (segment, offset, len, crc) = loc;
        let file = match self.file(segment) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(OP, e)),
        };
        let mut body = vec![0; len as usize];
        match file.read_exact_at(&mut body, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(StoreError::Corrupt(format!(
                    "segment {segment:016x} ends before a body it holds"
                )));
            }
            Err(e) => return Err(io_error(OP, e)),
        }
        if crc32fast::hash(&body) != crc {
            return Err(StoreError::Corrupt(format!(
                "a body in segment {segment:016x} fails its checksum"
            )));
        }
        Ok(Some(body))
    }

    /// Deletes segment files whose rows a durable commit removed. A file
    /// already gone is fine (a crash may have come after the unlink).
    pub(super) fn delete(&self, segments: &[u64]) {
        if segments.is_empty() {
            return;
        }
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        for &segment in segments {
            files.remove(&segment);
            match fs::remove_file(self.path(segment)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A leftover costs only disk space; the next open removes it.
                Err(e) => tracing::warn!(segment, error = %e, "cannot delete a segment file"),
            }
        }
    }

    /// Brings the directory in line with the committed rows, at open: cuts
    /// each segment to its committed length (a crash may have left bytes of
    /// an uncommitted batch) and deletes files no row names (a segment
    /// started by an uncommitted batch, or one whose deletion a crash
    /// interrupted). A missing or short segment is corruption.
    pub(super) fn recover(&self, rows: &[(u64, SegmentRow)]) -> Result<(), StoreError> {
        const OP: &str = "recover segments";
        let mut known = HashMap::new();
        for &(segment, (_, _, end)) in rows {
            known.insert(segment, end);
            let path = self.path(segment);
            let len = match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if end == 0 {
                        self.create(segment).map_err(|e| io_error(OP, e))?;
                        continue;
                    }
                    return Err(StoreError::Corrupt(format!(
                        "segment file {} is missing",
                        path.display()
                    )));
                }
                Err(e) => return Err(io_error(OP, e)),
            };
            if len < end {
                return Err(StoreError::Corrupt(format!(
                    "segment file {} is shorter ({len} bytes) than committed ({end})",
                    path.display()
                )));
            }
            if len > end {
                let file = self.file(segment).map_err(|e| io_error(OP, e))?;
                file.set_len(end).map_err(|e| io_error(OP, e))?;
                file.sync_all().map_err(|e| io_error(OP, e))?;
            }
        }
        let mut stale = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io_error(OP, e))? {
            let entry = entry.map_err(|e| io_error(OP, e))?;
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            if !known.contains_key(&number) {
                stale.push(number);
            }
        }
        self.delete(&stale);
        if !stale.is_empty() {
            sync_dir(&self.dir).map_err(|e| io_error(OP, e))?;
        }
        Ok(())
    }
}

/// Appends `bodies` to the current segment (starting a new one when the
/// current one holds at least `max_bytes`), syncs them, and records them in
/// `table`; returns where each lies, in order. Runs inside the write
/// transaction that stores the index rows, before its commit: the bytes are
/// written at the committed end, so a transaction that fails leaves nothing
/// the next one does not overwrite.
///
/// A sealed segment left empty by the switch (all its bodies removed) is
/// added to `dead`, for deletion after the commit.
pub(super) fn place(
    segments: &Segments,
    table: &mut Table<u64, SegmentRow>,
    bodies: &[&[u8]],
    max_bytes: u64,
    dead: &mut Vec<u64>,
) -> Result<Vec<BodyLoc>, StoreError> {
    const OP: &str = "write bodies";
    if bodies.is_empty() {
        return Ok(Vec::new());
    }
    let current = table
        .last()
        .map_err(|e| super::classify(OP, e.into()))?
        .map(|(k, v)| (k.value(), v.value()));
    let (segment, (live, bytes, end)) = match current {
        Some((segment, row)) if row.2 == 0 || row.2 < max_bytes => (segment, row),
        Some((segment, (live, _, _))) => {
            if live == 0 {
                table
                    .remove(segment)
                    .map_err(|e| super::classify(OP, e.into()))?;
                dead.push(segment);
            }
            let next = segment + 1;
            segments.create(next).map_err(|e| io_error(OP, e))?;
            (next, (0, 0, 0))
        }
        None => {
            segments.create(1).map_err(|e| io_error(OP, e))?;
            (1, (0, 0, 0))
        }
    };
    let total: usize = bodies.iter().map(|b| b.len()).sum();
    let mut buf = segments
        .buffer
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    buf.clear();
    if buf.capacity() > KEPT_BUFFER {
        *buf = Vec::new();
    }
    buf.reserve(total);
    let mut locs = Vec::with_capacity(bodies.len());
    for body in bodies {
        let len = u32::try_from(body.len())
            .map_err(|_| StoreError::Corrupt("a body over 4 GiB".to_owned()))?;
        locs.push((segment, end + buf.len() as u64, len, crc32fast::hash(body)));
        buf.extend_from_slice(body);
    }
    segments
        .write_synced(segment, end, &buf)
        .map_err(|e| io_error(OP, e))?;
    table
        .insert(
            segment,
            (
                live + bodies.len() as u64,
                bytes + total as u64,
                end + total as u64,
            ),
        )
        .map_err(|e| super::classify(OP, e.into()))?;
    Ok(locs)
}

/// Lowers segments' counts by removed bodies (segment -> (count, bytes));
/// a segment left with none that is not the newest loses its row and is
/// added to `dead`, for deletion after a durable commit.
pub(super) fn release(
    table: &mut Table<u64, SegmentRow>,
    removed: &HashMap<u64, (u64, u64)>,
    dead: &mut Vec<u64>,
) -> Result<(), StoreError> {
    const OP: &str = "release bodies";
    if removed.is_empty() {
        return Ok(());
    }
    let newest = table
        .last()
        .map_err(|e| super::classify(OP, e.into()))?
        .map(|(k, _)| k.value());
    for (&segment, &(count, bytes)) in removed {
        let Some((live, held, end)) = table
            .get(segment)
            .map_err(|e| super::classify(OP, e.into()))?
            .map(|g| g.value())
        else {
            return Err(StoreError::Corrupt(format!(
                "a body lies in segment {segment:016x}, which has no row"
            )));
        };
        let row = (live.saturating_sub(count), held.saturating_sub(bytes), end);
        if row.0 == 0 && Some(segment) != newest {
            table
                .remove(segment)
                .map_err(|e| super::classify(OP, e.into()))?;
            dead.push(segment);
        } else {
            table
                .insert(segment, row)
                .map_err(|e| super::classify(OP, e.into()))?;
        }
    }
    Ok(())
}

/// Syncs a directory, so that file creations and deletions in it are
/// durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
