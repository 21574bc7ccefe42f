//! Friends, groups, join requests and server announcements.

use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{
    ACCOUNTS, ANNOUNCEMENT_CURSORS, ANNOUNCEMENTS, COUNTERS, FRIEND_NOTICES, FRIEND_REQUESTS_IN,
    FRIEND_REQUESTS_OUT, FRIENDS, GROUPS, JOIN_REQUESTS, LEAVE_REQUESTS, MEMBER_OF,
    NEXT_ANNOUNCEMENT, NEXT_NOTICE,
};
use super::{
    AnnouncementRecord, FriendNotice, FriendRequestOutcome, GroupRecord, KeptNotice,
    MAX_ANNOUNCEMENTS_PER_CALL, OpResult, Store, StoreError,
};

impl Store {
    /// `from` asks `to` to be friends. If `to` had already asked `from`,
    /// they become friends at once ([`FriendRequestOutcome::AcceptedReverse`]).
    pub fn friend_request(&self, from: &str, to: &str) -> Result<FriendRequestOutcome, StoreError> {
        const OP: &str = "friend request";
        if from == to {
            return Err(StoreError::SelfFriend);
        }
        self.write(OP, |tx| {
            require_users(tx, OP, &[from, to])?;
            let mut friends = tx.open_table(FRIENDS).op(OP)?;
            if friends.get((from, to)).op(OP)?.is_some() {
                return Ok(FriendRequestOutcome::AlreadyFriends);
            }
            let mut out = tx.open_table(FRIEND_REQUESTS_OUT).op(OP)?;
            let mut incoming = tx.open_table(FRIEND_REQUESTS_IN).op(OP)?;
            if out.get((from, to)).op(OP)?.is_some() {
                return Ok(FriendRequestOutcome::AlreadyRequested);
            }
            if out.get((to, from)).op(OP)?.is_some() {
                out.remove((to, from)).op(OP)?;
                incoming.remove((from, to)).op(OP)?;
                befriend(&mut friends, OP, from, to)?;
                let notice = keep_notice(tx, OP, to, from, FriendNotice::Accepted)?;
                return Ok(FriendRequestOutcome::AcceptedReverse { notice });
            }
            out.insert((from, to), ()).op(OP)?;
            incoming.insert((to, from), ()).op(OP)?;
            Ok(FriendRequestOutcome::Sent)
        })
    }

    /// `user` accepts the pending request from `requester`: they become
    /// friends, and `requester` has a [`FriendNotice::Accepted`] from `user`
    /// kept; returns its number. [`StoreError::NoSuchRequest`] if there is
    /// none.
    pub fn friend_accept(&self, user: &str, requester: &str) -> Result<u64, StoreError> {
        const OP: &str = "friend accept";
        self.write(OP, |tx| {
            take_request(tx, OP, requester, user)?;
            let mut friends = tx.open_table(FRIENDS).op(OP)?;
            befriend(&mut friends, OP, user, requester)?;
            keep_notice(tx, OP, requester, user, FriendNotice::Accepted)
        })
    }

    /// `user` declines the pending request from `requester`, who has a
    /// [`FriendNotice::Declined`] kept; returns its number.
    /// [`StoreError::NoSuchRequest`] if there is none.
    pub fn friend_decline(&self, user: &str, requester: &str) -> Result<u64, StoreError> {
        const OP: &str = "friend decline";
        self.write(OP, |tx| {
            take_request(tx, OP, requester, user)?;
            keep_notice(tx, OP, requester, user, FriendNotice::Declined)
        })
    }

    /// Ends the friendship of `a` and `b` (both directions); `b` has a
    /// [`FriendNotice::Removed`] from `a` kept; returns its number.
    /// [`StoreError::NotFriends`] if they are not friends.
    pub fn friend_remove(&self, a: &str, b: &str) -> Result<u64, StoreError> {
        const OP: &str = "friend remove";
        self.write(OP, |tx| {
            let mut friends = tx.open_table(FRIENDS).op(OP)?;
            if friends.remove((a, b)).op(OP)?.is_none() {
                return Err(StoreError::NotFriends);
            }
            friends.remove((b, a)).op(OP)?;
            keep_notice(tx, OP, b, a, FriendNotice::Removed)
        })
    }

    /// The notices kept for `user`, one per other user, by their name. A
    /// stored kind no version wrote is left out. Read only: a notice stays until
    /// [`Store::forget_friend_notices`] names it.
    pub fn friend_notices(&self, user: &str) -> Result<Vec<KeptNotice>, StoreError> {
        const OP: &str = "read friend notices";
        self.read(OP, |tx| {
            let table = tx.open_table(FRIEND_NOTICES).op(OP)?;
            let mut kept = Vec::new();
            for entry in table.range((user, "")..).op(OP)? {
                let (key, value) = entry.op(OP)?;
                let (to, other) = key.value();
                if to != user {
                    break;
                }
                let (number, kind) = value.value();
                if let Some(notice) = FriendNotice::from_u8(kind) {
                    kept.push(KeptNotice {
                        other: other.to_owned(),
                        number,
                        notice,
                    });
                }
            }
            Ok(kept)
        })
    }

    /// Forgets, for `user`, each (other, number) notice once it was pushed;
    /// a row holding another number (a newer notice) stays. Not made
    /// durable by its own commit: lost in a crash, a notice is only told
    /// again at the next login.
    pub fn forget_friend_notices(
        &self,
        user: &str,
        told: &[(String, u64)],
    ) -> Result<(), StoreError> {
        const OP: &str = "forget friend notices";
        self.write_relaxed_segments(OP, |tx, _| {
            let mut table = tx.open_table(FRIEND_NOTICES).op(OP)?;
            for (other, number) in told {
                let kept = table
                    .get((user, other.as_str()))
                    .op(OP)?
                    .map(|v| v.value().0);
                if kept == Some(*number) {
                    table.remove((user, other.as_str())).op(OP)?;
                }
            }
            Ok(())
        })
    }

    /// The user's friends, sorted.
    pub fn friends(&self, user: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list friends";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(FRIENDS).op(OP)?, OP, user)
        })
    }

    /// Users who asked `user` to be friends and are waiting, sorted.
    pub fn incoming_requests(&self, user: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list incoming friend requests";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(FRIEND_REQUESTS_IN).op(OP)?, OP, user)
        })
    }

    /// Users whom `user` asked to be friends, still waiting, sorted.
    pub fn outgoing_requests(&self, user: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list outgoing friend requests";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(FRIEND_REQUESTS_OUT).op(OP)?, OP, user)
        })
    }

    /// Creates a group. [`StoreError::GroupExists`] if the name is taken,
    /// [`StoreError::UnknownUser`] if the owner or a member has no account.
    pub fn create_group(&self, record: GroupRecord) -> Result<(), StoreError> {
        const OP: &str = "create group";
        self.write(OP, |tx| {
            let mut groups = tx.open_table(GROUPS).op(OP)?;
            if groups.get(record.name.as_str()).op(OP)?.is_some() {
                return Err(StoreError::GroupExists);
            }
            require_users(tx, OP, &[record.owner.as_str()])?;
            let members: Vec<&str> = record.members.iter().map(String::as_str).collect();
            require_users(tx, OP, &members)?;
            put_group(&mut groups, OP, &record)?;
            let mut member_of = tx.open_table(MEMBER_OF).op(OP)?;
            for member in &members {
                member_of
                    .insert((*member, record.name.as_str()), ())
                    .op(OP)?;
            }
            Ok(())
        })
    }

    /// The group, if it exists.
    pub fn group(&self, name: &str) -> Result<Option<GroupRecord>, StoreError> {
        const OP: &str = "read group";
        self.read(OP, |tx| group_in(&tx.open_table(GROUPS).op(OP)?, OP, name))
    }

    /// Replaces the group's roster if its stored version is
    /// `expected_version` and `record.version` is higher (compare-and-set;
    /// otherwise [`StoreError::VersionConflict`]). The name and owner stay.
    pub fn update_group(
        &self,
        name: &str,
        expected_version: u64,
        record: GroupRecord,
    ) -> Result<(), StoreError> {
        const OP: &str = "update group";
        self.write(OP, |tx| {
            let mut groups = tx.open_table(GROUPS).op(OP)?;
            let Some(old) = group_in(&groups, OP, name)? else {
                return Err(StoreError::UnknownGroup);
            };
            if old.version != expected_version || record.version <= old.version {
                return Err(StoreError::VersionConflict {
                    stored: old.version,
                });
            }
            let members: Vec<&str> = record.members.iter().map(String::as_str).collect();
            require_users(tx, OP, &members)?;
            let new = GroupRecord {
                name: old.name.clone(),
                owner: old.owner.clone(),
                ..record.clone()
            };
            put_group(&mut groups, OP, &new)?;
            let mut member_of = tx.open_table(MEMBER_OF).op(OP)?;
            for member in &old.members {
                member_of.remove((member.as_str(), name)).op(OP)?;
            }
            for member in &members {
                member_of.insert((*member, name), ()).op(OP)?;
            }
            Ok(())
        })
    }

    /// Deletes a group, its membership index and its join and leave
    /// requests.
    /// [`StoreError::UnknownGroup`] if there is none.
    pub fn delete_group(&self, name: &str) -> Result<(), StoreError> {
        const OP: &str = "delete group";
        self.write(OP, |tx| {
            let mut groups = tx.open_table(GROUPS).op(OP)?;
            let Some(old) = group_in(&groups, OP, name)? else {
                return Err(StoreError::UnknownGroup);
            };
            groups.remove(name).op(OP)?;
            let mut member_of = tx.open_table(MEMBER_OF).op(OP)?;
            for member in &old.members {
                member_of.remove((member.as_str(), name)).op(OP)?;
            }
            for table in [JOIN_REQUESTS, LEAVE_REQUESTS] {
                let mut requests = tx.open_table(table).op(OP)?;
                for user in second_of_pairs(&requests, OP, name)? {
                    requests.remove((name, user.as_str())).op(OP)?;
                }
            }
            Ok(())
        })
    }

    /// Names of the groups the user is a member of, sorted.
    pub fn groups_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list groups of user";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(MEMBER_OF).op(OP)?, OP, user)
        })
    }

    /// Records that `user` asks to join the group (harmless if repeated).
    pub fn add_join_request(&self, name: &str, user: &str) -> Result<(), StoreError> {
        const OP: &str = "add join request";
        self.write(OP, |tx| {
            if tx.open_table(GROUPS).op(OP)?.get(name).op(OP)?.is_none() {
                return Err(StoreError::UnknownGroup);
            }
            require_users(tx, OP, &[user])?;
            tx.open_table(JOIN_REQUESTS)
                .op(OP)?
                .insert((name, user), ())
                .op(OP)?;
            Ok(())
        })
    }

    /// Users waiting to join the group, sorted.
    pub fn join_requests(&self, name: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list join requests";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(JOIN_REQUESTS).op(OP)?, OP, name)
        })
    }

    /// Removes a join request; `true` if there was one.
    pub fn remove_join_request(&self, name: &str, user: &str) -> Result<bool, StoreError> {
        const OP: &str = "remove join request";
        self.write(OP, |tx| {
            let mut requests = tx.open_table(JOIN_REQUESTS).op(OP)?;
            let removed = requests.remove((name, user)).op(OP)?.is_some();
            Ok(removed)
        })
    }

    /// Records that member `user` asks to leave the group (harmless if
    /// repeated). [`StoreError::UnknownGroup`] if there is no such group,
    /// [`StoreError::UnknownUser`] if `user` is not a member.
    pub fn add_leave_request(&self, name: &str, user: &str) -> Result<(), StoreError> {
        const OP: &str = "add leave request";
        self.write(OP, |tx| {
            let groups = tx.open_table(GROUPS).op(OP)?;
            let Some(group) = group_in(&groups, OP, name)? else {
                return Err(StoreError::UnknownGroup);
            };
            if !group.members.iter().any(|m| m == user) {
                return Err(StoreError::UnknownUser);
            }
            tx.open_table(LEAVE_REQUESTS)
                .op(OP)?
                .insert((name, user), ())
                .op(OP)?;
            Ok(())
        })
    }

    /// Members waiting to be taken off the group's roster, sorted.
    pub fn leave_requests(&self, name: &str) -> Result<Vec<String>, StoreError> {
        const OP: &str = "list leave requests";
        self.read(OP, |tx| {
            second_of_pairs(&tx.open_table(LEAVE_REQUESTS).op(OP)?, OP, name)
        })
    }

    /// Removes a leave request; `true` if there was one.
    pub fn remove_leave_request(&self, name: &str, user: &str) -> Result<bool, StoreError> {
        const OP: &str = "remove leave request";
        self.write(OP, |tx| {
            let mut requests = tx.open_table(LEAVE_REQUESTS).op(OP)?;
            let removed = requests.remove((name, user)).op(OP)?.is_some();
            Ok(removed)
        })
    }

    /// Stores a signed announcement under the next id (from 1) and returns
    /// that id; the `id` field of `record` is ignored.
    pub fn add_announcement(&self, record: AnnouncementRecord) -> Result<u64, StoreError> {
        const OP: &str = "add announcement";
        self.write(OP, |tx| {
            let mut counters = tx.open_table(COUNTERS).op(OP)?;
            let id = counters
                .get(NEXT_ANNOUNCEMENT)
                .op(OP)?
                .map_or(1, |g| g.value());
            counters.insert(NEXT_ANNOUNCEMENT, id + 1).op(OP)?;
            tx.open_table(ANNOUNCEMENTS)
                .op(OP)?
                .insert(id, (record.issued_at, record.bytes.as_slice()))
                .op(OP)?;
            Ok(id)
        })
    }

    /// Announcements with an id above `id`, in id order, at most
    /// [`MAX_ANNOUNCEMENTS_PER_CALL`].
    pub fn announcements_after(&self, id: u64) -> Result<Vec<AnnouncementRecord>, StoreError> {
        const OP: &str = "read announcements";
        let Some(start) = id.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.read(OP, |tx| {
            let table = tx.open_table(ANNOUNCEMENTS).op(OP)?;
            let mut out = Vec::new();
            for entry in table
                .range(start..)
                .op(OP)?
                .take(MAX_ANNOUNCEMENTS_PER_CALL)
            {
                let (key, value) = entry.op(OP)?;
                let (issued_at, bytes) = value.value();
                out.push(AnnouncementRecord {
                    id: key.value(),
                    issued_at,
                    bytes: bytes.to_vec(),
                });
            }
            Ok(out)
        })
    }

    /// Records the id of the last announcement delivered to `user`.
    pub fn set_announcement_cursor(&self, user: &str, id: u64) -> Result<(), StoreError> {
        const OP: &str = "set announcement cursor";
        self.write(OP, |tx| {
            tx.open_table(ANNOUNCEMENT_CURSORS)
                .op(OP)?
                .insert(user, id)
                .op(OP)?;
            Ok(())
        })
    }

    /// The id of the last announcement delivered to `user` (0: none yet).
    pub fn announcement_cursor(&self, user: &str) -> Result<u64, StoreError> {
        const OP: &str = "read announcement cursor";
        self.read(OP, |tx| {
            let table = tx.open_table(ANNOUNCEMENT_CURSORS).op(OP)?;
            Ok(table.get(user).op(OP)?.map_or(0, |g| g.value()))
        })
    }
}

/// Fails with [`StoreError::UnknownUser`] unless every user has an account.
fn require_users(
    tx: &WriteTransaction,
    op: &'static str,
    users: &[&str],
) -> Result<(), StoreError> {
    let accounts = tx.open_table(ACCOUNTS).op(op)?;
    for user in users {
        if accounts.get(*user).op(op)?.is_none() {
            return Err(StoreError::UnknownUser);
        }
    }
    Ok(())
}

/// Removes the pending request `from` -> `to`, or fails with NoSuchRequest.
fn take_request(
    tx: &WriteTransaction,
    op: &'static str,
    from: &str,
    to: &str,
) -> Result<(), StoreError> {
    let mut out = tx.open_table(FRIEND_REQUESTS_OUT).op(op)?;
    if out.remove((from, to)).op(op)?.is_none() {
        return Err(StoreError::NoSuchRequest);
    }
    tx.open_table(FRIEND_REQUESTS_IN)
        .op(op)?
        .remove((to, from))
        .op(op)?;
    Ok(())
}

fn befriend(
    friends: &mut Table<(&str, &str), ()>,
    op: &'static str,
    a: &str,
    b: &str,
) -> Result<(), StoreError> {
    friends.insert((a, b), ()).op(op)?;
    friends.insert((b, a), ()).op(op)?;
    Ok(())
}

/// The second elements of every (first, second) key with this first element.
fn second_of_pairs<V: redb::Value + 'static>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    op: &'static str,
    first: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for entry in table.range((first, "")..).op(op)? {
        let (key, _) = entry.op(op)?;
        let (a, b) = key.value();
        if a != first {
            break;
        }
        out.push(b.to_owned());
    }
    Ok(out)
}

fn group_in(
    groups: &impl ReadableTable<&'static str, super::tables::GroupValue<'static>>,
    op: &'static str,
    name: &str,
) -> Result<Option<GroupRecord>, StoreError> {
    let Some(guard) = groups.get(name).op(op)? else {
        return Ok(None);
    };
    let (owner, version, members, signature, roster) = guard.value();
    Ok(Some(GroupRecord {
        name: name.to_owned(),
        owner: owner.to_owned(),
        version,
        members: members.into_iter().map(str::to_owned).collect(),
        roster_signature: signature.to_vec(),
        roster_bytes: roster.to_vec(),
    }))
}

fn put_group(
    groups: &mut Table<&str, super::tables::GroupValue<'static>>,
    op: &'static str,
    record: &GroupRecord,
) -> Result<(), StoreError> {
    let members: Vec<&str> = record.members.iter().map(String::as_str).collect();
    groups
        .insert(
            record.name.as_str(),
            (
                record.owner.as_str(),
                record.version,
                members,
                record.roster_signature.as_slice(),
                record.roster_bytes.as_slice(),
            ),
        )
        .op(op)?;
    Ok(())
}

/// Keeps `notice` from `other` for `user` under a new number, replacing
/// an earlier one; returns the number.
pub(super) fn keep_notice(
    tx: &WriteTransaction,
    op: &'static str,
    user: &str,
    other: &str,
    notice: FriendNotice,
) -> Result<u64, StoreError> {
    let number = {
        let mut counters = tx.open_table(COUNTERS).op(op)?;
        let number = counters.get(NEXT_NOTICE).op(op)?.map_or(1, |v| v.value());
        counters.insert(NEXT_NOTICE, number + 1).op(op)?;
        number
    };
    tx.open_table(FRIEND_NOTICES)
        .op(op)?
        .insert((user, other), (number, notice.to_u8()))
        .op(op)?;
    Ok(number)
}
