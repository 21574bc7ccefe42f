//! Long-term identity: an Ed25519 signing key (the identity) and an X25519
//! key for X3DH whose public half the Ed25519 key signs.
//!
//! Signal uses one Curve25519 key for both jobs (XEdDSA); we keep two keys
//! and bind them with a context-separated signature instead. Every signature
//! the identity makes covers a [`SigningContext`] label first, so a signature
//! made for one purpose never verifies for another.

use core::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};
use crate::dh::{DH_PUBLIC_LEN, DhKeyPair, DhPublicKey};
use crate::fingerprint;

/// Length of an Ed25519 public key, the identity key.
pub const IDENTITY_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Version byte of the [`PublicIdentity`] encoding.
pub const PUBLIC_IDENTITY_VERSION: u8 = 1;
/// Length of an encoded [`PublicIdentity`]: version, Ed25519 key, X25519 key, binding signature.
pub const PUBLIC_IDENTITY_LEN: usize = 1 + IDENTITY_KEY_LEN + DH_PUBLIC_LEN + SIGNATURE_LEN;
/// Longest username, in bytes (all allowed characters are ASCII).
pub const MAX_USERNAME_LEN: usize = 32;

/// Errors about keys, signatures and names.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes do not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The bytes are not a valid Ed25519 point.
    #[error("invalid identity key encoding")]
    InvalidIdentityKey,
    /// A small-order Ed25519 key, which makes signatures valid for almost any message.
    #[error("weak (small-order) identity key refused")]
    WeakIdentityKey,
    /// A signature did not verify under `verify_strict`.
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    /// An X25519 public key with a non-canonical encoding.
    #[error("non-canonical X25519 public key")]
    NonCanonicalDhKey,
    /// An X25519 key outside the prime-order subgroup.
    #[error("X25519 key with a small-order component refused")]
    TorsionedDhKey,
    /// An X25519 agreement gave the all-zero result: the peer sent a low-order point.
    #[error("non-contributory X25519 agreement (low-order public key)")]
    NonContributory,
    /// The prekey id space (u32) is used up; generate a new identity.
    #[error("prekey ids exhausted")]
    PrekeyIdsExhausted,
    /// More one-time prekeys asked for in one batch than allowed.
    #[error("one-time prekey batch too large")]
    BatchTooLarge,
    /// A prekey id in a message does not match the key we hold.
    #[error("unknown prekey id {0}")]
    UnknownPrekey(u32),
    /// A username outside the allowed alphabet or length.
    #[error("invalid username: use 1-32 characters of a-z, 0-9, '_', '.', '-'")]
    InvalidUsername,
}

/// What a signature is for. Each has its own label, which the signature
/// covers before the fixed-width fields (reference: security.md §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SigningContext {
    /// Binds the X25519 identity key to the Ed25519 identity.
    X25519Identity,
    /// A signed prekey: `id(u32 BE) ‖ key(32)`.
    SignedPrekey,
    /// A login: `server nonce(32) ‖ TLS exporter(32)`.
    Login,
    /// A server announcement.
    Announcement,
    /// A change to a group roster, signed by the owner.
    GroupRoster,
    /// A group (sender-key) message, signed by the sender's chain signing key.
    GroupMessage,
    /// A per-transfer TLS key certified by the identity, for direct file transfer.
    P2pCert,
}

impl SigningContext {
    /// Every context, for tests that check the labels are prefix-free.
    pub const ALL: [SigningContext; 7] = [
        Self::X25519Identity,
        Self::SignedPrekey,
        Self::Login,
        Self::Announcement,
        Self::GroupRoster,
        Self::GroupMessage,
        Self::P2pCert,
    ];

    /// The label, versioned with the protocol.
    pub fn label(self) -> &'static [u8] {
        match self {
            Self::X25519Identity => b"messenger/1 x25519-identity",
            Self::SignedPrekey => b"messenger/1 signed-prekey",
            Self::Login => b"messenger/1 login",
            Self::Announcement => b"messenger/1 announce",
            Self::GroupRoster => b"messenger/1 group-roster",
            Self::GroupMessage => b"messenger/1 group-msg",
            Self::P2pCert => b"messenger/1 p2p-cert",
        }
    }
}

/// A validated username: 1 to 32 characters of `a-z 0-9 _ . -`, stored in
/// lowercase so names that differ only in case are the same name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

impl Username {
    /// Parses and lowercases a username.
    pub fn parse(name: &str) -> Result<Self, KeyError> {
        let lower = name.to_ascii_lowercase();
        let ok = !lower.is_empty()
            && lower.len() <= MAX_USERNAME_LEN
            && lower
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if ok {
            Ok(Self(lower))
        } else {
            Err(KeyError::InvalidUsername)
        }
    }

    /// The lowercase name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The lowercase name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Username({})", self.0)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ed25519 identity public key that decoded and is not weak.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityKey(VerifyingKey);

impl IdentityKey {
    /// Parses a 32-byte Ed25519 public key, refusing invalid and small-order points.
    pub fn from_bytes(bytes: &[u8; IDENTITY_KEY_LEN]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidIdentityKey)?;
        if key.is_weak() {
            return Err(KeyError::WeakIdentityKey);
        }
        Ok(Self(key))
    }

    /// The 32-byte encoding.
    pub fn to_bytes(&self) -> [u8; IDENTITY_KEY_LEN] {
        self.0.to_bytes()
    }

    /// Verifies `sig` over `context label ‖ msg` with `verify_strict`.
    pub fn verify(
        &self,
        context: SigningContext,
        msg: &[u8],
        sig: &[u8; SIGNATURE_LEN],
    ) -> Result<(), KeyError> {
        verify_strict(&self.0, context, msg, sig)
    }

    /// `SHA256:` fingerprint of this key.
    pub fn fingerprint(&self) -> String {
        fingerprint::fingerprint(self)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({})", self.fingerprint())
    }
}

/// Checks a context-labelled signature under any Ed25519 key (an identity, a
/// sender-key signing key, a server key).
pub(crate) fn verify_strict(
    key: &VerifyingKey,
    context: SigningContext,
    msg: &[u8],
    sig: &[u8; SIGNATURE_LEN],
) -> Result<(), KeyError> {
    let what = match context {
        SigningContext::X25519Identity => "identity binding",
        SigningContext::SignedPrekey => "signed prekey",
        SigningContext::Login => "login",
        SigningContext::Announcement => "announcement",
        SigningContext::GroupRoster => "group roster",
        SigningContext::GroupMessage => "group message",
        SigningContext::P2pCert => "transfer certificate",
    };
    let sig = Signature::from_bytes(sig);
    let mut signed = Vec::with_capacity(context.label().len() + msg.len());
    signed.extend_from_slice(context.label());
    signed.extend_from_slice(msg);
    key.verify_strict(&signed, &sig)
        .map_err(|_| KeyError::BadSignature(what))
}

/// Signs `context label ‖ msg` with any Ed25519 key.
pub(crate) fn sign_with(
    key: &SigningKey,
    context: SigningContext,
    msg: &[u8],
) -> [u8; SIGNATURE_LEN] {
    let mut signed = Vec::with_capacity(context.label().len() + msg.len());
    signed.extend_from_slice(context.label());
    signed.extend_from_slice(msg);
    key.sign(&signed).to_bytes()
}

/// Someone's public identity: the Ed25519 identity key, the X25519 identity
/// key and the signature binding the second to the first. A value of this type
/// has had its binding verified.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicIdentity {
    key: IdentityKey,
    dh: DhPublicKey,
    binding: [u8; SIGNATURE_LEN],
}

impl PublicIdentity {
    /// Decodes `version(1) ‖ ed25519(32) ‖ x25519(32) ‖ signature(64)` and
    /// verifies the binding signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "public identity");
        r.version(PUBLIC_IDENTITY_VERSION)?;
        let key = IdentityKey::from_bytes(&r.array()?)?;
        let dh = DhPublicKey::from_bytes(r.array()?)?;
        let binding = r.array()?;
        r.finish()?;
        key.verify(SigningContext::X25519Identity, dh.as_bytes(), &binding)?;
        Ok(Self { key, dh, binding })
    }

    /// The stable encoding, [`PUBLIC_IDENTITY_LEN`] bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(PUBLIC_IDENTITY_LEN);
        w.u8(PUBLIC_IDENTITY_VERSION)
            .bytes(&self.key.to_bytes())
            .bytes(self.dh.as_bytes())
            .bytes(&self.binding);
        w.finish()
    }

    /// The Ed25519 identity key: who this is.
    pub fn identity_key(&self) -> &IdentityKey {
        &self.key
    }

    /// The X25519 identity key used in X3DH.
    pub fn dh_key(&self) -> &DhPublicKey {
        &self.dh
    }

    /// `SHA256:` fingerprint of the identity key.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint()
    }
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicIdentity")
            .field("key", &self.key)
            .field("dh", &self.dh)
            .finish_non_exhaustive()
    }
}

/// The secret identity. Both secret keys are wiped on drop; it prints as
/// `IdentityKeyPair(SHA256:…)` with only the public fingerprint.
pub struct IdentityKeyPair {
    signing: SigningKey,
    dh: DhKeyPair,
    public: PublicIdentity,
}

impl IdentityKeyPair {
    /// Generates a fresh identity.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let signing = SigningKey::generate(rng);
        let dh = DhKeyPair::generate(rng);
        Self::assemble(signing, dh)
    }

    /// Rebuilds an identity from its secret bytes (the Ed25519 seed and the
    /// X25519 scalar). Public halves are always derived from the secrets, never
    /// read from storage (RUSTSEC-2022-0093).
    pub fn from_secret_bytes(ed25519_seed: &[u8; 32], x25519_secret: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(ed25519_seed);
        let dh = DhKeyPair::from_secret_bytes(*x25519_secret);
        Self::assemble(signing, dh)
    }

    fn assemble(signing: SigningKey, dh: DhKeyPair) -> Self {
        let binding = sign_with(
            &signing,
            SigningContext::X25519Identity,
            dh.public().as_bytes(),
        );
        let public = PublicIdentity {
            key: IdentityKey(signing.verifying_key()),
            dh: dh.public(),
            binding,
        };
        Self {
            signing,
            dh,
            public,
        }
    }

    /// The public identity to publish.
    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    /// The Ed25519 identity key.
    pub fn identity_key(&self) -> &IdentityKey {
        &self.public.key
    }

    /// Signs `context label ‖ msg`.
    pub fn sign(&self, context: SigningContext, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        sign_with(&self.signing, context, msg)
    }

    /// Signs a login challenge: `server nonce ‖ TLS exporter value`.
    pub fn sign_login(&self, nonce: &[u8; 32], exporter: &[u8; 32]) -> [u8; SIGNATURE_LEN] {
        let mut msg = [0u8; 64];
        msg[..32].copy_from_slice(nonce);
        msg[32..].copy_from_slice(exporter);
        self.sign(SigningContext::Login, &msg)
    }

    /// The X25519 identity key pair, for X3DH.
    pub(crate) fn dh(&self) -> &DhKeyPair {
        &self.dh
    }

    /// `ed25519 seed(32) ‖ x25519 secret(32)`, for the key file only.
    pub(crate) fn secret_bytes(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(self.signing.as_bytes());
        out[32..].copy_from_slice(self.dh.secret_bytes().as_ref());
        out
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKeyPair({})", self.public.fingerprint())
    }
}

/// Verifies a login signature made by [`IdentityKeyPair::sign_login`].
pub fn verify_login(
    key: &IdentityKey,
    nonce: &[u8; 32],
    exporter: &[u8; 32],
    sig: &[u8; SIGNATURE_LEN],
) -> Result<(), KeyError> {
    let mut msg = [0u8; 64];
    msg[..32].copy_from_slice(nonce);
    msg[32..].copy_from_slice(exporter);
    key.verify(SigningContext::Login, &msg, sig)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn public_identity_round_trip_and_binding() {
        let id = IdentityKeyPair::generate(&mut rng());
        let bytes = id.public().to_bytes();
        assert_eq!(bytes.len(), PUBLIC_IDENTITY_LEN);
        let parsed = PublicIdentity::from_bytes(&bytes).unwrap();
        assert_eq!(&parsed, id.public());

        // Every single-bit flip is refused (version, keys or binding).
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                PublicIdentity::from_bytes(&b).is_err(),
                "bit {bit} accepted"
            );
        }
        assert!(PublicIdentity::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(PublicIdentity::from_bytes(&long).is_err());
    }

    #[test]
    fn secret_round_trip_derives_same_public() {
        let id = IdentityKeyPair::generate(&mut rng());
        let s = id.secret_bytes();
        let seed: [u8; 32] = s[..32].try_into().unwrap();
        let x: [u8; 32] = s[32..].try_into().unwrap();
        let again = IdentityKeyPair::from_secret_bytes(&seed, &x);
        assert_eq!(again.public(), id.public());
    }

    #[test]
    fn labels_are_prefix_free() {
        for a in SigningContext::ALL {
            for b in SigningContext::ALL {
                if a != b {
                    assert!(!b.label().starts_with(a.label()), "{a:?} prefixes {b:?}");
                }
            }
        }
    }

    /// T-10: a signature for one context never verifies in another.
    #[test]
    fn contexts_are_separated() {
        let id = IdentityKeyPair::generate(&mut rng());
        let msg = [9u8; 64];
        for a in SigningContext::ALL {
            let sig = id.sign(a, &msg);
            for b in SigningContext::ALL {
                let ok = id.identity_key().verify(b, &msg, &sig).is_ok();
                assert_eq!(ok, a == b, "{a:?} signature checked as {b:?}");
            }
        }
    }

    #[test]
    fn login_signature_binds_nonce_and_exporter() {
        let id = IdentityKeyPair::generate(&mut rng());
        let sig = id.sign_login(&[1; 32], &[2; 32]);
        verify_login(id.identity_key(), &[1; 32], &[2; 32], &sig).unwrap();
        assert!(verify_login(id.identity_key(), &[1; 32], &[3; 32], &sig).is_err());
        assert!(verify_login(id.identity_key(), &[4; 32], &[2; 32], &sig).is_err());
    }

    /// T-09: a non-canonical signature (S + l) is refused.
    #[test]
    fn non_canonical_signature_refused() {
        let id = IdentityKeyPair::generate(&mut rng());
        let msg = b"hello";
        let sig = id.sign(SigningContext::Announcement, msg);
        id.identity_key()
            .verify(SigningContext::Announcement, msg, &sig)
            .unwrap();
        // l = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut forged = sig;
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(forged[32 + i]) + u16::from(l[i]) + carry;
            forged[32 + i] = v as u8;
            carry = v >> 8;
        }
        assert!(
            id.identity_key()
                .verify(SigningContext::Announcement, msg, &forged)
                .is_err()
        );
    }

    /// T-07: the eight small-order Ed25519 points are refused as identities.
    #[test]
    fn weak_identity_keys_refused() {
        use curve25519_dalek::constants::X25519_LOW_ORDER_POINTS;
        use curve25519_dalek::edwards::EdwardsPoint;
        use curve25519_dalek::traits::Identity;
        // The 8-torsion subgroup: the identity and both signs of every low-order u.
        let mut points = vec![EdwardsPoint::identity().compress().to_bytes()];
        for u in X25519_LOW_ORDER_POINTS.iter() {
            for sign in 0..2 {
                if let Some(p) = u.to_edwards(sign) {
                    let b = p.compress().to_bytes();
                    if !points.contains(&b) {
                        points.push(b);
                    }
                }
            }
        }
        assert_eq!(points.len(), 8);
        let mut refused = 0;
        for bytes in &points {
            match IdentityKey::from_bytes(bytes) {
                Err(KeyError::WeakIdentityKey) | Err(KeyError::InvalidIdentityKey) => refused += 1,
                other => panic!("small-order key accepted: {other:?}"),
            }
        }
        assert_eq!(refused, 8);
    }

    #[test]
    fn usernames() {
        assert_eq!(
            Username::parse("Alice_1.x-y").unwrap().as_str(),
            "alice_1.x-y"
        );
        assert!(Username::parse("").is_err());
        assert!(Username::parse(&"a".repeat(32)).is_ok());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("bob smith").is_err());
        assert!(Username::parse("bøb").is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let id = IdentityKeyPair::generate(&mut rng());
        let s = id.secret_bytes();
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&hex::encode(&s[..32])));
        assert!(!dbg.contains(&hex::encode(&s[32..])));
        assert!(dbg.starts_with("IdentityKeyPair(SHA256:"));
    }
}
