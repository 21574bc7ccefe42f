//! Per-message and per-session costs of the 1:1 path (performance.md §5 e).
//!
//! `cargo bench -p messenger-crypto --bench crypto`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use messenger_crypto::fingerprint::SafetyNumber;
use messenger_crypto::identity::{IdentityKeyPair, Username};
use messenger_crypto::prekey::{
    OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair, VerifiedBundle,
};
use messenger_crypto::ratchet::Session;
use messenger_crypto::sender_key::{GroupId, SenderKeyReceiver, SenderKeyState};
use messenger_crypto::x3dh;
use rand::SeedableRng;
use rand::rngs::StdRng;

const NOW: u64 = 1_700_000_000;

struct Fixture {
    rng: StdRng,
    alice: Session,
    bob: Session,
}

fn established() -> Fixture {
    let mut rng = StdRng::seed_from_u64(1);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let a = IdentityKeyPair::generate(&mut rng);
    let b = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekeyPair::generate(&b, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
    let bundle = VerifiedBundle::verify(b.public().clone(), *spk.public(), None).unwrap();
    let mut alice = Session::initiate(&mut rng, &a, &an, &bundle, &bn).unwrap();
    let first = alice.encrypt(b"hi").unwrap();
    let (mut bob, _) = Session::respond(&mut rng, &b, &bn, &spk, None, &an, &first, NOW).unwrap();
    let reply = bob.encrypt(b"hi").unwrap();
    alice.decrypt(&mut rng, &reply, NOW).unwrap();
    Fixture { rng, alice, bob }
}

fn ratchet(c: &mut Criterion) {
    let msg = vec![0x5a; 1024];
    let mut g = c.benchmark_group("1KiB message");
    g.throughput(Throughput::Bytes(1024));

    // Bare AEAD, same size, for the ratio the issue asks for.
    let cipher = ChaCha20Poly1305::new(&Key::from([7u8; 32]));
    let nonce = Nonce::from([9u8; 12]);
    g.bench_function("bare ChaCha20-Poly1305 seal+open", |bench| {
        bench.iter(|| {
            let ct = cipher.encrypt(&nonce, black_box(&msg[..])).unwrap();
            black_box(cipher.decrypt(&nonce, &ct[..]).unwrap())
        })
    });

    // Same direction: symmetric-key ratchet step per message.
    let mut f = established();
    g.bench_function("ratchet encrypt+decrypt (chain step)", |bench| {
        bench.iter(|| {
            let wire = f.alice.encrypt(black_box(&msg)).unwrap();
            black_box(f.bob.decrypt(&mut f.rng, &wire, NOW).unwrap())
        })
    });

    // Alternating direction: a DH ratchet step on every message.
    let mut f = established();
    let mut flip = false;
    g.bench_function("ratchet encrypt+decrypt (DH step)", |bench| {
        bench.iter(|| {
            flip = !flip;
            let (from, to) = if flip {
                (&mut f.alice, &mut f.bob)
            } else {
                (&mut f.bob, &mut f.alice)
            };
            let wire = from.encrypt(black_box(&msg)).unwrap();
            black_box(to.decrypt(&mut f.rng, &wire, NOW).unwrap())
        })
    });

    // Group message: sender-key encrypt + verify + decrypt.
    let mut rng = StdRng::seed_from_u64(2);
    let sender = Username::parse("alice").unwrap();
    let group = GroupId::new(b"lobby").unwrap();
    let mut state = SenderKeyState::generate(group.clone(), &mut rng);
    let mut receiver = SenderKeyReceiver::new(sender.clone(), group);
    receiver
        .add_distribution(&state.distribution_message())
        .unwrap();
    g.bench_function("sender key encrypt+decrypt", |bench| {
        bench.iter(|| {
            let wire = state.encrypt(&sender, black_box(&msg)).unwrap();
            black_box(receiver.decrypt(&wire).unwrap())
        })
    });
    g.finish();
}

fn agreement(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let (an, bn) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let a = IdentityKeyPair::generate(&mut rng);
    let b = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekeyPair::generate(&b, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
    let opk = OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), 1, &mut rng)
        .unwrap()
        .remove(0);
    let bundle =
        VerifiedBundle::verify(b.public().clone(), *spk.public(), Some(opk.public())).unwrap();
    let bundle_bytes = bundle.to_bytes();

    let mut g = c.benchmark_group("X3DH");
    g.bench_function("both sides, with one-time prekey", |bench| {
        bench.iter(|| {
            let (ours, init) = x3dh::initiate(&mut rng, &a, &an, &bundle, &bn).unwrap();
            let theirs =
                x3dh::respond(&b, &bn, &spk, Some(&opk), a.public(), &an, black_box(&init))
                    .unwrap();
            black_box((ours, theirs))
        })
    });
    g.bench_function("initiator side (EK + 4 DH + KDF)", |bench| {
        bench.iter(|| black_box(x3dh::initiate(&mut rng, &a, &an, &bundle, &bn).unwrap()))
    });
    let (_, init) = x3dh::initiate(&mut rng, &a, &an, &bundle, &bn).unwrap();
    g.bench_function("responder side (base-key check + 4 DH + KDF)", |bench| {
        bench.iter(|| {
            black_box(
                x3dh::respond(&b, &bn, &spk, Some(&opk), a.public(), &an, black_box(&init))
                    .unwrap(),
            )
        })
    });
    g.bench_function("bundle parse + verify (two Ed25519 checks)", |bench| {
        bench.iter(|| black_box(VerifiedBundle::from_bytes(black_box(&bundle_bytes)).unwrap()))
    });
    g.finish();

    c.bench_function("safety number (2 x 5200 SHA-512)", |bench| {
        bench.iter(|| {
            black_box(SafetyNumber::compute(
                &an,
                a.identity_key(),
                &bn,
                b.identity_key(),
            ))
        })
    });
}

criterion_group!(benches, ratchet, agreement);
criterion_main!(benches);
