//! Group and blocking frames' payloads (spec §5.8): group ids, membership
//! as the server tells it, one ciphertext for a whole group, key shares for
//! many devices in one frame, group receipts, and the queue entries that
//! tell devices what changed.
//!
//! The server knows who is in a group and who is an admin (it must, to
//! check and fan out) but nothing else about it: a group's title travels
//! end to end (spec §12, §14.9).

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::frames::{DeviceAddr, DeviceId, MsgId, ReceiptKind};

/// A group's id: 16 random bytes chosen by the device that creates it
/// (spec §5.8). Written `#` and 32 lowercase hex digits on the command
/// line.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId(pub [u8; 16]);

impl GroupId {
    /// Parses 32 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<GroupId> {
        MsgId::from_hex(s).map(|m| GroupId(m.0))
    }

    /// Parses `#` and 32 lowercase hex digits (how people write a group).
    pub fn parse_tag(s: &str) -> Option<GroupId> {
        s.strip_prefix('#').and_then(GroupId::from_hex)
    }

    /// `#` and the id in hex.
    pub fn tag(&self) -> String {
        format!("#{self}")
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

/// One member of a group as the server tells it (spec §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Member {
    /// The user.
    pub user: String,
    /// Whether the user is an admin.
    pub admin: bool,
    /// The user's current devices, ascending.
    pub devices: Vec<DeviceId>,
}

/// A group's membership (spec §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Which group.
    pub group: GroupId,
    /// The membership version: 1 at creation, one more at every change.
    pub version: u64,
    /// The members, longest-standing first.
    pub members: Vec<Member>,
}

/// A group the caller is in, and its membership version (spec §5.8).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupVersion {
    /// Which group.
    pub group: GroupId,
    /// Its membership version.
    pub version: u64,
}

/// A message to a group: one ciphertext for every member device (spec
/// §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupSend {
    /// Chosen by the sender; a retry reuses it.
    pub id: MsgId,
    /// The group.
    pub group: GroupId,
    /// The membership version the body was encrypted for.
    pub version: u64,
    /// The digest of the member devices the body was encrypted for
    /// (spec §5.8, *Device digest*).
    pub devices: [u8; 8],
    /// The ciphertext, at most [`super::MAX_BODY_LEN`] bytes.
    pub body: Bytes,
}

/// One device's body in [`GroupKeys`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KeyBody {
    /// The device's user, a member of the group.
    pub user: String,
    /// The device.
    pub device: DeviceId,
    /// Opaque to the server: an Olm message (spec §14.9).
    pub data: Bytes,
}

/// Direct messages to member devices of a group, each with its own body,
/// in one frame (spec §5.8): how a sender shares its group session key.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupKeys {
    /// Chosen by the sender; a retry reuses it.
    pub id: MsgId,
    /// The group every recipient and the sender are members of.
    pub group: GroupId,
    /// At most [`super::MAX_KEY_BODIES`], each at most
    /// [`super::MAX_BODY_LEN`] bytes, at most one per device.
    pub bodies: Vec<KeyBody>,
}

/// A receipt for messages of one sender in one group (spec §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupReceipt {
    /// The group.
    pub group: GroupId,
    /// The user who sent the messages.
    pub to: String,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages, at most [`super::MAX_RECEIPT_IDS`].
    pub ids: Vec<MsgId>,
}

/// A group message handed to a device (spec §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupDeliver {
    /// Position in this device's queue; `Ack` refers to it.
    pub seq: u64,
    /// The sender's message id.
    pub id: MsgId,
    /// The sending device.
    pub from: DeviceAddr,
    /// The group.
    pub group: GroupId,
    /// When the server accepted it (ms since the epoch).
    pub time_ms: u64,
    /// The ciphertext, the same for every member device.
    pub body: Bytes,
}

/// What changed in a group's membership.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ChangeKind {
    /// `by` created the group with `users` (the creator first).
    Created,
    /// `by` added `users`.
    Added,
    /// `by` removed `users`.
    Removed,
    /// `by` left (or was taken out when its last device went).
    Left,
    /// `users` became admins: by `by`, or, when the last admin left, by
    /// the server (`by` is then the one who left).
    Promoted,
}

/// One change in a [`GroupNotice`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupChange {
    /// Who made it.
    pub by: String,
    /// What.
    pub kind: ChangeKind,
    /// Whom it concerns.
    pub users: Vec<String>,
}

/// A group's membership changed (spec §5.8): queued for every device of
/// every member, and of the members it took out, at the point where the
/// server applied it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupNotice {
    /// Position in this device's queue.
    pub seq: u64,
    /// The group.
    pub group: GroupId,
    /// The membership version after the changes.
    pub version: u64,
    /// The changes, oldest first; notices waiting in a queue fold, and
    /// an empty list says only that the membership changed (read it with
    /// `GetGroup`).
    pub changes: Vec<GroupChange>,
    /// When the server applied the (latest) change.
    pub time_ms: u64,
}

/// A queued group receipt handed to a device (spec §5.8).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GroupReceiptDeliver {
    /// Position in this device's queue.
    pub seq: u64,
    /// The group.
    pub group: GroupId,
    /// The device that sent the receipt.
    pub from: DeviceAddr,
    /// The user who sent the messages.
    pub to: String,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The messages (folded receipts may cover several frames).
    pub ids: Vec<MsgId>,
    /// When the server accepted the (latest folded) receipt.
    pub time_ms: u64,
}

/// This user blocked or unblocked someone, from another of its devices
/// (spec §5.8, *Blocking*).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BlockNotice {
    /// Position in this device's queue.
    pub seq: u64,
    /// Who.
    pub user: String,
    /// Blocked now (`true`) or unblocked.
    pub blocked: bool,
    /// When the server applied it.
    pub time_ms: u64,
}
