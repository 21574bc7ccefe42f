//! Durable append throughput (group commit) and prekey-bundle fetches of the
//! redb store. Every append is one write transaction with immediate
//! durability and two-phase commit, as in production.
//!
//! `group_commit_cpu` measures the calling thread's CPU time (Linux
//! `/proc/thread-self/schedstat`, nanoseconds on CPU) instead of wall time,
//! for the live server's batch shape (100 recipients × 8 envelopes, message
//! ids as real clients make them: send time in seconds, then random bytes):
//! the figure other processes on the box and the disk's `fsync` latency
//! move least.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[global_allocator]
/// The allocator the `rendezvous` binary ships with (src/bin/rendezvous.rs).
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use messenger_rendezvous::store::{AccountRecord, AppendOutcome, NewEnvelope, Store, StoreOptions};

const RECIPIENTS: u32 = 100;

fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 1,
    }
}

fn bench_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("bench.redb"),
        StoreOptions {
            mailbox_max_messages: u32::MAX,
            mailbox_max_bytes: u64::MAX,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for r in 0..RECIPIENTS {
        store
            .create_account(account(&format!("user{r}")), Vec::new())
            .unwrap();
    }
    let mut counter = 0u64;
    let mut group = c.benchmark_group("append_1KiB_durable");
    for size in [1usize, 10, 100, 1000] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("batch_{size}"), |b| {
            b.iter_batched(
                || {
                    (0..size)
                        .map(|_| {
                            counter += 1;
                            let mut message_id = [0u8; 16];
                            message_id[..8].copy_from_slice(&counter.to_be_bytes());
                            NewEnvelope {
                                recipient: format!("user{}", counter % u64::from(RECIPIENTS)),
                                sender: "sender".to_owned(),
                                group: None,
                                message_id,
                                sent_at: 1,
                                body: vec![0x5A; 1024],
                            }
                        })
                        .collect::<Vec<_>>()
                },
                |batch| {
                    let results = store.append(batch);
                    assert!(results.iter().all(Result::is_ok));
                },
                BatchSize::LargeInput,
            );
        });
        // Keep the database from growing without bound between sizes.
        for r in 0..RECIPIENTS {
            let name = format!("user{r}");
            loop {
                let seqs: Vec<u64> = store
                    .pending(&name, 0, 10_000)
                    .unwrap()
                    .iter()
                    .map(|e| e.seq)
                    .collect();
                if seqs.is_empty() {
                    break;
                }
                store.ack(&name, &seqs).unwrap();
            }
        }
    }
    group.finish();
}

fn bench_take_bundle(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("bundle.redb"), StoreOptions::default()).unwrap();
    store.create_account(account("alice"), Vec::new()).unwrap();
    let mut next_id = 1u32;
    let mut group = c.benchmark_group("take_bundle");
    group.throughput(Throughput::Elements(1));
    group.bench_function("with_opk", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n =
                    left.min(u64::from(messenger_rendezvous::store::MAX_ONE_TIME_PREKEYS)) as u32;
                let keys = (next_id..next_id + n).map(|i| (i, vec![3; 32])).collect();
                next_id += n;
                store.add_one_time_prekeys("alice", keys).unwrap();
                let start = std::time::Instant::now();
                for _ in 0..n {
                    assert!(store.take_bundle("alice").unwrap().unwrap().1.is_some());
                }
                total += start.elapsed();
                left -= u64::from(n);
            }
            total
        });
    });
    group.finish();
}

/// Nanoseconds this thread has run on a CPU (first field of schedstat).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let ns: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(ns)
}

fn bench_group_commit_cpu(c: &mut Criterion) {
    const SENDERS: usize = 100;
    const IN_FLIGHT: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("cpu.redb"),
        StoreOptions {
            mailbox_max_messages: u32::MAX,
            mailbox_max_bytes: u64::MAX,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for r in 0..SENDERS {
        store
            .create_account(account(&format!("user{r}")), Vec::new())
            .unwrap();
    }
    // Like the client's ids: 8 bytes of send time in milliseconds (a commit
    // every 10 ms, about the live server's rate, its envelopes sent over
    // those 10 ms), then 8 random bytes.
    let mut commits = 0u64;
    let mut batch = || -> Vec<NewEnvelope> {
        commits += 1;
        let base = 1_700_000_000_000 + commits * 10;
        (0..SENDERS * IN_FLIGHT)
            .map(|i| {
                let millis = base + (i * 10 / (SENDERS * IN_FLIGHT)) as u64;
                let mut message_id = [0u8; 16];
                message_id[..8].copy_from_slice(&millis.to_be_bytes());
                message_id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
                NewEnvelope {
                    recipient: format!("user{}", i % SENDERS),
                    sender: format!("sender{}", i % SENDERS),
                    group: None,
                    message_id,
                    sent_at: millis / 1000,
                    body: vec![0x5A; 1024],
                }
            })
            .collect()
    };
    let mut group = c.benchmark_group("group_commit_cpu");
    group.sample_size(20);
    group.throughput(Throughput::Elements((SENDERS * IN_FLIGHT) as u64));
    // Offline recipients: envelopes accumulate (the `server` bench's store case).
    group.bench_function("append_800", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let appends = batch();
                let start = thread_cpu();
                let out = store.commit_batch(&appends, &[]).unwrap();
                total += thread_cpu() - start;
                assert!(out.appended.iter().all(Result::is_ok));
            }
            total
        });
    });
    // Online recipients: each commit also acks the previous batch (relay).
    let mut previous: Vec<(String, Vec<u64>)> = Vec::new();
    group.bench_function("append_800_ack_800", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let appends = batch();
                let acks = std::mem::take(&mut previous);
                let start = thread_cpu();
                let out = store.commit_batch(&appends, &acks).unwrap();
                total += thread_cpu() - start;
                let mut by_recipient: Vec<(String, Vec<u64>)> = (0..SENDERS)
                    .map(|r| (format!("user{r}"), Vec::new()))
                    .collect();
                for (i, result) in out.appended.iter().enumerate() {
                    let Ok(AppendOutcome::Stored { seq }) = result else {
                        panic!("not stored: {result:?}");
                    };
                    by_recipient[i % SENDERS].1.push(*seq);
                }
                previous = by_recipient;
            }
            total
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_append,
    bench_take_bundle,
    bench_group_commit_cpu
);
criterion_main!(benches);
