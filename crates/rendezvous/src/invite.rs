//! Self-authenticating invitation tokens, so `rendezvous invite` works while
//! the server runs (the database is the server's alone).
//!
//! A token is `base64url(id ‖ tag)` without padding: a random 16-byte id and
//! `tag = HMAC-SHA256(invite key, id)`, 32 bytes; 64 characters in all. The
//! invite key is `HKDF-SHA256(salt = none, IKM = server secret key file,
//! info = "messenger/1 invite-token key")`, so whoever holds the data
//! directory can mint tokens and nobody else can. The server checks the tag in
//! constant time and records the id when a registration uses it, so each token
//! works once.
//!
//! A *reset token* has the same shape but its tag is
//! `HMAC-SHA256(invite key, "messenger/1 reset" ‖ 0x00 ‖ username ‖ 0x00 ‖ id)`:
//! it lets that one username register again with new keys (a user who lost
//! their key asks the operator). The MAC inputs of the two kinds differ in
//! length and prefix, so neither kind passes for the other.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use messenger_crypto::secret::Secret32;
use sha2::Sha256;

/// HKDF info of the invite key, distinct from every other derivation.
const INVITE_KEY_INFO: &[u8] = b"messenger/1 invite-token key";
/// Random id bytes per token: 128 bits, so ids never collide.
pub const INVITE_ID_LEN: usize = 16;
const TAG_LEN: usize = 32;

/// Derives the invite key from the server's secret key bytes.
pub fn invite_key(server_secret: &[u8]) -> Secret32 {
    let mut key = [0u8; 32];
    if Hkdf::<Sha256>::new(None, server_secret)
        .expand(INVITE_KEY_INFO, &mut key)
        .is_err()
    {
        key = [0; 32];
    }
    let out = Secret32::from_bytes(key);
    zeroize::Zeroize::zeroize(&mut key);
    out
}

fn mac(key: &Secret32) -> Option<Hmac<Sha256>> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose()).ok()
}

/// Mints a token.
pub fn make_token(key: &Secret32) -> Option<String> {
    mint(key, |_| {})
}

/// Prefix of a reset token's MAC input.
const RESET_CONTEXT: &[u8] = b"messenger/1 reset";

/// Checks a token's tag; returns its id when genuine.
pub fn check_token(key: &Secret32, token: &str) -> Option<[u8; INVITE_ID_LEN]> {
    check(key, token, |_| {})
}

/// Mints a reset token for `username` (already validated and lowercased).
pub fn make_reset_token(key: &Secret32, username: &str) -> Option<String> {
    mint(key, |m| reset_input(m, username))
}

/// Checks a reset token for `username`; returns its id when genuine.
pub fn check_reset_token(
    key: &Secret32,
    token: &str,
    username: &str,
) -> Option<[u8; INVITE_ID_LEN]> {
    check(key, token, |m| reset_input(m, username))
}

fn reset_input(m: &mut Hmac<Sha256>, username: &str) {
    m.update(RESET_CONTEXT);
    m.update(&[0]);
    m.update(username.as_bytes());
    m.update(&[0]);
}

/// A random id and its tag over `prefix ‖ id`, as unpadded base64url.
fn mint(key: &Secret32, prefix: impl FnOnce(&mut Hmac<Sha256>)) -> Option<String> {
    let id: [u8; INVITE_ID_LEN] = rand::random();
    let mut m = mac(key)?;
    prefix(&mut m);
    m.update(&id);
    let tag = m.finalize().into_bytes();
    let mut raw = Vec::with_capacity(INVITE_ID_LEN + TAG_LEN);
    raw.extend_from_slice(&id);
    raw.extend_from_slice(&tag);
    Some(URL_SAFE_NO_PAD.encode(raw))
}

fn check(
    key: &Secret32,
    token: &str,
    prefix: impl FnOnce(&mut Hmac<Sha256>),
) -> Option<[u8; INVITE_ID_LEN]> {
    if token.len() > 128 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    if raw.len() != INVITE_ID_LEN + TAG_LEN {
        return None;
    }
    let (id, tag) = raw.split_at(INVITE_ID_LEN);
    let mut m = mac(key)?;
    prefix(&mut m);
    m.update(id);
    m.verify_slice(tag).ok()?;
    id.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_under_their_key() {
        let key = invite_key(&[7u8; 64]);
        let token = make_token(&key).unwrap();
        assert_eq!(token.len(), 64);
        let id = check_token(&key, &token).unwrap();
        assert_ne!(make_token(&key).unwrap(), token);
        // Another server's key, a flipped character, a truncation: refused.
        assert!(check_token(&invite_key(&[8u8; 64]), &token).is_none());
        let mut bad = token.clone().into_bytes();
        bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
        assert!(check_token(&key, std::str::from_utf8(&bad).unwrap()).is_none());
        assert!(check_token(&key, &token[..63]).is_none());
        assert!(check_token(&key, "").is_none());
        assert_eq!(check_token(&key, &format!(" {token}\n")), Some(id));
    }

    #[test]
    fn reset_tokens_are_bound_to_their_user_and_kind() {
        let key = invite_key(&[7u8; 64]);
        let reset = make_reset_token(&key, "bob").unwrap();
        assert_eq!(reset.len(), 64);
        assert!(check_reset_token(&key, &reset, "bob").is_some());
        assert!(check_reset_token(&key, &reset, "alice").is_none());
        assert!(check_reset_token(&invite_key(&[8u8; 64]), &reset, "bob").is_none());
        // Neither kind passes for the other.
        assert!(check_token(&key, &reset).is_none());
        let invite = make_token(&key).unwrap();
        assert!(check_reset_token(&key, &invite, "bob").is_none());
    }
}
