//! Store-and-forward mailboxes: append (group commit), pending, ack, expiry.

use std::collections::HashMap;

use redb::{ReadableTable, Table, TableHandle as _, WriteTransaction};

use super::segments::{self, BodyLoc, Segments};
use super::tables::{
    ACCOUNTS, COUNTERS, DEDUPE, EXPIRY, INBOX, InboxRecord, MAILBOX_USAGE, NEXT_SEQ, OLD_DEDUPE,
    OLD_INBOX, SEGMENTS,
};
use super::{
    AppendOutcome, BatchOutcome, EnvelopeRecord, NewEnvelope, OpResult, PURGE_BATCH, Purged,
    QuotaKind, Store, StoreError, StoreOptions,
};

/// How many snapshots [`Store::pending`] and the body check try before
/// giving up: each retry means a segment was deleted between a snapshot and
/// its reads (acks, expiry or compaction in between), which a fresh
/// snapshot no longer refers to.
const READ_ATTEMPTS: usize = 8;

/// About the most body bytes one [`Store::compact_segments`] call moves
/// (one segment's worth at the default size), so its transaction stays
/// well under a second and does not hold up group commits for long.
pub const COMPACT_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// What one [`Store::compact_segments`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Compacted {
    /// Segment files it emptied (deleted after its commit).
    pub segments: usize,
    /// Bodies moved to the current segment.
    pub bodies: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether more segments qualified than one call moves.
    pub more: bool,
}

/// Most `inbox/2` records (about 16 MiB of 1 KiB bodies) or `dedupe/1` rows
/// one migration transaction moves, so a large old table never sits in
/// memory whole.
const MIGRATE_BATCH: usize = 16 * 1024;

impl Store {
    /// Stores a batch of envelopes in ONE durable write transaction (group
    /// commit) and returns one result per envelope, in batch order.
    ///
    /// Per envelope: [`AppendOutcome::Stored`] with a fresh sequence number;
    /// [`AppendOutcome::Duplicate`] when the same (recipient, sender,
    /// message id) was stored before, even if it was since acknowledged (the
    /// dedupe record lives until the envelope's expiry time, see
    /// [`super::StoreOptions::envelope_ttl_secs`]);
    /// [`StoreError::UnknownUser`] for an unknown recipient;
    /// [`StoreError::QuotaExceeded`] when the recipient's mailbox would go
    /// over a bound. These refusals do not affect the other envelopes.
    ///
    /// If the transaction fails (disk full, I/O error), every envelope of the
    /// batch gets that error: `Stored` is only ever reported after the
    /// commit returned `Ok`.
    pub fn append(&self, batch: Vec<NewEnvelope>) -> Vec<Result<AppendOutcome, StoreError>> {
        const OP: &str = "append";
        if batch.is_empty() {
            return Vec::new();
        }
        let options = self.inner.options;
        let segments = &self.inner.segments;
        match self.write_segments(OP, |tx, dead| {
            append_in(tx, OP, &batch, options, segments, dead)
        }) {
            Ok(results) => results,
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Up to `max` of the recipient's envelopes with `seq > after_seq`, in
    /// sequence order.
    pub fn pending(
        &self,
        recipient: &str,
        after_seq: u64,
        max: usize,
    ) -> Result<Vec<EnvelopeRecord>, StoreError> {
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        // Bodies are read after the transaction, from the places its
        // snapshot named. A segment deleted since then had all its bodies
        // acked, expired or moved by compaction meanwhile: the answer is
        // made again from a fresh snapshot rather than leave a gap (a
        // client pulls "after" the last seq it got, so a skipped envelope
        // would not be asked for again).
        for _ in 0..READ_ATTEMPTS {
            if let Some(out) = self.pending_once(recipient, start, max)? {
                return Ok(out);
            }
        }
        Err(StoreError::Corrupt(
            "segment files kept changing while bodies were read".to_owned(),
        ))
    }

    /// One attempt of [`Store::pending`]; `None` when a segment named by
    /// the snapshot was deleted before its bodies were read.
    fn pending_once(
        &self,
        recipient: &str,
        start: u64,
        max: usize,
    ) -> Result<Option<Vec<EnvelopeRecord>>, StoreError> {
        const OP: &str = "read pending";
        let waiting = self.read(OP, |tx| {
            let inbox = tx.open_table(INBOX).op(OP)?;
            // The row holding `start` (if any) begins at or before it.
            let from = match inbox
                .range((recipient, 0)..=(recipient, start))
                .op(OP)?
                .next_back()
            {
                Some(entry) => entry.op(OP)?.0.value().1,
                None => start,
            };
            let mut out = Vec::new();
            for entry in inbox
                .range((recipient, from)..=(recipient, u64::MAX))
                .op(OP)?
            {
                let (_, records) = entry.op(OP)?;
                for (seq, sender, group, message_id, sent_at, _expires_at, loc) in records.value() {
                    if seq < start {
                        continue;
                    }
                    if out.len() == max {
                        return Ok(out);
                    }
                    let record = EnvelopeRecord {
                        seq,
                        recipient: recipient.to_owned(),
                        sender: sender.to_owned(),
                        group: group.map(str::to_owned),
                        message_id: *message_id,
                        sent_at,
                        body: Vec::new(),
                    };
                    out.push((record, loc));
                }
            }
            Ok(out)
        })?;
        let mut out = Vec::with_capacity(waiting.len());
        for (mut record, loc) in waiting {
            let Some(body) = self.inner.segments.read(loc)? else {
                return Ok(None);
            };
            record.body = body;
            out.push(record);
        }
        Ok(Some(out))
    }

    /// Deletes the recipient's own envelopes with these sequence numbers
    /// and returns how many were removed. Sequence numbers of other users'
    /// envelopes, or already removed ones, are ignored. Dedupe records (and
    /// the expiry row that purges them) stay.
    ///
    /// Not durable on its own (no `fsync`): it becomes durable with the next
    /// group commit or at close. A crash before then only undoes the
    /// deletion, so the envelopes are delivered again and the client drops
    /// them as duplicates by `(from, id)`; nothing acknowledged is lost. An
    /// `fsync` per ack made every recipient's ack a commit of its own that
    /// held up the group commit: live relay ran at 37 % of the throughput
    /// (docs/benchmarks.md §3).
    pub fn ack(&self, recipient: &str, seqs: &[u64]) -> Result<u32, StoreError> {
        const OP: &str = "ack";
        if seqs.is_empty() {
            return Ok(0);
        }
        self.write_relaxed_segments(OP, |tx, dead| ack_in(tx, OP, recipient, seqs, dead))
    }

    /// One write transaction for the group-commit writer: stores `appends`
    /// as [`Store::append`] does, then applies `acks` (recipient, seqs) as
    /// [`Store::ack`] does, in that order (so an ack may remove an envelope
    /// appended by the same batch). Durable (`fsync`) when `appends` is not
    /// empty; acks alone commit without one, as in [`Store::ack`].
    ///
    /// Returns one append result per envelope and one removed count per
    /// ack. Per-envelope refusals do not affect the rest; an `Err` means
    /// nothing of the batch was committed (or, after a failed final
    /// `fsync`, that it is unknown: appends are idempotent).
    pub fn commit_batch(
        &self,
        appends: &[NewEnvelope],
        acks: &[(String, Vec<u64>)],
    ) -> Result<BatchOutcome, StoreError> {
        const OP: &str = "group commit";
        let options = self.inner.options;
        let segments = &self.inner.segments;
        let fill = |tx: &WriteTransaction, dead: &mut Vec<u64>| {
            let appended = if appends.is_empty() {
                Vec::new()
            } else {
                append_in(tx, OP, appends, options, segments, dead)?
            };
            let mut acked = Vec::with_capacity(acks.len());
            for (recipient, seqs) in acks {
                acked.push(ack_in(tx, OP, recipient, seqs, dead)?);
            }
            Ok(BatchOutcome { appended, acked })
        };
        if appends.is_empty() {
            if acks.is_empty() {
                return Ok(BatchOutcome::default());
            }
            self.write_relaxed_segments(OP, fill)
        } else {
            self.write_segments(OP, fill)
        }
    }

    /// Deletes what expired at or before `now` (expiry time = `sent_at`
    /// plus the TTL): each such envelope if it still waits, and its dedupe
    /// record. Stops after the expiry rows holding about [`PURGE_BATCH`]
    /// envelopes: call again while [`Purged::more`].
    pub fn purge_expired(&self, now: u64) -> Result<Purged, StoreError> {
        const OP: &str = "purge expired";
        self.write_segments(OP, |tx, dead| {
            let mut expiry = tx.open_table(EXPIRY).op(OP)?;
            let mut due: Vec<DueRow> = Vec::new();
            let mut keys = 0usize;
            let mut more = false;
            for entry in expiry.range(..=(now, u64::MAX)).op(OP)? {
                if keys >= PURGE_BATCH {
                    more = true;
                    break;
                }
                let (key, value) = entry.op(OP)?;
                let (recipient, ids) = value.value();
                keys += ids.len().max(1);
                let ids = ids
                    .into_iter()
                    .map(|(sender, id)| (sender.to_owned(), *id))
                    .collect();
                due.push((key.value(), recipient.to_owned(), ids));
            }
            let mut inbox = tx.open_table(INBOX).op(OP)?;
            let mut dedupe = tx.open_table(DEDUPE).op(OP)?;
            let mut freed: HashMap<&str, (u32, u64)> = HashMap::new();
            let mut bodies: HashMap<u64, (u64, u64)> = HashMap::new();
            for (key, recipient, ids) in &due {
                expiry.remove(*key).op(OP)?;
                for (sender, id) in ids {
                    dedupe
                        .remove((id, recipient.as_str(), sender.as_str()))
                        .op(OP)?;
                }
                // What acks left of the row; gone if all were acked.
                let Some(old) = inbox.remove((recipient.as_str(), key.1)).op(OP)? else {
                    continue;
                };
                let records = old.value();
                let slot = freed.entry(recipient.as_str()).or_default();
                for record in &records {
                    let (segment, _, len, _) = record.6;
                    slot.0 += 1;
                    slot.1 += u64::from(len);
                    let held = bodies.entry(segment).or_default();
                    held.0 += 1;
                    held.1 += u64::from(len);
                }
            }
            segments::release(&mut tx.open_table(SEGMENTS).op(OP)?, &bodies, dead)?;
            let mut usage = tx.open_table(MAILBOX_USAGE).op(OP)?;
            let mut envelopes = 0u32;
            for (recipient, (count, bytes)) in freed {
                release(&mut usage, OP, recipient, count, bytes)?;
                envelopes += count;
            }
            Ok(Purged { envelopes, more })
        })
    }

    /// Moves the bodies still waiting in mostly empty sealed segments to
    /// the current one, so those segments can be deleted: a segment is
    /// deleted only when its last body goes, and one long-waiting envelope
    /// would otherwise keep its whole segment on disk until it expires.
    ///
    /// A sealed segment (not the newest) qualifies when under a quarter of
    /// its committed bytes are still waiting. One call moves at most about
    /// [`COMPACT_BATCH_BYTES`], emptiest segments first, in one durable
    /// transaction (bodies written and synced before it commits, as for an
    /// append); call again while [`Compacted::more`]. Nothing a recipient
    /// sees changes: sequence numbers, rows and order stay; only where the
    /// bodies lie does.
    pub fn compact_segments(&self) -> Result<Compacted, StoreError> {
        const OP: &str = "compact segments";
        // Which segments, and which rows hold their bodies, from a snapshot;
        // the write transaction re-reads those rows.
        let plan = self.read(OP, |tx| {
            let table = tx.open_table(SEGMENTS).op(OP)?;
            let mut rows = Vec::new();
            for entry in table.iter().op(OP)? {
                let (key, value) = entry.op(OP)?;
                rows.push((key.value(), value.value()));
            }
            let newest = rows.last().map(|r| r.0);
            let mut sealed: Vec<(u64, u64)> = rows
                .iter()
                .filter(|&&(segment, (live, bytes, end))| {
                    Some(segment) != newest && live > 0 && bytes.saturating_mul(4) < end
                })
                .map(|&(segment, (_, bytes, _))| (segment, bytes))
                .collect();
            sealed.sort_by_key(|&(_, bytes)| bytes);
            let mut chosen = Vec::new();
            let mut budget = 0u64;
            let mut more = false;
            for (segment, bytes) in sealed {
                if !chosen.is_empty() && budget + bytes > COMPACT_BATCH_BYTES {
                    more = true;
                    break;
                }
                budget += bytes;
                chosen.push(segment);
            }
            if chosen.is_empty() {
                return Ok((chosen, Vec::new(), false));
            }
            let inbox = tx.open_table(INBOX).op(OP)?;
            let mut keys = Vec::new();
            for entry in inbox.iter().op(OP)? {
                let (key, records) = entry.op(OP)?;
                if records.value().iter().any(|r| chosen.contains(&r.6.0)) {
                    let (recipient, first) = key.value();
                    keys.push((recipient.to_owned(), first));
                }
            }
            Ok((chosen, keys, more))
        })?;
        let (chosen, keys, more) = plan;
        if chosen.is_empty() {
            return Ok(Compacted::default());
        }
        let options = self.inner.options;
        let segments = &self.inner.segments;
        self.write_segments(OP, |tx, dead| {
            let mut inbox = tx.open_table(INBOX).op(OP)?;
            let mut rows: Vec<(&(String, u64), Vec<OwnedRecord>)> = Vec::new();
            for key in &keys {
                if let Some(row) = inbox.get((key.0.as_str(), key.1)).op(OP)? {
                    let held: Vec<OwnedRecord> =
                        row.value().iter().map(OwnedRecord::from).collect();
                    rows.push((key, held));
                }
            }
            let mut bodies = Vec::new();
            let mut released: HashMap<u64, (u64, u64)> = HashMap::new();
            for (_, held) in &rows {
                for r in held.iter().filter(|r| chosen.contains(&r.body.0)) {
                    let body = segments.read(r.body)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("segment file {:016x} is missing", r.body.0))
                    })?;
                    bodies.push(body);
                    let slot = released.entry(r.body.0).or_default();
                    slot.0 += 1;
                    slot.1 += u64::from(r.body.2);
                }
            }
            let views: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
            let mut table = tx.open_table(SEGMENTS).op(OP)?;
            let mut locs = segments::place(
                segments,
                &mut table,
                &views,
                options.segment_max_bytes,
                dead,
            )?
            .into_iter();
            for (key, held) in &mut rows {
                let mut changed = false;
                for r in held.iter_mut().filter(|r| chosen.contains(&r.body.0)) {
                    r.body = locs
                        .next()
                        .ok_or_else(|| StoreError::Corrupt("a body was not placed".to_owned()))?;
                    changed = true;
                }
                if changed {
                    let records: Vec<InboxRecord<'_>> =
                        held.iter().map(OwnedRecord::as_record).collect();
                    inbox.insert((key.0.as_str(), key.1), records).op(OP)?;
                }
            }
            segments::release(&mut table, &released, dead)?;
            let moved = released
                .values()
                .fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
            Ok(Compacted {
                // Not a full, empty newest segment that `place` dropped
                // when it started a new one: only those compacted here.
                segments: dead.iter().filter(|s| chosen.contains(s)).count(),
                bodies: moved.0,
                bytes: moved.1,
                more,
            })
        })
    }

    /// Moves `inbox/2` rows (bodies inline) to `inbox/3` (bodies in
    /// segments), at open: up to [`MIGRATE_BATCH`] records per durable
    /// transaction, each writing and syncing its bodies first, so a crash
    /// leaves every envelope in one table or the other and the next open
    /// goes on. The old table is deleted once empty.
    pub(super) fn migrate_bodies(&self) -> Result<(), StoreError> {
        const OP: &str = "move bodies to segments";
        let options = self.inner.options;
        let segments = &self.inner.segments;
        while self.write_segments(OP, |tx, dead| {
            if !tx
                .list_tables()
                .op(OP)?
                .any(|table| table.name() == OLD_INBOX.name())
            {
                return Ok(false);
            }
            let mut old = tx.open_table(OLD_INBOX).op(OP)?;
            let mut rows: Vec<((String, u64), Vec<OldRecord>)> = Vec::new();
            let mut records = 0usize;
            for entry in old.iter().op(OP)? {
                if records >= MIGRATE_BATCH {
                    break;
                }
                let (key, value) = entry.op(OP)?;
                let (recipient, first) = key.value();
                let held: Vec<OldRecord> = value
                    .value()
                    .into_iter()
                    .map(
                        |(seq, sender, group, id, sent_at, expires_at, body)| OldRecord {
                            seq,
                            sender: sender.to_owned(),
                            group: group.map(str::to_owned),
                            message_id: *id,
                            sent_at,
                            expires_at,
                            body: body.to_vec(),
                        },
                    )
                    .collect();
                records += held.len();
                rows.push(((recipient.to_owned(), first), held));
            }
            if rows.is_empty() {
                drop(old);
                tx.delete_table(OLD_INBOX).op(OP)?;
                return Ok(false);
            }
            let bodies: Vec<&[u8]> = rows
                .iter()
                .flat_map(|(_, held)| held)
                .map(|r| r.body.as_slice())
                .collect();
            let mut table = tx.open_table(SEGMENTS).op(OP)?;
            let mut locs = segments::place(
                segments,
                &mut table,
                &bodies,
                options.segment_max_bytes,
                dead,
            )?
            .into_iter();
            let mut inbox = tx.open_table(INBOX).op(OP)?;
            for ((recipient, first), held) in &rows {
                let mut moved: Vec<InboxRecord<'_>> = Vec::with_capacity(held.len());
                for r in held {
                    let loc = locs
                        .next()
                        .ok_or_else(|| StoreError::Corrupt("a body was not placed".to_owned()))?;
                    moved.push((
                        r.seq,
                        r.sender.as_str(),
                        r.group.as_deref(),
                        &r.message_id,
                        r.sent_at,
                        r.expires_at,
                        loc,
                    ));
                }
                inbox.insert((recipient.as_str(), *first), moved).op(OP)?;
                old.remove((recipient.as_str(), *first)).op(OP)?;
            }
            Ok(true)
        })? {}
        Ok(())
    }

    /// Moves `dedupe/1` rows ((recipient, sender, id) keys) to `dedupe/2`
    /// ((id, recipient, sender) keys), at open: up to [`MIGRATE_BATCH`] rows
    /// per durable transaction, so a crash leaves each row in one table or
    /// the other and the next open goes on; the old table is deleted once
    /// empty.
    pub(super) fn migrate_dedupe(&self) -> Result<(), StoreError> {
        const OP: &str = "re-key dedupe records";
        while self.write(OP, |tx| {
            if !tx
                .list_tables()
                .op(OP)?
                .any(|table| table.name() == OLD_DEDUPE.name())
            {
                return Ok(false);
            }
            let mut old = tx.open_table(OLD_DEDUPE).op(OP)?;
            let mut rows: Vec<(OldDedupeKey, (u64, u64))> = Vec::new();
            for entry in old.iter().op(OP)? {
                if rows.len() >= MIGRATE_BATCH {
                    break;
                }
                let (key, value) = entry.op(OP)?;
                let (recipient, sender, id) = key.value();
                rows.push((
                    (recipient.to_owned(), sender.to_owned(), *id),
                    value.value(),
                ));
            }
            if rows.is_empty() {
                drop(old);
                tx.delete_table(OLD_DEDUPE).op(OP)?;
                return Ok(false);
            }
            let mut new = tx.open_table(DEDUPE).op(OP)?;
            for ((recipient, sender, id), value) in &rows {
                new.insert((id, recipient.as_str(), sender.as_str()), value)
                    .op(OP)?;
                old.remove((recipient.as_str(), sender.as_str(), id))
                    .op(OP)?;
            }
            Ok(true)
        })? {}
        Ok(())
    }

    /// At open: cuts segment files to their committed lengths and deletes
    /// leftover files no row names, or refuses a directory that does not
    /// belong to the database ([`Segments::recover`]).
    ///
    /// A database without segments gets the row of segment 1 (and its empty
    /// file) here, before any body is written, so that the table is never
    /// empty once the store has opened: segment files beside an empty
    /// table then belong to another database (or to one restored without
    /// its bodies), never to a first batch whose commit failed.
    pub(super) fn recover_segments(&self) -> Result<(), StoreError> {
        const OP: &str = "read segments";
        let rows = self.read(OP, |tx| {
            let table = tx.open_table(SEGMENTS).op(OP)?;
            let mut rows = Vec::new();
            for entry in table.iter().op(OP)? {
                let (key, value) = entry.op(OP)?;
                rows.push((key.value(), value.value()));
            }
            Ok(rows)
        })?;
        self.inner.segments.recover(&rows)?;
        if !rows.is_empty() {
            return Ok(());
        }
        const FIRST: &str = "start segments";
        let first = (1, (0, 0, 0));
        self.write(FIRST, |tx| {
            let mut table = tx.open_table(SEGMENTS).op(FIRST)?;
            if table.last().op(FIRST)?.is_none() {
                table.insert(first.0, first.1).op(FIRST)?;
            }
            Ok(())
        })?;
        // Creates the missing file of a row with nothing committed.
        self.inner.segments.recover(&[first])
    }

    /// Reads every waiting body (checking its CRC) and checks that the
    /// segments' counts match the index. `Corrupt` names what differs.
    pub(super) fn check_bodies(&self) -> Result<(), StoreError> {
        // As in `pending`: a segment deleted between the snapshot and the
        // reads means the snapshot is stale, not that a body is lost.
        for _ in 0..READ_ATTEMPTS {
            if self.check_bodies_once()? {
                return Ok(());
            }
        }
        Err(StoreError::Corrupt(
            "segment files kept changing while bodies were checked".to_owned(),
        ))
    }

    /// One attempt of [`Store::check_bodies`]; `false` when a segment named
    /// by the snapshot was deleted before its bodies were read.
    fn check_bodies_once(&self) -> Result<bool, StoreError> {
        const OP: &str = "check bodies";
        let (locs, rows) = self.read(OP, |tx| {
            let inbox = tx.open_table(INBOX).op(OP)?;
            let mut locs = Vec::new();
            for entry in inbox.iter().op(OP)? {
                let (_, records) = entry.op(OP)?;
                locs.extend(records.value().into_iter().map(|r| r.6));
            }
            let table = tx.open_table(SEGMENTS).op(OP)?;
            let mut rows = HashMap::new();
            for entry in table.iter().op(OP)? {
                let (key, value) = entry.op(OP)?;
                rows.insert(key.value(), value.value());
            }
            Ok((locs, rows))
        })?;
        let mut counted: HashMap<u64, (u64, u64)> = HashMap::new();
        for loc in locs {
            let (segment, offset, len, _) = loc;
            let Some(&(_, _, end)) = rows.get(&segment) else {
                return Err(StoreError::Corrupt(format!(
                    "a body lies in segment {segment:016x}, which has no row"
                )));
            };
            if offset.saturating_add(u64::from(len)) > end {
                return Err(StoreError::Corrupt(format!(
                    "a body lies past the committed end of segment {segment:016x}"
                )));
            }
            if self.inner.segments.read(loc)?.is_none() {
                return Ok(false);
            }
            let slot = counted.entry(segment).or_default();
            slot.0 += 1;
            slot.1 += u64::from(len);
        }
        for (segment, (live, bytes, _)) in rows {
            let found = counted.get(&segment).copied().unwrap_or_default();
            if found != (live, bytes) {
                return Err(StoreError::Corrupt(format!(
                    "segment {segment:016x} should hold {live} bodies ({bytes} bytes), \
                     the index has {} ({} bytes)",
                    found.0, found.1
                )));
            }
        }
        Ok(true)
    }

    /// (waiting envelopes, waiting body bytes) of a recipient.
    pub fn mailbox_usage(&self, recipient: &str) -> Result<(u32, u64), StoreError> {
        const OP: &str = "read mailbox usage";
        self.read(OP, |tx| {
            let usage = tx.open_table(MAILBOX_USAGE).op(OP)?;
            Ok(usage.get(recipient).op(OP)?.map_or((0, 0), |g| g.value()))
        })
    }
}

/// An expiry row being purged: its key, the recipient and the dedupe keys
/// (sender, message id) of its envelopes.
type DueRow = ((u64, u64), String, Vec<(String, [u8; 16])>);

/// What [`append_in`] knows of one recipient during a batch.
struct Recipient {
    /// The account exists.
    exists: bool,
    /// (waiting envelopes, waiting body bytes), as it will be written.
    usage: (u32, u64),
    /// `usage` changed and must be written back.
    dirty: bool,
    /// The envelopes stored for it, as runs that share an expiry time: each
    /// run becomes one [`INBOX`] row and one [`EXPIRY`] row.
    runs: Vec<Run>,
}

/// Consecutive envelopes of one recipient in a batch with one expiry time.
struct Run {
    /// Their expiry time.
    expires_at: u64,
    /// (index in the batch, seq) of each, in sequence order.
    members: Vec<(usize, u64)>,
}

/// The body of [`Store::append`]'s transaction.
///
/// A batch usually holds several envelopes per recipient, so each
/// recipient's account and usage are read once and the usage written once,
/// and its envelopes go into one [`INBOX`] row (one per expiry time) with
/// one [`EXPIRY`] row: per envelope only its dedupe record is a B-tree
/// entry of its own (docs/benchmarks.md §1).
fn append_in(
    tx: &WriteTransaction,
    op: &'static str,
    batch: &[NewEnvelope],
    options: StoreOptions,
    segments: &Segments,
    dead: &mut Vec<u64>,
) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
    let accounts = tx.open_table(ACCOUNTS).op(op)?;
    let mut inbox = tx.open_table(INBOX).op(op)?;
    let mut usage = tx.open_table(MAILBOX_USAGE).op(op)?;
    let mut expiry = tx.open_table(EXPIRY).op(op)?;
    let mut dedupe = tx.open_table(DEDUPE).op(op)?;
    let mut counters = tx.open_table(COUNTERS).op(op)?;
    let first_seq = counters.get(NEXT_SEQ).op(op)?.map_or(1, |g| g.value());
    let mut next_seq = first_seq;
    // In order of first appearance, so rows are written in a fixed order.
    let mut recipients: Vec<(&str, Recipient)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();

    let mut results = Vec::with_capacity(batch.len());
    for (at, env) in batch.iter().enumerate() {
        let recipient = env.recipient.as_str();
        let dedupe_key = (&env.message_id, recipient, env.sender.as_str());
        let seq = next_seq;
        let expires_at = env.sent_at.saturating_add(options.envelope_ttl_secs);
        // Insert first and look at what was there: one descent of the tree
        // instead of a lookup and an insert. A duplicate (rare) puts the old
        // record back; a refusal below takes the new one out again.
        let previous = dedupe
            .insert(dedupe_key, (seq, expires_at))
            .op(op)?
            .map(|old| old.value());
        if let Some(old) = previous {
            dedupe.insert(dedupe_key, old).op(op)?;
            results.push(Ok(AppendOutcome::Duplicate { seq: old.0 }));
            continue;
        }
        let slot = match index.get(recipient) {
            Some(&slot) => slot,
            None => {
                let exists = accounts.get(recipient).op(op)?.is_some();
                let current = if exists {
                    usage.get(recipient).op(op)?.map_or((0, 0), |g| g.value())
                } else {
                    (0, 0)
                };
                recipients.push((
                    recipient,
                    Recipient {
                        exists,
                        usage: current,
                        dirty: false,
                        runs: Vec::new(),
                    },
                ));
                index.insert(recipient, recipients.len() - 1);
                recipients.len() - 1
            }
        };
        let state = &mut recipients[slot].1;
        let (count, bytes) = state.usage;
        let len = env.body.len() as u64;
        let refused = if !state.exists {
            Some(StoreError::UnknownUser)
        } else if count >= options.mailbox_max_messages {
            Some(StoreError::QuotaExceeded {
                kind: QuotaKind::Count,
                limit: u64::from(options.mailbox_max_messages),
            })
        } else if bytes.saturating_add(len) > options.mailbox_max_bytes {
            Some(StoreError::QuotaExceeded {
                kind: QuotaKind::Bytes,
                limit: options.mailbox_max_bytes,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            dedupe.remove(dedupe_key).op(op)?;
            results.push(Err(e));
            continue;
        }
        next_seq += 1;
        match state.runs.last_mut() {
            Some(run) if run.expires_at == expires_at => run.members.push((at, seq)),
            _ => state.runs.push(Run {
                expires_at,
                members: vec![(at, seq)],
            }),
        }
        state.usage = (count + 1, bytes + len);
        state.dirty = true;
        results.push(Ok(AppendOutcome::Stored { seq }));
    }
    // The bodies, in the order the rows list them (recipient by recipient,
    // run by run), go to the segment first, synced before this commit.
    let bodies: Vec<&[u8]> = recipients
        .iter()
        .flat_map(|(_, state)| &state.runs)
        .flat_map(|run| &run.members)
        .map(|&(at, _)| batch[at].body.as_slice())
        .collect();
    let mut table = tx.open_table(SEGMENTS).op(op)?;
    let locs = segments::place(
        segments,
        &mut table,
        &bodies,
        options.segment_max_bytes,
        dead,
    )?;
    let mut locs = locs.into_iter();
    for (recipient, state) in &recipients {
        for run in &state.runs {
            let Some(&(_, first)) = run.members.first() else {
                continue;
            };
            let mut records: Vec<InboxRecord<'_>> = Vec::with_capacity(run.members.len());
            for &(at, seq) in &run.members {
                let env = &batch[at];
                let loc = locs
                    .next()
                    .ok_or_else(|| StoreError::Corrupt("a body was not placed".to_owned()))?;
                records.push((
                    seq,
                    env.sender.as_str(),
                    env.group.as_deref(),
                    &env.message_id,
                    env.sent_at,
                    run.expires_at,
                    loc,
                ));
            }
            inbox.insert((*recipient, first), records).op(op)?;
            let ids: Vec<(&str, &[u8; 16])> = run
                .members
                .iter()
                .map(|&(at, _)| (batch[at].sender.as_str(), &batch[at].message_id))
                .collect();
            expiry
                .insert((run.expires_at, first), (*recipient, ids))
                .op(op)?;
        }
        if state.dirty {
            usage.insert(*recipient, state.usage).op(op)?;
        }
    }
    if next_seq != first_seq {
        counters.insert(NEXT_SEQ, next_seq).op(op)?;
    }
    Ok(results)
}

/// The body of [`Store::ack`]: removes the recipient's envelopes `seqs`.
///
/// Each [`INBOX`] row touched loses the acked records: it is removed when
/// none is left, rewritten otherwise. Its [`EXPIRY`] row stays, for the
/// dedupe records.
fn ack_in(
    tx: &WriteTransaction,
    op: &'static str,
    recipient: &str,
    seqs: &[u64],
    dead: &mut Vec<u64>,
) -> Result<u32, StoreError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut inbox = tx.open_table(INBOX).op(op)?;
    let mut removed = 0u32;
    let mut removed_bytes = 0u64;
    let mut bodies: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut at = 0;
    while let Some(&seq) = sorted.get(at) {
        // The row that would hold `seq`: the last one starting at or before
        // it. What it keeps is copied out (the records borrow from the row
        // being replaced).
        let change = match inbox
            .range((recipient, 0)..=(recipient, seq))
            .op(op)?
            .next_back()
        {
            Some(entry) => {
                let (key, value) = entry.op(op)?;
                let records = value.value();
                let last = records.last().map_or(0, |r| r.0);
                if last < seq {
                    at += 1;
                    continue;
                }
                let end = at + sorted[at..].partition_point(|&s| s <= last);
                let acked = &sorted[at..end];
                let mut kept = Vec::with_capacity(records.len());
                let mut gone = 0u32;
                let mut gone_bytes = 0u64;
                for record in &records {
                    if acked.binary_search(&record.0).is_ok() {
                        let (segment, _, len, _) = record.6;
                        gone += 1;
                        gone_bytes += u64::from(len);
                        let held = bodies.entry(segment).or_default();
                        held.0 += 1;
                        held.1 += u64::from(len);
                    } else {
                        kept.push(OwnedRecord::from(record));
                    }
                }
                Some((key.value().1, end, gone, gone_bytes, kept))
            }
            None => None,
        };
        let Some((first, end, gone, gone_bytes, kept)) = change else {
            // Not waiting (acked before, expired, or never this user's).
            at += 1;
            continue;
        };
        at = end;
        if gone == 0 {
            continue;
        }
        removed += gone;
        removed_bytes += gone_bytes;
        if kept.is_empty() {
            inbox.remove((recipient, first)).op(op)?;
        } else {
            let rows: Vec<InboxRecord<'_>> = kept.iter().map(OwnedRecord::as_record).collect();
            inbox.insert((recipient, first), rows).op(op)?;
        }
    }
    if removed > 0 {
        let mut usage = tx.open_table(MAILBOX_USAGE).op(op)?;
        release(&mut usage, op, recipient, removed, removed_bytes)?;
        segments::release(&mut tx.open_table(SEGMENTS).op(op)?, &bodies, dead)?;
    }
    Ok(removed)
}

/// A `dedupe/1` key being moved: (recipient, sender, message id).
type OldDedupeKey = (String, String, [u8; 16]);

/// An `inbox/2` record being moved, body inline.
struct OldRecord {
    seq: u64,
    sender: String,
    group: Option<String>,
    message_id: [u8; 16],
    sent_at: u64,
    expires_at: u64,
    body: Vec<u8>,
}

/// An [`InboxRecord`] that owns its strings.
struct OwnedRecord {
    seq: u64,
    sender: String,
    group: Option<String>,
    message_id: [u8; 16],
    sent_at: u64,
    expires_at: u64,
    body: BodyLoc,
}

impl From<&InboxRecord<'_>> for OwnedRecord {
    fn from(r: &InboxRecord<'_>) -> Self {
        Self {
            seq: r.0,
            sender: r.1.to_owned(),
            group: r.2.map(str::to_owned),
            message_id: *r.3,
            sent_at: r.4,
            expires_at: r.5,
            body: r.6,
        }
    }
}

impl OwnedRecord {
    fn as_record(&self) -> InboxRecord<'_> {
        (
            self.seq,
            self.sender.as_str(),
            self.group.as_deref(),
            &self.message_id,
            self.sent_at,
            self.expires_at,
            self.body,
        )
    }
}

/// Lowers a recipient's usage by what was removed; drops the row at zero.
fn release(
    usage: &mut Table<&str, (u32, u64)>,
    op: &'static str,
    recipient: &str,
    count: u32,
    bytes: u64,
) -> Result<(), StoreError> {
    let (old_count, old_bytes) = usage.get(recipient).op(op)?.map_or((0, 0), |g| g.value());
    let new = (
        old_count.saturating_sub(count),
        old_bytes.saturating_sub(bytes),
    );
    if new.0 == 0 {
        usage.remove(recipient).op(op)?;
    } else {
        usage.insert(recipient, new).op(op)?;
    }
    Ok(())
}
