//! Durable append throughput (group commit) and prekey-bundle fetches of the
//! redb store. Every append is one write transaction with immediate
//! durability and two-phase commit, as in production.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use messenger_rendezvous::store::{AccountRecord, NewEnvelope, Store, StoreOptions};

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

criterion_group!(benches, bench_append, bench_take_bundle);
criterion_main!(benches);
