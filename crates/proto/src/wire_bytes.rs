//! `#[serde(with = ...)]` helpers that send byte strings through serde's
//! bytes path instead of its sequence path.
//!
//! serde treats a `Vec<u8>` as a sequence: one `serialize_u8` per byte on the
//! way out, one `deserialize_u8` and a push per byte on the way in. postcard
//! writes a sequence of `u8` and a byte string identically (varint length,
//! then the raw bytes), so these helpers change no wire byte; they only let
//! postcard copy the bytes in one go. A test in `msg` compares every sample
//! message with a mirror that uses plain `Vec<u8>` fields.
//!
//! Decoding also accepts a sequence, so a self-describing format that writes
//! byte strings as arrays (JSON) still reads them back.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// Most bytes set aside before any element arrives when a format announces a
/// sequence length: the length is the peer's claim, so it never sizes a
/// buffer on its own. (postcard's bytes path needs no such cap: it checks the
/// length against the input before copying.)
const MAX_PREALLOC_BYTES: usize = 4096;

/// A borrowed byte string that serializes through the bytes path.
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// An owned byte string that deserializes through the bytes path.
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_byte_buf(ByteBufVisitor)
            .map(ByteBuf)
    }
}

struct ByteBufVisitor;

impl<'de> Visitor<'de> for ByteBufVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC_BYTES));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// For a `Vec<u8>` field.
pub(crate) mod vec {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::ByteBuf;

    /// Writes the bytes as one byte string.
    pub(crate) fn serialize<S: Serializer>(v: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(v)
    }

    /// Reads one byte string (or a sequence of `u8`).
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        ByteBuf::deserialize(deserializer).map(|b| b.0)
    }
}

/// For an `Option<Vec<u8>>` field.
pub(crate) mod option {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{ByteBuf, Bytes};

    /// Writes `None`, or `Some` and one byte string.
    pub(crate) fn serialize<S: Serializer>(
        v: &Option<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => serializer.serialize_some(&Bytes(v)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads an optional byte string.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<ByteBuf>::deserialize(deserializer)?.map(|b| b.0))
    }
}

/// For a `Vec<Vec<u8>>` field: a sequence whose elements are byte strings.
pub(crate) mod list {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::{ByteBuf, Bytes, MAX_PREALLOC_BYTES, SerializeSeq};

    /// Writes a sequence of byte strings.
    pub(crate) fn serialize<S: Serializer>(
        v: &[Vec<u8>],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&Bytes(item))?;
        }
        seq.end()
    }

    /// Reads a sequence of byte strings.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        deserializer.deserialize_seq(ListVisitor)
    }

    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence of byte strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let cap = seq
                .size_hint()
                .unwrap_or(0)
                .min(MAX_PREALLOC_BYTES / size_of::<Vec<u8>>());
            let mut out = Vec::with_capacity(cap);
            while let Some(ByteBuf(item)) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::de::value::{BytesDeserializer, Error, SeqDeserializer};

    use super::*;

    /// Self-describing formats may hand a byte string over as a sequence of
    /// `u8` (JSON arrays) or as borrowed bytes; both read.
    #[test]
    fn reads_bytes_and_sequences() {
        let seq = SeqDeserializer::<_, Error>::new(vec![1u8, 2, 3].into_iter());
        assert_eq!(vec::deserialize(seq).unwrap(), vec![1, 2, 3]);
        let bytes = BytesDeserializer::<Error>::new(&[4, 5]);
        assert_eq!(vec::deserialize(bytes).unwrap(), vec![4, 5]);

        let list = SeqDeserializer::<_, Error>::new(
            vec![
                BytesDeserializer::<Error>::new(&[6]),
                BytesDeserializer::new(&[]),
            ]
            .into_iter(),
        );
        assert_eq!(list::deserialize(list).unwrap(), vec![vec![6], vec![]]);
    }

    /// A sequence of something other than bytes is refused.
    #[test]
    fn refuses_non_bytes() {
        let seq = SeqDeserializer::<_, Error>::new(vec![1u32, 300].into_iter());
        assert!(vec::deserialize(seq).is_err());
        let s = serde::de::value::StrDeserializer::<Error>::new("abc");
        assert!(vec::deserialize(s).is_err());
    }
}
