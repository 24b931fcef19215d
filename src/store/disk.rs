//! The queues' records as stored in the `queues` tree, and the entries
//! they become when delivered.
//!
//! Keys (integers big-endian, so that keys sort numerically):
//! - `q` ‖ user ‖ device ‖ seq → [`DiskEntry`]: one queued receipt or
//!   notice (message copies are in the spill log, [`super::spill`]; format
//!   3 kept them here, with their bodies);
//! - `w` ‖ user ‖ device → u64: the device's mark in the spill log (every
//!   copy up to it is gone);
//! - `x` ‖ user ‖ device ‖ seq → nothing: a retracted copy in the spill
//!   log;
//! - (format 3 only, removed by the migration to 4) `m` ‖ sender user ‖
//!   sender device ‖ message id → [`MsgRecord`];
//! - `t` ‖ user ‖ message id → acceptance time: a retracted message, so
//!   that resending it cannot bring it back (spec §5.5);
//! - `r` ‖ user ‖ device ‖ fold key → seq of the entry later receipts or
//!   notices of the same kind fold into.
//!
//! The retention sweep and the fold index work on these records; the
//! spill log has its own index (see there).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::groups::AppliedChange;
use crate::ids::{DeviceKey, UserId};
use crate::wire::{DeviceId, MAX_RECEIPT_IDS, MsgId};

/// One queued message for one device, as delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// The sender's message id.
    pub id: MsgId,
    /// The sending user.
    pub from_user: u32,
    /// The sending device.
    pub from_device: u32,
    /// The user the message was addressed to.
    pub to_user: u32,
    /// When the server accepted it.
    pub time_ms: u64,
    /// The ciphertext for this device.
    pub body: Bytes,
}

impl QueuedMessage {
    /// The sending device.
    pub fn from(&self) -> DeviceKey {
        dev(self.from_user, self.from_device)
    }
}

/// Receipts from one device, of one kind, folded together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedReceipt {
    /// The user of the device that sent the receipt.
    pub from_user: u32,
    /// That device.
    pub from_device: u32,
    /// The user it was addressed to.
    pub to_user: u32,
    /// Delivered, read...
    pub kind: u8,
    /// The messages.
    pub ids: Vec<MsgId>,
    /// When the latest folded receipt was accepted.
    pub time_ms: u64,
}

/// Messages from one sender device that expired in a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    /// Sending user.
    pub from_user: u32,
    /// Sending device.
    pub from_device: u32,
    /// How many.
    pub count: u32,
    /// Acceptance time of the first.
    pub first_ms: u64,
    /// Acceptance time of the last.
    pub last_ms: u64,
}

/// A gap notice for the device whose queue lost messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedGap {
    /// Per sender device.
    pub lost: Vec<LostRecord>,
    /// When the notice was (last) written.
    pub time_ms: u64,
}

/// An expiry notice for the sender's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedExpired {
    /// The user of the device that never got the messages.
    pub device_user: u32,
    /// That device.
    pub device: u32,
    /// The messages.
    pub ids: Vec<MsgId>,
    /// When the notice was (last) written.
    pub time_ms: u64,
}

/// One copy of a group message for one device, as delivered. Copies of
/// one message share `body` (one allocation in memory, one record in the
/// spill log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedGroupMessage {
    /// The sender's message id.
    pub id: MsgId,
    /// The sending user.
    pub from_user: u32,
    /// The sending device.
    pub from_device: u32,
    /// The group.
    pub group: [u8; 16],
    /// When the server accepted it.
    pub time_ms: u64,
    /// How many devices it went to: each copy is charged its share
    /// ([`super::spill::group_charge`]).
    pub fanout: u32,
    /// The ciphertext, the same for every member device.
    pub body: Bytes,
}

impl QueuedGroupMessage {
    /// The sending device.
    pub fn from(&self) -> DeviceKey {
        dev(self.from_user, self.from_device)
    }
}

/// A group membership change (or several, folded), for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedGroupNotice {
    /// The group.
    pub group: [u8; 16],
    /// The version after the changes.
    pub version: u64,
    /// The changes, oldest first (empty: folded past its bounds; the
    /// device reads the membership).
    pub changes: Vec<AppliedChange>,
    /// When the (latest) change was applied.
    pub time_ms: u64,
}

/// Group receipts from one device, of one kind, about one sender's
/// messages in one group, folded together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedGroupReceipt {
    /// The group.
    pub group: [u8; 16],
    /// The user of the device that sent the receipt.
    pub from_user: u32,
    /// That device.
    pub from_device: u32,
    /// The user who sent the messages.
    pub to_user: u32,
    /// Delivered, read...
    pub kind: u8,
    /// The messages.
    pub ids: Vec<MsgId>,
    /// When the latest folded receipt was accepted.
    pub time_ms: u64,
}

/// This user blocked or unblocked someone (for its other devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedBlock {
    /// Who.
    pub user: u32,
    /// Blocked now, or unblocked.
    pub blocked: bool,
    /// When.
    pub time_ms: u64,
}

/// One queue entry as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A message.
    Message(QueuedMessage),
    /// Folded receipts.
    Receipt(QueuedReceipt),
    /// A gap notice.
    Gap(QueuedGap),
    /// An expiry notice.
    Expired(QueuedExpired),
    /// A group message.
    Group(QueuedGroupMessage),
    /// A group membership notice.
    GroupNotice(QueuedGroupNotice),
    /// Folded group receipts.
    GroupReceipt(QueuedGroupReceipt),
    /// A block or unblock.
    Block(QueuedBlock),
}

impl Entry {
    /// When it was accepted or (last) written, for retention.
    pub fn time_ms(&self) -> u64 {
        match self {
            Entry::Message(m) => m.time_ms,
            Entry::Receipt(r) => r.time_ms,
            Entry::Gap(g) => g.time_ms,
            Entry::Expired(e) => e.time_ms,
            Entry::Group(g) => g.time_ms,
            Entry::GroupNotice(n) => n.time_ms,
            Entry::GroupReceipt(r) => r.time_ms,
            Entry::Block(b) => b.time_ms,
        }
    }

    /// The message it is a copy of, by sending device and id.
    pub(crate) fn msg_key(&self) -> Option<(DeviceKey, MsgId)> {
        match self {
            Entry::Message(m) => Some((m.from(), m.id)),
            Entry::Group(g) => Some((g.from(), g.id)),
            _ => None,
        }
    }

    /// The user it counts against (spec §10, *Quotas*): a message's or
    /// a receipt's sender; the server's notices count against nobody.
    pub(crate) fn sender(&self) -> Option<UserId> {
        match self {
            Entry::Message(m) => Some(UserId(m.from_user)),
            Entry::Receipt(r) => Some(UserId(r.from_user)),
            Entry::Group(g) => Some(UserId(g.from_user)),
            Entry::GroupReceipt(r) => Some(UserId(r.from_user)),
            // The server's own notices (a block notice goes only to the
            // blocker's own devices, at most one a blocked user).
            Entry::Gap(_) | Entry::Expired(_) | Entry::GroupNotice(_) | Entry::Block(_) => None,
        }
    }

    /// The record it is stored as.
    pub(crate) fn to_disk(&self) -> DiskEntry {
        match self {
            Entry::Message(m) => DiskEntry::Message {
                from_user: m.from_user,
                from_device: m.from_device,
                id: m.id,
                body: m.body.clone(),
            },
            Entry::Receipt(r) => DiskEntry::Receipt(r.clone()),
            Entry::Gap(g) => DiskEntry::Gap(g.clone()),
            Entry::Expired(e) => DiskEntry::Expired(e.clone()),
            Entry::Group(g) => DiskEntry::Group(g.clone()),
            Entry::GroupNotice(n) => DiskEntry::GroupNotice(n.clone()),
            Entry::GroupReceipt(r) => DiskEntry::GroupReceipt(r.clone()),
            Entry::Block(b) => DiskEntry::Block(b.clone()),
        }
    }

    /// Bytes it takes stored (what quotas count): a message copy's record
    /// in the spill log, or a `q` record's key and value.
    pub(crate) fn stored_len(&self) -> u64 {
        match self {
            Entry::Message(m) => super::spill::copy_len(m),
            Entry::Group(g) => super::spill::group_charge(g),
            other => (QUEUE_KEY_LEN + encode(&other.to_disk()).len()) as u64,
        }
    }
}

/// A queue record (format 3). Append-only like the wire's enums: the tag
/// is stored, and tags 1 to 3 are laid out as in format 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DiskEntry {
    /// A copy of a message: its sender and id (the key of its
    /// [`MsgRecord`]) and the body for this device.
    Message {
        /// Sending user.
        from_user: u32,
        /// Sending device.
        from_device: u32,
        /// Message id.
        id: MsgId,
        /// The ciphertext for this device.
        body: Bytes,
    },
    /// Folded receipts.
    Receipt(QueuedReceipt),
    /// A gap notice.
    Gap(QueuedGap),
    /// An expiry notice.
    Expired(QueuedExpired),
    /// A group message's copy (format 5; never written here: copies live
    /// in the spill log).
    Group(QueuedGroupMessage),
    /// A group membership notice (format 5).
    GroupNotice(QueuedGroupNotice),
    /// Folded group receipts (format 5).
    GroupReceipt(QueuedGroupReceipt),
    /// A block or unblock (format 5).
    Block(QueuedBlock),
}

/// What every copy of a message shared, in format 3 (read by the
/// migration to format 4 only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MsgRecord {
    /// The user it was addressed to.
    pub to_user: u32,
    /// When it was accepted.
    pub time_ms: u64,
    /// Where each copy was queued: (user, device, seq).
    pub copies: Vec<(u32, u32, u64)>,
}

impl DiskEntry {
    /// The entry it stands for; a message takes its header from `header`
    /// (`to_user`, `time_ms`).
    pub(crate) fn into_entry(self, header: Option<(u32, u64)>) -> Option<Entry> {
        Some(match self {
            DiskEntry::Message {
                from_user,
                from_device,
                id,
                body,
            } => {
                let (to_user, time_ms) = header?;
                Entry::Message(QueuedMessage {
                    id,
                    from_user,
                    from_device,
                    to_user,
                    time_ms,
                    body,
                })
            }
            DiskEntry::Receipt(r) => Entry::Receipt(r),
            DiskEntry::Gap(g) => Entry::Gap(g),
            DiskEntry::Expired(e) => Entry::Expired(e),
            DiskEntry::Group(g) => Entry::Group(g),
            DiskEntry::GroupNotice(n) => Entry::GroupNotice(n),
            DiskEntry::GroupReceipt(r) => Entry::GroupReceipt(r),
            DiskEntry::Block(b) => Entry::Block(b),
        })
    }
}

/// Whose a `q` record is (spec §10, *Quotas*): a receipt's sender; nobody's
/// for a notice, or for a record that does not decode.
pub(crate) fn record_sender(value: &[u8]) -> Option<UserId> {
    decode_disk(value).ok()?.into_entry(Some((0, 0)))?.sender()
}

/// Bytes a `sled` record takes as counted: key and value.
pub(crate) fn record_len(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// What one retention sweep turn did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Messages that expired.
    pub expired: usize,
    /// Message and retraction records forgotten.
    pub forgotten: usize,
    /// Devices that got a notice (to wake if online).
    pub notified: Vec<DeviceKey>,
    /// The pass over the whole tree is complete (the cursor wrapped).
    pub wrapped: bool,
}

pub(crate) const QUEUE: u8 = b'q';
pub(crate) const MESSAGE: u8 = b'm';
pub(crate) const TOMBSTONE: u8 = b't';
pub(crate) const FOLD: u8 = b'r';
pub(crate) const MARK: u8 = b'w';
pub(crate) const REMOVED: u8 = b'x';
/// Format 2's queue meta records (`n` ‖ user ‖ device).
pub(crate) const OLD_NEXT: u8 = b'n';
/// Format 2's dedup records (`d` ‖ user ‖ device ‖ id).
pub(crate) const OLD_DEDUP: u8 = b'd';

/// Length of a `q` key.
pub(crate) const QUEUE_KEY_LEN: usize = 17;
/// Length of an `m` key.
pub(crate) const MESSAGE_KEY_LEN: usize = 25;
/// Length of a `t` key.
pub(crate) const TOMBSTONE_KEY_LEN: usize = 21;
/// Length of a fold index key.
pub(crate) const FOLD_KEY_LEN: usize = 23;
/// Most sender devices in one gap notice (so it fits in a frame).
pub(crate) const MAX_GAP_SENDERS: usize = 256;

/// What later entries fold into: receipts per (reader device, kind,
/// addressee, i.e. conversation), one gap notice per queue, expiry notices
/// per device that lost them; group notices per group, group receipts per
/// (reader device, kind, group and sender), block notices per user
/// blocked. The group ones key on a part or a hash of the group id: two
/// groups that share it only fold less (the merge compares the whole id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FoldKey {
    Receipt(DeviceKey, u8, UserId),
    Gap,
    Expired(DeviceKey),
    GroupNotice([u8; 16]),
    GroupReceipt(DeviceKey, u8, [u8; 16], UserId),
    Block(UserId),
}

pub(crate) fn dev(user: u32, device: u32) -> DeviceKey {
    DeviceKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

pub(crate) fn dev_prefix(tag: u8, d: DeviceKey) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..5].copy_from_slice(&d.user.0.to_be_bytes());
    k[5..9].copy_from_slice(&d.device.0.to_be_bytes());
    k
}

pub(crate) fn parse_dev(k: &[u8]) -> Option<DeviceKey> {
    let user = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?);
    let device = u32::from_be_bytes(k.get(5..9)?.try_into().ok()?);
    Some(dev(user, device))
}

pub(crate) fn queue_key(d: DeviceKey, seq: u64) -> [u8; QUEUE_KEY_LEN] {
    let mut k = [0u8; QUEUE_KEY_LEN];
    k[..9].copy_from_slice(&dev_prefix(QUEUE, d));
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence in a `q` key.
pub(crate) fn queue_seq(k: &[u8]) -> Result<u64, StoreError> {
    k.get(9..)
        .and_then(super::be_u64)
        .ok_or(StoreError::Corrupt("queues/key"))
}

pub(crate) fn message_key(sender: DeviceKey, id: MsgId) -> [u8; MESSAGE_KEY_LEN] {
    let mut k = [0u8; MESSAGE_KEY_LEN];
    k[..9].copy_from_slice(&dev_prefix(MESSAGE, sender));
    k[9..].copy_from_slice(&id.0);
    k
}

pub(crate) fn mark_key(d: DeviceKey) -> [u8; 9] {
    dev_prefix(MARK, d)
}

pub(crate) fn removed_key(d: DeviceKey, seq: u64) -> [u8; QUEUE_KEY_LEN] {
    let mut k = queue_key(d, seq);
    k[0] = REMOVED;
    k
}

pub(crate) fn tombstone_key(user: UserId, id: MsgId) -> [u8; TOMBSTONE_KEY_LEN] {
    let mut k = [0u8; TOMBSTONE_KEY_LEN];
    k[0] = TOMBSTONE;
    k[1..5].copy_from_slice(&user.0.to_be_bytes());
    k[5..].copy_from_slice(&id.0);
    k
}

pub(crate) fn parse_tombstone(k: &[u8]) -> Option<(UserId, MsgId)> {
    let user = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?);
    let id: [u8; 16] = k.get(5..21)?.try_into().ok()?;
    Some((UserId(user), MsgId(id)))
}

pub(crate) fn fold_key(target: DeviceKey, f: FoldKey) -> [u8; FOLD_KEY_LEN] {
    let mut k = [0u8; FOLD_KEY_LEN];
    k[..9].copy_from_slice(&dev_prefix(FOLD, target));
    let (tag, from, kind, to) = match f {
        FoldKey::Receipt(d, kind, to) => (1, d, kind, to.0),
        FoldKey::Gap => (2, dev(0, 0), 0, 0),
        FoldKey::Expired(d) => (3, d, 0, 0),
        FoldKey::GroupNotice(g) => {
            k[9] = 4;
            k[10..23].copy_from_slice(&g[..13]);
            return k;
        }
        FoldKey::GroupReceipt(d, kind, g, to) => {
            let mut h: u32 = 0x811c_9dc5;
            for b in g.iter().chain(to.0.to_be_bytes().iter()) {
                h ^= u32::from(*b);
                h = h.wrapping_mul(0x0100_0193);
            }
            (5, d, kind, h)
        }
        FoldKey::Block(u) => (6, dev(0, 0), 0, u.0),
    };
    k[9] = tag;
    k[10..14].copy_from_slice(&from.user.0.to_be_bytes());
    k[14..18].copy_from_slice(&from.device.0.to_be_bytes());
    k[18] = kind;
    k[19..23].copy_from_slice(&to.to_be_bytes());
    k
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes store records into a Vec")
}

pub(crate) fn decode_disk(bytes: &[u8]) -> Result<DiskEntry, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("queues/entry"))
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<MsgRecord, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("queues/message"))
}

/// Length of `n` as a postcard varint.
pub(crate) fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// The ids of `old`, then those of `new` not among them; `None` if that
/// is more than one frame carries ([`MAX_RECEIPT_IDS`]).
fn merge_ids(old: &[MsgId], new: &[MsgId]) -> Option<Vec<MsgId>> {
    let mut ids = old.to_vec();
    for id in new {
        if !ids.contains(id) {
            ids.push(*id);
        }
    }
    (ids.len() <= MAX_RECEIPT_IDS).then_some(ids)
}

/// Merges `new` into `old` if they are of one fold kind and the result
/// stays within its bounds.
pub(crate) fn merge(old: &Entry, new: &Entry) -> Option<Entry> {
    match (old, new) {
        (Entry::Receipt(a), Entry::Receipt(b))
            if (a.from_user, a.from_device, a.to_user, a.kind) == (b.from_user, b.from_device, b.to_user, b.kind) =>
        {
            merge_ids(&a.ids, &b.ids).map(|ids| {
                Entry::Receipt(QueuedReceipt {
                    ids,
                    time_ms: b.time_ms,
                    ..a.clone()
                })
            })
        }
        (Entry::Expired(a), Entry::Expired(b)) => merge_ids(&a.ids, &b.ids).map(|ids| {
            Entry::Expired(QueuedExpired {
                ids,
                time_ms: b.time_ms,
                ..a.clone()
            })
        }),
        (Entry::Gap(a), Entry::Gap(b)) => {
            let mut lost = a.lost.clone();
            for l in &b.lost {
                match lost
                    .iter_mut()
                    .find(|x| x.from_user == l.from_user && x.from_device == l.from_device)
                {
                    Some(x) => {
                        x.count = x.count.saturating_add(l.count);
                        x.first_ms = x.first_ms.min(l.first_ms);
                        x.last_ms = x.last_ms.max(l.last_ms);
                    }
                    None => lost.push(l.clone()),
                }
            }
            (lost.len() <= MAX_GAP_SENDERS).then_some(Entry::Gap(QueuedGap {
                lost,
                time_ms: b.time_ms,
            }))
        }
        (Entry::GroupNotice(a), Entry::GroupNotice(b)) if a.group == b.group => {
            // Past its bounds a notice keeps only that something changed.
            let mut changes = a.changes.clone();
            changes.extend(b.changes.iter().cloned());
            let users: usize = changes.iter().map(|c| c.users.len()).sum();
            if a.changes.is_empty() || changes.len() > MAX_NOTICE_CHANGES || users > MAX_NOTICE_USERS {
                changes.clear();
            }
            Some(Entry::GroupNotice(QueuedGroupNotice {
                group: a.group,
                version: a.version.max(b.version),
                changes,
                time_ms: b.time_ms,
            }))
        }
        (Entry::GroupReceipt(a), Entry::GroupReceipt(b))
            if (a.group, a.from_user, a.from_device, a.to_user, a.kind)
                == (b.group, b.from_user, b.from_device, b.to_user, b.kind) =>
        {
            merge_ids(&a.ids, &b.ids).map(|ids| {
                Entry::GroupReceipt(QueuedGroupReceipt {
                    ids,
                    time_ms: b.time_ms,
                    ..a.clone()
                })
            })
        }
        (Entry::Block(a), Entry::Block(b)) if a.user == b.user => Some(Entry::Block(b.clone())),
        _ => None,
    }
}

/// Most changes one group notice carries; past it (or
/// [`MAX_NOTICE_USERS`]) folded notices say only that the membership
/// changed.
pub(crate) const MAX_NOTICE_CHANGES: usize = 32;
/// Most users one group notice names in all its changes.
pub(crate) const MAX_NOTICE_USERS: usize = crate::wire::MAX_GROUP_CHANGE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(u64::MAX), 10);
    }
}
