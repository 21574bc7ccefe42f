//! Where the CLI gets passphrases: a file, an environment variable, or a
//! terminal prompt without echo, in that order. Never argv.

use std::env;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};

use messenger_client::{
    Passphrase, PassphraseError, PassphrasePurpose, PassphraseSource, Username,
};
use zeroize::Zeroizing;

use crate::args::{NEW_PASSPHRASE_ENV, PASSPHRASE_ENV};

/// Largest passphrase file read. Passphrases are a line of text; the cap
/// keeps a wrong `--passphrase-file` (a disk image, `/dev/zero`) from being
/// read into memory whole.
pub(crate) const MAX_PASSPHRASE_FILE_LEN: usize = 64 * 1024;

/// The CLI's [`PassphraseSource`]. The current passphrase comes from
/// `--passphrase-file`, then `MESSENGER_PASSPHRASE`, then a prompt; a new
/// passphrase for `passwd` from `--new-passphrase-file`, then
/// `MESSENGER_NEW_PASSPHRASE`, then a prompt asked twice. A new identity's
/// passphrase (`init`) comes from the same places as the current one, asked
/// twice when prompted. Prompts happen only when standard input is a
/// terminal, so a script without one fails at once instead of hanging.
#[derive(Debug)]
pub(crate) struct CliPassphrases {
    file: Option<PathBuf>,
    new_file: Option<PathBuf>,
}

impl CliPassphrases {
    pub(crate) fn new(file: Option<PathBuf>, new_file: Option<PathBuf>) -> Self {
        Self { file, new_file }
    }
}

/// A new passphrase shorter than this many characters is taken, with a
/// warning: whoever copies the home can try guesses offline, and argon2id
/// slows each guess but cannot save a short passphrase.
pub(crate) const ADVISED_PASSPHRASE_CHARS: usize = 12;

/// The warning for a new passphrase of `chars` characters, if it is short;
/// `later` adds how to change it afterwards (not said by `passwd` itself).
pub(crate) fn short_passphrase_warning(chars: usize, later: bool) -> Option<String> {
    (chars < ADVISED_PASSPHRASE_CHARS).then(|| {
        let how = if later {
            " (change it with `messenger passwd`)"
        } else {
            ""
        };
        format!(
            "warning: a passphrase of {chars} characters can be guessed by whoever copies your home; \
             {ADVISED_PASSPHRASE_CHARS} or more characters (or four words) are much safer{how}"
        )
    })
}

impl PassphraseSource for CliPassphrases {
    fn passphrase(
        &mut self,
        purpose: PassphrasePurpose,
        name: &Username,
    ) -> Result<Passphrase, PassphraseError> {
        let passphrase = self.find(purpose, name)?;
        if matches!(
            purpose,
            PassphrasePurpose::Create | PassphrasePurpose::Change
        ) && !passphrase.is_empty()
            && let Some(warning) = short_passphrase_warning(
                passphrase.expose().chars().count(),
                purpose == PassphrasePurpose::Create,
            )
        {
            eprintln!("{warning}");
        }
        Ok(passphrase)
    }
}

impl CliPassphrases {
    /// The passphrase from the first place that has one.
    fn find(
        &mut self,
        purpose: PassphrasePurpose,
        name: &Username,
    ) -> Result<Passphrase, PassphraseError> {
        let (file, flag, var) = match purpose {
            PassphrasePurpose::Change => {
                (&self.new_file, "--new-passphrase-file", NEW_PASSPHRASE_ENV)
            }
            _ => (&self.file, "--passphrase-file", PASSPHRASE_ENV),
        };
        if let Some(path) = file {
            return read_file(path);
        }
        if let Some(value) = env::var_os(var) {
            return from_env(var, value);
        }
        if !io::stdin().is_terminal() {
            return Err(PassphraseError::Unavailable(format!(
                "standard input is not a terminal, and neither {flag} nor {var} is given"
            )));
        }
        prompt(purpose, name)
    }
}

/// Reads a passphrase file: its contents, less one trailing `\n` or `\r\n`.
fn read_file(path: &Path) -> Result<Passphrase, PassphraseError> {
    let from = || path.display().to_string();
    let read_error = |source| PassphraseError::Read {
        from: from(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    // Room for one byte past the cap, allocated once, so no unwiped copy is
    // left behind by a reallocation.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE_FILE_LEN + 1));
    file.take(MAX_PASSPHRASE_FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > MAX_PASSPHRASE_FILE_LEN {
        return Err(PassphraseError::Invalid {
            from: from(),
            reason: "the file is larger than 64 KiB",
        });
    }
    let mut text = match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Zeroizing::new(text),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            return Err(PassphraseError::Invalid {
                from: from(),
                reason: "not UTF-8 text",
            });
        }
    };
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Passphrase::from(text))
}

fn from_env(var: &str, value: OsString) -> Result<Passphrase, PassphraseError> {
    match value.into_string() {
        Ok(text) => Ok(Passphrase::new(text)),
        Err(raw) => {
            drop(Zeroizing::new(raw.into_encoded_bytes()));
            Err(PassphraseError::Invalid {
                from: var.to_owned(),
                reason: "not UTF-8 text",
            })
        }
    }
}

fn prompt(purpose: PassphrasePurpose, name: &Username) -> Result<Passphrase, PassphraseError> {
    let ask = |text: String| {
        rpassword::prompt_password(text)
            .map(Passphrase::new)
            .map_err(|source| PassphraseError::Read {
                from: "the terminal".to_owned(),
                source,
            })
    };
    match purpose {
        PassphrasePurpose::Unlock => ask(format!("passphrase for {name}: ")),
        _ => {
            let first = ask(format!("new passphrase for {name}: "))?;
            let second = ask("repeat the new passphrase: ".to_owned())?;
            if first.expose() != second.expose() {
                return Err(PassphraseError::Mismatch);
            }
            Ok(first)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_with(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        f
    }

    #[test]
    fn file_loses_one_trailing_newline() {
        for (contents, expected) in [
            (&b"pw"[..], "pw"),
            (b"pw\n", "pw"),
            (b"pw\r\n", "pw"),
            (b"pw\n\n", "pw\n"),
            (b" pw \n", " pw "),
            (b"", ""),
        ] {
            let f = file_with(contents);
            assert_eq!(read_file(f.path()).unwrap().expose(), expected);
        }
    }

    #[test]
    fn file_limits() {
        let f = file_with(&vec![b'a'; MAX_PASSPHRASE_FILE_LEN]);
        assert_eq!(
            read_file(f.path()).unwrap().expose().len(),
            MAX_PASSPHRASE_FILE_LEN
        );
        let f = file_with(&vec![b'a'; MAX_PASSPHRASE_FILE_LEN + 1]);
        assert!(matches!(
            read_file(f.path()),
            Err(PassphraseError::Invalid { .. })
        ));
        let f = file_with(b"\xff\xfe");
        assert!(matches!(
            read_file(f.path()),
            Err(PassphraseError::Invalid { .. })
        ));
        let err = read_file(Path::new("/nonexistent/passphrase")).unwrap_err();
        assert!(matches!(err, PassphraseError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/passphrase"), "{err}");
    }

    #[test]
    fn errors_never_quote_the_passphrase() {
        let f = file_with(&[b"secret-passphrase\xff".as_slice()].concat());
        let err = read_file(f.path()).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("secret"), "{err:?}");
    }
}
