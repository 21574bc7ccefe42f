//! Two engines (alice and bob, each in its own temporary home) exchanging
//! envelopes built by hand: no server, the test is the postman.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use messenger_client::engine::{
    DeliveryState, Direction, Engine, EngineError, KeyStatus, OutboxEntry, Received,
    RegistrationMaterial, SIGNED_PREKEY_GRACE_SECS, SIGNED_PREKEY_ROTATION_SECS,
};
use messenger_client::store::StoreError;
use messenger_client::{Home, KdfParams, Passphrase, Username};
use messenger_crypto::identity::PublicIdentity;
use messenger_crypto::prekey::{OneTimePrekey, SignedPrekey, VerifiedBundle};
use messenger_proto::msg::Envelope;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const NOW: u64 = 1_700_000_000;
const PASS: &str = "test passphrase";

/// One user: a home in a temporary directory and its engine.
struct Party {
    _dir: tempfile::TempDir,
    home: Home,
    name: Username,
    engine: Option<Engine>,
    material: Option<RegistrationMaterial>,
}

impl Party {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join(name));
        let cheap = KdfParams::new(8, 1, 1).unwrap();
        home.init(name, &mut Passphrase::new(PASS.into()), cheap, false)
            .unwrap();
        let mut party = Self {
            _dir: dir,
            home,
            name: Username::parse(name).unwrap(),
            engine: None,
            material: None,
        };
        party.reopen();
        party
    }

    fn e(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    /// Drops the engine (closing the store) and opens it again, as a restart does.
    fn reopen(&mut self) {
        self.engine = None;
        let unlocked = self.home.unlock(&mut Passphrase::new(PASS.into())).unwrap();
        self.engine = Some(Engine::open_home(&self.home, unlocked).unwrap());
    }

    fn register(&mut self, rng: &mut StdRng) {
        self.material = Some(self.e().registration_material(rng, NOW).unwrap());
    }

    /// A bundle as a server would hand it out, taking one one-time prekey
    /// from the published pool when `with_opk`.
    fn bundle(&mut self, with_opk: bool) -> VerifiedBundle {
        let m = self.material.as_mut().unwrap();
        let opk = if with_opk {
            Some(OneTimePrekey::from_bytes(&m.one_time_prekeys.pop().unwrap()).unwrap())
        } else {
            None
        };
        VerifiedBundle::verify(
            PublicIdentity::from_bytes(&m.identity).unwrap(),
            SignedPrekey::from_bytes(&m.signed_prekey).unwrap(),
            opk,
        )
        .unwrap()
    }

    fn store_path(&self) -> PathBuf {
        Engine::store_path(&self.home)
    }
}

fn envelope(from: &Party, entry: &OutboxEntry, seq: u64) -> Envelope {
    Envelope {
        seq,
        from: from.name.as_str().to_owned(),
        from_device: 1,
        group: None,
        id: entry.id,
        sent_at: NOW + seq,
        body: entry.body.clone(),
    }
}

fn text_of(received: Received) -> String {
    match received {
        Received::Message(m) => m.entry.text,
        Received::Duplicate => panic!("unexpected duplicate"),
    }
}

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn pair(rng: &mut StdRng) -> (Party, Party) {
    let alice = Party::new("alice");
    let mut bob = Party::new("bob");
    bob.register(rng);
    (alice, bob)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn first_contact_with_one_time_prekey() {
    let mut r = rng(1);
    let (alice, mut bob) = pair(&mut r);
    let before = bob.e().one_time_prekey_count().unwrap();
    assert_eq!(before, 100);
    assert!(alice.e().needs_bundle(&bob.name).unwrap());
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "hello bob", &mut r, NOW)
        .unwrap();
    assert!(!alice.e().needs_bundle(&bob.name).unwrap());
    let info = alice.e().session_info(&bob.name).unwrap().unwrap();
    assert!(info.used_one_time_prekey && info.awaiting_reply);

    let got = bob
        .e()
        .receive(&envelope(&alice, &sent, 1), &mut r, NOW)
        .unwrap();
    let Received::Message(m) = got else {
        panic!("duplicate")
    };
    assert_eq!(m.entry.text, "hello bob");
    assert_eq!(m.from, alice.name);
    assert_eq!(m.entry.direction, Direction::Incoming);
    let new = m.new_session.unwrap();
    assert_eq!(new.key_status, KeyStatus::New);
    assert!(new.used_one_time_prekey);
    // The one-time prekey was consumed in the same transaction.
    assert_eq!(bob.e().one_time_prekey_count().unwrap(), before - 1);
    assert!(
        bob.e()
            .session_info(&alice.name)
            .unwrap()
            .unwrap()
            .used_one_time_prekey
    );

    // Bob knows alice now, with the identity from the prekey message.
    let contact = bob.e().contact(&alice.name).unwrap().unwrap();
    assert_eq!(&contact.identity, alice.e().unlocked().identity().public());
    assert!(!contact.verified && !contact.key_changed);
}

/// T-78: an SPK-only bundle still makes a session, and both sides record
/// that no one-time prekey was used.
#[test]
fn first_contact_without_one_time_prekey() {
    let mut r = rng(2);
    let (alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(false);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "no opk", &mut r, NOW)
        .unwrap();
    assert!(
        !alice
            .e()
            .session_info(&bob.name)
            .unwrap()
            .unwrap()
            .used_one_time_prekey
    );
    let Received::Message(m) = bob
        .e()
        .receive(&envelope(&alice, &sent, 1), &mut r, NOW)
        .unwrap()
    else {
        panic!("duplicate")
    };
    assert_eq!(m.entry.text, "no opk");
    assert!(!m.new_session.unwrap().used_one_time_prekey);
    assert_eq!(bob.e().one_time_prekey_count().unwrap(), 100);
    assert!(
        !bob.e()
            .session_info(&alice.name)
            .unwrap()
            .unwrap()
            .used_one_time_prekey
    );

    // The reply closes the loop both ways.
    let reply = bob
        .e()
        .prepare_send(&alice.name, None, "got it", &mut r, NOW)
        .unwrap();
    assert_eq!(
        text_of(
            alice
                .e()
                .receive(&envelope(&bob, &reply, 2), &mut r, NOW)
                .unwrap()
        ),
        "got it"
    );
    assert!(
        !alice
            .e()
            .session_info(&bob.name)
            .unwrap()
            .unwrap()
            .awaiting_reply
    );
}

/// Both directions, out-of-order delivery, and duplicates shown once (T-73):
/// the same envelope twice, and the same body under a new id.
#[test]
fn both_directions_reorder_and_duplicates() {
    let mut r = rng(3);
    let (alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let msgs: Vec<OutboxEntry> = (0..4)
        .map(|i| {
            alice
                .e()
                .prepare_send(&bob.name, Some(&bundle), &format!("a{i}"), &mut r, NOW)
                .unwrap()
        })
        .collect();
    // Delivered 2, 0, 3, 1; every one a prekey message (no reply yet).
    for (seq, i) in [2usize, 0, 3, 1].into_iter().enumerate() {
        let env = envelope(&alice, &msgs[i], seq as u64 + 1);
        assert_eq!(
            text_of(bob.e().receive(&env, &mut r, NOW).unwrap()),
            format!("a{i}")
        );
        // The same envelope again: shown once.
        assert_eq!(
            bob.e().receive(&env, &mut r, NOW).unwrap(),
            Received::Duplicate
        );
        // The same ciphertext under a new id (a replaying server): still once.
        let mut replay = env.clone();
        replay.id = [0xEE; 16];
        replay.id[0] = i as u8;
        assert_eq!(
            bob.e().receive(&replay, &mut r, NOW).unwrap(),
            Received::Duplicate
        );
    }
    let texts: Vec<String> = bob
        .e()
        .history(&alice.name, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, ["a2", "a0", "a3", "a1"]);

    let replies: Vec<OutboxEntry> = (0..3)
        .map(|i| {
            bob.e()
                .prepare_send(&alice.name, None, &format!("b{i}"), &mut r, NOW)
                .unwrap()
        })
        .collect();
    for i in [1usize, 2, 0] {
        let env = envelope(&bob, &replies[i], 10 + i as u64);
        assert_eq!(
            text_of(alice.e().receive(&env, &mut r, NOW).unwrap()),
            format!("b{i}")
        );
        assert_eq!(
            alice.e().receive(&env, &mut r, NOW).unwrap(),
            Received::Duplicate
        );
    }
    // Alice's history: her 4 messages then bob's 3, each once.
    let hist = alice.e().history(&bob.name, 100).unwrap();
    assert_eq!(hist.len(), 7);
    assert_eq!(
        hist.iter()
            .filter(|e| e.direction == Direction::Outgoing)
            .count(),
        4
    );
    let seqs: Vec<u64> = hist.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
    // history(limit) returns the newest, oldest first.
    let last2: Vec<String> = alice
        .e()
        .history(&bob.name, 2)
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(last2, ["b2", "b0"]);
}

#[test]
fn restart_mid_conversation() {
    let mut r = rng(4);
    let (mut alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let first = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "before restart", &mut r, NOW)
        .unwrap();
    alice.reopen();
    bob.reopen();
    assert_eq!(
        text_of(
            bob.e()
                .receive(&envelope(&alice, &first, 1), &mut r, NOW)
                .unwrap()
        ),
        "before restart"
    );
    bob.reopen();
    let reply = bob
        .e()
        .prepare_send(&alice.name, None, "after", &mut r, NOW)
        .unwrap();
    alice.reopen();
    assert_eq!(
        text_of(
            alice
                .e()
                .receive(&envelope(&bob, &reply, 2), &mut r, NOW)
                .unwrap()
        ),
        "after"
    );
    // A duplicate is still recognised after a restart.
    bob.reopen();
    assert_eq!(
        bob.e()
            .receive(&envelope(&alice, &first, 1), &mut r, NOW)
            .unwrap(),
        Received::Duplicate
    );
    assert_eq!(bob.e().history(&alice.name, 10).unwrap().len(), 2);
}

/// T-70/T-71: safety numbers agree; a substituted key is detected, blocks a
/// verified contact until the new number is verified, and a wrong number is
/// refused.
#[test]
fn key_change_detection_blocking_and_verify() {
    let mut r = rng(5);
    let (alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "hi", &mut r, NOW)
        .unwrap();
    bob.e()
        .receive(&envelope(&alice, &sent, 1), &mut r, NOW)
        .unwrap();
    assert!(alice.e().mark_sent(&sent.id, 1, NOW).unwrap());

    let on_alice = alice.e().safety_number(&bob.name).unwrap();
    let on_bob = bob.e().safety_number(&alice.name).unwrap();
    assert_eq!(on_alice, on_bob);

    // A wrong number is refused and changes nothing.
    let mut wrong = on_bob.digits().to_owned();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(59..60, last);
    assert!(matches!(
        alice.e().verify(&bob.name, &wrong),
        Err(EngineError::WrongSafetyNumber { .. })
    ));
    assert!(!alice.e().contact(&bob.name).unwrap().unwrap().verified);
    alice.e().verify(&bob.name, &on_bob.grouped()).unwrap();
    assert!(alice.e().contact(&bob.name).unwrap().unwrap().verified);

    // The server substitutes mallory's keys under bob's name.
    let mut mallory = Party::new("bob");
    mallory.register(&mut r);
    let forged = mallory.bundle(true);
    let mallory_number = mallory.e().safety_number(&alice.name);
    assert!(mallory_number.is_err(), "mallory has never seen alice");
    let status = alice
        .e()
        .observe_identity(&bob.name, forged.identity(), NOW + 5)
        .unwrap();
    assert_eq!(status, KeyStatus::Changed { was_verified: true });
    assert!(alice.e().is_blocked(&bob.name).unwrap());
    let c = alice.e().contact(&bob.name).unwrap().unwrap();
    assert!(c.key_changed && !c.verified && c.blocked);
    assert_eq!(c.changed_at, Some(NOW + 5));
    assert_eq!(c.previous_identity.as_ref(), Some(bundle.identity()));
    // The old session is with the old key: a new bundle is needed.
    assert!(alice.e().needs_bundle(&bob.name).unwrap());
    // Sending is refused and nothing leaves: no outbox entry, no history row.
    let hist_before = alice.e().history(&bob.name, 100).unwrap().len();
    for b in [Some(&forged), None] {
        let err = alice
            .e()
            .prepare_send(&bob.name, b, "secret", &mut r, NOW)
            .unwrap_err();
        assert!(matches!(err, EngineError::Blocked { .. }), "{err:?}");
    }
    assert!(alice.e().outbox().unwrap().is_empty());
    assert_eq!(
        alice.e().history(&bob.name, 100).unwrap().len(),
        hist_before
    );
    assert!(matches!(
        alice.e().acknowledge_key_change(&bob.name),
        Err(EngineError::Blocked { .. })
    ));
    // The safety number changed; bob's (real) old number no longer verifies.
    let new_number = alice.e().safety_number(&bob.name).unwrap();
    assert_ne!(new_number, on_bob);
    assert!(matches!(
        alice.e().verify(&bob.name, on_bob.digits()),
        Err(EngineError::WrongSafetyNumber { .. })
    ));
    // Verifying the new number (the user decided to trust it) unblocks.
    alice.e().verify(&bob.name, new_number.digits()).unwrap();
    assert!(!alice.e().is_blocked(&bob.name).unwrap());
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&forged), "to the new key", &mut r, NOW)
        .unwrap();
    assert_eq!(
        text_of(
            mallory
                .e()
                .receive(&envelope(&alice, &sent, 9), &mut r, NOW)
                .unwrap()
        ),
        "to the new key"
    );
}

/// A key change of an unverified contact warns (key_changed) but does not
/// block, and is surfaced when the new key writes first.
#[test]
fn unverified_key_change_warns_without_blocking() {
    let mut r = rng(6);
    let (mut alice, mut bob) = pair(&mut r);
    alice.register(&mut r);
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "hi", &mut r, NOW)
        .unwrap();
    bob.e()
        .receive(&envelope(&alice, &sent, 1), &mut r, NOW)
        .unwrap();

    // "bob" reinstalls (new identity) and writes to alice first.
    let mut bob2 = Party::new("bob");
    bob2.register(&mut r);
    let alice_bundle = alice.bundle(true);
    let first = bob2
        .e()
        .prepare_send(&alice.name, Some(&alice_bundle), "new phone", &mut r, NOW)
        .unwrap();
    let Received::Message(m) = alice
        .e()
        .receive(&envelope(&bob2, &first, 2), &mut r, NOW)
        .unwrap()
    else {
        panic!("duplicate")
    };
    assert_eq!(m.entry.text, "new phone");
    assert_eq!(
        m.new_session.unwrap().key_status,
        KeyStatus::Changed {
            was_verified: false
        }
    );
    assert!(m.contact.key_changed && !m.contact.blocked);
    // Sending is allowed (the CLI warns) and goes to the new key's session.
    let reply = alice
        .e()
        .prepare_send(&bob.name, None, "welcome back", &mut r, NOW)
        .unwrap();
    assert_eq!(
        text_of(
            bob2.e()
                .receive(&envelope(&alice, &reply, 3), &mut r, NOW)
                .unwrap()
        ),
        "welcome back"
    );
    alice.e().acknowledge_key_change(&bob.name).unwrap();
    assert!(!alice.e().contact(&bob.name).unwrap().unwrap().key_changed);
}

/// T-72: a bundle with a forged signed-prekey signature never becomes a
/// `VerifiedBundle`, the only bundle type `prepare_send` takes; nothing is sent.
#[test]
fn forged_signed_prekey_is_refused() {
    let mut r = rng(7);
    let (alice, bob) = pair(&mut r);
    let m = bob.material.as_ref().unwrap();
    let mut spk = m.signed_prekey.clone();
    let last = spk.len() - 1;
    spk[last] ^= 1;
    let forged = SignedPrekey::from_bytes(&spk).unwrap();
    let identity = PublicIdentity::from_bytes(&m.identity).unwrap();
    assert!(VerifiedBundle::verify(identity, forged, None).is_err());
    // Without a verified bundle there is no way to start a session.
    let err = alice
        .e()
        .prepare_send(&bob.name, None, "x", &mut r, NOW)
        .unwrap_err();
    assert!(matches!(err, EngineError::NeedBundle { .. }), "{err:?}");
    assert!(alice.e().outbox().unwrap().is_empty());
}

/// T-61: the store file holds no message text, no contact name and no
/// contact key in clear.
#[test]
fn store_file_holds_no_plaintext_or_names() {
    let mut r = rng(8);
    let alice = Party::new("zanzibar_quixote");
    let mut bob = Party::new("wolfgang_amadeus");
    bob.register(&mut r);
    let marker_out = "MARKER-plaintext-outgoing-4f1d2c";
    let marker_in = "MARKER-plaintext-incoming-9a7e3b";
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), marker_out, &mut r, NOW)
        .unwrap();
    bob.e()
        .receive(&envelope(&alice, &sent, 1), &mut r, NOW)
        .unwrap();
    let reply = bob
        .e()
        .prepare_send(&alice.name, None, marker_in, &mut r, NOW)
        .unwrap();
    alice
        .e()
        .receive(&envelope(&bob, &reply, 2), &mut r, NOW)
        .unwrap();
    // Sanity: the markers did go through.
    assert_eq!(alice.e().history(&bob.name, 10).unwrap()[1].text, marker_in);

    for (party, other) in [(&alice, &bob), (&bob, &alice)] {
        let bytes = std::fs::read(party.store_path()).unwrap();
        assert!(bytes.len() > 1000);
        for needle in [
            marker_out.as_bytes(),
            marker_in.as_bytes(),
            b"MARKER".as_slice(),
            other.name.as_str().as_bytes(),
            party.name.as_str().as_bytes(),
            &other.e().unlocked().identity().identity_key().to_bytes(),
            &other.e().unlocked().identity().public().to_bytes(),
        ] {
            assert!(
                !contains(&bytes, needle),
                "{} found in {}",
                String::from_utf8_lossy(needle),
                party.name
            );
        }
    }
}

#[test]
fn wrong_storage_key_is_a_typed_error() {
    let mut r = rng(9);
    let (mut alice, bob) = pair(&mut r);
    alice.engine = None;
    bob.e();
    // Bob's unlocked identity (another storage key) on alice's store.
    let bob_unlocked = bob.home.unlock(&mut Passphrase::new(PASS.into())).unwrap();
    let err = Engine::open(&alice.store_path(), bob_unlocked).unwrap_err();
    assert!(
        matches!(err, EngineError::Store(StoreError::WrongKey)),
        "{err:?}"
    );
    assert!(!err.to_string().is_empty());
    // Two engines on one store: the second is refused cleanly.
    alice.reopen();
    let again = alice
        .home
        .unlock(&mut Passphrase::new(PASS.into()))
        .unwrap();
    let err = Engine::open(&alice.store_path(), again).unwrap_err();
    assert!(
        matches!(err, EngineError::Store(StoreError::Locked { .. })),
        "{err:?}"
    );
}

/// T-54: the commit happened but the process died before `mark_sent`: the
/// entry is resent from the outbox with the same id and ciphertext, and the
/// next message takes a new ratchet step (it would be refused as a
/// duplicate otherwise).
#[test]
fn outbox_entry_is_retried_unchanged() {
    let mut r = rng(10);
    let (mut alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let first = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "one", &mut r, NOW)
        .unwrap();
    // Crash: no mark_sent.
    alice.reopen();
    let outbox = alice.e().outbox().unwrap();
    assert_eq!(outbox, vec![first.clone()]);
    assert_eq!(outbox[0].to_envelope().body, first.body);
    let hist = alice.e().history(&bob.name, 10).unwrap();
    assert_eq!(hist[0].state, DeliveryState::Pending);

    // The retry is delivered twice (first attempt did reach the server).
    let env = envelope(&alice, &outbox[0], 1);
    assert_eq!(text_of(bob.e().receive(&env, &mut r, NOW).unwrap()), "one");
    assert_eq!(
        bob.e().receive(&env, &mut r, NOW).unwrap(),
        Received::Duplicate
    );
    assert!(alice.e().mark_sent(&first.id, 77, NOW + 1).unwrap());
    assert!(!alice.e().mark_sent(&first.id, 77, NOW + 1).unwrap());
    assert!(alice.e().outbox().unwrap().is_empty());
    let row = &alice.e().history(&bob.name, 10).unwrap()[0];
    assert_eq!(
        (row.state, row.server_seq, row.sent_at),
        (DeliveryState::Sent, Some(77), Some(NOW + 1))
    );

    let second = alice
        .e()
        .prepare_send(&bob.name, None, "two", &mut r, NOW)
        .unwrap();
    assert_ne!(second.id, first.id);
    assert_ne!(second.body, first.body);
    assert_eq!(
        text_of(
            bob.e()
                .receive(&envelope(&alice, &second, 2), &mut r, NOW)
                .unwrap()
        ),
        "two"
    );
    assert!(alice.e().mark_failed(&second.id, NOW).unwrap());
    assert_eq!(
        alice.e().history(&bob.name, 1).unwrap()[0].state,
        DeliveryState::Failed
    );
}

#[test]
fn signed_prekey_rotation_and_grace_period() {
    let mut r = rng(11);
    let (alice, mut bob) = pair(&mut r);
    let carol = Party::new("carol");
    let old_bundle = bob.bundle(false);
    let old_id = old_bundle.signed_prekey().id();
    // Not yet confirmed: the current key is offered again.
    let up = bob
        .e()
        .rotate_signed_prekey_if_due(&mut r, NOW)
        .unwrap()
        .unwrap();
    assert_eq!(up.id, old_id);
    bob.e().confirm_signed_prekey(up.id).unwrap();
    assert_eq!(
        bob.e()
            .rotate_signed_prekey_if_due(&mut r, NOW + 10)
            .unwrap(),
        None
    );

    let rotated_at = NOW + SIGNED_PREKEY_ROTATION_SECS;
    let new = bob
        .e()
        .rotate_signed_prekey_if_due(&mut r, rotated_at)
        .unwrap()
        .unwrap();
    assert!(new.id > old_id);
    assert_eq!(
        SignedPrekey::from_bytes(&new.signed_prekey).unwrap().id(),
        new.id
    );
    // Until confirmed, the new one keeps being offered; then nothing.
    let again = bob
        .e()
        .rotate_signed_prekey_if_due(&mut r, rotated_at + 1)
        .unwrap()
        .unwrap();
    assert_eq!(again, new);
    bob.e().confirm_signed_prekey(new.id).unwrap();
    assert_eq!(
        bob.e()
            .rotate_signed_prekey_if_due(&mut r, rotated_at + 2)
            .unwrap(),
        None
    );

    // A first message made from the old bundle still opens within the grace period.
    let late = alice
        .e()
        .prepare_send(&bob.name, Some(&old_bundle), "late", &mut r, NOW)
        .unwrap();
    assert_eq!(
        text_of(
            bob.e()
                .receive(&envelope(&alice, &late, 1), &mut r, rotated_at + 100)
                .unwrap()
        ),
        "late"
    );
    // After the grace period the old private key is gone.
    let too_late = carol
        .e()
        .prepare_send(&bob.name, Some(&old_bundle), "too late", &mut r, NOW)
        .unwrap();
    let after = rotated_at + SIGNED_PREKEY_GRACE_SECS;
    let newest = bob
        .e()
        .rotate_signed_prekey_if_due(&mut r, after)
        .unwrap()
        .unwrap();
    assert!(newest.id > new.id);
    let err = bob
        .e()
        .receive(&envelope(&carol, &too_late, 2), &mut r, after)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::UnknownPrekey { id, .. } if id == old_id),
        "{err:?}"
    );
    assert!(bob.e().history(&carol.name, 10).unwrap().is_empty());
}

/// T-27: prekey ids never repeat across registration, top-ups, rotations
/// and restarts.
#[test]
fn prekey_ids_never_repeat_across_restarts() {
    let mut r = rng(12);
    let mut bob = Party::new("bob");
    let mut ids = HashSet::new();
    let mut insert = |id: u32| assert!(ids.insert(id), "prekey id {id} repeated");
    bob.register(&mut r);
    let m = bob.material.clone().unwrap();
    insert(SignedPrekey::from_bytes(&m.signed_prekey).unwrap().id());
    for k in &m.one_time_prekeys {
        insert(OneTimePrekey::from_bytes(k).unwrap().id());
    }
    let mut now = NOW;
    for _restart in 0..3 {
        bob.reopen();
        for k in bob.e().one_time_prekeys(50, &mut r).unwrap() {
            insert(OneTimePrekey::from_bytes(&k).unwrap().id());
        }
        now += SIGNED_PREKEY_ROTATION_SECS;
        let up = bob
            .e()
            .rotate_signed_prekey_if_due(&mut r, now)
            .unwrap()
            .unwrap();
        insert(up.id);
    }
    assert_eq!(ids.len(), 1 + 100 + 3 * 51);
    assert!(matches!(
        bob.e().one_time_prekeys(201, &mut r),
        Err(EngineError::Prekeys(_))
    ));
}

/// Both start a session at the same moment; both first messages are read,
/// and later messages in both directions still open (the sessions converge).
#[test]
fn simultaneous_first_contact() {
    let mut r = rng(13);
    let (mut alice, mut bob) = pair(&mut r);
    alice.register(&mut r);
    let to_bob = bob.bundle(true);
    let to_alice = alice.bundle(true);
    let a1 = alice
        .e()
        .prepare_send(&bob.name, Some(&to_bob), "a1", &mut r, NOW)
        .unwrap();
    let b1 = bob
        .e()
        .prepare_send(&alice.name, Some(&to_alice), "b1", &mut r, NOW)
        .unwrap();
    assert_eq!(
        text_of(
            bob.e()
                .receive(&envelope(&alice, &a1, 1), &mut r, NOW)
                .unwrap()
        ),
        "a1"
    );
    assert_eq!(
        text_of(
            alice
                .e()
                .receive(&envelope(&bob, &b1, 2), &mut r, NOW)
                .unwrap()
        ),
        "b1"
    );
    let mut seq = 3;
    for round in 0..4 {
        let a = alice
            .e()
            .prepare_send(&bob.name, None, &format!("a{round}"), &mut r, NOW)
            .unwrap();
        let b = bob
            .e()
            .prepare_send(&alice.name, None, &format!("b{round}"), &mut r, NOW)
            .unwrap();
        assert_eq!(
            text_of(
                bob.e()
                    .receive(&envelope(&alice, &a, seq), &mut r, NOW)
                    .unwrap()
            ),
            format!("a{round}")
        );
        assert_eq!(
            text_of(
                alice
                    .e()
                    .receive(&envelope(&bob, &b, seq + 1), &mut r, NOW)
                    .unwrap()
            ),
            format!("b{round}")
        );
        seq += 2;
    }
}

/// A tampered or forged message is refused and changes nothing: the genuine
/// message still opens afterwards, and no history row was added.
#[test]
fn refused_message_changes_nothing() {
    let mut r = rng(14);
    let (alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "genuine", &mut r, NOW)
        .unwrap();
    let opks = bob.e().one_time_prekey_count().unwrap();
    let env = envelope(&alice, &sent, 1);
    let mut bad = env.clone();
    let last = bad.body.len() - 1;
    bad.body[last] ^= 1;
    let err = bob.e().receive(&bad, &mut r, NOW).unwrap_err();
    assert!(matches!(err, EngineError::Decrypt { .. }), "{err:?}");
    assert_eq!(bob.e().one_time_prekey_count().unwrap(), opks, "OPK kept");
    assert!(bob.e().contact(&alice.name).unwrap().is_none());
    assert!(bob.e().history(&alice.name, 10).unwrap().is_empty());
    // A normal message with no session, garbage, a group envelope, a bad sender.
    let mut garbage = env.clone();
    garbage.id = [1; 16];
    garbage.body = vec![1, 1, 0, 0];
    assert!(bob.e().receive(&garbage, &mut r, NOW).is_err());
    let mut group = env.clone();
    group.group = Some("g".into());
    assert!(matches!(
        bob.e().receive(&group, &mut r, NOW),
        Err(EngineError::Unsupported { .. })
    ));
    let mut nobody = env.clone();
    nobody.from = "Not A Name!".into();
    assert!(matches!(
        bob.e().receive(&nobody, &mut r, NOW),
        Err(EngineError::BadSender)
    ));
    assert!(matches!(
        bob.e().prepare_send(&bob.name, None, "me", &mut r, NOW),
        Err(EngineError::SelfContact)
    ));
    // The genuine one still opens.
    assert_eq!(
        text_of(bob.e().receive(&env, &mut r, NOW).unwrap()),
        "genuine"
    );
    assert_eq!(bob.e().one_time_prekey_count().unwrap(), opks - 1);
}

#[test]
fn debug_shows_no_secret() {
    let mut r = rng(15);
    let (alice, mut bob) = pair(&mut r);
    let bundle = bob.bundle(true);
    let sent = alice
        .e()
        .prepare_send(&bob.name, Some(&bundle), "debug me", &mut r, NOW)
        .unwrap();
    let key = alice.e().unlocked().storage_key().expose();
    let dbg = format!("{:?} {:?}", alice.e(), sent);
    let hex: String = key.iter().map(|x| format!("{x:02x}")).collect();
    assert!(!dbg.contains(&hex), "{dbg}");
    assert!(!dbg.contains("debug me"), "{dbg}");
    assert!(dbg.contains("Engine"), "{dbg}");
}

/// 200 messages each way, sent and delivered in a random interleaving with
/// random reordering of what is in flight, both sides restarting every few
/// steps, some envelopes delivered twice. Every message is read exactly once
/// with its text, and both histories and outboxes agree at the end.
#[test]
fn random_interleaving_with_restarts() {
    for seed in [100u64, 101] {
        run_random(seed);
    }
}

fn run_random(seed: u64) {
    const EACH: usize = 200;
    let mut r = rng(seed);
    let (mut alice, mut bob) = pair(&mut r);
    alice.register(&mut r);
    let bob_bundle = bob.bundle(true);
    // In flight: (to bob?, envelope).
    let mut flight: Vec<(bool, Envelope)> = Vec::new();
    let (mut sent_a, mut sent_b) = (0usize, 0usize);
    let mut got: HashMap<(bool, String), usize> = HashMap::new();
    let mut seq = 0u64;
    let mut steps = 0u64;
    let reopen_every = r.random_range(5..15);
    while sent_a < EACH || sent_b < EACH || !flight.is_empty() {
        steps += 1;
        let action = r.random_range(0..10);
        if action < 4 && (sent_a < EACH || sent_b < EACH) {
            // Send from a random side that still has messages to send; bob
            // only once alice's first message reached him (he has no bundle).
            let bob_can = sent_b < EACH && bob.e().contact(&alice.name).unwrap().is_some();
            let from_alice = sent_a < EACH && (!bob_can || r.random_bool(0.5));
            if !from_alice && !bob_can {
                continue;
            }
            let (sender, to, n) = if from_alice {
                (&alice, &bob, &mut sent_a)
            } else {
                (&bob, &alice, &mut sent_b)
            };
            let text = format!("{}-{}", sender.name, *n);
            let bundle =
                (from_alice && sender.e().needs_bundle(&to.name).unwrap()).then_some(&bob_bundle);
            let entry = sender
                .e()
                .prepare_send(&to.name, bundle, &text, &mut r, NOW)
                .unwrap();
            *n += 1;
            seq += 1;
            // Mark sent only sometimes first; the outbox is flushed at restarts.
            if r.random_bool(0.7) {
                sender.e().mark_sent(&entry.id, seq, NOW).unwrap();
            }
            flight.push((from_alice, envelope(sender, &entry, seq)));
        } else if !flight.is_empty() {
            let i = r.random_range(0..flight.len());
            let (to_bob, env) = if r.random_bool(0.1) {
                flight[i].clone() // delivered again later too
            } else {
                flight.swap_remove(i)
            };
            let receiver = if to_bob { &bob } else { &alice };
            match receiver.e().receive(&env, &mut r, NOW).unwrap() {
                Received::Message(m) => {
                    *got.entry((to_bob, m.entry.text)).or_default() += 1;
                }
                Received::Duplicate => {}
            }
        }
        if steps.is_multiple_of(reopen_every) {
            alice.reopen();
            bob.reopen();
            // After a restart, whatever is left in the outbox is resent (the
            // server drops the repeated id; our in-flight copy stands for it).
            for p in [&alice, &bob] {
                for entry in p.e().outbox().unwrap() {
                    p.e().mark_sent(&entry.id, 0, NOW).unwrap();
                }
            }
        }
    }
    assert_eq!(got.len(), 2 * EACH, "seed {seed}");
    assert!(
        got.values().all(|&n| n == 1),
        "seed {seed}: a message was shown twice"
    );
    for i in 0..EACH {
        assert!(got.contains_key(&(true, format!("alice-{i}"))));
        assert!(got.contains_key(&(false, format!("bob-{i}"))));
    }
    for (p, other) in [(&alice, &bob), (&bob, &alice)] {
        let hist = p.e().history(&other.name, 10 * EACH).unwrap();
        assert_eq!(hist.len(), 2 * EACH);
        assert_eq!(
            hist.iter()
                .filter(|e| e.direction == Direction::Incoming)
                .count(),
            EACH
        );
        for p2 in [&alice, &bob] {
            for entry in p2.e().outbox().unwrap() {
                p2.e().mark_sent(&entry.id, 0, NOW).unwrap();
            }
        }
        assert!(p.e().outbox().unwrap().is_empty());
        assert!(
            p.e()
                .history(&other.name, 10 * EACH)
                .unwrap()
                .iter()
                .filter(|e| e.direction == Direction::Outgoing)
                .all(|e| e.state == DeliveryState::Sent)
        );
    }
}
