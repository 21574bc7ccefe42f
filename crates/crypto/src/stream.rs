//! STREAM chunked file encryption, as age uses it.
//!
//! A file is encrypted under a fresh random [`FileKey`] that the sender ships
//! to the recipient inside an end-to-end encrypted 1:1 message. The ciphertext
//! is a 17-byte header followed by chunks:
//!
//! ```text
//! header = version (1 byte, = 1) ‖ nonce (16 random bytes)
//! payload key = HKDF-SHA256(salt = nonce, ikm = file key, info = PAYLOAD_KEY_LABEL)
//! chunk i = ChaCha20-Poly1305(payload key,
//!                             nonce = i as 11-byte big-endian ‖ last flag (0x01 or 0x00),
//!                             aad = empty, plaintext chunk i)
//! ```
//!
//! Every plaintext chunk is exactly [`CHUNK_LEN`] bytes except the final one,
//! which holds 1 to [`CHUNK_LEN`] bytes; it is empty only when the whole
//! plaintext is empty. Because the final chunk alone is sealed with the flag
//! byte `0x01` and every chunk's position is in its nonce, dropping,
//! reordering, duplicating or truncating chunks, or appending data after the
//! final one, all fail authentication or the framing checks. This is the
//! STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, "Online
//! Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance" (CRYPTO
//! 2015), instantiated as in the age v1 specification, section "Payload".
//!
//! Two layers are offered:
//!
//! * [`StreamEncryptor`] and [`StreamDecryptor`], a push-style core with no
//!   IO: the caller feeds chunks and says which is final (its framing knows).
//!   Both can start at any chunk index to resume an interrupted transfer.
//! * [`encrypt_stream`] and [`decrypt_stream`], adapters over
//!   [`std::io::Read`] / [`std::io::Write`] that hold one chunk in memory and
//!   find the final chunk by reading one byte ahead.
//!
//! A decryptor hands out a chunk's plaintext only after that chunk
//! authenticated, but the stream as a whole is verified only when the final
//! chunk has been accepted ([`StreamDecryptor::finish`], or `Ok` from
//! [`decrypt_stream`]). Callers write to a temporary file and move it into
//! place only then.

use core::fmt;
use std::io::{self, Read, Write};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::kdf::hkdf_sha256;
use crate::secret::Secret32;

/// Plaintext bytes in every chunk but the last: 64 KiB, as in age. Large
/// enough that the 16-byte tag and per-chunk setup cost little (0.02 %),
/// small enough that a streaming decryptor holds one chunk in memory and a
/// resumed transfer re-sends at most 64 KiB.
pub const CHUNK_LEN: usize = 64 * 1024;

/// Length of the Poly1305 tag that ends every encrypted chunk.
pub const TAG_LEN: usize = 16;

/// Bytes in every encrypted chunk but the last: [`CHUNK_LEN`] + [`TAG_LEN`].
pub const ENCRYPTED_CHUNK_LEN: usize = CHUNK_LEN + TAG_LEN;

/// The only stream format version this build reads and writes.
pub const STREAM_VERSION: u8 = 1;

/// Length of the random nonce in the header (the HKDF salt of the payload
/// key): 128 bits, as in age, so a file key reused by mistake still yields
/// an unrelated payload key.
pub const STREAM_NONCE_LEN: usize = 16;

/// Length of the stream header: version byte ‖ nonce.
pub const HEADER_LEN: usize = 1 + STREAM_NONCE_LEN;

/// The highest chunk index. The nonce has room for an 88-bit counter, but a
/// `u64` index already covers 2^80 bytes, far beyond any file; keeping the
/// index in a `u64` makes the limit explicit. Only a final chunk may use this
/// index, because no chunk could follow it.
pub const MAX_CHUNK_INDEX: u64 = u64::MAX;

/// HKDF `info` of the payload key. Messenger STREAM format, version 1; the
/// derivation is age v1's "Payload" section (`HKDF-SHA-256(ikm = file key,
/// salt = nonce, info = "payload")`) with our own versioned label.
const PAYLOAD_KEY_LABEL: &[u8] = b"messenger/1 stream payload";

/// Length of the ChaCha20-Poly1305 nonce: 11-byte counter ‖ flag byte.
const AEAD_NONCE_LEN: usize = 12;

/// Flag byte of the final chunk's nonce.
const LAST_FLAG: u8 = 0x01;

/// Flag byte of every other chunk's nonce.
const NOT_LAST_FLAG: u8 = 0x00;

/// The random 32-byte key of one file.
///
/// Generate a new one for every file and never encrypt two different
/// plaintexts under one key. It is wiped when dropped and prints as
/// `FileKey(..)`.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(Secret32);

impl FileKey {
    /// Wraps key bytes received from the sender.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret32::from_bytes(bytes))
    }

    /// Draws a fresh key from `rng`.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_bytes(*bytes)
    }

    /// Borrows the key bytes, to seal them into a message for the recipient.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.expose()
    }
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(..)")
    }
}

/// Why a stream could not be encrypted or decrypted. Chunk indexes count
/// from 0; messages never contain key or plaintext bytes.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The header is not [`HEADER_LEN`] bytes.
    #[error("bad stream header: {len} bytes, expected {HEADER_LEN}")]
    BadHeader {
        /// Bytes found.
        len: usize,
    },
    /// The header names a format version this build does not know.
    #[error("unsupported stream version {version}")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The stream ended before its final chunk.
    #[error("stream truncated: no final chunk after {chunks} chunks")]
    Truncated {
        /// Chunks received before the end (counting from the stream start).
        chunks: u64,
    },
    /// A chunk failed authentication: it was modified, reordered, dropped or
    /// duplicated, or the key is wrong.
    #[error("chunk {index} failed authentication (tampered, reordered or wrong key)")]
    Tampered {
        /// The chunk's index.
        index: u64,
    },
    /// Data followed the final chunk.
    #[error("data after the final chunk {index}")]
    TrailingData {
        /// Index of the final chunk.
        index: u64,
    },
    /// An empty final chunk ended a non-empty stream.
    #[error("empty final chunk {index} in a non-empty stream")]
    EmptyFinalChunk {
        /// The chunk's index.
        index: u64,
    },
    /// A chunk is longer than a full chunk.
    #[error("chunk {index} is {len} bytes, more than the {max} allowed")]
    ChunkTooLarge {
        /// The chunk's index.
        index: u64,
        /// Its length (plaintext when encrypting, ciphertext when decrypting).
        len: usize,
        /// The largest allowed length.
        max: usize,
    },
    /// A chunk that is not final is shorter than a full chunk.
    #[error("non-final chunk {index} is {len} bytes, expected {expected}")]
    ChunkTooShort {
        /// The chunk's index.
        index: u64,
        /// Its length (plaintext when encrypting, ciphertext when decrypting).
        len: usize,
        /// The required length.
        expected: usize,
    },
    /// A non-final chunk would take the last index, so nothing could follow.
    #[error("chunk counter overflow at chunk {index}")]
    CounterOverflow {
        /// The chunk's index.
        index: u64,
    },
    /// Reading the input or writing the output failed.
    #[error("stream i/o failed")]
    Io(#[from] io::Error),
}

/// Encrypts a stream chunk by chunk.
///
/// Every chunk but the last must hold exactly [`CHUNK_LEN`] plaintext bytes.
#[derive(Debug)]
pub struct StreamEncryptor {
    chunks: ChunkCipher,
    index: u64,
    finished: bool,
}

impl StreamEncryptor {
    /// Starts a new stream under `key` with a fresh random nonce. Returns the
    /// encryptor and the header to send before the first chunk.
    pub fn new<R: CryptoRng + ?Sized>(key: &FileKey, rng: &mut R) -> (Self, [u8; HEADER_LEN]) {
        let mut nonce = [0u8; STREAM_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let header = encode_header(&nonce);
        let encryptor = Self {
            chunks: ChunkCipher::new(key, &nonce),
            index: 0,
            finished: false,
        };
        (encryptor, header)
    }

    /// Continues an interrupted stream at chunk `index`, under the `header`
    /// it started with, so the chunks before `index` need not be sent again.
    ///
    /// The plaintext from chunk `index` on must be byte-for-byte the one the
    /// original encryption used: the same key, nonce and index over other
    /// bytes would reuse a ChaCha20-Poly1305 nonce. If the file may have
    /// changed, start a new stream under a new [`FileKey`] instead.
    pub fn resume(key: &FileKey, header: &[u8], index: u64) -> Result<Self, StreamError> {
        let nonce = decode_header(header)?;
        Ok(Self {
            chunks: ChunkCipher::new(key, &nonce),
            index,
            finished: false,
        })
    }

    /// Index of the next chunk to encrypt.
    pub fn next_index(&self) -> u64 {
        self.index
    }

    /// Whether the final chunk has been encrypted.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Encrypts the next chunk, `last` marking the final one. Returns
    /// [`TAG_LEN`] more bytes than `plaintext`.
    pub fn encrypt_chunk(&mut self, plaintext: &[u8], last: bool) -> Result<Vec<u8>, StreamError> {
        self.check(plaintext.len(), last)?;
        let mut chunk = Vec::with_capacity(plaintext.len() + TAG_LEN);
        chunk.extend_from_slice(plaintext);
        self.chunks.seal(self.index, last, &mut chunk);
        self.advance(last);
        Ok(chunk)
    }

    /// Like [`encrypt_chunk`](Self::encrypt_chunk) but in place: `chunk`
    /// holds the plaintext and on success the ciphertext (it grows by
    /// [`TAG_LEN`]). On error it is left as it was.
    pub fn encrypt_chunk_in_place(
        &mut self,
        chunk: &mut Vec<u8>,
        last: bool,
    ) -> Result<(), StreamError> {
        self.check(chunk.len(), last)?;
        self.chunks.seal(self.index, last, chunk);
        self.advance(last);
        Ok(())
    }

    fn check(&self, len: usize, last: bool) -> Result<(), StreamError> {
        let index = self.index;
        if self.finished {
            return Err(StreamError::TrailingData { index });
        }
        if len > CHUNK_LEN {
            return Err(StreamError::ChunkTooLarge {
                index,
                len,
                max: CHUNK_LEN,
            });
        }
        if !last && len != CHUNK_LEN {
            return Err(StreamError::ChunkTooShort {
                index,
                len,
                expected: CHUNK_LEN,
            });
        }
        check_position(index, len, last)
    }

    fn advance(&mut self, last: bool) {
        if last {
            self.finished = true;
        } else {
            // `check_position` refused a non-final chunk at MAX_CHUNK_INDEX.
            self.index += 1;
        }
    }
}

/// Decrypts a stream chunk by chunk.
///
/// The caller's framing says which chunk is final: a chunk is accepted as
/// final only if it was sealed as final, so a stream cut at a chunk boundary
/// is caught, and [`finish`](Self::finish) fails until a final chunk has been
/// accepted. A failed chunk leaves the decryptor unchanged.
#[derive(Debug)]
pub struct StreamDecryptor {
    chunks: ChunkCipher,
    index: u64,
    finished: bool,
}

impl StreamDecryptor {
    /// Starts decrypting the stream that begins with `header`.
    pub fn new(key: &FileKey, header: &[u8]) -> Result<Self, StreamError> {
        Self::resume(key, header, 0)
    }

    /// Starts at chunk `index` of the stream that begins with `header`, to
    /// continue a transfer whose earlier chunks were already verified.
    pub fn resume(key: &FileKey, header: &[u8], index: u64) -> Result<Self, StreamError> {
        let nonce = decode_header(header)?;
        Ok(Self {
            chunks: ChunkCipher::new(key, &nonce),
            index,
            finished: false,
        })
    }

    /// Index of the next chunk expected.
    pub fn next_index(&self) -> u64 {
        self.index
    }

    /// Whether the final chunk has been accepted.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Authenticates and decrypts the next chunk; `last` says whether the
    /// framing marks it final.
    pub fn decrypt_chunk(&mut self, ciphertext: &[u8], last: bool) -> Result<Vec<u8>, StreamError> {
        self.check(ciphertext.len(), last)?;
        let mut chunk = ciphertext.to_vec();
        self.open_and_advance(&mut chunk, last)?;
        Ok(chunk)
    }

    /// Like [`decrypt_chunk`](Self::decrypt_chunk) but in place: `chunk`
    /// holds the ciphertext and on success the plaintext. On error it still
    /// holds the ciphertext.
    pub fn decrypt_chunk_in_place(
        &mut self,
        chunk: &mut Vec<u8>,
        last: bool,
    ) -> Result<(), StreamError> {
        self.check(chunk.len(), last)?;
        self.open_and_advance(chunk, last)
    }

    /// Confirms the stream ended with its final chunk.
    pub fn finish(self) -> Result<(), StreamError> {
        if self.finished {
            Ok(())
        } else {
            Err(StreamError::Truncated { chunks: self.index })
        }
    }

    fn check(&self, len: usize, last: bool) -> Result<(), StreamError> {
        let index = self.index;
        if self.finished {
            return Err(StreamError::TrailingData { index });
        }
        if len > ENCRYPTED_CHUNK_LEN {
            return Err(StreamError::ChunkTooLarge {
                index,
                len,
                max: ENCRYPTED_CHUNK_LEN,
            });
        }
        if last && len < TAG_LEN {
            // Cut inside the final chunk's tag.
            return Err(StreamError::Truncated { chunks: index });
        }
        if !last && len != ENCRYPTED_CHUNK_LEN {
            return Err(StreamError::ChunkTooShort {
                index,
                len,
                expected: ENCRYPTED_CHUNK_LEN,
            });
        }
        // Both branches above leave `len >= TAG_LEN`.
        check_position(index, len - TAG_LEN, last)
    }

    fn open_and_advance(&mut self, chunk: &mut Vec<u8>, last: bool) -> Result<(), StreamError> {
        let index = self.index;
        if self.chunks.open(index, last, chunk).is_ok() {
            if last {
                self.finished = true;
            } else {
                self.index += 1;
            }
            return Ok(());
        }
        // Name the failure precisely when a full chunk is genuine but carries
        // the other flag: the stream was cut after it, or went on past it.
        if chunk.len() == ENCRYPTED_CHUNK_LEN && self.chunks.authenticates(index, !last, chunk) {
            return Err(if last {
                StreamError::Truncated { chunks: index + 1 }
            } else {
                StreamError::TrailingData { index }
            });
        }
        Err(StreamError::Tampered { index })
    }
}

/// Encrypts everything `reader` yields under `key` into `writer`: the header,
/// then the chunks. Holds one chunk in memory. Returns the number of
/// plaintext bytes encrypted.
pub fn encrypt_stream<R, In, Out>(
    key: &FileKey,
    rng: &mut R,
    reader: &mut In,
    writer: &mut Out,
) -> Result<u64, StreamError>
where
    R: CryptoRng + ?Sized,
    In: Read + ?Sized,
    Out: Write + ?Sized,
{
    let (mut encryptor, header) = StreamEncryptor::new(key, rng);
    writer.write_all(&header)?;
    // Plaintext passes through this buffer; wipe it when done.
    let mut buf = Zeroizing::new(Vec::with_capacity(ENCRYPTED_CHUNK_LEN + 1));
    let mut carry = None;
    let mut total = 0u64;
    loop {
        buf.clear();
        buf.extend(carry.take());
        // One byte past a full chunk tells whether this chunk is the last.
        read_up_to(reader, &mut buf, CHUNK_LEN + 1)?;
        let last = buf.len() <= CHUNK_LEN;
        if !last {
            carry = buf.pop();
        }
        total += buf.len() as u64;
        encryptor.encrypt_chunk_in_place(&mut buf, last)?;
        writer.write_all(&buf)?;
        if last {
            writer.flush()?;
            return Ok(total);
        }
    }
}

/// Decrypts a stream made by [`encrypt_stream`] from `reader` into `writer`.
/// Holds one chunk in memory and writes a chunk only after it authenticated.
/// Returns the number of plaintext bytes written.
///
/// On error, `writer` may already hold the plaintext of the chunks before
/// the bad one; the output is complete and genuine only when this returns
/// `Ok`.
pub fn decrypt_stream<In, Out>(
    key: &FileKey,
    reader: &mut In,
    writer: &mut Out,
) -> Result<u64, StreamError>
where
    In: Read + ?Sized,
    Out: Write + ?Sized,
{
    let mut header = Vec::with_capacity(HEADER_LEN);
    read_up_to(reader, &mut header, HEADER_LEN)?;
    let mut decryptor = StreamDecryptor::new(key, &header)?;
    // Plaintext passes through this buffer; wipe it when done.
    let mut buf = Zeroizing::new(Vec::with_capacity(ENCRYPTED_CHUNK_LEN + 1));
    let mut carry = None;
    let mut total = 0u64;
    loop {
        buf.clear();
        buf.extend(carry.take());
        read_up_to(reader, &mut buf, ENCRYPTED_CHUNK_LEN + 1)?;
        let last = buf.len() <= ENCRYPTED_CHUNK_LEN;
        if !last {
            carry = buf.pop();
        }
        decryptor.decrypt_chunk_in_place(&mut buf, last)?;
        total += buf.len() as u64;
        writer.write_all(&buf)?;
        if last {
            writer.flush()?;
            decryptor.finish()?;
            return Ok(total);
        }
    }
}

/// The payload key of one stream, ready to seal and open chunks. The AEAD
/// wipes its key on drop (the `zeroize` feature of `chacha20poly1305`).
struct ChunkCipher {
    aead: ChaCha20Poly1305,
}

impl ChunkCipher {
    fn new(key: &FileKey, nonce: &[u8; STREAM_NONCE_LEN]) -> Self {
        let mut payload_key = Zeroizing::new([0u8; 32]);
        hkdf_sha256(
            Some(nonce.as_slice()),
            key.expose(),
            PAYLOAD_KEY_LABEL,
            payload_key.as_mut(),
        );
        Self {
            aead: ChaCha20Poly1305::new(&Key::from(*payload_key)),
        }
    }

    /// Encrypts `chunk` in place and appends the tag.
    fn seal(&self, index: u64, last: bool, chunk: &mut Vec<u8>) {
        let nonce = chunk_nonce(index, last);
        // ChaCha20-Poly1305 refuses only messages near 256 GiB; chunks are
        // at most 64 KiB, so this always succeeds.
        match self
            .aead
            .encrypt_inout_detached(&nonce, &[], chunk.as_mut_slice().into())
        {
            Ok(tag) => chunk.extend_from_slice(&tag),
            Err(_) => {
                // Unreachable; never let unencrypted bytes out.
                chunk.clear();
                debug_assert!(false, "chunk too long for chacha20poly1305");
            }
        }
    }

    /// Checks and decrypts `chunk` (ciphertext ‖ tag) in place, leaving the
    /// plaintext; on failure `chunk` is unchanged.
    fn open(&self, index: u64, last: bool, chunk: &mut Vec<u8>) -> Result<(), ()> {
        let nonce = chunk_nonce(index, last);
        let body_len = chunk.len().checked_sub(TAG_LEN).ok_or(())?;
        let (body, tag) = chunk.split_at_mut(body_len);
        let tag = Tag::try_from(&*tag).map_err(|_| ())?;
        // Verifies the tag before it touches `body`.
        self.aead
            .decrypt_inout_detached(&nonce, &[], body.into(), &tag)
            .map_err(|_| ())?;
        chunk.truncate(body_len);
        Ok(())
    }

    /// Whether `chunk` authenticates at `index` with the given flag, without
    /// changing it. Used only to explain a failure.
    fn authenticates(&self, index: u64, last: bool, chunk: &[u8]) -> bool {
        let mut copy = Zeroizing::new(chunk.to_vec());
        self.open(index, last, &mut copy).is_ok()
    }
}

impl fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkCipher(..)")
    }
}

/// `index` as an 11-byte big-endian counter ‖ the flag byte.
fn chunk_nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; AEAD_NONCE_LEN];
    nonce[3..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = if last { LAST_FLAG } else { NOT_LAST_FLAG };
    Nonce::from(nonce)
}

/// The position rules shared by both directions: an empty final chunk only
/// at index 0, and a non-final chunk never at the last index.
fn check_position(index: u64, plaintext_len: usize, last: bool) -> Result<(), StreamError> {
    if last {
        if plaintext_len == 0 && index > 0 {
            return Err(StreamError::EmptyFinalChunk { index });
        }
    } else if index == MAX_CHUNK_INDEX {
        return Err(StreamError::CounterOverflow { index });
    }
    Ok(())
}

fn encode_header(nonce: &[u8; STREAM_NONCE_LEN]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = STREAM_VERSION;
    header[1..].copy_from_slice(nonce);
    header
}

fn decode_header(header: &[u8]) -> Result<[u8; STREAM_NONCE_LEN], StreamError> {
    let Some((&version, nonce)) = header.split_first() else {
        return Err(StreamError::BadHeader { len: 0 });
    };
    if version != STREAM_VERSION {
        return Err(StreamError::UnsupportedVersion { version });
    }
    nonce
        .try_into()
        .map_err(|_| StreamError::BadHeader { len: header.len() })
}

/// Appends bytes from `reader` to `buf` until it holds `limit` bytes or the
/// input ends.
fn read_up_to<In: Read + ?Sized>(
    reader: &mut In,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<()> {
    let mut filled = buf.len();
    buf.resize(limit, 0);
    while filled < limit {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.truncate(filled);
                return Err(e);
            }
        }
    }
    buf.truncate(filled);
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(0x5742)
    }

    fn key() -> FileKey {
        FileKey::from_bytes([0x42; 32])
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn encrypt_all(key: &FileKey, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let n = encrypt_stream(key, &mut rng(), &mut &plaintext[..], &mut out).unwrap();
        assert_eq!(n, plaintext.len() as u64);
        out
    }

    fn decrypt_all(key: &FileKey, ciphertext: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        let n = decrypt_stream(key, &mut &ciphertext[..], &mut out)?;
        assert_eq!(n, out.len() as u64);
        Ok(out)
    }

    /// Splits a ciphertext into its header and encrypted chunks.
    fn split(ciphertext: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (header, body) = ciphertext.split_at(HEADER_LEN);
        let chunks = body
            .chunks(ENCRYPTED_CHUNK_LEN)
            .map(<[u8]>::to_vec)
            .collect();
        (header.to_vec(), chunks)
    }

    fn join(header: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = header.to_vec();
        for c in chunks {
            out.extend_from_slice(c);
        }
        out
    }

    /// Encrypts with the push API, one `Vec` per chunk.
    fn push_encrypt(key: &FileKey, plaintext: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (mut enc, header) = StreamEncryptor::new(key, &mut rng());
        let mut chunks = Vec::new();
        let mut rest = plaintext;
        loop {
            let last = rest.len() <= CHUNK_LEN;
            let (this, tail) = rest.split_at(rest.len().min(CHUNK_LEN));
            chunks.push(enc.encrypt_chunk(this, last).unwrap());
            rest = tail;
            if last {
                break;
            }
        }
        assert!(enc.is_finished());
        (header.to_vec(), chunks)
    }

    /// Decrypts framed chunks with the push API; the last one is final.
    fn push_decrypt(
        key: &FileKey,
        header: &[u8],
        chunks: &[Vec<u8>],
    ) -> Result<Vec<u8>, StreamError> {
        let mut dec = StreamDecryptor::new(key, header)?;
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            out.extend(dec.decrypt_chunk(c, i + 1 == chunks.len())?);
        }
        dec.finish()?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_the_edges() {
        for len in [
            0,
            1,
            100,
            CHUNK_LEN - 1,
            CHUNK_LEN,
            CHUNK_LEN + 1,
            2 * CHUNK_LEN,
            3 * CHUNK_LEN + 7,
        ] {
            let plaintext = pattern(len);
            let ciphertext = encrypt_all(&key(), &plaintext);
            let chunks = len.div_ceil(CHUNK_LEN).max(1);
            assert_eq!(
                ciphertext.len(),
                HEADER_LEN + len + chunks * TAG_LEN,
                "len {len}"
            );
            assert_eq!(
                decrypt_all(&key(), &ciphertext).unwrap(),
                plaintext,
                "len {len}"
            );

            // The push API makes the same bytes and reads them back.
            let (header, pushed) = push_encrypt(&key(), &plaintext);
            assert_eq!(pushed.len(), chunks);
            assert_eq!(join(&header, &pushed), ciphertext, "len {len}");
            assert_eq!(push_decrypt(&key(), &header, &pushed).unwrap(), plaintext);
        }
    }

    #[test]
    fn full_sized_plaintext_ends_with_a_full_final_chunk() {
        let (_, chunks) = push_encrypt(&key(), &pattern(2 * CHUNK_LEN));
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|c| c.len() == ENCRYPTED_CHUNK_LEN));
    }

    // T-22, case 1: truncating the last chunk.
    #[test]
    fn truncation_is_detected() {
        let plaintext = pattern(2 * CHUNK_LEN + 100);
        let ciphertext = encrypt_all(&key(), &plaintext);
        let (header, chunks) = split(&ciphertext);

        // The final chunk dropped: a full chunk stands where the final one should.
        let cut = join(&header, &chunks[..2]);
        assert!(matches!(
            decrypt_all(&key(), &cut),
            Err(StreamError::Truncated { chunks: 2 })
        ));
        assert!(matches!(
            push_decrypt(&key(), &header, &chunks[..2]),
            Err(StreamError::Truncated { chunks: 2 })
        ));
        // Bytes cut off the final chunk.
        let short = &ciphertext[..ciphertext.len() - 1];
        assert!(matches!(
            decrypt_all(&key(), short),
            Err(StreamError::Tampered { index: 2 })
        ));
        // Cut inside the final chunk's tag, and right after the header.
        let in_tag = &ciphertext[..HEADER_LEN + 2 * ENCRYPTED_CHUNK_LEN + 5];
        assert!(matches!(
            decrypt_all(&key(), in_tag),
            Err(StreamError::Truncated { chunks: 2 })
        ));
        let bare = &ciphertext[..HEADER_LEN];
        assert!(matches!(
            decrypt_all(&key(), bare),
            Err(StreamError::Truncated { chunks: 0 })
        ));
        // The push API without a final chunk: finish refuses.
        let mut dec = StreamDecryptor::new(&key(), &header).unwrap();
        dec.decrypt_chunk(&chunks[0], false).unwrap();
        assert!(matches!(
            dec.finish(),
            Err(StreamError::Truncated { chunks: 1 })
        ));
    }

    // T-22, cases 2 to 4: drop, swap and duplicate chunks.
    #[test]
    fn reordering_is_detected() {
        let ciphertext = encrypt_all(&key(), &pattern(3 * CHUNK_LEN + 100));
        let (header, chunks) = split(&ciphertext);
        assert_eq!(chunks.len(), 4);
        let c = |order: &[usize]| order.iter().map(|&i| chunks[i].clone()).collect::<Vec<_>>();

        let dropped = c(&[0, 2, 3]);
        assert!(matches!(
            decrypt_all(&key(), &join(&header, &dropped)),
            Err(StreamError::Tampered { index: 1 })
        ));
        let swapped = c(&[1, 0, 2, 3]);
        assert!(matches!(
            decrypt_all(&key(), &join(&header, &swapped)),
            Err(StreamError::Tampered { index: 0 })
        ));
        let duplicated = c(&[0, 1, 1, 2, 3]);
        assert!(matches!(
            decrypt_all(&key(), &join(&header, &duplicated)),
            Err(StreamError::Tampered { index: 2 })
        ));
        assert!(matches!(
            push_decrypt(&key(), &header, &duplicated),
            Err(StreamError::Tampered { index: 2 })
        ));
    }

    // T-22, case 5: a chunk appended after the final one.
    #[test]
    fn data_after_the_final_chunk_is_detected() {
        // A full final chunk followed by anything: the final chunk is
        // recognised, so the error names the trailing data.
        let ciphertext = encrypt_all(&key(), &pattern(2 * CHUNK_LEN));
        let (header, chunks) = split(&ciphertext);
        let appended = join(
            &header,
            &[chunks[0].clone(), chunks[1].clone(), chunks[0].clone()],
        );
        assert!(matches!(
            decrypt_all(&key(), &appended),
            Err(StreamError::TrailingData { index: 1 })
        ));
        let mut one_byte = ciphertext.clone();
        one_byte.push(0);
        assert!(matches!(
            decrypt_all(&key(), &one_byte),
            Err(StreamError::TrailingData { index: 1 })
        ));

        // A short final chunk followed by another chunk fails as one chunk.
        let ciphertext = encrypt_all(&key(), &pattern(CHUNK_LEN + 100));
        let (header, chunks) = split(&ciphertext);
        let appended = join(
            &header,
            &[chunks[0].clone(), chunks[1].clone(), chunks[0].clone()],
        );
        assert!(matches!(
            decrypt_all(&key(), &appended),
            Err(StreamError::Tampered { index: 1 })
        ));

        // With framing, any chunk after the final one is trailing data.
        let mut dec = StreamDecryptor::new(&key(), &header).unwrap();
        dec.decrypt_chunk(&chunks[0], false).unwrap();
        dec.decrypt_chunk(&chunks[1], true).unwrap();
        assert!(matches!(
            dec.decrypt_chunk(&chunks[1], true),
            Err(StreamError::TrailingData { index: 1 })
        ));
        dec.finish().unwrap();
    }

    // T-22, case 6: every single-bit flip of a small ciphertext, header included.
    #[test]
    fn every_bit_flip_is_detected() {
        for len in [0, 100] {
            let ciphertext = encrypt_all(&key(), &pattern(len));
            for bit in 0..ciphertext.len() * 8 {
                let mut bad = ciphertext.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let err = decrypt_all(&key(), &bad).unwrap_err();
                if bit < 8 {
                    assert!(
                        matches!(err, StreamError::UnsupportedVersion { .. }),
                        "bit {bit}: {err}"
                    );
                } else {
                    assert!(
                        matches!(err, StreamError::Tampered { index: 0 }),
                        "bit {bit}: {err}"
                    );
                }
            }
        }
    }

    // T-22, case 7: an empty final chunk after a full chunk.
    #[test]
    fn empty_final_chunk_on_non_empty_stream_is_refused() {
        let plaintext = pattern(CHUNK_LEN);
        let (mut enc, header) = StreamEncryptor::new(&key(), &mut rng());
        let first = enc.encrypt_chunk(&plaintext, false).unwrap();
        // The encryptor refuses to make one...
        assert!(matches!(
            enc.encrypt_chunk(&[], true),
            Err(StreamError::EmptyFinalChunk { index: 1 })
        ));
        // ...so forge it with the raw chunk cipher; the decryptor refuses it.
        let nonce: [u8; STREAM_NONCE_LEN] = header[1..].try_into().unwrap();
        let mut empty = Vec::new();
        ChunkCipher::new(&key(), &nonce).seal(1, true, &mut empty);
        assert_eq!(empty.len(), TAG_LEN);
        let forged = join(&header, &[first.clone(), empty.clone()]);
        assert!(matches!(
            decrypt_all(&key(), &forged),
            Err(StreamError::EmptyFinalChunk { index: 1 })
        ));
        assert!(matches!(
            push_decrypt(&key(), &header, &[first, empty]),
            Err(StreamError::EmptyFinalChunk { index: 1 })
        ));
    }

    #[test]
    fn resume_gives_identical_chunks() {
        let plaintext = pattern(5 * CHUNK_LEN + 3);
        let (header, chunks) = push_encrypt(&key(), &plaintext);
        for k in 0..chunks.len() {
            let mut enc = StreamEncryptor::resume(&key(), &header, k as u64).unwrap();
            let mut dec = StreamDecryptor::resume(&key(), &header, k as u64).unwrap();
            for (i, expected) in chunks.iter().enumerate().skip(k) {
                let last = i + 1 == chunks.len();
                let start = i * CHUNK_LEN;
                let end = plaintext.len().min(start + CHUNK_LEN);
                let chunk = enc.encrypt_chunk(&plaintext[start..end], last).unwrap();
                assert_eq!(&chunk, expected, "resumed at {k}, chunk {i}");
                assert_eq!(
                    dec.decrypt_chunk(&chunk, last).unwrap(),
                    &plaintext[start..end]
                );
            }
            assert_eq!(dec.next_index(), chunks.len() as u64 - 1);
            dec.finish().unwrap();
        }
        // Resuming at the wrong index fails on the first chunk.
        let mut dec = StreamDecryptor::resume(&key(), &header, 2).unwrap();
        assert!(matches!(
            dec.decrypt_chunk(&chunks[3], false),
            Err(StreamError::Tampered { index: 2 })
        ));
    }

    #[test]
    fn wrong_key_fails() {
        for len in [0, 100, CHUNK_LEN + 1] {
            let ciphertext = encrypt_all(&key(), &pattern(len));
            let other = FileKey::from_bytes([0x43; 32]);
            assert!(matches!(
                decrypt_all(&other, &ciphertext),
                Err(StreamError::Tampered { index: 0 })
            ));
        }
    }

    #[test]
    fn failed_chunk_leaves_decryptor_and_buffer_unchanged() {
        let (header, chunks) = push_encrypt(&key(), &pattern(CHUNK_LEN + 10));
        let mut dec = StreamDecryptor::new(&key(), &header).unwrap();
        let mut bad = chunks[0].clone();
        bad[7] ^= 1;
        let kept = bad.clone();
        assert!(matches!(
            dec.decrypt_chunk_in_place(&mut bad, false),
            Err(StreamError::Tampered { index: 0 })
        ));
        assert_eq!(bad, kept);
        assert_eq!(dec.next_index(), 0);
        // The genuine chunk still decrypts afterwards.
        let mut good = chunks[0].clone();
        dec.decrypt_chunk_in_place(&mut good, false).unwrap();
        assert_eq!(good, pattern(CHUNK_LEN));
        assert_eq!(
            dec.decrypt_chunk(&chunks[1], true).unwrap(),
            pattern(CHUNK_LEN + 10)[CHUNK_LEN..]
        );
        assert!(dec.is_finished());
    }

    #[test]
    fn chunk_sizes_are_enforced() {
        let (mut enc, header) = StreamEncryptor::new(&key(), &mut rng());
        assert!(matches!(
            enc.encrypt_chunk(&pattern(CHUNK_LEN + 1), true),
            Err(StreamError::ChunkTooLarge { index: 0, len, max: CHUNK_LEN }) if len == CHUNK_LEN + 1
        ));
        assert!(matches!(
            enc.encrypt_chunk(&pattern(CHUNK_LEN - 1), false),
            Err(StreamError::ChunkTooShort { index: 0, .. })
        ));
        let full = enc.encrypt_chunk(&pattern(CHUNK_LEN), false).unwrap();
        enc.encrypt_chunk(&pattern(1), true).unwrap();
        assert!(matches!(
            enc.encrypt_chunk(&pattern(1), true),
            Err(StreamError::TrailingData { index: 1 })
        ));

        let mut dec = StreamDecryptor::new(&key(), &header).unwrap();
        let mut long = full.clone();
        long.push(0);
        assert!(matches!(
            dec.decrypt_chunk(&long, true),
            Err(StreamError::ChunkTooLarge { index: 0, .. })
        ));
        assert!(matches!(
            dec.decrypt_chunk(&full[..100], false),
            Err(StreamError::ChunkTooShort {
                index: 0,
                len: 100,
                ..
            })
        ));
        assert!(matches!(
            dec.decrypt_chunk(&full[..5], true),
            Err(StreamError::Truncated { chunks: 0 })
        ));
        dec.decrypt_chunk(&full, false).unwrap();
    }

    #[test]
    fn counter_overflow_is_an_error() {
        let (_, header) = StreamEncryptor::new(&key(), &mut rng());
        let mut enc = StreamEncryptor::resume(&key(), &header, MAX_CHUNK_INDEX).unwrap();
        assert!(matches!(
            enc.encrypt_chunk(&pattern(CHUNK_LEN), false),
            Err(StreamError::CounterOverflow {
                index: MAX_CHUNK_INDEX
            })
        ));
        // The last index still takes a final chunk, and the nonce carries it.
        let last = enc.encrypt_chunk(&pattern(3), true).unwrap();
        let mut dec = StreamDecryptor::resume(&key(), &header, MAX_CHUNK_INDEX).unwrap();
        assert_eq!(dec.decrypt_chunk(&last, true).unwrap(), pattern(3));
        let mut dec = StreamDecryptor::resume(&key(), &header, MAX_CHUNK_INDEX).unwrap();
        let full = vec![0; ENCRYPTED_CHUNK_LEN];
        assert!(matches!(
            dec.decrypt_chunk(&full, false),
            Err(StreamError::CounterOverflow { .. })
        ));
        assert_eq!(
            chunk_nonce(MAX_CHUNK_INDEX, true).as_slice(),
            [0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]
        );
        assert_eq!(
            chunk_nonce(1, false).as_slice(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let (_, header) = StreamEncryptor::new(&key(), &mut rng());
        assert!(matches!(
            StreamDecryptor::new(&key(), &[]),
            Err(StreamError::BadHeader { len: 0 })
        ));
        assert!(matches!(
            StreamDecryptor::new(&key(), &header[..HEADER_LEN - 1]),
            Err(StreamError::BadHeader { len: 16 })
        ));
        let mut long = header.to_vec();
        long.push(0);
        assert!(matches!(
            StreamDecryptor::new(&key(), &long),
            Err(StreamError::BadHeader { len: 18 })
        ));
        let mut v2 = header;
        v2[0] = 2;
        assert!(matches!(
            StreamEncryptor::resume(&key(), &v2, 0),
            Err(StreamError::UnsupportedVersion { version: 2 })
        ));
        assert!(matches!(
            decrypt_all(&key(), &header[..3]),
            Err(StreamError::BadHeader { len: 3 })
        ));
    }

    #[test]
    fn io_errors_are_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = encrypt_stream(&key(), &mut rng(), &mut &b"abc"[..], &mut Broken).unwrap_err();
        assert!(matches!(err, StreamError::Io(_)));
        let ciphertext = encrypt_all(&key(), b"abc");
        let err = decrypt_stream(&key(), &mut &ciphertext[..], &mut Broken).unwrap_err();
        assert!(matches!(err, StreamError::Io(_)));
    }

    #[test]
    fn secrets_do_not_print() {
        let key = FileKey::generate(&mut rng());
        assert_ne!(key, FileKey::generate(&mut StdRng::seed_from_u64(1)));
        let (enc, header) = StreamEncryptor::new(&key, &mut rng());
        let dec = StreamDecryptor::new(&key, &header).unwrap();
        let hex_key = hex::encode(key.expose());
        for text in [format!("{key:?}"), format!("{enc:?}"), format!("{dec:?}")] {
            assert!(!text.contains(&hex_key), "{text}");
            assert!(!text.contains(&hex_key.to_uppercase()), "{text}");
        }
        assert_eq!(format!("{key:?}"), "FileKey(..)");
        let message = StreamError::Tampered { index: 3 }.to_string();
        assert_eq!(message, message.to_lowercase());
    }

    /// Hands out at most `step` bytes per read, to exercise short reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_lengths_round_trip(len in 0..3 * CHUNK_LEN + 2, step in 1usize..100_000, seed: u64) {
            let plaintext: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
            let key = FileKey::generate(&mut StdRng::seed_from_u64(seed));
            let mut ciphertext = Vec::new();
            encrypt_stream(&key, &mut rng(), &mut Trickle { data: &plaintext, step }, &mut ciphertext).unwrap();
            let mut out = Vec::new();
            decrypt_stream(&key, &mut Trickle { data: &ciphertext, step }, &mut out).unwrap();
            prop_assert_eq!(out, plaintext);
        }
    }
}
