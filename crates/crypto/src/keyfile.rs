//! The passphrase-encrypted identity key file.
//!
//! A key file holds one [`IdentityKeyPair`] and a 32-byte random
//! local-storage key (the key the client encrypts its local database under),
//! sealed under a passphrase: Argon2id (RFC 9106, version `0x13`) stretches
//! the passphrase with a random 16-byte salt into a 32-byte key, and
//! ChaCha20-Poly1305 (RFC 8439) encrypts the secrets with the whole header as
//! associated data. The header carries the owner's [`PublicIdentity`] in clear,
//! so a client can say whose file it is ([`peek_public`]) and how costly it is
//! to unlock ([`peek_params`]) without asking for the passphrase.
//!
//! The format is fixed-length and documented byte for byte in
//! `keys/README.md`; `keys/vectors/keyfile.txt` pins it.
//!
//! ## What opening checks, in order
//!
//! 1. magic, version and the exact length;
//! 2. the KDF id and the KDF parameters against [`MAX_MEMORY_KIB`],
//!    [`MAX_ITERATIONS`] and [`MAX_PARALLELISM`], and against Argon2's own
//!    minimums, all **before** Argon2 runs or allocates anything, so a planted
//!    file cannot make the client allocate gigabytes;
//! 3. the public identity's binding signature;
//! 4. the AEAD tag, which covers the whole header, so no header byte can be
//!    changed without the passphrase;
//! 5. that the public identity derived from the decrypted secrets equals the
//!    one in the header.
//!
//! Every failure is a typed [`KeyFileError`]; a damaged file never yields a
//! key. The passphrase-derived key, Argon2's working memory and the decrypted
//! payload are wiped before the call returns.
//!
//! ## Nonce
//!
//! The ChaCha20-Poly1305 key is derived from a fresh random salt on every
//! [`seal`], so each key encrypts exactly one payload and any nonce would be
//! safe. We still draw the 12-byte nonce at random rather than fix it: it
//! costs nothing, needs no state, and a repeated (key, nonce) pair would then
//! need both a salt collision and a nonce collision.
//!
//! ## Example
//!
//! ```
//! use messenger_crypto::identity::IdentityKeyPair;
//! use messenger_crypto::keyfile::{self, KdfParams};
//!
//! let mut rng = rand::rng();
//! let identity = IdentityKeyPair::generate(&mut rng);
//! let storage_key = keyfile::new_storage_key(&mut rng);
//! // Real files use `KdfParams::DEFAULT`; this example uses a cheap setting.
//! let params = KdfParams::new(64, 1, 1)?;
//! let file = keyfile::seal(&identity, &storage_key, b"hunter2", params, &mut rng)?;
//!
//! assert_eq!(&keyfile::peek_public(&file)?, identity.public());
//! let opened = keyfile::open(&file, b"hunter2")?;
//! assert_eq!(opened.identity().public(), identity.public());
//! assert_eq!(opened.storage_key(), &storage_key);
//! assert!(keyfile::open(&file, b"hunter3").is_err());
//! # Ok::<(), keyfile::KeyFileError>(())
//! ```

use core::fmt;

use argon2::{Algorithm, Argon2, Block, Version};
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{IdentityKeyPair, KeyError, PUBLIC_IDENTITY_LEN, PublicIdentity};
use crate::secret::Secret32;

/// First eight bytes of every identity key file: ASCII `MSGR-IDK`
/// ("messenger identity key"), so `file`, `head -c 8` and humans can tell it.
pub const MAGIC: [u8; 8] = *b"MSGR-IDK";
/// The format version this build reads and writes.
pub const VERSION: u8 = 1;
/// KDF id of Argon2id, version `0x13` (RFC 9106), the only KDF of version 1.
pub const KDF_ARGON2ID_V13: u8 = 1;
/// Salt length: RFC 9106 §3.1 recommends 128 bits, enough that salts never
/// repeat across all files ever made.
pub const SALT_LEN: usize = 16;
/// ChaCha20-Poly1305 nonce length (RFC 8439).
pub const NONCE_LEN: usize = 12;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Length of the key Argon2id derives: a ChaCha20-Poly1305 key.
const KEY_LEN: usize = 32;
/// Length of the encrypted payload: Ed25519 seed ‖ X25519 secret ‖ storage key.
pub const PAYLOAD_LEN: usize = 3 * 32;
/// Length of the header, the AEAD's associated data: magic, version, KDF id,
/// three `u32` parameters, salt, nonce, public identity.
pub const HEADER_LEN: usize =
    MAGIC.len() + 1 + 1 + 3 * 4 + SALT_LEN + NONCE_LEN + PUBLIC_IDENTITY_LEN;
/// Exact length of a version-1 key file. Any other length is refused.
pub const FILE_LEN: usize = HEADER_LEN + PAYLOAD_LEN + TAG_LEN;

/// Largest Argon2 memory cost accepted, in KiB (1 GiB). Sixteen times the
/// default and as much as libsodium's "sensitive" setting, so every sensible
/// choice fits; above it a planted or corrupted file could make the client
/// allocate until the OS kills it, so such files are refused before
/// anything is allocated.
pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
/// Largest Argon2 iteration count accepted. Sixteen passes covers every
/// published recommendation (RFC 9106 uses 1 or 3, libsodium at most 4) with
/// room to spare; with [`MAX_MEMORY_KIB`] it bounds the worst unlock a planted
/// file can force to sixteen passes over 1 GiB (tens of seconds, not hours).
pub const MAX_ITERATIONS: u32 = 16;
/// Largest Argon2 parallelism (lanes) accepted. RFC 9106 recommends 4; 16
/// leaves room for machines with many cores. Without argon2's `parallel`
/// feature (which we do not enable) lanes are computed one after another, so
/// lanes change the memory layout, not the wall-clock cost.
pub const MAX_PARALLELISM: u32 = 16;
/// Argon2's own minimum memory per lane, in KiB (two blocks per sync point).
pub const MIN_MEMORY_KIB_PER_LANE: u32 = 8;

/// Why a key file could not be made, read or unlocked. No variant carries a
/// secret; messages say what to do where there is something to do.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file does not start with [`MAGIC`].
    #[error("not a messenger identity key file (bad magic bytes)")]
    BadMagic,
    /// A format version this build cannot read.
    #[error("unsupported key file version {0}; a newer messenger may read it")]
    UnsupportedVersion(u8),
    /// A KDF id this build does not know.
    #[error("unsupported key derivation function id {0} in key file")]
    UnsupportedKdf(u8),
    /// The file is not exactly [`FILE_LEN`] bytes: truncated or extended.
    #[error("key file is {found} bytes, expected {expected}: truncated or damaged")]
    WrongLength {
        /// The length this version requires.
        expected: usize,
        /// The length found.
        found: usize,
    },
    /// A KDF parameter above its cap; refused before any work or allocation.
    #[error("key file asks for argon2 {param} {value}, above the cap of {max}")]
    KdfParamsTooCostly {
        /// Which parameter: `memory KiB`, `iterations` or `parallelism`.
        param: &'static str,
        /// The value asked for.
        value: u32,
        /// The cap.
        max: u32,
    },
    /// KDF parameters below Argon2's minimums.
    #[error("invalid argon2 parameters: {0}")]
    InvalidKdfParams(&'static str),
    /// The public identity in the header does not decode or verify.
    #[error("invalid public identity in key file header")]
    PublicIdentity(#[source] KeyError),
    /// The AEAD tag did not verify: the passphrase is wrong or the file was
    /// changed. The two cannot be told apart, by design.
    #[error("wrong passphrase, or the key file is corrupt")]
    WrongPassphraseOrCorrupt,
    /// The secrets decrypted, but their public identity is not the one in
    /// the header.
    #[error("decrypted identity does not match the public identity in the key file header")]
    KeyMismatch,
    /// Argon2's working memory could not be allocated.
    #[error("could not allocate {memory_kib} KiB for argon2")]
    OutOfMemory {
        /// The memory asked for.
        memory_kib: u32,
    },
    /// A passphrase longer than Argon2 accepts (4 GiB).
    #[error("passphrase too long")]
    PassphraseTooLong,
    /// A field did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Argon2id cost parameters. A value of this type is within Argon2's minimums
/// and this module's caps; build one with [`KdfParams::new`] or use
/// [`KdfParams::DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KdfParams {
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
}

impl KdfParams {
    /// RFC 9106 §4's second recommended option, for memory-constrained
    /// environments: m = 64 MiB, t = 3, p = 4. The first option wants 2 GiB,
    /// too much for a chat client on a small laptop or phone.
    pub const DEFAULT: Self = Self {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 4,
    };

    /// Checks the caps first, then Argon2's minimums (`t ≥ 1`, `p ≥ 1`,
    /// `m ≥ 8·p` KiB). Anything in range is accepted, even settings far
    /// cheaper than [`KdfParams::DEFAULT`] (tests and benches use them);
    /// choosing a cost is the caller's policy.
    pub fn new(memory_kib: u32, iterations: u32, parallelism: u32) -> Result<Self, KeyFileError> {
        let too_costly = |param, value, max| KeyFileError::KdfParamsTooCostly { param, value, max };
        if memory_kib > MAX_MEMORY_KIB {
            return Err(too_costly("memory KiB", memory_kib, MAX_MEMORY_KIB));
        }
        if iterations > MAX_ITERATIONS {
            return Err(too_costly("iterations", iterations, MAX_ITERATIONS));
        }
        if parallelism > MAX_PARALLELISM {
            return Err(too_costly("parallelism", parallelism, MAX_PARALLELISM));
        }
        if iterations < 1 {
            return Err(KeyFileError::InvalidKdfParams(
                "iterations must be at least 1",
            ));
        }
        if parallelism < 1 {
            return Err(KeyFileError::InvalidKdfParams(
                "parallelism must be at least 1",
            ));
        }
        if memory_kib < MIN_MEMORY_KIB_PER_LANE * parallelism {
            return Err(KeyFileError::InvalidKdfParams(
                "memory must be at least 8 KiB per lane",
            ));
        }
        let params = Self {
            memory_kib,
            iterations,
            parallelism,
        };
        // Argon2 is the authority on its own minimums; this agrees with the
        // checks above, and is repeated here so a disagreement is an error
        // now rather than later.
        params.to_argon2()?;
        Ok(params)
    }

    /// Memory cost in KiB.
    pub fn memory_kib(&self) -> u32 {
        self.memory_kib
    }

    /// Number of passes over memory.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Number of lanes.
    pub fn parallelism(&self) -> u32 {
        self.parallelism
    }

    fn to_argon2(self) -> Result<argon2::Params, KeyFileError> {
        argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(KEY_LEN),
        )
        .map_err(|_| KeyFileError::InvalidKdfParams("refused by argon2"))
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The contents of an unlocked key file. Both secrets are wiped on drop; it
/// prints only the identity's public fingerprint.
#[derive(Debug)]
pub struct OpenedKeyFile {
    identity: IdentityKeyPair,
    storage_key: Secret32,
}

impl OpenedKeyFile {
    /// The identity.
    pub fn identity(&self) -> &IdentityKeyPair {
        &self.identity
    }

    /// The local-storage key.
    pub fn storage_key(&self) -> &Secret32 {
        &self.storage_key
    }

    /// Both parts, by value.
    pub fn into_parts(self) -> (IdentityKeyPair, Secret32) {
        (self.identity, self.storage_key)
    }
}

/// Draws a fresh 32-byte local-storage key to seal beside a new identity.
pub fn new_storage_key<R: CryptoRng + ?Sized>(rng: &mut R) -> Secret32 {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    Secret32::from_bytes(*bytes)
}

/// Seals an identity and a storage key under a passphrase, with a fresh salt
/// and nonce from `rng`. Returns the [`FILE_LEN`] bytes to write to disk.
/// Changing the passphrase or the cost is [`open`] then `seal` again.
///
/// Fails only if Argon2's memory cannot be allocated or the passphrase is
/// longer than Argon2 accepts.
pub fn seal<R: CryptoRng + ?Sized>(
    identity: &IdentityKeyPair,
    storage_key: &Secret32,
    passphrase: &[u8],
    params: KdfParams,
    rng: &mut R,
) -> Result<Vec<u8>, KeyFileError> {
    let secrets = identity.secret_bytes();
    let mut payload = Zeroizing::new([[0u8; 32]; 3]);
    payload[0].copy_from_slice(&secrets[..32]);
    payload[1].copy_from_slice(&secrets[32..]);
    payload[2] = *storage_key.expose();
    seal_payload(
        &identity.public().to_bytes(),
        payload,
        passphrase,
        params,
        rng,
    )
}

/// Decrypts a key file. See the module docs for the checks, in order.
pub fn open(bytes: &[u8], passphrase: &[u8]) -> Result<OpenedKeyFile, KeyFileError> {
    let file = ParsedFile::parse(bytes)?;
    let key = derive_key(passphrase, &file.salt, file.params)?;
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let mut payload = Zeroizing::new([[0u8; 32]; 3]);
    payload.as_flattened_mut().copy_from_slice(file.ciphertext);
    cipher
        .decrypt_inout_detached(
            &Nonce::from(file.nonce),
            file.header,
            payload.as_flattened_mut().into(),
            &Tag::from(file.tag),
        )
        .map_err(|_| KeyFileError::WrongPassphraseOrCorrupt)?;
    let identity = IdentityKeyPair::from_secret_bytes(&payload[0], &payload[1]);
    if identity.public() != &file.public {
        return Err(KeyFileError::KeyMismatch);
    }
    Ok(OpenedKeyFile {
        identity,
        storage_key: Secret32::from_bytes(payload[2]),
    })
}

/// The owner's public identity, read from the header without the passphrase.
/// The whole header is checked as [`open`] checks it, but it is not
/// authenticated until [`open`] succeeds: show it, do not trust it.
pub fn peek_public(bytes: &[u8]) -> Result<PublicIdentity, KeyFileError> {
    Ok(ParsedFile::parse(bytes)?.public)
}

/// The KDF parameters, read from the header without the passphrase (for
/// example to warn that unlocking will be slow, or to offer a re-seal at
/// [`KdfParams::DEFAULT`]). Unauthenticated, like [`peek_public`].
pub fn peek_params(bytes: &[u8]) -> Result<KdfParams, KeyFileError> {
    Ok(ParsedFile::parse(bytes)?.params)
}

/// The passphrase-derived key; wiped on drop.
type PassphraseKey = Zeroizing<[u8; KEY_LEN]>;

/// A key file split into its fields; every header field is validated.
struct ParsedFile<'a> {
    /// The whole header, the AEAD's associated data.
    header: &'a [u8],
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    public: PublicIdentity,
    ciphertext: &'a [u8],
    tag: [u8; TAG_LEN],
}

impl<'a> ParsedFile<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, KeyFileError> {
        let magic_seen = bytes.len().min(MAGIC.len());
        if bytes[..magic_seen] != MAGIC[..magic_seen] {
            return Err(KeyFileError::BadMagic);
        }
        let wrong_length = KeyFileError::WrongLength {
            expected: FILE_LEN,
            found: bytes.len(),
        };
        match bytes.get(MAGIC.len()) {
            None => return Err(wrong_length),
            Some(&VERSION) => {}
            Some(&other) => return Err(KeyFileError::UnsupportedVersion(other)),
        }
        if bytes.len() != FILE_LEN {
            return Err(wrong_length);
        }

        let (header, body) = bytes.split_at(HEADER_LEN);
        let mut r = Reader::new(header, "key file header");
        r.take(MAGIC.len() + 1)?;
        let kdf = r.u8()?;
        if kdf != KDF_ARGON2ID_V13 {
            return Err(KeyFileError::UnsupportedKdf(kdf));
        }
        let (memory_kib, iterations, parallelism) = (r.u32()?, r.u32()?, r.u32()?);
        let params = KdfParams::new(memory_kib, iterations, parallelism)?;
        let salt = r.array()?;
        let nonce = r.array()?;
        let public = PublicIdentity::from_bytes(r.take(PUBLIC_IDENTITY_LEN)?)
            .map_err(KeyFileError::PublicIdentity)?;
        r.finish()?;

        let mut r = Reader::new(body, "key file body");
        let ciphertext = r.take(PAYLOAD_LEN)?;
        let tag = r.array()?;
        r.finish()?;
        Ok(Self {
            header,
            params,
            salt,
            nonce,
            public,
            ciphertext,
            tag,
        })
    }
}

impl fmt::Debug for ParsedFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedFile")
            .field("params", &self.params)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Writes the header for `public` (an encoded [`PublicIdentity`]), then
/// encrypts the payload under it. Separate from [`seal`] so tests can build a
/// file whose header names a different identity.
fn seal_payload<R: CryptoRng + ?Sized>(
    public: &[u8],
    mut payload: Zeroizing<[[u8; 32]; 3]>,
    passphrase: &[u8],
    params: KdfParams,
    rng: &mut R,
) -> Result<Vec<u8>, KeyFileError> {
    let mut salt = [0u8; SALT_LEN];
    rng.fill_bytes(&mut salt);
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);

    let mut w = Writer::with_capacity(FILE_LEN);
    w.bytes(&MAGIC)
        .u8(VERSION)
        .u8(KDF_ARGON2ID_V13)
        .u32(params.memory_kib)
        .u32(params.iterations)
        .u32(params.parallelism)
        .bytes(&salt)
        .bytes(&nonce)
        .bytes(public);
    let mut out = w.finish();
    debug_assert_eq!(out.len(), HEADER_LEN);

    let key = derive_key(passphrase, &salt, params)?;
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &out, payload.as_flattened_mut().into())
        // Only a message longer than 256 GiB fails; ours is 96 bytes.
        .map_err(|_| KeyFileError::WrongPassphraseOrCorrupt)?;
    out.extend_from_slice(payload.as_flattened());
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Argon2id v0x13 over the passphrase and salt. The working memory is
/// allocated fallibly and wiped afterwards (argon2's own allocation is not),
/// since its last blocks determine the key.
fn derive_key(
    passphrase: &[u8],
    salt: &[u8; SALT_LEN],
    params: KdfParams,
) -> Result<PassphraseKey, KeyFileError> {
    let argon_params = params.to_argon2()?;
    let blocks = argon_params.block_count();
    let out_of_memory = KeyFileError::OutOfMemory {
        memory_kib: params.memory_kib,
    };
    let mut memory: Zeroizing<Vec<Block>> = Zeroizing::new(Vec::new());
    memory
        .try_reserve_exact(blocks)
        .map_err(|_| out_of_memory.clone())?;
    memory.resize(blocks, Block::new());

    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into_with_memory(passphrase, salt, key.as_mut(), &mut *memory)
        .map_err(|e| match e {
            argon2::Error::PwdTooLong => KeyFileError::PassphraseTooLong,
            argon2::Error::OutOfMemory | argon2::Error::MemoryTooLittle => out_of_memory,
            _ => KeyFileError::InvalidKdfParams("refused by argon2"),
        })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use base64::Engine;
    use proptest::prelude::*;
    use rand::SeedableRng;

    use super::*;

    /// The cheapest setting Argon2 allows with two lanes, so the suite is fast
    /// while still exercising more than one lane.
    fn cheap() -> KdfParams {
        KdfParams::new(16, 1, 2).unwrap()
    }

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    fn fixture() -> (IdentityKeyPair, Secret32, Vec<u8>) {
        let mut rng = rng(25);
        let id = IdentityKeyPair::generate(&mut rng);
        let storage = new_storage_key(&mut rng);
        let file = seal(&id, &storage, b"correct horse", cheap(), &mut rng).unwrap();
        (id, storage, file)
    }

    /// Byte offset of the memory parameter in the header.
    const MEMORY_AT: usize = MAGIC.len() + 2;

    fn with_params(file: &[u8], m: u32, t: u32, p: u32) -> Vec<u8> {
        let mut f = file.to_vec();
        f[MEMORY_AT..MEMORY_AT + 4].copy_from_slice(&m.to_be_bytes());
        f[MEMORY_AT + 4..MEMORY_AT + 8].copy_from_slice(&t.to_be_bytes());
        f[MEMORY_AT + 8..MEMORY_AT + 12].copy_from_slice(&p.to_be_bytes());
        f
    }

    #[test]
    fn layout_lengths() {
        assert_eq!(HEADER_LEN, 179);
        assert_eq!(FILE_LEN, 291);
        let (_, _, file) = fixture();
        assert_eq!(file.len(), FILE_LEN);
        assert_eq!(&file[..8], b"MSGR-IDK");
        assert_eq!(file[8], VERSION);
        assert_eq!(file[9], KDF_ARGON2ID_V13);
        assert_eq!(&file[10..14], &16u32.to_be_bytes());
        assert_eq!(&file[14..18], &1u32.to_be_bytes());
        assert_eq!(&file[18..22], &2u32.to_be_bytes());
    }

    #[test]
    fn round_trip() {
        let (id, storage, file) = fixture();
        let opened = open(&file, b"correct horse").unwrap();
        assert_eq!(opened.identity().public(), id.public());
        assert_eq!(*opened.identity().secret_bytes(), *id.secret_bytes());
        assert_eq!(opened.storage_key(), &storage);
        let (id2, storage2) = opened.into_parts();
        assert_eq!(id2.public(), id.public());
        assert_eq!(storage2, storage);
        assert_eq!(&peek_public(&file).unwrap(), id.public());
        assert_eq!(peek_params(&file).unwrap(), cheap());
    }

    #[test]
    fn fresh_salt_and_nonce_every_seal() {
        let (id, storage, file) = fixture();
        let again = seal(&id, &storage, b"correct horse", cheap(), &mut rng(26)).unwrap();
        assert_ne!(file[22..38], again[22..38], "salt reused");
        assert_ne!(file[38..50], again[38..50], "nonce reused");
        assert_ne!(file[HEADER_LEN..], again[HEADER_LEN..]);
        assert_eq!(file[50..HEADER_LEN], again[50..HEADER_LEN]);
    }

    /// T-25 (1/4): a wrong passphrase is a typed error.
    #[test]
    fn wrong_passphrase() {
        let (_, _, file) = fixture();
        for wrong in [
            &b"correct hors"[..],
            b"correct horsf",
            b"",
            b"Correct horse",
        ] {
            assert_eq!(
                open(&file, wrong).unwrap_err(),
                KeyFileError::WrongPassphraseOrCorrupt
            );
        }
    }

    #[test]
    fn empty_passphrase_round_trips() {
        let mut rng = rng(3);
        let id = IdentityKeyPair::generate(&mut rng);
        let storage = new_storage_key(&mut rng);
        let file = seal(&id, &storage, b"", cheap(), &mut rng).unwrap();
        assert_eq!(open(&file, b"").unwrap().identity().public(), id.public());
        assert!(open(&file, b"x").is_err());
    }

    /// T-25 (2/4): every truncation and every extension is refused by length.
    #[test]
    fn truncated_or_extended_at_every_length() {
        let (_, _, file) = fixture();
        for len in 0..FILE_LEN {
            let err = open(&file[..len], b"correct horse").unwrap_err();
            assert_eq!(
                err,
                KeyFileError::WrongLength {
                    expected: FILE_LEN,
                    found: len
                },
                "length {len}"
            );
            assert!(peek_public(&file[..len]).is_err());
            assert!(peek_params(&file[..len]).is_err());
        }
        for extra in [1usize, 16, 1000] {
            let mut long = file.clone();
            long.extend(std::iter::repeat_n(0u8, extra));
            assert!(matches!(
                open(&long, b"correct horse"),
                Err(KeyFileError::WrongLength { .. })
            ));
        }
    }

    /// T-25 (3/4): any changed byte, in the header or the ciphertext, is an
    /// error and never a key.
    #[test]
    fn every_byte_flipped() {
        let (_, _, file) = fixture();
        for i in 0..FILE_LEN {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = file.clone();
                bad[i] ^= mask;
                let err = match open(&bad, b"correct horse") {
                    Ok(_) => panic!("byte {i} ^ {mask:#x} opened"),
                    Err(e) => e,
                };
                let expected_kind = match i {
                    0..8 => matches!(err, KeyFileError::BadMagic),
                    8 => matches!(err, KeyFileError::UnsupportedVersion(_)),
                    9 => matches!(err, KeyFileError::UnsupportedKdf(_)),
                    10..22 => matches!(
                        err,
                        KeyFileError::KdfParamsTooCostly { .. }
                            | KeyFileError::InvalidKdfParams(_)
                            | KeyFileError::WrongPassphraseOrCorrupt
                    ),
                    22..50 => err == KeyFileError::WrongPassphraseOrCorrupt,
                    50..HEADER_LEN => matches!(err, KeyFileError::PublicIdentity(_)),
                    _ => err == KeyFileError::WrongPassphraseOrCorrupt,
                };
                assert!(expected_kind, "byte {i} ^ {mask:#x}: {err:?}");
            }
        }
    }

    /// T-25 (4/4): a memory cost above the cap is refused at once, before
    /// argon2 runs or allocates (2 GiB or 4 TiB would take seconds or fail).
    #[test]
    fn memory_cap_refused_quickly() {
        let (_, _, file) = fixture();
        for m in [MAX_MEMORY_KIB + 1, 2 * 1024 * 1024, u32::MAX] {
            let bad = with_params(&file, m, 1, 2);
            let start = Instant::now();
            let err = open(&bad, b"correct horse").unwrap_err();
            let elapsed = start.elapsed();
            assert_eq!(
                err,
                KeyFileError::KdfParamsTooCostly {
                    param: "memory KiB",
                    value: m,
                    max: MAX_MEMORY_KIB
                }
            );
            assert!(elapsed < Duration::from_millis(100), "took {elapsed:?}");
            assert!(peek_params(&bad).is_err());
        }
    }

    #[test]
    fn caps_at_the_edge_and_one_past() {
        let (_, _, file) = fixture();
        let edge = with_params(&file, MAX_MEMORY_KIB, MAX_ITERATIONS, MAX_PARALLELISM);
        let p = peek_params(&edge).unwrap();
        assert_eq!(
            (p.memory_kib(), p.iterations(), p.parallelism()),
            (MAX_MEMORY_KIB, MAX_ITERATIONS, MAX_PARALLELISM)
        );
        assert!(KdfParams::new(MAX_MEMORY_KIB, MAX_ITERATIONS, MAX_PARALLELISM).is_ok());

        let cases = [
            (MAX_MEMORY_KIB + 1, 1, 1, "memory KiB"),
            (64, MAX_ITERATIONS + 1, 1, "iterations"),
            (1024, 1, MAX_PARALLELISM + 1, "parallelism"),
        ];
        for (m, t, p, which) in cases {
            let bad = with_params(&file, m, t, p);
            let start = Instant::now();
            let err = open(&bad, b"correct horse").unwrap_err();
            assert!(start.elapsed() < Duration::from_millis(100));
            assert!(
                matches!(err, KeyFileError::KdfParamsTooCostly { param, .. } if param == which),
                "{err:?}"
            );
            assert!(matches!(
                KdfParams::new(m, t, p),
                Err(KeyFileError::KdfParamsTooCostly { .. })
            ));
        }
    }

    #[test]
    fn invalid_params() {
        for (m, t, p) in [(8, 0, 1), (8, 1, 0), (7, 1, 1), (15, 1, 2), (0, 0, 0)] {
            assert!(
                matches!(
                    KdfParams::new(m, t, p),
                    Err(KeyFileError::InvalidKdfParams(_))
                ),
                "({m}, {t}, {p})"
            );
        }
        // Argon2's minimums exactly.
        assert!(KdfParams::new(8, 1, 1).is_ok());
        assert!(KdfParams::new(16, 1, 2).is_ok());

        let (_, _, file) = fixture();
        for (m, t, p) in [(8, 0, 1), (8, 1, 0), (15, 1, 2)] {
            let bad = with_params(&file, m, t, p);
            assert!(matches!(
                open(&bad, b"correct horse"),
                Err(KeyFileError::InvalidKdfParams(_))
            ));
        }
    }

    #[test]
    fn bad_magic_version_kdf() {
        let (_, _, file) = fixture();
        assert_eq!(
            open(b"", b"x").unwrap_err(),
            KeyFileError::WrongLength {
                expected: FILE_LEN,
                found: 0
            }
        );
        assert_eq!(
            open(b"MSGR-ID", b"x").unwrap_err(),
            KeyFileError::WrongLength {
                expected: FILE_LEN,
                found: 7
            }
        );
        assert_eq!(
            open(b"PK\x03\x04", b"x").unwrap_err(),
            KeyFileError::BadMagic
        );
        let mut v2 = file.clone();
        v2[8] = 2;
        v2.truncate(100);
        assert_eq!(
            peek_public(&v2).unwrap_err(),
            KeyFileError::UnsupportedVersion(2)
        );
        let mut kdf = file.clone();
        kdf[9] = 2;
        assert_eq!(
            peek_params(&kdf).unwrap_err(),
            KeyFileError::UnsupportedKdf(2)
        );
    }

    /// A file whose AEAD verifies but whose header names another identity
    /// (only someone who knows the passphrase can make one).
    #[test]
    fn key_mismatch() {
        let mut rng = rng(9);
        let alice = IdentityKeyPair::generate(&mut rng);
        let mallory = IdentityKeyPair::generate(&mut rng);
        let secrets = alice.secret_bytes();
        let mut payload = Zeroizing::new([[0u8; 32]; 3]);
        payload[0].copy_from_slice(&secrets[..32]);
        payload[1].copy_from_slice(&secrets[32..]);
        let file = seal_payload(
            &mallory.public().to_bytes(),
            payload,
            b"pw",
            cheap(),
            &mut rng,
        )
        .unwrap();
        assert_eq!(&peek_public(&file).unwrap(), mallory.public());
        assert_eq!(open(&file, b"pw").unwrap_err(), KeyFileError::KeyMismatch);
    }

    #[test]
    fn default_params_round_trip() {
        assert_eq!(
            (
                KdfParams::DEFAULT.memory_kib(),
                KdfParams::DEFAULT.iterations(),
                KdfParams::DEFAULT.parallelism()
            ),
            (65536, 3, 4)
        );
        assert_eq!(KdfParams::new(65536, 3, 4).unwrap(), KdfParams::default());
        let mut rng = rng(1);
        let id = IdentityKeyPair::generate(&mut rng);
        let storage = new_storage_key(&mut rng);
        let file = seal(&id, &storage, b"pw", KdfParams::DEFAULT, &mut rng).unwrap();
        assert_eq!(peek_params(&file).unwrap(), KdfParams::DEFAULT);
        let opened = open(&file, b"pw").unwrap();
        assert_eq!(opened.identity().public(), id.public());
        assert_eq!(opened.storage_key(), &storage);
    }

    /// The derived key is plain Argon2id v0x13 (no secret, no associated
    /// data), the same as argon2's own allocating entry point computes.
    #[test]
    fn derive_key_is_plain_argon2id() {
        let params = KdfParams::new(32, 3, 4).unwrap();
        let salt = [2u8; SALT_LEN];
        let ours = derive_key(&[1u8; 32], &salt, params).unwrap();
        let mut theirs = [0u8; 32];
        Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            argon2::Params::new(32, 3, 4, Some(32)).unwrap(),
        )
        .hash_password_into(&[1u8; 32], &salt, &mut theirs)
        .unwrap();
        assert_eq!(*ours, theirs);
    }

    #[test]
    fn debug_shows_no_secret() {
        let (id, storage, file) = fixture();
        let opened = open(&file, b"correct horse").unwrap();
        let secrets = id.secret_bytes();
        let parsed = ParsedFile::parse(&file).unwrap();
        let key = derive_key(b"correct horse", &parsed.salt, parsed.params).unwrap();
        let needles: Vec<&[u8]> = vec![
            &secrets[..32],
            &secrets[32..],
            storage.expose(),
            key.as_ref(),
            b"correct horse",
        ];
        let outputs = [
            format!("{opened:?}"),
            format!("{:?}", opened.identity()),
            format!("{:?}", opened.storage_key()),
            format!("{parsed:?}"),
            format!("{:?}", open(&file, b"wrong").unwrap_err()),
            format!("{}", open(&file, b"wrong").unwrap_err()),
        ];
        let b64 = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        for out in &outputs {
            for needle in &needles {
                assert!(!out.contains(&hex::encode(needle)), "{out}");
                assert!(!out.contains(&hex::encode_upper(needle)), "{out}");
                for engine in &b64 {
                    assert!(!out.contains(&engine.encode(needle)), "{out}");
                }
                assert!(!out.contains(&format!("{needle:?}")), "{out}");
            }
        }
        assert!(format!("{opened:?}").contains("Secret32(..)"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The `keyfile_parse` fuzz target as a stable test: any input is
        /// parsed without panicking and never opens.
        #[test]
        fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = peek_public(&bytes);
            let _ = peek_params(&bytes);
            prop_assert!(open(&bytes, b"correct horse").is_err());
        }

        /// A valid, cheap header prefix followed by arbitrary bytes reaches
        /// the public-identity and AEAD checks and is refused there.
        #[test]
        fn arbitrary_body_behind_valid_header_never_opens(
            m in 16u32..64,
            t in 1u32..3,
            p in 1u32..3,
            rest in proptest::collection::vec(any::<u8>(), FILE_LEN - 22..=FILE_LEN - 22),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[VERSION, KDF_ARGON2ID_V13]);
            for v in [m, t, p] {
                bytes.extend_from_slice(&v.to_be_bytes());
            }
            bytes.extend_from_slice(&rest);
            prop_assert!(
                matches!(peek_params(&bytes), Err(KeyFileError::PublicIdentity(_))),
                "{:?}",
                peek_params(&bytes)
            );
            prop_assert!(open(&bytes, b"correct horse").is_err());
        }

        /// One to three changed bytes anywhere: always an error.
        #[test]
        fn random_edits_never_open(
            edits in proptest::collection::vec((0..FILE_LEN, 1u8..=255), 1..4),
        ) {
            let (_, _, file) = fixture();
            let mut bad = file.clone();
            for (at, mask) in edits {
                bad[at] ^= mask;
            }
            prop_assume!(bad != file);
            prop_assert!(open(&bad, b"correct horse").is_err());
        }
    }
}
