//! Protocol constants and length-prefixed framing.
//!
//! A frame on a stream is
//!
//! | bytes | field                                             |
//! |-------|---------------------------------------------------|
//! | 4     | body length `n`, `u32` big-endian, `1..=MAX_FRAME_LEN` |
//! | `n`   | postcard body                                     |
//!
//! [`encode`] writes one frame; [`FrameDecoder`] takes stream bytes in
//! pieces of any size and hands back whole bodies; [`decode`] turns one body
//! into a message, refusing trailing bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// ALPN protocol name offered and required on every QUIC connection.
///
/// A peer that does not speak this name fails the TLS handshake instead of
/// misreading frames. The trailing `1` changes only with an incompatible
/// framing or handshake.
pub const ALPN: &[u8] = b"messenger/1";

/// Version of the message set carried inside frames, exchanged in the first
/// request of a connection.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of the length prefix in front of every frame body.
pub const LEN_PREFIX: usize = 4;

/// Largest frame body in bytes (the 4-byte prefix not included): 256 KiB.
///
/// The largest thing a frame must carry is an envelope: at most 64 KiB of
/// padded ciphertext plus routing fields (addresses, ids, timestamps, a
/// signature), which are well under 1 KiB. Prekey bundles, rosters and error
/// replies are far smaller. 256 KiB leaves four times headroom for a future
/// batched mailbox delivery while capping what one hostile or broken peer can
/// make the other side buffer per stream. Files never travel in one frame:
/// they go as STREAM chunks, each its own envelope.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

const _: () = assert!(MAX_FRAME_LEN <= u32::MAX as usize);

/// Why a frame could not be written or read.
///
/// Any error while reading a stream means the stream can no longer be
/// trusted to be in step: the connection carrying it is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The body is longer than [`MAX_FRAME_LEN`] (declared by a peer, or
    /// produced by [`encode`]).
    #[error("frame body of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Length declared or produced.
        len: usize,
        /// The limit, [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A frame declares, or a message encodes to, a body of zero bytes.
    #[error("frame body is empty")]
    Empty,
    /// The stream ended part-way through a frame.
    #[error("stream ended inside a frame ({buffered} bytes of it were received)")]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// The body held a complete message followed by extra bytes.
    #[error("frame body has {count} bytes left over after the message")]
    TrailingBytes {
        /// Number of unread bytes.
        count: usize,
    },
    /// The body is not a valid encoding of the expected message.
    #[error("frame body is not a valid message")]
    Malformed(#[source] postcard::Error),
    /// The message could not be serialised.
    #[error("message could not be encoded")]
    Encode(#[source] postcard::Error),
}

/// Encodes `value` as one frame: length prefix ‖ postcard body.
///
/// # Errors
///
/// [`FrameError::TooLarge`] if the body exceeds [`MAX_FRAME_LEN`],
/// [`FrameError::Empty`] if it is zero bytes long (a zero-sized message has
/// no place on the wire), [`FrameError::Encode`] if serde fails.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::new();
    encode_into(&mut frame, value)?;
    Ok(frame)
}

/// Appends `value` as one frame (length prefix ‖ postcard body) to `out`,
/// which grows once, to the exact size: a relay writes several frames into
/// one buffer, and growing it byte-string by byte-string reallocated a
/// 1 KiB envelope's buffer about ten times.
///
/// # Errors
///
/// As [`encode`]; `out` is left as it was.
pub fn encode_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), FrameError> {
    let len = postcard::experimental::serialized_size(value).map_err(FrameError::Encode)?;
    check_len(len)?;
    let prefix = u32::try_from(len).map_err(|_| too_large(len))?;
    let start = out.len();
    out.reserve(LEN_PREFIX + len);
    out.extend_from_slice(&prefix.to_be_bytes());
    let written = postcard::serialize_with_flavor::<T, _, _>(value, AppendTo(out));
    if let Err(error) = written {
        out.truncate(start);
        return Err(FrameError::Encode(error));
    }
    if out.len() - start != LEN_PREFIX + len {
        // Not expected: `serialized_size` runs the same serializer. The
        // prefix would not match the body, so nothing is kept.
        out.truncate(start);
        return Err(FrameError::Encode(postcard::Error::SerializeBufferFull));
    }
    Ok(())
}

/// A postcard output that appends to a borrowed `Vec`.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Decodes one frame body (without its prefix) into a message.
///
/// Strict: the whole body must be one message.
///
/// # Errors
///
/// [`FrameError::TrailingBytes`] if bytes remain after the message,
/// [`FrameError::Malformed`] if the bytes are not a `T`,
/// [`FrameError::Empty`] or [`FrameError::TooLarge`] if the body length is
/// outside `1..=MAX_FRAME_LEN`.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    check_len(body.len())?;
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    Ok(value)
}

/// Splits a byte stream into frame bodies.
///
/// Push bytes as they arrive with [`push`](Self::push), then call
/// [`next_frame`](Self::next_frame) until it returns `None`. Each length
/// prefix is checked the moment its fourth byte arrives: a zero or over-limit
/// length is refused then, before any body byte is awaited and without
/// reserving memory for the declared size. The decoder only ever holds bytes
/// the caller has pushed.
///
/// After an error the decoder is poisoned: every later `push` returns the
/// same error and `next_frame` returns `None`. The caller closes the stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes pushed and not yet handed out; `buf[start..]` is live.
    buf: Vec<u8>,
    /// Offset of the next frame's prefix.
    start: usize,
    /// Offset of the first prefix not yet checked (`>= start`; may lie past
    /// `buf.len()` while a body is incomplete).
    checked: usize,
    /// The error that poisoned the decoder.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream and checks every length prefix
    /// that is now complete.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] or [`FrameError::Empty`] for a bad length
    /// prefix, or the earlier error if the decoder is already poisoned.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
        while let Some(len) = read_prefix(&self.buf, self.checked) {
            if let Err(error) = check_len(len) {
                self.buf = Vec::new();
                self.start = 0;
                self.checked = 0;
                self.failed = Some(error.clone());
                return Err(error);
            }
            self.checked += LEN_PREFIX + len;
        }
        Ok(())
    }

    /// Takes the next complete frame body, if one has fully arrived.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        self.next_with(<[u8]>::to_vec)
    }

    /// Takes the next complete frame, if one has fully arrived, and
    /// [`decode`]s it where it lies, without copying the body out first.
    /// The frame is consumed whether or not it decodes.
    pub fn next_decoded<T: DeserializeOwned>(&mut self) -> Option<Result<T, FrameError>> {
        self.next_with(decode::<T>)
    }

    /// Hands the next complete body, if one has fully arrived, to `f`
    /// where it lies, and consumes it.
    pub fn next_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if self.failed.is_some() {
            return None;
        }
        // Every prefix before `checked` has passed `check_len`.
        let len = read_prefix(&self.buf, self.start)?;
        let body_start = self.start + LEN_PREFIX;
        let taken = f(self.buf.get(body_start..body_start + len)?);
        self.start = body_start + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.checked -= self.start;
            self.start = 0;
        }
        Some(taken)
    }

    /// Bytes received that do not yet form a complete frame (plus any
    /// complete frames not yet taken).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Confirms the stream may end here: no error and no partial frame.
    ///
    /// # Errors
    ///
    /// [`FrameError::Truncated`] if part of a frame is buffered, or the
    /// error that poisoned the decoder.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }

    /// Drops bytes already handed out once they are at least half the buffer,
    /// so copying stays amortised linear.
    fn compact(&mut self) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.checked -= self.start;
            self.start = 0;
        }
    }
}

/// Reads the length prefix at `at`, if all four bytes are present.
fn read_prefix(buf: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; LEN_PREFIX] = buf.get(at..at.checked_add(LEN_PREFIX)?)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(bytes)).ok()
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(too_large(len));
    }
    Ok(())
}

fn too_large(len: usize) -> FrameError {
    FrameError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(len: u32) -> [u8; 4] {
        len.to_be_bytes()
    }

    fn max_u32() -> u32 {
        u32::try_from(MAX_FRAME_LEN).unwrap()
    }

    #[test]
    fn constants() {
        assert_eq!(ALPN, b"messenger/1");
        assert_eq!(PROTOCOL_VERSION, 1);
        assert_eq!(MAX_FRAME_LEN, 262_144);
    }

    #[test]
    fn encode_layout_is_big_endian_length_then_postcard() {
        let frame = encode(&(7u8, "hi")).unwrap();
        assert_eq!(frame, [0, 0, 0, 4, 7, 2, b'h', b'i']);
    }

    #[test]
    fn encode_accepts_body_of_exactly_max_and_refuses_one_more() {
        // A `Vec<u8>` encodes as varint(len) ‖ bytes; the varint of a length
        // in 2^14..2^21 takes 3 bytes.
        let at_max = vec![0xAAu8; MAX_FRAME_LEN - 3];
        let frame = encode(&at_max).unwrap();
        assert_eq!(frame.len(), LEN_PREFIX + MAX_FRAME_LEN);
        assert_eq!(frame[..4], prefix(max_u32()));

        let over = vec![0xAAu8; MAX_FRAME_LEN - 2];
        assert_eq!(
            encode(&over),
            Err(FrameError::TooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
    }

    #[test]
    fn decoder_accepts_max_frame_and_refuses_max_plus_one() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&prefix(max_u32())).unwrap();
        decoder.push(&vec![1; MAX_FRAME_LEN]).unwrap();
        let body = decoder.next_frame().unwrap();
        assert_eq!(body.len(), MAX_FRAME_LEN);
        decoder.finish().unwrap();

        let mut decoder = FrameDecoder::new();
        let err = decoder.push(&prefix(max_u32() + 1)).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            }
        );
    }

    #[test]
    fn encode_refuses_empty_body() {
        assert_eq!(encode(&()), Err(FrameError::Empty));
    }

    #[test]
    fn declared_lengths_with_body_withheld() {
        let cases: [(u32, Option<FrameError>); 5] = [
            (0, Some(FrameError::Empty)),
            (max_u32() - 1, None),
            (max_u32(), None),
            (
                max_u32() + 1,
                Some(FrameError::TooLarge {
                    len: MAX_FRAME_LEN + 1,
                    max: MAX_FRAME_LEN,
                }),
            ),
            (
                u32::MAX,
                Some(FrameError::TooLarge {
                    len: u32::MAX as usize,
                    max: MAX_FRAME_LEN,
                }),
            ),
        ];
        for (len, expected) in cases {
            let mut decoder = FrameDecoder::new();
            let result = decoder.push(&prefix(len));
            match expected {
                Some(error) => {
                    assert_eq!(result, Err(error.clone()), "length {len}");
                    // Poisoned: nothing buffered, same error again.
                    assert_eq!(decoder.buffered(), 0);
                    assert_eq!(decoder.push(&[1, 2, 3]), Err(error.clone()));
                    assert_eq!(decoder.finish(), Err(error));
                }
                None => {
                    assert_eq!(result, Ok(()), "length {len}");
                    assert!(decoder.next_frame().is_none());
                    assert_eq!(decoder.buffered(), 4);
                    // Pending, not yet allocated for the declared body.
                    assert!(decoder.buf.capacity() < 1024, "length {len}");
                    assert_eq!(decoder.finish(), Err(FrameError::Truncated { buffered: 4 }));
                }
            }
        }
    }

    #[test]
    fn oversized_prefix_refused_when_its_fourth_byte_arrives() {
        let bytes = prefix(u32::MAX);
        let mut decoder = FrameDecoder::new();
        for byte in &bytes[..3] {
            decoder.push(&[*byte]).unwrap();
        }
        assert!(decoder.next_frame().is_none());
        assert!(matches!(
            decoder.push(&bytes[3..]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_prefix_behind_a_good_frame_is_refused_on_push() {
        let mut bytes = encode(&5u8).unwrap();
        bytes.extend_from_slice(&prefix(max_u32() + 1));
        let mut decoder = FrameDecoder::new();
        assert!(matches!(
            decoder.push(&bytes),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decoder.next_frame().is_none());
    }

    #[test]
    fn truncated_body_stays_pending() {
        let frame = encode(&"hello world").unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..frame.len() - 1]).unwrap();
        assert!(decoder.next_frame().is_none());
        assert_eq!(
            decoder.finish(),
            Err(FrameError::Truncated {
                buffered: frame.len() - 1
            })
        );
        decoder.push(&frame[frame.len() - 1..]).unwrap();
        let body = decoder.next_frame().unwrap();
        assert_eq!(decode::<String>(&body).unwrap(), "hello world");
        assert!(decoder.next_frame().is_none());
        decoder.finish().unwrap();
    }

    #[test]
    fn several_frames_in_one_push() {
        let mut bytes = encode(&1u16).unwrap();
        bytes.extend(encode(&2u16).unwrap());
        bytes.extend(encode(&3u16).unwrap());
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes).unwrap();
        let got: Vec<u16> = std::iter::from_fn(|| decoder.next_frame())
            .map(|body| decode(&body).unwrap())
            .collect();
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decode_refuses_trailing_bytes() {
        let mut body = postcard::to_stdvec(&(1u8, 2u8)).unwrap();
        assert_eq!(decode::<(u8, u8)>(&body).unwrap(), (1, 2));
        body.push(0);
        assert_eq!(
            decode::<(u8, u8)>(&body),
            Err(FrameError::TrailingBytes { count: 1 })
        );
    }

    #[test]
    fn decode_refuses_short_and_empty_bodies() {
        assert!(matches!(
            decode::<(u8, u8)>(&[1]),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(decode::<(u8, u8)>(&[]), Err(FrameError::Empty));
        assert!(matches!(
            decode::<u8>(&vec![0; MAX_FRAME_LEN + 1]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn encode_into_appends_the_same_frame_encode_makes() {
        let first = (7u32, "seven".to_owned());
        let second = vec![0xabu8; 1024];
        let mut out = b"before".to_vec();
        encode_into(&mut out, &first).unwrap();
        encode_into(&mut out, &second).unwrap();
        let mut expected = b"before".to_vec();
        expected.extend(encode(&first).unwrap());
        expected.extend(encode(&second).unwrap());
        assert_eq!(out, expected);
    }

    #[test]
    fn encode_into_leaves_the_buffer_as_it_was_on_error() {
        let mut out = b"kept".to_vec();
        let too_large = vec![1u8; MAX_FRAME_LEN];
        assert!(matches!(
            encode_into(&mut out, &too_large),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(encode_into(&mut out, &()), Err(FrameError::Empty)));
        assert_eq!(out, b"kept");
    }

    #[test]
    fn next_decoded_decodes_in_place_and_consumes_bad_frames_too() {
        let mut decoder = FrameDecoder::new();
        let mut bytes = encode(&300u16).unwrap();
        bytes.extend(encode(&"not a u16").unwrap());
        bytes.extend(encode(&9u16).unwrap());
        decoder.push(&bytes).unwrap();
        assert_eq!(decoder.next_decoded::<u16>().unwrap().unwrap(), 300);
        assert!(decoder.next_decoded::<u16>().unwrap().is_err());
        assert_eq!(decoder.next_decoded::<u16>().unwrap().unwrap(), 9);
        assert!(decoder.next_decoded::<u16>().is_none());
        assert_eq!(decoder.buffered(), 0);
    }
}
