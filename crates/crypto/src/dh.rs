//! X25519 keys (RFC 7748) with the checks every incoming key gets: canonical
//! encoding on parse, a contributory (non-zero) result on every agreement, and,
//! for an X3DH base key, membership of the prime-order subgroup.

use core::fmt;

use curve25519_dalek::montgomery::MontgomeryPoint;
use rand_core::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::identity::KeyError;

/// Length of an X25519 public key.
pub const DH_PUBLIC_LEN: usize = 32;

/// 2^255 - 19, little-endian: the field prime. A canonical u-coordinate is below it.
const FIELD_PRIME_LE: [u8; 32] = {
    let mut p = [0xFFu8; 32];
    p[0] = 0xED;
    p[31] = 0x7F;
    p
};

/// An X25519 public key whose encoding is canonical (high bit clear, u < p).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DhPublicKey(PublicKey);

impl DhPublicKey {
    /// Parses a public key, refusing non-canonical encodings.
    pub fn from_bytes(bytes: [u8; DH_PUBLIC_LEN]) -> Result<Self, KeyError> {
        if !is_canonical(&bytes) {
            return Err(KeyError::NonCanonicalDhKey);
        }
        Ok(Self(PublicKey::from(bytes)))
    }

    /// The 32-byte little-endian u-coordinate.
    pub fn to_bytes(&self) -> [u8; DH_PUBLIC_LEN] {
        self.0.to_bytes()
    }

    /// Borrows the encoding.
    pub fn as_bytes(&self) -> &[u8; DH_PUBLIC_LEN] {
        self.0.as_bytes()
    }

    /// Refuses a point with a small-order component (a "torsioned" key), a
    /// low-order point, or a point on the twist. libsignal applies this to
    /// X3DH base keys so one initial message has exactly one accepted
    /// encoding of its base key. The server applies it to every published
    /// key (identity, signed and one-time prekeys) at registration and
    /// upload: a key made the X25519 way (a clamped scalar times the base
    /// point) always passes, so only a weak or crafted one is refused.
    pub fn check_torsion_free(&self) -> Result<(), KeyError> {
        let point = MontgomeryPoint(self.to_bytes());
        match point.to_edwards(0) {
            Some(ed) if ed.is_torsion_free() && !ed.is_small_order() => Ok(()),
            _ => Err(KeyError::TorsionedDhKey),
        }
    }
}

impl fmt::Debug for DhPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DhPublicKey({})", hex_prefix(self.as_bytes()))
    }
}

/// An X25519 private key with its public half. Zeroized on drop.
#[derive(Clone)]
pub struct DhKeyPair {
    secret: StaticSecret,
    public: DhPublicKey,
}

impl DhKeyPair {
    /// Generates a fresh key pair.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self::from_secret_bytes(StaticSecret::random_from_rng(rng).to_bytes())
    }

    /// Rebuilds a key pair from its 32 secret bytes; the public half is always
    /// derived, never taken from storage.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = DhPublicKey(PublicKey::from(&secret));
        Self { secret, public }
    }

    /// The public half.
    pub fn public(&self) -> DhPublicKey {
        self.public
    }

    /// The secret bytes, for sealed pickles only.
    pub(crate) fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// X25519 with the contributory check: an all-zero result (the peer sent
    /// a low-order point) is an error, never a key.
    pub(crate) fn agree(&self, theirs: &DhPublicKey) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let shared = self.secret.diffie_hellman(&theirs.0);
        if !shared.was_contributory() {
            return Err(KeyError::NonContributory);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

impl fmt::Debug for DhKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn is_canonical(bytes: &[u8; 32]) -> bool {
    if bytes[31] & 0x80 != 0 {
        return false;
    }
    // Compare as little-endian integers, most significant byte first.
    for i in (0..32).rev() {
        if bytes[i] != FIELD_PRIME_LE[i] {
            return bytes[i] < FIELD_PRIME_LE[i];
        }
    }
    false
}

/// First bytes of a public value, for `Debug` of public keys only.
pub(crate) fn hex_prefix(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(17);
    for b in bytes.iter().take(8) {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::X25519_LOW_ORDER_POINTS;
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn canonical_encodings() {
        assert!(is_canonical(&[0; 32]));
        let mut p_minus_1 = FIELD_PRIME_LE;
        p_minus_1[0] -= 1;
        assert!(is_canonical(&p_minus_1));
        assert!(!is_canonical(&FIELD_PRIME_LE));
        let mut high = [0u8; 32];
        high[31] = 0x80;
        assert!(!is_canonical(&high));
        assert!(DhPublicKey::from_bytes(FIELD_PRIME_LE).is_err());
    }

    /// Every low-order point (and the zero key) is refused at agreement time.
    #[test]
    fn low_order_points_are_not_contributory() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ours = DhKeyPair::generate(&mut rng);
        let mut tried = 0;
        for p in X25519_LOW_ORDER_POINTS.iter().map(|p| p.to_bytes()) {
            let Ok(theirs) = DhPublicKey::from_bytes(p) else {
                tried += 1; // non-canonical encodings are refused even earlier
                continue;
            };
            assert_eq!(ours.agree(&theirs), Err(KeyError::NonContributory));
            assert_eq!(theirs.check_torsion_free(), Err(KeyError::TorsionedDhKey));
            tried += 1;
        }
        assert_eq!(tried, 7);
        let honest = DhKeyPair::generate(&mut rng).public();
        assert!(ours.agree(&honest).is_ok());
        assert!(honest.check_torsion_free().is_ok());
    }

    #[test]
    fn torsioned_key_is_refused() {
        // An honest point plus a point of order 2 (u = 0 maps to the order-2 Edwards point).
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let honest = DhKeyPair::generate(&mut rng).public();
        let ed = MontgomeryPoint(honest.to_bytes()).to_edwards(0).unwrap();
        let torsion = MontgomeryPoint([0; 32]).to_edwards(0).unwrap();
        assert!(torsion.is_small_order());
        let mixed = (ed + torsion).to_montgomery().to_bytes();
        let key = DhPublicKey::from_bytes(mixed).unwrap();
        assert_eq!(key.check_torsion_free(), Err(KeyError::TorsionedDhKey));
    }
}
