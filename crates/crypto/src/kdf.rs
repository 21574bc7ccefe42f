//! The two key-derivation functions every construction shares: HKDF-SHA256
//! (RFC 5869) and the HMAC-SHA256 symmetric-key ratchet step of the Double
//! Ratchet specification, section 5.2.

use std::sync::LazyLock;

use hkdf::{Hkdf, HkdfExtract};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::Secret32;

/// HKDF-SHA256 into `out`. `salt = None` means a string of hash-length zeros,
/// as RFC 5869 section 2.2 specifies.
pub(crate) fn hkdf_sha256(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(salt, ikm);
    // Every caller asks for at most 255 * 32 bytes, the only failure case.
    if hk.expand(info, out).is_err() {
        out.fill(0);
        debug_assert!(false, "hkdf output length out of range");
    }
}

/// Input byte of `KDF_CK` for the message key (Double Ratchet §5.2).
const CHAIN_MESSAGE_KEY_INPUT: u8 = 0x01;
/// Input byte of `KDF_CK` for the next chain key (Double Ratchet §5.2).
const CHAIN_NEXT_KEY_INPUT: u8 = 0x02;

/// `KDF_CK(ck)`: returns `(message key seed, next chain key)`.
pub(crate) fn chain_step(ck: &Secret32) -> (Secret32, Secret32) {
    #[cfg(test)]
    CHAIN_STEPS.with(|c| c.set(c.get() + 1));
    // Key the HMAC once and clone it for the two inputs.
    let Ok(keyed) = <Hmac<Sha256> as KeyInit>::new_from_slice(ck.expose()) else {
        // HMAC accepts keys of any length; this branch is unreachable.
        return (Secret32::from_bytes([0; 32]), Secret32::from_bytes([0; 32]));
    };
    let output = |input: u8| {
        let mut mac = keyed.clone();
        mac.update(&[input]);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        Secret32::from_bytes(*out)
    };
    (
        output(CHAIN_MESSAGE_KEY_INPUT),
        output(CHAIN_NEXT_KEY_INPUT),
    )
}

#[cfg(test)]
thread_local! {
    /// Counts `chain_step` calls on this thread, so tests can prove a refused
    /// message derived no keys.
    pub(crate) static CHAIN_STEPS: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

/// HKDF-Extract keyed with the zero salt (RFC 5869 §2.2 default).
static ZERO_SALT_EXTRACT: LazyLock<HkdfExtract<Sha256>> = LazyLock::new(|| HkdfExtract::new(None));

/// A ChaCha20-Poly1305 key and nonce derived from a single-use message key seed.
pub(crate) struct AeadKey {
    pub(crate) key: Zeroizing<[u8; 32]>,
    pub(crate) nonce: [u8; 12],
}

/// Expands a single-use seed into an AEAD key and nonce:
/// `HKDF-SHA256(salt = zeros, IKM = seed, info) -> key(32) ‖ nonce(12)`.
/// A fixed nonce is sound because every seed is used for one message only
/// (Double Ratchet §3.1, ENCRYPT).
pub(crate) fn aead_key(seed: &Secret32, info: &[u8]) -> AeadKey {
    let mut okm = Zeroizing::new([0u8; 44]);
    // HKDF-Extract with the all-zero salt starts from the same keyed HMAC
    // every time; key it once and clone it (saves two SHA-256 blocks per message).
    let mut extract = ZERO_SALT_EXTRACT.clone();
    extract.input_ikm(seed.expose());
    let (prk, hk) = extract.finalize();
    let mut prk: [u8; 32] = prk.into();
    zeroize::Zeroize::zeroize(&mut prk);
    if hk.expand(info, okm.as_mut()).is_err() {
        debug_assert!(false, "hkdf output length out of range");
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&okm[..32]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    AeadKey { key, nonce }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// T-02: the chain step reproduces libsignal's `HMAC(CK, 0x02)` vector.
    #[test]
    fn chain_kdf_known_answer() {
        let ck: [u8; 32] =
            hex::decode("8ab72d6f4cc5ac0d387eaf463378ddb28edd07385b1cb01250c715982e7ad48f")
                .unwrap()
                .try_into()
                .unwrap();
        let (_, next) = chain_step(&Secret32::from_bytes(ck));
        assert_eq!(
            hex::encode(next.expose()),
            "28e8f8fee54b801eef7c5cfb2f17f32c7b334485bbb70fac6ec10342a246d15d"
        );
    }

    /// The pre-keyed extract gives exactly what a fresh HKDF does.
    #[test]
    fn aead_key_matches_plain_hkdf() {
        let seed = Secret32::from_bytes([3; 32]);
        let fast = aead_key(&seed, b"info");
        let mut okm = [0u8; 44];
        hkdf_sha256(None, seed.expose(), b"info", &mut okm);
        assert_eq!(&fast.key[..], &okm[..32]);
        assert_eq!(&fast.nonce[..], &okm[32..]);
    }

    /// RFC 5869 test case 1.
    #[test]
    fn hkdf_rfc5869_case1() {
        let ikm = [0x0b; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(Some(&salt), &ikm, &info, &mut okm);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
