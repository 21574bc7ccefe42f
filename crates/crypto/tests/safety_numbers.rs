//! T-24: over 1,000 random pairs the safety number is the same on both sides,
//! and flipping any single bit of either key's input changes it.

#![allow(clippy::unwrap_used)]

use messenger_crypto::fingerprint::{
    SAFETY_NUMBER_ITERATIONS, SafetyNumber, combine_halves, displayable_half,
    safety_number_key_bytes,
};
use messenger_crypto::identity::{IdentityKeyPair, Username};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[test]
fn thousand_pairs_symmetric_and_bit_sensitive() {
    let mut rng = StdRng::seed_from_u64(24);
    let (a, b) = (
        Username::parse("alice").unwrap(),
        Username::parse("bob").unwrap(),
    );
    let mut flips_detected = 0;
    for _ in 0..1000 {
        let ka = *IdentityKeyPair::generate(&mut rng).identity_key();
        let kb = *IdentityKeyPair::generate(&mut rng).identity_key();
        let ab = SafetyNumber::compute(&a, &ka, &b, &kb);
        let ba = SafetyNumber::compute(&b, &kb, &a, &ka);
        assert_eq!(ab, ba);

        // Flip one random bit of one side's key bytes (after the type byte).
        let (mut ka_bytes, kb_bytes) = (safety_number_key_bytes(&ka), safety_number_key_bytes(&kb));
        let bit = rng.random_range(8..33 * 8);
        ka_bytes[bit / 8] ^= 1 << (bit % 8);
        let half_b = displayable_half(SAFETY_NUMBER_ITERATIONS, b"bob", &kb_bytes);
        let flipped = combine_halves(
            &displayable_half(SAFETY_NUMBER_ITERATIONS, b"alice", &ka_bytes),
            &half_b,
        );
        if flipped != ab.digits() {
            flips_detected += 1;
        }
    }
    assert_eq!(flips_detected, 1000);
}
