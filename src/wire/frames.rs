//! Frames (spec §5 and §6): what travels inside one Noise transport record.
//!
//! A record's plaintext is an envelope: a request id (`varint(u32)`), then one
//! postcard-encoded [`ClientFrame`] or [`ServerFrame`]. Keeping the id outside
//! the enum lets a peer echo it even for a frame kind it does not know.
//! Clients number their requests from 1; the server answers with the same
//! id and uses 0 for frames nobody asked for (`Deliver`, `QueueDrained`,
//! `Ping`, `Close`, and `KeyCount` when sent unasked).
//!
//! Variants are append-only: a new frame kind gets the next tag and an old
//! peer answers it with [`ErrorCode::UNSUPPORTED`].

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::MAX_FRAME_LEN;
use super::blob::{BlobData, BlobGrant, BlobId, Download, UploadChunk, UploadStart, UploadStatus};
use super::groups::{
    BlockNotice, GroupDeliver, GroupId, GroupInfo, GroupKeys, GroupNotice, GroupReceipt, GroupReceiptDeliver,
    GroupSend, GroupVersion,
};

/// A message id: 16 random bytes chosen by the sending device; a retry
/// reuses it (spec §5.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MsgId(pub [u8; 16]);

impl MsgId {
    /// Parses 32 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<MsgId> {
        if s.len() != 32 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(MsgId(id))
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgId({self})")
    }
}

/// A device's number within its user's account, from 1 (spec §5.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One device of one user, as named on the wire.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct DeviceAddr {
    /// The user name.
    pub user: String,
    /// The device number.
    pub device: DeviceId,
}

/// The secret part of an invite or a link code (spec §5.1): an 8-byte id the
/// server looks the code up by, and a 16-byte (128-bit) secret it compares
/// in constant time.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Lookup key; not secret on its own.
    pub id: [u8; 8],
    /// The secret.
    pub secret: [u8; 16],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Token({}, <secret>)", hex::encode(self.id))
    }
}

/// An error or close code (spec §7). A plain number so that a code added
/// later still decodes in an older peer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $n:expr,)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($n);)*

            /// The code's name in the spec, or `"UNKNOWN"`.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($n => stringify!($name),)*
                    _ => "UNKNOWN",
                }
            }

            /// Every code this build knows.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode($n)),*];
        }
    };
}

error_codes! {
    /// The frame could not be decoded, has trailing bytes, or is not in
    /// canonical encoding.
    MALFORMED = 1,
    /// The frame kind is unknown to this server.
    UNSUPPORTED = 2,
    /// The frame is not allowed in the connection's current state.
    NOT_ALLOWED = 3,
    /// The invite is unknown, used up or expired.
    INVALID_INVITE = 4,
    /// The link code is unknown, used or expired.
    INVALID_LINK_CODE = 5,
    /// The user name is already taken.
    NAME_TAKEN = 6,
    /// The user name is not `[a-z0-9_.]{3,32}`.
    INVALID_NAME = 7,
    /// No such user.
    UNKNOWN_USER = 8,
    /// A body is longer than the limit.
    BODY_TOO_LARGE = 9,
    /// More bodies than the limit.
    TOO_MANY_BODIES = 10,
    /// The account already has the most devices allowed.
    DEVICE_LIMIT = 11,
    /// No such device in this account.
    UNKNOWN_DEVICE = 12,
    /// The device connected again on another connection (close).
    CONNECTED_ELSEWHERE = 13,
    /// The device was revoked (close).
    REVOKED = 14,
    /// Nothing was heard from the peer for the idle timeout (close).
    IDLE_TIMEOUT = 15,
    /// The server is shutting down (close).
    SHUTTING_DOWN = 16,
    /// Too many requests; try later.
    RATE_LIMITED = 17,
    /// A queue quota or the disk budget would be exceeded.
    QUOTA_EXCEEDED = 18,
    /// The server failed; the request may be retried.
    INTERNAL = 19,
    /// The request is well-formed but inconsistent (for example two bodies
    /// for one device).
    BAD_REQUEST = 20,
    /// The peer does not read what the server sends (close).
    SLOW_CONSUMER = 21,
    /// The server's disk is below its free-space floor: nothing that adds
    /// data is accepted until space returns (spec §10, *Storage full*).
    STORAGE_FULL = 22,
    /// This device sends faster than its rate: nothing was stored; try
    /// again after the `RetryAfter` that came just before (spec §6).
    SLOW_DOWN = 23,
    /// A blob is larger than the server takes (spec §5.7).
    BLOB_TOO_LARGE = 24,
    /// The user's blobs would take more than the user's budget (spec
    /// §5.7).
    BLOB_BUDGET = 25,
    /// No such blob: never uploaded, not finished, expired or deleted, or
    /// the caller's user may not download it (spec §5.7).
    UNKNOWN_BLOB = 26,
    /// The uploaded bytes do not hash to the blob's id; the upload was
    /// dropped (spec §5.7).
    BLOB_MISMATCH = 27,
    /// No such group, or the caller (or a user named) is not a member: a
    /// non-member cannot tell the two apart (spec §5.8).
    NOT_A_MEMBER = 28,
    /// Only an admin of the group may do that.
    NOT_ADMIN = 29,
    /// The group has the most members the server allows.
    GROUP_FULL = 30,
    /// The caller, or a user to be added, is in the most groups the
    /// server allows.
    TOO_MANY_GROUPS = 31,
    /// A group with that id exists already.
    GROUP_EXISTS = 32,
    /// The caller blocks the most users allowed.
    TOO_MANY_BLOCKED = 33,
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One ciphertext for one device (spec §5.2).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Body {
    /// The device it is for.
    pub device: DeviceId,
    /// Opaque to the server.
    pub data: Bytes,
}

/// A message to one user (spec §5.2).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Send {
    /// Chosen by the sender; a retry reuses it.
    pub id: MsgId,
    /// The recipient user.
    pub to: String,
    /// One body for each current device of `to`.
    pub bodies: Vec<Body>,
    /// One body for each other current device of the sender (empty when
    /// `to` is the sender).
    pub own: Vec<Body>,
}

/// A queued message handed to a device (spec §5.3).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Deliver {
    /// Position in this device's queue; `Ack` refers to it.
    pub seq: u64,
    /// The sender's message id.
    pub id: MsgId,
    /// The sending device.
    pub from: DeviceAddr,
    /// The user the message was sent to (this device's user, or for a copy
    /// of one's own message, the other party).
    pub to: String,
    /// When the server accepted it, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The body for this device.
    pub body: Bytes,
}

/// What the server knows about one of the caller's own devices (spec §5.3).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device number.
    pub device: DeviceId,
    /// When it registered or was linked (ms since the epoch).
    pub created_ms: u64,
    /// When it was last online (ms since the epoch): when it last
    /// authenticated, or went offline after that.
    pub last_seen_ms: u64,
}

/// A 64-byte Ed25519 signature. (serde derives stop at 32-byte arrays;
/// on the wire it is 64 raw bytes, like any fixed array.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(64)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        d.deserialize_tuple(64, V)
    }
}

/// A device's end-to-end identity (spec §5.4): its Olm Curve25519 and
/// Ed25519 identity keys, the second signing
/// `"tidings identity v1" ‖ curve25519 ‖ ed25519`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct IdentityKeys {
    /// Olm identity key (Curve25519).
    pub curve25519: [u8; 32],
    /// Signing key (Ed25519).
    pub ed25519: [u8; 32],
    /// Self-signature by `ed25519`.
    pub signature: Signature,
}

/// A one-time or fallback Curve25519 key, signed by its device's Ed25519
/// identity over `"tidings one-time key v1" ‖ key` (spec §5.4).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedKey {
    /// The Curve25519 public key.
    pub key: [u8; 32],
    /// The device's signature.
    pub signature: Signature,
}

/// Keys to publish (spec §5.4).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PublishKeys {
    /// The identity, once per device (the same again is accepted; a
    /// different one is refused).
    pub identity: Option<IdentityKeys>,
    /// New one-time keys.
    pub one_time: Vec<SignedKey>,
    /// A new fallback key, replacing the old one.
    pub fallback: Option<SignedKey>,
}

/// One device's keys, as claimed (spec §5.4).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DeviceKeys {
    /// The device.
    pub device: DeviceId,
    /// Its identity.
    pub identity: IdentityKeys,
    /// A one-time key (removed from the server now), or the fallback key
    /// when none is left, or nothing when the device published neither.
    pub one_time: Option<SignedKey>,
    /// Whether `one_time` is the fallback key.
    pub fallback: bool,
}

/// What a receipt says (spec §5.5). The server treats it as a number and
/// only folds receipts of the same kind together; clients know 1 and 2.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct ReceiptKind(pub u8);

impl ReceiptKind {
    /// The message was stored on the device (two ticks).
    pub const DELIVERED: ReceiptKind = ReceiptKind(1);
    /// The user read it (blue ticks).
    pub const READ: ReceiptKind = ReceiptKind(2);
}

/// A receipt for messages of one conversation (spec §5.5).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Receipt {
    /// The user who sent the messages (the receipt goes to every device of
    /// theirs, and to the sender's own other devices).
    pub to: String,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages, at most [`super::MAX_RECEIPT_IDS`].
    pub ids: Vec<MsgId>,
}

/// A queued receipt handed to a device (spec §5.5).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReceiptDeliver {
    /// Position in this device's queue; `Ack` covers it like a message.
    pub seq: u64,
    /// The device that sent the receipt.
    pub from: DeviceAddr,
    /// The user it was addressed to (this device's user, or, for a copy
    /// to one of the sender's own devices, the other party).
    pub to: String,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages; receipts waiting in a queue are folded, so this may
    /// cover several `Receipt` frames.
    pub ids: Vec<MsgId>,
    /// When the server accepted the (latest folded) receipt.
    pub time_ms: u64,
}

/// Messages from one sender device that expired in this device's queue
/// (spec §10, retention).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lost {
    /// The sender.
    pub from: DeviceAddr,
    /// How many messages.
    pub count: u32,
    /// When the first of them was accepted.
    pub first_ms: u64,
    /// When the last of them was accepted.
    pub last_ms: u64,
}

/// A gap notice: messages for this device expired before it collected
/// them (spec §10, retention).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GapNotice {
    /// Position in this device's queue.
    pub seq: u64,
    /// What was lost, per sender device.
    pub lost: Vec<Lost>,
}

/// An expiry notice for a sender: some of its messages expired in a
/// recipient device's queue, undelivered (spec §10, retention).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ExpiredNotice {
    /// Position in this device's queue.
    pub seq: u64,
    /// The device that never got them.
    pub device: DeviceAddr,
    /// The messages.
    pub ids: Vec<MsgId>,
}

/// An ephemeral send (spec §5.6): one body for each device of `to` the
/// sender wants it to reach; the server passes each to its device if that
/// device is online at that moment, and otherwise drops it. Never stored,
/// never queued, never acknowledged.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ephemeral {
    /// The recipient user (the sender's own user: its other devices).
    pub to: String,
    /// At most one body per device, each at most
    /// [`super::MAX_EPHEMERAL_LEN`] bytes.
    pub bodies: Vec<Body>,
}

/// An ephemeral body handed to a device (spec §5.6). Not a queue entry: it
/// has no sequence number and is not acknowledged.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EphemeralDeliver {
    /// The sending device.
    pub from: DeviceAddr,
    /// The user it was sent to (this device's user).
    pub to: String,
    /// The body for this device.
    pub body: Bytes,
}

/// What a watcher may know of a user's presence (spec §5.6).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Seen {
    /// Nothing: the user hides its presence, or the watcher's user hides
    /// its own (who hides theirs sees no one's).
    Hidden,
    /// Online now, on these devices (ascending).
    Online {
        /// The devices online.
        devices: Vec<DeviceId>,
    },
    /// Not online; last online at this time (ms since the epoch; 0 if the
    /// server does not know).
    Away {
        /// When the user's last device went offline.
        last_seen_ms: u64,
    },
}

/// One user's presence, as a watcher may know it (spec §5.6).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Presence {
    /// Whose.
    pub user: String,
    /// What the watcher may know.
    pub seen: Seen,
}

/// Frames a client sends (spec §5.2). Append-only: never reorder.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Keepalive; answered with `Pong`.
    Ping,
    /// Answer to the server's `Ping`.
    Pong,
    /// The client is leaving; the server closes without a reply.
    Close,
    /// Create an account with an operator's invite (unregistered only).
    Register {
        /// From the invite code.
        invite: Token,
        /// The user name wanted.
        name: String,
    },
    /// Join an existing account as its next device (unregistered only).
    RedeemLink {
        /// From the link code.
        code: Token,
    },
    /// Ask for a one-time link code for a new device of this account.
    RequestLink,
    /// List a user's current devices.
    ListDevices {
        /// Whose.
        user: String,
    },
    /// List this account's devices with details.
    MyDevices,
    /// Revoke one of this account's devices.
    RevokeDevice {
        /// Which.
        device: DeviceId,
    },
    /// Send a message.
    Send(Send),
    /// Everything in this device's queue up to and including `up_to` has
    /// been stored by the device and may be deleted.
    Ack {
        /// Cumulative queue sequence.
        up_to: u64,
    },
    /// Publish this device's end-to-end keys; answered with `KeyCount`.
    PublishKeys(Box<PublishKeys>),
    /// Claim keys for every current device of a user (one one-time key
    /// each); answered with `Keys`. For one's own user, the other devices.
    ClaimKeys {
        /// Whose.
        user: String,
    },
    /// Report messages delivered or read; answered `Done` once durable.
    Receipt(Receipt),
    /// Delete for everyone: remove the still-queued copies of one of this
    /// user's own messages from every queue; answered `Done`.
    Retract {
        /// The message.
        id: MsgId,
    },
    /// Pass bodies to those devices of a user that are online now (spec
    /// §5.6); answered `Done` at once, whether any was online or not.
    Ephemeral(Ephemeral),
    /// Who may see this user's presence: everyone (`true`) or nobody
    /// (spec §5.6); answered `Done` once durable.
    SetLastSeen {
        /// Everyone, or nobody.
        everyone: bool,
    },
    /// Watch these users' presence (replacing what this connection
    /// watched); answered `Done`, then a `Presence` for each now and at
    /// each change (spec §5.6).
    WatchPresence {
        /// At most [`super::MAX_WATCHED`] user names.
        users: Vec<String>,
    },
    /// Start an upload, or ask how far it got (spec §5.7); answered
    /// `UploadStatus`.
    UploadStart(UploadStart),
    /// Bytes of an upload at an offset; answered `UploadStatus`.
    UploadChunk(UploadChunk),
    /// Finish an upload: the server checks the id and makes the blob
    /// durable; answered `UploadStatus`.
    UploadFinish {
        /// Which upload.
        id: BlobId,
    },
    /// A range of a blob; answered `BlobData`.
    Download(Download),
    /// This device has stored the whole blob (so the server may delete it
    /// once every device it was for has); answered `Done`.
    BlobFetched {
        /// Which blob.
        id: BlobId,
    },
    /// Let more users download a blob (forwarding); answered `Done`.
    BlobGrant(BlobGrant),
    /// This user no longer needs the blob (its message was deleted for
    /// everyone); answered `Done`.
    BlobDelete {
        /// Which blob.
        id: BlobId,
    },
    /// Create a group with this id, the caller its first admin, and these
    /// other members (spec §5.8); answered `Group` once durable.
    CreateGroup {
        /// Chosen by the creator (16 random bytes).
        group: GroupId,
        /// The other members, at most [`super::MAX_GROUP_CHANGE`].
        members: Vec<String>,
    },
    /// Add members (admins only); answered `Group` once durable.
    AddMembers {
        /// The group.
        group: GroupId,
        /// At most [`super::MAX_GROUP_CHANGE`] users.
        users: Vec<String>,
    },
    /// Remove members (admins only); answered `Group` once durable.
    RemoveMembers {
        /// The group.
        group: GroupId,
        /// At most [`super::MAX_GROUP_CHANGE`] users.
        users: Vec<String>,
    },
    /// Leave a group; answered `Done` once durable.
    LeaveGroup {
        /// The group.
        group: GroupId,
    },
    /// Make a member an admin (admins only); answered `Group` once
    /// durable.
    MakeAdmin {
        /// The group.
        group: GroupId,
        /// The member.
        user: String,
    },
    /// Read a group's membership (members only); answered `Group`.
    GetGroup {
        /// The group.
        group: GroupId,
    },
    /// List the groups the caller is in; answered `Groups`.
    ListGroups,
    /// Send one ciphertext to every member device of a group; answered
    /// `Accepted`, or `GroupMismatch` if the membership or its devices
    /// changed.
    GroupSend(GroupSend),
    /// Direct messages to member devices of a group, one body each;
    /// answered `Accepted`.
    GroupKeys(GroupKeys),
    /// A receipt for messages of one sender in a group; answered `Done`
    /// once durable.
    GroupReceipt(GroupReceipt),
    /// Block (or unblock) a user; answered `Done` once durable.
    Block {
        /// Whom.
        user: String,
        /// Block (`true`) or unblock.
        blocked: bool,
    },
    /// List the users the caller blocks; answered `Blocked`.
    ListBlocked,
}

/// Number of [`ClientFrame`] variants this build knows.
pub const CLIENT_FRAME_KINDS: u32 = 37;

/// Frames the server sends (spec §5.3). Append-only: never reorder.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Answer to `Ping`.
    Pong,
    /// Keepalive; answer with `Pong`.
    Ping,
    /// The server closes the connection after this frame.
    Close {
        /// Why.
        code: ErrorCode,
        /// A short text for people.
        text: String,
    },
    /// A request failed; the connection stays open.
    Error {
        /// Why.
        code: ErrorCode,
        /// A short text for people.
        text: String,
    },
    /// This connection is now the named device.
    Registered {
        /// The account.
        user: String,
        /// The new device's number.
        device: DeviceId,
    },
    /// A one-time link code.
    LinkCode {
        /// The secret part; the client adds the server address and key.
        code: Token,
        /// When it stops working (ms since the epoch).
        expires_ms: u64,
    },
    /// A user's current devices.
    Devices {
        /// Whose.
        user: String,
        /// Their numbers, ascending.
        devices: Vec<DeviceId>,
    },
    /// This account's devices.
    MyDevices {
        /// Ascending by number.
        devices: Vec<DeviceInfo>,
    },
    /// The request succeeded and has nothing else to say.
    Done,
    /// The message is durable in every recipient device's queue.
    Accepted {
        /// Which message.
        id: MsgId,
        /// When the server first accepted it (ms since the epoch).
        time_ms: u64,
    },
    /// The bodies do not match the current devices; nothing was stored.
    Mismatch {
        /// Which message.
        id: MsgId,
        /// Devices that need a body and have none.
        missing: Vec<DeviceAddr>,
        /// Bodies for devices that do not exist (any more).
        extra: Vec<DeviceAddr>,
    },
    /// A queued message.
    Deliver(Deliver),
    /// Everything that was queued when this connection authenticated has
    /// been sent.
    QueueDrained,
    /// How many one-time keys the server holds for this device: the answer
    /// to `PublishKeys`, and sent unasked (request id 0) when claims bring
    /// the stock below the low-water mark.
    KeyCount {
        /// One-time keys left.
        one_time: u32,
    },
    /// Claimed keys.
    Keys {
        /// Whose.
        user: String,
        /// One entry per device that published an identity.
        devices: Vec<DeviceKeys>,
    },
    /// A queued receipt.
    Receipt(ReceiptDeliver),
    /// Queued messages for this device expired before it collected them.
    Gap(GapNotice),
    /// Messages this user sent expired undelivered in a device's queue.
    Expired(ExpiredNotice),
    /// An ephemeral body (spec §5.6), never queued or acknowledged.
    Ephemeral(EphemeralDeliver),
    /// A watched user's presence, now or after a change (spec §5.6).
    Presence(Presence),
    /// How long this device should wait before it tries again: sent
    /// unasked (request id 0) right before the `Error` that refuses a
    /// request for a rate (`SLOW_DOWN`, `RATE_LIMITED`; spec §5.3, §6).
    RetryAfter {
        /// Milliseconds from now.
        after_ms: u64,
    },
    /// How far an upload is: the answer to `UploadStart`, `UploadChunk`
    /// and `UploadFinish`.
    UploadStatus(UploadStatus),
    /// A range of a blob: the answer to `Download`.
    BlobData(BlobData),
    /// A group's membership (spec §5.8).
    Group(GroupInfo),
    /// The groups the caller is in.
    Groups {
        /// Each with its membership version, by id.
        groups: Vec<GroupVersion>,
    },
    /// A `GroupSend` named an older membership version, or other member
    /// devices than there are; nothing was stored.
    GroupMismatch {
        /// Which message.
        id: MsgId,
        /// The membership now.
        group: GroupInfo,
    },
    /// A queued group message.
    GroupDeliver(GroupDeliver),
    /// A queued notice of a membership change.
    GroupNotice(GroupNotice),
    /// A queued group receipt.
    GroupReceipt(GroupReceiptDeliver),
    /// The users the caller blocks, by name.
    Blocked {
        /// Their names.
        users: Vec<String>,
    },
    /// A queued notice that this user blocked or unblocked someone.
    BlockNotice(BlockNotice),
}

/// Number of [`ServerFrame`] variants this build knows.
pub const SERVER_FRAME_KINDS: u32 = 31;

impl ClientFrame {
    /// The frame kind's name, for logs (never the content).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Ping => "Ping",
            ClientFrame::Pong => "Pong",
            ClientFrame::Close => "Close",
            ClientFrame::Register { .. } => "Register",
            ClientFrame::RedeemLink { .. } => "RedeemLink",
            ClientFrame::RequestLink => "RequestLink",
            ClientFrame::ListDevices { .. } => "ListDevices",
            ClientFrame::MyDevices => "MyDevices",
            ClientFrame::RevokeDevice { .. } => "RevokeDevice",
            ClientFrame::Send(_) => "Send",
            ClientFrame::Ack { .. } => "Ack",
            ClientFrame::PublishKeys(_) => "PublishKeys",
            ClientFrame::ClaimKeys { .. } => "ClaimKeys",
            ClientFrame::Receipt(_) => "Receipt",
            ClientFrame::Retract { .. } => "Retract",
            ClientFrame::Ephemeral(_) => "Ephemeral",
            ClientFrame::SetLastSeen { .. } => "SetLastSeen",
            ClientFrame::WatchPresence { .. } => "WatchPresence",
            ClientFrame::UploadStart(_) => "UploadStart",
            ClientFrame::UploadChunk(_) => "UploadChunk",
            ClientFrame::UploadFinish { .. } => "UploadFinish",
            ClientFrame::Download(_) => "Download",
            ClientFrame::BlobFetched { .. } => "BlobFetched",
            ClientFrame::BlobGrant(_) => "BlobGrant",
            ClientFrame::BlobDelete { .. } => "BlobDelete",
            ClientFrame::CreateGroup { .. } => "CreateGroup",
            ClientFrame::AddMembers { .. } => "AddMembers",
            ClientFrame::RemoveMembers { .. } => "RemoveMembers",
            ClientFrame::LeaveGroup { .. } => "LeaveGroup",
            ClientFrame::MakeAdmin { .. } => "MakeAdmin",
            ClientFrame::GetGroup { .. } => "GetGroup",
            ClientFrame::ListGroups => "ListGroups",
            ClientFrame::GroupSend(_) => "GroupSend",
            ClientFrame::GroupKeys(_) => "GroupKeys",
            ClientFrame::GroupReceipt(_) => "GroupReceipt",
            ClientFrame::Block { .. } => "Block",
            ClientFrame::ListBlocked => "ListBlocked",
        }
    }
}

impl ServerFrame {
    /// The frame kind's name, for logs (never the content).
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Pong => "Pong",
            ServerFrame::Ping => "Ping",
            ServerFrame::Close { .. } => "Close",
            ServerFrame::Error { .. } => "Error",
            ServerFrame::Registered { .. } => "Registered",
            ServerFrame::LinkCode { .. } => "LinkCode",
            ServerFrame::Devices { .. } => "Devices",
            ServerFrame::MyDevices { .. } => "MyDevices",
            ServerFrame::Done => "Done",
            ServerFrame::Accepted { .. } => "Accepted",
            ServerFrame::Mismatch { .. } => "Mismatch",
            ServerFrame::Deliver(_) => "Deliver",
            ServerFrame::QueueDrained => "QueueDrained",
            ServerFrame::KeyCount { .. } => "KeyCount",
            ServerFrame::Keys { .. } => "Keys",
            ServerFrame::Receipt(_) => "Receipt",
            ServerFrame::Gap(_) => "Gap",
            ServerFrame::Expired(_) => "Expired",
            ServerFrame::Ephemeral(_) => "Ephemeral",
            ServerFrame::Presence(_) => "Presence",
            ServerFrame::RetryAfter { .. } => "RetryAfter",
            ServerFrame::UploadStatus(_) => "UploadStatus",
            ServerFrame::BlobData(_) => "BlobData",
            ServerFrame::Group(_) => "Group",
            ServerFrame::Groups { .. } => "Groups",
            ServerFrame::GroupMismatch { .. } => "GroupMismatch",
            ServerFrame::GroupDeliver(_) => "GroupDeliver",
            ServerFrame::GroupNotice(_) => "GroupNotice",
            ServerFrame::GroupReceipt(_) => "GroupReceipt",
            ServerFrame::Blocked { .. } => "Blocked",
            ServerFrame::BlockNotice(_) => "BlockNotice",
        }
    }

    /// An `Error` frame.
    pub fn error(code: ErrorCode, text: impl Into<String>) -> ServerFrame {
        ServerFrame::Error {
            code,
            text: text.into(),
        }
    }
}

/// Why a frame was refused. Every variant but `Malformed { req: None }`
/// carries the request id, so the answer can echo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Not a valid envelope, or not a valid frame of a known kind, or
    /// trailing bytes.
    #[error("malformed frame")]
    Malformed {
        /// The request id, if even that could not be read.
        req: Option<u32>,
    },
    /// A frame kind this build does not know.
    #[error("unsupported frame kind {tag}")]
    Unsupported {
        /// The request id.
        req: u32,
        /// The unknown tag.
        tag: u32,
    },
    /// A valid frame in a non-canonical encoding (for example an overlong
    /// varint).
    #[error("non-canonical encoding")]
    NonCanonical {
        /// The request id.
        req: u32,
    },
    /// Larger than [`MAX_FRAME_LEN`].
    #[error("frame too long")]
    TooLong,
}

impl FrameError {
    /// The request id to echo (0 if unknown).
    pub fn req(&self) -> u32 {
        match *self {
            FrameError::Malformed { req } => req.unwrap_or(0),
            FrameError::Unsupported { req, .. } | FrameError::NonCanonical { req } => req,
            FrameError::TooLong => 0,
        }
    }

    /// The error code this maps to on the wire (spec §7).
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Unsupported { .. } => ErrorCode::UNSUPPORTED,
            _ => ErrorCode::MALFORMED,
        }
    }
}

#[derive(Serialize)]
struct EnvelopeRef<'a, F> {
    req: u32,
    frame: &'a F,
}

fn encode<F: Serialize>(req: u32, frame: &F, out: &mut Vec<u8>) {
    // Serialising these types into a Vec cannot fail: every type is
    // supported by postcard and a Vec grows as needed.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(&EnvelopeRef { req, frame }, taken)
        .expect("postcard encoding into a Vec is infallible for frame types");
}

/// Appends the envelope of a client frame to `out`.
pub fn encode_client(req: u32, frame: &ClientFrame, out: &mut Vec<u8>) {
    encode(req, frame, out)
}

/// Appends the envelope of a server frame to `out`.
pub fn encode_server(req: u32, frame: &ServerFrame, out: &mut Vec<u8>) {
    encode(req, frame, out)
}

fn decode<F: Serialize + for<'de> Deserialize<'de>>(
    bytes: &[u8],
    kinds: u32,
    scratch: &mut Vec<u8>,
) -> Result<(u32, F), FrameError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLong);
    }
    let (req, rest) = postcard::take_from_bytes::<u32>(bytes).map_err(|_| FrameError::Malformed { req: None })?;
    let (tag, _) = postcard::take_from_bytes::<u32>(rest).map_err(|_| FrameError::Malformed { req: Some(req) })?;
    if tag >= kinds {
        return Err(FrameError::Unsupported { req, tag });
    }
    let (frame, rest) = postcard::take_from_bytes::<F>(rest).map_err(|_| FrameError::Malformed { req: Some(req) })?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed { req: Some(req) });
    }
    // spec §5: exactly one encoding per frame.
    scratch.clear();
    encode(req, &frame, scratch);
    if scratch.as_slice() != bytes {
        return Err(FrameError::NonCanonical { req });
    }
    Ok((req, frame))
}

/// Decodes a client envelope. `scratch` is reused for the canonical check.
///
/// # Errors
/// See [`FrameError`].
pub fn decode_client(bytes: &[u8], scratch: &mut Vec<u8>) -> Result<(u32, ClientFrame), FrameError> {
    decode(bytes, CLIENT_FRAME_KINDS, scratch)
}

/// Decodes a server envelope. `scratch` is reused for the canonical check.
///
/// # Errors
/// See [`FrameError`].
pub fn decode_server(bytes: &[u8], scratch: &mut Vec<u8>) -> Result<(u32, ServerFrame), FrameError> {
    decode(bytes, SERVER_FRAME_KINDS, scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_counts_match() {
        let mut out = Vec::new();
        encode_client(0, &ClientFrame::ListBlocked, &mut out);
        assert_eq!(out[1] as u32, CLIENT_FRAME_KINDS - 1);
        out.clear();
        let notice = BlockNotice {
            seq: 0,
            user: String::new(),
            blocked: true,
            time_ms: 0,
        };
        encode_server(0, &ServerFrame::BlockNotice(notice), &mut out);
        assert_eq!(out[1] as u32, SERVER_FRAME_KINDS - 1);
    }

    #[test]
    fn ping_bytes() {
        let mut out = Vec::new();
        encode_client(1, &ClientFrame::Ping, &mut out);
        assert_eq!(out, [0x01, 0x00]);
        let mut scratch = Vec::new();
        assert_eq!(decode_client(&out, &mut scratch), Ok((1, ClientFrame::Ping)));
    }

    #[test]
    fn unknown_tag_keeps_req() {
        let mut scratch = Vec::new();
        // req 300 (varint ac 02), tag 200 (varint c8 01)
        let e = decode_client(&[0xac, 0x02, 0xc8, 0x01], &mut scratch).unwrap_err();
        assert_eq!(e, FrameError::Unsupported { req: 300, tag: 200 });
        assert_eq!(e.code(), ErrorCode::UNSUPPORTED);
    }

    #[test]
    fn overlong_varint_is_refused() {
        let mut scratch = Vec::new();
        // Ack { up_to: 1 } with up_to as 0x81 0x00 (overlong for 1).
        let e = decode_client(&[0x05, 0x0a, 0x81, 0x00], &mut scratch).unwrap_err();
        assert_eq!(e, FrameError::NonCanonical { req: 5 });
        // Overlong request id.
        let e = decode_client(&[0x85, 0x00, 0x00], &mut scratch).unwrap_err();
        assert_eq!(e, FrameError::NonCanonical { req: 5 });
        assert_eq!(
            decode_client(&[0x05, 0x0a, 0x01], &mut scratch),
            Ok((5, ClientFrame::Ack { up_to: 1 }))
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut scratch = Vec::new();
        let e = decode_client(&[0x01, 0x00, 0x00], &mut scratch).unwrap_err();
        assert_eq!(e, FrameError::Malformed { req: Some(1) });
        assert!(matches!(
            decode_client(&[], &mut scratch),
            Err(FrameError::Malformed { req: None })
        ));
        assert!(matches!(
            decode_client(&[0x01], &mut scratch),
            Err(FrameError::Malformed { req: Some(1) })
        ));
    }

    #[test]
    fn msg_id_hex() {
        let id = MsgId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(MsgId::from_hex(&id.to_string()), Some(id));
        assert_eq!(MsgId::from_hex(&"AB".repeat(16)), None);
        assert_eq!(MsgId::from_hex("ab"), None);
    }

    #[test]
    fn token_debug_hides_secret() {
        let t = Token {
            id: [1; 8],
            secret: [0xee; 16],
        };
        assert!(!format!("{t:?}").contains("ee"));
    }
}
