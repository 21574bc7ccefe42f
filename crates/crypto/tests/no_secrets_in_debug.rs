//! T-26: formatting any secret-bearing type with `{:?}` shows none of its key
//! bytes, in hex (either case), base64 (padded or not, standard or URL-safe)
//! or as a decimal byte list.

#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use messenger_crypto::identity::{IdentityKeyPair, Username};
use messenger_crypto::keyfile::{self, KdfParams};
use messenger_crypto::prekey::{
    OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair, VerifiedBundle,
};
use messenger_crypto::ratchet::Session;
use messenger_crypto::secret::Secret32;
use messenger_crypto::sender_key::{GroupId, SenderKeyReceiver, SenderKeyState};
use messenger_crypto::stream::FileKey;
use messenger_crypto::{DhKeyPair, x3dh};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Fails if `debug` shows `secret` (or any 8-byte window of it) in any common encoding.
fn assert_hidden(what: &str, debug: &str, secret: &[u8]) {
    let mut needles = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        format!("{secret:?}"),
    ];
    for w in secret.windows(8) {
        needles.push(hex::encode(w));
        needles.push(format!("{:?}", w).trim_matches(['[', ']']).to_string());
    }
    for n in needles {
        assert!(
            !debug.contains(&n),
            "{what}: Debug output shows secret bytes ({n})"
        );
    }
}

#[test]
fn no_secret_type_prints_its_bytes() {
    let mut rng = StdRng::seed_from_u64(26);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );

    let ed_seed = [0x11u8; 32];
    let x_secret = [0x22u8; 32];
    let alice = IdentityKeyPair::from_secret_bytes(&ed_seed, &x_secret);
    let dbg = format!("{alice:?}");
    assert_hidden("IdentityKeyPair ed25519", &dbg, &ed_seed);
    assert_hidden("IdentityKeyPair x25519", &dbg, &x_secret);

    let dh_secret = [0x33u8; 32];
    assert_hidden(
        "DhKeyPair",
        &format!("{:?}", DhKeyPair::from_secret_bytes(dh_secret)),
        &dh_secret,
    );

    let s = [0x44u8; 32];
    assert_hidden("Secret32", &format!("{:?}", Secret32::from_bytes(s)), &s);
    assert_hidden("FileKey", &format!("{:?}", FileKey::from_bytes(s)), &s);

    let bob = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekeyPair::generate(&bob, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
    assert_hidden(
        "SignedPrekeyPair",
        &format!("{spk:?}"),
        &spk.to_secret_bytes()[4..36],
    );
    let opk = OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), 1, &mut rng)
        .unwrap()
        .remove(0);
    assert_hidden(
        "OneTimePrekeyPair",
        &format!("{opk:?}"),
        &opk.to_secret_bytes()[4..36],
    );

    let bundle =
        VerifiedBundle::verify(bob.public().clone(), *spk.public(), Some(opk.public())).unwrap();
    let (agreement, _) = x3dh::initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
    assert_hidden(
        "x3dh::Agreement",
        &format!("{agreement:?}"),
        agreement.shared_key.expose(),
    );

    // A session: its pickle holds every secret; no 32-byte run of it may show.
    let mut session = Session::initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
    session.encrypt(b"x").unwrap();
    let pickle = session.pickle();
    let dbg = format!("{session:?} {pickle:?}");
    for chunk in pickle.as_bytes().chunks(32).filter(|c| c.len() == 32) {
        assert_hidden("Session / SessionPickle", &dbg, chunk);
    }

    let mut sender = SenderKeyState::generate(GroupId::new(b"g").unwrap(), &mut rng);
    sender.encrypt(&an, b"x").unwrap();
    let dist = sender.distribution_message();
    let dist_bytes = dist.to_bytes();
    let mut receiver = SenderKeyReceiver::new(an.clone(), GroupId::new(b"g").unwrap());
    receiver.add_distribution(&dist).unwrap();
    let dbg = format!("{sender:?} {dist:?} {receiver:?}");
    // Chain key and signing seed sit at the end of the sender pickle.
    let sp = sender.to_pickle();
    assert_hidden(
        "SenderKeyState chain key",
        &dbg,
        &sp[sp.len() - 64..sp.len() - 32],
    );
    assert_hidden("SenderKeyState signing seed", &dbg, &sp[sp.len() - 32..]);
    assert_hidden(
        "SenderKeyDistribution chain key",
        &dbg,
        &dist_bytes[dist_bytes.len() - 64..dist_bytes.len() - 32],
    );

    let storage = Secret32::from_bytes([0x55; 32]);
    let params = KdfParams::new(64, 1, 1).unwrap();
    let file = keyfile::seal(&alice, &storage, b"pass phrase", params, &mut rng).unwrap();
    let opened = keyfile::open(&file, b"pass phrase").unwrap();
    let dbg = format!("{opened:?}");
    assert_hidden("OpenedKeyFile ed25519", &dbg, &ed_seed);
    assert_hidden("OpenedKeyFile x25519", &dbg, &x_secret);
    assert_hidden("OpenedKeyFile storage key", &dbg, &[0x55; 32]);
    assert_hidden("OpenedKeyFile passphrase", &dbg, b"pass phrase");
}
