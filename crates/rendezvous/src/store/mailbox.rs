//! Store-and-forward mailboxes: append (group commit), pending, ack, expiry.

use std::collections::HashMap;

use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{ACCOUNTS, COUNTERS, DEDUPE, EXPIRY, MAILBOX, MAILBOX_USAGE, NEXT_SEQ};
use super::{
    AppendOutcome, BatchOutcome, EnvelopeRecord, NewEnvelope, OpResult, PURGE_BATCH, Purged,
    QuotaKind, Store, StoreError, StoreOptions,
};

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
        match self.write(OP, |tx| append_in(tx, OP, &batch, options)) {
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
        const OP: &str = "read pending";
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.read(OP, |tx| {
            let mailbox = tx.open_table(MAILBOX).op(OP)?;
            let mut out = Vec::new();
            for entry in mailbox
                .range((recipient, start)..=(recipient, u64::MAX))
                .op(OP)?
                .take(max)
            {
                let (key, value) = entry.op(OP)?;
                let (sender, group, message_id, sent_at, _expires_at, body) = value.value();
                out.push(EnvelopeRecord {
                    seq: key.value().1,
                    recipient: recipient.to_owned(),
                    sender: sender.to_owned(),
                    group: group.map(str::to_owned),
                    message_id: *message_id,
                    sent_at,
                    body: body.to_vec(),
                });
            }
            Ok(out)
        })
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
        self.write_relaxed(OP, |tx| ack_in(tx, OP, recipient, seqs))
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
        let fill = |tx: &WriteTransaction| {
            let appended = if appends.is_empty() {
                Vec::new()
            } else {
                append_in(tx, OP, appends, options)?
            };
            let mut acked = Vec::with_capacity(acks.len());
            for (recipient, seqs) in acks {
                acked.push(ack_in(tx, OP, recipient, seqs)?);
            }
            Ok(BatchOutcome { appended, acked })
        };
        if appends.is_empty() {
            if acks.is_empty() {
                return Ok(BatchOutcome::default());
            }
            self.write_relaxed(OP, fill)
        } else {
            self.write(OP, fill)
        }
    }

    /// Deletes what expired at or before `now` (expiry time = `sent_at`
    /// plus the TTL): each such envelope if it still waits, and its dedupe
    /// record. At most [`PURGE_BATCH`] expiry rows per call: call again
    /// while [`Purged::more`].
    pub fn purge_expired(&self, now: u64) -> Result<Purged, StoreError> {
        const OP: &str = "purge expired";
        self.write(OP, |tx| {
            let mut expiry = tx.open_table(EXPIRY).op(OP)?;
            let mut due: Vec<(u64, u64, String, String, [u8; 16])> = Vec::new();
            for entry in expiry.range(..=(now, u64::MAX)).op(OP)?.take(PURGE_BATCH) {
                let (key, value) = entry.op(OP)?;
                let (expires_at, seq) = key.value();
                let (recipient, sender, id) = value.value();
                due.push((
                    expires_at,
                    seq,
                    recipient.to_owned(),
                    sender.to_owned(),
                    *id,
                ));
            }
            let mut mailbox = tx.open_table(MAILBOX).op(OP)?;
            let mut dedupe = tx.open_table(DEDUPE).op(OP)?;
            let mut freed: HashMap<&str, (u32, u64)> = HashMap::new();
            for (expires_at, seq, recipient, sender, id) in &due {
                expiry.remove((*expires_at, *seq)).op(OP)?;
                dedupe
                    .remove((recipient.as_str(), sender.as_str(), id))
                    .op(OP)?;
                let Some(old) = mailbox.remove((recipient.as_str(), *seq)).op(OP)? else {
                    // Acked before it expired.
                    continue;
                };
                let len = old.value().5.len() as u64;
                let slot = freed.entry(recipient.as_str()).or_default();
                slot.0 += 1;
                slot.1 += len;
            }
            let mut usage = tx.open_table(MAILBOX_USAGE).op(OP)?;
            let mut envelopes = 0u32;
            for (recipient, (count, bytes)) in freed {
                release(&mut usage, OP, recipient, count, bytes)?;
                envelopes += count;
            }
            Ok(Purged {
                envelopes,
                more: due.len() == PURGE_BATCH,
            })
        })
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

/// What [`append_in`] knows of one recipient during a batch.
struct Recipient {
    /// The account exists.
    exists: bool,
    /// (waiting envelopes, waiting body bytes), as it will be written.
    usage: (u32, u64),
    /// `usage` changed and must be written back.
    dirty: bool,
}

/// The body of [`Store::append`]'s transaction.
///
/// A batch usually holds several envelopes per recipient, so each
/// recipient's account and usage are read once and the usage written once
/// (docs/benchmarks.md §1: fewer B-tree operations per envelope).
fn append_in(
    tx: &WriteTransaction,
    op: &'static str,
    batch: &[NewEnvelope],
    options: StoreOptions,
) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
    let accounts = tx.open_table(ACCOUNTS).op(op)?;
    let mut mailbox = tx.open_table(MAILBOX).op(op)?;
    let mut usage = tx.open_table(MAILBOX_USAGE).op(op)?;
    let mut expiry = tx.open_table(EXPIRY).op(op)?;
    let mut dedupe = tx.open_table(DEDUPE).op(op)?;
    let mut counters = tx.open_table(COUNTERS).op(op)?;
    let first_seq = counters.get(NEXT_SEQ).op(op)?.map_or(1, |g| g.value());
    let mut next_seq = first_seq;
    let mut recipients: HashMap<&str, Recipient> = HashMap::new();

    let mut results = Vec::with_capacity(batch.len());
    for env in batch {
        let recipient = env.recipient.as_str();
        let dedupe_key = (recipient, env.sender.as_str(), &env.message_id);
        if let Some(found) = dedupe.get(dedupe_key).op(op)? {
            results.push(Ok(AppendOutcome::Duplicate {
                seq: found.value().0,
            }));
            continue;
        }
        let state = match recipients.entry(recipient) {
            std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let exists = accounts.get(recipient).op(op)?.is_some();
                let current = if exists {
                    usage.get(recipient).op(op)?.map_or((0, 0), |g| g.value())
                } else {
                    (0, 0)
                };
                slot.insert(Recipient {
                    exists,
                    usage: current,
                    dirty: false,
                })
            }
        };
        if !state.exists {
            results.push(Err(StoreError::UnknownUser));
            continue;
        }
        let (count, bytes) = state.usage;
        let len = env.body.len() as u64;
        if count >= options.mailbox_max_messages {
            results.push(Err(StoreError::QuotaExceeded {
                kind: QuotaKind::Count,
                limit: u64::from(options.mailbox_max_messages),
            }));
            continue;
        }
        if bytes.saturating_add(len) > options.mailbox_max_bytes {
            results.push(Err(StoreError::QuotaExceeded {
                kind: QuotaKind::Bytes,
                limit: options.mailbox_max_bytes,
            }));
            continue;
        }
        let seq = next_seq;
        next_seq += 1;
        let expires_at = env.sent_at.saturating_add(options.envelope_ttl_secs);
        mailbox
            .insert(
                (recipient, seq),
                (
                    env.sender.as_str(),
                    env.group.as_deref(),
                    &env.message_id,
                    env.sent_at,
                    expires_at,
                    env.body.as_slice(),
                ),
            )
            .op(op)?;
        state.usage = (count + 1, bytes + len);
        state.dirty = true;
        dedupe.insert(dedupe_key, (seq, expires_at)).op(op)?;
        expiry.insert((expires_at, seq), dedupe_key).op(op)?;
        results.push(Ok(AppendOutcome::Stored { seq }));
    }
    for (recipient, state) in recipients {
        if state.dirty {
            usage.insert(recipient, state.usage).op(op)?;
        }
    }
    if next_seq != first_seq {
        counters.insert(NEXT_SEQ, next_seq).op(op)?;
    }
    Ok(results)
}

/// The body of [`Store::ack`]: removes the recipient's envelopes `seqs`.
fn ack_in(
    tx: &WriteTransaction,
    op: &'static str,
    recipient: &str,
    seqs: &[u64],
) -> Result<u32, StoreError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let mut mailbox = tx.open_table(MAILBOX).op(op)?;
    let mut removed = 0u32;
    let mut removed_bytes = 0u64;
    for &seq in seqs {
        let Some(old) = mailbox.remove((recipient, seq)).op(op)? else {
            continue;
        };
        removed_bytes += old.value().5.len() as u64;
        removed += 1;
    }
    if removed > 0 {
        let mut usage = tx.open_table(MAILBOX_USAGE).op(op)?;
        release(&mut usage, op, recipient, removed, removed_bytes)?;
    }
    Ok(removed)
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
