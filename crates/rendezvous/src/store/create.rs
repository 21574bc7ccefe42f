//! The very first creation of a database file.
//!
//! redb refuses a file whose creation was cut short ("not a redb
//! database"), and such a file holds nothing worth keeping. So a new
//! database is built under a temporary name in the same directory
//! (`<name>.creating`): created, its tables made in one durable commit,
//! closed and `fsync`ed, then renamed onto the real name, and the directory
//! `fsync`ed so the rename itself is durable. A crash at any point leaves
//! either no file at the real path or a complete database there; a leftover
//! temporary file from such a crash is deleted at the next open, which then
//! starts the creation afresh.
//!
//! An existing database (anything at the real path) is opened as before,
//! untouched by this module.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use redb::backends::FileBackend;
use redb::{Database, Durability, StorageBackend};

use super::{StoreError, StoreOptions, classify, tables};

/// Suffix added to the file name of a database while it is being created.
pub(super) const CREATING_SUFFIX: &str = ".creating";

/// Where the database for `path` is built before it is renamed to `path`:
/// the same directory, the file name with [`CREATING_SUFFIX`] appended.
///
/// # Errors
///
/// [`StoreError::Storage`] if `path` has no file name (e.g. `/` or `..`).
pub(super) fn creating_path(path: &Path) -> Result<PathBuf, StoreError> {
    let Some(name) = path.file_name() else {
        return Err(io_error(
            "create",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the database path has no file name",
            ),
        ));
    };
    let mut creating = name.to_owned();
    creating.push(CREATING_SUFFIX);
    Ok(path.with_file_name(creating))
}

/// Makes sure a database exists at `path`, creating it as the module
/// describes when nothing is there.
pub(super) fn ensure_created(path: &Path, options: StoreOptions) -> Result<(), StoreError> {
    ensure_created_with(path, options, |file| {
        FileBackend::new(file).map_err(io::Error::other)
    })
}

/// [`ensure_created`] with the backend made from the temporary file by
/// `backend` (a test injects faults there).
pub(super) fn ensure_created_with<B: StorageBackend>(
    path: &Path,
    options: StoreOptions,
    backend: impl FnOnce(File) -> io::Result<B>,
) -> Result<(), StoreError> {
    const OP: &str = "create";
    // Anything at the path, even a dangling link, is opened as before.
    if exists(path).map_err(|e| io_error(OP, e))? {
        return Ok(());
    }
    // Two processes creating at once would race on the temporary file:
    // the second waits here, then finds the database and opens it (and
    // redb's own lock refuses it while the first has it open).
    let _dir_lock = lock_parent(path).map_err(|e| io_error(OP, e))?;
    if exists(path).map_err(|e| io_error(OP, e))? {
        return Ok(());
    }
    let creating = creating_path(path)?;
    // Left by a creation that crashed: it never held anything.
    match fs::remove_file(&creating) {
        Ok(()) => tracing::info!(
            path = %creating.display(),
            "removed an unfinished database creation"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(OP, e)),
    }
    if let Err(e) = build(&creating, options, backend) {
        // Best effort: a file left here is removed at the next open.
        let _ = fs::remove_file(&creating);
        return Err(e);
    }
    fs::rename(&creating, path).map_err(|e| io_error(OP, e))?;
    sync_parent(path).map_err(|e| io_error(OP, e))
}

/// Creates the database at `creating` with every table, commits durably,
/// closes it and syncs the file.
fn build<B: StorageBackend>(
    creating: &Path,
    options: StoreOptions,
    backend: impl FnOnce(File) -> io::Result<B>,
) -> Result<(), StoreError> {
    const OP: &str = "create";
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(creating)
        .map_err(|e| io_error(OP, e))?;
    let backend = backend(file).map_err(|e| io_error(OP, e))?;
    let db = Database::builder()
        .create_with_backend(backend)
        .map_err(|e| classify(OP, e.into()))?;
    let mut tx = db.begin_write().map_err(|e| classify(OP, e.into()))?;
    tx.set_durability(Durability::Immediate)
        .map_err(|e| classify(OP, e.into()))?;
    tx.set_two_phase_commit(options.two_phase_commit);
    tables::create_all(&tx)?;
    tx.commit().map_err(|e| classify(OP, e.into()))?;
    // Writes the clean-shutdown header and syncs; errors are reported,
    // unlike a drop's.
    db.close().map_err(|e| classify(OP, e.into()))?;
    File::open(creating)
        .and_then(|file| file.sync_all())
        .map_err(|e| io_error(OP, e))
}

/// Whether anything (a file, a directory, even a dangling link) is at
/// `path`.
fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The directory holding `path`.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Takes an exclusive lock (`flock`) on the directory holding `path`,
/// waiting for it; released when the returned handle is dropped. The
/// database file's own locks (redb's) are not affected.
#[cfg(unix)]
fn lock_parent(path: &Path) -> io::Result<Option<File>> {
    let dir = File::open(parent(path))?;
    dir.lock()?;
    Ok(Some(dir))
}

/// Elsewhere a directory cannot be opened as a file: no lock.
#[cfg(not(unix))]
fn lock_parent(_path: &Path) -> io::Result<Option<File>> {
    Ok(None)
}

/// `fsync`s the directory holding `path`, so a rename into it is durable.
#[cfg(unix)]
fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent(path))?.sync_all()
}

/// Elsewhere directories cannot be opened for `fsync`; the rename is left
/// to the file system.
#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> io::Result<()> {
    Ok(())
}

fn io_error(op: &'static str, e: io::Error) -> StoreError {
    classify(op, redb::Error::Io(e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use messenger_testkit::redb_fault::{Fault, FaultBackend};

    use super::*;
    use crate::store::Store;
    use crate::store::tests::account;

    /// Opens `path`, stores an account, reopens and finds it.
    fn opens_and_works(path: &Path) {
        let store = Store::open(path, StoreOptions::default()).unwrap();
        store.create_account(account("zed"), Vec::new()).unwrap();
        assert!(store.check_integrity().unwrap());
        drop(store);
        let store = Store::open(path, StoreOptions::default()).unwrap();
        assert!(store.account("zed").unwrap().is_some());
    }

    #[test]
    fn a_new_database_is_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let creating = creating_path(&path).unwrap();
        assert_eq!(creating, dir.path().join("s.redb.creating"));
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        assert!(path.is_file());
        assert!(!creating.exists());
        drop(store);
        opens_and_works(&path);
        // Opening the existing database creates no temporary file.
        assert!(!creating.exists());
    }

    /// A crash during creation left the temporary file: garbage, a torn
    /// start of a real database, or a whole one not yet renamed. The next
    /// open removes it and creates the database.
    #[test]
    fn a_leftover_creating_file_is_removed_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.redb");
        drop(Store::open(&whole, StoreOptions::default()).unwrap());
        let image = fs::read(&whole).unwrap();
        assert!(image.len() > 4096);
        let leftovers: [(&str, Vec<u8>); 4] = [
            ("empty", Vec::new()),
            ("garbage", vec![0xA5; 1000]),
            ("torn", image[..4096].to_vec()),
            ("whole", image.clone()),
        ];
        for (what, bytes) in leftovers {
            let path = dir.path().join(format!("{what}-s.redb"));
            let creating = creating_path(&path).unwrap();
            fs::write(&creating, &bytes).unwrap();
            // The premise: redb itself would refuse the torn file.
            if what == "torn" {
                assert!(Database::builder().create(&creating).is_err());
            }
            opens_and_works(&path);
            assert!(!creating.exists(), "{what}: leftover kept");
        }
    }

    /// Several threads opening the same new path at once: each gets a
    /// working store or redb's "already open" refusal, never a broken
    /// database, and no temporary file is left.
    #[test]
    fn concurrent_first_opens_do_not_break_the_creation() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let opened: Vec<bool> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| match Store::open(&path, StoreOptions::default()) {
                            Ok(store) => {
                                store.create_account(account("alice"), Vec::new()).ok();
                                true
                            }
                            Err(e) => {
                                assert!(matches!(e, StoreError::InUse), "round {round}: {e:?}");
                                false
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(opened.contains(&true), "round {round}: none opened");
            assert!(!creating_path(&path).unwrap().exists());
            opens_and_works(&path);
        }
    }

    /// Creates the database at `path` on a fault backend: writes and file
    /// growth fail like a full disk after `budget` bytes, and `fsync`
    /// number `syncs` (counting from 0; `u64::MAX` for none) fails.
    fn create_failing(path: &Path, budget: u64, syncs: u64) -> Result<(), StoreError> {
        let fault = Arc::new(Fault::default());
        fault.arm(budget);
        if let Some(n) = syncs.checked_add(1) {
            fault.fail_sync(n);
        }
        ensure_created_with(path, StoreOptions::default(), move |file| {
            FaultBackend::new(file, Arc::clone(&fault))
        })
    }

    /// A failure at any write or `fsync` of the creation leaves nothing at
    /// the real path (and no temporary file); the next open creates the
    /// database. With budgets large enough the same creation succeeds, so
    /// the failures are not of the test's own making.
    #[test]
    fn a_failed_creation_leaves_no_file_at_the_real_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut failed = 0;
        let mut succeeded = false;
        // Write budgets: every byte count up to the first success, in
        // steps that reach each of the creation's writes.
        let mut budget = 0u64;
        while !succeeded {
            assert!(budget < 64 << 20, "creation never succeeded");
            let path = dir.path().join(format!("bytes-{budget}.redb"));
            match create_failing(&path, budget, u64::MAX) {
                Ok(()) => succeeded = true,
                Err(e) => {
                    assert!(
                        matches!(e, StoreError::StorageFull { .. }),
                        "budget {budget}: {e:?}"
                    );
                    assert!(!path.exists(), "budget {budget}: file at the real path");
                    assert!(!creating_path(&path).unwrap().exists());
                    failed += 1;
                    opens_and_works(&path);
                }
            }
            budget = if budget < 8192 {
                budget + 512
            } else {
                budget * 2
            };
        }
        assert!(failed >= 3, "only {failed} failed creations");
        // Each `fsync` of the creation failing in turn.
        let mut syncs = 0u64;
        loop {
            let path = dir.path().join(format!("syncs-{syncs}.redb"));
            match create_failing(&path, u64::MAX, syncs) {
                Ok(()) => break,
                Err(e) => {
                    assert!(!path.exists(), "sync {syncs}: file at the real path: {e}");
                    assert!(!creating_path(&path).unwrap().exists());
                    opens_and_works(&path);
                }
            }
            syncs += 1;
            assert!(syncs < 100, "creation never succeeded");
        }
        assert!(syncs >= 1, "the creation made no fsync");
        eprintln!("{failed} creations failed on a write, {syncs} on an fsync");
    }
}
