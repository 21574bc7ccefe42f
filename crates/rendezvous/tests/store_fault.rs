//! T-55 at library level: a storage backend that fails writes with
//! `io::ErrorKind::StorageFull` after N bytes. Every append whose commit
//! fails reports an error for every envelope, never `Stored`; once space
//! returns the store reopens by itself, every envelope reported `Stored` is
//! still there, and `check_integrity` passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{Fault, open_faulty};
use messenger_rendezvous::store::{
    AccountRecord, AppendOutcome, NewEnvelope, Store, StoreError, StoreOptions,
};

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
    let store = open_faulty(&path, &fault, StoreOptions::default()).unwrap();
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
