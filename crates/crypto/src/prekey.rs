//! Signed prekeys, one-time prekeys and the bundle a server hands out
//! (X3DH §3.2, "Publishing keys").
//!
//! A [`VerifiedBundle`] can only be made by checking the identity binding and
//! the signed-prekey signature (`verify_strict`), so X3DH cannot be started
//! from an unchecked bundle.

use core::fmt;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::dh::{DH_PUBLIC_LEN, DhKeyPair, DhPublicKey};
use crate::identity::{
    IdentityKey, IdentityKeyPair, KeyError, PublicIdentity, SIGNATURE_LEN, SigningContext,
};

/// Version byte of [`VerifiedBundle::to_bytes`]. A later version may add a
/// post-quantum (ML-KEM) prekey without breaking this one.
pub const PREKEY_BUNDLE_VERSION: u8 = 1;
/// Length of an encoded [`SignedPrekey`]: id, key, signature.
pub const SIGNED_PREKEY_LEN: usize = 4 + DH_PUBLIC_LEN + SIGNATURE_LEN;
/// Length of an encoded [`OneTimePrekey`]: id, key.
pub const ONE_TIME_PREKEY_LEN: usize = 4 + DH_PUBLIC_LEN;
/// Most one-time prekeys made in one batch: enough to refill a server pool in
/// one request, small enough that one request stays well under a frame.
pub const MAX_PREKEY_BATCH: u32 = 200;

/// Hands out prekey ids that never repeat. The caller persists [`Self::next`]
/// *before* publishing the keys it generated, so a crash or a restore cannot
/// reuse an id (the lesson of vodozemac #382).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrekeyIdCounter {
    next: u32,
}

impl PrekeyIdCounter {
    /// A fresh counter; ids start at 1 (0 is never used, so it can mean "none").
    pub fn new() -> Self {
        Self { next: 1 }
    }

    /// Restores a counter saved with [`Self::next`].
    pub fn restore(next: u32) -> Self {
        Self { next: next.max(1) }
    }

    /// The next id this counter will hand out; persist it.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// Reserves `count` consecutive ids.
    pub fn reserve(&mut self, count: u32) -> Result<core::ops::Range<u32>, KeyError> {
        let end = self
            .next
            .checked_add(count)
            .ok_or(KeyError::PrekeyIdsExhausted)?;
        let range = self.next..end;
        self.next = end;
        Ok(range)
    }
}

impl Default for PrekeyIdCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// The public part of a signed prekey.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignedPrekey {
    id: u32,
    key: DhPublicKey,
    signature: [u8; SIGNATURE_LEN],
}

impl SignedPrekey {
    /// Decodes `id(u32 BE) ‖ key(32) ‖ signature(64)`. The signature is checked
    /// only when a bundle is verified against its identity.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "signed prekey");
        let spk = Self::read(&mut r)?;
        r.finish()?;
        Ok(spk)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, KeyError> {
        let id = r.u32()?;
        let key = DhPublicKey::from_bytes(r.array()?)?;
        let signature = r.array()?;
        Ok(Self { id, key, signature })
    }

    /// The [`SIGNED_PREKEY_LEN`]-byte encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(SIGNED_PREKEY_LEN);
        self.write(&mut w);
        w.finish()
    }

    fn write(&self, w: &mut Writer) {
        w.u32(self.id)
            .bytes(self.key.as_bytes())
            .bytes(&self.signature);
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The X25519 public key.
    pub fn key(&self) -> &DhPublicKey {
        &self.key
    }

    /// Checks the signature `Sig(IK, "messenger/1 signed-prekey" ‖ id ‖ key)`.
    pub fn verify(&self, identity: &IdentityKey) -> Result<(), KeyError> {
        identity.verify(
            SigningContext::SignedPrekey,
            &signed_prekey_message(self.id, &self.key),
            &self.signature,
        )
    }
}

impl fmt::Debug for SignedPrekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedPrekey")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn signed_prekey_message(id: u32, key: &DhPublicKey) -> [u8; 36] {
    let mut msg = [0u8; 36];
    msg[..4].copy_from_slice(&id.to_be_bytes());
    msg[4..].copy_from_slice(key.as_bytes());
    msg
}

/// A signed prekey with its secret. Zeroized on drop; prints only its id.
#[derive(Clone)]
pub struct SignedPrekeyPair {
    public: SignedPrekey,
    keypair: DhKeyPair,
}

impl SignedPrekeyPair {
    /// Generates and signs a prekey with the next id of `ids`.
    pub fn generate<R: CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        ids: &mut PrekeyIdCounter,
        rng: &mut R,
    ) -> Result<Self, KeyError> {
        let id = ids.reserve(1)?.start;
        Ok(Self::from_parts(identity, id, DhKeyPair::generate(rng)))
    }

    fn from_parts(identity: &IdentityKeyPair, id: u32, keypair: DhKeyPair) -> Self {
        let key = keypair.public();
        let signature = identity.sign(
            SigningContext::SignedPrekey,
            &signed_prekey_message(id, &key),
        );
        Self {
            public: SignedPrekey { id, key, signature },
            keypair,
        }
    }

    /// The part to publish.
    pub fn public(&self) -> &SignedPrekey {
        &self.public
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.public.id
    }

    pub(crate) fn keypair(&self) -> &DhKeyPair {
        &self.keypair
    }

    /// Secret encoding `id(u32 BE) ‖ secret(32) ‖ signature(64)`, to be sealed by
    /// the caller before storage.
    pub fn to_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(100);
        w.u32(self.public.id)
            .bytes(self.keypair.secret_bytes().as_ref())
            .bytes(&self.public.signature);
        Zeroizing::new(w.finish())
    }

    /// Restores from [`Self::to_secret_bytes`], re-deriving the public key and
    /// checking the stored signature against `identity`.
    pub fn from_secret_bytes(bytes: &[u8], identity: &IdentityKey) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "signed prekey secret");
        let id = r.u32()?;
        let secret = Zeroizing::new(r.array::<32>()?);
        let signature = r.array()?;
        r.finish()?;
        let keypair = DhKeyPair::from_secret_bytes(*secret);
        let public = SignedPrekey {
            id,
            key: keypair.public(),
            signature,
        };
        public.verify(identity)?;
        Ok(Self { public, keypair })
    }
}

impl fmt::Debug for SignedPrekeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignedPrekeyPair(id {})", self.public.id)
    }
}

/// The public part of a one-time prekey.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OneTimePrekey {
    id: u32,
    key: DhPublicKey,
}

impl OneTimePrekey {
    /// Decodes `id(u32 BE) ‖ key(32)`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "one-time prekey");
        let id = r.u32()?;
        let key = DhPublicKey::from_bytes(r.array()?)?;
        r.finish()?;
        Ok(Self { id, key })
    }

    /// The [`ONE_TIME_PREKEY_LEN`]-byte encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(ONE_TIME_PREKEY_LEN);
        w.u32(self.id).bytes(self.key.as_bytes());
        w.finish()
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The X25519 public key.
    pub fn key(&self) -> &DhPublicKey {
        &self.key
    }
}

impl fmt::Debug for OneTimePrekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneTimePrekey")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

/// A one-time prekey with its secret. Zeroized on drop; prints only its id.
#[derive(Clone)]
pub struct OneTimePrekeyPair {
    id: u32,
    keypair: DhKeyPair,
}

impl OneTimePrekeyPair {
    /// Generates a batch of `count` (at most [`MAX_PREKEY_BATCH`]) with fresh ids.
    pub fn generate_batch<R: CryptoRng + ?Sized>(
        ids: &mut PrekeyIdCounter,
        count: u32,
        rng: &mut R,
    ) -> Result<Vec<Self>, KeyError> {
        if count > MAX_PREKEY_BATCH {
            return Err(KeyError::BatchTooLarge);
        }
        let range = ids.reserve(count)?;
        Ok(range
            .map(|id| Self {
                id,
                keypair: DhKeyPair::generate(rng),
            })
            .collect())
    }

    /// The part to publish.
    pub fn public(&self) -> OneTimePrekey {
        OneTimePrekey {
            id: self.id,
            key: self.keypair.public(),
        }
    }

    /// The prekey id.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn keypair(&self) -> &DhKeyPair {
        &self.keypair
    }

    /// Secret encoding `id(u32 BE) ‖ secret(32)`, to be sealed before storage.
    pub fn to_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(36);
        w.u32(self.id).bytes(self.keypair.secret_bytes().as_ref());
        Zeroizing::new(w.finish())
    }

    /// Restores from [`Self::to_secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "one-time prekey secret");
        let id = r.u32()?;
        let secret = Zeroizing::new(r.array::<32>()?);
        r.finish()?;
        Ok(Self {
            id,
            keypair: DhKeyPair::from_secret_bytes(*secret),
        })
    }
}

impl fmt::Debug for OneTimePrekeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OneTimePrekeyPair(id {})", self.id)
    }
}

/// A prekey bundle whose identity binding and signed-prekey signature verified.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    identity: PublicIdentity,
    signed_prekey: SignedPrekey,
    one_time_prekey: Option<OneTimePrekey>,
}

impl VerifiedBundle {
    /// Verifies the parts of a bundle as a server returns them. `identity`
    /// already carries a verified binding (see [`PublicIdentity::from_bytes`]).
    pub fn verify(
        identity: PublicIdentity,
        signed_prekey: SignedPrekey,
        one_time_prekey: Option<OneTimePrekey>,
    ) -> Result<Self, KeyError> {
        signed_prekey.verify(identity.identity_key())?;
        Ok(Self {
            identity,
            signed_prekey,
            one_time_prekey,
        })
    }

    /// Decodes and verifies
    /// `version(1) ‖ identity(129) ‖ signed prekey(100) ‖ has_opk(1) [‖ opk(36)]`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut r = Reader::new(bytes, "prekey bundle");
        r.version(PREKEY_BUNDLE_VERSION)?;
        let identity = PublicIdentity::from_bytes(r.take(crate::identity::PUBLIC_IDENTITY_LEN)?)?;
        let signed_prekey = SignedPrekey::read(&mut r)?;
        let one_time_prekey = match r.u8()? {
            0 => None,
            1 => Some(OneTimePrekey::from_bytes(r.take(ONE_TIME_PREKEY_LEN)?)?),
            _ => {
                return Err(crate::DecodeError::Invalid {
                    what: "prekey bundle",
                }
                .into());
            }
        };
        r.finish()?;
        Self::verify(identity, signed_prekey, one_time_prekey)
    }

    /// The encoding read by [`Self::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(1 + 129 + SIGNED_PREKEY_LEN + 1 + ONE_TIME_PREKEY_LEN);
        w.u8(PREKEY_BUNDLE_VERSION).bytes(&self.identity.to_bytes());
        self.signed_prekey.write(&mut w);
        match &self.one_time_prekey {
            None => {
                w.u8(0);
            }
            Some(opk) => {
                w.u8(1).bytes(&opk.to_bytes());
            }
        }
        w.finish()
    }

    /// Whose bundle this is.
    pub fn identity(&self) -> &PublicIdentity {
        &self.identity
    }

    /// The verified signed prekey.
    pub fn signed_prekey(&self) -> &SignedPrekey {
        &self.signed_prekey
    }

    /// The one-time prekey, if the server had one left.
    pub fn one_time_prekey(&self) -> Option<&OneTimePrekey> {
        self.one_time_prekey.as_ref()
    }
}

impl fmt::Debug for VerifiedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedBundle")
            .field("identity", &self.identity)
            .field("signed_prekey", &self.signed_prekey)
            .field("one_time_prekey", &self.one_time_prekey)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn setup() -> (IdentityKeyPair, SignedPrekeyPair, Vec<OneTimePrekeyPair>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let id = IdentityKeyPair::generate(&mut rng);
        let mut ids = PrekeyIdCounter::new();
        let spk = SignedPrekeyPair::generate(&id, &mut ids, &mut rng).unwrap();
        let mut opk_ids = PrekeyIdCounter::new();
        let opks = OneTimePrekeyPair::generate_batch(&mut opk_ids, 3, &mut rng).unwrap();
        (id, spk, opks)
    }

    #[test]
    fn bundle_round_trip() {
        let (id, spk, opks) = setup();
        for opk in [None, Some(opks[0].public())] {
            let b = VerifiedBundle::verify(id.public().clone(), *spk.public(), opk).unwrap();
            let bytes = b.to_bytes();
            assert_eq!(VerifiedBundle::from_bytes(&bytes).unwrap(), b);
        }
    }

    /// T-08: every bit of the SPK signature, the SPK and the identity binding
    /// flipped: 1,280 of 1,280 refused.
    #[test]
    fn bundle_tamper_refused() {
        let (id, spk, _) = setup();
        let b = VerifiedBundle::verify(id.public().clone(), *spk.public(), None).unwrap();
        let bytes = b.to_bytes();
        // Offsets: identity binding sig at 1+1+32+32 .. +64; SPK key at 1+129+4 .. +32;
        // SPK signature right after it.
        let binding = 66..130;
        let spk_key = 134..166;
        let spk_sig = 166..230;
        let mut refused = 0;
        for range in [binding, spk_key, spk_sig] {
            for bit in range.start * 8..range.end * 8 {
                let mut t = bytes.clone();
                t[bit / 8] ^= 1 << (bit % 8);
                if VerifiedBundle::from_bytes(&t).is_err() {
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 1280);
    }

    #[test]
    fn forged_signed_prekey_refused() {
        let (id, spk, _) = setup();
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mallory = IdentityKeyPair::generate(&mut rng);
        // Mallory signs a prekey under her key and presents it with the victim's identity.
        let forged =
            SignedPrekeyPair::from_parts(&mallory, spk.id(), DhKeyPair::generate(&mut rng));
        assert_eq!(
            VerifiedBundle::verify(id.public().clone(), *forged.public(), None),
            Err(KeyError::BadSignature("signed prekey"))
        );
    }

    /// T-27: ids never repeat across generate / save / restore / regenerate.
    #[test]
    fn prekey_ids_never_repeat_across_restarts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut seen = std::collections::HashSet::new();
        let mut saved = PrekeyIdCounter::new().next();
        for _restart in 0..3 {
            let mut ids = PrekeyIdCounter::restore(saved);
            for _ in 0..3 {
                for k in OneTimePrekeyPair::generate_batch(&mut ids, 50, &mut rng).unwrap() {
                    assert!(seen.insert(k.id()), "id {} repeated", k.id());
                }
                saved = ids.next();
            }
        }
        assert_eq!(seen.len(), 450);
        assert!(
            OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), 201, &mut rng).is_err()
        );
        let mut nearly = PrekeyIdCounter::restore(u32::MAX - 1);
        assert_eq!(nearly.reserve(2), Err(KeyError::PrekeyIdsExhausted));
        assert_eq!(
            nearly.next(),
            u32::MAX - 1,
            "failed reservation must not advance"
        );
    }

    #[test]
    fn secret_round_trips() {
        let (id, spk, opks) = setup();
        let s =
            SignedPrekeyPair::from_secret_bytes(&spk.to_secret_bytes(), id.identity_key()).unwrap();
        assert_eq!(s.public(), spk.public());
        let o = OneTimePrekeyPair::from_secret_bytes(&opks[1].to_secret_bytes()).unwrap();
        assert_eq!(o.public(), opks[1].public());
        let dbg = format!("{spk:?} {o:?}");
        assert!(!dbg.contains(&hex::encode(&spk.to_secret_bytes()[4..36])));
        assert!(!dbg.contains(&hex::encode(&o.to_secret_bytes()[4..36])));
    }
}
