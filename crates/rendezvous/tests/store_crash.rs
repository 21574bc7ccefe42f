//! T-58: a power-loss model of the store, in the style of redb's
//! `tests/crash_consistency.rs`. A storage backend records every write,
//! `set_len` and `sync_data` of a workload of appends (with file growth),
//! acks and purges. Crash images are then built from that log: the state
//! made durable by each sync, and that state with the writes of the next,
//! unfinished sync period applied in part (dropped, applied, torn at a
//! sector, or applied in order up to a point). Every image must open with
//! [`Store::open`], hold exactly the state after some prefix of the
//! workload's steps (at least every step whose commit had returned), and
//! never fail as corrupted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use messenger_rendezvous::store::{
    AccountRecord, NewEnvelope, StorageBackend, Store, StoreError, StoreOptions,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Sector size for torn writes: a write that is cut short keeps a whole
/// number of sectors.
const SECTOR: usize = 512;

/// Far past every envelope's `sent_at`: purges at this time remove the
/// envelopes sent "long ago".
const NOW: u64 = 1_000_000_000;

/// Segment size for the workload: small, so segments fill, and emptied
/// ones are deleted, many times over.
const SEGMENT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Sync,
}

/// The segment files of envelope bodies at one moment: (name, contents).
type Snapshot = Vec<(String, Vec<u8>)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut files: Snapshot = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().into_string().unwrap(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[derive(Debug, Default)]
struct Recorded {
    live: Vec<u8>,
    log: Vec<Op>,
    /// Where the store keeps its segment files (real files, not recorded op
    /// by op).
    bodies: std::path::PathBuf,
    /// The segment files at each sync of the database, in order. The store
    /// writes and syncs a commit's bodies before the commit's first
    /// database write, and deletes an emptied segment only after the
    /// durable commit that emptied it returned, so the files as they were
    /// at the sync that ends a sync period hold every body any image of
    /// that period can refer to.
    snapshots: Vec<Snapshot>,
}

impl Recorded {
    fn syncs(&self) -> usize {
        self.log.iter().filter(|op| matches!(op, Op::Sync)).count()
    }
}

/// A memory-backed file that records what was done to it.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Recorded>>);

impl StorageBackend for Recorder {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.0.lock().unwrap();
        let start = usize::try_from(offset).unwrap();
        let end = start + out.len();
        if end > state.live.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        out.copy_from_slice(&state.live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.0.lock().unwrap();
        state.live.resize(usize::try_from(len).unwrap(), 0);
        state.log.push(Op::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.0.lock().unwrap();
        state.log.push(Op::Sync);
        let files = snapshot(&state.bodies);
        state.snapshots.push(files);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.0.lock().unwrap();
        apply(&mut state.live, offset, data);
        state.log.push(Op::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

fn apply(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).unwrap();
    if image.len() < start + data.len() {
        image.resize(start + data.len(), 0);
    }
    image[start..start + data.len()].copy_from_slice(data);
}

fn apply_op(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => apply(image, *offset, data),
        Op::SetLen(len) => image.resize(usize::try_from(*len).unwrap(), 0),
        Op::Sync => {}
    }
}

const RECIPIENTS: [&str; 3] = ["bob", "carol", "dave"];

/// What the workload can observe: every recipient's pending envelopes
/// (sequence number, id, body hash).
type Digest = Vec<Vec<(u64, [u8; 16], u64)>>;

fn digest(store: &Store) -> Result<Digest, StoreError> {
    let mut out = Vec::new();
    for r in RECIPIENTS {
        let mut mailbox = Vec::new();
        let mut after = 0;
        loop {
            let page = store.pending(r, after, 500)?;
            if page.is_empty() {
                break;
            }
            for e in page {
                let mut h = DefaultHasher::new();
                e.body.hash(&mut h);
                after = e.seq;
                mailbox.push((e.seq, e.message_id, h.finish()));
            }
        }
        out.push(mailbox);
    }
    Ok(out)
}

fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 1,
    }
}

/// One workload step's place in the log and the state after it.
struct Step {
    syncs_before: usize,
    syncs_after: usize,
    /// A durable commit (not an ack, which commits without its own sync;
    /// an ack that grows the file still syncs while growing, before its
    /// commit, so a sync during a step does not make it durable).
    durable: bool,
    state: Digest,
}

/// Runs the workload on a recorder; returns the log and the steps (step 0
/// is the state before anything, the empty store).
/// The bodies' snapshots at each sync and at the end.
fn record_workload(
    options: StoreOptions,
    steps: usize,
    seed: u64,
) -> (Vec<Op>, Vec<Step>, Vec<Snapshot>, Snapshot) {
    let bodies = tempfile::tempdir().unwrap();
    let recorder = Recorder::default();
    recorder.0.lock().unwrap().bodies = bodies.path().to_owned();
    let factory = {
        let r = recorder.clone();
        move || Ok(r.clone())
    };
    let store = Store::open_with_backend(factory, bodies.path(), options).unwrap();
    let syncs = || recorder.0.lock().unwrap().syncs();
    // Step 0: creating the database and its tables.
    let mut out = vec![Step {
        syncs_before: 0,
        syncs_after: syncs(),
        durable: true,
        state: vec![Vec::new(); RECIPIENTS.len()],
    }];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counter = 0u32;
    for name in ["alice", "bob", "carol", "dave"] {
        let before = syncs();
        store.create_account(account(name), Vec::new()).unwrap();
        out.push(Step {
            syncs_before: before,
            syncs_after: syncs(),
            durable: true,
            state: digest(&store).unwrap(),
        });
    }
    for _ in 0..steps {
        let before = syncs();
        let kind = rng.random_range(0..10);
        match kind {
            // Appends, some large: the file grows through the run.
            0..=5 => {
                let n = rng.random_range(1..=12);
                let batch = (0..n)
                    .map(|_| {
                        counter += 1;
                        let mut message_id = [0u8; 16];
                        message_id[..4].copy_from_slice(&counter.to_be_bytes());
                        let len = if rng.random_bool(0.2) {
                            rng.random_range(8_000..40_000)
                        } else {
                            rng.random_range(100..2_000)
                        };
                        NewEnvelope {
                            recipient: RECIPIENTS[rng.random_range(0..RECIPIENTS.len())].to_owned(),
                            sender: "alice".to_owned(),
                            group: None,
                            message_id,
                            // A third are old enough to be purged.
                            sent_at: if rng.random_bool(0.33) { 1 } else { NOW },
                            body: vec![(counter % 251) as u8; len],
                        }
                    })
                    .collect();
                for r in store.append(batch) {
                    r.unwrap();
                }
            }
            6..=8 => {
                let r = RECIPIENTS[rng.random_range(0..RECIPIENTS.len())];
                let pending = store.pending(r, 0, 100).unwrap();
                let seqs: Vec<u64> = pending
                    .iter()
                    .filter(|_| rng.random_bool(0.5))
                    .map(|e| e.seq)
                    .collect();
                store.ack(r, &seqs).unwrap();
            }
            _ => {
                store.purge_expired(NOW).unwrap();
            }
        }
        out.push(Step {
            syncs_before: before,
            syncs_after: syncs(),
            durable: !(6..=8).contains(&kind),
            state: digest(&store).unwrap(),
        });
    }
    drop(store);
    let state = recorder.0.lock().unwrap();
    (
        state.log.clone(),
        out,
        state.snapshots.clone(),
        snapshot(bodies.path()),
    )
}

/// Opens `image` with [`Store::open`] and checks it holds the state after
/// a step in `lowest..=highest`; returns that step.
fn check_image(
    path: &Path,
    (image, bodies): (&[u8], &Snapshot),
    options: StoreOptions,
    steps: &[Step],
    lowest: usize,
    highest: usize,
    what: &str,
) -> usize {
    std::fs::write(path, image).unwrap();
    let dir = path.with_file_name("crash.redb.bodies");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir(&dir).unwrap();
    for (name, contents) in bodies {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    let store = match Store::open(path, options) {
        Ok(store) => store,
        // Before the database was first created durably there is nothing
        // to recover, and redb refuses a half-created file (not as
        // corrupted). `Store::open` never leaves one at the real path: it
        // creates under `<name>.creating` and renames once complete, and
        // removes a leftover at the next open (`store/create.rs` tests).
        // Here the image is written straight to the path, so redb's own
        // refusal is what shows.
        Err(e @ StoreError::Storage { .. })
            if lowest == 0 && highest == 0 && steps[0].syncs_after > 0 =>
        {
            let text = format!("{e:?}");
            assert!(text.contains("Not a redb database"), "{what}: {text}");
            std::fs::remove_file(path).unwrap();
            return usize::MAX;
        }
        Err(e) => panic!("{what}: the crash image does not open: {e} ({e:?})"),
    };
    let state = digest(&store).unwrap_or_else(|e| panic!("{what}: reading failed: {e}"));
    let found = (lowest..=highest)
        .rev()
        .find(|&i| steps[i].state == state)
        .unwrap_or_else(|| {
            panic!("{what}: the state is not that after any step in {lowest}..={highest}")
        });
    match store.check_integrity() {
        Ok(_) => {}
        Err(e) => panic!("{what}: integrity check failed: {e}"),
    }
    drop(store);
    std::fs::remove_file(path).unwrap();
    found
}

/// Builds and checks the crash images of one recorded workload; returns the
/// number of images checked.
fn crash_images(options: StoreOptions, steps: usize, seed: u64) -> usize {
    let (log, steps, snapshots, last) = record_workload(options, steps, seed);
    let segments_seen: std::collections::BTreeSet<&String> = snapshots
        .iter()
        .flat_map(|files| files.iter().map(|(name, _)| name))
        .collect();
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("crash.redb");
    let sync_at: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, op)| matches!(op, Op::Sync))
        .map(|(i, _)| i)
        .collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED);
    let mut durable: Vec<u8> = Vec::new();
    let mut checked = 0;
    let mut grew = 0;
    let mut refused_unformatted = 0;
    let mut check = |image: &[u8], k: usize, lowest: usize, highest: usize, what: String| {
        checked += 1;
        let bodies = snapshots.get(k).unwrap_or(&last);
        if check_image(
            &path,
            (image, bodies),
            options,
            &steps,
            lowest,
            highest,
            &what,
        ) == usize::MAX
        {
            refused_unformatted += 1;
        }
    };
    // Epoch k: the durable state after k syncs, and the ops until the next.
    for k in 0..=sync_at.len() {
        let from = if k == 0 { 0 } else { sync_at[k - 1] + 1 };
        let to = sync_at.get(k).copied().unwrap_or(log.len());
        let epoch = &log[from..to];
        // Steps whose durable commit returned by sync k must be there, with
        // every step before them; steps that had started may be. An ack is
        // not durable on its own (`Store::ack` commits without a sync): it
        // is owed only once a later durable commit has returned.
        let lowest = steps
            .iter()
            .rposition(|s| s.durable && s.syncs_after <= k && s.syncs_after > s.syncs_before)
            .unwrap_or(0);
        // Step 0 (the empty database) is only owed once its creation's
        // syncs are done.
        let highest = steps.iter().rposition(|s| s.syncs_before <= k).unwrap_or(0);
        if epoch.iter().any(|op| matches!(op, Op::SetLen(_))) {
            grew += 1;
        }
        if !durable.is_empty() {
            check(&durable, k, lowest, highest, format!("after sync {k}"));
        }
        if !epoch.is_empty() {
            // Each unsynced op dropped or kept at random, writes sometimes
            // torn at a sector boundary.
            for variant in 0..2 {
                let mut image = durable.clone();
                for op in epoch {
                    if !rng.random_bool(0.5) {
                        continue;
                    }
                    match op {
                        Op::Write { offset, data } if rng.random_bool(0.3) => {
                            let sectors = data.len().div_ceil(SECTOR);
                            let keep = (rng.random_range(0..sectors) * SECTOR).min(data.len());
                            apply(&mut image, *offset, &data[..keep]);
                        }
                        other => apply_op(&mut image, other),
                    }
                }
                if !image.is_empty() {
                    check(
                        &image,
                        k,
                        lowest,
                        highest,
                        format!("sync {k}, random subset {variant}"),
                    );
                }
            }
            // Written back in order up to a random point.
            let cut = rng.random_range(0..epoch.len());
            let mut image = durable.clone();
            for op in &epoch[..cut] {
                apply_op(&mut image, op);
            }
            if !image.is_empty() {
                check(
                    &image,
                    k,
                    lowest,
                    highest,
                    format!("sync {k}, in order up to op {cut}"),
                );
            }
        }
        for op in epoch {
            apply_op(&mut durable, op);
        }
    }
    let final_size = durable.len();
    eprintln!(
        "T-58 (two-phase commit {}): {} steps, {} syncs, {checked} crash images \
         ({refused_unformatted} from before the database was first created, refused \
         as not a redb file), {grew} sync periods with file growth, final file {final_size} bytes, \
         {} segment files made, {} left",
        options.two_phase_commit,
        steps.len() - 1,
        sync_at.len(),
        segments_seen.len(),
        last.len(),
    );
    assert!(grew >= 3, "the workload must grow the file");
    assert!(
        segments_seen.len() >= last.len() + 3,
        "the workload must fill segments and delete emptied ones"
    );
    checked
}

#[test]
fn t58_crash_images_with_two_phase_commit() {
    let options = StoreOptions {
        segment_max_bytes: SEGMENT,
        ..StoreOptions::default()
    };
    let checked = crash_images(options, 150, 58);
    assert!(checked > 100);
}

#[test]
fn t58_crash_images_with_one_phase_commit() {
    let options = StoreOptions {
        two_phase_commit: false,
        segment_max_bytes: SEGMENT,
        ..StoreOptions::default()
    };
    let checked = crash_images(options, 150, 59);
    assert!(checked > 100);
}
