//! Known-answer vectors for identities, fingerprints, safety numbers, X3DH and
//! the first Double Ratchet messages (T-03). Everything derives from fixed
//! seeds, so a change to any encoding, label or derivation fails here.

#![allow(clippy::unwrap_used)]

#[allow(unreachable_pub)]
mod common;

use common::{check, hx, seeded_rng};
use messenger_crypto::fingerprint::SafetyNumber;
use messenger_crypto::identity::{IdentityKeyPair, Username};
use messenger_crypto::prekey::{
    OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair, VerifiedBundle,
};
use messenger_crypto::ratchet::Session;
use messenger_crypto::x3dh;

const NOW: u64 = 1_700_000_000;

fn identity(seed: u8) -> IdentityKeyPair {
    IdentityKeyPair::from_secret_bytes(&[seed; 32], &[seed.wrapping_add(0x80); 32])
}

#[test]
fn identity_fingerprint_and_safety_number() {
    let alice = identity(0x01);
    let bob = identity(0x02);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let sn = SafetyNumber::compute(&an, alice.identity_key(), &bn, bob.identity_key());
    check(
        "identity.txt",
        "Identity encoding, fingerprint and safety number.\n\
         alice = from_secret_bytes([0x01; 32], [0x81; 32]); bob = ([0x02; 32], [0x82; 32]).\n\
         public identity = version(1) || ed25519(32) || x25519(32) || binding signature(64).",
        &[
            ("alice_public_identity", hx(alice.public().to_bytes())),
            (
                "alice_fingerprint",
                format!("\"{}\"", alice.public().fingerprint()),
            ),
            ("bob_public_identity", hx(bob.public().to_bytes())),
            (
                "bob_fingerprint",
                format!("\"{}\"", bob.public().fingerprint()),
            ),
            ("safety_number_alice_bob", format!("\"{}\"", sn.digits())),
        ],
    );
}

struct Bob {
    id: IdentityKeyPair,
    spk: SignedPrekeyPair,
    opk: OneTimePrekeyPair,
}

fn bob(rng: &mut rand::rngs::StdRng) -> Bob {
    let id = identity(0x02);
    let spk = SignedPrekeyPair::generate(&id, &mut PrekeyIdCounter::new(), rng).unwrap();
    let opk = OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), 1, rng)
        .unwrap()
        .remove(0);
    Bob { id, spk, opk }
}

#[test]
fn x3dh_shared_keys() {
    let mut rng = seeded_rng(0x3d);
    let alice = identity(0x01);
    let b = bob(&mut rng);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let mut values = vec![
        ("bob_signed_prekey", hx(b.spk.public().to_bytes())),
        ("bob_one_time_prekey", hx(b.opk.public().to_bytes())),
    ];
    for (label, opk) in [("without_opk", None), ("with_opk", Some(b.opk.public()))] {
        let bundle = VerifiedBundle::verify(b.id.public().clone(), *b.spk.public(), opk).unwrap();
        let (agreement, init) = x3dh::initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
        let bob_side = x3dh::respond(
            &b.id,
            &bn,
            &b.spk,
            opk.map(|_| &b.opk),
            alice.public(),
            &an,
            &init,
        )
        .unwrap();
        assert_eq!(agreement.shared_key, bob_side.shared_key);
        let (bundle_key, base_key, sk, ad) = match label {
            "without_opk" => (
                "bundle_without_opk",
                "base_key_without_opk",
                "sk_without_opk",
                "ad",
            ),
            _ => (
                "bundle_with_opk",
                "base_key_with_opk",
                "sk_with_opk",
                "ad_with_opk",
            ),
        };
        values.push((bundle_key, hx(bundle.to_bytes())));
        values.push((base_key, hx(init.base_key.as_bytes())));
        values.push((sk, hx(agreement.shared_key.expose())));
        values.push((ad, hx(agreement.associated_data.as_bytes())));
    }
    check(
        "x3dh.txt",
        "X3DH from seeded RNG 0x3d (rand StdRng::seed_from_u64): alice = identity 0x01, bob = 0x02.\n\
         info = \"messenger/1 X3DH X25519 SHA-256\"; SK = HKDF-SHA256(0^32, 0xFF^32 || DH1..DH3[4], info).",
        &values,
    );
}

#[test]
fn first_ratchet_messages() {
    let mut rng = seeded_rng(0xd4);
    let alice = identity(0x01);
    let b = bob(&mut rng);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let bundle =
        VerifiedBundle::verify(b.id.public().clone(), *b.spk.public(), Some(b.opk.public()))
            .unwrap();
    let mut a = Session::initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
    let m1 = a.encrypt(b"message one").unwrap();
    let m2 = a.encrypt(b"message two").unwrap();
    let (mut bs, pt) =
        Session::respond(&mut rng, &b.id, &bn, &b.spk, Some(&b.opk), &an, &m1, NOW).unwrap();
    assert_eq!(pt, b"message one");
    assert_eq!(bs.decrypt(&mut rng, &m2, NOW).unwrap(), b"message two");
    let r1 = bs.encrypt(b"reply one").unwrap();
    assert_eq!(a.decrypt(&mut rng, &r1, NOW).unwrap(), b"reply one");
    let m3 = a.encrypt(b"message three").unwrap();
    assert_eq!(bs.decrypt(&mut rng, &m3, NOW).unwrap(), b"message three");
    check(
        "ratchet.txt",
        "First Double Ratchet messages from seeded RNG 0xd4; alice = identity 0x01, bob = 0x02.\n\
         m1, m2 are prekey messages (type 0x03); r1 and m3 are ratchet messages (type 0x01).",
        &[
            ("m1", hx(&m1)),
            ("m2", hx(&m2)),
            ("r1", hx(&r1)),
            ("m3", hx(&m3)),
        ],
    );
}

/// T-01 kept as a vector file too: Signal's published displayable fingerprint
/// (libsignal `fingerprint.rs`), reproduced by our generic function.
#[test]
fn signal_published_safety_number() {
    use messenger_crypto::fingerprint::{combine_halves, displayable_half};
    let alice =
        hex::decode("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868").unwrap();
    let bob =
        hex::decode("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b").unwrap();
    let a = displayable_half(5200, b"+14152222222", &alice);
    let b = displayable_half(5200, b"+14153333333", &bob);
    check(
        "signal_safety_number.txt",
        "Signal's published safety-number vector (libsignal rust/protocol/src/fingerprint.rs tests),\n\
         a fact reproduced by messenger_crypto::fingerprint::displayable_half:\n\
         5200 iterations; alice key and id, bob key and id as below; output = sorted halves.",
        &[
            ("alice_key", hx(&alice)),
            ("alice_id", "\"+14152222222\"".into()),
            ("bob_key", hx(&bob)),
            ("bob_id", "\"+14153333333\"".into()),
            ("safety_number", format!("\"{}\"", combine_halves(&a, &b))),
        ],
    );
}
