//! Passphrases and where they come from.
//!
//! The library never reads a terminal, a file or the environment for a
//! passphrase: it asks a [`PassphraseSource`] the caller supplies, and only
//! once it knows the passphrase is needed (so an uninitialised home is
//! reported as such, before anyone is asked to type anything).

use core::fmt;

use messenger_crypto::identity::Username;
use thiserror::Error;
use zeroize::Zeroizing;

/// A passphrase. Wiped on drop, prints as `Passphrase(..)`.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase. Take the `String` straight from where it was read,
    /// so no unwiped copy is left behind.
    pub fn new(passphrase: String) -> Self {
        Self(Zeroizing::new(passphrase))
    }

    /// The passphrase as UTF-8 text.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the passphrase is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Zeroizing<String>> for Passphrase {
    fn from(passphrase: Zeroizing<String>) -> Self {
        Self(passphrase)
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// What a passphrase is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PassphrasePurpose {
    /// The passphrase of an existing identity, to unlock it.
    Unlock,
    /// The passphrase for a new identity (`init`). An interactive source
    /// should ask twice and compare.
    Create,
    /// The new passphrase when changing it (`passwd`). An interactive source
    /// should ask twice and compare.
    Change,
}

/// Supplies passphrases on request: a terminal prompt, a file, an
/// environment variable, or a fixed value in tests. Implemented by the CLI.
pub trait PassphraseSource {
    /// Returns the passphrase for `purpose` on the identity called `name`.
    fn passphrase(
        &mut self,
        purpose: PassphrasePurpose,
        name: &Username,
    ) -> Result<Passphrase, PassphraseError>;
}

/// A fixed passphrase answers every request with itself.
impl PassphraseSource for Passphrase {
    fn passphrase(
        &mut self,
        _purpose: PassphrasePurpose,
        _name: &Username,
    ) -> Result<Passphrase, PassphraseError> {
        Ok(self.clone())
    }
}

/// Why a [`PassphraseSource`] could not supply a passphrase. Never carries
/// the passphrase or any part of it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PassphraseError {
    /// No way to obtain one: no file or variable given and no terminal to
    /// ask on. The text says where a passphrase can come from.
    #[error("no passphrase available: {0}")]
    Unavailable(String),
    /// The two entries of a new passphrase differ.
    #[error("the two passphrases do not match")]
    Mismatch,
    /// A source was found but could not be read.
    #[error("could not read the passphrase from {from}")]
    Read {
        /// Where it was read from: a path, a variable name, "the terminal".
        from: String,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A source held something that is not a usable passphrase (not UTF-8,
    /// too long). The text says which source and what is wrong, never the
    /// content.
    #[error("unusable passphrase from {from}: {reason}")]
    Invalid {
        /// Where it was read from.
        from: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let p = Passphrase::new("correct horse battery".to_owned());
        assert_eq!(format!("{p:?}"), "Passphrase(..)");
        assert_eq!(p.expose(), "correct horse battery");
        assert!(!p.is_empty());
        assert!(Passphrase::new(String::new()).is_empty());
    }

    #[test]
    fn fixed_source_answers_itself() {
        let name = Username::parse("alice").unwrap();
        let mut p = Passphrase::new("pw".to_owned());
        let got = p.passphrase(PassphrasePurpose::Change, &name).unwrap();
        assert_eq!(got.expose(), "pw");
    }
}
