//! The messages carried in frames: what a client asks, what a server answers
//! and what a server pushes unasked.
//!
//! ## Streams
//!
//! A client opens one QUIC connection (ALPN [`crate::ALPN`]) and, on it, one
//! bidirectional *control stream*. The server writes [`ServerFrame::Hello`]
//! first. After that every client frame is a [`ClientFrame`] (a request with
//! an id chosen by the client) and every server frame is either a
//! [`ServerFrame::Reply`] to one of those ids or a [`ServerFrame::Push`].
//! Replies may come in any order; pushes interleave with replies.
//!
//! ## Evolution
//!
//! postcard encodes enum variants by index and struct fields in order, so
//! variants and fields here are only ever appended, never reordered or
//! removed. A test pins the encoding of one value of every variant.
//!
//! ## Bytes, not types
//!
//! Keys, signatures and bundles travel as byte strings in the encodings
//! `messenger-crypto` defines; the receiver parses them into verified types at
//! its boundary. Names travel as strings and are validated (and lowercased) by
//! the receiver. Message bodies are ciphertext made on a client.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// Largest ciphertext body of one envelope. A 1:1 prekey message carrying the
/// largest padded plaintext (64 KiB + one 256-byte bucket) with its headers is
/// about 66,020 bytes; a group message about 65,950. 66 KiB covers both, and
/// stays far below [`crate::MAX_FRAME_LEN`].
pub const MAX_BODY_LEN: usize = 66 * 1024;
/// Most one-time prekeys in one upload (the crypto crate's batch limit).
pub const MAX_PREKEYS_PER_UPLOAD: usize = 200;
/// Most envelopes one [`Request::Pull`] returns.
pub const MAX_PULL: u32 = 256;
/// Most sequence numbers one [`Request::Ack`] carries.
pub const MAX_ACKS: usize = 1024;
/// Longest group name, in bytes (the same alphabet as usernames).
pub const MAX_GROUP_NAME_LEN: usize = 32;
/// Most members of a group.
pub const MAX_GROUP_MEMBERS: usize = 1000;
/// Longest server announcement text, in bytes.
pub const MAX_ANNOUNCEMENT_LEN: usize = 4096;
/// Name of the built-in public lobby, which every user may join and post to.
pub const LOBBY: &str = "lobby";
/// The one device id of v1. Addresses are (user, device) on the wire so that
/// several devices per user need no wire change later.
pub const DEFAULT_DEVICE: u32 = 1;

/// A client's message id, chosen by the sender and unique per sender (the
/// messenger client uses the send time in seconds, 8 bytes big-endian, then
/// 8 random bytes); the server stores a (sender, recipient, id) once, so a
/// resend after a lost answer is harmless.
pub type MessageId = [u8; 16];

/// The first frame on the control stream, from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// [`crate::PROTOCOL_VERSION`] of the server.
    pub version: u16,
    /// A fresh random nonce; a login signs it together with the TLS exporter
    /// value of this connection.
    pub nonce: [u8; 32],
    /// The server's Ed25519 key, which signs announcements. Learned over the
    /// pinned TLS connection.
    pub server_key: [u8; 32],
}

/// A client frame: a request with an id the client picks; the reply carries
/// the same id. With the id [`NOTIFY_ID`] the frame is a notification: the
/// server sends no reply (only [`Request::Ack`] may be sent so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Request id, echoed in the reply; [`NOTIFY_ID`] for no reply.
    pub id: u32,
    /// What is asked.
    pub request: Request,
}

/// The request id of a notification: a [`ClientFrame`] the server never
/// answers, like a JSON-RPC 2.0 notification. Only an [`Request::Ack`] may
/// be a notification (any other request so sent closes the connection with
/// `bad_request`, since it could not be answered): a client acknowledging
/// what it was pushed has no use for the `Ok`, and on a busy connection one
/// reply frame fewer per acknowledgement is measurable (docs/benchmarks.md).
/// Its errors are not reported; an acknowledgement that did not take effect
/// only means the envelope is delivered again, and the client drops the
/// duplicate.
pub const NOTIFY_ID: u32 = 0;

impl ClientFrame {
    /// Whether this frame is a notification ([`NOTIFY_ID`]).
    pub fn is_notification(&self) -> bool {
        self.id == NOTIFY_ID
    }
}

/// A server frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ServerFrame {
    /// First frame of every connection.
    Hello(ServerHello),
    /// The answer to the request with this id.
    Reply {
        /// The request's id.
        id: u32,
        /// The answer, or a typed error.
        result: Result<Reply, ErrorCode>,
    },
    /// Something the client did not ask for.
    Push(Push),
}

/// Registration of a new account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The wanted name; 1–32 of `a-z 0-9 _ . -`, case-insensitive.
    pub username: String,
    /// `PublicIdentity` encoding (Ed25519 key, X25519 key, binding signature).
    #[serde(with = "crate::wire_bytes::vec")]
    pub identity: Vec<u8>,
    /// `SignedPrekey` encoding.
    #[serde(with = "crate::wire_bytes::vec")]
    pub signed_prekey: Vec<u8>,
    /// `OneTimePrekey` encodings.
    #[serde(with = "crate::wire_bytes::list")]
    pub one_time_prekeys: Vec<Vec<u8>>,
    /// A registration token, when the server requires invitations.
    pub invite: Option<String>,
}

/// Proof of identity for this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// Who logs in.
    pub username: String,
    /// Ed25519 signature over `"messenger/1 login" ‖ hello nonce ‖ exporter`,
    /// exporter = TLS exporter, label `EXPORTER-Channel-Binding`, empty
    /// context, 32 bytes (RFC 9266).
    #[serde(with = "crate::wire_bytes::vec")]
    pub signature: Vec<u8>,
}

/// An envelope to store and forward: routing fields and ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingEnvelope {
    /// Recipient user.
    pub to: String,
    /// Recipient device ([`DEFAULT_DEVICE`] in v1).
    pub to_device: u32,
    /// Sender-chosen id for de-duplication.
    pub id: MessageId,
    /// Ciphertext, at most [`MAX_BODY_LEN`] bytes.
    #[serde(with = "crate::wire_bytes::vec")]
    pub body: Vec<u8>,
}

/// A group roster signed by the group's owner: the server cannot add a
/// member on its own, because clients check this signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoster {
    /// Group name.
    pub group: String,
    /// Strictly increasing with every change.
    pub version: u64,
    /// The owner, who signs.
    pub owner: String,
    /// Members, sorted, without duplicates, the owner included.
    pub members: Vec<String>,
    /// Owner's Ed25519 signature (context `messenger/1 group-roster`) over
    /// [`roster_signed_bytes`].
    #[serde(with = "crate::wire_bytes::vec")]
    pub signature: Vec<u8>,
}

/// A server announcement, signed by the server key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    /// Seconds since the Unix epoch when the operator issued it.
    pub issued_at: u64,
    /// The text, at most [`MAX_ANNOUNCEMENT_LEN`] bytes.
    pub text: String,
    /// Ed25519 signature by the server key (context `messenger/1 announce`)
    /// over [`announcement_signed_bytes`].
    #[serde(with = "crate::wire_bytes::vec")]
    pub signature: Vec<u8>,
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Create an account; answered [`Reply::Ok`].
    Register(Register),
    /// Log in on this connection; answered [`Reply::LoggedIn`].
    Login(Login),
    /// Fetch a user's prekey bundle; answered [`Reply::Bundle`]. Consumes one
    /// one-time prekey; rate limited per requester.
    FetchBundle {
        /// Whose bundle.
        username: String,
    },
    /// How many one-time prekeys the server still holds for me.
    PrekeyStatus,
    /// Add one-time prekeys; answered [`Reply::PrekeyStatus`].
    UploadPrekeys {
        /// `OneTimePrekey` encodings with ids never used before.
        #[serde(with = "crate::wire_bytes::list")]
        one_time_prekeys: Vec<Vec<u8>>,
    },
    /// Replace my signed prekey; answered [`Reply::Ok`].
    RotateSignedPrekey {
        /// `SignedPrekey` encoding.
        #[serde(with = "crate::wire_bytes::vec")]
        signed_prekey: Vec<u8>,
    },
    /// Store and forward a 1:1 envelope; answered [`Reply::Accepted`] only
    /// once it is durably stored.
    Send(OutgoingEnvelope),
    /// Send one ciphertext to every member of a group (or the lobby); the
    /// server fans it out to each member's mailbox.
    GroupSend {
        /// Group name.
        group: String,
        /// Sender-chosen id.
        id: MessageId,
        /// Ciphertext (a sender-key message).
        #[serde(with = "crate::wire_bytes::vec")]
        body: Vec<u8>,
    },
    /// Fetch stored envelopes after a sequence number; answered
    /// [`Reply::Envelopes`].
    Pull {
        /// Only envelopes with a larger sequence number.
        after: u64,
        /// At most this many ([`MAX_PULL`] at most).
        max: u32,
    },
    /// Delete delivered envelopes; only after they are safely stored locally.
    Ack {
        /// Sequence numbers of my envelopes.
        seqs: Vec<u64>,
    },
    /// Who is online; answered [`Reply::Users`].
    Users,
    /// Ask to become friends (works when the other is offline).
    FriendRequest {
        /// The other user.
        username: String,
    },
    /// Accept a friend request.
    FriendAccept {
        /// Who asked.
        username: String,
    },
    /// Decline a friend request.
    FriendDecline {
        /// Who asked.
        username: String,
    },
    /// End a friendship.
    FriendRemove {
        /// The friend.
        username: String,
    },
    /// My friends and pending requests; answered [`Reply::Friends`].
    FriendList,
    /// Create a group I own, with its first signed roster.
    GroupCreate(SignedRoster),
    /// Ask the owner of a group to add me; the owner's client answers with a
    /// [`Request::GroupUpdate`].
    GroupJoin {
        /// Group name.
        group: String,
    },
    /// Owner only: publish a new signed roster (add or remove members).
    GroupUpdate(SignedRoster),
    /// Leave a group (the owner's client then publishes a roster without me).
    GroupLeave {
        /// Group name.
        group: String,
    },
    /// The current signed roster; answered [`Reply::Roster`].
    GroupMembers {
        /// Group name.
        group: String,
    },
    /// Groups I am in; answered [`Reply::Groups`].
    MyGroups,
    /// Operator only (signed by the server key; no login needed): broadcast
    /// an announcement.
    Announce(SignedAnnouncement),
    /// A user's directory entry, without taking a one-time prekey; answered
    /// [`Reply::User`]. Clients use it to check a contact's current identity
    /// key before sending and to compute safety numbers.
    Lookup {
        /// Whom.
        username: String,
    },
    /// Who is online, a page at a time in name order; answered
    /// [`Reply::UsersPage`]. ([`Request::Users`] answers the first page
    /// only and does not say whether more follow.)
    UsersAfter {
        /// Only names after this one (exclusive): `None` for the first
        /// page, then the last name of the page before.
        after: Option<String>,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reply {
    /// Done; nothing to report.
    Ok,
    /// Logged in.
    LoggedIn {
        /// Envelopes waiting in my mailbox.
        pending: u32,
        /// One-time prekeys the server still holds for me.
        prekeys: u32,
    },
    /// A prekey bundle's parts, in `messenger-crypto` encodings.
    Bundle {
        /// `PublicIdentity`.
        #[serde(with = "crate::wire_bytes::vec")]
        identity: Vec<u8>,
        /// `SignedPrekey`.
        #[serde(with = "crate::wire_bytes::vec")]
        signed_prekey: Vec<u8>,
        /// `OneTimePrekey`, absent when none is left.
        #[serde(with = "crate::wire_bytes::option")]
        one_time_prekey: Option<Vec<u8>>,
    },
    /// My one-time prekey count.
    PrekeyStatus {
        /// Still stored.
        remaining: u32,
        /// Whether that is below the low-water mark (upload more).
        low: bool,
    },
    /// The envelope is durably held: committed to the recipient's mailbox,
    /// or, delivered live to a recipient online, acknowledged by the
    /// recipient (who stores before acknowledging; docs/protocol.md §4).
    Accepted {
        /// Its sequence number in the recipient's mailbox, or its live
        /// delivery id (top bit set) when delivered live; 0 for a
        /// group send.
        seq: u64,
        /// True when this id was already stored earlier (a resend).
        duplicate: bool,
    },
    /// Stored envelopes, oldest first.
    Envelopes {
        /// The envelopes.
        envelopes: Vec<Envelope>,
        /// More are waiting.
        more: bool,
    },
    /// Online users.
    Users {
        /// Name and identity key of each.
        users: Vec<UserInfo>,
    },
    /// My friends and requests.
    Friends {
        /// Friends, with presence.
        friends: Vec<UserInfo>,
        /// Requests waiting for my answer.
        incoming: Vec<String>,
        /// My requests waiting for theirs.
        outgoing: Vec<String>,
    },
    /// A group's current roster.
    Roster(SignedRoster),
    /// Group names.
    Groups {
        /// Names, sorted.
        groups: Vec<String>,
    },
    /// One user's directory entry; `online` follows the server's
    /// users policy (false when the asker may not see it).
    User(UserInfo),
    /// A page of online users, sorted by name.
    UsersPage {
        /// Name and identity key of each.
        users: Vec<UserInfo>,
        /// More follow: ask again with `after` set to the last name here.
        more: bool,
    },
}

/// A user as others see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Name.
    pub username: String,
    /// `PublicIdentity` encoding.
    #[serde(with = "crate::wire_bytes::vec")]
    pub identity: Vec<u8>,
    /// Connected now.
    pub online: bool,
}

/// An envelope as delivered to its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sequence number in my mailbox, or a live delivery id
    /// (top bit set) for one pushed before it was stored; either
    /// way, acknowledge it by this number with [`Request::Ack`].
    pub seq: u64,
    /// Sender (set by the server from the sender's login).
    pub from: String,
    /// Sender's device.
    pub from_device: u32,
    /// The group it was sent to, for a group or lobby message.
    pub group: Option<String>,
    /// The sender's message id.
    pub id: MessageId,
    /// When the server accepted it, seconds since the Unix epoch.
    pub sent_at: u64,
    /// Ciphertext.
    #[serde(with = "crate::wire_bytes::vec")]
    pub body: Vec<u8>,
}

/// A [`Push::Envelope`] frame made from borrowed parts: it serializes to
/// exactly the bytes of `ServerFrame::Push(Push::Envelope(envelope))` with
/// the same fields, so a server can frame an envelope it keeps (for the
/// stored path) without first copying its body into an owned [`Envelope`].
/// A test compares the two encodings.
#[derive(Clone, Copy)]
pub struct EnvelopePush<'a> {
    /// As [`Envelope::seq`].
    pub seq: u64,
    /// As [`Envelope::from`].
    pub from: &'a str,
    /// As [`Envelope::from_device`].
    pub from_device: u32,
    /// As [`Envelope::group`].
    pub group: Option<&'a str>,
    /// As [`Envelope::id`].
    pub id: &'a MessageId,
    /// As [`Envelope::sent_at`].
    pub sent_at: u64,
    /// As [`Envelope::body`].
    pub body: &'a [u8],
}

impl std::fmt::Debug for EnvelopePush<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body is ciphertext, but its bytes say nothing useful in a log.
        f.debug_struct("EnvelopePush")
            .field("seq", &self.seq)
            .field("from", &self.from)
            .field("group", &self.group)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Variant index of [`ServerFrame::Push`] (pinned with the others by the
/// encoding tests).
const SERVER_FRAME_PUSH: u32 = 2;
/// Variant index of [`Push::Envelope`].
const PUSH_ENVELOPE: u32 = 0;

impl Serialize for EnvelopePush<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// `Push::Envelope(..)`.
        struct AsPush<'a, 'b>(&'b EnvelopePush<'a>);
        /// The `Envelope` struct's fields, in their order.
        struct AsEnvelope<'a, 'b>(&'b EnvelopePush<'a>);
        impl Serialize for AsPush<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_newtype_variant(
                    "Push",
                    PUSH_ENVELOPE,
                    "Envelope",
                    &AsEnvelope(self.0),
                )
            }
        }
        impl Serialize for AsEnvelope<'_, '_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct as _;
                let e = self.0;
                let mut s = serializer.serialize_struct("Envelope", 7)?;
                s.serialize_field("seq", &e.seq)?;
                s.serialize_field("from", e.from)?;
                s.serialize_field("from_device", &e.from_device)?;
                s.serialize_field("group", &e.group)?;
                s.serialize_field("id", e.id)?;
                s.serialize_field("sent_at", &e.sent_at)?;
                s.serialize_field("body", &crate::wire_bytes::Bytes(e.body))?;
                s.end()
            }
        }
        serializer.serialize_newtype_variant(
            "ServerFrame",
            SERVER_FRAME_PUSH,
            "Push",
            &AsPush(self),
        )
    }
}

/// Something the server tells a client unasked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Push {
    /// A new envelope for me: kept until I acknowledge it, in my mailbox,
    /// or in the server's memory for a live delivery (stored if not
    /// acknowledged in time).
    Envelope(Envelope),
    /// A friend came online or went offline. Coming online carries the
    /// friend's public identity (the old "online message with the public key").
    Presence {
        /// Who.
        username: String,
        /// Now connected.
        online: bool,
        /// `PublicIdentity` encoding.
        #[serde(with = "crate::wire_bytes::vec")]
        identity: Vec<u8>,
    },
    /// Someone asks to be my friend.
    FriendRequest {
        /// Who.
        from: String,
    },
    /// An answer to my friend request.
    FriendAnswer {
        /// Who answered.
        from: String,
        /// Accepted or declined.
        accepted: bool,
    },
    /// A friend ended our friendship.
    FriendRemoved {
        /// Who.
        from: String,
    },
    /// A group's roster changed.
    GroupChanged(SignedRoster),
    /// To a group's owner: someone asks to join.
    GroupJoinRequest {
        /// Group name.
        group: String,
        /// Who asks.
        username: String,
    },
    /// An operator announcement.
    Announcement(SignedAnnouncement),
    /// My one-time prekeys run low: upload more.
    PrekeysLow {
        /// Still stored.
        remaining: u32,
    },
    /// Another connection logged in as me; this one is closed next.
    Replaced,
    /// To a group's owner: a member wants to leave; the owner's client
    /// publishes a roster without them (only the owner can sign one).
    GroupLeaveRequest {
        /// Group name.
        group: String,
        /// Who leaves.
        username: String,
    },
}

/// The bytes an owner signs for a roster (after the signing context label):
/// `lp8(group) ‖ version(u64 BE) ‖ lp8(owner) ‖ count(u16 BE) ‖ lp8(member)…`,
/// members in the order given (senders sort them; receivers check the order).
/// Returns `None` when a name is longer than 255 bytes or there are more than
/// 65,535 members, which no valid roster has.
pub fn roster_signed_bytes(
    group: &str,
    version: u64,
    owner: &str,
    members: &[String],
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(2 + group.len() + 8 + owner.len() + 2 + 33 * members.len());
    push_lp8(&mut out, group)?;
    out.extend_from_slice(&version.to_be_bytes());
    push_lp8(&mut out, owner)?;
    out.extend_from_slice(&u16::try_from(members.len()).ok()?.to_be_bytes());
    for m in members {
        push_lp8(&mut out, m)?;
    }
    Some(out)
}

/// The bytes the server key signs for an announcement (after the signing
/// context label): `issued_at(u64 BE) ‖ len(u32 BE) ‖ text`.
pub fn announcement_signed_bytes(issued_at: u64, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + text.len());
    out.extend_from_slice(&issued_at.to_be_bytes());
    out.extend_from_slice(&u32::try_from(text.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

fn push_lp8(out: &mut Vec<u8>, s: &str) -> Option<()> {
    out.push(u8::try_from(s.len()).ok()?);
    out.extend_from_slice(s.as_bytes());
    Some(())
}

#[cfg(test)]
mod wire_compat;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    fn roster() -> SignedRoster {
        SignedRoster {
            group: "g".into(),
            version: 2,
            owner: "alice".into(),
            members: vec!["alice".into(), "bob".into()],
            signature: vec![7; 64],
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            seq: 9,
            from: "bob".into(),
            from_device: DEFAULT_DEVICE,
            group: None,
            id: [1; 16],
            sent_at: 1_700_000_000,
            body: vec![0xC1; 3],
        }
    }

    /// One value of every variant, so a reordering or a changed field fails
    /// the pinned encodings below.
    pub(super) fn samples() -> (Vec<Request>, Vec<Reply>, Vec<Push>) {
        let requests = vec![
            Request::Register(Register {
                username: "alice".into(),
                identity: vec![1],
                signed_prekey: vec![2],
                one_time_prekeys: vec![vec![3]],
                invite: Some("t".into()),
            }),
            Request::Login(Login {
                username: "alice".into(),
                signature: vec![4; 2],
            }),
            Request::FetchBundle {
                username: "bob".into(),
            },
            Request::PrekeyStatus,
            Request::UploadPrekeys {
                one_time_prekeys: vec![vec![5]],
            },
            Request::RotateSignedPrekey {
                signed_prekey: vec![6],
            },
            Request::Send(OutgoingEnvelope {
                to: "bob".into(),
                to_device: 1,
                id: [2; 16],
                body: vec![7],
            }),
            Request::GroupSend {
                group: "g".into(),
                id: [3; 16],
                body: vec![8],
            },
            Request::Pull { after: 1, max: 2 },
            Request::Ack { seqs: vec![1, 2] },
            Request::Users,
            Request::FriendRequest {
                username: "bob".into(),
            },
            Request::FriendAccept {
                username: "bob".into(),
            },
            Request::FriendDecline {
                username: "bob".into(),
            },
            Request::FriendRemove {
                username: "bob".into(),
            },
            Request::FriendList,
            Request::GroupCreate(roster()),
            Request::GroupJoin { group: "g".into() },
            Request::GroupUpdate(roster()),
            Request::GroupLeave { group: "g".into() },
            Request::GroupMembers { group: "g".into() },
            Request::MyGroups,
            Request::Announce(SignedAnnouncement {
                issued_at: 5,
                text: "hi".into(),
                signature: vec![9],
            }),
            Request::Lookup {
                username: "bob".into(),
            },
            Request::UsersAfter {
                after: Some("bob".into()),
            },
        ];
        let replies = vec![
            Reply::Ok,
            Reply::LoggedIn {
                pending: 1,
                prekeys: 2,
            },
            Reply::Bundle {
                identity: vec![1],
                signed_prekey: vec![2],
                one_time_prekey: None,
            },
            Reply::PrekeyStatus {
                remaining: 3,
                low: true,
            },
            Reply::Accepted {
                seq: 4,
                duplicate: false,
            },
            Reply::Envelopes {
                envelopes: vec![envelope()],
                more: false,
            },
            Reply::Users {
                users: vec![UserInfo {
                    username: "bob".into(),
                    identity: vec![1],
                    online: true,
                }],
            },
            Reply::Friends {
                friends: vec![],
                incoming: vec!["c".into()],
                outgoing: vec![],
            },
            Reply::Roster(roster()),
            Reply::Groups {
                groups: vec!["g".into()],
            },
            Reply::User(UserInfo {
                username: "bob".into(),
                identity: vec![1],
                online: false,
            }),
            Reply::UsersPage {
                users: vec![UserInfo {
                    username: "bob".into(),
                    identity: vec![1],
                    online: true,
                }],
                more: true,
            },
        ];
        let pushes = vec![
            Push::Envelope(envelope()),
            Push::Presence {
                username: "bob".into(),
                online: true,
                identity: vec![1],
            },
            Push::FriendRequest { from: "bob".into() },
            Push::FriendAnswer {
                from: "bob".into(),
                accepted: true,
            },
            Push::FriendRemoved { from: "bob".into() },
            Push::GroupChanged(roster()),
            Push::GroupJoinRequest {
                group: "g".into(),
                username: "bob".into(),
            },
            Push::Announcement(SignedAnnouncement {
                issued_at: 1,
                text: "x".into(),
                signature: vec![],
            }),
            Push::PrekeysLow { remaining: 1 },
            Push::Replaced,
            Push::GroupLeaveRequest {
                group: "g".into(),
                username: "bob".into(),
            },
        ];
        (requests, replies, pushes)
    }

    #[test]
    fn every_message_round_trips() {
        let (requests, replies, pushes) = samples();
        for (i, request) in requests.into_iter().enumerate() {
            let frame = ClientFrame {
                id: i as u32,
                request,
            };
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode::<ClientFrame>(&bytes[4..]).unwrap(), frame);
        }
        for (i, reply) in replies.into_iter().enumerate() {
            let frame = ServerFrame::Reply {
                id: i as u32,
                result: Ok(reply),
            };
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode::<ServerFrame>(&bytes[4..]).unwrap(), frame);
        }
        for push in pushes {
            let frame = ServerFrame::Push(push);
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode::<ServerFrame>(&bytes[4..]).unwrap(), frame);
        }
        let err = ServerFrame::Reply {
            id: 1,
            result: Err(ErrorCode::UserNotExist),
        };
        assert_eq!(
            decode::<ServerFrame>(&encode(&err).unwrap()[4..]).unwrap(),
            err
        );
    }

    #[test]
    fn a_borrowed_envelope_push_encodes_as_the_owned_one() {
        let mut grouped = envelope();
        grouped.group = Some("friends".into());
        grouped.body = (0..=255).collect();
        let mut empty = envelope();
        empty.body.clear();
        empty.from = "a-much-longer-sender.name_32".into();
        empty.seq = u64::MAX;
        for e in [envelope(), grouped, empty] {
            let borrowed = EnvelopePush {
                seq: e.seq,
                from: &e.from,
                from_device: e.from_device,
                group: e.group.as_deref(),
                id: &e.id,
                sent_at: e.sent_at,
                body: &e.body,
            };
            let owned = ServerFrame::Push(Push::Envelope(e.clone()));
            assert_eq!(encode(&borrowed).unwrap(), encode(&owned).unwrap());
        }
    }

    /// The variant index is the first byte of a request body: pinned, so a
    /// reordering of [`Request`] breaks this test, not the wire.
    #[test]
    fn variant_indices_are_pinned() {
        let (requests, replies, pushes) = samples();
        for (i, r) in requests.iter().enumerate() {
            let body = postcard::to_stdvec(r).unwrap();
            assert_eq!(usize::from(body[0]), i, "{r:?}");
        }
        for (i, r) in replies.iter().enumerate() {
            let body = postcard::to_stdvec(r).unwrap();
            assert_eq!(usize::from(body[0]), i, "{r:?}");
        }
        for (i, p) in pushes.iter().enumerate() {
            let body = postcard::to_stdvec(p).unwrap();
            assert_eq!(usize::from(body[0]), i, "{p:?}");
        }
        assert_eq!((requests.len(), replies.len(), pushes.len()), (25, 12, 11));
    }

    #[test]
    fn hello_layout() {
        let hello = ServerFrame::Hello(ServerHello {
            version: crate::PROTOCOL_VERSION,
            nonce: [0xAA; 32],
            server_key: [0xBB; 32],
        });
        let body = postcard::to_stdvec(&hello).unwrap();
        // variant 0, version 1 as a varint, then the two arrays raw.
        assert_eq!(&body[..2], &[0, 1]);
        assert_eq!(&body[2..34], &[0xAA; 32]);
        assert_eq!(&body[34..], &[0xBB; 32]);
    }

    #[test]
    fn signed_bytes_layouts() {
        let members = vec!["alice".to_string(), "bob".to_string()];
        let b = roster_signed_bytes("g", 2, "alice", &members).unwrap();
        let mut want = vec![1, b'g'];
        want.extend_from_slice(&2u64.to_be_bytes());
        want.push(5);
        want.extend_from_slice(b"alice");
        want.extend_from_slice(&2u16.to_be_bytes());
        want.push(5);
        want.extend_from_slice(b"alice");
        want.push(3);
        want.extend_from_slice(b"bob");
        assert_eq!(b, want);
        assert!(roster_signed_bytes(&"x".repeat(256), 1, "a", &[]).is_none());
        // Different versions or member lists sign different bytes.
        assert_ne!(b, roster_signed_bytes("g", 3, "alice", &members).unwrap());
        assert_ne!(
            b,
            roster_signed_bytes("g", 2, "alice", &members[..1]).unwrap()
        );

        let a = announcement_signed_bytes(7, "hi");
        assert_eq!(
            a,
            [&7u64.to_be_bytes()[..], &2u32.to_be_bytes(), b"hi"].concat()
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            &[][..],
            &[99],
            &[0, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F],
            &[1, 200],
        ] {
            assert!(decode::<ClientFrame>(body).is_err());
            assert!(decode::<ServerFrame>(body).is_err());
        }
    }
}
