//! Stable error codes a server answers a request with.
//!
//! Each code has a fixed `u16` wire value, a snake_case name for logs and
//! `-o json` output, and a one-line message for people. Wire values are
//! grouped by the hundred (1xx request, 2xx authentication, 3xx users,
//! 4xx friends, 5xx groups, 6xx limits and the server) and are never reused
//! or renumbered; `0` is never a code, so a zeroed field is not mistaken for
//! one.

use core::fmt;

use serde::de::{self, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a request failed, as sent on the wire.
///
/// On the wire a code is its [`as_u16`](Self::as_u16) value (a postcard
/// varint). Deserialising a value this build does not know is an error; a
/// message that must tolerate codes from a newer peer should carry the raw
/// `u16` and call [`from_u16`](Self::from_u16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// The request could not be understood (malformed or out of place).
    BadRequest = 100,
    /// The peer speaks a protocol version this side does not support.
    UnsupportedVersion = 101,
    /// A frame, message or file exceeds a size limit.
    TooLarge = 102,
    /// The request needs a logged-in connection.
    NotAuthenticated = 200,
    /// A signature (login proof, prekey, bundle) did not verify.
    BadSignature = 201,
    /// The user may not do this (e.g. remove a member without being owner).
    NotPermitted = 202,
    /// The named user is not registered.
    UserNotExist = 300,
    /// The username is already registered.
    UserExists = 301,
    /// The user is not connected (for live-only requests such as a direct
    /// file transfer).
    Offline = 302,
    /// The two users are already friends.
    AlreadyFriend = 400,
    /// The two users are not friends.
    NotFriend = 401,
    /// A group with that name already exists.
    GroupExist = 500,
    /// No group has that name.
    GroupNotExist = 501,
    /// The user is already a member of the group.
    UserInGroup = 502,
    /// The user is not a member of the group.
    NotInGroup = 503,
    /// Too many requests in a short time; retry later.
    RateLimited = 600,
    /// A per-user quota (mailbox, prekeys, groups) is used up.
    QuotaExceeded = 601,
    /// The server's disk is full; nothing was stored.
    StorageFull = 602,
    /// The server failed in a way that is not the client's fault.
    Internal = 603,
}

impl ErrorCode {
    /// Every code, in wire-value order.
    pub const ALL: &'static [ErrorCode] = &[
        Self::BadRequest,
        Self::UnsupportedVersion,
        Self::TooLarge,
        Self::NotAuthenticated,
        Self::BadSignature,
        Self::NotPermitted,
        Self::UserNotExist,
        Self::UserExists,
        Self::Offline,
        Self::AlreadyFriend,
        Self::NotFriend,
        Self::GroupExist,
        Self::GroupNotExist,
        Self::UserInGroup,
        Self::NotInGroup,
        Self::RateLimited,
        Self::QuotaExceeded,
        Self::StorageFull,
        Self::Internal,
    ];

    /// The stable wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code with wire value `value`, if this build knows it.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|code| code.as_u16() == value)
    }

    /// The stable snake_case name, e.g. `"user_not_exist"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::NotAuthenticated => "not_authenticated",
            Self::BadSignature => "bad_signature",
            Self::NotPermitted => "not_permitted",
            Self::UserNotExist => "user_not_exist",
            Self::UserExists => "user_exists",
            Self::Offline => "offline",
            Self::AlreadyFriend => "already_friend",
            Self::NotFriend => "not_friend",
            Self::GroupExist => "group_exist",
            Self::GroupNotExist => "group_not_exist",
            Self::UserInGroup => "user_in_group",
            Self::NotInGroup => "not_in_group",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::StorageFull => "storage_full",
            Self::Internal => "internal",
        }
    }

    /// A one-line, lower-case message for people.
    pub fn message(self) -> &'static str {
        match self {
            Self::BadRequest => "bad request",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::TooLarge => "too large",
            Self::NotAuthenticated => "not logged in",
            Self::BadSignature => "signature does not verify",
            Self::NotPermitted => "not permitted",
            Self::UserNotExist => "user does not exist",
            Self::UserExists => "user already exists",
            Self::Offline => "user is offline",
            Self::AlreadyFriend => "already friends",
            Self::NotFriend => "not friends",
            Self::GroupExist => "group already exists",
            Self::GroupNotExist => "group does not exist",
            Self::UserInGroup => "user is already in the group",
            Self::NotInGroup => "user is not in the group",
            Self::RateLimited => "too many requests, try again later",
            Self::QuotaExceeded => "quota exceeded",
            Self::StorageFull => "server storage is full",
            Self::Internal => "internal server error",
        }
    }
}

impl fmt::Display for ErrorCode {
    /// Prints the human message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.as_u16()
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u16::deserialize(deserializer)?;
        Self::from_u16(value).ok_or_else(|| {
            de::Error::invalid_value(Unexpected::Unsigned(value.into()), &"a known error code")
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The wire contract. Changing a number here breaks every deployed peer.
    const PINNED: &[(ErrorCode, u16, &str)] = &[
        (ErrorCode::BadRequest, 100, "bad_request"),
        (ErrorCode::UnsupportedVersion, 101, "unsupported_version"),
        (ErrorCode::TooLarge, 102, "too_large"),
        (ErrorCode::NotAuthenticated, 200, "not_authenticated"),
        (ErrorCode::BadSignature, 201, "bad_signature"),
        (ErrorCode::NotPermitted, 202, "not_permitted"),
        (ErrorCode::UserNotExist, 300, "user_not_exist"),
        (ErrorCode::UserExists, 301, "user_exists"),
        (ErrorCode::Offline, 302, "offline"),
        (ErrorCode::AlreadyFriend, 400, "already_friend"),
        (ErrorCode::NotFriend, 401, "not_friend"),
        (ErrorCode::GroupExist, 500, "group_exist"),
        (ErrorCode::GroupNotExist, 501, "group_not_exist"),
        (ErrorCode::UserInGroup, 502, "user_in_group"),
        (ErrorCode::NotInGroup, 503, "not_in_group"),
        (ErrorCode::RateLimited, 600, "rate_limited"),
        (ErrorCode::QuotaExceeded, 601, "quota_exceeded"),
        (ErrorCode::StorageFull, 602, "storage_full"),
        (ErrorCode::Internal, 603, "internal"),
    ];

    #[test]
    fn wire_values_and_names_are_pinned() {
        assert_eq!(PINNED.len(), ErrorCode::ALL.len());
        for &(code, value, name) in PINNED {
            assert_eq!(code.as_u16(), value, "{name}");
            assert_eq!(u16::from(code), value, "{name}");
            assert_eq!(code.as_str(), name);
            assert_eq!(ErrorCode::from_u16(value), Some(code));
            assert!(ErrorCode::ALL.contains(&code), "{name} missing from ALL");
        }
    }

    #[test]
    fn values_names_and_messages_are_unique() {
        let all = ErrorCode::ALL;
        let values: HashSet<u16> = all.iter().map(|c| c.as_u16()).collect();
        let names: HashSet<&str> = all.iter().map(|c| c.as_str()).collect();
        let messages: HashSet<&str> = all.iter().map(|c| c.message()).collect();
        assert_eq!(values.len(), all.len());
        assert_eq!(names.len(), all.len());
        assert_eq!(messages.len(), all.len());
        assert!(!values.contains(&0));
    }

    #[test]
    fn names_are_snake_case_and_messages_one_lower_case_line() {
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            let message = code.message();
            assert!(!message.is_empty() && !message.contains('\n'));
            assert_eq!(message, message.to_lowercase());
            assert_eq!(code.to_string(), message);
        }
        assert_eq!(ErrorCode::UserNotExist.message(), "user does not exist");
    }

    #[test]
    fn unknown_values_are_refused() {
        for value in [0, 1, 99, 103, 304, 604, u16::MAX] {
            assert_eq!(ErrorCode::from_u16(value), None, "{value}");
            let bytes = postcard::to_stdvec(&value).unwrap();
            assert!(
                postcard::from_bytes::<ErrorCode>(&bytes).is_err(),
                "{value}"
            );
        }
    }

    #[test]
    fn serde_round_trip_is_the_u16_varint() {
        for &code in ErrorCode::ALL {
            let bytes = postcard::to_stdvec(&code).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&code.as_u16()).unwrap());
            assert_eq!(postcard::from_bytes::<ErrorCode>(&bytes).unwrap(), code);
        }
        // 300 as a postcard varint: 0b1_0101100, 0b10.
        assert_eq!(
            postcard::to_stdvec(&ErrorCode::UserNotExist).unwrap(),
            [0xAC, 0x02]
        );
    }
}
