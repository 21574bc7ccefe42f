//! Accounts, invites and the key directory (signed and one-time prekeys).

use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{ACCOUNTS, INVITES, OPK_META, OPKS, REDEEMED_INVITES};
use super::{AccountRecord, MAX_ONE_TIME_PREKEYS, OneTimePrekey, OpResult, Store, StoreError};

impl Store {
    /// Registers an account with its first one-time prekeys, atomically.
    /// Fails with [`StoreError::UserExists`] if the name is taken, and with
    /// the prekey errors of [`Store::add_one_time_prekeys`].
    pub fn create_account(
        &self,
        account: AccountRecord,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<(), StoreError> {
        const OP: &str = "create account";
        self.write(OP, |tx| {
            let mut accounts = tx.open_table(ACCOUNTS).op(OP)?;
            if accounts.get(account.username.as_str()).op(OP)?.is_some() {
                return Err(StoreError::UserExists);
            }
            put_account(&mut accounts, OP, &account)?;
            insert_prekeys(tx, OP, &account.username, &one_time_prekeys)?;
            Ok(())
        })
    }

    /// Replaces an existing account's identity and signed prekey and its
    /// whole one-time prekey pool (an operator's key reset), atomically.
    /// The prekey id floor starts over: ids are unique per identity, and a
    /// new identity numbers its prekeys from the start. Fails with
    /// [`StoreError::UnknownUser`] if there is no such account.
    pub fn replace_account(
        &self,
        account: AccountRecord,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<(), StoreError> {
        const OP: &str = "replace account";
        self.write(OP, |tx| {
            let mut accounts = tx.open_table(ACCOUNTS).op(OP)?;
            if accounts.get(account.username.as_str()).op(OP)?.is_none() {
                return Err(StoreError::UnknownUser);
            }
            put_account(&mut accounts, OP, &account)?;
            let name = account.username.as_str();
            let mut opks = tx.open_table(OPKS).op(OP)?;
            let old: Vec<u32> = opks
                .range((name, 0u32)..=(name, u32::MAX))
                .op(OP)?
                .map(|item| item.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()
                .op(OP)?;
            for id in old {
                opks.remove((name, id)).op(OP)?;
            }
            drop(opks);
            tx.open_table(OPK_META)
                .op(OP)?
                .insert(name, (0u32, 0u64))
                .op(OP)?;
            insert_prekeys(tx, OP, name, &one_time_prekeys)?;
            Ok(())
        })
    }

    /// The account, if it exists.
    pub fn account(&self, username: &str) -> Result<Option<AccountRecord>, StoreError> {
        const OP: &str = "read account";
        self.read(OP, |tx| {
            let accounts = tx.open_table(ACCOUNTS).op(OP)?;
            account_in(&accounts, OP, username)
        })
    }

    /// Replaces the user's signed prekey (rotation).
    pub fn set_signed_prekey(
        &self,
        username: &str,
        signed_prekey: &[u8],
    ) -> Result<(), StoreError> {
        const OP: &str = "set signed prekey";
        self.write(OP, |tx| {
            let mut accounts = tx.open_table(ACCOUNTS).op(OP)?;
            let Some(account) = account_in(&accounts, OP, username)? else {
                return Err(StoreError::UnknownUser);
            };
            accounts
                .insert(
                    username,
                    (
                        account.identity.as_slice(),
                        signed_prekey,
                        account.registered_at,
                    ),
                )
                .op(OP)?;
            Ok(())
        })
    }

    /// Records an invite by the SHA-256 of its token (the token itself is
    /// never stored). Adding one twice is harmless.
    pub fn add_invite(&self, token_hash: [u8; 32]) -> Result<(), StoreError> {
        const OP: &str = "add invite";
        self.write(OP, |tx| {
            tx.open_table(INVITES)
                .op(OP)?
                .insert(&token_hash, ())
                .op(OP)?;
            Ok(())
        })
    }

    /// Redeems a self-authenticating invite (see `invite.rs`) by the SHA-256
    /// of its id: `true` the first time, `false` if it was used before.
    pub fn redeem_invite(&self, id_hash: [u8; 32], now: u64) -> Result<bool, StoreError> {
        const OP: &str = "redeem invite";
        self.write(OP, |tx| {
            let mut redeemed = tx.open_table(REDEEMED_INVITES).op(OP)?;
            if redeemed.get(&id_hash).op(OP)?.is_some() {
                return Ok(false);
            }
            redeemed.insert(&id_hash, now).op(OP)?;
            Ok(true)
        })
    }

    /// Consumes an invite: `true` the first time for a recorded token hash,
    /// `false` afterwards or for an unknown one.
    pub fn take_invite(&self, token_hash: [u8; 32]) -> Result<bool, StoreError> {
        const OP: &str = "take invite";
        self.write(OP, |tx| {
            let mut invites = tx.open_table(INVITES).op(OP)?;
            let removed = invites.remove(&token_hash).op(OP)?.is_some();
            Ok(removed)
        })
    }

    /// A prekey bundle: the account and the one-time prekey with the lowest
    /// id, which is deleted in the same write transaction, so that no
    /// one-time prekey is ever handed out twice. `None` for an unknown user;
    /// the prekey is `None` when the pool is empty (signed-prekey-only bundle).
    #[allow(clippy::type_complexity)]
    pub fn take_bundle(
        &self,
        username: &str,
    ) -> Result<Option<(AccountRecord, Option<OneTimePrekey>)>, StoreError> {
        const OP: &str = "take bundle";
        self.write(OP, |tx| {
            let accounts = tx.open_table(ACCOUNTS).op(OP)?;
            let Some(account) = account_in(&accounts, OP, username)? else {
                return Ok(None);
            };
            let mut opks = tx.open_table(OPKS).op(OP)?;
            let first = opks
                .range((username, 0u32)..=(username, u32::MAX))
                .op(OP)?
                .next()
                .transpose()
                .op(OP)?
                .map(|(k, v)| (k.value().1, v.value().to_vec()));
            let Some((id, key)) = first else {
                return Ok(Some((account, None)));
            };
            opks.remove((username, id)).op(OP)?;
            let mut meta = tx.open_table(OPK_META).op(OP)?;
            let (count, floor) = meta_of(&meta, OP, username)?;
            meta.insert(username, (count.saturating_sub(1), floor))
                .op(OP)?;
            Ok(Some((account, Some((id, key)))))
        })
    }

    /// Adds one-time prekeys, all or none, and returns how many are stored
    /// now. Every id must be above every id ever stored for the user (a
    /// high-water mark, kept after the prekeys are consumed), or the call
    /// fails with [`StoreError::PrekeyIdReused`]; the pool is capped at
    /// [`MAX_ONE_TIME_PREKEYS`] ([`StoreError::TooManyPrekeys`]).
    pub fn add_one_time_prekeys(
        &self,
        username: &str,
        prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32, StoreError> {
        const OP: &str = "add one-time prekeys";
        self.write(OP, |tx| {
            if tx
                .open_table(ACCOUNTS)
                .op(OP)?
                .get(username)
                .op(OP)?
                .is_none()
            {
                return Err(StoreError::UnknownUser);
            }
            insert_prekeys(tx, OP, username, &prekeys)
        })
    }

    /// How many one-time prekeys the user has left.
    pub fn one_time_prekey_count(&self, username: &str) -> Result<u32, StoreError> {
        const OP: &str = "count one-time prekeys";
        self.read(OP, |tx| {
            if tx
                .open_table(ACCOUNTS)
                .op(OP)?
                .get(username)
                .op(OP)?
                .is_none()
            {
                return Err(StoreError::UnknownUser);
            }
            let meta = tx.open_table(OPK_META).op(OP)?;
            Ok(meta_of(&meta, OP, username)?.0)
        })
    }
}

/// Writes one account row.
fn put_account(
    accounts: &mut Table<&'static str, (&'static [u8], &'static [u8], u64)>,
    op: &'static str,
    account: &AccountRecord,
) -> Result<(), StoreError> {
    accounts
        .insert(
            account.username.as_str(),
            (
                account.identity.as_slice(),
                account.signed_prekey.as_slice(),
                account.registered_at,
            ),
        )
        .op(op)?;
    Ok(())
}

/// Reads one account from an open accounts table.
fn account_in(
    accounts: &impl ReadableTable<&'static str, (&'static [u8], &'static [u8], u64)>,
    op: &'static str,
    username: &str,
) -> Result<Option<AccountRecord>, StoreError> {
    let Some(guard) = accounts.get(username).op(op)? else {
        return Ok(None);
    };
    let (identity, signed_prekey, registered_at) = guard.value();
    Ok(Some(AccountRecord {
        username: username.to_owned(),
        identity: identity.to_vec(),
        signed_prekey: signed_prekey.to_vec(),
        registered_at,
    }))
}

/// (count, lowest acceptable id) of a user's pool; (0, 0) if none yet.
fn meta_of(
    meta: &impl ReadableTable<&'static str, (u32, u64)>,
    op: &'static str,
    username: &str,
) -> Result<(u32, u64), StoreError> {
    Ok(meta.get(username).op(op)?.map_or((0, 0), |g| g.value()))
}

/// Checks and inserts prekeys, updating the count and high-water mark.
fn insert_prekeys(
    tx: &WriteTransaction,
    op: &'static str,
    username: &str,
    prekeys: &[OneTimePrekey],
) -> Result<u32, StoreError> {
    let mut meta: Table<&str, (u32, u64)> = tx.open_table(OPK_META).op(op)?;
    let (count, floor) = meta_of(&meta, op, username)?;
    let mut ids: Vec<u32> = prekeys.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    for pair in ids.windows(2) {
        if pair[0] == pair[1] {
            return Err(StoreError::PrekeyIdReused(pair[0]));
        }
    }
    if let Some(&low) = ids.first()
        && u64::from(low) < floor
    {
        return Err(StoreError::PrekeyIdReused(low));
    }
    let added = u32::try_from(prekeys.len()).unwrap_or(u32::MAX);
    let total = count.saturating_add(added);
    if total > MAX_ONE_TIME_PREKEYS {
        return Err(StoreError::TooManyPrekeys {
            limit: MAX_ONE_TIME_PREKEYS,
        });
    }
    let mut opks = tx.open_table(OPKS).op(op)?;
    for (id, key) in prekeys {
        opks.insert((username, *id), key.as_slice()).op(op)?;
    }
    let new_floor = ids.last().map_or(floor, |&high| u64::from(high) + 1);
    meta.insert(username, (total, new_floor)).op(op)?;
    Ok(total)
}
