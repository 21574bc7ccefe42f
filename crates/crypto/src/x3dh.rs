//! X3DH key agreement (Signal, "The X3DH Key Agreement Protocol", rev. 1).
//!
//! Parameters (§2.1): curve X25519, hash SHA-256, info
//! [`X3DH_INFO`]. `KDF(KM) = HKDF-SHA256(salt = 32 zero bytes,
//! IKM = 0xFF×32 ‖ KM, info)` (§2.2). DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A,
//! IK_B), DH3 = DH(EK_A, SPK_B), DH4 = DH(EK_A, OPK_B) when a one-time prekey
//! was used (§3.3).
//!
//! Departures, each for a documented reason (docs/crypto.md):
//! * The identity is an Ed25519 key that signs a separate X25519 identity key,
//!   instead of one XEdDSA key; IK in the DHs above is that X25519 key.
//! * The associated data binds both usernames as well as both identity keys
//!   (answering §4.8, identity misbinding).
//! * Every DH output must be contributory, and the responder refuses base keys
//!   outside the prime-order subgroup.

use core::fmt;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::dh::{DhKeyPair, DhPublicKey};
use crate::identity::{IdentityKeyPair, KeyError, PublicIdentity, Username};
use crate::kdf::hkdf_sha256;
use crate::prekey::{OneTimePrekeyPair, SignedPrekeyPair, VerifiedBundle};
use crate::secret::Secret32;

/// The X3DH `info` string (§2.1): identifies the application and the curve/hash.
pub const X3DH_INFO: &[u8] = b"messenger/1 X3DH X25519 SHA-256";
/// Leading label of the associated data.
const AD_LABEL: &[u8] = b"messenger/1";
/// `F`: 32 0xFF bytes prepended to the DH outputs for X25519 (§2.2), which
/// separates X3DH's KDF input from any XEdDSA-style use of the same keys.
const KDF_PREFIX: [u8; 32] = [0xFF; 32];

/// The associated data of a session:
/// `"messenger/1" ‖ lp(name_A) ‖ Ed25519_A ‖ X25519_A ‖ lp(name_B) ‖ Ed25519_B ‖ X25519_B`
/// with `A` the initiator and `lp` a one-byte length prefix. Public, not secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AssociatedData(Vec<u8>);

impl AssociatedData {
    /// Builds the AD for initiator `a` and responder `b`.
    pub fn new(
        a_name: &Username,
        a: &PublicIdentity,
        b_name: &Username,
        b: &PublicIdentity,
    ) -> Self {
        let mut ad = Vec::with_capacity(AD_LABEL.len() + 2 * (1 + 32 + 64));
        ad.extend_from_slice(AD_LABEL);
        for (name, id) in [(a_name, a), (b_name, b)] {
            // Usernames are at most 32 bytes, so the length fits a byte.
            ad.push(name.as_str().len() as u8);
            ad.extend_from_slice(name.as_str().as_bytes());
            ad.extend_from_slice(&id.identity_key().to_bytes());
            ad.extend_from_slice(id.dh_key().as_bytes());
        }
        Self(ad)
    }

    pub(crate) fn from_raw(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AssociatedData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AssociatedData({} bytes)", self.0.len())
    }
}

/// What the initiator tells the responder in its first message (§3.3): the
/// ephemeral (base) key and which prekeys it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initiation {
    /// `EK_A`, the initiator's ephemeral public key.
    pub base_key: DhPublicKey,
    /// Id of the responder's signed prekey used.
    pub signed_prekey_id: u32,
    /// Id of the responder's one-time prekey used, if any.
    pub one_time_prekey_id: Option<u32>,
}

/// The result of X3DH on either side.
pub struct Agreement {
    /// `SK`, the 32-byte shared key; it becomes the first root key.
    pub shared_key: Secret32,
    /// The session's associated data.
    pub associated_data: AssociatedData,
}

impl fmt::Debug for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agreement")
            .field("shared_key", &self.shared_key)
            .field("associated_data", &self.associated_data)
            .finish()
    }
}

fn kdf(dhs: &[&Zeroizing<[u8; 32]>]) -> Secret32 {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * (dhs.len() + 1)));
    ikm.extend_from_slice(&KDF_PREFIX);
    for dh in dhs {
        ikm.extend_from_slice(dh.as_ref());
    }
    let mut sk = [0u8; 32];
    hkdf_sha256(Some(&[0u8; 32]), &ikm, X3DH_INFO, &mut sk);
    let out = Secret32::from_bytes(sk);
    zeroize::Zeroize::zeroize(&mut sk);
    out
}

/// Alice's side (§3.3): generates `EK_A`, runs the DHs against a verified
/// bundle and returns the agreement and the [`Initiation`] to send. The
/// ephemeral private key is wiped when this returns (§3.3).
pub fn initiate<R: CryptoRng + ?Sized>(
    rng: &mut R,
    me: &IdentityKeyPair,
    my_name: &Username,
    bundle: &VerifiedBundle,
    their_name: &Username,
) -> Result<(Agreement, Initiation), KeyError> {
    let ek = DhKeyPair::generate(rng);
    initiate_with_ephemeral(ek, me, my_name, bundle, their_name)
}

pub(crate) fn initiate_with_ephemeral(
    ek: DhKeyPair,
    me: &IdentityKeyPair,
    my_name: &Username,
    bundle: &VerifiedBundle,
    their_name: &Username,
) -> Result<(Agreement, Initiation), KeyError> {
    let spk = bundle.signed_prekey();
    let dh1 = me.dh().agree(spk.key())?;
    let dh2 = ek.agree(bundle.identity().dh_key())?;
    let dh3 = ek.agree(spk.key())?;
    let (shared_key, opk_id) = match bundle.one_time_prekey() {
        Some(opk) => {
            let dh4 = ek.agree(opk.key())?;
            (kdf(&[&dh1, &dh2, &dh3, &dh4]), Some(opk.id()))
        }
        None => (kdf(&[&dh1, &dh2, &dh3]), None),
    };
    let associated_data = AssociatedData::new(my_name, me.public(), their_name, bundle.identity());
    Ok((
        Agreement {
            shared_key,
            associated_data,
        },
        Initiation {
            base_key: ek.public(),
            signed_prekey_id: spk.id(),
            one_time_prekey_id: opk_id,
        },
    ))
}

/// Bob's side (§3.4). The caller looks up the prekeys named in `initiation`
/// and passes them; a mismatch is an error. On success the caller deletes the
/// one-time prekey's secret (§3.4: that is how one-time prekeys are consumed).
pub fn respond(
    me: &IdentityKeyPair,
    my_name: &Username,
    signed_prekey: &SignedPrekeyPair,
    one_time_prekey: Option<&OneTimePrekeyPair>,
    their_identity: &PublicIdentity,
    their_name: &Username,
    initiation: &Initiation,
) -> Result<Agreement, KeyError> {
    if initiation.signed_prekey_id != signed_prekey.id() {
        return Err(KeyError::UnknownPrekey(initiation.signed_prekey_id));
    }
    match (initiation.one_time_prekey_id, one_time_prekey) {
        (None, None) => {}
        (Some(id), Some(opk)) if id == opk.id() => {}
        (Some(id), _) => return Err(KeyError::UnknownPrekey(id)),
        (None, Some(opk)) => return Err(KeyError::UnknownPrekey(opk.id())),
    }
    initiation.base_key.check_torsion_free()?;
    let ek = &initiation.base_key;
    let dh1 = signed_prekey.keypair().agree(their_identity.dh_key())?;
    let dh2 = me.dh().agree(ek)?;
    let dh3 = signed_prekey.keypair().agree(ek)?;
    let shared_key = match one_time_prekey {
        Some(opk) => {
            let dh4 = opk.keypair().agree(ek)?;
            kdf(&[&dh1, &dh2, &dh3, &dh4])
        }
        None => kdf(&[&dh1, &dh2, &dh3]),
    };
    let associated_data = AssociatedData::new(their_name, their_identity, my_name, me.public());
    Ok(Agreement {
        shared_key,
        associated_data,
    })
}

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::X25519_LOW_ORDER_POINTS;
    use rand::SeedableRng;

    use super::*;
    use crate::prekey::{PrekeyIdCounter, SignedPrekey};

    struct Bob {
        id: IdentityKeyPair,
        spk: SignedPrekeyPair,
        opk: OneTimePrekeyPair,
    }

    fn bob(rng: &mut rand::rngs::StdRng) -> Bob {
        let id = IdentityKeyPair::generate(rng);
        let spk = SignedPrekeyPair::generate(&id, &mut PrekeyIdCounter::new(), rng).unwrap();
        let opk = OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::restore(7), 1, rng)
            .unwrap()
            .remove(0);
        Bob { id, spk, opk }
    }

    fn names() -> (Username, Username) {
        (
            Username::parse("alice").unwrap(),
            Username::parse("bob").unwrap(),
        )
    }

    #[test]
    fn both_sides_agree_with_and_without_opk() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let (an, bn) = names();
        let alice = IdentityKeyPair::generate(&mut rng);
        let b = bob(&mut rng);
        for with_opk in [false, true] {
            let opk = with_opk.then(|| b.opk.public());
            let bundle =
                VerifiedBundle::verify(b.id.public().clone(), *b.spk.public(), opk).unwrap();
            let (a_agree, init) = initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
            assert_eq!(init.one_time_prekey_id.is_some(), with_opk);
            let b_agree = respond(
                &b.id,
                &bn,
                &b.spk,
                with_opk.then_some(&b.opk),
                alice.public(),
                &an,
                &init,
            )
            .unwrap();
            assert_eq!(a_agree.shared_key, b_agree.shared_key);
            assert_eq!(a_agree.associated_data, b_agree.associated_data);
        }
    }

    #[test]
    fn wrong_prekey_ids_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let (an, bn) = names();
        let alice = IdentityKeyPair::generate(&mut rng);
        let b = bob(&mut rng);
        let bundle =
            VerifiedBundle::verify(b.id.public().clone(), *b.spk.public(), Some(b.opk.public()))
                .unwrap();
        let (_, init) = initiate(&mut rng, &alice, &an, &bundle, &bn).unwrap();
        assert!(respond(&b.id, &bn, &b.spk, None, alice.public(), &an, &init).is_err());
        let mut wrong = init;
        wrong.signed_prekey_id += 1;
        assert!(
            respond(
                &b.id,
                &bn,
                &b.spk,
                Some(&b.opk),
                alice.public(),
                &an,
                &wrong
            )
            .is_err()
        );
    }

    /// T-06: each low-order point and the zero key as peer IK, SPK, OPK, EK:
    /// a typed error every time, never an agreement. (Ratchet keys: see ratchet.rs.)
    #[test]
    fn low_order_keys_refused_everywhere() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let (an, bn) = names();
        let alice = IdentityKeyPair::generate(&mut rng);
        let b = bob(&mut rng);
        let mut bad: Vec<[u8; 32]> = X25519_LOW_ORDER_POINTS
            .iter()
            .map(|p| p.to_bytes())
            .collect();
        bad.push([0u8; 32]);
        let mut errors = 0;
        for raw in &bad {
            let Ok(point) = DhPublicKey::from_bytes(*raw) else {
                errors += 4; // refused at parse in every position
                continue;
            };
            // As Bob's SPK (Bob "signed" it: a malicious Bob or server-forged bundle
            // with a valid signature).
            let spk_bad = SignedPrekey::from_bytes(&{
                let mut v = b.spk.public().to_bytes();
                v[4..36].copy_from_slice(point.as_bytes());
                v
            })
            .unwrap();
            let sig = b.id.sign(
                crate::identity::SigningContext::SignedPrekey,
                &signed_msg(spk_bad.id(), &point),
            );
            let spk_bad = SignedPrekey::from_bytes(&{
                let mut v = spk_bad.to_bytes();
                v[36..].copy_from_slice(&sig);
                v
            })
            .unwrap();
            let bundle = VerifiedBundle::verify(b.id.public().clone(), spk_bad, None).unwrap();
            assert!(initiate(&mut rng, &alice, &an, &bundle, &bn).is_err());
            errors += 1;
            // As Bob's OPK.
            let opk_bad = crate::prekey::OneTimePrekey::from_bytes(&{
                let mut v = 9u32.to_be_bytes().to_vec();
                v.extend_from_slice(point.as_bytes());
                v
            })
            .unwrap();
            let bundle =
                VerifiedBundle::verify(b.id.public().clone(), *b.spk.public(), Some(opk_bad))
                    .unwrap();
            assert!(initiate(&mut rng, &alice, &an, &bundle, &bn).is_err());
            errors += 1;
            // As Alice's EK, seen by Bob.
            let init = Initiation {
                base_key: point,
                signed_prekey_id: b.spk.id(),
                one_time_prekey_id: None,
            };
            assert!(respond(&b.id, &bn, &b.spk, None, alice.public(), &an, &init).is_err());
            errors += 1;
            // As Alice's X25519 identity key seen by Bob: the DH with it is checked.
            let evil = DhKeyPair::from_secret_bytes([3; 32]);
            assert!(evil.agree(&point).is_err());
            errors += 1;
        }
        assert_eq!(errors, bad.len() * 4);
    }

    fn signed_msg(id: u32, key: &DhPublicKey) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(key.as_bytes());
        m
    }
}
