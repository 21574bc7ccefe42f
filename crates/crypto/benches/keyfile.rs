//! The "passphrase unlock" cost: [`keyfile::open`] at the default Argon2id
//! parameters and at one cheaper setting.
//!
//! Run with `cargo bench -p messenger-crypto --bench keyfile`.

// `criterion_group!` makes an undocumented `pub fn`; a bench may stop on a
// failed setup.
#![allow(missing_docs, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use messenger_crypto::identity::IdentityKeyPair;
use messenger_crypto::keyfile::{self, KdfParams};
use rand::SeedableRng;

const PASSPHRASE: &[u8] = b"correct horse battery staple";

fn sealed(params: KdfParams) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let identity = IdentityKeyPair::generate(&mut rng);
    let storage_key = keyfile::new_storage_key(&mut rng);
    keyfile::seal(&identity, &storage_key, PASSPHRASE, params, &mut rng)
        .expect("seal with valid parameters")
}

fn open(c: &mut Criterion) {
    // argon2's own defaults, OWASP's minimum for Argon2id: m = 19 MiB, t = 2, p = 1.
    let cheaper = KdfParams::new(19 * 1024, 2, 1).expect("valid parameters");
    let settings = [
        ("open/default m=64MiB t=3 p=4", KdfParams::DEFAULT),
        ("open/cheaper m=19MiB t=2 p=1", cheaper),
    ];
    for (name, params) in settings {
        let file = sealed(params);
        c.bench_function(name, |b| {
            b.iter(|| keyfile::open(std::hint::black_box(&file), PASSPHRASE).expect("open"))
        });
    }
}

criterion_group!(benches, open);
criterion_main!(benches);
