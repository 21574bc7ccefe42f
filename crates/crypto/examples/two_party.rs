//! Two people agree on keys with X3DH and talk over the Double Ratchet,
//! entirely in memory: what the server would see is printed as sizes and
//! hex prefixes, never as plaintext.
//!
//! Run: `cargo run --release -p messenger-crypto --example two_party`

use std::error::Error;

use messenger_crypto::fingerprint::SafetyNumber;
use messenger_crypto::identity::{IdentityKeyPair, PublicIdentity, Username};
use messenger_crypto::prekey::{
    OneTimePrekey, OneTimePrekeyPair, PrekeyIdCounter, SignedPrekey, SignedPrekeyPair,
    VerifiedBundle,
};
use messenger_crypto::ratchet::{PrekeyMessageInfo, Session};

fn show(label: &str, wire: &[u8]) {
    let prefix: String = wire.iter().take(12).map(|b| format!("{b:02x}")).collect();
    println!(
        "  {label:<34} {:>5} bytes on the wire  {prefix}…",
        wire.len()
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut rng = rand::rng();
    let now = 1_700_000_000;
    let (alice_name, bob_name) = (Username::parse("alice")?, Username::parse("bob")?);

    // Bob publishes his identity, a signed prekey and one-time prekeys.
    let bob = IdentityKeyPair::generate(&mut rng);
    let mut spk_ids = PrekeyIdCounter::new();
    let mut opk_ids = PrekeyIdCounter::new();
    let bob_spk = SignedPrekeyPair::generate(&bob, &mut spk_ids, &mut rng)?;
    let bob_opks = OneTimePrekeyPair::generate_batch(&mut opk_ids, 10, &mut rng)?;
    let published = (
        bob.public().to_bytes(),
        bob_spk.public().to_bytes(),
        bob_opks[0].public().to_bytes(),
    );
    println!("bob published {} one-time prekeys", bob_opks.len());

    // Alice fetches the bundle (as bytes, as from the server) and verifies it.
    let bundle = VerifiedBundle::verify(
        PublicIdentity::from_bytes(&published.0)?,
        SignedPrekey::from_bytes(&published.1)?,
        Some(OneTimePrekey::from_bytes(&published.2)?),
    )?;
    let alice = IdentityKeyPair::generate(&mut rng);
    let mut alice_session = Session::initiate(&mut rng, &alice, &alice_name, &bundle, &bob_name)?;
    println!(
        "alice verified bob's bundle ({})",
        bundle.identity().fingerprint()
    );

    println!("alice -> bob");
    let first = alice_session.encrypt(b"hi bob, this is alice")?;
    show("prekey message (X3DH + ratchet)", &first);

    // Bob reads who it claims to be from and which prekeys it used.
    let info = PrekeyMessageInfo::parse(&first)?;
    let opk_id = info.initiation.one_time_prekey_id;
    let opk = bob_opks.iter().find(|k| Some(k.id()) == opk_id);
    let (mut bob_session, text) = Session::respond(
        &mut rng,
        &bob,
        &bob_name,
        &bob_spk,
        opk,
        &alice_name,
        &first,
        now,
    )?;
    println!("  bob reads: {:?}", String::from_utf8_lossy(&text));

    let lines: [(&str, &[u8]); 4] = [
        ("bob", b"hello alice! keys agreed."),
        ("alice", b"every message gets a fresh key"),
        ("alice", b"and the chain moves on each time"),
        ("bob", b"and replays are refused"),
    ];
    for (from, text) in lines {
        let (sender, receiver, who) = if from == "alice" {
            (&mut alice_session, &mut bob_session, "alice -> bob")
        } else {
            (&mut bob_session, &mut alice_session, "bob -> alice")
        };
        let wire = sender.encrypt(text)?;
        println!("{who}");
        show("ratchet message", &wire);
        let read = receiver.decrypt(&mut rng, &wire, now)?;
        println!("  reads: {:?}", String::from_utf8_lossy(&read));
        if let Err(e) = receiver.decrypt(&mut rng, &wire, now) {
            println!("  replayed copy refused: {e}");
        }
    }

    let on_alice = SafetyNumber::compute(
        &alice_name,
        alice.identity_key(),
        &bob_name,
        bob.identity_key(),
    );
    let on_bob = SafetyNumber::compute(
        &bob_name,
        bob.identity_key(),
        &alice_name,
        alice.identity_key(),
    );
    println!("safety number on alice's side: {on_alice}");
    println!("safety number on bob's side:   {on_bob}");
    if on_alice != on_bob {
        return Err("safety numbers differ".into());
    }
    println!(
        "one-time prekey used: {}",
        alice_session.used_one_time_prekey()
    );
    Ok(())
}
