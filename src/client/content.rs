//! What a message says, and the two layers of a body (spec §14).
//!
//! - [`Payload`]: the plaintext one device encrypts for another: the
//!   message id and recipient user it belongs to (so the server cannot
//!   relabel a body), the sender's clock, and a typed [`Content`];
//! - [`Envelope`]: what travels as a `Body`'s `data`: a version tag, the
//!   Olm message type (pre-key or normal) and the Olm ciphertext.
//!
//! Both are postcard encodings of append-only enums whose tag is the
//! version, and both decoders reject trailing bytes. This module is pure:
//! the Olm sessions that turn a payload into an envelope live in
//! [`super::e2e`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::attachment::FileRef;
use crate::wire::{GroupId, MAX_BODY_LEN, MsgId};

/// What a message says. Append-only: a variant's position is its tag on
/// the wire, so new kinds (replies, forwards, edits, deletes, receipts)
/// are added at the end and an older client reports them as unsupported.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Content {
    /// A text message.
    Text(String),
    /// Not shown: the sender could not decrypt a message from this device
    /// and started a fresh Olm session with it (this body is the first
    /// message of that session).
    SessionReset,
    /// A text that replies to an earlier message of the conversation.
    Reply {
        /// The text.
        text: String,
        /// The id of the message it replies to.
        reply_to: MsgId,
        /// That message's sender and (the start of) its text, shown where
        /// the quoted message is not on the device.
        quote: QuoteText,
    },
    /// A text forwarded from another message.
    Forward {
        /// The text.
        text: String,
        /// How many times it has been forwarded, this time included (1
        /// for a message forwarded by the user who received it).
        forwards: u32,
    },
    /// A new text for an earlier message of the same sender's user in the
    /// same conversation; the message keeps its id.
    Edit {
        /// The message edited.
        target: MsgId,
        /// Its new text.
        text: String,
    },
    /// Deletes an earlier message of the same sender's user in the same
    /// conversation, for everyone.
    Delete {
        /// The message deleted.
        target: MsgId,
    },
    /// To the sender's own other devices: the user's setting for read
    /// receipts (the latest by `ts_ms` wins).
    Settings {
        /// Whether read receipts are sent (and shown).
        read_receipts: bool,
    },
    /// To the sender's own other devices: the user has read these
    /// messages from `peer` (how read state reaches them while read
    /// receipts are off, so that no receipt frame says so to `peer`).
    Read {
        /// Who sent the messages.
        peer: String,
        /// The messages, at most [`crate::wire::MAX_RECEIPT_IDS`].
        ids: Vec<MsgId>,
    },
    /// The sender's user reacts to a message of the conversation (its
    /// own or the other user's) with one emoji, replacing its earlier
    /// reaction to it, or takes its reaction back (`emoji: None`); the
    /// latest by `ts_ms` wins.
    Reaction {
        /// The message reacted to.
        target: MsgId,
        /// That message's sender (messages are known by sender and id).
        target_from: String,
        /// One grapheme cluster of at most [`MAX_EMOJI_LEN`] bytes (see
        /// [`valid_emoji`]); `None` removes the reaction.
        emoji: Option<String>,
    },
    /// Only ever in an ephemeral body (spec §5.6): the sender's user is
    /// writing in its conversation with `to` (`active`), or stopped. A
    /// recipient shows it for [`TYPING_SHOWN`] unless another comes, and
    /// never stores it.
    Typing {
        /// Writing now (`true`), or stopped.
        active: bool,
    },
    /// To the sender's own other devices: who may see the user's presence,
    /// everyone or nobody (the latest by `ts_ms` wins). The device where it
    /// changed told the server (`SetLastSeen`), which enforces it.
    LastSeen {
        /// Everyone (`true`) or nobody.
        everyone: bool,
    },
    /// A file (photo, voice note, document): its blob's id and key, and
    /// what it is (spec §14.8), with a caption; `forwards` as for
    /// [`Content::Forward`] (0: its sender's own).
    File {
        /// The file.
        file: FileRef,
        /// A text shown with it (may be empty).
        caption: String,
        /// How many times it has been forwarded, this time included.
        forwards: u32,
    },
    /// Over Olm, to one device of a group's member: the sender device's
    /// Megolm session for the group, from its current message on (spec
    /// §14.9). Not shown.
    GroupKey {
        /// The group.
        group: GroupId,
        /// vodozemac's `SessionKey` bytes (version, index, ratchet,
        /// signing key, signature).
        session_key: Bytes,
    },
    /// A group's title: over Megolm to the group when an admin renames
    /// it, over Olm to a device that joins it (spec §14.9). Not shown as a
    /// message.
    GroupTitle {
        /// The group.
        group: GroupId,
        /// At most [`MAX_TITLE_LEN`] bytes.
        title: String,
    },
}

/// The longest group title, in bytes of UTF-8.
pub const MAX_TITLE_LEN: usize = 100;

/// A group message's body (spec §14.9): the sender device's Megolm
/// session it was made with (its Ed25519 key, which is its id) and the
/// Megolm message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct GroupEnvelope {
    /// The session id: the session's public signing key.
    pub session: [u8; 32],
    /// vodozemac's `MegolmMessage::to_bytes`.
    pub ciphertext: Bytes,
}

#[derive(Serialize, Deserialize)]
enum VersionedGroupEnvelope {
    V1 { session: [u8; 32], ciphertext: Bytes },
}

impl GroupEnvelope {
    /// The body bytes.
    pub fn encode(&self) -> Bytes {
        let v = VersionedGroupEnvelope::V1 {
            session: self.session,
            ciphertext: self.ciphertext.clone(),
        };
        Bytes::from(postcard::to_stdvec(&v).expect("an envelope always encodes"))
    }

    /// Reads body bytes.
    ///
    /// # Errors
    /// [`BodyError::Unreadable`] for an unknown version, trailing bytes or
    /// damage.
    pub fn decode(body: &[u8]) -> Result<GroupEnvelope, BodyError> {
        match take_all::<VersionedGroupEnvelope>(body)? {
            VersionedGroupEnvelope::V1 { session, ciphertext } => Ok(GroupEnvelope { session, ciphertext }),
        }
    }
}

/// How long a typing indicator shows unless another comes.
pub const TYPING_SHOWN: std::time::Duration = std::time::Duration::from_secs(6);
/// How often, at most, a client says again that its user is typing.
pub const TYPING_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// The most bytes a reaction's emoji may have.
pub const MAX_EMOJI_LEN: usize = 32;

/// Whether `emoji` may be a reaction: one grapheme cluster (an emoji with
/// its modifiers and joiners is one), at most [`MAX_EMOJI_LEN`] bytes, not
/// a control character or white space.
pub fn valid_emoji(emoji: &str) -> bool {
    use unicode_segmentation::UnicodeSegmentation;
    !emoji.is_empty()
        && emoji.len() <= MAX_EMOJI_LEN
        && emoji.graphemes(true).count() == 1
        && !emoji.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// What a reply carries of the message it quotes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct QuoteText {
    /// The quoted message's sender (user).
    pub from: String,
    /// The start of its text, at most [`QUOTE_LEN`] bytes.
    pub text: String,
}

/// The most of a quoted text a reply carries, in bytes.
pub const QUOTE_LEN: usize = 200;

/// The start of `text`, at most [`QUOTE_LEN`] bytes, cut at a character
/// boundary.
pub fn quote_of(text: &str) -> String {
    if text.len() <= QUOTE_LEN {
        return text.to_owned();
    }
    let mut end = QUOTE_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The plaintext of one body.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payload {
    /// The message id of the `Send` carrying it; a recipient checks it
    /// against the id the server delivered.
    pub id: MsgId,
    /// The user the message was sent to; checked against the delivery too.
    pub to: String,
    /// When the sender wrote it, by the sender's clock (ms since the epoch).
    pub ts_ms: u64,
    /// What it says.
    pub content: Content,
}

/// The encoded forms of a payload. Append-only: the postcard tag is the
/// version.
#[derive(Serialize, Deserialize)]
enum VersionedPayload {
    V1 {
        id: MsgId,
        to: String,
        ts_ms: u64,
        content: Content,
    },
}

/// The two kinds of Olm message (vodozemac's message types 0 and 1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum OlmKind {
    /// Starts a session: carries the sender's identity key, the base key
    /// and the one-time key it used.
    PreKey,
    /// A message of an established session.
    Normal,
}

impl OlmKind {
    /// vodozemac's number for the kind.
    pub fn to_olm(self) -> usize {
        match self {
            OlmKind::PreKey => 0,
            OlmKind::Normal => 1,
        }
    }

    /// The kind for vodozemac's number.
    pub fn from_olm(n: usize) -> Option<OlmKind> {
        match n {
            0 => Some(OlmKind::PreKey),
            1 => Some(OlmKind::Normal),
            _ => None,
        }
    }
}

/// A body as it travels: the Olm message for one device.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    /// Pre-key or normal.
    pub kind: OlmKind,
    /// The Olm message bytes (vodozemac's `to_parts` encoding).
    pub ciphertext: Bytes,
}

#[derive(Serialize, Deserialize)]
enum VersionedEnvelope {
    V1 { kind: OlmKind, ciphertext: Bytes },
}

/// A body that cannot be made or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BodyError {
    /// The message would not fit in a body once encrypted.
    #[error("message too long: {len} bytes encoded, at most {max}")]
    TooLong {
        /// Encoded length (plaintext plus the most encryption adds).
        len: usize,
        /// [`MAX_BODY_LEN`].
        max: usize,
    },
    /// The text is longer than a message may carry.
    #[error("message too long: {len} bytes, at most {max}")]
    TextTooLong {
        /// Its length in bytes (UTF-8).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not an envelope or payload this build understands.
    #[error("unreadable message body")]
    Unreadable,
}

/// The most that Olm and the envelope add to a payload, besides padding
/// it to a whole AES block: a pre-key message's three keys and the
/// message's ratchet key (34 bytes each with their tags), its counter,
/// MAC and field headers, and the envelope's tags.
pub const SEAL_OVERHEAD: usize = 4 * 34 + 64;

/// How long the body of a payload of `len` bytes can get.
pub fn sealed_len_bound(len: usize) -> usize {
    (len / 16 + 1) * 16 + SEAL_OVERHEAD
}

impl Payload {
    /// Encodes the payload, refusing one that could not fit in a body
    /// once encrypted.
    ///
    /// # Errors
    /// [`BodyError::TooLong`].
    pub fn encode(&self) -> Result<Vec<u8>, BodyError> {
        let v = VersionedPayload::V1 {
            id: self.id,
            to: self.to.clone(),
            ts_ms: self.ts_ms,
            content: self.content.clone(),
        };
        let bytes = postcard::to_stdvec(&v).map_err(|_| BodyError::Unreadable)?;
        let bound = sealed_len_bound(bytes.len());
        if bound > MAX_BODY_LEN {
            return Err(BodyError::TooLong {
                len: bound,
                max: MAX_BODY_LEN,
            });
        }
        Ok(bytes)
    }

    /// Decodes a payload.
    ///
    /// # Errors
    /// [`BodyError::Unreadable`] for an unknown version or content kind,
    /// trailing bytes or damage.
    pub fn decode(bytes: &[u8]) -> Result<Payload, BodyError> {
        match take_all::<VersionedPayload>(bytes)? {
            VersionedPayload::V1 { id, to, ts_ms, content } => Ok(Payload { id, to, ts_ms, content }),
        }
    }
}

impl Envelope {
    /// The body bytes.
    pub fn encode(&self) -> Bytes {
        let v = VersionedEnvelope::V1 {
            kind: self.kind,
            ciphertext: self.ciphertext.clone(),
        };
        Bytes::from(postcard::to_stdvec(&v).expect("an envelope always encodes"))
    }

    /// Reads body bytes.
    ///
    /// # Errors
    /// [`BodyError::Unreadable`] for an unknown version, trailing bytes or
    /// damage.
    pub fn decode(body: &[u8]) -> Result<Envelope, BodyError> {
        match take_all::<VersionedEnvelope>(body)? {
            VersionedEnvelope::V1 { kind, ciphertext } => Ok(Envelope { kind, ciphertext }),
        }
    }
}

fn take_all<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, BodyError> {
    let (v, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|_| BodyError::Unreadable)?;
    if !rest.is_empty() {
        return Err(BodyError::Unreadable);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn payloads_round_trip(
            id: [u8; 16],
            to in "[a-z0-9_.]{3,32}",
            ts_ms: u64,
            text in ".{0,300}",
            kind in 0u8..14,
            other: [u8; 16],
            other_blob: [u8; 32],
            n: u32,
            flag: bool,
            ids in proptest::collection::vec(any::<[u8; 16]>(), 0..40),
        ) {
            let content = match kind {
                0 => Content::Text(text),
                1 => Content::SessionReset,
                2 => Content::Reply {
                    text: text.clone(),
                    reply_to: MsgId(other),
                    quote: QuoteText { from: to.clone(), text: quote_of(&text) },
                },
                3 => Content::Forward { text, forwards: n },
                4 => Content::Edit { target: MsgId(other), text },
                5 => Content::Delete { target: MsgId(other) },
                6 => Content::Settings { read_receipts: flag },
                7 => Content::Read { peer: to.clone(), ids: ids.into_iter().map(MsgId).collect() },
                8 => Content::Reaction {
                    target: MsgId(other),
                    target_from: to.clone(),
                    emoji: flag.then(|| "👍🏽".to_owned()),
                },
                9 => Content::Typing { active: flag },
                10 => Content::LastSeen { everyone: flag },
                11 => Content::File {
                    file: crate::client::attachment::FileRef {
                        blob: crate::wire::BlobId(other_blob),
                        key: crate::client::attachment::FileKey(other_blob),
                        size: u64::from(n),
                        sha256: other_blob,
                        media_type: "image/png".into(),
                        name: quote_of(&text),
                        thumbnail: flag.then(|| Bytes::from(vec![7u8; 100])),
                    },
                    caption: text,
                    forwards: n % 7,
                },
                12 => Content::GroupKey { group: GroupId(other), session_key: Bytes::from(ids.concat()) },
                _ => Content::GroupTitle { group: GroupId(other), title: text },
            };
            let p = Payload {
                id: MsgId(id),
                to,
                ts_ms,
                content,
            };
            let bytes = p.encode().unwrap();
                prop_assert_eq!(Payload::decode(&bytes), Ok(p));
        }

        #[test]
        fn quotes_are_cut_at_a_character_boundary(text in ".{0,400}") {
            let q = quote_of(&text);
            prop_assert!(q.len() <= QUOTE_LEN);
            prop_assert!(text.starts_with(&q));
            if text.len() <= QUOTE_LEN {
                prop_assert_eq!(q, text);
            } else {
                prop_assert!(q.len() > QUOTE_LEN - 4);
            }
        }

        #[test]
        fn envelopes_round_trip(pre: bool, ct in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = Envelope {
                kind: if pre { OlmKind::PreKey } else { OlmKind::Normal },
                ciphertext: Bytes::from(ct),
            };
            prop_assert_eq!(Envelope::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn decoders_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Whatever a peer sends: a value or an error, never a panic.
            // (Bodies need not be canonical postcard: Olm authenticates
            // them, and nothing is compared in encoded form.)
            let _ = Envelope::decode(&bytes);
            let _ = Payload::decode(&bytes);
        }
    }

    fn text(t: &str) -> Payload {
        Payload {
            id: MsgId([0xAB; 16]),
            to: "bob".into(),
            ts_ms: 1,
            content: Content::Text(t.into()),
        }
    }

    #[test]
    fn payload_round_trip_and_bytes() {
        let p = text("hi");
        let bytes = p.encode().unwrap();
        // tag 0 (V1), 16 id bytes, "bob", ts 1, content tag 0 (Text), "hi".
        assert_eq!(hex::encode(&bytes), format!("00{}03626f620100026869", "ab".repeat(16)));
        assert_eq!(Payload::decode(&bytes), Ok(p));
        let reset = Payload {
            content: Content::SessionReset,
            ..text("")
        };
        let bytes = reset.encode().unwrap();
        assert_eq!(bytes.last(), Some(&1), "SessionReset is content tag 1");
        assert_eq!(Payload::decode(&bytes), Ok(reset));
    }

    #[test]
    fn an_emoji_is_one_grapheme_cluster_of_at_most_32_bytes() {
        for ok in ["👍", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "a", "é"] {
            assert!(valid_emoji(ok), "{ok}");
        }
        for bad in ["", "👍👍", "ab", " ", "\n", "\u{7}", "👍 "] {
            assert!(!valid_emoji(bad), "{bad:?}");
        }
        // One cluster, but too long: a base and 40 combining marks.
        let long = format!("a{}", "\u{301}".repeat(40));
        assert!(!valid_emoji(&long));
    }

    #[test]
    fn envelope_round_trip_and_bytes() {
        let e = Envelope {
            kind: OlmKind::Normal,
            ciphertext: Bytes::from_static(&[9, 8, 7]),
        };
        let bytes = e.encode();
        // tag 0 (V1), kind 1 (Normal), length 3, the bytes.
        assert_eq!(hex::encode(&bytes), "000103090807");
        assert_eq!(Envelope::decode(&bytes), Ok(e));
        assert_eq!(OlmKind::from_olm(OlmKind::PreKey.to_olm()), Some(OlmKind::PreKey));
        assert_eq!(OlmKind::from_olm(2), None);
    }

    #[test]
    fn rejects_unknown_versions_kinds_trailing_bytes_and_long_texts() {
        let mut bytes = text("hi").encode().unwrap();
        bytes.push(0);
        assert_eq!(Payload::decode(&bytes), Err(BodyError::Unreadable));
        let mut future = text("hi").encode().unwrap();
        let n = future.len();
        future[n - 3] = 14; // an unknown content kind
        assert_eq!(Payload::decode(&future), Err(BodyError::Unreadable));
        assert_eq!(Payload::decode(&[1]), Err(BodyError::Unreadable));
        assert_eq!(Envelope::decode(&[1, 0, 0]), Err(BodyError::Unreadable));
        assert_eq!(Envelope::decode(&[0, 2, 0]), Err(BodyError::Unreadable));
        assert_eq!(Envelope::decode(&[0, 0, 0, 0]), Err(BodyError::Unreadable));
        assert_eq!(Envelope::decode(&[]), Err(BodyError::Unreadable));
        assert!(matches!(
            text(&"x".repeat(MAX_BODY_LEN)).encode(),
            Err(BodyError::TooLong { .. })
        ));
        // The longest text that fits still fits once sealed (checked for
        // real against Olm in the e2e tests).
        let mut n = 0;
        while text(&"x".repeat(n + 1)).encode().is_ok() {
            n += 1;
        }
        assert!(n > 3500, "{n}");
    }
}
