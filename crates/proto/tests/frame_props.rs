//! Property tests: encode/decode round trips and frames split at arbitrary
//! byte boundaries.

use messenger_proto::{ErrorCode, FrameDecoder, decode, encode};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Body {
    Text(String),
    Bytes(Vec<u8>),
    Failed {
        code: ErrorCode,
        detail: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Sample {
    id: u64,
    device: u32,
    to: String,
    flags: (bool, i16),
    body: Body,
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        ".{0,40}".prop_map(Body::Text),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Body::Bytes),
        (
            proptest::sample::select(ErrorCode::ALL),
            proptest::option::of("[a-z ]{0,20}")
        )
            .prop_map(|(code, detail)| Body::Failed { code, detail }),
    ]
}

fn sample() -> impl Strategy<Value = Sample> {
    (
        any::<u64>(),
        any::<u32>(),
        "[a-z0-9_]{0,16}",
        any::<(bool, i16)>(),
        body(),
    )
        .prop_map(|(id, device, to, flags, body)| Sample {
            id,
            device,
            to,
            flags,
            body,
        })
}

/// Splits `bytes` at the given cut points (taken modulo the length).
fn split_at_cuts(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| bytes[w[0]..w[1]].to_vec())
        .collect()
}

proptest! {
    #[test]
    fn encode_decode_round_trip(value in sample()) {
        let frame = encode(&value).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        prop_assert_eq!(len, frame.len() - 4);
        prop_assert_eq!(decode::<Sample>(&frame[4..]).unwrap(), value);
    }

    #[test]
    fn frames_split_anywhere_come_out_whole(
        values in proptest::collection::vec(sample(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let stream: Vec<u8> = values.iter().flat_map(|v| encode(v).unwrap()).collect();
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in split_at_cuts(&stream, &cuts) {
            decoder.push(&piece).unwrap();
            while let Some(body) = decoder.next_frame() {
                got.push(decode::<Sample>(&body).unwrap());
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(got, values);
    }

    #[test]
    fn any_strict_prefix_of_a_frame_stays_pending(value in sample(), cut in any::<usize>()) {
        let frame = encode(&value).unwrap();
        let cut = cut % frame.len();
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..cut]).unwrap();
        prop_assert!(decoder.next_frame().is_none());
        prop_assert_eq!(decoder.buffered(), cut);
    }

    #[test]
    fn trailing_bytes_are_refused(value in sample(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
        let frame = encode(&value).unwrap();
        let mut body = frame[4..].to_vec();
        body.extend_from_slice(&extra);
        let refused = matches!(
            decode::<Sample>(&body),
            Err(messenger_proto::FrameError::TrailingBytes { count }) if count == extra.len()
        );
        prop_assert!(refused);
    }
}
