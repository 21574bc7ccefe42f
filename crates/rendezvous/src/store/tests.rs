use super::*;
use redb::ReadableTable as _;

fn store_with(options: StoreOptions) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb"), options).unwrap();
    (dir, store)
}

fn store() -> (tempfile::TempDir, Store) {
    store_with(StoreOptions::default())
}

/// A test account (also used by the tests of `create`).
pub(crate) fn account(name: &str) -> AccountRecord {
    AccountRecord {
        username: name.to_owned(),
        identity: vec![1; 32],
        signed_prekey: vec![2; 96],
        registered_at: 5,
    }
}

fn users(store: &Store, names: &[&str]) {
    for name in names {
        store.create_account(account(name), Vec::new()).unwrap();
    }
}

fn env(to: &str, from: &str, id: u8, sent_at: u64, body: &[u8]) -> NewEnvelope {
    NewEnvelope {
        recipient: to.to_owned(),
        sender: from.to_owned(),
        group: None,
        message_id: [id; 16],
        sent_at,
        body: body.to_vec(),
    }
}

fn stored(result: &Result<AppendOutcome, StoreError>) -> u64 {
    match result {
        Ok(AppendOutcome::Stored { seq }) => *seq,
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[test]
fn accounts_create_read_rotate() {
    let (_d, s) = store();
    s.create_account(account("alice"), vec![(1, vec![9; 32])])
        .unwrap();
    assert_eq!(s.account("alice").unwrap(), Some(account("alice")));
    assert_eq!(s.account("bob").unwrap(), None);
    assert!(matches!(
        s.create_account(account("alice"), Vec::new()),
        Err(StoreError::UserExists)
    ));
    s.set_signed_prekey("alice", &[7; 96]).unwrap();
    assert_eq!(
        s.account("alice").unwrap().unwrap().signed_prekey,
        vec![7; 96]
    );
    assert!(matches!(
        s.set_signed_prekey("bob", &[7; 96]),
        Err(StoreError::UnknownUser)
    ));
    assert_eq!(s.one_time_prekey_count("alice").unwrap(), 1);
}

#[test]
fn failed_create_account_stores_nothing() {
    let (_d, s) = store();
    let err = s
        .create_account(account("alice"), vec![(1, vec![1]), (1, vec![2])])
        .unwrap_err();
    assert!(matches!(err, StoreError::PrekeyIdReused(1)));
    assert_eq!(s.account("alice").unwrap(), None);
}

#[test]
fn invites_are_consumed_once() {
    let (_d, s) = store();
    s.add_invite([3; 32]).unwrap();
    assert!(!s.take_invite([4; 32]).unwrap());
    assert!(s.take_invite([3; 32]).unwrap());
    assert!(!s.take_invite([3; 32]).unwrap());
}

#[test]
fn bundles_hand_out_lowest_id_then_spk_only() {
    let (_d, s) = store();
    s.create_account(account("alice"), vec![(5, vec![5]), (2, vec![2])])
        .unwrap();
    let (acct, opk) = s.take_bundle("alice").unwrap().unwrap();
    assert_eq!(acct, account("alice"));
    assert_eq!(opk, Some((2, vec![2])));
    assert_eq!(s.one_time_prekey_count("alice").unwrap(), 1);
    assert_eq!(
        s.take_bundle("alice").unwrap().unwrap().1,
        Some((5, vec![5]))
    );
    assert_eq!(s.take_bundle("alice").unwrap().unwrap().1, None);
    assert_eq!(s.one_time_prekey_count("alice").unwrap(), 0);
    assert_eq!(s.take_bundle("nobody").unwrap(), None);
    assert!(matches!(
        s.one_time_prekey_count("nobody"),
        Err(StoreError::UnknownUser)
    ));
}

#[test]
fn prekey_ids_are_never_accepted_twice() {
    let (_d, s) = store();
    s.create_account(account("alice"), vec![(1, vec![1]), (2, vec![2])])
        .unwrap();
    s.take_bundle("alice").unwrap();
    // Id 1 was consumed; it must still be refused.
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(1, vec![1])]),
        Err(StoreError::PrekeyIdReused(1))
    ));
    // Id 2 is still stored.
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(3, vec![3]), (2, vec![2])]),
        Err(StoreError::PrekeyIdReused(2))
    ));
    // Duplicates inside one upload.
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(9, vec![9]), (9, vec![9])]),
        Err(StoreError::PrekeyIdReused(9))
    ));
    assert_eq!(
        s.add_one_time_prekeys("alice", vec![(4, vec![4]), (3, vec![3])])
            .unwrap(),
        3
    );
    assert!(matches!(
        s.add_one_time_prekeys("bob", vec![(1, vec![1])]),
        Err(StoreError::UnknownUser)
    ));
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(u32::MAX, vec![1])]),
        Ok(4)
    ));
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(u32::MAX, vec![1])]),
        Err(StoreError::PrekeyIdReused(u32::MAX))
    ));
}

#[test]
fn prekey_cap_at_the_edge_and_one_past() {
    let (_d, s) = store();
    users(&s, &["alice"]);
    let keys: Vec<OneTimePrekey> = (1..MAX_ONE_TIME_PREKEYS)
        .map(|i| (i, vec![0; 32]))
        .collect();
    assert_eq!(
        s.add_one_time_prekeys("alice", keys).unwrap(),
        MAX_ONE_TIME_PREKEYS - 1
    );
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(5000, vec![0]), (5001, vec![0])]),
        Err(StoreError::TooManyPrekeys {
            limit: MAX_ONE_TIME_PREKEYS
        })
    ));
    assert_eq!(
        s.add_one_time_prekeys("alice", vec![(5000, vec![0])])
            .unwrap(),
        MAX_ONE_TIME_PREKEYS
    );
    assert!(matches!(
        s.add_one_time_prekeys("alice", vec![(5001, vec![0])]),
        Err(StoreError::TooManyPrekeys { .. })
    ));
}

#[test]
fn append_stores_dedupes_and_fans_out() {
    let (_d, s) = store();
    users(&s, &["alice", "bob", "carol"]);
    let mut group_env = env("carol", "alice", 2, 10, b"g");
    group_env.group = Some("team".to_owned());
    let results = s.append(vec![
        env("bob", "alice", 1, 10, b"one"),
        group_env.clone(),
        env("bob", "alice", 1, 10, b"one"),
        env("dave", "alice", 3, 10, b"x"),
        env("bob", "carol", 1, 10, b"same id, other sender"),
    ]);
    let first = stored(&results[0]);
    let carol_seq = stored(&results[1]);
    assert!(matches!(results[2], Ok(AppendOutcome::Duplicate { seq }) if seq == first));
    assert!(matches!(results[3], Err(StoreError::UnknownUser)));
    let other = stored(&results[4]);
    assert!(first < carol_seq && carol_seq < other);

    let bob = s.pending("bob", 0, 10).unwrap();
    assert_eq!(bob.len(), 2);
    assert_eq!(bob[0].seq, first);
    assert_eq!(bob[0].body, b"one");
    assert_eq!(bob[1].sender, "carol");
    let carol = s.pending("carol", 0, 10).unwrap();
    assert_eq!(carol[0].group.as_deref(), Some("team"));
    assert_eq!(carol[0].message_id, [2; 16]);
    assert_eq!(s.mailbox_usage("bob").unwrap(), (2, 3 + 21));
    assert!(s.append(Vec::new()).is_empty());
}

#[test]
fn duplicate_after_ack_is_still_recognised() {
    let (_d, s) = store();
    users(&s, &["bob"]);
    let seq = stored(&s.append(vec![env("bob", "alice", 1, 10, b"x")])[0]);
    assert_eq!(s.ack("bob", &[seq]).unwrap(), 1);
    let again = s.append(vec![env("bob", "alice", 1, 10, b"x")]);
    assert!(matches!(again[0], Ok(AppendOutcome::Duplicate { seq: s2 }) if s2 == seq));
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
}

#[test]
fn commit_batch_appends_then_acks_in_one_transaction() {
    let (_d, s) = store();
    users(&s, &["alice", "bob"]);
    let old = stored(&s.append(vec![env("bob", "alice", 1, 1, b"old")])[0]);
    let out = s
        .commit_batch(
            &[
                env("bob", "alice", 2, 1, b"new"),
                env("nobody", "alice", 3, 1, b"x"),
            ],
            &[
                ("bob".to_owned(), vec![old, 999]),
                ("alice".to_owned(), vec![old]),
            ],
        )
        .unwrap();
    assert_eq!(out.appended.len(), 2);
    let new = stored(&out.appended[0]);
    assert!(new > old);
    assert!(matches!(out.appended[1], Err(StoreError::UnknownUser)));
    assert_eq!(out.acked, vec![1, 0]);
    let left = s.pending("bob", 0, 10).unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![new]);
    assert_eq!(s.mailbox_usage("bob").unwrap(), (1, 3));
    // An ack in the same batch as its append removes it (appends go first).
    let next = new + 1;
    let out = s
        .commit_batch(
            &[env("bob", "alice", 4, 1, b"gone")],
            &[("bob".to_owned(), vec![new, next])],
        )
        .unwrap();
    assert_eq!(stored(&out.appended[0]), next);
    assert_eq!(out.acked, vec![2]);
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    assert_eq!(s.mailbox_usage("bob").unwrap(), (0, 0));
    // Acks alone, and nothing at all.
    assert_eq!(
        s.commit_batch(&[], &[("bob".to_owned(), vec![next])])
            .unwrap()
            .acked,
        vec![0]
    );
    let empty = s.commit_batch(&[], &[]).unwrap();
    assert!(empty.appended.is_empty() && empty.acked.is_empty());
}

#[test]
fn pending_respects_after_and_max() {
    let (_d, s) = store();
    users(&s, &["bob"]);
    let seqs: Vec<u64> = s
        .append((0..10).map(|i| env("bob", "alice", i, 1, &[i])).collect())
        .iter()
        .map(stored)
        .collect();
    let page = s.pending("bob", seqs[3], 4).unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[4..8].to_vec()
    );
    assert!(s.pending("bob", u64::MAX, 4).unwrap().is_empty());
    assert!(s.pending("nobody", 0, 4).unwrap().is_empty());
}

#[test]
fn ack_only_removes_own_envelopes() {
    let (_d, s) = store();
    users(&s, &["alice", "bob"]);
    let a = stored(&s.append(vec![env("alice", "bob", 1, 1, b"for alice")])[0]);
    let b = stored(&s.append(vec![env("bob", "alice", 1, 1, b"for bob")])[0]);
    assert_eq!(s.ack("bob", &[a]).unwrap(), 0);
    assert_eq!(s.pending("alice", 0, 10).unwrap().len(), 1);
    assert_eq!(s.ack("bob", &[b, b, a, 999]).unwrap(), 1);
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    assert_eq!(s.mailbox_usage("bob").unwrap(), (0, 0));
    assert_eq!(s.mailbox_usage("alice").unwrap(), (1, 9));
    assert_eq!(s.ack("bob", &[]).unwrap(), 0);
}

#[test]
fn ack_without_its_own_fsync_is_kept_by_close_and_later_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let s = Store::open(&path, StoreOptions::default()).unwrap();
    users(&s, &["bob"]);
    let seqs: Vec<u64> = s
        .append((0..3).map(|i| env("bob", "alice", i, 1, b"m")).collect())
        .iter()
        .map(stored)
        .collect();
    // One ack followed by a durable commit, one ack with nothing after it.
    assert_eq!(s.ack("bob", &[seqs[0]]).unwrap(), 1);
    s.append(vec![env("bob", "carol", 9, 1, b"later")]);
    assert_eq!(s.ack("bob", &[seqs[1]]).unwrap(), 1);
    drop(s);
    let s = Store::open(&path, StoreOptions::default()).unwrap();
    let left: Vec<u64> = s
        .pending("bob", 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left.len(), 2);
    assert_eq!(left[0], seqs[2]);
    assert_eq!(s.mailbox_usage("bob").unwrap(), (2, 1 + 5));
}

#[test]
fn count_quota_at_the_edge_and_one_past() {
    let (_d, s) = store_with(StoreOptions {
        mailbox_max_messages: 3,
        ..StoreOptions::default()
    });
    users(&s, &["bob", "carol"]);
    let r = s.append((0..4).map(|i| env("bob", "alice", i, 1, b"x")).collect());
    assert!(
        r[..3]
            .iter()
            .all(|r| matches!(r, Ok(AppendOutcome::Stored { .. })))
    );
    assert!(matches!(
        r[3],
        Err(StoreError::QuotaExceeded {
            kind: QuotaKind::Count,
            limit: 3
        })
    ));
    // Other recipients are unaffected; an ack makes room again.
    assert!(matches!(
        s.append(vec![env("carol", "alice", 9, 1, b"x")])[0],
        Ok(AppendOutcome::Stored { .. })
    ));
    let first = s.pending("bob", 0, 1).unwrap()[0].seq;
    s.ack("bob", &[first]).unwrap();
    assert!(matches!(
        s.append(vec![env("bob", "alice", 3, 1, b"x")])[0],
        Ok(AppendOutcome::Stored { .. })
    ));
}

#[test]
fn byte_quota_at_the_edge_and_one_past() {
    let (_d, s) = store_with(StoreOptions {
        mailbox_max_bytes: 100,
        ..StoreOptions::default()
    });
    users(&s, &["bob"]);
    let r = s.append(vec![
        env("bob", "alice", 1, 1, &[0; 60]),
        env("bob", "alice", 2, 1, &[0; 41]),
        env("bob", "alice", 3, 1, &[0; 40]),
        env("bob", "alice", 4, 1, &[]),
    ]);
    assert!(matches!(r[0], Ok(AppendOutcome::Stored { .. })));
    assert!(matches!(
        r[1],
        Err(StoreError::QuotaExceeded {
            kind: QuotaKind::Bytes,
            limit: 100
        })
    ));
    assert!(matches!(r[2], Ok(AppendOutcome::Stored { .. })));
    assert!(matches!(r[3], Ok(AppendOutcome::Stored { .. })));
    assert_eq!(s.mailbox_usage("bob").unwrap(), (3, 100));
    assert!(matches!(
        s.append(vec![env("bob", "alice", 5, 1, &[0; 1])])[0],
        Err(StoreError::QuotaExceeded {
            kind: QuotaKind::Bytes,
            ..
        })
    ));
}

#[test]
fn expiry_with_injected_clock() {
    let ttl = 1000;
    let (_d, s) = store_with(StoreOptions {
        envelope_ttl_secs: ttl,
        ..StoreOptions::default()
    });
    users(&s, &["bob", "carol"]);
    let r = s.append(vec![
        env("bob", "alice", 1, 100, b"old"),
        env("carol", "alice", 1, 100, b"old too"),
        env("bob", "alice", 2, 500, b"new"),
    ]);
    let new_seq = stored(&r[2]);
    assert_eq!(s.purge_expired(100 + ttl - 1).unwrap().envelopes, 0);
    assert_eq!(s.pending("bob", 0, 10).unwrap().len(), 2);
    assert_eq!(s.purge_expired(100 + ttl).unwrap().envelopes, 2);
    let bob = s.pending("bob", 0, 10).unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0].seq, new_seq);
    assert!(s.pending("carol", 0, 10).unwrap().is_empty());
    assert_eq!(s.mailbox_usage("bob").unwrap(), (1, 3));
    assert_eq!(s.mailbox_usage("carol").unwrap(), (0, 0));
    // The dedupe record went with the expiry: the same id is new again.
    assert!(matches!(
        s.append(vec![env("bob", "alice", 1, 2000, b"again")])[0],
        Ok(AppendOutcome::Stored { .. })
    ));
    // Still inside its window, the new one is a duplicate.
    assert!(matches!(
        s.append(vec![env("bob", "alice", 2, 600, b"new")])[0],
        Ok(AppendOutcome::Duplicate { seq }) if seq == new_seq
    ));
    assert_eq!(s.purge_expired(500 + ttl).unwrap().envelopes, 1);
}

#[test]
fn expiry_after_ack_drops_the_dedupe_record_and_counts_no_envelope() {
    let ttl = 1000;
    let (_d, s) = store_with(StoreOptions {
        envelope_ttl_secs: ttl,
        ..StoreOptions::default()
    });
    users(&s, &["bob"]);
    let r = s.append(vec![
        env("bob", "alice", 1, 100, b"acked"),
        env("bob", "alice", 2, 100, b"waiting"),
        env("bob", "carol", 1, 100, b"also waiting"),
    ]);
    s.ack("bob", &[stored(&r[0])]).unwrap();
    // Acked, but its dedupe record stays until it expires.
    assert!(matches!(
        s.append(vec![env("bob", "alice", 1, 150, b"acked")])[0],
        Ok(AppendOutcome::Duplicate { .. })
    ));
    assert_eq!(s.mailbox_usage("bob").unwrap(), (2, 19));
    let purged = s.purge_expired(100 + ttl).unwrap();
    assert_eq!(purged.envelopes, 2);
    assert!(!purged.more);
    assert_eq!(s.mailbox_usage("bob").unwrap(), (0, 0));
    assert!(s.pending("bob", 0, 10).unwrap().is_empty());
    for (from, id) in [("alice", 1), ("alice", 2), ("carol", 1)] {
        assert!(matches!(
            s.append(vec![env("bob", from, id, 2000, b"new")])[0],
            Ok(AppendOutcome::Stored { .. })
        ));
    }
}

#[test]
fn one_batch_per_recipient_usage_and_quota() {
    let (_d, s) = store_with(StoreOptions {
        mailbox_max_messages: 3,
        ..StoreOptions::default()
    });
    users(&s, &["bob", "carol"]);
    let r = s.append(vec![
        env("bob", "alice", 1, 1, b"a"),
        env("carol", "alice", 1, 1, b"bb"),
        env("bob", "alice", 2, 1, b"ccc"),
        env("nobody", "alice", 1, 1, b"x"),
        env("bob", "alice", 3, 1, b"dddd"),
        env("bob", "alice", 4, 1, b"over"),
        env("bob", "alice", 1, 1, b"a"),
    ]);
    let seqs: Vec<u64> = [0, 1, 2, 4].iter().map(|&i| stored(&r[i])).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(matches!(r[3], Err(StoreError::UnknownUser)));
    assert!(matches!(
        r[5],
        Err(StoreError::QuotaExceeded {
            kind: QuotaKind::Count,
            ..
        })
    ));
    assert!(matches!(r[6], Ok(AppendOutcome::Duplicate { seq }) if seq == seqs[0]));
    assert_eq!(s.mailbox_usage("bob").unwrap(), (3, 8));
    assert_eq!(s.mailbox_usage("carol").unwrap(), (1, 2));
}

/// Rewrites a store holding only the account `bob` to an older layout with
/// envelopes 1 (alice, id 1, waiting), 2 (alice, id 2, acked) and 3
/// (carol, id 1, group "team", waiting), as that layout kept them.
fn write_old_layout(path: &std::path::Path, ttl: u64, oldest: bool) {
    type Env<'a> = (&'a str, Option<&'a str>, &'a [u8; 16], u64, u64, &'a [u8]);
    type Exp<'a> = (&'a str, &'a str, &'a [u8; 16]);
    const MAILBOX: redb::TableDefinition<(&str, u64), Env<'static>> =
        redb::TableDefinition::new("mailbox/1");
    const EXPIRY_1: redb::TableDefinition<(u64, u64), Exp<'static>> =
        redb::TableDefinition::new("expiry/1");
    const DEDUPE_EXPIRY: redb::TableDefinition<(u64, u64), Exp<'static>> =
        redb::TableDefinition::new("dedupe_expiry/1");
    const MAILBOX_EXPIRY: redb::TableDefinition<(u64, u64), &str> =
        redb::TableDefinition::new("mailbox_expiry/1");
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    tx.delete_table(tables::INBOX).unwrap();
    tx.delete_table(tables::EXPIRY).unwrap();
    {
        let mut mailbox = tx.open_table(MAILBOX).unwrap();
        mailbox
            .insert(
                ("bob", 1),
                ("alice", None, &[1; 16], 100, 100 + ttl, &b"waiting"[..]),
            )
            .unwrap();
        mailbox
            .insert(
                ("bob", 3),
                (
                    "carol",
                    Some("team"),
                    &[1; 16],
                    500,
                    500 + ttl,
                    &b"later"[..],
                ),
            )
            .unwrap();
        let mut dedupe = tx.open_table(tables::OLD_DEDUPE).unwrap();
        dedupe
            .insert(("bob", "alice", &[1; 16]), (1, 100 + ttl))
            .unwrap();
        dedupe
            .insert(("bob", "alice", &[2; 16]), (2, 100 + ttl))
            .unwrap();
        dedupe
            .insert(("bob", "carol", &[1; 16]), (3, 500 + ttl))
            .unwrap();
        let rows: [((u64, u64), Exp<'_>); 3] = [
            ((100 + ttl, 1), ("bob", "alice", &[1; 16])),
            ((100 + ttl, 2), ("bob", "alice", &[2; 16])),
            ((500 + ttl, 3), ("bob", "carol", &[1; 16])),
        ];
        let mut expiry = tx
            .open_table(if oldest { DEDUPE_EXPIRY } else { EXPIRY_1 })
            .unwrap();
        for (key, value) in rows {
            expiry.insert(key, value).unwrap();
        }
        if oldest {
            let mut waiting = tx.open_table(MAILBOX_EXPIRY).unwrap();
            waiting.insert((100 + ttl, 1), "bob").unwrap();
            waiting.insert((500 + ttl, 3), "bob").unwrap();
        }
        tx.open_table(tables::MAILBOX_USAGE)
            .unwrap()
            .insert("bob", (2, 7 + 5))
            .unwrap();
        tx.open_table(tables::COUNTERS)
            .unwrap()
            .insert(tables::NEXT_SEQ, 4)
            .unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn old_layouts_move_to_inbox_rows_at_open() {
    for oldest in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let ttl = 1000;
        let options = StoreOptions {
            envelope_ttl_secs: ttl,
            ..StoreOptions::default()
        };
        {
            let s = Store::open(&path, options).unwrap();
            users(&s, &["bob"]);
        }
        write_old_layout(&path, ttl, oldest);
        let s = Store::open(&path, options).unwrap();
        let waiting = s.pending("bob", 0, 10).unwrap();
        let seen: Vec<(u64, &str, &[u8])> = waiting
            .iter()
            .map(|e| (e.seq, e.sender.as_str(), e.body.as_slice()))
            .collect();
        assert_eq!(
            seen,
            [(1, "alice", &b"waiting"[..]), (3, "carol", &b"later"[..])],
            "oldest {oldest}"
        );
        assert_eq!(waiting[1].group.as_deref(), Some("team"));
        assert_eq!(s.pending("bob", 1, 10).unwrap()[0].seq, 3);
        // The acked envelope's dedupe record survived.
        assert!(matches!(
            s.append(vec![env("bob", "alice", 2, 900, b"again")])[0],
            Ok(AppendOutcome::Duplicate { seq: 2 })
        ));
        // Purging at the first expiry time removes envelope 1 and the two
        // dedupe records of that time, nothing of envelope 3.
        let purged = s.purge_expired(100 + ttl).unwrap();
        assert_eq!(purged.envelopes, 1);
        assert_eq!(s.mailbox_usage("bob").unwrap(), (1, 5));
        assert_eq!(s.pending("bob", 0, 10).unwrap()[0].seq, 3);
        for id in [1, 2] {
            assert!(matches!(
                s.append(vec![env("bob", "alice", id, 2000, b"new")])[0],
                Ok(AppendOutcome::Stored { seq }) if seq > 3
            ));
        }
        assert!(matches!(
            s.append(vec![env("bob", "carol", 1, 2000, b"dup")])[0],
            Ok(AppendOutcome::Duplicate { seq: 3 })
        ));
        assert_eq!(s.ack("bob", &[3]).unwrap(), 1);
        assert_eq!(s.mailbox_usage("bob").unwrap(), (2, 6));
        assert!(s.check_integrity().unwrap());
        drop(s);
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        let mut names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_owned())
            .collect();
        names.retain(|n| {
            n.contains("expiry")
                || n.contains("mailbox/")
                || n.contains("inbox")
                || n.contains("dedupe")
        });
        names.sort();
        assert_eq!(
            names,
            ["dedupe/2", "expiry/2", "inbox/3"],
            "oldest {oldest}"
        );
    }
}

#[test]
fn inbox_rows_split_by_expiry_time_and_partial_acks_keep_the_rest() {
    let ttl = 1000;
    let (_d, s) = store_with(StoreOptions {
        envelope_ttl_secs: ttl,
        ..StoreOptions::default()
    });
    users(&s, &["bob", "carol"]);
    // Expiry times alternate for bob: rows [a, b] [c] [d, e] for bob and
    // one for carol in between, all in one commit.
    let r = s.append(vec![
        env("bob", "alice", 1, 100, b"a"),
        env("bob", "alice", 2, 100, b"b"),
        env("carol", "alice", 1, 100, b"x"),
        env("bob", "alice", 3, 200, b"c"),
        env("bob", "alice", 4, 100, b"d"),
        env("bob", "alice", 5, 100, b"e"),
    ]);
    let seq: Vec<u64> = r.iter().map(stored).collect();
    let bodies = |after: u64| -> Vec<Vec<u8>> {
        s.pending("bob", after, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.body)
            .collect()
    };
    assert_eq!(bodies(0), [b"a", b"b", b"c", b"d", b"e"]);
    // Reading from inside a row.
    assert_eq!(bodies(seq[0]), [b"b", b"c", b"d", b"e"]);
    assert_eq!(s.pending("bob", seq[0], 2).unwrap().len(), 2);
    // Partial acks across rows; repeated, carol's and unknown seqs ignored.
    assert_eq!(
        s.ack("bob", &[seq[4], seq[1], seq[1], seq[2], 9999])
            .unwrap(),
        2
    );
    assert_eq!(bodies(0), [b"a", b"c", b"e"]);
    assert_eq!(s.mailbox_usage("bob").unwrap(), (3, 3));
    assert_eq!(s.ack("bob", &[seq[1], seq[4]]).unwrap(), 0);
    // The first expiry time purges a, e and carol's x, not c; the acked
    // ones' dedupe records go too.
    assert_eq!(s.purge_expired(100 + ttl).unwrap().envelopes, 3);
    assert_eq!(bodies(0), [b"c"]);
    assert_eq!(s.pending("carol", 0, 10).unwrap().len(), 0);
    assert!(matches!(
        s.append(vec![env("bob", "alice", 2, 300, b"b again")])[0],
        Ok(AppendOutcome::Stored { .. })
    ));
    assert!(matches!(
        s.append(vec![env("bob", "alice", 3, 300, b"c again")])[0],
        Ok(AppendOutcome::Duplicate { seq: d }) if d == seq[3]
    ));
    assert_eq!(s.mailbox_usage("bob").unwrap(), (2, 8));
}

#[test]
fn friends_lifecycle() {
    let (_d, s) = store();
    users(&s, &["alice", "bob", "carol"]);
    assert_eq!(
        s.friend_request("alice", "bob").unwrap(),
        FriendRequestOutcome::Sent
    );
    assert_eq!(
        s.friend_request("alice", "bob").unwrap(),
        FriendRequestOutcome::AlreadyRequested
    );
    assert_eq!(s.incoming_requests("bob").unwrap(), vec!["alice"]);
    assert_eq!(s.outgoing_requests("alice").unwrap(), vec!["bob"]);
    s.friend_accept("bob", "alice").unwrap();
    assert_eq!(s.friends("alice").unwrap(), vec!["bob"]);
    assert_eq!(s.friends("bob").unwrap(), vec!["alice"]);
    assert!(s.incoming_requests("bob").unwrap().is_empty());
    assert_eq!(
        s.friend_request("bob", "alice").unwrap(),
        FriendRequestOutcome::AlreadyFriends
    );
    assert!(matches!(
        s.friend_accept("bob", "alice"),
        Err(StoreError::NoSuchRequest)
    ));

    // Crossing requests become a friendship.
    s.friend_request("carol", "alice").unwrap();
    assert!(matches!(
        s.friend_request("alice", "carol").unwrap(),
        FriendRequestOutcome::AcceptedReverse { .. }
    ));
    assert_eq!(s.friends("alice").unwrap(), vec!["bob", "carol"]);
    assert!(s.outgoing_requests("carol").unwrap().is_empty());

    s.friend_remove("bob", "alice").unwrap();
    assert_eq!(s.friends("alice").unwrap(), vec!["carol"]);
    assert!(s.friends("bob").unwrap().is_empty());
    assert!(matches!(
        s.friend_remove("bob", "alice"),
        Err(StoreError::NotFriends)
    ));

    s.friend_request("bob", "carol").unwrap();
    s.friend_decline("carol", "bob").unwrap();
    assert!(s.friends("carol").unwrap() == vec!["alice"]);
    assert!(matches!(
        s.friend_decline("carol", "bob"),
        Err(StoreError::NoSuchRequest)
    ));
    assert!(matches!(
        s.friend_request("bob", "zed"),
        Err(StoreError::UnknownUser)
    ));
    assert!(matches!(
        s.friend_request("bob", "bob"),
        Err(StoreError::SelfFriend)
    ));
}

/// Reads the notices kept for `user` and forgets them all, as a login that
/// pushed them does: (other, notice).
fn tell_all(s: &Store, user: &str) -> Vec<(String, FriendNotice)> {
    let kept = s.friend_notices(user).unwrap();
    let told: Vec<(String, u64)> = kept.iter().map(|n| (n.other.clone(), n.number)).collect();
    s.forget_friend_notices(user, &told).unwrap();
    kept.into_iter().map(|n| (n.other, n.notice)).collect()
}

/// Each answer and removal keeps a notice for the user it concerns, in
/// its own transaction, under a number no other notice had; only the latest
/// per pair stays; reading leaves them; forgetting a number leaves a newer
/// notice of the pair, even one of the same kind.
#[test]
fn friend_notices_are_kept_with_the_change_and_the_latest_wins() {
    let (_d, s) = store();
    users(&s, &["alice", "bob", "carol", "dave"]);
    assert!(s.friend_notices("alice").unwrap().is_empty());
    s.friend_request("alice", "bob").unwrap();
    s.friend_request("alice", "carol").unwrap();
    let accepted = s.friend_accept("bob", "alice").unwrap();
    let declined = s.friend_decline("carol", "alice").unwrap();
    assert_ne!(accepted, declined);
    // Crossing requests: dave had asked alice, alice's request accepts.
    s.friend_request("dave", "alice").unwrap();
    let FriendRequestOutcome::AcceptedReverse { notice } =
        s.friend_request("alice", "dave").unwrap()
    else {
        panic!("not accepted")
    };
    assert_eq!(
        s.friend_notices("dave").unwrap(),
        [KeptNotice {
            other: "alice".into(),
            number: notice,
            notice: FriendNotice::Accepted
        }]
    );
    let removed = s.friend_remove("bob", "alice").unwrap();
    assert!(removed > accepted);
    // bob's removal replaced his acceptance; reading twice reads the same.
    let kept = s.friend_notices("alice").unwrap();
    assert_eq!(kept, s.friend_notices("alice").unwrap());
    assert_eq!(
        kept,
        [
            KeptNotice {
                other: "bob".into(),
                number: removed,
                notice: FriendNotice::Removed
            },
            KeptNotice {
                other: "carol".into(),
                number: declined,
                notice: FriendNotice::Declined
            },
        ]
    );
    // Forgetting the replaced acceptance's number leaves the removal.
    s.forget_friend_notices("alice", &[("bob".into(), accepted)])
        .unwrap();
    assert_eq!(
        tell_all(&s, "alice"),
        [
            ("bob".to_owned(), FriendNotice::Removed),
            ("carol".to_owned(), FriendNotice::Declined),
        ]
    );
    assert!(s.friend_notices("alice").unwrap().is_empty());
    // The remover is told nothing.
    assert!(s.friend_notices("bob").unwrap().is_empty());

    // Accepted, removed, accepted again: forgetting the first acceptance
    // (a late live push) leaves the second, though of the same kind.
    s.friend_request("alice", "carol").unwrap();
    let first = s.friend_accept("carol", "alice").unwrap();
    s.friend_remove("carol", "alice").unwrap();
    s.friend_request("alice", "carol").unwrap();
    let second = s.friend_accept("carol", "alice").unwrap();
    s.forget_friend_notices("alice", &[("carol".into(), first)])
        .unwrap();
    assert_eq!(
        s.friend_notices("alice").unwrap(),
        [KeptNotice {
            other: "carol".into(),
            number: second,
            notice: FriendNotice::Accepted
        }]
    );
    s.forget_friend_notices("alice", &[("carol".into(), second)])
        .unwrap();
    assert!(s.friend_notices("alice").unwrap().is_empty());
}

/// The ninth session's `friend_answers/1` rows are told after an upgrade:
/// moved to `friend_notices/1` at open, the old table gone; a stored kind
/// no version wrote is dropped, not an error.
#[test]
fn friend_answers_of_the_old_layout_become_notices_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(Store::open(&path, StoreOptions::default()).unwrap());
    {
        let old: redb::TableDefinition<(&str, &str), bool> =
            redb::TableDefinition::new("friend_answers/1");
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(old).unwrap();
            t.insert(("alice", "bob"), true).unwrap();
            t.insert(("alice", "carol"), false).unwrap();
            let mut n = tx.open_table(super::tables::FRIEND_NOTICES).unwrap();
            n.insert(("alice", "zed"), (7, 9)).unwrap();
        }
        tx.commit().unwrap();
    }
    let s = Store::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        tell_all(&s, "alice"),
        [
            ("bob".to_owned(), FriendNotice::Accepted),
            ("carol".to_owned(), FriendNotice::Declined),
        ]
    );
    assert!(s.friend_notices("alice").unwrap().is_empty());
    drop(s);
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_write().unwrap();
    let names: Vec<String> = tx
        .list_tables()
        .unwrap()
        .map(|t| redb::TableHandle::name(&t).to_owned())
        .filter(|n| n.starts_with("friend_"))
        .collect();
    assert!(!names.iter().any(|n| n == "friend_answers/1"), "{names:?}");
    assert!(names.iter().any(|n| n == "friend_notices/1"), "{names:?}");
}

fn group(name: &str, owner: &str, version: u64, members: &[&str]) -> GroupRecord {
    GroupRecord {
        name: name.to_owned(),
        owner: owner.to_owned(),
        version,
        members: members.iter().map(|m| (*m).to_owned()).collect(),
        roster_signature: vec![version as u8; 64],
        roster_bytes: vec![0xAB, version as u8],
    }
}

#[test]
fn groups_lifecycle() {
    let (_d, s) = store();
    users(&s, &["alice", "bob", "carol"]);
    let g1 = group("team", "alice", 1, &["alice", "bob"]);
    s.create_group(g1.clone()).unwrap();
    assert_eq!(s.group("team").unwrap(), Some(g1.clone()));
    assert_eq!(s.group("other").unwrap(), None);
    assert!(matches!(
        s.create_group(g1.clone()),
        Err(StoreError::GroupExists)
    ));
    assert!(matches!(
        s.create_group(group("x", "zed", 1, &["zed"])),
        Err(StoreError::UnknownUser)
    ));
    assert_eq!(s.groups_of("bob").unwrap(), vec!["team"]);

    let g2 = group("team", "alice", 2, &["alice", "carol"]);
    assert!(matches!(
        s.update_group("team", 0, g2.clone()),
        Err(StoreError::VersionConflict { stored: 1 })
    ));
    assert!(matches!(
        s.update_group("team", 1, group("team", "alice", 1, &["alice"])),
        Err(StoreError::VersionConflict { stored: 1 })
    ));
    assert!(matches!(
        s.update_group("nope", 1, g2.clone()),
        Err(StoreError::UnknownGroup)
    ));
    s.update_group("team", 1, g2.clone()).unwrap();
    assert_eq!(s.group("team").unwrap(), Some(g2.clone()));
    assert!(s.groups_of("bob").unwrap().is_empty());
    assert_eq!(s.groups_of("carol").unwrap(), vec!["team"]);
    assert!(matches!(
        s.update_group("team", 1, group("team", "alice", 3, &["alice"])),
        Err(StoreError::VersionConflict { stored: 2 })
    ));

    s.add_join_request("team", "bob").unwrap();
    s.add_join_request("team", "bob").unwrap();
    assert_eq!(s.join_requests("team").unwrap(), vec!["bob"]);
    assert!(matches!(
        s.add_join_request("nope", "bob"),
        Err(StoreError::UnknownGroup)
    ));
    assert!(matches!(
        s.add_join_request("team", "zed"),
        Err(StoreError::UnknownUser)
    ));
    assert!(s.remove_join_request("team", "bob").unwrap());
    assert!(!s.remove_join_request("team", "bob").unwrap());

    s.add_join_request("team", "bob").unwrap();
    s.delete_group("team").unwrap();
    assert_eq!(s.group("team").unwrap(), None);
    assert!(s.groups_of("carol").unwrap().is_empty());
    assert!(s.join_requests("team").unwrap().is_empty());
    assert!(matches!(
        s.delete_group("team"),
        Err(StoreError::UnknownGroup)
    ));
}

#[test]
fn announcements_and_cursors() {
    let (_d, s) = store();
    let mk = |b: &[u8]| AnnouncementRecord {
        id: 0,
        issued_at: 7,
        bytes: b.to_vec(),
    };
    assert_eq!(s.add_announcement(mk(b"one")).unwrap(), 1);
    assert_eq!(s.add_announcement(mk(b"two")).unwrap(), 2);
    let all = s.announcements_after(0).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[1],
        AnnouncementRecord {
            id: 2,
            issued_at: 7,
            bytes: b"two".to_vec()
        }
    );
    assert_eq!(s.announcements_after(1).unwrap().len(), 1);
    assert!(s.announcements_after(u64::MAX).unwrap().is_empty());
    assert_eq!(s.announcement_cursor("bob").unwrap(), 0);
    s.set_announcement_cursor("bob", 2).unwrap();
    assert_eq!(s.announcement_cursor("bob").unwrap(), 2);
}

#[test]
fn full_disk_errors_are_recognised_in_the_chain() {
    let direct = redb::Error::Io(io::Error::from(io::ErrorKind::StorageFull));
    assert!(matches!(
        classify("t", direct),
        StoreError::StorageFull { op: "t", .. }
    ));
    let raw = redb::Error::Io(io::Error::from_raw_os_error(ENOSPC));
    assert!(matches!(classify("t", raw), StoreError::StorageFull { .. }));
    let wrapped = redb::Error::Io(io::Error::other(io::Error::from(
        io::ErrorKind::QuotaExceeded,
    )));
    assert!(matches!(
        classify("t", wrapped),
        StoreError::StorageFull { .. }
    ));
    let other = redb::Error::Io(io::Error::from(io::ErrorKind::PermissionDenied));
    let e = classify("t", other);
    assert!(matches!(e, StoreError::Storage { .. }));
    assert!(e.needs_reopen());
    assert!(classify("t", redb::Error::PreviousIo).is_previous_io());
    assert!(matches!(
        classify("t", redb::Error::Corrupted("x".to_owned())),
        StoreError::Corrupt(_)
    ));
    assert_eq!(
        StoreError::StorageFull {
            op: "append",
            source: Arc::new(redb::Error::PreviousIo)
        }
        .to_string(),
        "storage full during append"
    );
}

/// Review finding 3: an I/O error of a segment file is classified like
/// redb's (a full disk is `StorageFull`) but does not make the store
/// reopen the database, which redb's own I/O errors do.
#[test]
fn segment_file_errors_do_not_need_a_reopen() {
    let full = super::segments::io_error("t", io::Error::from_raw_os_error(ENOSPC));
    assert!(matches!(full, StoreError::StorageFull { op: "t", .. }));
    assert!(!full.needs_reopen());
    let other = super::segments::io_error("t", io::Error::from(io::ErrorKind::IsADirectory));
    assert!(matches!(other, StoreError::Storage { .. }));
    assert!(!other.needs_reopen());
    assert!(classify("t", redb::Error::Io(io::Error::from_raw_os_error(ENOSPC))).needs_reopen());
}

/// The segment files of a store opened by [`store_with`].
fn segment_files(dir: &tempfile::TempDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(super::bodies_dir(&dir.path().join("s.redb")))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn compaction_moves_the_last_bodies_of_mostly_empty_segments() {
    let (dir, s) = store_with(StoreOptions {
        segment_max_bytes: 2000,
        ..StoreOptions::default()
    });
    users(&s, &["bob", "carol"]);
    let to = |n: usize| {
        if (n % 5).is_multiple_of(2) {
            "bob"
        } else {
            "carol"
        }
    };
    // Ten commits of five 400-byte bodies: each fills a segment to its
    // bound, so the next commit starts a new one.
    let mut seqs = Vec::new();
    for round in 0..10u8 {
        let batch = (0..5u8)
            .map(|i| {
                let id = round * 5 + i;
                env(to(usize::from(id)), "alice", id, 100, &[id; 400])
            })
            .collect();
        seqs.extend(s.append(batch).iter().map(stored));
    }
    assert_eq!(segment_files(&dir).len(), 10);
    // Nothing qualifies while the segments are full.
    assert_eq!(s.compact_segments().unwrap(), super::Compacted::default());
    // Two bodies (40 %) left in every segment: still nothing to do.
    for (n, seq) in seqs.iter().enumerate() {
        if n % 5 >= 2 {
            s.ack(to(n), &[*seq]).unwrap();
        }
    }
    assert_eq!(s.compact_segments().unwrap().bodies, 0);
    // One body (20 %) left in each of the first nine segments.
    for (n, seq) in seqs.iter().enumerate().take(45) {
        if n % 5 == 1 {
            s.ack(to(n), &[*seq]).unwrap();
        }
    }
    let usage = |s: &Store| {
        (
            s.mailbox_usage("bob").unwrap(),
            s.mailbox_usage("carol").unwrap(),
        )
    };
    let before_usage = usage(&s);
    let waiting = |s: &Store| -> Vec<(u64, Vec<u8>)> {
        ["bob", "carol"]
            .iter()
            .flat_map(|r| s.pending(r, 0, 100).unwrap())
            .map(|e| (e.seq, e.body))
            .collect()
    };
    let before = waiting(&s);
    assert_eq!(before.len(), 9 + 2);
    // The nine bodies move to a new segment (the tenth is full) and the
    // nine files go; the tenth keeps its two bodies.
    let done = s.compact_segments().unwrap();
    assert_eq!(done.bodies, 9);
    assert_eq!(done.bytes, 9 * 400);
    assert_eq!(done.segments, 9);
    assert!(!done.more);
    assert_eq!(waiting(&s), before, "same seqs, same bytes, same order");
    assert_eq!(usage(&s), before_usage);
    assert_eq!(
        segment_files(&dir),
        ["000000000000000a.seg", "000000000000000b.seg"]
    );
    assert!(s.check_integrity().unwrap());
    // Nothing left to do; and the result survives a reopen.
    assert_eq!(s.compact_segments().unwrap().bodies, 0);
    drop(s);
    let s = Store::open(&dir.path().join("s.redb"), StoreOptions::default()).unwrap();
    assert_eq!(waiting(&s), before);
    assert!(s.check_integrity().unwrap());
}

#[test]
fn pending_never_skips_an_envelope_whose_segment_is_compacted_meanwhile() {
    let (_dir, s) = store_with(StoreOptions {
        segment_max_bytes: 2000,
        ..StoreOptions::default()
    });
    users(&s, &["keep", "churn"]);
    const ROUNDS: u8 = 120;
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for round in 0..ROUNDS {
                // One body for `keep`, nine for `churn`: a segment each.
                let mut batch = vec![env("keep", "alice", round, 100, &[round; 400])];
                batch.extend((0..9).map(|i| env("churn", &format!("c{i}"), round, 100, &[0; 400])));
                let seqs: Vec<u64> = s.append(batch).iter().map(stored).collect();
                // Acking churn's nine leaves `keep`'s body alone in a
                // sealed segment, which compaction moves; the old file goes.
                s.ack("churn", &seqs[1..]).unwrap();
                s.compact_segments().unwrap();
            }
        })
    };
    let mut seen = 0usize;
    let mut reads = 0usize;
    while !writer.is_finished() || reads == 0 {
        let waiting = s.pending("keep", 0, 1000).unwrap();
        // Every `keep` envelope stays waiting: each answer holds all that
        // the one before held, in order, with the right bytes.
        assert!(waiting.len() >= seen, "{} after {seen}", waiting.len());
        for (round, e) in waiting.iter().enumerate() {
            assert_eq!(e.body, vec![round as u8; 400], "envelope {round}");
        }
        seen = waiting.len();
        reads += 1;
    }
    writer.join().unwrap();
    assert_eq!(
        s.pending("keep", 0, 1000).unwrap().len(),
        usize::from(ROUNDS)
    );
    assert!(s.check_integrity().unwrap());
    assert!(
        reads > 10,
        "the reader overlapped the writer ({reads} reads)"
    );
}

/// A hook run by [`after_relaxed_write`].
type Hook = Box<dyn Fn(&Store)>;

thread_local! {
    /// Run once by [`Store::write_relaxed_segments`] on this thread, right
    /// after its transaction ran (see [`after_relaxed_write`]).
    static AFTER_RELAXED_WRITE: std::cell::RefCell<Option<Hook>> =
        const { std::cell::RefCell::new(None) };
}

/// Called by [`Store::write_relaxed_segments`] in tests once its
/// transaction ran and the slot's read lock was released: the first point
/// where another thread's reopen can come in.
pub(super) fn after_relaxed_write(store: &Store) {
    let hook = AFTER_RELAXED_WRITE.with(|h| h.borrow_mut().take());
    if let Some(hook) = hook {
        hook(store);
    }
}

/// Review finding 2: a relaxed write listed the segments it emptied after
/// `run` returned, outside the slot's read lock, so a reopen could come
/// between its commit and the listing. A reopen that rolls the relaxed
/// commit back (as one after an I/O error does) then found nothing to sort
/// out, the segment was listed afterwards, and the next durable commit
/// deleted a file whose rows were back: `Corrupt`.
#[test]
fn a_relaxed_write_lists_its_emptied_segments_before_a_reopen_can_come_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let snapshot = dir.path().join("snapshot.redb");
    let restore = Arc::new(AtomicBool::new(false));
    let opener = {
        let (path, snapshot, restore) = (path.clone(), snapshot.clone(), Arc::clone(&restore));
        move || {
            // What a crash would have left: the last durable commit.
            if restore.swap(false, Ordering::SeqCst) {
                std::fs::copy(&snapshot, &path)?;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            redb::backends::FileBackend::new(file).map_err(io::Error::other)
        }
    };
    let options = StoreOptions {
        segment_max_bytes: 4096,
        ..StoreOptions::default()
    };
    let s = Store::open_with_backend(opener, &super::bodies_dir(&path), options).unwrap();
    users(&s, &["bob"]);
    let seqs: Vec<u64> = (0..8u8)
        .map(|id| stored(&s.append(vec![env("bob", "alice", id, 100, &[id; 1024])])[0]))
        .collect();
    // Four bodies a segment: the ack below empties segment 1.
    assert_eq!(
        segment_files(&dir),
        ["0000000000000001.seg", "0000000000000002.seg"]
    );
    std::fs::copy(&path, &snapshot).unwrap();
    let hook_restore = Arc::clone(&restore);
    AFTER_RELAXED_WRITE.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |s: &Store| {
            hook_restore.store(true, Ordering::SeqCst);
            s.inner.failed.store(true, Ordering::SeqCst);
            s.mailbox_usage("bob").unwrap(); // reopens
        }));
    });
    assert_eq!(s.ack("bob", &seqs[..4]).unwrap(), 4);
    // The reopen rolled the ack back.
    assert_eq!(s.pending("bob", 0, 100).unwrap().len(), 8);
    // A durable commit must not delete segment 1, whose rows are back.
    users(&s, &["carol"]);
    assert!(segment_files(&dir).contains(&"0000000000000001.seg".to_owned()));
    let waiting = s.pending("bob", 0, 100).unwrap();
    assert_eq!(waiting.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    assert!(s.check_integrity().unwrap());
}

/// Review finding 5: `run` retried an operation after any `PreviousIo`,
/// also one its commit returned. redb refuses the rest of a commit with
/// `PreviousIo` once an I/O error is latched (by another thread, say),
/// possibly after the new header reached the file, so the first try may
/// be committed: the retry answered `UserExists` or `Duplicate` to what the
/// caller sees as its first try. (A real backend cannot make redb 4.6 do
/// that on demand: a fresh handle reads the whole file into its cache at
/// open, so no other thread's read reaches the backend. The operation here
/// commits, then fails with the `PreviousIo` such a commit returns.)
#[test]
fn previous_io_after_a_commit_is_not_retried_but_before_begin_is() {
    const PROBE: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("probe");
    let (_dir, s) = store();
    let runs = std::sync::atomic::AtomicU64::new(0);
    let result: Result<(), StoreError> = s.run(|db| {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let tx = db.begin_write().map_err(|e| RunError::begin("t", e))?;
        {
            let mut table = tx.open_table(PROBE).op("t")?;
            if table.get("first try").op("t")?.is_some() {
                // What a retried `create_account` answers.
                return Err(StoreError::UserExists.into());
            }
            table.insert("first try", run).op("t")?;
        }
        tx.commit().op("t")?;
        Err(RunError::Op(classify("t", redb::Error::PreviousIo)))
    });
    assert!(
        matches!(&result, Err(e) if e.is_previous_io()),
        "{result:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not retried");
    // The next operation reopens (and sees the first try committed).
    assert_eq!(s.mailbox_usage("nobody").unwrap(), (0, 0));

    // Refused before it began: nothing done, so reopened and retried once.
    let begun = std::sync::atomic::AtomicU64::new(0);
    let result = s.run(|_db| {
        if begun.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(RunError::Begin(classify("t", redb::Error::PreviousIo)));
        }
        Ok(7)
    });
    assert_eq!(result.unwrap(), 7);
    assert_eq!(begun.load(Ordering::SeqCst), 2);
}
