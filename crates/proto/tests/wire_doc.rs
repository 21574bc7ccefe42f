//! Keeps `docs/protocol.md` honest: the worked wire examples in its
//! "Field types and encoding" subsection are encoded here with the crate's
//! own [`encode`] and compared byte for byte with the hex written in the
//! document, and the postcard rules it states are checked by encoding.
//!
//! ## Example format in the document
//!
//! Each example is an HTML comment `<!-- wire-example: NAME -->` followed
//! (blank lines allowed) by a fenced code block opened with `` ```text ``.
//! In that block every line is hex bytes, then optionally `#` and an
//! annotation: everything from the first `#` on a line is ignored, and what
//! is left is whitespace-separated bytes of exactly two hex digits each (any
//! case). Lines with no bytes (blank or annotation only) are allowed. The
//! bytes of all lines, in order, are the whole frame, length prefix included.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::fmt::Debug;

use messenger_proto::msg::{ClientFrame, OutgoingEnvelope, Reply, Request, ServerFrame, UserInfo};
use messenger_proto::{ErrorCode, decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The document the examples live in.
fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The bytes of the example marked `<!-- wire-example: NAME -->`.
fn example_bytes(doc: &str, name: &str) -> Result<Vec<u8>, String> {
    let marker = format!("<!-- wire-example: {name} -->");
    let mut found = doc.match_indices(&marker);
    let (at, _) = found
        .next()
        .ok_or_else(|| format!("no `{marker}` in docs/protocol.md"))?;
    if found.next().is_some() {
        return Err(format!("`{marker}` appears more than once"));
    }
    let after = doc[at + marker.len()..].trim_start();
    let block = after
        .strip_prefix("```text\n")
        .ok_or_else(|| format!("`{marker}` is not followed by a ```text block"))?;
    let end = block
        .find("\n```")
        .ok_or_else(|| format!("the block after `{marker}` is not closed"))?;
    parse_hex(&block[..end]).map_err(|e| format!("the block after `{marker}`: {e}"))
}

/// Parses the example format described in the module documentation.
fn parse_hex(block: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (n, line) in block.lines().enumerate() {
        let data = line.split('#').next().unwrap_or_default();
        for token in data.split_whitespace() {
            let byte = (token.len() == 2)
                .then(|| u8::from_str_radix(token, 16).ok())
                .flatten()
                .ok_or_else(|| format!("line {}: `{token}` is not one hex byte", n + 1))?;
            out.push(byte);
        }
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Encodes `value`, compares with the document's example `name`, and reads
/// the bytes back to `value`.
fn check_example<T>(name: &str, value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = encode(value).unwrap();
    let documented = example_bytes(&protocol_md(), name)
        .unwrap_or_else(|e| panic!("{e}\nencode({value:?}) gives {}", hex(&frame)));
    assert_eq!(
        hex(&documented),
        hex(&frame),
        "docs/protocol.md example `{name}` (left) differs from encode({value:?}) (right)"
    );
    let len = u32::from_be_bytes(documented[..4].try_into().unwrap());
    assert_eq!(
        len as usize,
        documented.len() - 4,
        "length prefix of `{name}`"
    );
    assert_eq!(&decode::<T>(&documented[4..]).unwrap(), value);
}

#[test]
fn send_example_matches_the_code() {
    let frame = ClientFrame {
        id: 1,
        request: Request::Send(OutgoingEnvelope {
            to: "bob".into(),
            to_device: 1,
            id: [0x11; 16],
            body: vec![0xAA, 0xBB, 0xCC],
        }),
    };
    check_example("send", &frame);
}

#[test]
fn accepted_example_matches_the_code() {
    let frame = ServerFrame::Reply {
        id: 1,
        result: Ok(Reply::Accepted {
            seq: 300,
            duplicate: false,
        }),
    };
    check_example("accepted", &frame);
}

#[test]
fn the_parser_reads_annotations_and_refuses_typos() {
    assert_eq!(
        parse_hex("00 0A # a # b\n\n# only words\n  ff\n").unwrap(),
        [0x00, 0x0A, 0xFF]
    );
    assert!(parse_hex("0a0b").is_err());
    assert!(parse_hex("0g").is_err());
    assert!(parse_hex("a").is_err());
}

/// The postcard body of `value` (its frame without the length prefix).
fn body<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    encode(value).unwrap()[4..].to_vec()
}

/// Every rule the subsection states, checked against postcard itself.
#[test]
fn the_documented_postcard_rules_hold() {
    // Unsigned integers above u8: LEB128 varints, shortest form, low group first.
    assert_eq!(body(&0u32), [0x00]);
    assert_eq!(body(&127u16), [0x7F]);
    assert_eq!(body(&128u32), [0x80, 0x01]);
    assert_eq!(body(&300u64), [0xAC, 0x02]);
    assert_eq!(body(&u16::MAX), [0xFF, 0xFF, 0x03]);
    assert_eq!(body(&u32::MAX), [0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
    let mut max64 = vec![0xFF; 9];
    max64.push(0x01);
    assert_eq!(body(&u64::MAX), max64);
    // A decoder accepts a padded varint, refuses one too long for its type.
    assert_eq!(decode::<u32>(&[0x81, 0x00]).unwrap(), 1);
    assert!(decode::<u32>(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10]).is_err());
    assert!(decode::<u32>(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]).is_err());
    assert!(decode::<u16>(&[0xFF, 0xFF, 0x04]).is_err());
    // u8: one byte, as is.
    assert_eq!(body(&200u8), [200]);
    // bool: one byte 0 or 1; anything else is refused.
    assert_eq!(body(&true), [1]);
    assert_eq!(body(&false), [0]);
    assert!(decode::<bool>(&[2]).is_err());
    // String: varint length in bytes, then UTF-8, which is checked.
    assert_eq!(body("bob"), [3, b'b', b'o', b'b']);
    assert_eq!(body("é"), [2, 0xC3, 0xA9]);
    assert!(decode::<String>(&[1, 0xFF]).is_err());
    // Byte strings: varint length then the bytes (a sequence of u8 alike).
    assert_eq!(body(&vec![0xAAu8, 0xBB]), [2, 0xAA, 0xBB]);
    // Fixed arrays: the bytes alone, no length.
    assert_eq!(body(&[0x11u8; 16]), [0x11; 16]);
    // Option: 0, or 1 then the value; other tags are refused.
    assert_eq!(body(&None::<String>), [0]);
    assert_eq!(body(&Some("t".to_string())), [1, 1, b't']);
    assert!(decode::<Option<u8>>(&[2, 0]).is_err());
    // Vec: varint count then the items.
    assert_eq!(body(&vec![1u64, 300]), [2, 1, 0xAC, 0x02]);
    assert_eq!(body(&Vec::<String>::new()), [0]);
    // Enums: varint variant index, then the variant's fields in order; a
    // unit variant is its index alone, a newtype variant its index then the
    // inner value's fields.
    assert_eq!(body(&Request::Users), [10]);
    assert_eq!(body(&Request::UsersAfter { after: None }), [24, 0]);
    assert_eq!(
        body(&Request::UsersAfter {
            after: Some("b".into())
        }),
        [24, 1, 1, b'b']
    );
    assert_eq!(body(&Request::Pull { after: 1, max: 2 }), [8, 1, 2]);
    assert_eq!(
        body(&Reply::User(UserInfo {
            username: "b".into(),
            identity: vec![9],
            online: true,
        })),
        [10, 1, b'b', 1, 9, 1]
    );
    // Result: an enum, 0 Ok and 1 Err; ErrorCode is its u16 value.
    assert_eq!(body(&Ok::<u8, u8>(7)), [0, 7]);
    assert_eq!(body(&ErrorCode::UserNotExist), [0xAC, 0x02]);
    assert_eq!(
        body(&ServerFrame::Reply {
            id: 2,
            result: Err(ErrorCode::UserNotExist),
        }),
        [1, 2, 1, 0xAC, 0x02]
    );
    // Structs: the fields in declaration order, no names, tags or count.
    assert_eq!(
        body(&UserInfo {
            username: "bob".into(),
            identity: vec![1],
            online: true,
        }),
        [3, b'b', b'o', b'b', 1, 1, 1]
    );
    // An unknown variant index is refused.
    assert!(decode::<Request>(&[24]).is_err());
}
