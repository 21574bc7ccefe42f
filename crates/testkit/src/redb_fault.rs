//! A redb storage backend over a file that injects faults: a full disk
//! after N bytes, an `fsync` that fails after it synced, one that panics,
//! or every `fsync` held until the test lets it go. For tests of what a
//! store does when its disk fails; one [`Fault`] may drive every backend a
//! store opens, so a test can arm it after the store is open.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::StorageBackend;
use redb::backends::FileBackend;

/// Shared switch of the fault backends made for one test.
#[derive(Debug, Default)]
pub struct Fault {
    armed: AtomicBool,
    /// Bytes that may still be written while armed.
    budget: AtomicU64,
    /// Failures injected so far.
    pub failures: AtomicU64,
    /// `sync_data` calls so far (a commit makes one or two).
    pub syncs: AtomicU64,
    /// `sync_data` calls from now on until the one that fails (after it
    /// synced: what it wrote is on the file); 0 for none.
    fail_sync_in: AtomicU64,
    /// The next `sync_data` after a write of the header (offset 0), that
    /// is the one of a commit, panics (before it syncs).
    panic_on_sync: AtomicBool,
    header_written: AtomicBool,
    /// While true, `sync_data` waits (a commit that cannot finish).
    held: Mutex<bool>,
    let_go: Condvar,
    /// `sync_data` calls waiting in a hold right now.
    waiting: AtomicU64,
}

impl Fault {
    /// Writes and file growth fail like a full disk after `budget` bytes.
    pub fn arm(&self, budget: u64) {
        self.budget.store(budget, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Clears the write budget, a pending `fsync` failure and a pending
    /// panic (a hold is cleared by [`Fault::release_syncs`]).
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.fail_sync_in.store(0, Ordering::SeqCst);
        self.panic_on_sync.store(false, Ordering::SeqCst);
    }

    /// The `n`th `sync_data` from now on syncs, then reports an I/O error.
    pub fn fail_sync(&self, n: u64) {
        self.fail_sync_in.store(n, Ordering::SeqCst);
    }

    /// The next commit's `sync_data` (the first after a write of the
    /// header) panics. One during the transaction (the file grows) would
    /// poison redb's own state instead.
    pub fn panic_in_next_commit(&self) {
        self.header_written.store(false, Ordering::SeqCst);
        self.panic_on_sync.store(true, Ordering::SeqCst);
    }

    /// From now on every `sync_data` waits until [`Fault::release_syncs`].
    pub fn hold_syncs(&self) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = true;
    }

    /// Lets every held `sync_data` go on, and no new one wait.
    pub fn release_syncs(&self) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.let_go.notify_all();
    }

    /// Waits (at most `limit`) until a `sync_data` is held; false if none
    /// came.
    pub fn wait_for_held_sync(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while self.waiting.load(Ordering::SeqCst) == 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn wait_while_held(&self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if *held {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            while *held {
                held = self
                    .let_go
                    .wait(held)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Takes `bytes` from the budget, or fails like a full disk.
    fn spend(&self, bytes: u64) -> io::Result<()> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(bytes))
            .is_ok();
        if ok {
            Ok(())
        } else {
            self.budget.store(0, Ordering::SeqCst);
            self.failures.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::from(io::ErrorKind::StorageFull))
        }
    }
}

/// A redb [`StorageBackend`] over a file that injects the faults of its
/// [`Fault`] (which several backends may share).
#[derive(Debug)]
pub struct FaultBackend {
    inner: FileBackend,
    fault: Arc<Fault>,
}

impl FaultBackend {
    /// A backend over `file`, failing as `fault` says.
    ///
    /// # Errors
    /// What redb's [`FileBackend::new`] returns, as an I/O error.
    pub fn new(file: File, fault: Arc<Fault>) -> io::Result<Self> {
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(Self { inner, fault })
    }
}

impl StorageBackend for FaultBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let current = self.inner.len()?;
        if len > current {
            self.fault.spend(len - current)?;
        }
        self.inner.set_len(len)
    }

    // The panic is the fault asked for (`Fault::panic_in_next_commit`).
    #[allow(clippy::panic)]
    fn sync_data(&self) -> io::Result<()> {
        self.fault.syncs.fetch_add(1, Ordering::SeqCst);
        self.fault.wait_while_held();
        if self.fault.header_written.load(Ordering::SeqCst)
            && self.fault.panic_on_sync.swap(false, Ordering::SeqCst)
        {
            panic!("injected panic in sync_data");
        }
        self.inner.sync_data()?;
        let failing = self
            .fault
            .fail_sync_in
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok();
        if failing == Some(1) {
            self.fault.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("injected fsync failure"));
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.fault.spend(data.len() as u64)?;
        if offset == 0 {
            self.fault.header_written.store(true, Ordering::SeqCst);
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
