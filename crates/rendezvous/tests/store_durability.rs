//! Store-level versions of T-39 (one-time prekeys handed out once under
//! concurrency, count right after restart), T-42 (idempotent append across
//! restarts), T-43 (per-recipient order across restarts) and plain
//! survival of every kind of record across drop and reopen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;

use messenger_rendezvous::store::{
    AccountRecord, AnnouncementRecord, AppendOutcome, GroupRecord, NewEnvelope, Store, StoreOptions,
};

fn open(path: &Path) -> Store {
    Store::open(path, StoreOptions::default()).unwrap()
}

fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 1,
    }
}

fn env(to: &str, from: &str, n: u32) -> NewEnvelope {
    let mut message_id = [0u8; 16];
    message_id[..4].copy_from_slice(&n.to_be_bytes());
    NewEnvelope {
        recipient: to.to_owned(),
        sender: from.to_owned(),
        group: None,
        message_id,
        sent_at: 100,
        body: n.to_be_bytes().to_vec(),
    }
}

#[test]
fn t39_each_one_time_prekey_is_handed_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = open(&path);
    let opks = (1..=100).map(|i| (i, vec![i as u8; 32])).collect();
    store.create_account(account("alice"), opks).unwrap();

    let barrier = Arc::new(Barrier::new(32));
    let handles: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                (0..5)
                    .map(|_| store.take_bundle("alice").unwrap().unwrap().1)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let fetched: Vec<Option<(u32, Vec<u8>)>> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(fetched.len(), 160);
    let ids: Vec<u32> = fetched.iter().flatten().map(|(id, _)| *id).collect();
    let distinct: HashSet<u32> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 100, "exactly 100 fetches get a one-time prekey");
    assert_eq!(distinct.len(), 100, "0 duplicates");
    assert_eq!(fetched.iter().filter(|o| o.is_none()).count(), 60);
    for (id, key) in fetched.iter().flatten() {
        assert_eq!(key, &vec![*id as u8; 32]);
    }
    // Fetch 161: still signed-prekey only.
    assert_eq!(store.take_bundle("alice").unwrap().unwrap().1, None);
    assert_eq!(store.one_time_prekey_count("alice").unwrap(), 0);
    drop(store);

    let store = open(&path);
    assert_eq!(store.one_time_prekey_count("alice").unwrap(), 0);
    assert!(
        store
            .add_one_time_prekeys("alice", vec![(100, vec![0])])
            .is_err()
    );
    assert_eq!(
        store
            .add_one_time_prekeys("alice", (101..=110).map(|i| (i, vec![0])).collect())
            .unwrap(),
        10
    );
    drop(store);
    let store = open(&path);
    assert_eq!(store.one_time_prekey_count("alice").unwrap(), 10);
    assert_eq!(
        store.take_bundle("alice").unwrap().unwrap().1.unwrap().0,
        101
    );
}

#[test]
fn t42_same_message_five_times_across_reopens_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let mut seqs = Vec::new();
    {
        let store = open(&path);
        store.create_account(account("bob"), Vec::new()).unwrap();
    }
    for round in 0..5 {
        let store = open(&path);
        let r = store.append(vec![env("bob", "alice", 7)]);
        match (round, &r[0]) {
            (0, Ok(AppendOutcome::Stored { seq })) => seqs.push(*seq),
            (_, Ok(AppendOutcome::Duplicate { seq })) if round > 0 => seqs.push(*seq),
            other => panic!("round {round}: {other:?}"),
        }
        // Another message in between, so sequence numbers move on.
        store.append(vec![env("bob", "carol", 100 + round)]);
    }
    assert!(seqs.iter().all(|s| *s == seqs[0]));
    let store = open(&path);
    let from_alice: Vec<_> = store
        .pending("bob", 0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.sender == "alice")
        .collect();
    assert_eq!(from_alice.len(), 1);
    assert_eq!(from_alice[0].seq, seqs[0]);
}

#[test]
fn t43_order_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = open(&path);
        store.create_account(account("bob"), Vec::new()).unwrap();
    }
    let senders: Vec<String> = (0..10).map(|i| format!("sender{i}")).collect();
    let mut expected = Vec::new();
    for part in 0..4u32 {
        let store = open(&path);
        for n in 0..250u32 {
            let i = part * 250 + n;
            let from = &senders[(i % 10) as usize];
            let r = store.append(vec![env("bob", from, i)]);
            let Ok(AppendOutcome::Stored { seq }) = r[0] else {
                panic!("{r:?}");
            };
            expected.push((seq, i));
        }
    }
    let store = open(&path);
    let mut got = Vec::new();
    let mut after = 0;
    loop {
        let page = store.pending("bob", after, 128).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        got.extend(
            page.iter()
                .map(|e| (e.seq, u32::from_be_bytes(e.body[..4].try_into().unwrap()))),
        );
    }
    assert_eq!(got.len(), 1000);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "monotone seqs");
    assert_eq!(got, expected);
}

#[test]
fn everything_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let group = GroupRecord {
        name: "team".to_owned(),
        owner: "alice".to_owned(),
        version: 3,
        members: vec!["alice".to_owned(), "bob".to_owned()],
        roster_signature: vec![9; 64],
        roster_bytes: vec![1, 2, 3],
    };
    let seq;
    {
        let store = open(&path);
        store
            .create_account(account("alice"), vec![(1, vec![1])])
            .unwrap();
        store.create_account(account("bob"), Vec::new()).unwrap();
        store.add_invite([5; 32]).unwrap();
        store.friend_request("alice", "bob").unwrap();
        store.create_group(group.clone()).unwrap();
        store.add_join_request("team", "bob").unwrap();
        store
            .add_announcement(AnnouncementRecord {
                id: 0,
                issued_at: 4,
                bytes: vec![8; 10],
            })
            .unwrap();
        store.set_announcement_cursor("bob", 1).unwrap();
        let r = store.append(vec![env("bob", "alice", 1)]);
        let Ok(AppendOutcome::Stored { seq: s }) = r[0] else {
            panic!()
        };
        seq = s;
    }
    let store = open(&path);
    assert_eq!(store.account("alice").unwrap(), Some(account("alice")));
    assert_eq!(store.one_time_prekey_count("alice").unwrap(), 1);
    assert!(store.take_invite([5; 32]).unwrap());
    assert_eq!(store.incoming_requests("bob").unwrap(), vec!["alice"]);
    assert_eq!(store.group("team").unwrap(), Some(group));
    assert_eq!(store.groups_of("bob").unwrap(), vec!["team"]);
    assert_eq!(store.join_requests("team").unwrap(), vec!["bob"]);
    assert_eq!(store.announcements_after(0).unwrap().len(), 1);
    assert_eq!(store.announcement_cursor("bob").unwrap(), 1);
    let pending = store.pending("bob", 0, 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].seq, seq);
    assert_eq!(store.mailbox_usage("bob").unwrap(), (1, 4));
    // New sequence numbers continue above the old ones.
    let r = store.append(vec![env("bob", "alice", 2)]);
    assert!(matches!(r[0], Ok(AppendOutcome::Stored { seq: s }) if s > seq));
    assert!(store.check_integrity().unwrap());
}

#[test]
fn a_second_store_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _first = open(&path);
    assert!(Store::open(&path, StoreOptions::default()).is_err());
}
