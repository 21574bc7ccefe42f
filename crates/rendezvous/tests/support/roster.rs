//! A roster signed by its owner, for the in-process service tests and the
//! tests over QUIC alike (each wraps it for its own kind of test person).

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use messenger_crypto::identity::{IdentityKeyPair, SigningContext};
use messenger_proto::msg::{SignedRoster, roster_signed_bytes};

/// A roster of `members` (sorted here) signed by `owner` with `id`.
pub fn signed_roster(
    owner: &str,
    id: &IdentityKeyPair,
    group: &str,
    version: u64,
    members: &[&str],
) -> SignedRoster {
    let mut members: Vec<String> = members.iter().map(|s| s.to_string()).collect();
    members.sort();
    let bytes = roster_signed_bytes(group, version, owner, &members).unwrap();
    SignedRoster {
        group: group.into(),
        version,
        owner: owner.into(),
        members,
        signature: id.sign(SigningContext::GroupRoster, &bytes).to_vec(),
    }
}
