//! Per-device queues, dedup records, folding of receipts and notices,
//! retraction, retention and quotas, in the `queues` tree.
//!
//! Keys (integers big-endian):
//! - `q` ‖ user ‖ device ‖ seq → [`Entry`];
//! - `n` ‖ user ‖ device → the queue's meta: next seq, entry count, bytes;
//! - `d` ‖ user ‖ device ‖ message id → acceptance time and where the
//!   message was queued (dedup, and retraction);
//! - `r` ‖ user ‖ device ‖ fold key → seq of the entry later receipts or
//!   notices of the same kind fold into (the fold key: a kind byte, a
//!   device's user ‖ number, a receipt's kind byte and addressee user).
//!
//! Every change to a queue happens under one lock, in one atomic batch with
//! the queue's meta record, so sequence order is visibility order and the
//! counts used for quotas are exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::flusher::Epoch;
use super::{Store, StoreError, be_u64};
use crate::ids::{DeviceKey, UserId};
use crate::wire::{DeviceId, MAX_RECEIPT_IDS, MsgId, ReceiptKind};

/// One queued message for one device.
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
        key(self.from_user, self.from_device)
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

/// One queue entry. Append-only like the wire's enums: the tag is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A message.
    Message(QueuedMessage),
    /// Folded receipts.
    Receipt(QueuedReceipt),
    /// A gap notice.
    Gap(QueuedGap),
    /// An expiry notice.
    Expired(QueuedExpired),
}

impl Entry {
    /// When it was written (for retention).
    pub fn time_ms(&self) -> u64 {
        match self {
            Entry::Message(m) => m.time_ms,
            Entry::Receipt(r) => r.time_ms,
            Entry::Gap(g) => g.time_ms,
            Entry::Expired(e) => e.time_ms,
        }
    }
}

/// Which quota refused an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// This device's queue is full (count or bytes).
    Queue(DeviceKey),
    /// The data directory is at its disk budget.
    Disk,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored now (durable with the batch's epoch).
    New {
        /// Acceptance time.
        time_ms: u64,
    },
    /// Already stored by an earlier attempt; nothing written. (The first
    /// attempt may not be flushed yet, so its answer waits for the batch's
    /// epoch too.)
    Duplicate {
        /// The first acceptance time.
        time_ms: u64,
    },
    /// Refused: storing it would exceed a quota. Nothing written.
    OverQuota(Quota),
}

/// A queue change, for [`Store::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Append a message to each `(device, body)` queue, with its dedup
    /// record (unless it is a duplicate or over a quota).
    Append {
        /// Sending device.
        sender: DeviceKey,
        /// Message id.
        id: MsgId,
        /// The user it is addressed to.
        to: UserId,
        /// One body per queue.
        bodies: Vec<(DeviceKey, Bytes)>,
        /// Acceptance time.
        now_ms: u64,
    },
    /// Queue a receipt for `targets`, folded.
    Receipt {
        /// Reporting device.
        from: DeviceKey,
        /// The user whose messages it is about.
        to: UserId,
        /// Its kind.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MsgId>,
        /// Devices to queue it for.
        targets: Vec<DeviceKey>,
        /// Acceptance time.
        now_ms: u64,
    },
    /// Delete `device`'s entries up to `up_to`.
    Ack {
        /// Whose queue.
        device: DeviceKey,
        /// Cumulative sequence.
        up_to: u64,
    },
}

/// What an [`Op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// For [`Op::Append`].
    Appended(Appended),
    /// For [`Op::Receipt`]: queued, or refused by a quota.
    Receipt(Result<(), Quota>),
    /// For [`Op::Ack`]: entries deleted.
    Acked(usize),
}

/// What one retention sweep turn did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Messages that expired.
    pub expired: usize,
    /// Dedup records forgotten.
    pub forgotten: usize,
    /// Devices that got a notice (to wake if online).
    pub notified: Vec<DeviceKey>,
    /// The pass over the whole tree is complete (the cursor wrapped).
    pub wrapped: bool,
}

/// A queue's bookkeeping: next sequence, entries and bytes held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueMeta {
    next: u64,
    count: u64,
    bytes: u64,
}

impl QueueMeta {
    fn encode(&self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&self.next.to_be_bytes());
        v[8..16].copy_from_slice(&self.count.to_be_bytes());
        v[16..].copy_from_slice(&self.bytes.to_be_bytes());
        v
    }
}

/// The lock over every queue's meta.
pub(crate) type Metas = HashMap<DeviceKey, QueueMeta>;

const QUEUE: u8 = b'q';
const NEXT: u8 = b'n';
const DEDUP: u8 = b'd';
const FOLD: u8 = b'r';
/// Most sender devices in one gap notice (so it fits in a frame).
const MAX_GAP_SENDERS: usize = 256;
/// Marks the queues tree as migrated to format 2 (written in the same batch
/// as the migration).
const MIGRATED: &[u8] = b"v2";

/// What later entries fold into: receipts per (reader device, kind,
/// addressee, i.e. conversation), one gap notice per queue, expiry notices
/// per device that lost them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum FoldKey {
    Receipt(DeviceKey, u8, UserId),
    Gap,
    Expired(DeviceKey),
}

fn key(user: u32, device: u32) -> DeviceKey {
    DeviceKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

fn dev_prefix(tag: u8, d: DeviceKey) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..5].copy_from_slice(&d.user.0.to_be_bytes());
    k[5..9].copy_from_slice(&d.device.0.to_be_bytes());
    k
}

fn parse_dev(k: &[u8]) -> Option<DeviceKey> {
    let user = u32::from_be_bytes(k.get(1..5)?.try_into().ok()?);
    let device = u32::from_be_bytes(k.get(5..9)?.try_into().ok()?);
    Some(key(user, device))
}

fn queue_key(d: DeviceKey, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&dev_prefix(QUEUE, d));
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn dedup_key(sender: DeviceKey, id: MsgId) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..9].copy_from_slice(&dev_prefix(DEDUP, sender));
    k[9..].copy_from_slice(&id.0);
    k
}

/// Length of a fold index key.
const FOLD_KEY_LEN: usize = 23;

fn fold_key(target: DeviceKey, f: FoldKey) -> [u8; FOLD_KEY_LEN] {
    let mut k = [0u8; FOLD_KEY_LEN];
    k[..9].copy_from_slice(&dev_prefix(FOLD, target));
    let (tag, from, kind, to) = match f {
        FoldKey::Receipt(d, kind, to) => (1, d, kind, to.0),
        FoldKey::Gap => (2, key(0, 0), 0, 0),
        FoldKey::Expired(d) => (3, d, 0, 0),
    };
    k[9] = tag;
    k[10..14].copy_from_slice(&from.user.0.to_be_bytes());
    k[14..18].copy_from_slice(&from.device.0.to_be_bytes());
    k[18] = kind;
    k[19..23].copy_from_slice(&to.to_be_bytes());
    k
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    postcard::to_stdvec(e).expect("postcard encodes queue entries into a Vec")
}

/// Decodes a queue entry.
///
/// # Errors
/// [`StoreError::Corrupt`] if the bytes are not an entry.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("queues/entry"))
}

/// A dedup record: when the message was accepted and where it was queued.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DedupRecord {
    time_ms: u64,
    queued: Vec<(u32, u32, u64)>,
}

fn decode_dedup(v: &[u8]) -> Result<DedupRecord, StoreError> {
    postcard::from_bytes(v).map_err(|_| StoreError::Corrupt("queues/dedup"))
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
fn merge(old: &Entry, new: &Entry) -> Option<Entry> {
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
        _ => None,
    }
}

/// The newest entries of each queue, kept in memory so that delivering to
/// an online device does not read back and decode what was just written.
/// Each device's list is a suffix of its queue: appends go to its back,
/// removals take their entry out, and eviction drops from the front. So a
/// read from at least its first sequence is whole; any other read goes to
/// sled.
#[derive(Default)]
pub(crate) struct Tail {
    per_device: HashMap<DeviceKey, std::collections::VecDeque<(u64, Entry)>>,
    total: usize,
}

/// Entries kept per device queue.
const TAIL_PER_DEVICE: usize = 64;
/// Entries kept in all: past this the cache starts over (it is only a
/// cache).
const TAIL_TOTAL: usize = 1 << 16;

impl Tail {
    fn update(&mut self, removed: &std::collections::HashSet<(DeviceKey, u64)>, pushed: Vec<(DeviceKey, u64, Entry)>) {
        for (d, seq) in removed {
            if let Some(list) = self.per_device.get_mut(d)
                && let Some(i) = list.iter().position(|(s, _)| s == seq)
            {
                list.remove(i);
                self.total -= 1;
            }
        }
        for (d, seq, entry) in pushed {
            if removed.contains(&(d, seq)) {
                // Appended and folded away within the same batch.
                continue;
            }
            let list = self.per_device.entry(d).or_default();
            list.push_back((seq, entry));
            self.total += 1;
            if list.len() > TAIL_PER_DEVICE {
                list.pop_front();
                self.total -= 1;
            }
        }
        self.per_device.retain(|_, l| !l.is_empty());
        if self.total > TAIL_TOTAL {
            self.per_device.clear();
            self.total = 0;
        }
    }

    /// Serves a read from memory if it can; false if sled must.
    fn read(&self, d: DeviceKey, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> bool {
        let Some(list) = self.per_device.get(&d) else {
            return false;
        };
        match list.front() {
            Some((first, _)) if *first <= from => {
                out.extend(list.iter().filter(|(s, _)| *s >= from).take(max).cloned());
                true
            }
            _ => false,
        }
    }
}

/// One atomic change to the queues: a batch, and the meta changes it
/// makes, applied to the shared table only once the batch is written. Holds
/// the queue lock for its life.
struct Txn<'a> {
    store: &'a Store,
    metas: MutexGuard<'a, Metas>,
    changes: HashMap<DeviceKey, QueueMeta>,
    batch: sled::Batch,
    /// Entries this batch removes (so a second removal counts nothing).
    removed: std::collections::HashSet<(DeviceKey, u64)>,
    /// Fold targets this batch wrote: index key → (seq, entry).
    folds: HashMap<[u8; FOLD_KEY_LEN], (u64, Entry)>,
    /// Dedup records this batch writes: (sender, id) → acceptance time.
    dedup: HashMap<(DeviceKey, MsgId), u64>,
    /// Entries this batch appends, for the tail cache.
    pushed: Vec<(DeviceKey, u64, Entry)>,
}

impl Txn<'_> {
    fn meta(&mut self, d: DeviceKey) -> Result<QueueMeta, StoreError> {
        match self.changes.get(&d) {
            Some(m) => Ok(*m),
            None => self.store.meta(&mut self.metas, d),
        }
    }

    fn set(&mut self, d: DeviceKey, m: QueueMeta) {
        self.batch.insert(&dev_prefix(NEXT, d)[..], &m.encode()[..]);
        self.changes.insert(d, m);
    }

    /// Appends an encoded entry at the tail of `d`'s queue.
    fn push(&mut self, d: DeviceKey, entry: Entry) -> Result<u64, StoreError> {
        let value = encode_entry(&entry);
        let mut m = self.meta(d)?;
        let seq = m.next;
        m.next += 1;
        m.count += 1;
        m.bytes += value.len() as u64;
        self.batch.insert(&queue_key(d, seq)[..], value);
        self.set(d, m);
        self.pushed.push((d, seq, entry));
        Ok(seq)
    }

    /// Removes entry `seq` (of `len` bytes) from `d`'s queue, once.
    fn remove(&mut self, d: DeviceKey, seq: u64, len: usize) -> Result<(), StoreError> {
        if !self.removed.insert((d, seq)) {
            return Ok(());
        }
        let mut m = self.meta(d)?;
        m.count = m.count.saturating_sub(1);
        m.bytes = m.bytes.saturating_sub(len as u64);
        self.batch.remove(&queue_key(d, seq)[..]);
        self.set(d, m);
        Ok(())
    }

    /// Adds `entry` to `target`'s queue, folded into the pending entry of
    /// the same fold key if there is one and the result stays in bounds
    /// (the old entry is removed and the merged one re-appended at the
    /// tail, so a device that already read the old one sees the merged one
    /// too). Returns whether it folded.
    fn fold(&mut self, target: DeviceKey, fold: FoldKey, entry: Entry) -> Result<bool, StoreError> {
        let index = fold_key(target, fold);
        let mut entry = entry;
        let mut folded = false;
        // The pending entry: one this batch wrote, else the one on disk.
        let pending = match self.folds.get(&index) {
            Some((seq, e)) => Some((*seq, e.clone(), encode_entry(e).len())),
            None => match self.store.queues.get(index)?.as_deref().and_then(be_u64) {
                Some(seq) if !self.removed.contains(&(target, seq)) => self
                    .store
                    .queues
                    .get(queue_key(target, seq))?
                    .map(|old| decode_entry(&old).map(|e| (seq, e, old.len())))
                    .transpose()?,
                _ => None,
            },
        };
        if let Some((seq, old, len)) = pending
            && let Some(merged) = merge(&old, &entry)
        {
            self.remove(target, seq, len)?;
            entry = merged;
            folded = true;
        }
        let seq = self.push(target, entry.clone())?;
        self.batch.insert(&index[..], &seq.to_be_bytes()[..]);
        self.folds.insert(index, (seq, entry));
        Ok(folded)
    }

    /// Writes the batch and publishes the meta changes.
    fn commit(mut self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut self.batch);
        self.store.queues.apply_batch(batch)?;
        // Still under the queue lock: readers of metas see the tail too.
        self.store
            .tail()
            .update(&self.removed, std::mem::take(&mut self.pushed));
        let mut delta: i128 = 0;
        for (d, m) in self.changes.drain() {
            let before = self.metas.get(&d).map_or(0, |o| o.bytes);
            delta += i128::from(m.bytes) - i128::from(before);
            self.metas.insert(d, m);
        }
        let total = &self.store.queued_bytes;
        if delta >= 0 {
            total.fetch_add(delta as u64, std::sync::atomic::Ordering::Relaxed);
        } else {
            total.fetch_sub((-delta) as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Store {
    pub(crate) fn metas(&self) -> MutexGuard<'_, Metas> {
        self.metas.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn txn(&self) -> Txn<'_> {
        Txn {
            store: self,
            metas: self.metas(),
            changes: HashMap::new(),
            batch: sled::Batch::default(),
            removed: Default::default(),
            folds: HashMap::new(),
            dedup: HashMap::new(),
            pushed: Vec::new(),
        }
    }

    /// Loads every queue's meta and sums the bytes queued (at open).
    pub(super) fn count_queued_bytes(&self) -> Result<u64, StoreError> {
        let mut metas = self.metas();
        let mut total = 0;
        for item in self.queues.scan_prefix([NEXT]) {
            let (k, _) = item?;
            let d = parse_dev(&k).ok_or(StoreError::Corrupt("queues/next"))?;
            total += self.meta(&mut metas, d)?.bytes;
        }
        Ok(total)
    }

    fn meta(&self, metas: &mut Metas, d: DeviceKey) -> Result<QueueMeta, StoreError> {
        if let Some(m) = metas.get(&d) {
            return Ok(*m);
        }
        let m = match self.queues.get(dev_prefix(NEXT, d))? {
            None => QueueMeta {
                next: 1,
                count: 0,
                bytes: 0,
            },
            Some(v) if v.len() == 24 => QueueMeta {
                next: be_u64(&v).ok_or(StoreError::Corrupt("queues/next"))?,
                count: v.get(8..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/next"))?,
                bytes: v.get(16..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/next"))?,
            },
            Some(v) => {
                // Format 1 kept only the next sequence: count the queue.
                let next = be_u64(&v).ok_or(StoreError::Corrupt("queues/next"))?;
                let (mut count, mut bytes) = (0, 0);
                for item in self.queues.range(queue_key(d, 0)..=queue_key(d, u64::MAX)) {
                    let (_, v) = item?;
                    count += 1;
                    bytes += v.len() as u64;
                }
                QueueMeta { next, count, bytes }
            }
        };
        metas.insert(d, m);
        Ok(m)
    }

    /// The acceptance time of an earlier message with this id from this
    /// device, if there was one.
    ///
    /// # Errors
    /// On a database failure.
    pub fn dedup_lookup(&self, sender: DeviceKey, id: MsgId) -> Result<Option<u64>, StoreError> {
        match self.queues.get(dedup_key(sender, id))? {
            Some(v) => Ok(Some(decode_dedup(&v)?.time_ms)),
            None => Ok(None),
        }
    }

    /// Applies queue changes gathered over one event-loop turn in one atomic
    /// batch, and returns each one's outcome and the epoch after which all
    /// of them are durable. sled syncs its log buffer once per batch, so one
    /// batch a turn, not one a message, is what lets group commit amortise.
    ///
    /// # Errors
    /// On a database failure (nothing was written).
    pub fn apply(&self, ops: &[Op]) -> Result<(Vec<Outcome>, Epoch), StoreError> {
        let mut txn = self.txn();
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            outcomes.push(match op {
                Op::Append {
                    sender,
                    id,
                    to,
                    bodies,
                    now_ms,
                } => Outcome::Appended(self.stage_append(&mut txn, *sender, *id, *to, bodies, *now_ms)?),
                Op::Receipt {
                    from,
                    to,
                    kind,
                    ids,
                    targets,
                    now_ms,
                } => Outcome::Receipt(self.stage_receipt(&mut txn, *from, *to, *kind, ids, targets, *now_ms)?),
                Op::Ack { device, up_to } => Outcome::Acked(self.stage_ack(&mut txn, *device, *up_to)?),
            });
        }
        if !ops.is_empty() {
            txn.commit()?;
        }
        // Tag after the write (see Flusher).
        Ok((outcomes, self.flusher.note_write()))
    }

    fn stage_append(
        &self,
        txn: &mut Txn<'_>,
        sender: DeviceKey,
        id: MsgId,
        to: UserId,
        bodies: &[(DeviceKey, Bytes)],
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        if let Some(&time_ms) = txn.dedup.get(&(sender, id)) {
            return Ok(Appended::Duplicate { time_ms });
        }
        if let Some(time_ms) = self.dedup_lookup(sender, id)? {
            return Ok(Appended::Duplicate { time_ms });
        }
        let entries: Vec<(DeviceKey, Entry, u64)> = bodies
            .iter()
            .map(|(d, body)| {
                let m = Entry::Message(QueuedMessage {
                    id,
                    from_user: sender.user.0,
                    from_device: sender.device.0,
                    to_user: to.0,
                    time_ms: now_ms,
                    body: body.clone(),
                });
                let len = postcard::experimental::serialized_size(&m).unwrap_or(usize::MAX) as u64;
                (*d, m, len)
            })
            .collect();
        // Quotas refuse rather than drop (nothing accepted is ever removed
        // to make room).
        let total: u64 = entries.iter().map(|(_, _, len)| *len).sum();
        if let Some(q) = self.over_quota(txn, entries.iter().map(|(d, _, len)| (*d, *len)), total)? {
            return Ok(Appended::OverQuota(q));
        }
        let mut record = DedupRecord {
            time_ms: now_ms,
            queued: Vec::with_capacity(entries.len()),
        };
        for (d, entry, _) in entries {
            let seq = txn.push(d, entry)?;
            record.queued.push((d.user.0, d.device.0, seq));
        }
        let dedup = postcard::to_stdvec(&record).expect("postcard encodes dedup records");
        txn.batch.insert(&dedup_key(sender, id)[..], dedup);
        txn.dedup.insert((sender, id), now_ms);
        Ok(Appended::New { time_ms: now_ms })
    }

    /// Which quota, if any, `new` entries (device, bytes) totalling
    /// `total` bytes would exceed.
    fn over_quota(
        &self,
        txn: &mut Txn<'_>,
        new: impl Iterator<Item = (DeviceKey, u64)>,
        total: u64,
    ) -> Result<Option<Quota>, StoreError> {
        let quotas = self.quotas;
        let staged: i128 = txn
            .changes
            .iter()
            .map(|(d, m)| i128::from(m.bytes) - i128::from(txn.metas.get(d).map_or(0, |o| o.bytes)))
            .sum();
        let queued = (i128::from(self.queued_bytes()) + staged).max(0) as u64;
        if queued.saturating_add(total) > quotas.disk_budget {
            return Ok(Some(Quota::Disk));
        }
        for (d, len) in new {
            let m = txn.meta(d)?;
            if m.count + 1 > quotas.queue_messages || m.bytes + len > quotas.queue_bytes {
                return Ok(Some(Quota::Queue(d)));
            }
        }
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    fn stage_receipt(
        &self,
        txn: &mut Txn<'_>,
        from: DeviceKey,
        to: UserId,
        kind: ReceiptKind,
        ids: &[MsgId],
        targets: &[DeviceKey],
        now_ms: u64,
    ) -> Result<Result<(), Quota>, StoreError> {
        let entry = Entry::Receipt(QueuedReceipt {
            from_user: from.user.0,
            from_device: from.device.0,
            to_user: to.0,
            kind: kind.0,
            ids: ids.to_vec(),
            time_ms: now_ms,
        });
        let len = encode_entry(&entry).len() as u64;
        if let Some(q) = self.over_quota(txn, std::iter::empty(), len * targets.len() as u64)? {
            return Ok(Err(q));
        }
        // A receipt that cannot fold anywhere and would overfill a queue is
        // refused before anything of it is staged.
        let quotas = self.quotas;
        for t in targets {
            let m = txn.meta(*t)?;
            let index = fold_key(*t, FoldKey::Receipt(from, kind.0, to));
            let may_fold = txn.folds.contains_key(&index) || self.store_has_fold(&index)?;
            if !may_fold && (m.count + 1 > quotas.queue_messages || m.bytes + len > quotas.queue_bytes) {
                return Ok(Err(Quota::Queue(*t)));
            }
        }
        for t in targets {
            txn.fold(*t, FoldKey::Receipt(from, kind.0, to), entry.clone())?;
        }
        Ok(Ok(()))
    }

    fn store_has_fold(&self, index: &[u8; FOLD_KEY_LEN]) -> Result<bool, StoreError> {
        let Some(seq) = self.queues.get(index)?.as_deref().and_then(be_u64) else {
            return Ok(false);
        };
        let Some(d) = parse_dev(index) else { return Ok(false) };
        Ok(self.queues.contains_key(queue_key(d, seq))?)
    }

    fn stage_ack(&self, txn: &mut Txn<'_>, d: DeviceKey, up_to: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.queues.range(queue_key(d, 0)..=queue_key(d, up_to)) {
            let (k, v) = item?;
            let seq = k.get(9..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/key"))?;
            if !txn.removed.contains(&(d, seq)) {
                txn.remove(d, seq, v.len())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Appends message `id` from `sender` to each `(device, body)` queue in
    /// one atomic batch with its dedup record, unless that dedup record
    /// exists or a quota would be exceeded. `to` is the user the message
    /// was addressed to. (One [`Store::apply`] of one op.)
    ///
    /// # Errors
    /// On a database failure (nothing was appended).
    pub fn append(
        &self,
        sender: DeviceKey,
        id: MsgId,
        to: UserId,
        bodies: &[(DeviceKey, Bytes)],
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        let op = Op::Append {
            sender,
            id,
            to,
            bodies: bodies.to_vec(),
            now_ms,
        };
        match self.apply(std::slice::from_ref(&op))?.0.pop() {
            Some(Outcome::Appended(a)) => Ok(a),
            _ => unreachable!("one append, one outcome"),
        }
    }

    /// Queues a receipt from device `from` about messages of user `to` for
    /// every device in `targets`, folded with receipts of the same kind from
    /// the same device to the same user still waiting there. A receipt that
    /// would start a new entry counts against the queue quota, and every
    /// receipt against the disk budget, so receipts cannot fill the disk.
    /// (One [`Store::apply`] of one op.)
    ///
    /// # Errors
    /// On a database failure (nothing was queued).
    pub fn append_receipt(
        &self,
        from: DeviceKey,
        to: UserId,
        kind: ReceiptKind,
        ids: &[MsgId],
        targets: &[DeviceKey],
        now_ms: u64,
    ) -> Result<Result<Epoch, Quota>, StoreError> {
        let op = Op::Receipt {
            from,
            to,
            kind,
            ids: ids.to_vec(),
            targets: targets.to_vec(),
            now_ms,
        };
        let (mut outcomes, epoch) = self.apply(std::slice::from_ref(&op))?;
        match outcomes.pop() {
            Some(Outcome::Receipt(r)) => Ok(r.map(|()| epoch)),
            _ => unreachable!("one receipt, one outcome"),
        }
    }

    /// Appends up to `max` entries of `d`'s queue with sequence ≥ `from` to
    /// `out`, in order.
    ///
    /// # Errors
    /// On a database failure or a corrupt entry.
    pub fn read_queue(
        &self,
        d: DeviceKey,
        from: u64,
        max: usize,
        out: &mut Vec<(u64, Entry)>,
    ) -> Result<(), StoreError> {
        if self.tail().read(d, from, max, out) {
            return Ok(());
        }
        let start = queue_key(d, from);
        let end = queue_key(d, u64::MAX);
        for item in self.queues.range(start..=end).take(max) {
            let (k, v) = item?;
            let seq = k.get(9..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/key"))?;
            out.push((seq, decode_entry(&v)?));
        }
        Ok(())
    }

    /// The highest sequence number ever given out in `d`'s queue (0 if
    /// none).
    ///
    /// # Errors
    /// On a database failure.
    pub fn last_seq(&self, d: DeviceKey) -> Result<u64, StoreError> {
        let mut metas = self.metas();
        Ok(self.meta(&mut metas, d)?.next - 1)
    }

    /// Entries and bytes in `d`'s queue.
    ///
    /// # Errors
    /// On a database failure.
    pub fn queue_usage(&self, d: DeviceKey) -> Result<(u64, u64), StoreError> {
        let mut metas = self.metas();
        let m = self.meta(&mut metas, d)?;
        Ok((m.count, m.bytes))
    }

    /// Number of entries in `d`'s queue.
    ///
    /// # Errors
    /// On a database failure.
    pub fn queue_len(&self, d: DeviceKey) -> Result<usize, StoreError> {
        Ok(self.queue_usage(d)?.0 as usize)
    }

    /// Deletes every entry of `d`'s queue with sequence ≤ `up_to`. Returns
    /// how many. Not flushed on its own: an ack lost in a crash means a
    /// redelivery, which the client drops as a duplicate.
    ///
    /// # Errors
    /// On a database failure.
    pub fn ack(&self, d: DeviceKey, up_to: u64) -> Result<usize, StoreError> {
        match self.apply(&[Op::Ack { device: d, up_to }])?.0.pop() {
            Some(Outcome::Acked(n)) => Ok(n),
            _ => unreachable!("one ack, one outcome"),
        }
    }

    /// Deletes a device's whole queue (after revocation).
    ///
    /// # Errors
    /// On a database failure.
    pub fn delete_queue(&self, d: DeviceKey) -> Result<usize, StoreError> {
        self.ack(d, u64::MAX)
    }

    /// Removes the still-queued copies of message `id`, sent by any of
    /// `senders` (the devices of one user), from every queue. Returns how
    /// many copies were removed. The dedup record stays, so a late retry of
    /// the original is not stored again.
    ///
    /// # Errors
    /// On a database failure (nothing was removed).
    pub fn retract(&self, senders: &[DeviceKey], id: MsgId) -> Result<(usize, Epoch), StoreError> {
        let mut txn = self.txn();
        let mut n = 0;
        for sender in senders {
            let Some(v) = self.queues.get(dedup_key(*sender, id))? else {
                continue;
            };
            for (user, device, seq) in decode_dedup(&v)?.queued {
                let d = key(user, device);
                let Some(old) = self.queues.get(queue_key(d, seq))? else {
                    continue;
                };
                if !matches!(decode_entry(&old)?, Entry::Message(m) if m.id == id) {
                    continue;
                }
                txn.remove(d, seq, old.len())?;
                n += 1;
            }
        }
        txn.commit()?;
        Ok((n, self.flusher.note_write()))
    }

    /// One bounded turn of the retention sweeper: looks at up to
    /// `max_keys` keys from `cursor` on, removes messages (and notices,
    /// receipts, dedup records) accepted before `cutoff_ms`, and for every
    /// expired message queues a gap notice for the device that lost it and
    /// an expiry notice for every current device of its sender. It also
    /// forgets fold records whose entry is gone (acknowledged, expired,
    /// folded away), so that they do not outlive what they were about. The
    /// cursor moves on; it wraps to the start after the last key.
    ///
    /// # Errors
    /// On a database failure (nothing was removed).
    pub fn sweep(
        &self,
        cursor: &mut Vec<u8>,
        cutoff_ms: u64,
        max_keys: usize,
        now_ms: u64,
    ) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let mut expired: Vec<(Vec<u8>, DeviceKey)> = Vec::new();
        let mut dedups: Vec<Vec<u8>> = Vec::new();
        let mut stale_folds: Vec<(Vec<u8>, DeviceKey, u64)> = Vec::new();
        let mut scanned = 0;
        let mut from = cursor.clone();
        'scan: while scanned < max_keys {
            let mut moved = false;
            for item in self.queues.range(from.clone()..) {
                let (k, v) = item?;
                scanned += 1;
                moved = true;
                let skip_to = match k.first() {
                    Some(&QUEUE) => {
                        let Some(d) = parse_dev(&k) else {
                            return Err(StoreError::Corrupt("queues/key"));
                        };
                        if decode_entry(&v)?.time_ms() < cutoff_ms {
                            expired.push((k.to_vec(), d));
                            None
                        } else {
                            // Entries of a queue are in acceptance order:
                            // the rest of this one is younger.
                            let mut next = dev_prefix(QUEUE, d).to_vec();
                            next.extend_from_slice(&[0xff; 9]);
                            Some(next)
                        }
                    }
                    Some(&DEDUP) => {
                        if decode_dedup(&v)?.time_ms < cutoff_ms {
                            dedups.push(k.to_vec());
                        }
                        None
                    }
                    Some(&FOLD) => {
                        if let (Some(d), Some(seq)) = (parse_dev(&k), be_u64(&v))
                            && !self.queues.contains_key(queue_key(d, seq))?
                        {
                            stale_folds.push((k.to_vec(), d, seq));
                        }
                        None
                    }
                    // Meta records: nothing to expire.
                    Some(&tag) => Some(vec![tag + 1]),
                    None => None,
                };
                if scanned >= max_keys {
                    let mut next = k.to_vec();
                    next.push(0);
                    from = skip_to.unwrap_or(next);
                    break 'scan;
                }
                if let Some(next) = skip_to {
                    from = next;
                    continue 'scan;
                }
            }
            if !moved || scanned < max_keys {
                // Reached the end of the tree.
                from = Vec::new();
                swept.wrapped = true;
                break;
            }
        }
        *cursor = from;
        if expired.is_empty() && dedups.is_empty() && stale_folds.is_empty() {
            return Ok(swept);
        }
        // Remove under the lock, re-reading each entry: it may have been
        // acknowledged since.
        let mut txn = self.txn();
        let mut gaps: BTreeMap<DeviceKey, Vec<LostRecord>> = BTreeMap::new();
        let mut undelivered: BTreeMap<(UserId, DeviceKey), Vec<MsgId>> = BTreeMap::new();
        for (k, d) in expired {
            let Some(v) = self.queues.get(&k)? else { continue };
            let entry = decode_entry(&v)?;
            if entry.time_ms() >= cutoff_ms {
                continue;
            }
            let seq = k.get(9..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/key"))?;
            txn.remove(d, seq, v.len())?;
            if let Entry::Message(msg) = entry {
                swept.expired += 1;
                let lost = gaps.entry(d).or_default();
                match lost
                    .iter_mut()
                    .find(|l| l.from_user == msg.from_user && l.from_device == msg.from_device)
                {
                    Some(l) => {
                        l.count += 1;
                        l.first_ms = l.first_ms.min(msg.time_ms);
                        l.last_ms = l.last_ms.max(msg.time_ms);
                    }
                    None => lost.push(LostRecord {
                        from_user: msg.from_user,
                        from_device: msg.from_device,
                        count: 1,
                        first_ms: msg.time_ms,
                        last_ms: msg.time_ms,
                    }),
                }
                undelivered.entry((UserId(msg.from_user), d)).or_default().push(msg.id);
            }
        }
        for k in dedups {
            txn.batch.remove(k);
            swept.forgotten += 1;
        }
        // Before the folds below, which may write the same keys anew. A fold
        // since the scan may have pointed the record at a new entry: check.
        for (k, d, seq) in stale_folds {
            let still = self.queues.get(&k)?.as_deref().and_then(be_u64) == Some(seq);
            if still && !self.queues.contains_key(queue_key(d, seq))? {
                txn.batch.remove(k);
            }
        }
        for (d, lost) in gaps {
            // A notice stays within one frame: at most MAX_GAP_SENDERS
            // sender devices an entry.
            for chunk in lost.chunks(MAX_GAP_SENDERS) {
                txn.fold(
                    d,
                    FoldKey::Gap,
                    Entry::Gap(QueuedGap {
                        lost: chunk.to_vec(),
                        time_ms: now_ms,
                    }),
                )?;
            }
            swept.notified.push(d);
        }
        let mut senders = Vec::new();
        for ((sender, d), ids) in undelivered {
            senders.clear();
            self.accounts.current_devices(sender, &mut senders);
            for chunk in ids.chunks(MAX_RECEIPT_IDS) {
                let notice = Entry::Expired(QueuedExpired {
                    device_user: d.user.0,
                    device: d.device.0,
                    ids: chunk.to_vec(),
                    time_ms: now_ms,
                });
                for s in &senders {
                    let target = DeviceKey {
                        user: sender,
                        device: *s,
                    };
                    txn.fold(target, FoldKey::Expired(d), notice.clone())?;
                    swept.notified.push(target);
                }
            }
        }
        txn.commit()?;
        swept.notified.sort();
        swept.notified.dedup();
        Ok(swept)
    }

    /// Rewrites format-1 queue entries (a bare message) as format-2
    /// entries (the [`Entry`] enum, whose tag 0 is a message), and format-1
    /// dedup values (a bare time) as dedup records, in one atomic batch
    /// that also writes a marker, so that a rerun after a crash does
    /// nothing.
    pub(super) fn migrate_entries_1_to_2(queues: &sled::Tree) -> Result<(), StoreError> {
        if queues.get(MIGRATED)?.as_deref() == Some(&2u32.to_be_bytes()[..]) {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in queues.scan_prefix([QUEUE]) {
            let (k, v) = item?;
            let old: QueuedMessage = postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt("queues/entry"))?;
            batch.insert(k, encode_entry(&Entry::Message(old)));
            n += 1;
        }
        for item in queues.scan_prefix([DEDUP]) {
            let (k, v) = item?;
            let record = DedupRecord {
                time_ms: be_u64(&v).ok_or(StoreError::Corrupt("queues/dedup"))?,
                queued: Vec::new(),
            };
            batch.insert(k, postcard::to_stdvec(&record).expect("postcard encodes dedup records"));
        }
        batch.insert(MIGRATED, &2u32.to_be_bytes()[..]);
        queues.apply_batch(batch)?;
        log::info!("migrated {n} queue entries to format 2");
        Ok(())
    }
}
