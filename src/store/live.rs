//! The queues in memory: what the event loops append, deliver and
//! acknowledge without touching the disk, and what the store thread takes
//! from them to write.
//!
//! Each device's queue is a suffix in memory (`mem`, in sequence order)
//! over what is on disk only: every entry that still exists and has a
//! sequence above the queue's `disk_hi` is in `mem`. A slot in `mem` is
//! - **unwritten**: appended by a loop, waiting for its device's ack or
//!   for its deadline (`write_delay` for a device that was online, none
//!   for one that was not, sooner when more than `write_memory` bytes
//!   wait); acknowledged now, it is never written;
//! - **writing**: the store thread took it for a batch;
//! - **durable**: flushed; kept as a cache for delivery, then evicted
//!   (from the front, so the suffix property holds).
//!
//! A message is **settled** once each of its copies was acknowledged while
//! unwritten or writing, or became durable; then its waiters hear
//! [`Outcome::Settled`] and the sender may be told `Accepted` (spec §10).
//! Settled messages are remembered for a while (`recent`) so that a retry
//! is answered without queueing it again; retries after that are dropped
//! by the receiving client by id. After a restart, the newest messages
//! with a copy in the spill log are **restored**: a retry of one queues
//! copies only for the devices whose copy is not still queued, with the
//! original time; a retraction record answers before that.
//!
//! Sequence numbers come from each queue's `next`, below a `ceiling`
//! that the store thread keeps durable ahead of them, so that numbers
//! handed out for copies never written are never reused after a crash.
//!
//! Counting: a queue's `count` and `bytes` hold every entry not yet
//! deleted (in memory or on disk), as stored; `unwritten` the bytes of
//! unwritten slots; `disk_bytes` (kept by the store thread) every record on
//! disk. Quotas and the disk budget are checked against these, exactly;
//! the fair shares ([`super::shares`]) against the same entries counted
//! per sending user.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Quotas;
use super::api::{Appended, Entry, NewMessage, Outcome, QueuedMessage, Quota, Read, Refused, Waiter};
use super::shares::{self, Gone, Shares, Use};
use super::spill::Restored;
use crate::ids::{DeviceKey, UserId};
use crate::wire::MsgId;

/// A message by its sending device and id.
pub(crate) type MsgKey = (DeviceKey, MsgId);

/// Settings of the in-memory queues.
#[derive(Debug, Clone)]
pub(crate) struct LiveConfig {
    pub quotas: Quotas,
    /// How long a copy for an online device waits for its ack before it is
    /// written.
    pub write_delay: Duration,
    /// Most bytes of unwritten copies; past this the oldest are written
    /// at once.
    pub write_memory: u64,
    /// Most bytes of durable entries kept for delivery.
    pub cache_bytes: u64,
    /// Most durable entries kept per queue.
    pub cache_per_queue: usize,
    /// Settled messages remembered for recognising retries.
    pub recent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Unwritten,
    Writing,
    Durable,
}

#[derive(Debug)]
struct Slot {
    seq: u64,
    entry: Entry,
    size: u64,
    state: State,
}

impl Slot {
    fn msg_key(&self) -> Option<MsgKey> {
        self.entry.msg_key()
    }

    fn sender(&self) -> Option<UserId> {
        self.entry.sender()
    }
}

#[derive(Debug)]
pub(crate) struct Queue {
    next: u64,
    count: u64,
    bytes: u64,
    mem: VecDeque<Slot>,
    /// Durable slots in `mem`.
    cached: usize,
    /// Records on disk or being written, not yet deleted.
    on_disk: u64,
    /// No entry at or below this sequence is in `mem`.
    disk_hi: u64,
}

impl Queue {
    fn new(next: u64) -> Queue {
        Queue {
            next,
            count: 0,
            bytes: 0,
            mem: VecDeque::new(),
            cached: 0,
            on_disk: 0,
            disk_hi: 0,
        }
    }

    fn find(&self, seq: u64) -> Option<usize> {
        self.mem.binary_search_by_key(&seq, |s| s.seq).ok()
    }
}

struct MsgState {
    time_ms: u64,
    copies: Vec<(DeviceKey, u64)>,
    unsafe_copies: usize,
    waiters: Vec<Waiter>,
    /// Known from the spill log at open (a retry after a restart): the
    /// copies are those still queued then.
    restored: bool,
}

/// A copy the store thread writes.
#[derive(Debug)]
pub(crate) struct Write {
    pub device: DeviceKey,
    pub seq: u64,
    pub entry: Entry,
}

/// What the store thread found on disk for a queue at open.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Loaded {
    pub max_seq: u64,
    pub count: u64,
    pub bytes: u64,
}

/// Where a removed entry was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Removed {
    /// Only in memory: gone.
    Memory,
    /// Written (or being written): the caller deletes its record.
    Disk,
    /// Not in memory: on disk if it exists.
    NotInMemory,
}

pub(crate) struct Inner {
    queues: HashMap<DeviceKey, Queue>,
    msgs: HashMap<MsgKey, MsgState>,
    settled: VecDeque<MsgKey>,
    tombstones: HashMap<(UserId, MsgId), u64>,
    /// Unwritten copies due at once (for devices offline), in the order
    /// they came.
    due_now: VecDeque<(DeviceKey, u64)>,
    /// Unwritten copies waiting for an ack, by deadline (the order they
    /// came).
    staged: VecDeque<(Instant, DeviceKey, u64)>,
    unwritten: u64,
    cached: u64,
    cache_order: VecDeque<DeviceKey>,
    /// Per queue: every record at or below this sequence goes.
    deletes: HashMap<DeviceKey, u64>,
    /// Single records that go.
    removes: Vec<(DeviceKey, u64)>,
    /// Bytes of every record on disk (kept exact by the store thread).
    pub disk_bytes: u64,
    /// Copies in the spill log (set by the store thread each turn).
    pub spilled: u64,
    /// The spill log's records less its copies' charges (copies written
    /// together share a record; a record stays whole while any of its
    /// copies waits): `disk_bytes` counts charges, the disk budget records.
    /// Set by the store thread each turn.
    pub spill_adjust: i64,
    /// Sequences below this may be handed out.
    pub ceiling: u64,
    /// The first sequence of a queue seen for the first time.
    base: u64,
    /// The highest `next` of any queue.
    pub max_next: u64,
    /// The store thread should run now (something for a device that is
    /// offline, or memory over its bound).
    pub urgent: bool,
    /// Settlements to send once the lock is released.
    out: Vec<(Waiter, u64)>,
    /// Every entry counted per sending user (spec §10, *Fair shares*).
    shares: Shares,
    /// Write every copy at once (shutting down).
    pub write_all: bool,
}

/// What a retracted message's record counts for in its user's share: one
/// record, as stored (its key and the 8-byte time).
fn tombstone_use() -> Use {
    Use::one((super::disk::TOMBSTONE_KEY_LEN + 8) as u64)
}

/// Sets the acceptance time of a copy (a retry after a restart keeps the
/// original's).
fn set_time(e: &mut Entry, time_ms: u64) {
    match e {
        Entry::Message(m) => m.time_ms = time_ms,
        Entry::Group(g) => g.time_ms = time_ms,
        _ => {}
    }
}

/// The in-memory queues, shared by the loops and the store thread.
pub(crate) struct Live {
    inner: Mutex<Inner>,
    pub config: LiveConfig,
}

impl Live {
    /// Queues as loaded from disk; `base` is the first sequence any queue
    /// may hand out from now on, `ceiling` the durable bound above it.
    // What the open scan found, each piece as it is used here; one caller.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: LiveConfig,
        loaded: HashMap<DeviceKey, Loaded>,
        tombstones: HashMap<(UserId, MsgId), u64>,
        disk_bytes: u64,
        base: u64,
        ceiling: u64,
        restored: Vec<Restored>,
        shares: Shares,
    ) -> Live {
        let mut queues = HashMap::with_capacity(loaded.len());
        let mut max_next = base;
        for (d, l) in loaded {
            let mut q = Queue::new(base.max(l.max_seq + 1));
            q.count = l.count;
            q.bytes = l.bytes;
            q.on_disk = l.count;
            q.disk_hi = l.max_seq;
            max_next = max_next.max(q.next);
            queues.insert(d, q);
        }
        let mut msgs = HashMap::with_capacity(restored.len());
        let mut settled = VecDeque::with_capacity(restored.len());
        for r in restored {
            let key = (r.sender, r.id);
            settled.push_back(key);
            msgs.insert(
                key,
                MsgState {
                    time_ms: r.time_ms,
                    copies: r.copies,
                    unsafe_copies: 0,
                    waiters: Vec::new(),
                    restored: true,
                },
            );
        }
        let mut shares = shares;
        for (user, _) in tombstones.keys() {
            shares.charge(*user, tombstone_use());
        }
        Live {
            inner: Mutex::new(Inner {
                queues,
                msgs,
                settled,
                tombstones,
                due_now: VecDeque::new(),
                staged: VecDeque::new(),
                unwritten: 0,
                cached: 0,
                cache_order: VecDeque::new(),
                deletes: HashMap::new(),
                removes: Vec::new(),
                disk_bytes,
                spilled: 0,
                spill_adjust: 0,
                ceiling,
                base,
                max_next,
                urgent: false,
                out: Vec::new(),
                shares,
                write_all: false,
            }),
            config,
        }
    }

    /// The lock. Settlements made under it are sent when the guard drops.
    pub fn lock(&self) -> Guard<'_> {
        Guard {
            inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            config: &self.config,
        }
    }
}

/// The locked queues.
pub(crate) struct Guard<'a> {
    inner: MutexGuard<'a, Inner>,
    config: &'a LiveConfig,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.inner.out.is_empty() {
            return;
        }
        let out = std::mem::take(&mut self.inner.out);
        // Sinks take their own lock; pushing under ours is safe (they never
        // call back) and keeps the order of settlements.
        for (w, time_ms) in out {
            w.complete(Outcome::Settled { time_ms });
        }
    }
}

impl Inner {
    /// Bytes of every record on disk, exactly: what the disk budget counts.
    pub fn disk_used(&self) -> u64 {
        self.disk_bytes.saturating_add_signed(self.spill_adjust)
    }
}

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Guard<'_> {
    fn queue(&mut self, d: DeviceKey) -> &mut Queue {
        let base = self.inner.base;
        self.inner.queues.entry(d).or_insert_with(|| Queue::new(base))
    }

    /// One copy became safe (acknowledged, durable, retracted).
    fn safe(&mut self, key: MsgKey) {
        let Some(m) = self.inner.msgs.get_mut(&key) else { return };
        if m.unsafe_copies == 0 {
            return;
        }
        m.unsafe_copies -= 1;
        if m.unsafe_copies == 0 {
            let time_ms = m.time_ms;
            let waiters = std::mem::take(&mut m.waiters);
            self.inner.out.extend(waiters.into_iter().map(|w| (w, time_ms)));
            self.settled(key);
        }
    }

    fn settled(&mut self, key: MsgKey) {
        self.inner.settled.push_back(key);
        while self.inner.settled.len() > self.config.recent {
            let Some(old) = self.inner.settled.pop_front() else {
                break;
            };
            if self.inner.msgs.get(&old).is_some_and(|m| m.unsafe_copies == 0) {
                self.inner.msgs.remove(&old);
            }
        }
    }

    /// A retry of a message still known: the answer it gets (see
    /// [`super::api::StoreApi::recall`]).
    pub fn recall(&mut self, sender: DeviceKey, id: MsgId, waiter: &Waiter) -> Option<Appended> {
        if let Some(&time_ms) = self.inner.tombstones.get(&(sender.user, id)) {
            return Some(Appended::Duplicate { time_ms });
        }
        let state = self.inner.msgs.get_mut(&(sender, id))?;
        if state.restored {
            // Known only in part: which devices miss a copy shows against
            // the retry's copies, in `append`.
            return None;
        }
        if state.unsafe_copies > 0 {
            state.waiters.push(waiter.clone());
            return Some(Appended::Waiting);
        }
        Some(Appended::Duplicate { time_ms: state.time_ms })
    }

    /// What the store knows of message `id` from `sender` before a new
    /// append of it: `Err` with the answer when it is a retry of one known
    /// (or retracted); `Ok(Some((time, queued)))` when it was restored at
    /// open, with its time and the devices whose copy is still queued
    /// (only the others get the retry's copies); `Ok(None)` when it is
    /// new.
    fn known(
        &mut self,
        sender: DeviceKey,
        id: MsgId,
        waiter: &Waiter,
    ) -> Result<Option<(u64, Vec<DeviceKey>)>, Appended> {
        // A retraction answers first (spec §5.5), also for a message
        // restored at open: a copy of it may come back after a crash (it
        // was acknowledged, its device's mark not yet written).
        if let Some(&time_ms) = self.inner.tombstones.get(&(sender.user, id)) {
            return Err(Appended::Duplicate { time_ms });
        }
        if let Some(r) = self.inner.msgs.get(&(sender, id)).filter(|r| r.restored) {
            // A retry of a message spilled before a restart: a device
            // whose copy is still queued has it; the others get the retry
            // (their copy was delivered, or lost unwritten with the
            // restart; a duplicate is dropped by the client, a loss is
            // not), with the original time. Below the floor such a retry
            // is refused like a new message: answering it `Accepted`
            // would tell the sender a copy is safe that may be lost. The
            // message stays restored until its retry is queued (a refused
            // one is recognised again later); the state made below
            // replaces it.
            return Ok(Some((r.time_ms, r.copies.iter().map(|(d, _)| *d).collect())));
        }
        match self.recall(sender, id, waiter) {
            Some(known) => Err(known),
            None => Ok(None),
        }
    }

    /// Appends a message (see [`super::api::StoreApi::append`]); `full`:
    /// the disk is below its floor, so only retries are answered.
    pub fn append(&mut self, mut m: NewMessage, now: Instant, waiter: &Waiter, full: bool) -> Appended {
        let key = (m.sender, m.id);
        match self.known(m.sender, m.id, waiter) {
            Err(answer) => return answer,
            Ok(Some((time_ms, queued))) => {
                m.copies.retain(|(d, _, _)| !queued.contains(d));
                m.now_ms = time_ms;
                if m.copies.is_empty() {
                    return Appended::Duplicate { time_ms };
                }
            }
            Ok(None) => {}
        }
        if full {
            return Appended::Refused(Refused::StorageFull);
        }
        let quotas = self.config.quotas;
        let entries: Vec<(DeviceKey, Entry, u64, bool)> = m
            .copies
            .into_iter()
            .map(|(d, body, online)| {
                let e = Entry::Message(QueuedMessage {
                    id: m.id,
                    from_user: m.sender.user.0,
                    from_device: m.sender.device.0,
                    to_user: m.to.0,
                    time_ms: m.now_ms,
                    body,
                });
                let size = e.stored_len();
                (d, e, size, online)
            })
            .collect();
        if entries.is_empty() {
            return Appended::Duplicate { time_ms: m.now_ms };
        }
        // Quotas refuse rather than drop (spec §10, *Quotas*).
        let total: u64 = entries.iter().map(|(_, _, s, _)| s).sum::<u64>();
        let held = self.inner.disk_used() + self.inner.unwritten;
        if held.saturating_add(total) > quotas.disk_budget
            || self.inner.spilled + entries.len() as u64 > quotas.total_messages
        {
            return Appended::Refused(Refused::Quota(Quota::Disk));
        }
        let ceiling = self.inner.ceiling;
        for (d, _, size, _) in &entries {
            let q = self.queue(*d);
            if q.count + 1 > quotas.queue_messages || q.bytes + size > quotas.queue_bytes || q.next >= ceiling {
                return Appended::Refused(Refused::Quota(Quota::Queue(*d)));
            }
        }
        // Fair shares (spec §10, *Fair shares*): of each queue, and of the
        // storage, in that order.
        let sender = m.sender.user;
        for (d, _, size, _) in &entries {
            if let Some(q) = self.queue_share(*d, sender, *size) {
                return Appended::Refused(Refused::Quota(q));
            }
        }
        let add = Use {
            count: entries.len() as u64,
            bytes: total,
        };
        if let Some(q) = self.user_share(sender, add) {
            return Appended::Refused(Refused::Quota(q));
        }
        self.queue_copies(key, m.now_ms, entries, now, waiter);
        Appended::Queued { time_ms: m.now_ms }
    }

    /// Appends the copies of a message to a group or of key shares (see
    /// [`super::api::StoreApi::append_group`]): `copies` are (device,
    /// entry, online). The disk budget and the total refuse the whole; a
    /// device whose queue is full gets no copy and is returned in
    /// `skipped` (it is told with a gap notice: one member that does not
    /// collect its messages cannot stop a group).
    pub fn append_fanout(
        &mut self,
        key: MsgKey,
        time_ms: u64,
        mut copies: Vec<(DeviceKey, Entry, bool)>,
        now: Instant,
        waiter: &Waiter,
        full: bool,
    ) -> (Appended, Vec<DeviceKey>) {
        let mut time_ms = time_ms;
        match self.known(key.0, key.1, waiter) {
            Err(answer) => return (answer, Vec::new()),
            Ok(Some((original, queued))) => {
                copies.retain(|(d, _, _)| !queued.contains(d));
                time_ms = original;
                for (_, e, _) in &mut copies {
                    set_time(e, original);
                }
                if copies.is_empty() {
                    return (Appended::Duplicate { time_ms }, Vec::new());
                }
            }
            Ok(None) => {}
        }
        if full {
            return (Appended::Refused(Refused::StorageFull), Vec::new());
        }
        let quotas = self.config.quotas;
        let entries: Vec<(DeviceKey, Entry, u64, bool)> = copies
            .into_iter()
            .map(|(d, e, online)| {
                let size = e.stored_len();
                (d, e, size, online)
            })
            .collect();
        let total: u64 = entries.iter().map(|(_, _, s, _)| s).sum::<u64>();
        let held = self.inner.disk_used() + self.inner.unwritten;
        if held.saturating_add(total) > quotas.disk_budget
            || self.inner.spilled + entries.len() as u64 > quotas.total_messages
        {
            return (Appended::Refused(Refused::Quota(Quota::Disk)), Vec::new());
        }
        let ceiling = self.inner.ceiling;
        let sender = key.0.user;
        let mut skipped = Vec::new();
        let mut kept = Vec::with_capacity(entries.len());
        for (d, e, size, online) in entries {
            let q = self.queue(d);
            if q.next >= ceiling {
                return (Appended::Refused(Refused::Quota(Quota::Queue(d))), Vec::new());
            }
            // A queue that is full, or full for this sender (spec §10,
            // *Fair shares*), gets no copy and hears of it.
            if q.count + 1 > quotas.queue_messages
                || q.bytes + size > quotas.queue_bytes
                || self.queue_share(d, sender, size).is_some()
            {
                skipped.push(d);
            } else {
                kept.push((d, e, size, online));
            }
        }
        // The sender's share of the storage refuses the whole.
        let add = Use {
            count: kept.len() as u64,
            bytes: kept.iter().map(|(_, _, s, _)| s).sum::<u64>(),
        };
        if let Some(q) = self.user_share(sender, add) {
            return (Appended::Refused(Refused::Quota(q)), Vec::new());
        }
        if kept.is_empty() {
            // Nothing to keep safe; the skipped hear of it.
            self.inner.msgs.insert(
                key,
                MsgState {
                    time_ms,
                    copies: Vec::new(),
                    unsafe_copies: 0,
                    waiters: Vec::new(),
                    restored: false,
                },
            );
            self.settled(key);
            return (Appended::Duplicate { time_ms }, skipped);
        }
        self.queue_copies(key, time_ms, kept, now, waiter);
        (Appended::Queued { time_ms }, skipped)
    }

    /// Queues copies that passed their quotas, and remembers the message
    /// until every copy is safe.
    fn queue_copies(
        &mut self,
        key: MsgKey,
        time_ms: u64,
        entries: Vec<(DeviceKey, Entry, u64, bool)>,
        now: Instant,
        waiter: &Waiter,
    ) {
        let mut copies = Vec::with_capacity(entries.len());
        let delay = self.config.write_delay;
        for (d, entry, size, online) in entries {
            let deadline = if online { now + delay } else { now };
            self.inner.shares.add(d, entry.sender(), size);
            let q = self.queue(d);
            let seq = q.next;
            q.next += 1;
            q.count += 1;
            q.bytes += size;
            q.mem.push_back(Slot {
                seq,
                entry,
                size,
                state: State::Unwritten,
            });
            let next = q.next;
            self.inner.max_next = self.inner.max_next.max(next);
            self.inner.unwritten += size;
            // `staged` is in deadline order, which the store thread relies
            // on (it stops at the first copy not yet due); copies due now
            // are written first, in the order they came (so that a torn
            // tail loses the newest, and a device's copies are appended in
            // sequence order).
            if online {
                self.inner.staged.push_back((deadline, d, seq));
            } else {
                self.inner.due_now.push_back((d, seq));
                self.inner.urgent = true;
            }
            copies.push((d, seq));
        }
        if self.inner.unwritten > self.config.write_memory {
            self.inner.urgent = true;
        }
        self.inner.msgs.insert(
            key,
            MsgState {
                time_ms,
                unsafe_copies: copies.len(),
                copies,
                waiters: vec![waiter.clone()],
                restored: false,
            },
        );
    }

    /// The share `user` would go over holding `add` more in all queues,
    /// if any (spec §10, *Fair shares*): its fixed share, or half of the room
    /// the others leave ([`Quota::User`]); or the budget itself, when not
    /// even a user holding nothing could add it ([`Quota::Disk`]).
    pub fn user_share(&self, user: UserId, add: Use) -> Option<Quota> {
        let quotas = self.config.quotas;
        let mine = self.inner.shares.user(user);
        if mine.count.saturating_add(add.count) > quotas.user_messages
            || mine.bytes.saturating_add(add.bytes) > quotas.user_bytes
        {
            return Some(Quota::User);
        }
        let used = Use {
            count: self.inner.spilled,
            bytes: self.inner.disk_used() + self.inner.unwritten,
        };
        let budget = Use {
            count: quotas.total_messages,
            bytes: quotas.disk_budget,
        };
        let room = shares::room(budget, used);
        if shares::fair(mine, add, room) {
            None
        } else if shares::fair(Use::default(), add, room) {
            Some(Quota::User)
        } else {
            Some(Quota::Disk)
        }
    }

    /// The share `sender` would go over adding an entry of `size` to
    /// `d`'s queue, if any (spec §10, *Fair shares*): half of the room the
    /// other senders leave ([`Quota::Sender`]), or the queue's quota
    /// itself, when not even a sender holding nothing could add it
    /// ([`Quota::Queue`]).
    pub fn queue_share(&self, d: DeviceKey, sender: UserId, size: u64) -> Option<Quota> {
        let quotas = self.config.quotas;
        let (count, bytes) = self.usage(d);
        let free = shares::room(quotas.queue(), Use { count, bytes });
        if shares::fair(self.inner.shares.of(d, sender), Use::one(size), free) {
            None
        } else if shares::fair(Use::default(), Use::one(size), free) {
            Some(Quota::Sender(d))
        } else {
            Some(Quota::Queue(d))
        }
    }

    /// What `sender` holds in `d`'s queue and in all queues.
    pub fn share_of(&self, d: DeviceKey, sender: UserId) -> (Use, Use) {
        (self.inner.shares.of(d, sender), self.inner.shares.user(sender))
    }

    /// (queue, sender) pairs and senders counted.
    pub fn shares_len(&self) -> (usize, usize) {
        self.inner.shares.len()
    }

    /// Every count of the fair shares (for tests that check them).
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub fn shares_snapshot(
        &self,
    ) -> (
        std::collections::BTreeMap<(DeviceKey, UserId), Use>,
        std::collections::BTreeMap<UserId, Use>,
    ) {
        self.inner.shares.snapshot()
    }

    /// Every unwritten copy's device, sender and size (for tests).
    #[cfg(test)]
    pub fn unwritten_senders(&self) -> Vec<(DeviceKey, Option<UserId>, u64)> {
        self.inner
            .queues
            .iter()
            .flat_map(|(d, q)| {
                q.mem
                    .iter()
                    .filter(|s| s.state == State::Unwritten)
                    .map(|s| (*d, s.sender(), s.size))
            })
            .collect()
    }

    /// Reads from memory (see [`super::api::StoreApi::read`]).
    pub fn read(&self, d: DeviceKey, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> Read {
        let Some(q) = self.inner.queues.get(&d) else {
            return Read::Memory { more: false };
        };
        if from <= q.disk_hi && q.on_disk > 0 {
            return Read::OnDisk;
        }
        let start = q.mem.partition_point(|s| s.seq < from);
        let end = (start + max).min(q.mem.len());
        out.extend(q.mem.range(start..end).map(|s| (s.seq, s.entry.clone())));
        Read::Memory {
            more: end < q.mem.len(),
        }
    }

    /// The highest sequence given out (0: none).
    pub fn last_seq(&self, d: DeviceKey) -> u64 {
        match self.inner.queues.get(&d) {
            Some(q) => q.next - 1,
            None => self.inner.base - 1,
        }
    }

    /// Entries and bytes a queue holds.
    pub fn usage(&self, d: DeviceKey) -> (u64, u64) {
        self.inner.queues.get(&d).map_or((0, 0), |q| (q.count, q.bytes))
    }

    /// Entries and bytes all queues hold.
    pub fn totals(&self) -> (u64, u64) {
        self.inner
            .queues
            .values()
            .fold((0, 0), |(c, b), q| (c + q.count, b + q.bytes))
    }

    /// Bytes of unwritten copies.
    pub fn unwritten(&self) -> u64 {
        self.inner.unwritten
    }

    /// Acknowledges every entry of `d` up to `up_to`.
    pub fn ack(&mut self, d: DeviceKey, up_to: u64) {
        let Some(q) = self.inner.queues.get_mut(&d) else { return };
        // Nothing past what was given out: entries queued after this ack
        // (receipts the store thread writes) are not covered by it.
        let up_to = up_to.min(q.next - 1);
        let mut safe = Vec::new();
        let mut gone = Gone::default();
        let (mut unwritten, mut cached) = (0, 0);
        while q.mem.front().is_some_and(|s| s.seq <= up_to) {
            let Some(s) = q.mem.pop_front() else { break };
            match s.state {
                State::Unwritten => {
                    q.count -= 1;
                    q.bytes -= s.size;
                    unwritten += s.size;
                    safe.extend(s.msg_key());
                    gone.add(s.sender(), s.size);
                }
                State::Writing => safe.extend(s.msg_key()),
                State::Durable => {
                    q.cached -= 1;
                    cached += s.size;
                }
            }
        }
        q.disk_hi = q.disk_hi.max(up_to);
        let on_disk = q.on_disk > 0;
        self.inner.shares.gone(d, &gone);
        self.inner.unwritten -= unwritten;
        self.inner.cached -= cached;
        if on_disk {
            let e = self.inner.deletes.entry(d).or_insert(0);
            *e = (*e).max(up_to);
        }
        for key in safe {
            self.safe(key);
        }
    }

    /// Up to where `d`'s records on disk are acknowledged and wait to be
    /// deleted, if they do.
    pub fn acked(&self, d: DeviceKey) -> Option<u64> {
        self.inner.deletes.get(&d).copied()
    }

    /// Whether acknowledged records wait to be deleted.
    pub fn has_deletes(&self) -> bool {
        !self.inner.deletes.is_empty()
    }

    // ---- the store thread's side ----

    /// Whether the store thread has something to do now, and when next.
    pub fn due(&self, now: Instant) -> (bool, Option<Instant>) {
        let i = &self.inner;
        let ready = i.urgent
            || !i.due_now.is_empty()
            || (i.write_all && !i.staged.is_empty())
            || !i.deletes.is_empty()
            || !i.removes.is_empty()
            || i.unwritten > self.config.write_memory
            || i.staged.front().is_some_and(|(t, _, _)| *t <= now);
        let next = if i.due_now.is_empty() {
            i.staged.front().map(|(t, _, _)| *t)
        } else {
            Some(now)
        };
        (ready, next)
    }

    /// Takes what is due: copies to write (their state becomes writing),
    /// and records to delete.
    pub fn take(
        &mut self,
        now: Instant,
        writes: &mut Vec<Write>,
        deletes: &mut Vec<(DeviceKey, u64)>,
        removes: &mut Vec<(DeviceKey, u64)>,
    ) {
        self.inner.urgent = false;
        deletes.extend(self.inner.deletes.drain());
        removes.append(&mut self.inner.removes);
        let limit = self.config.write_memory;
        let due_now = std::mem::take(&mut self.inner.due_now);
        for (d, seq) in due_now {
            Self::stage_write(&mut self.inner, d, seq, writes);
        }
        while let Some(&(deadline, d, seq)) = self.inner.staged.front() {
            if deadline > now && self.inner.unwritten <= limit && !self.inner.write_all {
                break;
            }
            self.inner.staged.pop_front();
            Self::stage_write(&mut self.inner, d, seq, writes);
        }
    }

    /// Copy `seq` of `d` goes in this batch, if it still waits to be
    /// written.
    fn stage_write(inner: &mut Inner, d: DeviceKey, seq: u64, writes: &mut Vec<Write>) {
        let Some(q) = inner.queues.get_mut(&d) else { return };
        let Some(i) = q.find(seq) else { return };
        let slot = &mut q.mem[i];
        if slot.state != State::Unwritten {
            return;
        }
        slot.state = State::Writing;
        q.on_disk += 1;
        inner.unwritten -= slot.size;
        // Counted as on disk from now: the batch is being written.
        inner.disk_bytes += slot.size;
        writes.push(Write {
            device: d,
            seq,
            entry: slot.entry.clone(),
        });
    }

    /// Copies written in a batch that is now durable.
    pub fn durable(&mut self, written: &[(DeviceKey, u64)]) {
        let mut safe = Vec::new();
        for &(d, seq) in written {
            let inner = &mut *self.inner;
            let Some(q) = inner.queues.get_mut(&d) else { continue };
            let Some(i) = q.find(seq) else { continue };
            let s = &mut q.mem[i];
            if s.state != State::Writing {
                continue;
            }
            s.state = State::Durable;
            if q.cached == 0 {
                inner.cache_order.push_back(d);
            }
            q.cached += 1;
            inner.cached += s.size;
            safe.extend(s.msg_key());
            Self::evict(inner, d, self.config.cache_per_queue);
        }
        let cap = self.config.cache_bytes;
        while self.inner.cached > cap {
            let Some(d) = self.inner.cache_order.pop_front() else {
                break;
            };
            Self::evict(&mut self.inner, d, 0);
        }
        for key in safe {
            self.safe(key);
        }
    }

    /// Evicts durable slots from the front of `d`'s queue until at most
    /// `keep` durable slots remain.
    fn evict(inner: &mut Inner, d: DeviceKey, keep: usize) {
        let Some(q) = inner.queues.get_mut(&d) else { return };
        while q.cached > keep && q.mem.front().is_some_and(|s| s.state == State::Durable) {
            let Some(s) = q.mem.pop_front() else { break };
            q.cached -= 1;
            q.disk_hi = q.disk_hi.max(s.seq);
            inner.cached -= s.size;
        }
    }

    /// The store thread deleted records of `d`'s queue: `gone` says how
    /// many, their bytes, and whose.
    pub fn deleted(&mut self, d: DeviceKey, gone: &Gone) {
        let (n, bytes) = gone.totals();
        if n == 0 {
            return;
        }
        self.inner.shares.gone(d, gone);
        let q = self.queue(d);
        q.count = q.count.saturating_sub(n);
        q.bytes = q.bytes.saturating_sub(bytes);
        q.on_disk = q.on_disk.saturating_sub(n);
        self.inner.disk_bytes = self.inner.disk_bytes.saturating_sub(bytes);
    }

    /// Bytes of records other than queue entries were written (`+`) or
    /// deleted (`-`).
    pub fn disk_delta(&mut self, delta: i64) {
        let b = &mut self.inner.disk_bytes;
        *b = if delta >= 0 {
            b.saturating_add(delta as u64)
        } else {
            b.saturating_sub(delta.unsigned_abs())
        };
    }

    /// Appends an entry the store thread writes in its current batch
    /// (receipts, notices): returns its sequence.
    pub fn push_written(&mut self, d: DeviceKey, entry: Entry) -> u64 {
        let size = entry.stored_len();
        self.inner.shares.add(d, entry.sender(), size);
        let q = self.queue(d);
        let seq = q.next;
        q.next += 1;
        q.count += 1;
        q.bytes += size;
        q.on_disk += 1;
        q.mem.push_back(Slot {
            seq,
            entry,
            size,
            state: State::Writing,
        });
        let next = q.next;
        self.inner.max_next = self.inner.max_next.max(next);
        self.inner.disk_bytes += size;
        seq
    }

    /// The entry `seq` of `d`'s queue, if it is in memory.
    pub fn entry(&self, d: DeviceKey, seq: u64) -> Option<Entry> {
        let q = self.inner.queues.get(&d)?;
        q.find(seq).map(|i| q.mem[i].entry.clone())
    }

    /// Whether `d`'s queue may hold entry `seq` (in memory, or on disk).
    pub fn may_hold(&self, d: DeviceKey, seq: u64) -> bool {
        self.inner
            .queues
            .get(&d)
            .is_some_and(|q| q.find(seq).is_some() || (seq <= q.disk_hi && q.on_disk > 0))
    }

    /// Removes entry `seq` from `d`'s queue's memory.
    pub fn remove(&mut self, d: DeviceKey, seq: u64) -> Removed {
        let inner = &mut *self.inner;
        let Some(q) = inner.queues.get_mut(&d) else {
            return Removed::NotInMemory;
        };
        let Some(i) = q.find(seq) else {
            return Removed::NotInMemory;
        };
        let Some(s) = q.mem.remove(i) else {
            return Removed::NotInMemory;
        };
        let key = s.msg_key();
        let removed = match s.state {
            State::Unwritten => {
                q.count -= 1;
                q.bytes -= s.size;
                inner.unwritten -= s.size;
                inner.shares.sub(d, s.sender(), s.size);
                Removed::Memory
            }
            State::Writing => Removed::Disk,
            State::Durable => {
                q.cached -= 1;
                inner.cached -= s.size;
                Removed::Disk
            }
        };
        if s.state != State::Durable
            && let Some(key) = key
        {
            self.safe(key);
        }
        removed
    }

    /// When a message known in memory was accepted.
    pub fn time_of(&self, key: MsgKey) -> Option<u64> {
        self.inner.msgs.get(&key).map(|m| m.time_ms)
    }

    /// No entry of `d`'s queue at or below this is in memory.
    /// The lowest sequence of `d`'s queue not yet handed to the store
    /// thread for writing: a mark must stay below it.
    pub fn lowest_unwritten(&self, d: DeviceKey) -> Option<u64> {
        let q = self.inner.queues.get(&d)?;
        q.mem.iter().find(|s| s.state == State::Unwritten).map(|s| s.seq)
    }

    pub fn disk_hi(&self, d: DeviceKey) -> u64 {
        self.inner.queues.get(&d).map_or(0, |q| q.disk_hi)
    }

    /// The copies of a message still known in memory.
    pub fn copies_of(&self, key: MsgKey) -> Vec<(DeviceKey, u64)> {
        self.inner.msgs.get(&key).map(|m| m.copies.clone()).unwrap_or_default()
    }

    /// Remembers a retracted message (spec §5.5); its record counts in
    /// its user's share (spec §10, *Fair shares*).
    pub fn tombstone(&mut self, user: UserId, id: MsgId, time_ms: u64) {
        if self.inner.tombstones.insert((user, id), time_ms).is_none() {
            self.inner.shares.charge(user, tombstone_use());
        }
    }

    /// Forgets a retracted message.
    pub fn forget_tombstone(&mut self, user: UserId, id: MsgId) {
        if self.inner.tombstones.remove(&(user, id)).is_some() {
            self.inner.shares.uncharge(user, tombstone_use());
        }
    }

    /// Forgets a device's whole queue in memory (revoked); the store
    /// thread deletes its records.
    pub fn clear(&mut self, d: DeviceKey) {
        let inner = &mut *self.inner;
        let Some(q) = inner.queues.get_mut(&d) else { return };
        let mut safe = Vec::new();
        while let Some(s) = q.mem.pop_front() {
            match s.state {
                State::Unwritten => {
                    q.count -= 1;
                    q.bytes -= s.size;
                    inner.unwritten -= s.size;
                    safe.extend(s.msg_key());
                    inner.shares.sub(d, s.sender(), s.size);
                }
                State::Writing => safe.extend(s.msg_key()),
                State::Durable => {
                    q.cached -= 1;
                    inner.cached -= s.size;
                }
            }
        }
        q.disk_hi = q.next - 1;
        for key in safe {
            self.safe(key);
        }
    }

    /// Raises the ceiling (durable now).
    pub fn set_ceiling(&mut self, ceiling: u64) {
        self.inner.ceiling = self.inner.ceiling.max(ceiling);
    }

    /// Memory the queues hold, roughly: unwritten and cached entry bytes.
    pub fn held(&self) -> (u64, u64) {
        (self.inner.unwritten, self.inner.cached)
    }

    /// Messages remembered (in flight and recently settled).
    pub fn remembered(&self) -> usize {
        self.inner.msgs.len()
    }
}

#[cfg(test)]
mod tests;
