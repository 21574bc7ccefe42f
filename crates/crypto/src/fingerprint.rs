//! Fingerprints of one identity and safety numbers of a pair.
//!
//! * Fingerprint: `SHA256:` then unpadded standard base64 of
//!   `SHA-256(0xED ‖ Ed25519 public key)`, after OpenSSH's convention.
//! * Safety number: Signal's displayable fingerprint (libsignal
//!   `fingerprint.rs`), version `0x0000`, 5200 iterations of SHA-512, 30 digits
//!   per party, the two halves sorted and concatenated. Our key bytes are
//!   `0xED ‖ Ed25519 key` (never Signal's `0x05`, so our numbers cannot collide
//!   with Signal's) and the stable id is the lowercase username.

use core::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest, Sha256, Sha512};

use crate::identity::{IdentityKey, Username};

/// Type byte put before an Ed25519 identity key wherever it is hashed.
pub const ED25519_KEY_TYPE: u8 = 0xED;
/// Version of the safety-number computation, hashed first (Signal's `0x0000`).
pub const SAFETY_NUMBER_VERSION: u16 = 0;
/// SHA-512 iterations per half, as in Signal's apps.
pub const SAFETY_NUMBER_ITERATIONS: u32 = 5200;
/// Digits per party.
pub const SAFETY_NUMBER_HALF_DIGITS: usize = 30;

/// The `SHA256:` fingerprint of an identity key.
pub fn fingerprint(key: &IdentityKey) -> String {
    let digest = Sha256::new()
        .chain_update([ED25519_KEY_TYPE])
        .chain_update(key.to_bytes())
        .finalize();
    format!("SHA256:{}", STANDARD_NO_PAD.encode(digest))
}

/// The key bytes hashed into a safety number: `0xED ‖ key`.
pub fn safety_number_key_bytes(key: &IdentityKey) -> [u8; 33] {
    let mut out = [0u8; 33];
    out[0] = ED25519_KEY_TYPE;
    out[1..].copy_from_slice(&key.to_bytes());
    out
}

/// One party's 30 digits, generic in its inputs so it reproduces Signal's
/// published vector:
/// `h = SHA-512(version ‖ key ‖ id ‖ key)`, then `iterations - 1` times
/// `h = SHA-512(h ‖ key)`; then six 5-byte big-endian chunks, each mod 100000.
pub fn displayable_half(iterations: u32, stable_id: &[u8], key_bytes: &[u8]) -> String {
    let mut h = Sha512::new()
        .chain_update(SAFETY_NUMBER_VERSION.to_be_bytes())
        .chain_update(key_bytes)
        .chain_update(stable_id)
        .chain_update(key_bytes)
        .finalize();
    for _ in 1..iterations {
        h = Sha512::new()
            .chain_update(h)
            .chain_update(key_bytes)
            .finalize();
    }
    let mut out = String::with_capacity(SAFETY_NUMBER_HALF_DIGITS);
    for chunk in h[..30].chunks_exact(5) {
        let v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&format!("{:05}", v % 100_000));
    }
    out
}

/// Both halves sorted and concatenated: the same 60 digits on both sides.
pub fn combine_halves(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}{b}")
    } else {
        format!("{b}{a}")
    }
}

/// The safety number two users share.
#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
}

impl SafetyNumber {
    /// Computes the safety number of (`local`, `remote`); swapping the two gives the same number.
    pub fn compute(
        local_name: &Username,
        local_key: &IdentityKey,
        remote_name: &Username,
        remote_key: &IdentityKey,
    ) -> Self {
        let a = displayable_half(
            SAFETY_NUMBER_ITERATIONS,
            local_name.as_str().as_bytes(),
            &safety_number_key_bytes(local_key),
        );
        let b = displayable_half(
            SAFETY_NUMBER_ITERATIONS,
            remote_name.as_str().as_bytes(),
            &safety_number_key_bytes(remote_key),
        );
        Self {
            digits: combine_halves(&a, &b),
        }
    }

    /// The 60 digits, no spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// Twelve groups of five digits separated by spaces.
    pub fn grouped(&self) -> String {
        let groups: Vec<&str> = (0..12).map(|i| &self.digits[i * 5..i * 5 + 5]).collect();
        groups.join(" ")
    }

    /// Whether `typed` (spaces and dashes ignored) is this number.
    pub fn matches(&self, typed: &str) -> bool {
        let cleaned: String = typed
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect();
        cleaned == self.digits
    }
}

impl fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.grouped())
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetyNumber({})", self.grouped())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::identity::IdentityKeyPair;

    /// T-01: Signal's published vector (libsignal fingerprint.rs tests).
    #[test]
    fn signal_safety_number_vector() {
        let alice =
            hex::decode("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
                .unwrap();
        let bob = hex::decode("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
            .unwrap();
        let a = displayable_half(5200, b"+14152222222", &alice);
        let b = displayable_half(5200, b"+14153333333", &bob);
        assert_eq!(a, "300354477692869396892869876765");
        assert_eq!(b, "458257569162576843440918079131");
        assert_eq!(
            combine_halves(&b, &a),
            "300354477692869396892869876765458257569162576843440918079131"
        );
    }

    fn key(seed: u8) -> IdentityKey {
        *IdentityKeyPair::from_secret_bytes(&[seed; 32], &[seed; 32]).identity_key()
    }

    #[test]
    fn fingerprint_shape() {
        let fp = fingerprint(&key(1));
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(fp.len(), 7 + 43);
        assert!(!fp.contains('='));
        assert_ne!(fp, fingerprint(&key(2)));
    }

    #[test]
    fn symmetric_and_grouped() {
        let (a, b) = (
            Username::parse("alice").unwrap(),
            Username::parse("bob").unwrap(),
        );
        let ab = SafetyNumber::compute(&a, &key(1), &b, &key(2));
        let ba = SafetyNumber::compute(&b, &key(2), &a, &key(1));
        assert_eq!(ab, ba);
        assert_eq!(ab.digits().len(), 60);
        assert!(ab.digits().bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(ab.grouped().split(' ').count(), 12);
        assert!(ab.matches(&ab.grouped()));
        assert!(!ab.matches(&ab.digits()[1..]));
        // A different name for the same key changes the number.
        let c = Username::parse("carol").unwrap();
        assert_ne!(ab, SafetyNumber::compute(&c, &key(1), &b, &key(2)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// T-24 (sampled; the full 1,000 pairs run in `tests/safety_numbers.rs`): symmetric, and a
        /// one-bit change of either key's input changes the number.
        #[test]
        fn bit_flip_changes_number(sa in any::<[u8; 32]>(), sb in any::<[u8; 32]>(), bit in 0usize..256) {
            let ka = *IdentityKeyPair::from_secret_bytes(&sa, &sa).identity_key();
            let kb = *IdentityKeyPair::from_secret_bytes(&sb, &sb).identity_key();
            let a = safety_number_key_bytes(&ka);
            let b = safety_number_key_bytes(&kb);
            let n = combine_halves(&displayable_half(5200, b"a", &a), &displayable_half(5200, b"b", &b));
            let m = combine_halves(&displayable_half(5200, b"b", &b), &displayable_half(5200, b"a", &a));
            prop_assert_eq!(&n, &m);
            let mut a2 = a;
            a2[1 + bit / 8] ^= 1 << (bit % 8);
            let n2 = combine_halves(&displayable_half(5200, b"a", &a2), &displayable_half(5200, b"b", &b));
            prop_assert_ne!(n, n2);
        }
    }
}
