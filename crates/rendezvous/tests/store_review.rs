//! Regression tests of a review of the segment store: deferred segment
//! deletions across reopens (by `check_integrity` and after failures), I/O
//! errors of segment files, recovery that refuses a bodies directory that
//! does not belong to the database, a reopen after any failed commit, a damaged body length, strict segment names and
//! what `compact_segments` counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Fault, open_faulty};
use messenger_rendezvous::store::{
    AccountRecord, AppendOutcome, NewEnvelope, Store, StoreError, StoreOptions, bodies_dir,
};
use redb::{ReadableTable as _, TableDefinition};

/// Segment size: four 1 KiB bodies fill one.
const SEGMENT: u64 = 4096;
const BODY: usize = 1024;

fn options() -> StoreOptions {
    StoreOptions {
        segment_max_bytes: SEGMENT,
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

fn message_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id
}

/// Envelope `n` to bob with a body of `len` bytes.
fn env_len(n: u64, len: usize) -> NewEnvelope {
    NewEnvelope {
        recipient: "bob".to_owned(),
        sender: "alice".to_owned(),
        group: None,
        message_id: message_id(n),
        sent_at: 100,
        body: vec![(n % 251) as u8; len],
    }
}

fn env(n: u64) -> NewEnvelope {
    env_len(n, BODY)
}

fn users(store: &Store, names: &[&str]) {
    for name in names {
        store.create_account(account(name), Vec::new()).unwrap();
    }
}

fn stored(result: &Result<AppendOutcome, StoreError>) -> u64 {
    match result {
        Ok(AppendOutcome::Stored { seq }) => *seq,
        other => panic!("expected Stored, got {other:?}"),
    }
}

/// Appends envelopes `ns` to bob, one commit each; returns their seqs.
fn append_each(store: &Store, ns: std::ops::Range<u64>) -> Vec<u64> {
    ns.map(|n| stored(&store.append(vec![env(n)])[0])).collect()
}

fn seg(n: u64) -> String {
    format!("{n:016x}.seg")
}

/// File name -> length, of every file in the bodies directory.
fn body_files(path: &Path) -> BTreeMap<String, u64> {
    fs::read_dir(bodies_dir(path))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect()
}

fn has_segment(path: &Path, n: u64) -> bool {
    bodies_dir(path).join(seg(n)).exists()
}

/// Bob's waiting seqs, with each body checked.
fn bob_waiting(store: &Store) -> Vec<u64> {
    store
        .pending("bob", 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| {
            let n = u64::from_be_bytes(e.message_id[..8].try_into().unwrap());
            assert_eq!(e.body, env(n).body, "body of seq {}", e.seq);
            e.seq
        })
        .collect()
}

/// A store through a fault backend with alice and bob, and eight bodies
/// for bob in segments 1 and 2 (both full).
fn faulty_with_two_segments(dir: &Path) -> (PathBuf, Arc<Fault>, Store, Vec<u64>) {
    let path = dir.join("s.redb");
    let fault = Arc::new(Fault::default());
    let store = open_faulty(&path, &fault, options()).unwrap();
    users(&store, &["alice", "bob"]);
    let seqs = append_each(&store, 0..8);
    assert!(has_segment(&path, 1) && has_segment(&path, 2));
    (path, fault, store, seqs)
}

/// Finding 1: `check_integrity` reopened a failed database without sorting
/// out the deferred deletions. The relaxed ack that emptied segment 1 was
/// rolled back by the failure, so its rows were back, and the next durable
/// commit deleted the file anyway: bodies lost, `Corrupt` at the next open.
#[test]
fn check_integrity_reopen_forgets_deletions_of_rolled_back_acks() {
    let dir = tempfile::tempdir().unwrap();
    let (path, fault, store, seqs) = faulty_with_two_segments(dir.path());
    assert_eq!(store.ack("bob", &seqs[..4]).unwrap(), 4);
    fault.arm(0);
    assert!(matches!(
        store.create_account(account("carol"), Vec::new()),
        Err(StoreError::StorageFull { .. })
    ));
    fault.disarm();
    // The first operation after the failure: it reopens the database.
    assert!(store.check_integrity().unwrap());
    assert_eq!(bob_waiting(&store), seqs, "the failure rolled the ack back");
    users(&store, &["dave"]);
    assert!(has_segment(&path, 1), "segment 1 holds waiting bodies");
    assert_eq!(bob_waiting(&store), seqs);
    assert!(store.check_integrity().unwrap());
    drop(store);
    let store = Store::open(&path, options()).unwrap();
    assert_eq!(bob_waiting(&store), seqs);
}

/// Finding 3: an I/O error of a segment file (here: the next segment
/// cannot be created) marked the database failed; the needless reopen
/// forgot the segment a relaxed ack had emptied, and its file stayed until
/// the next start.
#[test]
fn a_segment_file_error_does_not_reopen_or_leak_emptied_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _fault, store, seqs) = faulty_with_two_segments(dir.path());
    assert_eq!(store.ack("bob", &seqs[..4]).unwrap(), 4);
    // Segment 2 is full: the next append starts segment 3, which fails.
    let blocker = bodies_dir(&path).join(seg(3));
    fs::create_dir(&blocker).unwrap();
    let failed = store.append(vec![env(8)]);
    assert!(
        matches!(failed[0], Err(StoreError::Storage { .. })),
        "{failed:?}"
    );
    fs::remove_dir(&blocker).unwrap();
    let more = append_each(&store, 9..10);
    assert!(
        !has_segment(&path, 1),
        "the durable append deletes segment 1: {:?}",
        body_files(&path)
    );
    assert_eq!(bob_waiting(&store), [&seqs[4..], &more[..]].concat());
    assert!(store.check_integrity().unwrap());
}

/// Finding 3, after a reopen: a durable commit whose last `fsync` reports
/// an error after it synced made the ack durable; the reopen must keep
/// segment 1 (no row came back) for deletion after the next durable commit
/// instead of forgetting it.
#[test]
fn a_reopen_keeps_deferred_segments_that_have_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let (path, fault, store, seqs) = faulty_with_two_segments(dir.path());
    assert_eq!(store.ack("bob", &seqs[..4]).unwrap(), 4);
    fault.fail_sync(2); // two-phase commit: the second sync is the header's
    assert!(store.create_account(account("carol"), Vec::new()).is_err());
    fault.disarm();
    assert!(
        store.account("carol").unwrap().is_some(),
        "it was committed"
    );
    assert_eq!(bob_waiting(&store), &seqs[4..], "and with it the ack");
    assert!(has_segment(&path, 1));
    users(&store, &["dave"]);
    assert!(
        !has_segment(&path, 1),
        "deleted after the next durable commit"
    );
    assert_eq!(bob_waiting(&store), &seqs[4..]);
    assert!(store.check_integrity().unwrap());
}

/// Finding 3, the other way: when the failed commit did not reach the file
/// (the disk is full), the ack is rolled back and the reopen drops segment
/// 1 from the deletions.
#[test]
fn a_reopen_drops_deferred_segments_whose_rows_came_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, fault, store, seqs) = faulty_with_two_segments(dir.path());
    assert_eq!(store.ack("bob", &seqs[..4]).unwrap(), 4);
    fault.arm(0);
    assert!(store.create_account(account("carol"), Vec::new()).is_err());
    fault.disarm();
    assert!(store.account("carol").unwrap().is_none());
    assert_eq!(bob_waiting(&store), seqs);
    users(&store, &["dave"]);
    assert!(has_segment(&path, 1));
    assert_eq!(bob_waiting(&store), seqs);
    assert!(store.check_integrity().unwrap());
}

/// Six bodies for bob in segments 1 (full) and 2; the store closed.
fn closed_store(dir: &Path) -> PathBuf {
    let path = dir.join("s.redb");
    let store = Store::open(&path, options()).unwrap();
    users(&store, &["alice", "bob"]);
    append_each(&store, 0..6);
    path
}

fn corrupt_message(result: Result<Store, StoreError>) -> String {
    match result {
        Err(StoreError::Corrupt(msg)) => msg,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Finding 4: a database that names no segment (deleted and created anew,
/// or an old backup) beside segment files deleted them all at open.
#[test]
fn open_refuses_segment_files_beside_a_database_that_names_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    let before = body_files(&path);
    fs::remove_file(&path).unwrap();
    let msg = corrupt_message(Store::open(&path, options()));
    let bodies = bodies_dir(&path);
    assert!(msg.contains(&bodies.display().to_string()), "{msg}");
    assert!(msg.contains("operations.md"), "{msg}");
    assert_eq!(body_files(&path), before, "nothing deleted");
}

/// Finding 4: only the segment after the newest can be left by a batch
/// that never committed; one numbered past it was deleted at open.
#[test]
fn open_refuses_a_segment_file_numbered_past_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    fs::write(bodies_dir(&path).join(seg(4)), b"bodies of another life").unwrap();
    // Past segment 2's committed end: not cut either when open refuses.
    let mut newest = fs::OpenOptions::new()
        .append(true)
        .open(bodies_dir(&path).join(seg(2)))
        .unwrap();
    std::io::Write::write_all(&mut newest, &[0xAB; 100]).unwrap();
    drop(newest);
    let before = body_files(&path);
    let msg = corrupt_message(Store::open(&path, options()));
    assert!(msg.contains(&seg(4)), "{msg}");
    assert_eq!(body_files(&path), before, "nothing deleted");
    // The leftover of an uncommitted rollover is still cleaned up.
    fs::remove_file(bodies_dir(&path).join(seg(4))).unwrap();
    fs::write(bodies_dir(&path).join(seg(3)), b"uncommitted batch").unwrap();
    let store = Store::open(&path, options()).unwrap();
    assert!(!has_segment(&path, 3));
    assert_eq!(bob_waiting(&store).len(), 6);
}

/// Cosmetic: names that `from_str_radix` accepts but the store never
/// writes (upper case, a leading `+`) are not segments: left alone.
#[test]
fn files_not_named_exactly_as_segments_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    let bodies = bodies_dir(&path);
    for name in ["00000000000000FF.seg", "+000000000000003.seg"] {
        fs::write(bodies.join(name), b"not ours").unwrap();
    }
    let before = body_files(&path);
    let store = Store::open(&path, options()).unwrap();
    assert_eq!(body_files(&path), before);
    assert_eq!(bob_waiting(&store).len(), 6);
    drop(store);
    // Nor do they count as segments beside a database that names none.
    let other = dir.path().join("other.redb");
    fs::create_dir(bodies_dir(&other)).unwrap();
    fs::write(bodies_dir(&other).join("000000000000000A.seg"), b"x").unwrap();
    Store::open(&other, options()).unwrap();
}

/// Finding 6: a commit that fails other than by an I/O error (here it
/// unwinds out of the backend) leaves redb refusing every write
/// transaction ("allocator state was discarded") until the database is
/// reopened, and the store did not reopen: it stayed `Corrupt`.
#[test]
fn a_commit_that_fails_part_way_is_followed_by_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let fault = Arc::new(Fault::default());
    let store = open_faulty(&path, &fault, options()).unwrap();
    users(&store, &["alice"]);
    fault.panic_in_next_commit();
    let unwound = catch_unwind(AssertUnwindSafe(|| {
        store.create_account(account("carol"), Vec::new())
    }));
    assert!(unwound.is_err());
    fault.disarm();
    users(&store, &["dave"]);
    assert!(store.account("dave").unwrap().is_some());
    assert!(store.check_integrity().unwrap());
}

/// Virtual memory high-water mark of this process, in KiB.
fn vm_peak_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmPeak:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

type Record<'a> = (
    u64,
    &'a str,
    Option<&'a str>,
    &'a [u8; 16],
    u64,
    u64,
    (u64, u64, u32, u32),
);
/// A [`Record`] copied out of its row (no group: these have none).
type OwnedRecord = (u64, String, [u8; 16], u64, u64, (u64, u64, u32, u32));
const INBOX: TableDefinition<(&str, u64), Vec<Record<'static>>> = TableDefinition::new("inbox/3");

/// Finding 7: a body length taken from a damaged row was allocated before
/// anything checked it (up to 4 GiB per body read).
#[test]
fn a_body_length_past_its_segment_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_store(dir.path());
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut inbox = tx.open_table(INBOX).unwrap();
            let (key, mut records) = {
                let (key, value) = inbox.first().unwrap().unwrap();
                let (recipient, first) = key.value();
                let records: Vec<OwnedRecord> = value
                    .value()
                    .into_iter()
                    .map(|r| (r.0, r.1.to_owned(), *r.3, r.4, r.5, r.6))
                    .collect();
                ((recipient.to_owned(), first), records)
            };
            records[0].5.2 = u32::MAX; // about 4 GiB
            let rows: Vec<Record<'_>> = records
                .iter()
                .map(|r| (r.0, r.1.as_str(), None, &r.2, r.3, r.4, r.5))
                .collect();
            inbox.insert((key.0.as_str(), key.1), rows).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = Store::open(&path, options()).unwrap();
    let before = vm_peak_kib();
    let result = store.pending("bob", 0, usize::MAX);
    let grown = vm_peak_kib() - before;
    assert!(grown < 1024 * 1024, "{grown} KiB more virtual memory");
    match result {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("past the end"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        store.check_integrity(),
        Err(StoreError::Corrupt(_))
    ));
}

/// Cosmetic: `Compacted::segments` counted the full, empty newest segment
/// that the compaction's own append dropped when it started a new one.
#[test]
fn compaction_counts_only_the_segments_it_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, options()).unwrap();
    users(&store, &["alice", "bob"]);
    // Segment 1: 100 + 4000 bytes (full); only the 100 stay waiting.
    let small = stored(&store.append(vec![env_len(0, 100)])[0]);
    let big = stored(&store.append(vec![env_len(1, 4000)])[0]);
    // Segment 2: full, then emptied; as the newest it keeps its row.
    let second = append_each(&store, 2..6);
    assert_eq!(store.ack("bob", &[big]).unwrap(), 1);
    assert_eq!(store.ack("bob", &second).unwrap(), 4);
    assert!(has_segment(&path, 2));
    // Moving the 100 bytes starts segment 3 and drops segment 2 on the way.
    let done = store.compact_segments().unwrap();
    assert_eq!((done.bodies, done.bytes), (1, 100));
    assert_eq!(done.segments, 1, "{done:?}");
    assert!(!has_segment(&path, 1) && !has_segment(&path, 2));
    let waiting = store.pending("bob", 0, usize::MAX).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!((waiting[0].seq, &waiting[0].body), (small, &vec![0; 100]));
    assert!(store.check_integrity().unwrap());
}
