//! T-03: known-answer vectors for sender keys (`keys/vectors/sender_key.txt`).
//!
//! From a seeded RNG: the distribution message of a fresh chain and the first
//! two group messages for fixed plaintexts. Ed25519 signatures are
//! deterministic, so the whole messages are fixed.

#![allow(clippy::unwrap_used)]

mod common;

use messenger_crypto::identity::Username;
use messenger_crypto::sender_key::{
    GroupId, SenderKeyDistribution, SenderKeyReceiver, SenderKeyState,
};

use common::{check, hx, seeded_rng};

#[test]
fn sender_key_vectors() {
    let group = GroupId::new(b"kat-group").unwrap();
    let alice = Username::parse("alice").unwrap();
    let mut state = SenderKeyState::generate(group.clone(), &mut seeded_rng(1906));
    let dist = state.distribution_message().to_bytes();
    let pickle0 = state.to_pickle();
    let m0 = state.encrypt(&alice, b"first group message").unwrap();
    let m1 = state.encrypt(&alice, b"second group message").unwrap();

    // The vectors must also decrypt, so the file cannot hold garbage.
    let mut rx = SenderKeyReceiver::new(alice.clone(), group);
    rx.add_distribution(&SenderKeyDistribution::from_bytes(&dist).unwrap())
        .unwrap();
    assert_eq!(rx.decrypt(&m0).unwrap(), b"first group message");
    assert_eq!(rx.decrypt(&m1).unwrap(), b"second group message");

    check(
        "sender_key.txt",
        "Sender keys (security.md §1.6), crates/crypto/tests/kat_sender_key.rs.\n\
         SenderKeyState::generate(group id \"kat-group\", StdRng::seed_from_u64(1906)):\n\
         chain id = next_u32, chain key = 32 random bytes, then the Ed25519 signing key.\n\
         Sender username \"alice\". message_0 and message_1 encrypt the plaintexts below.",
        &[
            ("group_id", hx(b"kat-group")),
            ("sender", "\"alice\"".to_string()),
            ("distribution", hx(&*dist)),
            ("sender_pickle_0", hx(&*pickle0)),
            ("plaintext_0", "\"first group message\"".to_string()),
            ("message_0", hx(&m0)),
            ("plaintext_1", "\"second group message\"".to_string()),
            ("message_1", hx(&m1)),
        ],
    );
}
