//! The redb tables. Names carry a layout version (`/1`); redb also records
//! each table's key and value types and refuses a mismatch. Keys and values
//! use redb's own encodings (integers little-endian, tuples with varint
//! lengths of their variable-width elements); `docs/storage.md` lists them.

use redb::{ReadableTable as _, TableDefinition, TableHandle as _, WriteTransaction};

use super::segments::{BodyLoc, SegmentRow};
use super::{OpResult, StoreError};

/// username -> (identity, signed prekey, registered_at)
pub(super) const ACCOUNTS: TableDefinition<&str, (&[u8], &[u8], u64)> =
    TableDefinition::new("accounts/1");

/// (username, prekey id) -> one-time prekey public bytes
pub(super) const OPKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("opks/1");

/// username -> (stored count, lowest id still acceptable)
pub(super) const OPK_META: TableDefinition<&str, (u32, u64)> = TableDefinition::new("opk_meta/1");

/// SHA-256 of an invite token -> ()
pub(super) const INVITES: TableDefinition<&[u8; 32], ()> = TableDefinition::new("invites/1");

/// SHA-256 of a redeemed self-authenticating invite id -> redemption time
pub(super) const REDEEMED_INVITES: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("redeemed_invites/1");

/// counter name -> next value
pub(super) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters/1");

/// Counter of envelope sequence numbers (first is 1).
pub(super) const NEXT_SEQ: &str = "next_seq";
/// Counter of announcement ids (first is 1).
pub(super) const NEXT_ANNOUNCEMENT: &str = "next_announcement";
/// [`COUNTERS`] key of the next friend notice's number.
pub(super) const NEXT_NOTICE: &str = "next_friend_notice";

/// One stored envelope in an [`INBOX`] row: (seq, sender, group, message
/// id, sent_at, expires_at, where its body lies in the segment files).
pub(super) type InboxRecord<'a> = (
    u64,
    &'a str,
    Option<&'a str>,
    &'a [u8; 16],
    u64,
    u64,
    BodyLoc,
);

/// (recipient, first seq) -> the recipient's envelopes from one group
/// commit that share an expiry time, in sequence order. A recipient's rows
/// cover disjoint sequence ranges, so the row holding a sequence number is
/// the last one whose key is at or before it. One row per recipient per
/// commit instead of one per envelope: a commit inserts a tenth of the
/// B-tree entries under load (docs/storage.md, docs/benchmarks.md §1). The
/// bodies are in the segment files ([`super::segments`]).
pub(super) const INBOX: TableDefinition<(&str, u64), Vec<InboxRecord<'static>>> =
    TableDefinition::new("inbox/3");

/// segment number -> (bodies it still holds, their bytes, committed length)
pub(super) const SEGMENTS: TableDefinition<u64, SegmentRow> = TableDefinition::new("segments/1");

/// Before `inbox/3`: the same rows with each body inline, as the record's
/// last element (moved at open, bodies into segments).
pub(super) type OldInboxRecord<'a> = (
    u64,
    &'a str,
    Option<&'a str>,
    &'a [u8; 16],
    u64,
    u64,
    &'a [u8],
);
pub(super) const OLD_INBOX: TableDefinition<(&str, u64), Vec<OldInboxRecord<'static>>> =
    TableDefinition::new("inbox/2");

/// recipient -> (waiting envelopes, waiting body bytes)
pub(super) const MAILBOX_USAGE: TableDefinition<&str, (u32, u64)> =
    TableDefinition::new("mailbox_usage/1");

/// (message id, recipient, sender) -> (seq, expires_at). The message id
/// comes first: clients make ids that start with the send time in
/// milliseconds, so one group commit's inserts land next to each other at
/// the tree's end instead of on a leaf per (recipient, sender) pair
/// (docs/benchmarks.md §1, "Sixth round").
pub(super) const DEDUPE: TableDefinition<(&[u8; 16], &str, &str), (u64, u64)> =
    TableDefinition::new("dedupe/2");

/// Before `dedupe/2`: the same rows keyed (recipient, sender, message id)
/// (moved at open by [`super::mailbox::migrate_dedupe`]).
pub(super) const OLD_DEDUPE: TableDefinition<(&str, &str, &[u8; 16]), (u64, u64)> =
    TableDefinition::new("dedupe/1");

/// (expires_at, first seq) -> (recipient, [(sender, message id)]): one row
/// per [`INBOX`] row, written with it and kept after acks, for purging both
/// what is left of that row and the dedupe records of all its envelopes,
/// which expire together.
pub(super) type ExpiryValue<'a> = (&'a str, Vec<(&'a str, &'a [u8; 16])>);
pub(super) const EXPIRY: TableDefinition<(u64, u64), ExpiryValue<'static>> =
    TableDefinition::new("expiry/2");

/// Before `inbox/2`: (recipient, seq) -> (sender, group, message id,
/// sent_at, expires_at, body), one row per envelope (moved at open).
type OldEnvelopeValue<'a> = (&'a str, Option<&'a str>, &'a [u8; 16], u64, u64, &'a [u8]);
const OLD_MAILBOX: TableDefinition<(&str, u64), OldEnvelopeValue<'static>> =
    TableDefinition::new("mailbox/1");

/// Before `expiry/2`: (expires_at, seq) -> (recipient, sender, message
/// id), one row per envelope (moved at open).
const OLD_EXPIRY: TableDefinition<(u64, u64), (&str, &str, &[u8; 16])> =
    TableDefinition::new("expiry/1");

/// Before `expiry/1`: the same rows as `expiry/1` (renamed at open).
const OLD_DEDUPE_EXPIRY: TableDefinition<(u64, u64), (&str, &str, &[u8; 16])> =
    TableDefinition::new("dedupe_expiry/1");

/// Before `expiry/1`: (expires_at, seq) -> recipient, a subset of
/// `dedupe_expiry/1` (deleted at open).
const OLD_MAILBOX_EXPIRY: TableDefinition<(u64, u64), &str> =
    TableDefinition::new("mailbox_expiry/1");

/// (user, friend) -> (), both directions
pub(super) const FRIENDS: TableDefinition<(&str, &str), ()> = TableDefinition::new("friends/1");

/// (from, to) -> () pending requests
pub(super) const FRIEND_REQUESTS_OUT: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("friend_requests_out/1");

/// (to, from) -> () the same requests, by recipient
pub(super) const FRIEND_REQUESTS_IN: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("friend_requests_in/1");

/// (user, other) -> (notice number, kind [`super::FriendNotice::to_u8`]):
/// the latest answer to `user`'s friend request from `other`, or `other`
/// ending the friendship, kept in the transaction that made it until it was
/// pushed (live or at a login). The number, from [`NEXT_NOTICE`], names this
/// one notice, so removing it once pushed cannot remove a newer one.
pub(super) const FRIEND_NOTICES: TableDefinition<(&str, &str), (u64, u8)> =
    TableDefinition::new("friend_notices/1");

/// The ninth session's layout: (requester, answerer) -> accepted, only for
/// requesters offline at the answer; moved to [`FRIEND_NOTICES`] at open.
const OLD_FRIEND_ANSWERS: TableDefinition<(&str, &str), bool> =
    TableDefinition::new("friend_answers/1");

/// name -> (owner, version, members, roster signature, roster bytes)
pub(super) type GroupValue<'a> = (&'a str, u64, Vec<&'a str>, &'a [u8], &'a [u8]);
pub(super) const GROUPS: TableDefinition<&str, GroupValue<'static>> =
    TableDefinition::new("groups/1");

/// (member, group) -> ()
pub(super) const MEMBER_OF: TableDefinition<(&str, &str), ()> = TableDefinition::new("member_of/1");

/// (group, user) -> ()
pub(super) const JOIN_REQUESTS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("join_requests/1");

/// (group, member) -> (): members who asked to leave, until the owner
/// publishes a roster without them.
pub(super) const LEAVE_REQUESTS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("leave_requests/1");

/// id -> (issued_at, signed bytes)
pub(super) const ANNOUNCEMENTS: TableDefinition<u64, (u64, &[u8])> =
    TableDefinition::new("announcements/1");

/// username -> id of the last announcement delivered
pub(super) const ANNOUNCEMENT_CURSORS: TableDefinition<&str, u64> =
    TableDefinition::new("announcement_cursors/1");

/// Opens every table once so that read transactions find them, after
/// moving an older layout to the current one.
pub(super) fn create_all(tx: &WriteTransaction) -> Result<(), StoreError> {
    const OP: &str = "create tables";
    migrate_expiry(tx)?;
    migrate_inbox(tx)?;
    migrate_friend_answers(tx)?;
    tx.open_table(ACCOUNTS).op(OP)?;
    tx.open_table(OPKS).op(OP)?;
    tx.open_table(OPK_META).op(OP)?;
    tx.open_table(INVITES).op(OP)?;
    tx.open_table(REDEEMED_INVITES).op(OP)?;
    tx.open_table(COUNTERS).op(OP)?;
    tx.open_table(INBOX).op(OP)?;
    tx.open_table(SEGMENTS).op(OP)?;
    tx.open_table(MAILBOX_USAGE).op(OP)?;
    tx.open_table(DEDUPE).op(OP)?;
    tx.open_table(EXPIRY).op(OP)?;
    tx.open_table(FRIENDS).op(OP)?;
    tx.open_table(FRIEND_REQUESTS_OUT).op(OP)?;
    tx.open_table(FRIEND_REQUESTS_IN).op(OP)?;
    tx.open_table(FRIEND_NOTICES).op(OP)?;
    tx.open_table(GROUPS).op(OP)?;
    tx.open_table(MEMBER_OF).op(OP)?;
    tx.open_table(JOIN_REQUESTS).op(OP)?;
    tx.open_table(LEAVE_REQUESTS).op(OP)?;
    tx.open_table(ANNOUNCEMENTS).op(OP)?;
    tx.open_table(ANNOUNCEMENT_CURSORS).op(OP)?;
    Ok(())
}

/// `friend_answers/1` rows become `friend_notices/1` rows (accepted or
/// declined), and the old table is deleted, in the opening transaction.
fn migrate_friend_answers(tx: &WriteTransaction) -> Result<(), StoreError> {
    const OP: &str = "migrate friend answers to notices";
    let old = tx
        .list_tables()
        .op(OP)?
        .any(|t| t.name() == OLD_FRIEND_ANSWERS.name());
    if !old {
        return Ok(());
    }
    {
        let answers = tx.open_table(OLD_FRIEND_ANSWERS).op(OP)?;
        for entry in answers.iter().op(OP)? {
            let (key, accepted) = entry.op(OP)?;
            let notice = if accepted.value() {
                super::FriendNotice::Accepted
            } else {
                super::FriendNotice::Declined
            };
            let (user, other) = key.value();
            super::social::keep_notice(tx, OP, user, other, notice)?;
        }
    }
    tx.delete_table(OLD_FRIEND_ANSWERS).op(OP)?;
    Ok(())
}

/// Layouts before `expiry/1` kept two expiry indexes. Every envelope wrote a
/// row to both with the same key, and a `dedupe_expiry/1` row lives at least
/// as long as its `mailbox_expiry/1` row (acks removed only the latter), so
/// `dedupe_expiry/1` holds every row the merged index needs: it is renamed,
/// and `mailbox_expiry/1` deleted. Both steps are in the opening
/// transaction, so a crash leaves the old layout or the new one.
fn migrate_expiry(tx: &WriteTransaction) -> Result<(), StoreError> {
    const OP: &str = "migrate expiry indexes";
    let mut old_dedupe = false;
    let mut new = false;
    for table in tx.list_tables().op(OP)? {
        old_dedupe |= table.name() == OLD_DEDUPE_EXPIRY.name();
        new |= table.name() == OLD_EXPIRY.name() || table.name() == EXPIRY.name();
    }
    if old_dedupe && !new {
        tx.rename_table(OLD_DEDUPE_EXPIRY, OLD_EXPIRY).op(OP)?;
    }
    tx.delete_table(OLD_MAILBOX_EXPIRY).op(OP)?;
    Ok(())
}

/// Layouts before `inbox/2` kept one `mailbox/1` row and one `expiry/1` row
/// per envelope. Each waiting envelope becomes an `inbox/2` row of its own
/// (keyed by its seq, so sequence ranges stay disjoint; moved on to
/// `inbox/3` by [`super::mailbox::migrate_bodies`]) and each expiry row an
/// `expiry/2` row with one dedupe key; both old tables are then deleted.
/// In the opening transaction, so a crash leaves the old layout or the new.
fn migrate_inbox(tx: &WriteTransaction) -> Result<(), StoreError> {
    const OP: &str = "migrate mailbox to inbox rows";
    let mut old_mailbox = false;
    let mut old_expiry = false;
    for table in tx.list_tables().op(OP)? {
        old_mailbox |= table.name() == OLD_MAILBOX.name();
        old_expiry |= table.name() == OLD_EXPIRY.name();
    }
    if old_mailbox {
        let mailbox = tx.open_table(OLD_MAILBOX).op(OP)?;
        let mut inbox = tx.open_table(OLD_INBOX).op(OP)?;
        for entry in mailbox.iter().op(OP)? {
            let (key, value) = entry.op(OP)?;
            let (recipient, seq) = key.value();
            let (sender, group, id, sent_at, expires_at, body) = value.value();
            inbox
                .insert(
                    (recipient, seq),
                    vec![(seq, sender, group, id, sent_at, expires_at, body)],
                )
                .op(OP)?;
        }
        drop(mailbox);
        tx.delete_table(OLD_MAILBOX).op(OP)?;
    }
    if old_expiry {
        let old = tx.open_table(OLD_EXPIRY).op(OP)?;
        let mut expiry = tx.open_table(EXPIRY).op(OP)?;
        for entry in old.iter().op(OP)? {
            let (key, value) = entry.op(OP)?;
            let (recipient, sender, id) = value.value();
            expiry
                .insert(key.value(), (recipient, vec![(sender, id)]))
                .op(OP)?;
        }
        drop(old);
        tx.delete_table(OLD_EXPIRY).op(OP)?;
    }
    Ok(())
}
