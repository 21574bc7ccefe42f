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

use std::collections::{HashMap, HashSet};
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

/// Maps an I/O error of a segment file to a [`StoreError`]: `StorageFull`
/// or `Storage` as for redb's own I/O errors, but marked as the segment's
/// ([`is_segment_error`]), since redb did not see it and the database need
/// not be reopened.
pub(super) fn io_error(op: &'static str, err: io::Error) -> StoreError {
    let kind = err.kind();
    super::classify(op, redb::Error::Io(io::Error::new(kind, SegmentError(err))))
}

/// Whether `err` was made by [`io_error`].
pub(super) fn is_segment_error(err: &io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<SegmentError>())
}

/// An I/O error of a segment file (not of the database).
#[derive(Debug)]
struct SegmentError(io::Error);

impl std::fmt::Display for SegmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment file: {}", self.0)
    }
}

impl std::error::Error for SegmentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The segment number of a file name the store writes: exactly 16
/// lower-case hex digits and [`SUFFIX`]. Anything else (upper case, a sign,
/// another length) is not a segment: left alone and not counted.
fn parse_name(name: &std::ffi::OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_suffix(SUFFIX)?;
    if digits.len() != 16
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
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
        // Checked before the buffer is made: a damaged row must not make the
        // server allocate up to 4 GiB for a body that cannot be there.
        let file_len = file.metadata().map_err(|e| io_error(OP, e))?.len();
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > file_len)
        {
            return Err(StoreError::Corrupt(format!(
                "a body lies past the end of segment {segment:016x}"
            )));
        }
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
    /// an uncommitted batch) and deletes the files no row names that a crash
    /// can leave: the segment after the newest (started by a batch whose
    /// commit never happened) and older ones (whose deletion a crash
    /// interrupted). A missing or short segment is corruption; so are
    /// segment files when no row names any segment, or a file numbered past
    /// the one after the newest: the database and the directory do not
    /// belong together (a database restored or recreated without its
    /// bodies), and deleting them could destroy the only copy of bodies an
    /// operator still means to restore.
    pub(super) fn recover(&self, rows: &[(u64, SegmentRow)]) -> Result<(), StoreError> {
        const OP: &str = "recover segments";
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io_error(OP, e))? {
            let entry = entry.map_err(|e| io_error(OP, e))?;
            if let Some(number) = parse_name(&entry.file_name()) {
                found.push(number);
            }
        }
        let Some(newest) = rows.iter().map(|&(segment, _)| segment).max() else {
            if found.is_empty() {
                return Ok(());
            }
            return Err(StoreError::Corrupt(format!(
                "{} holds segment files but the database names no segment: they do not \
                 belong together; restore the database and its bodies directory from one \
                 backup (docs/operations.md)",
                self.dir.display()
            )));
        };
        let known: HashSet<u64> = rows.iter().map(|&(segment, _)| segment).collect();
        let stale: Vec<u64> = found
            .into_iter()
            .filter(|number| !known.contains(number))
            .collect();
        // Before anything is cut: the committed ends of a database the
        // directory does not belong to say nothing about its files.
        if let Some(&past) = stale.iter().find(|&&n| n > newest.saturating_add(1)) {
            return Err(StoreError::Corrupt(format!(
                "segment file {} is numbered past the newest segment the database names \
                 ({newest:016x}): {} and the database do not belong together; restore both \
                 from one backup (docs/operations.md)",
                self.path(past).display(),
                self.dir.display()
            )));
        }
        for &(segment, (_, _, end)) in rows {
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
