//! The byte-string fields of the wire types go through serde's bytes path
//! (`crate::wire_bytes`); before, they went through its sequence path as
//! plain `Vec<u8>`. These tests keep a mirror of every wire type with plain
//! `Vec<u8>` fields (module [`old`]: same names, same fields, same order) and
//! check that both encode every sample to the same bytes and read each
//! other's bytes back to the same values.

use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::tests::samples;
use super::*;
use crate::{FrameError, decode, encode};

/// The wire types as they were, `Vec<u8>` fields serialized as sequences.
/// Type names match the real ones so that `Debug` output can be compared.
mod old {
    use serde::{Deserialize, Serialize};

    use crate::ErrorCode;
    use crate::msg::{MessageId, ServerHello};

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct ClientFrame {
        pub(super) id: u32,
        pub(super) request: Request,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum ServerFrame {
        Hello(ServerHello),
        Reply {
            id: u32,
            result: Result<Reply, ErrorCode>,
        },
        Push(Push),
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Register {
        pub(super) username: String,
        pub(super) identity: Vec<u8>,
        pub(super) signed_prekey: Vec<u8>,
        pub(super) one_time_prekeys: Vec<Vec<u8>>,
        pub(super) invite: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Login {
        username: String,
        signature: Vec<u8>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct OutgoingEnvelope {
        pub(super) to: String,
        pub(super) to_device: u32,
        pub(super) id: MessageId,
        pub(super) body: Vec<u8>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct SignedRoster {
        group: String,
        version: u64,
        owner: String,
        members: Vec<String>,
        signature: Vec<u8>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct SignedAnnouncement {
        issued_at: u64,
        text: String,
        signature: Vec<u8>,
    }

    // Variant names must match the real (public) enum's.
    #[allow(clippy::enum_variant_names)]
    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Request {
        Register(Register),
        Login(Login),
        FetchBundle {
            username: String,
        },
        PrekeyStatus,
        UploadPrekeys {
            one_time_prekeys: Vec<Vec<u8>>,
        },
        RotateSignedPrekey {
            signed_prekey: Vec<u8>,
        },
        Send(OutgoingEnvelope),
        GroupSend {
            group: String,
            id: MessageId,
            body: Vec<u8>,
        },
        Pull {
            after: u64,
            max: u32,
        },
        Ack {
            seqs: Vec<u64>,
        },
        Users,
        FriendRequest {
            username: String,
        },
        FriendAccept {
            username: String,
        },
        FriendDecline {
            username: String,
        },
        FriendRemove {
            username: String,
        },
        FriendList,
        GroupCreate(SignedRoster),
        GroupJoin {
            group: String,
        },
        GroupUpdate(SignedRoster),
        GroupLeave {
            group: String,
        },
        GroupMembers {
            group: String,
        },
        MyGroups,
        Announce(SignedAnnouncement),
        Lookup {
            username: String,
        },
        UsersAfter {
            after: Option<String>,
        },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Reply {
        Ok,
        LoggedIn {
            pending: u32,
            prekeys: u32,
        },
        Bundle {
            identity: Vec<u8>,
            signed_prekey: Vec<u8>,
            one_time_prekey: Option<Vec<u8>>,
        },
        PrekeyStatus {
            remaining: u32,
            low: bool,
        },
        Accepted {
            seq: u64,
            duplicate: bool,
        },
        Envelopes {
            envelopes: Vec<Envelope>,
            more: bool,
        },
        Users {
            users: Vec<UserInfo>,
        },
        Friends {
            friends: Vec<UserInfo>,
            incoming: Vec<String>,
            outgoing: Vec<String>,
        },
        Roster(SignedRoster),
        Groups {
            groups: Vec<String>,
        },
        User(UserInfo),
        UsersPage {
            users: Vec<UserInfo>,
            more: bool,
        },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct UserInfo {
        username: String,
        identity: Vec<u8>,
        online: bool,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Envelope {
        pub(super) seq: u64,
        pub(super) from: String,
        pub(super) from_device: u32,
        pub(super) group: Option<String>,
        pub(super) id: MessageId,
        pub(super) sent_at: u64,
        pub(super) body: Vec<u8>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum Push {
        Envelope(Envelope),
        Presence {
            username: String,
            online: bool,
            identity: Vec<u8>,
        },
        FriendRequest {
            from: String,
        },
        FriendAnswer {
            from: String,
            accepted: bool,
        },
        FriendRemoved {
            from: String,
        },
        GroupChanged(SignedRoster),
        GroupJoinRequest {
            group: String,
            username: String,
        },
        Announcement(SignedAnnouncement),
        PrekeysLow {
            remaining: u32,
        },
        Replaced,
        GroupLeaveRequest {
            group: String,
            username: String,
        },
    }
}

/// Encodes `new`, reads the bytes as the mirror type, checks the mirror
/// holds the same value (same `Debug`), re-encodes the mirror, checks the
/// bytes are identical, and reads those back as the new type. Returns the
/// encoding.
fn same_wire<N, O>(new: &N) -> Vec<u8>
where
    N: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    O: Serialize + DeserializeOwned + std::fmt::Debug,
{
    let new_bytes = postcard::to_stdvec(new).unwrap();
    let mirror: O = postcard::from_bytes(&new_bytes).unwrap();
    assert_eq!(format!("{mirror:?}"), format!("{new:?}"));
    let old_bytes = postcard::to_stdvec(&mirror).unwrap();
    assert_eq!(old_bytes, new_bytes, "{new:?}");
    assert_eq!(&postcard::from_bytes::<N>(&old_bytes).unwrap(), new);
    new_bytes
}

#[test]
fn every_sample_encodes_as_before() {
    let (requests, replies, pushes) = samples();
    let mut checked = 0;
    for (i, request) in requests.into_iter().enumerate() {
        same_wire::<_, old::Request>(&request);
        let frame = ClientFrame {
            id: u32::try_from(i).unwrap() * 1000,
            request,
        };
        same_wire::<_, old::ClientFrame>(&frame);
        checked += 1;
    }
    for (i, reply) in replies.into_iter().enumerate() {
        same_wire::<_, old::Reply>(&reply);
        let frame = ServerFrame::Reply {
            id: u32::try_from(i).unwrap(),
            result: Ok(reply),
        };
        same_wire::<_, old::ServerFrame>(&frame);
        checked += 1;
    }
    for push in pushes {
        same_wire::<_, old::Push>(&push);
        same_wire::<_, old::ServerFrame>(&ServerFrame::Push(push));
        checked += 1;
    }
    assert_eq!(checked, 25 + 12 + 11);
}

/// Samples with longer byte strings than [`samples`] has, so lengths need a
/// multi-byte varint, and with the fields `samples` leaves empty or `None`.
#[test]
fn long_and_optional_byte_strings_encode_as_before() {
    let long = |n: usize, seed: u8| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    let bundle = Reply::Bundle {
        identity: long(128, 1),
        signed_prekey: long(200, 2),
        one_time_prekey: Some(long(127, 3)),
    };
    same_wire::<_, old::Reply>(&bundle);
    let register = Request::Register(Register {
        username: "alice".into(),
        identity: long(97, 4),
        signed_prekey: vec![],
        one_time_prekeys: vec![long(40, 5), vec![], long(16_384, 6)],
        invite: None,
    });
    same_wire::<_, old::Request>(&register);
    let push = Push::Envelope(Envelope {
        seq: u64::MAX,
        from: "bob".into(),
        from_device: DEFAULT_DEVICE,
        group: Some("lobby".into()),
        id: [9; 16],
        sent_at: 1,
        body: long(MAX_BODY_LEN, 7),
    });
    same_wire::<_, old::Push>(&push);
}

/// The layout of a `Send` body written out by hand: the bytes path writes a
/// varint length then the raw bytes, exactly like the sequence path did.
#[test]
fn send_layout() {
    let body: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    let request = Request::Send(OutgoingEnvelope {
        to: "bob".into(),
        to_device: 1,
        id: [2; 16],
        body: body.clone(),
    });
    let mut want = vec![6, 3, b'b', b'o', b'b', 1];
    want.extend_from_slice(&[2; 16]);
    // 300 = 0b10_0101100: varint 0xAC 0x02.
    want.extend_from_slice(&[0xAC, 0x02]);
    want.extend_from_slice(&body);
    assert_eq!(postcard::to_stdvec(&request).unwrap(), want);
}

/// A `Send` body up to the end of its `id`: variant 6, "bob", device 1.
fn send_prefix() -> Vec<u8> {
    let mut b = vec![6, 3, b'b', b'o', b'b', 1];
    b.extend_from_slice(&[2; 16]);
    b
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A body, prekey list or optional key that claims more bytes than the frame
/// holds is a clean decode error. postcard checks the claimed length against
/// the remaining input before it copies, so nothing of the claimed size is
/// allocated: with a claim near `usize::MAX` an allocation would abort the
/// test process rather than return an error.
#[test]
fn declared_length_beyond_the_data_fails_cleanly() {
    const END: postcard::Error = postcard::Error::DeserializeUnexpectedEnd;
    // 4 GiB, near `usize::MAX`, and one byte more than there is.
    for claim in [4u64 << 30, u64::MAX >> 1, 65] {
        // Request::Send with a huge body length and 64 bytes of body.
        let mut body = send_prefix();
        body.extend(varint(claim));
        body.extend_from_slice(&[0xC1; 64]);
        let err = decode::<Request>(&body).err();
        assert!(
            matches!(err, Some(FrameError::Malformed(END))),
            "{claim}: {err:?}"
        );
        // The same inside a client frame with request id 7.
        let mut frame = varint(7);
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode::<ClientFrame>(&frame),
            Err(FrameError::Malformed(END))
        ));

        // UploadPrekeys: a huge element count, then one short element.
        let mut upload = vec![4];
        upload.extend(varint(claim));
        upload.extend_from_slice(&[1, 0xAB]);
        assert!(matches!(
            decode::<Request>(&upload),
            Err(FrameError::Malformed(END))
        ));
        // ... and a sane count with a huge element length.
        let mut upload = vec![4, 1];
        upload.extend(varint(claim));
        upload.extend_from_slice(&[0xAB; 8]);
        assert!(matches!(
            decode::<Request>(&upload),
            Err(FrameError::Malformed(END))
        ));

        // Reply::Bundle with a huge optional one-time prekey.
        let mut bundle = vec![2, 1, 0x11, 1, 0x22, 1];
        bundle.extend(varint(claim));
        bundle.extend_from_slice(&[0x33; 8]);
        assert!(matches!(
            decode::<Reply>(&bundle),
            Err(FrameError::Malformed(END))
        ));
    }
    // The same bytes with a length that fits decode, so the errors above are
    // about the length alone.
    let mut ok = send_prefix();
    ok.extend(varint(64));
    ok.extend_from_slice(&[0xC1; 64]);
    match decode::<Request>(&ok).unwrap() {
        Request::Send(e) => assert_eq!(e.body, vec![0xC1; 64]),
        other => panic!("not a send: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bodies and prekey lists encode as before and round trip.
    #[test]
    fn arbitrary_byte_strings_encode_as_before(
        body in proptest::collection::vec(any::<u8>(), 0..20_000),
        prekeys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        id in any::<u32>(),
    ) {
        let frame = ClientFrame {
            id,
            request: Request::Send(OutgoingEnvelope {
                to: "bob".into(),
                to_device: DEFAULT_DEVICE,
                id: [5; 16],
                body: body.clone(),
            }),
        };
        let bytes = same_wire::<_, old::ClientFrame>(&frame);
        let framed = encode(&frame).unwrap();
        prop_assert_eq!(&framed[crate::LEN_PREFIX..], &bytes[..]);
        prop_assert_eq!(decode::<ClientFrame>(&bytes).unwrap(), frame);

        let upload = Request::UploadPrekeys { one_time_prekeys: prekeys.clone() };
        same_wire::<_, old::Request>(&upload);
        let bundle = Reply::Bundle {
            identity: body.clone(),
            signed_prekey: prekeys.first().cloned().unwrap_or_default(),
            one_time_prekey: prekeys.last().cloned(),
        };
        same_wire::<_, old::Reply>(&bundle);
    }
}
