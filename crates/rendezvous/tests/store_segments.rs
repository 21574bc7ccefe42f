//! Envelope bodies in segment files (`store::bodies_dir`): segments roll
//! over at `segment_max_bytes` and are deleted once emptied (after a durable
//! commit, also for relaxed acks), open cuts uncommitted bytes and removes
//! stray files, damage is reported as `Corrupt`, purge frees segments, and
//! an `inbox/2` database (bodies inline) is moved into segments at open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use messenger_rendezvous::store::{
    AccountRecord, AppendOutcome, NewEnvelope, Store, StoreError, StoreOptions, bodies_dir,
};
use redb::{ReadableDatabase as _, TableDefinition, TableHandle as _};

/// Segment size of most tests: four 1 KiB bodies fill one.
const SEGMENT: u64 = 4096;
/// Body size of most tests.
const BODY: usize = 1024;

fn options(segment_max_bytes: u64) -> StoreOptions {
    StoreOptions {
        segment_max_bytes,
        ..StoreOptions::default()
    }
}

fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 1,
    }
}

/// A body of `len` bytes that differs from every other `n`'s.
fn body(n: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (n.wrapping_mul(31) as usize).wrapping_add(i * 7) as u8)
        .collect()
}

fn message_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id
}

fn env(to: &str, n: u64, sent_at: u64) -> NewEnvelope {
    NewEnvelope {
        recipient: to.to_owned(),
        sender: "alice".to_owned(),
        group: None,
        message_id: message_id(n),
        sent_at,
        body: body(n, BODY),
    }
}

/// A store at `dir/s.redb` with accounts alice and bob.
fn setup(dir: &Path, opts: StoreOptions) -> (PathBuf, Store) {
    let path = dir.join("s.redb");
    let store = Store::open(&path, opts).unwrap();
    for name in ["alice", "bob"] {
        store.create_account(account(name), Vec::new()).unwrap();
    }
    (path, store)
}

/// Appends envelopes `ns` to bob, one commit each; returns their seqs.
fn append_each(store: &Store, ns: std::ops::Range<u64>, sent_at: u64) -> Vec<u64> {
    ns.map(
        |n| match store.append(vec![env("bob", n, sent_at)]).remove(0) {
            Ok(AppendOutcome::Stored { seq }) => seq,
            other => panic!("envelope {n}: {other:?}"),
        },
    )
    .collect()
}

/// Segment file name -> length.
fn segment_files(path: &Path) -> BTreeMap<String, u64> {
    fs::read_dir(bodies_dir(path))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect()
}

fn seg(n: u64) -> String {
    format!("{n:016x}.seg")
}

/// What [`segment_files`] should list: (segment, length) pairs.
fn files(list: &[(u64, u64)]) -> BTreeMap<String, u64> {
    list.iter().map(|&(n, len)| (seg(n), len)).collect()
}

/// Asserts bob's pending envelopes are exactly `ns` with `seqs`, bodies
/// byte-exact.
fn assert_bob_holds(store: &Store, ns: &[u64], seqs: &[u64]) {
    let pending = store.pending("bob", 0, usize::MAX).unwrap();
    let got: Vec<(u64, [u8; 16], Vec<u8>)> = pending
        .into_iter()
        .map(|r| (r.seq, r.message_id, r.body))
        .collect();
    let want: Vec<(u64, [u8; 16], Vec<u8>)> = ns
        .iter()
        .zip(seqs)
        .map(|(&n, &seq)| (seq, message_id(n), body(n, BODY)))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn segments_roll_over_and_emptied_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = setup(dir.path(), options(SEGMENT));
    let seqs = append_each(&store, 0..12, 100);
    // A commit starts a new segment once the current one holds >= 4 KiB.
    let three = files(&[(1, SEGMENT), (2, SEGMENT), (3, SEGMENT)]);
    assert_eq!(segment_files(&path), three);
    assert_bob_holds(&store, &(0..12).collect::<Vec<_>>(), &seqs);
    assert_eq!(store.mailbox_usage("bob").unwrap(), (12, 12 * BODY as u64));
    assert!(store.check_integrity().unwrap());

    assert_eq!(store.ack("bob", &seqs).unwrap(), 12);
    // Relaxed ack: nothing deleted before a durable commit.
    assert_eq!(segment_files(&path), three);
    store.create_account(account("carol"), Vec::new()).unwrap();
    // The newest segment stays (it is the one being written).
    assert_eq!(segment_files(&path), files(&[(3, SEGMENT)]));
    assert!(store.pending("bob", 0, usize::MAX).unwrap().is_empty());
    assert!(store.check_integrity().unwrap());

    // The next append starts segment 4 and drops the full, empty segment 3.
    let more = append_each(&store, 100..101, 100);
    assert_eq!(segment_files(&path), files(&[(4, BODY as u64)]));
    assert_bob_holds(&store, &[100], &more);
    assert!(store.check_integrity().unwrap());
}

#[test]
fn relaxed_ack_deletes_after_the_next_durable_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = setup(dir.path(), options(SEGMENT));
    let seqs = append_each(&store, 0..8, 100);
    assert_eq!(segment_files(&path).len(), 2);
    // Empties sealed segment 1, by `ack` and by an acks-only batch.
    assert_eq!(store.ack("bob", &seqs[..2]).unwrap(), 2);
    let acks = [("bob".to_owned(), seqs[2..4].to_vec())];
    assert_eq!(store.commit_batch(&[], &acks).unwrap().acked, vec![2]);
    assert!(segment_files(&path).contains_key(&seg(1)));
    assert_bob_holds(&store, &[4, 5, 6, 7], &seqs[4..]);
    store.create_account(account("carol"), Vec::new()).unwrap();
    assert_eq!(segment_files(&path), files(&[(2, SEGMENT)]));
    assert_bob_holds(&store, &[4, 5, 6, 7], &seqs[4..]);
    assert!(store.check_integrity().unwrap());
}

#[test]
fn close_after_a_relaxed_ack_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = setup(dir.path(), options(SEGMENT));
    let seqs = append_each(&store, 0..8, 100);
    assert_eq!(store.ack("bob", &seqs[..4]).unwrap(), 4);
    assert!(segment_files(&path).contains_key(&seg(1)));
    drop(store); // no durable commit since the ack

    let store = Store::open(&path, options(SEGMENT)).unwrap();
    assert!(store.check_integrity().unwrap());
    let pending = store.pending("bob", 0, usize::MAX).unwrap();
    let waiting: Vec<u64> = pending.iter().map(|r| r.seq).collect();
    let on_disk = segment_files(&path);
    // Either the ack survived and segment 1 is gone (its row went with the
    // ack; open deletes the file no row names), or neither did.
    let acked = waiting == seqs[4..] && !on_disk.contains_key(&seg(1));
    let not_acked = waiting == seqs && on_disk.contains_key(&seg(1));
    assert!(acked || not_acked, "waiting {waiting:?}, files {on_disk:?}");
    // Observed with redb 4: a clean close makes the pending non-durable
    // commit durable, so the ack is kept and the file must be gone.
    assert!(acked, "waiting {waiting:?}, files {on_disk:?}");
    assert_eq!(on_disk, files(&[(2, SEGMENT)]));
    assert_bob_holds(&store, &[4, 5, 6, 7], &seqs[4..]);
}

#[test]
fn open_cuts_uncommitted_bytes_and_removes_stray_files() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store) = setup(dir.path(), options(SEGMENT));
    let seqs = append_each(&store, 0..6, 100);
    drop(store);
    let bodies = bodies_dir(&path);
    let before = segment_files(&path);
    assert_eq!(before[&seg(2)], 2 * BODY as u64);
    let mut newest = OpenOptions::new()
        .append(true)
        .open(bodies.join(seg(2)))
        .unwrap();
    newest.write_all(&[0xAB; 3000]).unwrap();
    drop(newest);
    // Segment 3 is the one a batch whose commit never happened would start.
    fs::write(bodies.join(seg(3)), b"left by an uncommitted batch").unwrap();
    fs::write(bodies.join("notes.txt"), b"not a segment").unwrap();

    let store = Store::open(&path, options(SEGMENT)).unwrap();
    assert_eq!(segment_files(&path), before);
    assert!(
        bodies.join("notes.txt").exists(),
        "only segments are removed"
    );
    assert_bob_holds(&store, &(0..6).collect::<Vec<_>>(), &seqs);
    assert!(store.check_integrity().unwrap());
    // New bodies go right after the committed end, not after the garbage.
    let more = append_each(&store, 6..8, 100);
    assert_eq!(segment_files(&path)[&seg(2)], SEGMENT);
    let all: Vec<u64> = seqs.iter().chain(&more).copied().collect();
    assert_bob_holds(&store, &(0..8).collect::<Vec<_>>(), &all);
    assert!(store.check_integrity().unwrap());
}

/// Six bodies in segments 1 (full) and 2; the store closed.
fn closed_store(dir: &Path) -> PathBuf {
    let (path, store) = setup(dir, options(SEGMENT));
    append_each(&store, 0..6, 100);
    path
}

fn corrupt_message(result: Result<Store, StoreError>) -> String {
    match result {
        Err(StoreError::Corrupt(msg)) => msg,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_missing_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    fs::remove_file(bodies_dir(&path).join(seg(1))).unwrap();
    let msg = corrupt_message(Store::open(&path, options(SEGMENT)));
    assert!(msg.contains(&seg(1)) && msg.contains("missing"), "{msg}");
}

#[test]
fn a_short_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    let file = OpenOptions::new()
        .write(true)
        .open(bodies_dir(&path).join(seg(2)))
        .unwrap();
    file.set_len(BODY as u64 + 10).unwrap();
    drop(file);
    let msg = corrupt_message(Store::open(&path, options(SEGMENT)));
    assert!(msg.contains(&seg(2)) && msg.contains("shorter"), "{msg}");
}

#[test]
fn a_flipped_body_byte_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    let file = bodies_dir(&path).join(seg(1));
    let mut bytes = fs::read(&file).unwrap();
    bytes[BODY + 100] ^= 0x01; // inside the second body
    fs::write(&file, bytes).unwrap();

    let store = Store::open(&path, options(SEGMENT)).unwrap();
    match store.pending("bob", 0, usize::MAX) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("checksum"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Bodies before the damaged one still read.
    assert_eq!(store.pending("bob", 0, 1).unwrap()[0].body, body(0, BODY));
    assert!(matches!(
        store.check_integrity(),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn purge_empties_and_deletes_segments() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        envelope_ttl_secs: 100,
        ..options(SEGMENT)
    };
    let (path, store) = setup(dir.path(), opts);
    let old = append_each(&store, 0..12, 100); // expire at 200
    let new = append_each(&store, 12..14, 1000); // expire at 1100
    assert_eq!(segment_files(&path).len(), 4);
    store.ack("bob", &old[..2]).unwrap();

    let purged = store.purge_expired(199).unwrap();
    assert_eq!((purged.envelopes, purged.more), (0, false));
    assert_eq!(segment_files(&path).len(), 4);

    let purged = store.purge_expired(200).unwrap();
    assert_eq!((purged.envelopes, purged.more), (10, false));
    assert_eq!(segment_files(&path), files(&[(4, 2 * BODY as u64)]));
    assert_bob_holds(&store, &[12, 13], &new);
    assert_eq!(store.mailbox_usage("bob").unwrap(), (2, 2 * BODY as u64));
    assert!(store.check_integrity().unwrap());
}

// The `inbox/2` layout and the tables it must agree with, as written by
// the store before bodies moved to segments (src/store/tables.rs).
type OldRecord<'a> = (
    u64,
    &'a str,
    Option<&'a str>,
    &'a [u8; 16],
    u64,
    u64,
    &'a [u8],
);
const OLD_INBOX: TableDefinition<(&str, u64), Vec<OldRecord<'static>>> =
    TableDefinition::new("inbox/2");
const USAGE: TableDefinition<&str, (u32, u64)> = TableDefinition::new("mailbox_usage/1");
type ExpiryValue<'a> = (&'a str, Vec<(&'a str, &'a [u8; 16])>);
const EXPIRY: TableDefinition<(u64, u64), ExpiryValue<'static>> = TableDefinition::new("expiry/2");
const DEDUPE: TableDefinition<(&str, &str, &[u8; 16]), (u64, u64)> =
    TableDefinition::new("dedupe/1");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters/1");

/// Records in the old database: more than one migration transaction
/// (16,384 records each).
const OLD_RECORDS: u64 = 20_000;
/// Records per `inbox/2` row (one group commit's run).
const PER_ROW: u64 = 8;
const RECIPIENTS: [&str; 3] = ["bob", "carol", "dave"];

/// The old record of `seq`: (recipient, group, sent_at, body).
fn old_record(seq: u64) -> (&'static str, Option<&'static str>, u64, Vec<u8>) {
    let row = (seq - 1) / PER_ROW;
    let group = seq.is_multiple_of(5).then_some("friends");
    let len = 40 + (seq % 57) as usize;
    (
        RECIPIENTS[(row % 3) as usize],
        group,
        1_000 + row,
        body(seq, len),
    )
}

fn table_names(path: &Path) -> Vec<String> {
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_read().unwrap();
    tx.list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect()
}

/// Writes [`OLD_RECORDS`] envelopes the way the `inbox/2` layout held them,
/// with the usage, expiry, dedupe and counter rows that go with them.
fn write_inbox_2(path: &Path, ttl: u64) {
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut inbox = tx.open_table(OLD_INBOX).unwrap();
        let mut expiry = tx.open_table(EXPIRY).unwrap();
        let mut dedupe = tx.open_table(DEDUPE).unwrap();
        let mut totals: HashMap<&str, (u32, u64)> = HashMap::new();
        for first in (1..=OLD_RECORDS).step_by(PER_ROW as usize) {
            let old: Vec<_> = (first..first + PER_ROW)
                .map(|seq| (seq, message_id(seq), old_record(seq)))
                .collect();
            let (recipient, _, sent_at, _) = old[0].2;
            let expires_at = sent_at + ttl;
            let records: Vec<OldRecord<'_>> = old
                .iter()
                .map(|(seq, id, r)| (*seq, "alice", r.1, id, sent_at, expires_at, &r.3[..]))
                .collect();
            inbox.insert((recipient, first), records).unwrap();
            let keys: Vec<(&str, &[u8; 16])> = old.iter().map(|(_, id, _)| ("alice", id)).collect();
            expiry
                .insert((expires_at, first), (recipient, keys))
                .unwrap();
            let total = totals.entry(recipient).or_default();
            for (seq, id, r) in &old {
                dedupe
                    .insert((recipient, "alice", id), (*seq, expires_at))
                    .unwrap();
                *total = (total.0 + 1, total.1 + r.3.len() as u64);
            }
        }
        let mut usage = tx.open_table(USAGE).unwrap();
        for (recipient, total) in totals {
            usage.insert(recipient, total).unwrap();
        }
        let mut counters = tx.open_table(COUNTERS).unwrap();
        counters.insert("next_seq", OLD_RECORDS + 1).unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn inbox_2_bodies_move_to_segments_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    for name in ["alice"].iter().chain(&RECIPIENTS) {
        store.create_account(account(name), Vec::new()).unwrap();
    }
    drop(store);
    fs::remove_dir_all(bodies_dir(&path)).unwrap();
    write_inbox_2(&path, StoreOptions::default().envelope_ttl_secs);

    // Each migration transaction's bodies (well over 64 KiB) fill a segment.
    let opts = options(64 * 1024);
    let store = Store::open(&path, opts).unwrap();
    assert_eq!(
        segment_files(&path).keys().cloned().collect::<Vec<_>>(),
        vec![seg(1), seg(2)]
    );
    let mut seen = 0;
    for recipient in RECIPIENTS {
        let pending = store.pending(recipient, 0, usize::MAX).unwrap();
        let mut bytes = 0;
        for r in &pending {
            let (to, group, sent_at, body) = old_record(r.seq);
            assert_eq!(to, recipient);
            assert_eq!(r.sender, "alice");
            assert_eq!(r.group.as_deref(), group);
            assert_eq!(r.message_id, message_id(r.seq));
            assert_eq!(r.sent_at, sent_at);
            assert_eq!(r.body, body, "body of seq {}", r.seq);
            bytes += r.body.len() as u64;
        }
        assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
        let usage = store.mailbox_usage(recipient).unwrap();
        assert_eq!(usage, (pending.len() as u32, bytes));
        seen += pending.len() as u64;
    }
    assert_eq!(seen, OLD_RECORDS);
    assert!(store.check_integrity().unwrap());

    // Dedupe and the sequence counter carry over.
    let old = env("bob", 1, 1_000);
    let fresh = env("bob", OLD_RECORDS + 1, 1_000);
    let results = store.append(vec![old, fresh]);
    assert!(matches!(
        results[0],
        Ok(AppendOutcome::Duplicate { seq: 1 })
    ));
    assert!(matches!(
        results[1],
        Ok(AppendOutcome::Stored { seq }) if seq == OLD_RECORDS + 1
    ));

    // Every old dedupe record was re-keyed (two chunks of `dedupe/1`):
    // each migrated message sent again is a duplicate of its own seq.
    let again: Vec<NewEnvelope> = (1..=OLD_RECORDS)
        .map(|seq| env(old_record(seq).0, seq, 2_000))
        .collect();
    let results = store.append(again);
    for (seq, result) in (1..=OLD_RECORDS).zip(&results) {
        assert!(
            matches!(result, Ok(AppendOutcome::Duplicate { seq: s }) if *s == seq),
            "seq {seq}: {result:?}"
        );
    }
    drop(store);

    let names = table_names(&path);
    assert!(!names.iter().any(|n| n == "inbox/2"), "{names:?}");
    assert!(names.iter().any(|n| n == "inbox/3"), "{names:?}");
    assert!(!names.iter().any(|n| n == "dedupe/1"), "{names:?}");
    assert!(names.iter().any(|n| n == "dedupe/2"), "{names:?}");
    let store = Store::open(&path, opts).unwrap();
    let carol_rows = (0..OLD_RECORDS / PER_ROW)
        .filter(|row| row % 3 == 1)
        .count();
    let carol = store.pending("carol", 0, usize::MAX).unwrap();
    assert_eq!(carol.len() as u64, carol_rows as u64 * PER_ROW);
    assert!(store.check_integrity().unwrap());
}
