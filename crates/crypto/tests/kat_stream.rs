//! Known-answer vectors for STREAM file encryption (`keys/vectors/stream.txt`).
//!
//! The file key and every header nonce come from a seeded RNG and are written
//! into the vector file too, so another implementation can check itself
//! against it without our RNG.

// `common` is shared by several test crates, so its `pub` items look unreachable here.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod common;

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use hkdf::Hkdf;
use messenger_crypto::stream::{CHUNK_LEN, FileKey, HEADER_LEN, decrypt_stream, encrypt_stream};
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};

use common::{check, hx, seeded_rng};

/// `len` bytes of the pattern 0, 1, ..., 250, 0, 1, ...
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Encrypts, checks that it decrypts back, and returns the ciphertext.
fn seal(key: &FileKey, rng: &mut StdRng, plaintext: &[u8]) -> Vec<u8> {
    let mut ciphertext = Vec::new();
    encrypt_stream(key, rng, &mut &plaintext[..], &mut ciphertext).unwrap();
    let mut back = Vec::new();
    decrypt_stream(key, &mut &ciphertext[..], &mut back).unwrap();
    assert_eq!(back, plaintext);
    ciphertext
}

#[test]
fn stream_vectors() {
    let mut rng = seeded_rng(2300);
    let key = FileKey::generate(&mut rng);
    let empty = seal(&key, &mut rng, &[]);
    let short = seal(&key, &mut rng, &pattern(100));
    let two_chunks = seal(&key, &mut rng, &pattern(CHUNK_LEN + 100));
    check(
        "stream.txt",
        "STREAM file encryption, format version 1 (crates/crypto/src/stream.rs).\n\
         ciphertext = header (version 0x01 ‖ 16-byte nonce) ‖ chunks; each plaintext\n\
         is the pattern i mod 251 of the given length; all three use file_key.\n\
         two_chunks is 65536 + 100 bytes; only its header and SHA-256 are kept.",
        &[
            ("file_key", hx(key.expose())),
            ("empty_ciphertext", hx(&empty)),
            ("short_plaintext_len", "\"100\"".to_string()),
            ("short_ciphertext", hx(&short)),
            ("two_chunks_plaintext_len", "\"65636\"".to_string()),
            ("two_chunks_header", hx(&two_chunks[..HEADER_LEN])),
            (
                "two_chunks_ciphertext_len",
                format!("\"{}\"", two_chunks.len()),
            ),
            (
                "two_chunks_ciphertext_sha256",
                hx(Sha256::digest(&two_chunks)),
            ),
        ],
    );
}

/// The format written out from its description, with the primitives used
/// directly: a one-chunk stream is `version ‖ nonce ‖ AEAD(payload key,
/// 0^11 ‖ 0x01, chunk)` with the payload key from HKDF over the nonce.
#[test]
fn format_matches_its_description() {
    let mut rng = seeded_rng(2301);
    let key = FileKey::generate(&mut rng);
    let plaintext = pattern(100);
    let ciphertext = seal(&key, &mut rng, &plaintext);
    assert_eq!(ciphertext[0], 1);
    let nonce = &ciphertext[1..HEADER_LEN];

    let mut payload_key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(nonce), key.expose())
        .expand(b"messenger/1 stream payload", &mut payload_key)
        .unwrap();
    let aead = ChaCha20Poly1305::new(&Key::from(payload_key));
    let mut chunk_nonce = [0u8; 12];
    chunk_nonce[11] = 1;
    let expected = aead
        .encrypt(&Nonce::from(chunk_nonce), plaintext.as_slice())
        .unwrap();
    assert_eq!(&ciphertext[HEADER_LEN..], expected.as_slice());
}
