//! Fixed-size secret byte strings that zeroize on drop and never print.

use core::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 32-byte secret (a root, chain, message or symmetric key).
///
/// It is wiped when dropped, compares in constant time and prints as
/// `Secret32(..)`. Copies are made only explicitly, through [`Clone`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    /// Wraps bytes that are already secret.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Borrows the secret bytes. Callers must not copy them out.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(..)")
    }
}

impl PartialEq for Secret32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret32 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_and_eq_compares() {
        let a = Secret32::from_bytes([0xAB; 32]);
        let b = Secret32::from_bytes([0xAB; 32]);
        let c = Secret32::from_bytes([0xAC; 32]);
        assert_eq!(format!("{a:?}"), "Secret32(..)");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
