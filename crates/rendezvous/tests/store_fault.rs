//! T-55 at library level: a storage backend that fails writes with
//! `io::ErrorKind::StorageFull` after N bytes. Every append whose commit
//! fails reports an error for every envelope, never `Stored`; once space
//! returns the store reopens by itself, every envelope reported `Stored` is
//! still there, and `check_integrity` passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use messenger_rendezvous::store::{
    AccountRecord, AppendOutcome, NewEnvelope, StorageBackend, Store, StoreError, StoreOptions,
};
use redb::backends::FileBackend;

/// Shared switch of the fault backends made for one test.
#[derive(Debug, Default)]
struct Fault {
    armed: AtomicBool,
    /// Bytes that may still be written while armed.
    budget: AtomicU64,
    /// Failures injected so far.
    failures: AtomicU64,
}

impl Fault {
    fn arm(&self, budget: u64) {
        self.budget.store(budget, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
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

#[derive(Debug)]
struct FaultBackend {
    inner: FileBackend,
    fault: Arc<Fault>,
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

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.fault.spend(data.len() as u64)?;
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

fn open_faulty(path: &Path, fault: &Arc<Fault>) -> Store {
    let bodies = messenger_rendezvous::store::bodies_dir(path);
    let path: PathBuf = path.to_owned();
    let fault = Arc::clone(fault);
    Store::open_with_backend(
        move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            let inner = FileBackend::new(file).map_err(io::Error::other)?;
            Ok(FaultBackend {
                inner,
                fault: Arc::clone(&fault),
            })
        },
        &bodies,
        StoreOptions::default(),
    )
    .unwrap()
}

fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 1,
    }
}

fn batch(counter: &mut u32, size: usize) -> Vec<NewEnvelope> {
    (0..size)
        .map(|_| {
            *counter += 1;
            let mut message_id = [0u8; 16];
            message_id[..4].copy_from_slice(&counter.to_be_bytes());
            NewEnvelope {
                recipient: if counter.is_multiple_of(2) {
                    "bob"
                } else {
                    "carol"
                }
                .to_owned(),
                sender: "alice".to_owned(),
                group: None,
                message_id,
                sent_at: 1_000,
                body: vec![(*counter % 251) as u8; 1024],
            }
        })
        .collect()
}

/// One run of the sweep: appends until the budget runs out, then a few
/// more while full, then frees space and checks everything.
fn run_with_budget(budget: u64) -> (usize, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fault.redb");
    let fault = Arc::new(Fault::default());
    let store = open_faulty(&path, &fault);
    for name in ["bob", "carol"] {
        store.create_account(account(name), Vec::new()).unwrap();
    }
    let mut counter = 0u32;
    let mut stored: Vec<(String, u64, [u8; 16])> = Vec::new();
    let mut failed_batches = 0;
    fault.arm(budget);
    for round in 0..40 {
        let envelopes = batch(&mut counter, 1 + round % 7);
        let results = store.append(envelopes.clone());
        assert_eq!(results.len(), envelopes.len());
        let failures = results.iter().filter(|r| r.is_err()).count();
        assert!(
            failures == 0 || failures == results.len(),
            "budget {budget}: a failed commit reported some envelopes stored"
        );
        if failures > 0 {
            failed_batches += 1;
            for r in &results {
                assert!(
                    matches!(r, Err(StoreError::StorageFull { .. })),
                    "budget {budget}: expected StorageFull, got {r:?}"
                );
            }
        }
        for (env, r) in envelopes.iter().zip(&results) {
            if let Ok(AppendOutcome::Stored { seq }) = r {
                stored.push((env.recipient.clone(), *seq, env.message_id));
            }
        }
        if failed_batches >= 3 {
            break;
        }
    }
    // Space returns: the next operation reopens and succeeds.
    fault.disarm();
    let results = store.append(batch(&mut counter, 3));
    for r in &results {
        assert!(
            matches!(r, Ok(AppendOutcome::Stored { .. })),
            "budget {budget}: no recovery after the fault cleared: {r:?}"
        );
    }
    assert_everything_there(&store, &stored, budget);
    assert!(store.check_integrity().unwrap(), "budget {budget}");
    drop(store);

    // And from a fresh process' point of view.
    let again = Store::open(&path, StoreOptions::default()).unwrap();
    assert_everything_there(&again, &stored, budget);
    assert!(again.check_integrity().unwrap());
    (stored.len(), fault.failures.load(Ordering::SeqCst))
}

fn assert_everything_there(store: &Store, stored: &[(String, u64, [u8; 16])], budget: u64) {
    let mut present = Vec::new();
    for name in ["bob", "carol"] {
        for e in store.pending(name, 0, usize::MAX).unwrap() {
            present.push((e.recipient, e.seq, e.message_id));
        }
    }
    for s in stored {
        assert!(
            present.contains(s),
            "budget {budget}: stored envelope {s:?} lost"
        );
    }
}

#[test]
fn t55_disk_full_sweep() {
    let mut injected = 0;
    let mut runs_with_failure = 0;
    for i in 0..50u64 {
        // 0 .. ~1 MiB in uneven steps, so failures land in different writes.
        let budget = i * i * 431 + i * 97;
        let (_stored, failures) = run_with_budget(budget);
        injected += failures;
        if failures > 0 {
            runs_with_failure += 1;
        }
    }
    assert!(injected > 0);
    assert!(
        runs_with_failure >= 40,
        "only {runs_with_failure} runs hit the fault"
    );
}

#[test]
fn store_full_before_any_commit_recovers() {
    let (stored, failures) = run_with_budget(0);
    assert_eq!(stored, 0);
    assert!(failures > 0);
}
