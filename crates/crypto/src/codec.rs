//! A tiny fixed-width byte codec for the crate's own encodings (public keys,
//! bundles, pickles, distribution messages). Every field has a fixed width or a
//! length prefix, integers are big-endian, and a decoder must consume its input
//! exactly: trailing bytes are an error, so one value has one encoding.

use thiserror::Error;

/// Why bytes could not be decoded. Says nothing about the bytes themselves.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("truncated {what}: needed {needed} more bytes")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// Bytes were left after the value.
    #[error("{count} trailing bytes after {what}")]
    Trailing {
        /// What was being read.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A version or type byte this build does not know.
    #[error("unsupported {what} version {version}")]
    Version {
        /// What was being read.
        what: &'static str,
        /// The version found.
        version: u8,
    },
    /// A field held a value outside its allowed range.
    #[error("invalid {what}")]
    Invalid {
        /// Which field.
        what: &'static str,
    },
}

/// Appends fields to a byte vector.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A `u32` length prefix then the bytes.
    pub(crate) fn var_bytes(&mut self, v: &[u8]) -> &mut Self {
        // Callers never hold 4 GiB; saturating keeps this total.
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(v);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields from a byte slice; every read checks the length first.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what: self.what,
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A `u32` length prefix then that many bytes, refused above `max`
    /// before anything is allocated.
    pub(crate) fn var_bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::Invalid { what: self.what });
        }
        self.take(len)
    }

    /// A count prefix checked against `max` before any allocation.
    pub(crate) fn count(&mut self, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::Invalid { what: self.what });
        }
        Ok(n)
    }

    pub(crate) fn version(&mut self, expected: u8) -> Result<(), DecodeError> {
        let v = self.u8()?;
        if v != expected {
            return Err(DecodeError::Version {
                what: self.what,
                version: v,
            });
        }
        Ok(())
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                what: self.what,
                count: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let mut w = Writer::default();
        w.u8(1).u32(7).u64(9).var_bytes(b"abc").bytes(&[5; 3]);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes, "test");
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), 9);
        assert_eq!(r.var_bytes(3).unwrap(), b"abc");
        assert_eq!(r.array::<3>().unwrap(), [5; 3]);
        r.finish().unwrap();

        let mut r = Reader::new(&bytes, "test");
        r.u8().unwrap();
        assert_eq!(r.u64().unwrap(), 7u64 << 32);
        // Limit enforced before reading the body.
        let mut r = Reader::new(&[0, 0, 0, 9, 1], "test");
        assert!(matches!(r.var_bytes(8), Err(DecodeError::Invalid { .. })));
        let mut r = Reader::new(&[1, 2], "test");
        assert!(matches!(
            r.u32(),
            Err(DecodeError::Truncated { needed: 2, .. })
        ));
        let r = Reader::new(&[1], "test");
        assert!(matches!(
            r.finish(),
            Err(DecodeError::Trailing { count: 1, .. })
        ));
    }
}
