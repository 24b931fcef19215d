//! The store thread: the one owner of `sled`'s writes.
//!
//! Each turn it takes the operations the loops submitted ([`Inbox`]) and
//! what the in-memory queues have due ([`super::live`]: copies whose
//! deadline passed, records whose entries were acknowledged), writes them
//! in one batch (plus one small batch per operation that must read what it
//! changes, such as folding a receipt), and tags everything with the
//! flusher's epoch. When the flusher reports that epoch durable, the turn
//! that follows releases it: copies become durable (settling their
//! messages) and answers go to their waiters.
//!
//! What it guarantees: nothing is answered before it is durable; records
//! are deleted only after they were written (an acknowledgement of a copy
//! being written is applied in a later batch than the write); the disk
//! budget's count (`disk_bytes`) is exact. What it does not do: decide who
//! may do what (the hub does), or know connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::accounts::Accounts;
use super::api::{
    Entry, GroupChangeOp, GroupLimits, GroupRefused, GroupView, Op, Outcome, QueuedBlock, QueuedExpired, QueuedGap,
    QueuedGroupMessage, QueuedGroupNotice, QueuedGroupReceipt, QueuedMessage, QueuedReceipt, Quota, Refused, Swept,
    Waiter,
};
use super::disk::{
    self, FOLD, FOLD_KEY_LEN, FoldKey, LostRecord, MAX_GAP_SENDERS, QUEUE, TOMBSTONE, dev_prefix, fold_key, mark_key,
    parse_dev, parse_tombstone, queue_key, queue_seq, removed_key, tombstone_key,
};
use super::flusher::{Epoch, Flusher};
use super::groups::Groups;
use super::live::{Live, Removed, Write};
use super::shares::{Gone, Use};
use super::spill::Spill;
use super::{Status, StoreError, Throttle, be_u64, keys};
use crate::ids::{DeviceKey, UserId};
use crate::wire::{GroupId, MAX_RECEIPT_IDS, MsgId};

/// How far the durable sequence ceiling runs ahead of the numbers handed
/// out.
pub(crate) const CEILING_STEP: u64 = 1 << 24;
/// Least pause between turns that nothing urgent started.
const TICK: Duration = Duration::from_millis(2);
/// How often free space is measured.
const SPACE_EVERY: Duration = Duration::from_secs(1);

/// Work for the store thread.
#[derive(Default)]
struct InboxState {
    ops: Vec<(Op, Option<Waiter>)>,
    kicked: bool,
    stop: bool,
}

/// The store thread's inbox and doorbell.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    cond: Condvar,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an operation and rings.
    pub fn push(&self, op: Op, waiter: Option<Waiter>) {
        let mut st = self.lock();
        st.ops.push((op, waiter));
        if !st.kicked {
            st.kicked = true;
            self.cond.notify_one();
        }
    }

    /// Rings: something is due.
    pub fn kick(&self) {
        let mut st = self.lock();
        if !st.kicked {
            st.kicked = true;
            self.cond.notify_one();
        }
    }

    /// Asks the thread to finish.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stop = true;
        self.cond.notify_all();
    }

    /// Waits until rung, stopped, or `until`.
    fn wait(&self, until: Option<Instant>) {
        let mut st = self.lock();
        while !st.kicked && !st.stop {
            match until {
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        break;
                    }
                    st = self.cond.wait_timeout(st, t - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
        st.kicked = false;
    }

    fn take(&self) -> (Vec<(Op, Option<Waiter>)>, bool) {
        let mut st = self.lock();
        (std::mem::take(&mut st.ops), st.stop)
    }
}

/// What a flush releases.
#[derive(Default)]
struct Release {
    written: Vec<(DeviceKey, u64)>,
    answers: Vec<(Waiter, Outcome)>,
    ceiling: Option<u64>,
    /// Spill segments no record refers to any more once this is durable.
    segments: Vec<u32>,
}

/// The trees the engine writes.
pub(crate) struct Trees {
    /// The database (for backups).
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub queues: sled::Tree,
    pub e2e: sled::Tree,
}

/// The store thread's state.
pub(crate) struct Engine {
    trees: Trees,
    spill: Arc<Mutex<Spill>>,
    accounts: Arc<Accounts>,
    groups: Arc<Groups>,
    live: Arc<Live>,
    flusher: Flusher,
    inbox: Arc<Inbox>,
    status: Arc<Status>,
    awaiting: VecDeque<(Epoch, Release)>,
    ceiling_pending: bool,
    writes: Vec<Write>,
    deletes: Vec<(DeviceKey, u64)>,
    removes: Vec<(DeviceKey, u64)>,
    space_checked: Option<Instant>,
    failures: Throttle,
    /// Stopping: the last turn writes every mark that moved (a clean stop
    /// delivers nothing acknowledged again).
    closing: bool,
}

/// One turn's bookkeeping.
#[derive(Default)]
struct Turn {
    release: Release,
    /// Something was written that needs a flush.
    dirty: bool,
    /// Every mark that moved is written this turn (a segment went free, a
    /// queue was dropped or expired).
    marks_now: bool,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        trees: Trees,
        spill: Arc<Mutex<Spill>>,
        accounts: Arc<Accounts>,
        groups: Arc<Groups>,
        live: Arc<Live>,
        flusher: Flusher,
        inbox: Arc<Inbox>,
        status: Arc<Status>,
    ) -> Engine {
        Engine {
            trees,
            spill,
            accounts,
            groups,
            live,
            flusher,
            inbox,
            status,
            awaiting: VecDeque::new(),
            ceiling_pending: false,
            writes: Vec::new(),
            deletes: Vec::new(),
            removes: Vec::new(),
            space_checked: None,
            failures: Throttle::new(Duration::from_secs(60)),
            closing: false,
        }
    }

    /// Runs until stopped: turns, and waits for work in between. On a
    /// storage failure it marks the store failed and stops.
    pub(crate) fn run(mut self) {
        loop {
            let started = Instant::now();
            self.status.beat();
            let (ops, stop) = self.inbox.take();
            self.closing = stop;
            if let Err(e) = self.turn_with(ops, started, unix_ms()) {
                self.fail(&e);
                return;
            }
            if stop {
                // Everything submitted is written, and when the devices
                // online were last seen (now); make it durable and answer
                // it, then go.
                if let Err(e) = self.accounts.persist_seen(unix_ms()) {
                    self.fail(&e);
                    return;
                }
                if self.flusher.flush_now() {
                    self.release();
                }
                return;
            }
            let (ready, mut next) = self.live.lock().due(Instant::now());
            if lock(&self.spill).marks_pending() {
                let soon = Instant::now() + Duration::from_secs(1);
                next = Some(next.map_or(soon, |n| n.min(soon)));
            }
            let until = if ready {
                Some(started + TICK)
            } else {
                let space = self.space_checked.map(|t| t + SPACE_EVERY);
                match (next.map(|t| t.max(started + TICK)), space) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            self.inbox.wait(until);
        }
    }

    fn fail(&mut self, e: &StoreError) {
        log::error!("the store failed and the daemon stops (it restarts on the same data): {e}");
        self.status.failed.store(true, Ordering::SeqCst);
        self.status.notify_failure();
    }

    /// One turn at `now` (for the simulation, which has no thread).
    ///
    /// # Errors
    /// A storage failure the daemon cannot go on from.
    pub(crate) fn turn(&mut self, now: Instant, now_ms: u64) -> Result<(), StoreError> {
        let (ops, _) = self.inbox.take();
        self.turn_with(ops, now, now_ms)
    }

    fn turn_with(&mut self, ops: Vec<(Op, Option<Waiter>)>, now: Instant, now_ms: u64) -> Result<(), StoreError> {
        self.check_space(now);
        let mut turn = Turn {
            marks_now: self.closing,
            ..Turn::default()
        };
        {
            let mut live = self.live.lock();
            live.take(now, &mut self.writes, &mut self.deletes, &mut self.removes);
        }
        if !self.writes.is_empty() || !self.deletes.is_empty() || !self.removes.is_empty() {
            self.write_batch(&mut turn)?;
        }
        for (op, waiter) in ops {
            match self.op(op, now_ms, &mut turn) {
                Ok(None) => {}
                Ok(Some((outcome, durable))) => {
                    if let Some(w) = waiter {
                        if durable {
                            turn.release.answers.push((w, outcome));
                        } else {
                            w.complete(outcome);
                        }
                    }
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    self.failures
                        .log(|n| log::error!("a store operation failed ({n} like it): {e}"));
                    if let Some(w) = waiter {
                        w.complete(Outcome::Failed);
                    }
                }
            }
        }
        self.compact(&mut turn)?;
        self.write_marks(now, &mut turn)?;
        let (spilled, adjust) = {
            let spill = lock(&self.spill);
            (spill.count() as u64, spill.held() as i64 - spill.charged() as i64)
        };
        {
            let mut live = self.live.lock();
            live.spilled = spilled;
            live.spill_adjust = adjust;
        }
        self.raise_ceiling(&mut turn)?;
        let r = turn.release;
        if turn.dirty || !r.written.is_empty() || !r.answers.is_empty() || r.ceiling.is_some() || !r.segments.is_empty()
        {
            let epoch = self.flusher.note_write();
            self.awaiting.push_back((epoch, r));
        }
        if self.flusher.failed() {
            return Err(StoreError::FlushFailed);
        }
        self.release();
        Ok(())
    }

    /// Whether something waits for a flush.
    pub(crate) fn awaits_flush(&self) -> bool {
        !self.awaiting.is_empty()
    }

    /// Releases what the flusher made durable.
    fn release(&mut self) {
        let durable = self.flusher.durable();
        while self.awaiting.front().is_some_and(|(e, _)| *e <= durable) {
            let Some((_, r)) = self.awaiting.pop_front() else { break };
            {
                let mut live = self.live.lock();
                if let Some(c) = r.ceiling {
                    live.set_ceiling(c);
                    self.ceiling_pending = false;
                }
                live.durable(&r.written);
            }
            if !r.segments.is_empty() {
                let mut spill = lock(&self.spill);
                for seg in r.segments {
                    if let Err(e) = spill.remove_segment(seg) {
                        log::warn!("could not delete a spill segment nothing refers to: {e}");
                    }
                }
            }
            for (w, outcome) in r.answers {
                w.complete(outcome);
            }
        }
    }

    fn check_space(&mut self, now: Instant) {
        if self.space_checked.is_some_and(|t| now < t + SPACE_EVERY) {
            return;
        }
        self.space_checked = Some(now);
        self.status.measure_space();
    }

    /// Keeps the durable sequence ceiling ahead of the numbers handed out.
    fn raise_ceiling(&mut self, turn: &mut Turn) -> Result<(), StoreError> {
        if self.ceiling_pending {
            return Ok(());
        }
        let (max_next, ceiling) = {
            let live = self.live.lock();
            (live.max_next, live.ceiling)
        };
        if max_next + CEILING_STEP / 2 <= ceiling {
            return Ok(());
        }
        let new = ceiling + CEILING_STEP;
        self.trees.meta.insert(super::SEQ_CEILING, &new.to_be_bytes())?;
        self.ceiling_pending = true;
        turn.release.ceiling = Some(new);
        Ok(())
    }

    /// Writes what the queues have due: acknowledged copies and entries
    /// go (their device's mark moves), copies past their deadline are
    /// appended to the spill log.
    fn write_batch(&mut self, turn: &mut Turn) -> Result<(), StoreError> {
        let q = self.trees.queues.clone();
        let mut batch = sled::Batch::default();
        let mut deleted: HashMap<DeviceKey, Gone> = HashMap::new();
        {
            let mut spill = lock(&self.spill);
            for (d, up_to) in std::mem::take(&mut self.deletes) {
                let c = deleted.entry(d).or_default();
                // Receipts and notices, in sled.
                for item in q.range(queue_key(d, 0)..=queue_key(d, up_to)) {
                    let (k, v) = item?;
                    batch.remove(k.clone());
                    c.add(disk::record_sender(&v), disk::record_len(&k, &v));
                }
                // Copies, in the spill log: the device's mark moves (the
                // removals it covers go when it is written).
                c.merge(spill.ack(d, up_to));
            }
            // Copies of one message staged together go in one record (key
            // shares: one per addressee; a group message: one for all).
            let writes = std::mem::take(&mut self.writes);
            let mut copies: Vec<(DeviceKey, u64, &QueuedMessage)> = Vec::new();
            let mut group: Vec<(DeviceKey, u64, &QueuedGroupMessage)> = Vec::new();
            for w in &writes {
                match &w.entry {
                    Entry::Message(m) => {
                        if copies.first().is_some_and(|(_, _, f)| {
                            (f.from_user, f.from_device, f.id, f.to_user)
                                != (m.from_user, m.from_device, m.id, m.to_user)
                        }) {
                            spill.append_message(&copies)?;
                            copies.clear();
                        }
                        copies.push((w.device, w.seq, m));
                    }
                    Entry::Group(g) => {
                        if group.first().is_some_and(|(_, _, f)| {
                            (f.from_user, f.from_device, f.id) != (g.from_user, g.from_device, g.id)
                        }) {
                            spill.append_group(&group)?;
                            group.clear();
                        }
                        group.push((w.device, w.seq, g));
                    }
                    e => batch.insert(&queue_key(w.device, w.seq)[..], disk::encode(&e.to_disk())),
                }
                turn.release.written.push((w.device, w.seq));
            }
            spill.append_message(&copies)?;
            spill.append_group(&group)?;
            // The copies are synced before sled's next flush.
            for f in spill.take_unsynced()? {
                self.flusher.sync_first(f);
            }
            let freed = spill.take_freed();
            if !freed.is_empty() {
                turn.marks_now = true;
                turn.release.segments.extend(freed);
            }
        }
        q.apply_batch(batch)?;
        turn.dirty = true;
        let mut live = self.live.lock();
        for (d, gone) in deleted {
            live.deleted(d, &gone);
        }
        Ok(())
    }

    /// Moves the few copies left in a mostly delivered segment of the
    /// spill log (at most 1 MiB a turn), so that disk use follows what is
    /// undelivered.
    fn compact(&mut self, turn: &mut Turn) -> Result<(), StoreError> {
        let mut spill = lock(&self.spill);
        if !spill.compact(1 << 20)? {
            return Ok(());
        }
        for f in spill.take_unsynced()? {
            self.flusher.sync_first(f);
        }
        turn.release.segments.extend(spill.take_freed());
        turn.dirty = true;
        Ok(())
    }

    /// Writes the marks that moved: each at most once a second while its
    /// acks keep coming, all of them when `turn.marks_now` (then a segment
    /// deleted after this turn's flush cannot come back). The removal
    /// records a mark covers go in the same batch as the mark, never
    /// before it: a removal deleted while the mark that covers its copy is
    /// not durable would let a crash bring the retracted copy back.
    fn write_marks(&mut self, now: Instant, turn: &mut Turn) -> Result<(), StoreError> {
        let (due, freed) = {
            let mut spill = lock(&self.spill);
            (spill.marks_due(now, turn.marks_now), spill.take_freed())
        };
        turn.release.segments.extend(freed);
        if due.is_empty() {
            return Ok(());
        }
        let q = &self.trees.queues;
        let mut batch = sled::Batch::default();
        let mut added: i64 = 0;
        for (d, mark) in due {
            let k = mark_key(d);
            if !q.contains_key(k)? {
                added += (k.len() + 8) as i64;
            }
            batch.insert(&k[..], &mark.to_be_bytes()[..]);
            for item in q.range(removed_key(d, 0)..=removed_key(d, mark)) {
                let (k, v) = item?;
                batch.remove(k.clone());
                added -= disk::record_len(&k, &v) as i64;
            }
        }
        q.apply_batch(batch)?;
        turn.dirty = true;
        self.live.lock().disk_delta(added);
        Ok(())
    }

    /// Runs one operation. `Some((outcome, durable))`: the answer, and
    /// whether it waits for the flush.
    fn op(&mut self, op: Op, _now_ms: u64, turn: &mut Turn) -> Result<Option<(Outcome, bool)>, StoreError> {
        let accounts = self.accounts.clone();
        Ok(Some(match op {
            Op::Register {
                invite,
                name,
                key,
                now_ms,
            } => {
                turn.dirty = true;
                (
                    Outcome::Registered(accounts.register(&invite, &name, &key, now_ms)?),
                    true,
                )
            }
            Op::RedeemLink { code, key, now_ms } => {
                turn.dirty = true;
                (Outcome::Linked(accounts.redeem_link(&code, &key, now_ms)?), true)
            }
            Op::RequestLink { device, now_ms, ttl } => {
                turn.dirty = true;
                (Outcome::LinkCode(accounts.request_link(device, now_ms, ttl)?), true)
            }
            Op::Invite { uses, expires_ms } => {
                turn.dirty = true;
                (
                    Outcome::Token(accounts.create_invite(uses, expires_ms)?, expires_ms),
                    true,
                )
            }
            Op::Revoke { device, now_ms } => {
                turn.dirty = true;
                (Outcome::Revoked(self.revoke(device, now_ms, turn)?), true)
            }
            Op::Touch {
                device,
                now_ms,
                persist,
            } => {
                if accounts.touch(device, now_ms, persist)? {
                    turn.dirty = true;
                }
                return Ok(None);
            }
            Op::Publish { device, keys } => {
                turn.dirty = true;
                let r = keys::publish_keys(
                    &self.trees.e2e,
                    device,
                    keys.identity.as_ref(),
                    &keys.one_time,
                    keys.fallback.as_ref(),
                )?;
                if let Ok(n) = r {
                    accounts.set_one_time_keys(device, Some(n));
                }
                (Outcome::Published(r), true)
            }
            Op::Claim { devices, over_rate } => {
                turn.dirty = true;
                let mut claimed = Vec::with_capacity(devices.len());
                let mut counts = Vec::new();
                for d in devices {
                    let one_time = !over_rate.contains(&d);
                    let Some(k) = keys::claim_keys(&self.trees.e2e, d, one_time)? else {
                        continue;
                    };
                    if k.one_time.is_some() && !k.fallback {
                        let left = accounts.one_time_keys(d).unwrap_or(1).saturating_sub(1);
                        accounts.set_one_time_keys(d, Some(left));
                        counts.push((d, left));
                    }
                    claimed.push(k);
                }
                (Outcome::Claimed(claimed, counts), true)
            }
            Op::Receipt {
                from,
                to,
                kind,
                ids,
                targets,
                now_ms,
            } => {
                let entry = Entry::Receipt(QueuedReceipt {
                    from_user: from.user.0,
                    from_device: from.device.0,
                    to_user: to.0,
                    kind: kind.0,
                    ids,
                    time_ms: now_ms,
                });
                let r = self.receipt(FoldKey::Receipt(from, kind.0, to), entry, targets, turn)?;
                (Outcome::Receipt(r), true)
            }
            Op::Retract { user, senders, id, .. } => {
                turn.dirty = true;
                (Outcome::Retracted(self.retract(user, &senders, id, turn)?), true)
            }
            Op::ReadBacklog { device, from, max } => (self.read_backlog(device, from, max)?, false),
            Op::Sweep {
                mut cursor,
                cutoff_ms,
                max_keys,
                now_ms,
            } => {
                let swept = self.sweep(&mut cursor, cutoff_ms, max_keys, now_ms, turn)?;
                turn.dirty = true;
                (Outcome::Swept(swept, cursor), true)
            }
            Op::SetLastSeen { user, everyone } => {
                turn.dirty = true;
                accounts.set_last_seen(user, everyone)?;
                (Outcome::LastSeenSet, true)
            }
            Op::Group {
                by,
                group,
                change,
                limits,
                now_ms,
            } => {
                turn.dirty = true;
                let adds = matches!(change, GroupChangeOp::Create { .. } | GroupChangeOp::Add { .. });
                if adds && self.status.full.load(Ordering::Relaxed) {
                    return Ok(Some((Outcome::Group(Err(GroupRefused::StorageFull)), false)));
                }
                let r = self.group_change(by, group, change, limits, now_ms, turn)?;
                (Outcome::Group(r), true)
            }
            Op::GroupReceipt {
                from,
                group,
                to,
                kind,
                ids,
                targets,
                now_ms,
            } => {
                let entry = Entry::GroupReceipt(QueuedGroupReceipt {
                    group: group.0,
                    from_user: from.user.0,
                    from_device: from.device.0,
                    to_user: to.0,
                    kind: kind.0,
                    ids,
                    time_ms: now_ms,
                });
                let fold = FoldKey::GroupReceipt(from, kind.0, group.0, to);
                let r = self.receipt(fold, entry, targets, turn)?;
                (Outcome::GroupReceipt(r), true)
            }
            Op::Block {
                by,
                user,
                blocked,
                now_ms,
            } => {
                turn.dirty = true;
                let r = match self.groups.block(by.user, user, blocked)? {
                    Err(e) => Err(e),
                    Ok(false) => Ok(Vec::new()),
                    Ok(true) => {
                        // spec §5.8: the blocker's other devices hear of it.
                        let mut devices = Vec::new();
                        accounts.current_devices(by.user, &mut devices);
                        let notice = Entry::Block(QueuedBlock {
                            user: user.0,
                            blocked,
                            time_ms: now_ms,
                        });
                        let mut told = Vec::new();
                        for device in devices {
                            let d = DeviceKey { user: by.user, device };
                            if d != by {
                                self.fold(d, FoldKey::Block(user), notice.clone(), turn)?;
                                told.push(d);
                            }
                        }
                        Ok(told)
                    }
                };
                (Outcome::Blocked(r), true)
            }
            Op::Skipped {
                sender,
                time_ms,
                devices,
            } => {
                let lost = LostRecord {
                    from_user: sender.user.0,
                    from_device: sender.device.0,
                    count: 1,
                    first_ms: time_ms,
                    last_ms: time_ms,
                };
                for d in &devices {
                    let notice = Entry::Gap(QueuedGap {
                        lost: vec![lost.clone()],
                        time_ms: _now_ms,
                    });
                    self.fold(*d, FoldKey::Gap, notice, turn)?;
                }
                (Outcome::Notified(devices), true)
            }
            Op::LeaveAllGroups { user, now_ms } => {
                turn.dirty = true;
                (Outcome::Notified(self.leave_all_groups(user, now_ms, turn)?), true)
            }
            Op::Sync => {
                turn.dirty = true;
                (Outcome::Synced, true)
            }
            Op::RevokeInvite { id } => {
                turn.dirty = true;
                (Outcome::InviteRevoked(accounts.revoke_invite(id)?), true)
            }
            Op::DeleteUser { user, now_ms } => {
                turn.dirty = true;
                (Outcome::UserDeleted(self.delete_user(user, now_ms, turn)?), true)
            }
            Op::Backup { out } => {
                // On this thread, the one writer of sled and of the spill
                // log, so nothing changes while it copies (no segment is
                // appended to or deleted). Every mark that moved is
                // written first (else the restored server would deliver
                // acknowledged copies again), then sled and the segments
                // are flushed and synced together.
                turn.marks_now = true;
                self.write_marks(Instant::now(), turn)?;
                let r = match out.take() {
                    None => Err("the backup was taken already".to_string()),
                    Some(_) if !self.flusher.flush_now() => Err("a flush failed".to_string()),
                    Some(w) => {
                        let status = self.status.clone();
                        // The blob thread waits meanwhile (it writes
                        // `blobs/`, which the backup copies).
                        let _files = self.status.files.lock().unwrap_or_else(|e| e.into_inner());
                        super::backup::write(&self.trees.db, &self.status.dir, _now_ms, w, &|| status.beat())
                            .map_err(|e| e.to_string())
                    }
                };
                (Outcome::BackedUp(r), false)
            }
        }))
    }

    /// Applies a membership change and queues its notice for every current
    /// device of every member and of every user it took out, folded per
    /// group, all under the membership's write lock (see `groups`).
    /// Returns the group after it and the devices told.
    fn group_change(
        &mut self,
        by: UserId,
        group: GroupId,
        change: GroupChangeOp,
        limits: GroupLimits,
        now_ms: u64,
        turn: &mut Turn,
    ) -> Result<Result<(GroupView, Vec<DeviceKey>), GroupRefused>, StoreError> {
        let groups = self.groups.clone();
        let mut index = groups.write();
        let applied = match groups.apply(&mut index, by, group, change, limits, now_ms)? {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let mut told = Vec::new();
        if !applied.changes.is_empty() {
            let notice = Entry::GroupNotice(QueuedGroupNotice {
                group: group.0,
                version: applied.view.version,
                changes: applied.changes,
                time_ms: now_ms,
            });
            let users = applied
                .view
                .members
                .iter()
                .map(|(u, _)| *u)
                .chain(applied.gone.iter().copied());
            let mut devices = Vec::new();
            for user in users {
                devices.clear();
                self.accounts.current_devices(user, &mut devices);
                for device in &devices {
                    let d = DeviceKey { user, device: *device };
                    self.fold(d, FoldKey::GroupNotice(group.0), notice.clone(), turn)?;
                    told.push(d);
                }
            }
        }
        drop(index);
        Ok(Ok((applied.view, told)))
    }

    /// Takes `user` out of every group it is in (its last device went, or
    /// the operator deletes it), with notices. Returns the devices told.
    fn leave_all_groups(&mut self, user: UserId, now_ms: u64, turn: &mut Turn) -> Result<Vec<DeviceKey>, StoreError> {
        let mut told = Vec::new();
        let of = self.groups.read().groups_of(user);
        for (group, _) in of {
            if let Ok((_, t)) =
                self.group_change(user, group, GroupChangeOp::Leave, GroupLimits::default(), now_ms, turn)?
            {
                told.extend(t);
            }
        }
        if !told.is_empty() {
            log::info!("{} left every group it was in: its last device went", user.0);
        }
        Ok(told)
    }

    /// Queues a receipt or notice for `targets`, folded (spec §5.5).
    fn receipt(
        &mut self,
        fold: FoldKey,
        entry: Entry,
        targets: Vec<DeviceKey>,
        turn: &mut Turn,
    ) -> Result<Result<Vec<DeviceKey>, Refused>, StoreError> {
        if self.status.full.load(Ordering::Relaxed) {
            return Ok(Err(Refused::StorageFull));
        }
        let len = entry.stored_len();
        let quotas = self.live.config.quotas;
        {
            let live = self.live.lock();
            if (live.disk_used() + live.unwritten()).saturating_add(len * targets.len() as u64) > quotas.disk_budget {
                return Ok(Err(Refused::Quota(Quota::Disk)));
            }
        }
        // A receipt that cannot fold anywhere and would overfill a queue,
        // or take its sender over a share (spec §10, *Fair shares*), is refused
        // before anything of it is written.
        let sender = entry.sender();
        let mut new = 0;
        for t in &targets {
            if self.fold_target(*t, fold)?.is_some() {
                continue;
            }
            new += 1;
            let live = self.live.lock();
            let (count, bytes) = live.usage(*t);
            if count + 1 > quotas.queue_messages || bytes + len > quotas.queue_bytes {
                return Ok(Err(Refused::Quota(Quota::Queue(*t))));
            }
            if let Some(q) = sender.and_then(|s| live.queue_share(*t, s, len)) {
                return Ok(Err(Refused::Quota(q)));
            }
        }
        if new > 0
            && let Some(q) = sender.and_then(|s| {
                self.live.lock().user_share(
                    s,
                    Use {
                        count: new,
                        bytes: len * new,
                    },
                )
            })
        {
            return Ok(Err(Refused::Quota(q)));
        }
        for t in &targets {
            self.fold(*t, fold, entry.clone(), turn)?;
        }
        Ok(Ok(targets))
    }

    /// The entry later ones of `fold` fold into, if it is still queued.
    fn fold_target(&self, target: DeviceKey, fold: FoldKey) -> Result<Option<(u64, Entry)>, StoreError> {
        let q = &self.trees.queues;
        let Some(seq) = q.get(fold_key(target, fold))?.as_deref().and_then(be_u64) else {
            return Ok(None);
        };
        if let Some(e) = self.live.lock().entry(target, seq) {
            return Ok(Some((seq, e)));
        }
        match q.get(queue_key(target, seq))? {
            Some(v) => Ok(disk::decode_disk(&v)?.into_entry(None).map(|e| (seq, e))),
            None => Ok(None),
        }
    }

    /// Adds `entry` to `target`'s queue, folded into the pending entry of
    /// the same fold key if there is one and the result stays in bounds
    /// (the old entry goes and the merged one is appended at the tail, so
    /// a device that already read the old one sees the merged one too).
    fn fold(&mut self, target: DeviceKey, fold: FoldKey, entry: Entry, turn: &mut Turn) -> Result<(), StoreError> {
        let q = &self.trees.queues;
        let index = fold_key(target, fold);
        let mut entry = entry;
        let mut batch = sled::Batch::default();
        let mut removed = Gone::default();
        if let Some((seq, old)) = self.fold_target(target, fold)?
            && let Some(merged) = disk::merge(&old, &entry)
        {
            let on_disk = self.live.lock().remove(target, seq) != Removed::Memory;
            if on_disk && let Some(v) = q.get(queue_key(target, seq))? {
                batch.remove(&queue_key(target, seq)[..]);
                removed.add(old.sender(), disk::record_len(&queue_key(target, seq), &v));
            }
            entry = merged;
        }
        let value = disk::encode(&entry.to_disk());
        let seq = self.live.lock().push_written(target, entry);
        batch.insert(&queue_key(target, seq)[..], value);
        let new_index = !q.contains_key(index)?;
        batch.insert(&index[..], &seq.to_be_bytes()[..]);
        q.apply_batch(batch)?;
        turn.dirty = true;
        turn.release.written.push((target, seq));
        let mut live = self.live.lock();
        live.deleted(target, &removed);
        if new_index {
            live.disk_delta((FOLD_KEY_LEN + 8) as i64);
        }
        Ok(())
    }

    /// Removes the still-queued copies of message `id` of `user` (sent by
    /// any of `senders`), and remembers the retraction if the message is
    /// known, so that a retry is answered without queueing it again.
    fn retract(
        &mut self,
        user: UserId,
        senders: &[DeviceKey],
        id: MsgId,
        turn: &mut Turn,
    ) -> Result<usize, StoreError> {
        let q = self.trees.queues.clone();
        let mut batch = sled::Batch::default();
        let mut done: HashSet<(DeviceKey, u64)> = HashSet::new();
        let mut deleted: HashMap<DeviceKey, Gone> = HashMap::new();
        let mut records: i64 = 0;
        let mut known: Option<u64> = None;
        let mut n = 0;
        // Copies known in memory: the message is recent.
        let mut copies = Vec::new();
        for &s in senders {
            let key = (s, id);
            let live = self.live.lock();
            copies.extend(live.copies_of(key));
            known = known.or(live.time_of(key));
        }
        // Copies in the spill log: found by their tag, checked by their
        // record.
        for r in lock(&self.spill).find(user, id)? {
            if r.id == id && r.from_user == user.0 {
                known = known.or(Some(r.time_ms));
                copies.push((r.device(), r.seq()));
            }
        }
        {
            let mut spill = lock(&self.spill);
            for (d, seq) in copies {
                if !done.insert((d, seq)) {
                    continue;
                }
                if self.live.lock().remove(d, seq) == Removed::Memory {
                    // Never written.
                    n += 1;
                    continue;
                }
                if let Some(bytes) = spill.remove(d, seq) {
                    let k = removed_key(d, seq);
                    batch.insert(&k[..], &[][..]);
                    records += k.len() as i64;
                    deleted.entry(d).or_default().add(Some(user), bytes);
                    n += 1;
                }
            }
            let freed = spill.take_freed();
            if !freed.is_empty() {
                turn.marks_now = true;
                turn.release.segments.extend(freed);
            }
        }
        if let Some(time_ms) = known {
            let tk = tombstone_key(user, id);
            let value = time_ms.to_be_bytes();
            if !q.contains_key(tk)? {
                records += (tk.len() + value.len()) as i64;
            }
            batch.insert(&tk[..], &value[..]);
        }
        q.apply_batch(batch)?;
        turn.dirty = true;
        let mut live = self.live.lock();
        for (d, gone) in deleted {
            live.deleted(d, &gone);
        }
        live.disk_delta(records);
        if let Some(time_ms) = known {
            live.tombstone(user, id, time_ms);
        }
        Ok(n)
    }

    /// Reads entries of `d`'s queue that are on disk only.
    fn read_backlog(&self, d: DeviceKey, from: u64, max: usize) -> Result<Outcome, StoreError> {
        let hi = self.live.lock().disk_hi(d);
        let mut entries = Vec::new();
        let covered = read_disk(&self.trees.queues, &self.spill, d, from, hi, max, &mut entries)?;
        Ok(Outcome::Backlog {
            device: d,
            from,
            entries,
            covered,
        })
    }

    /// Revokes a device: refused from now on; its queue, fold records and
    /// keys go.
    fn revoke(&mut self, d: DeviceKey, now_ms: u64, turn: &mut Turn) -> Result<bool, StoreError> {
        if !self.accounts.revoke(d, now_ms)? {
            return Ok(false);
        }
        self.delete_queue(d, turn)?;
        keys::delete_keys(&self.trees.e2e, d)?;
        self.accounts.set_one_time_keys(d, None);
        // spec §5.8: a user whose last device goes leaves every group.
        let mut left = Vec::new();
        self.accounts.current_devices(d.user, &mut left);
        if left.is_empty() {
            self.leave_all_groups(d.user, now_ms, turn)?;
        }
        Ok(true)
    }

    /// Deletes an account: revokes every current device (its queue, keys
    /// and link codes go), then reserves its name (see
    /// `Accounts::delete_user`). `None` if there is no such account.
    fn delete_user(
        &mut self,
        user: UserId,
        now_ms: u64,
        turn: &mut Turn,
    ) -> Result<Option<Vec<DeviceKey>>, StoreError> {
        let mut devices = Vec::new();
        if !self.accounts.current_devices(user, &mut devices) {
            return Ok(None);
        }
        let mut revoked = Vec::new();
        for device in devices {
            let d = DeviceKey { user, device };
            if self.revoke(d, now_ms, turn)? {
                revoked.push(d);
            }
        }
        if !self.accounts.delete_user(user, now_ms)? {
            return Ok(None);
        }
        Ok(Some(revoked))
    }

    /// Deletes a device's whole queue and its fold records.
    fn delete_queue(&mut self, d: DeviceKey, turn: &mut Turn) -> Result<(), StoreError> {
        let q = self.trees.queues.clone();
        self.live.lock().clear(d);
        let mut batch = sled::Batch::default();
        let mut gone = Gone::default();
        let mut other = 0i64;
        for item in q.scan_prefix(dev_prefix(QUEUE, d)) {
            let (k, v) = item?;
            gone.add(disk::record_sender(&v), disk::record_len(&k, &v));
            batch.remove(k.clone());
        }
        for item in q.scan_prefix(dev_prefix(FOLD, d)) {
            let (k, v) = item?;
            batch.remove(k.clone());
            other -= disk::record_len(&k, &v) as i64;
        }
        {
            // The mark moves past every number the queue gave out, so
            // that it covers each of its removals (which go with it).
            let given = self.live.lock().last_seq(d);
            let mut spill = lock(&self.spill);
            gone.merge(spill.clear(d, given));
            turn.release.segments.extend(spill.take_freed());
        }
        // Its mark, written this turn, keeps its copies from coming back.
        turn.marks_now = true;
        q.apply_batch(batch)?;
        turn.dirty = true;
        let mut live = self.live.lock();
        live.deleted(d, &gone);
        live.disk_delta(other);
        Ok(())
    }

    /// One bounded turn of the retention sweeper: looks at up to
    /// `max_keys` keys from `cursor` on; removes entries accepted before
    /// `cutoff_ms` (queueing a gap notice for the device that lost
    /// messages and an expiry notice for every current device of their
    /// sender), message records with no copy left or older than the cutoff,
    /// old retraction records, and fold records whose entry is gone. The
    /// cursor moves on; it wraps to the start after the last key.
    fn sweep(
        &mut self,
        cursor: &mut Vec<u8>,
        cutoff_ms: u64,
        max_keys: usize,
        now_ms: u64,
        turn: &mut Turn,
    ) -> Result<Swept, StoreError> {
        let q = self.trees.queues.clone();
        let mut swept = Swept::default();
        let mut batch = sled::Batch::default();
        let mut deleted: HashMap<DeviceKey, Gone> = HashMap::new();
        let mut other: i64 = 0;
        let mut gaps: std::collections::BTreeMap<DeviceKey, Vec<LostRecord>> = Default::default();
        let mut undelivered: std::collections::BTreeMap<(UserId, DeviceKey), Vec<MsgId>> = Default::default();
        if cursor.is_empty() {
            // Once a pass: expired invites and link codes, and the copies
            // in the spill log accepted before the cutoff (the front of
            // each queue: a queue is in acceptance order).
            let (invites, links) = self.accounts.sweep_codes(now_ms)?;
            if invites + links > 0 {
                log::debug!("removed {invites} expired invites and {links} expired link codes");
                turn.dirty = true;
            }
            let mut spill = lock(&self.spill);
            for d in spill.devices() {
                let old = spill.front_while(d, |r| r.time_ms < cutoff_ms)?;
                if old.is_empty() {
                    continue;
                }
                // The mark moves past the expired copies, but never past
                // a copy in memory not written yet (it would be written
                // below the mark, and lost at the next open): those above
                // go one by one, with a removal record.
                let cap = self.live.lock().lowest_unwritten(d).unwrap_or(u64::MAX);
                let mut last = None;
                let c = deleted.entry(d).or_default();
                for r in &old {
                    self.live.lock().remove(d, r.seq());
                    note_lost(&mut gaps, &mut undelivered, d, r.sender(), r.id, r.time_ms);
                    swept.expired += 1;
                    if r.seq() < cap {
                        last = Some(r.seq());
                    } else if let Some(bytes) = spill.remove(d, r.seq()) {
                        let k = removed_key(d, r.seq());
                        batch.insert(&k[..], &[][..]);
                        other += k.len() as i64;
                        c.add(Some(r.sender().user), bytes);
                    }
                }
                if let Some(last) = last {
                    c.merge(spill.ack(d, last));
                }
                turn.marks_now = true;
            }
            turn.release.segments.extend(spill.take_freed());
            // Names of accounts deleted a retention period ago are free.
            let freed = self.accounts.free_names(cutoff_ms)?;
            if freed > 0 {
                log::info!("{freed} deleted accounts' names are free again");
                turn.dirty = true;
            }
        }
        let mut expired: Vec<(DeviceKey, u64)> = Vec::new();
        let mut tombstones: Vec<Vec<u8>> = Vec::new();
        let mut stale_folds: Vec<(Vec<u8>, DeviceKey, u64)> = Vec::new();
        let mut scanned = 0;
        let mut from = cursor.clone();
        'scan: while scanned < max_keys {
            let mut moved = false;
            for item in q.range(from.clone()..) {
                let (k, v) = item?;
                scanned += 1;
                moved = true;
                let skip_to = match k.first() {
                    Some(&QUEUE) => {
                        let d = parse_dev(&k).ok_or(StoreError::Corrupt("queues/key"))?;
                        let time = disk::decode_disk(&v)?.into_entry(None).map_or(0, |e| e.time_ms());
                        if time < cutoff_ms {
                            expired.push((d, queue_seq(&k)?));
                            None
                        } else {
                            // Entries of a queue are in acceptance order:
                            // the rest of this one is younger.
                            let mut next = dev_prefix(QUEUE, d).to_vec();
                            next.extend_from_slice(&[0xff; 9]);
                            Some(next)
                        }
                    }
                    Some(&TOMBSTONE) => {
                        if be_u64(&v).is_some_and(|t| t < cutoff_ms) {
                            tombstones.push(k.to_vec());
                        }
                        None
                    }
                    Some(&FOLD) => {
                        if let (Some(d), Some(seq)) = (parse_dev(&k), be_u64(&v))
                            && !q.contains_key(queue_key(d, seq))?
                            && !self.live.lock().may_hold(d, seq)
                        {
                            stale_folds.push((k.to_vec(), d, seq));
                        }
                        None
                    }
                    // Anything else: nothing to expire.
                    Some(&tag) => Some(vec![tag.saturating_add(1)]),
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
                from = Vec::new();
                swept.wrapped = true;
                break;
            }
        }
        *cursor = from;
        // Receipts and notices (in sled) that expired: without a notice.
        for (d, seq) in expired {
            let k = queue_key(d, seq);
            let Some(v) = q.get(k)? else { continue };
            self.live.lock().remove(d, seq);
            batch.remove(&k[..]);
            deleted
                .entry(d)
                .or_default()
                .add(disk::record_sender(&v), disk::record_len(&k, &v));
        }
        let mut live_forget = Vec::new();
        for k in tombstones {
            if let Some(v) = q.get(&k)? {
                batch.remove(k.clone());
                other -= disk::record_len(&k, &v) as i64;
                live_forget.extend(parse_tombstone(&k));
                swept.forgotten += 1;
            }
        }
        for (k, d, seq) in stale_folds {
            // A fold since the scan may have pointed the record at a new
            // entry: check.
            let still = q.get(&k)?.as_deref().and_then(be_u64) == Some(seq);
            if still && !q.contains_key(queue_key(d, seq))? {
                batch.remove(k.clone());
                other -= (FOLD_KEY_LEN + 8) as i64;
            }
        }
        q.apply_batch(batch)?;
        turn.dirty = true;
        {
            let mut live = self.live.lock();
            for (d, gone) in deleted {
                live.deleted(d, &gone);
            }
            live.disk_delta(other);
            for (user, id) in live_forget {
                live.forget_tombstone(user, id);
            }
        }
        for (d, lost) in gaps {
            // A notice stays within one frame.
            for chunk in lost.chunks(MAX_GAP_SENDERS) {
                let notice = Entry::Gap(QueuedGap {
                    lost: chunk.to_vec(),
                    time_ms: now_ms,
                });
                self.fold(d, FoldKey::Gap, notice, turn)?;
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
                    self.fold(target, FoldKey::Expired(d), notice.clone(), turn)?;
                    swept.notified.push(target);
                }
            }
        }
        swept.notified.sort();
        swept.notified.dedup();
        Ok(swept)
    }
}

/// Counts an expired message for the gap notice of the device that lost
/// it and the expiry notice of its sender.
fn note_lost(
    gaps: &mut std::collections::BTreeMap<DeviceKey, Vec<LostRecord>>,
    undelivered: &mut std::collections::BTreeMap<(UserId, DeviceKey), Vec<MsgId>>,
    d: DeviceKey,
    sender: DeviceKey,
    id: MsgId,
    time: u64,
) {
    let lost = gaps.entry(d).or_default();
    match lost
        .iter_mut()
        .find(|l| l.from_user == sender.user.0 && l.from_device == sender.device.0)
    {
        Some(l) => {
            l.count += 1;
            l.first_ms = l.first_ms.min(time);
            l.last_ms = l.last_ms.max(time);
        }
        None => lost.push(LostRecord {
            from_user: sender.user.0,
            from_device: sender.device.0,
            count: 1,
            first_ms: time,
            last_ms: time,
        }),
    }
    undelivered.entry((sender.user, d)).or_default().push(id);
}

/// Reads up to `max` entries of `d`'s queue with sequence in `from..=hi`
/// from disk: receipts and notices from sled, copies from the spill log,
/// in order, into `out`. Returns the highest sequence the read covered.
pub(crate) fn read_disk(
    q: &sled::Tree,
    spill: &Mutex<Spill>,
    d: DeviceKey,
    from: u64,
    hi: u64,
    max: usize,
    out: &mut Vec<(u64, Entry)>,
) -> Result<u64, StoreError> {
    if from > hi || max == 0 {
        return Ok(hi);
    }
    let mut got: Vec<(u64, Entry)> = Vec::new();
    for item in q.range(queue_key(d, from)..=queue_key(d, hi)).take(max) {
        let (k, v) = item?;
        let seq = queue_seq(&k)?;
        match disk::decode_disk(&v)?.into_entry(None) {
            Some(e) => got.push((seq, e)),
            None => log::warn!("{d}: queued entry {seq} cannot be read; skipped"),
        }
    }
    lock(spill).read(d, from, hi, max, &mut got)?;
    got.sort_by_key(|(s, _)| *s);
    let mut covered = hi;
    if got.len() > max {
        got.truncate(max);
    }
    if got.len() == max {
        covered = got.last().map_or(hi, |(s, _)| *s);
    }
    out.append(&mut got);
    Ok(covered)
}

fn lock(spill: &Mutex<Spill>) -> std::sync::MutexGuard<'_, Spill> {
    spill.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a storage error means the database can no longer be trusted
/// (then the daemon exits, and systemd restarts it).
fn is_fatal(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(_) | StoreError::Tx(_) | StoreError::Io { .. } | StoreError::FlushFailed
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
