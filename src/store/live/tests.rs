//! Unit tests of the in-memory queues alone. A fake store thread plays
//! the engine's part over a `BTreeMap` standing for the disk: it takes
//! what is due, "writes" it, deletes acknowledged records, and reports
//! batches durable. After every operation [`Fake::check`] verifies the
//! bookkeeping against that disk and a model of every queue:
//! - **the suffix property**: every entry that exists with a sequence
//!   above the queue's `disk_hi` is in memory, and nothing at or below it
//!   is;
//! - unwritten slots are not on disk, writing and durable ones are;
//! - `count`, `bytes`, `on_disk`, `cached`, `unwritten` and `disk_bytes`
//!   are exactly what the slots and the disk hold;
//! - a memory read returns exactly the model's entries;
//! - a message is settled (its waiters hear it, once) exactly when each
//!   copy is acknowledged, removed, or durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::store::api::{Completion, QueuedReceipt, Sink};
use crate::wire::DeviceId;

const DELAY: Duration = Duration::from_millis(50);

fn dev(u: u32, d: u32) -> DeviceKey {
    DeviceKey {
        user: UserId(u),
        device: DeviceId(d),
    }
}

fn config() -> LiveConfig {
    LiveConfig {
        quotas: Quotas {
            queue_messages: 6,
            queue_bytes: 700,
            disk_budget: 4000,
            total_messages: 1_000_000,
        },
        write_delay: DELAY,
        write_memory: 1000,
        cache_bytes: 600,
        cache_per_queue: 3,
        recent: 8,
    }
}

fn roomy() -> LiveConfig {
    LiveConfig {
        quotas: Quotas::default(),
        ..config()
    }
}

/// What the fake knows of a message.
#[derive(Debug, Default)]
struct Msg {
    time_ms: u64,
    copies: Vec<(DeviceKey, u64)>,
    tokens: Vec<u64>,
    settled: bool,
}

/// What the store found at open, for [`Fake::opened`].
struct Opened {
    loaded: HashMap<DeviceKey, Loaded>,
    tombstones: HashMap<(UserId, MsgId), u64>,
    base: u64,
    ceiling: u64,
    restored: Vec<Restored>,
    /// The records on disk: (device, seq) → bytes.
    disk: BTreeMap<(DeviceKey, u64), u64>,
    /// Their entries.
    model: BTreeMap<(DeviceKey, u64), Entry>,
}

impl Default for Opened {
    fn default() -> Opened {
        Opened {
            loaded: HashMap::new(),
            tombstones: HashMap::new(),
            base: 1,
            ceiling: 1 << 20,
            restored: Vec::new(),
            disk: BTreeMap::new(),
            model: BTreeMap::new(),
        }
    }
}

/// A message in the spill log at open: its sender, id, time and copies
/// (device, sequence, body length).
type Spilled<'a> = (DeviceKey, u8, u64, &'a [(DeviceKey, u64, usize)]);

impl Opened {
    /// As open finds a spill log holding `spilled`, oldest message first.
    /// Every message is restored.
    fn spilled(spilled: &[Spilled<'_>]) -> Opened {
        let mut o = Opened::default();
        for &(sender, id, time_ms, copies) in spilled {
            let mut r = Restored {
                sender,
                id: MsgId([id; 16]),
                time_ms,
                copies: Vec::new(),
            };
            for &(d, seq, len) in copies {
                let e = Entry::Message(QueuedMessage {
                    id: r.id,
                    from_user: sender.user.0,
                    from_device: sender.device.0,
                    to_user: 9,
                    time_ms,
                    body: bytes::Bytes::from(vec![id; len]),
                });
                let size = e.stored_len();
                let l = o.loaded.entry(d).or_default();
                l.count += 1;
                l.bytes += size;
                l.max_seq = l.max_seq.max(seq);
                o.base = o.base.max(seq + 1);
                o.disk.insert((d, seq), size);
                o.model.insert((d, seq), e);
                r.copies.push((d, seq));
            }
            o.restored.push(r);
        }
        o
    }
}

/// `Live` with a fake store thread and a model of every queue.
struct Fake {
    live: Live,
    t0: Instant,
    ms: u64,
    /// The records "on disk": (device, seq) → bytes.
    disk: BTreeMap<(DeviceKey, u64), u64>,
    /// Written in batches not yet durable.
    batch: Vec<(DeviceKey, u64)>,
    /// Copies reported durable.
    durable: HashSet<(DeviceKey, u64)>,
    /// Every entry not acknowledged or removed.
    model: BTreeMap<(DeviceKey, u64), Entry>,
    /// The highest sequence ever given out per queue.
    given: HashMap<DeviceKey, u64>,
    msgs: HashMap<MsgKey, Msg>,
    /// Messages as `Live` should remember them (settled ones for a while).
    known: HashSet<MsgKey>,
    settled_order: VecDeque<MsgKey>,
    /// Messages restored at open (spilled before a restart), not yet
    /// retried: their time and the devices whose copy was still queued.
    restored: HashMap<MsgKey, (u64, Vec<DeviceKey>)>,
    /// Retracted messages `Live` knows.
    tombs: HashMap<(UserId, MsgId), u64>,
    sink: Arc<Sink>,
    token: u64,
    heard: HashMap<u64, Vec<Outcome>>,
}

impl Fake {
    fn new(config: LiveConfig) -> Fake {
        Fake::loaded(config, HashMap::new(), 1, 1 << 20)
    }

    fn loaded(config: LiveConfig, loaded: HashMap<DeviceKey, Loaded>, base: u64, ceiling: u64) -> Fake {
        Fake::opened(
            config,
            Opened {
                loaded,
                base,
                ceiling,
                ..Opened::default()
            },
        )
    }

    /// `Live` as the store makes it at open: queues with copies on disk,
    /// the messages of those copies restored, retraction records.
    fn opened(config: LiveConfig, o: Opened) -> Fake {
        let disk_bytes = o.disk.values().sum();
        let tombs = o.tombstones.clone();
        let mut given = HashMap::new();
        for (d, l) in &o.loaded {
            given.insert(*d, l.max_seq.max(o.base - 1));
        }
        let mut msgs = HashMap::new();
        let mut known = HashSet::new();
        let mut settled_order = VecDeque::new();
        let mut restored = HashMap::new();
        for r in &o.restored {
            let key = (r.sender, r.id);
            msgs.insert(
                key,
                Msg {
                    time_ms: r.time_ms,
                    copies: r.copies.clone(),
                    tokens: Vec::new(),
                    settled: true,
                },
            );
            known.insert(key);
            settled_order.push_back(key);
            restored.insert(key, (r.time_ms, r.copies.iter().map(|(d, _)| *d).collect()));
        }
        Fake {
            live: Live::new(
                config,
                o.loaded,
                o.tombstones,
                disk_bytes,
                o.base,
                o.ceiling,
                o.restored,
            ),
            t0: Instant::now(),
            ms: 0,
            durable: o.disk.keys().copied().collect(),
            disk: o.disk,
            batch: Vec::new(),
            model: o.model,
            given,
            msgs,
            known,
            settled_order,
            restored,
            tombs,
            sink: Sink::new(|| {}),
            token: 0,
            heard: HashMap::new(),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms)
    }

    fn waiter(&mut self) -> Waiter {
        self.token += 1;
        Waiter {
            sink: self.sink.clone(),
            token: self.token,
        }
    }

    fn drain(&mut self) {
        let mut got: Vec<Completion> = Vec::new();
        self.sink.take(&mut got);
        for c in got {
            self.heard.entry(c.token).or_default().push(c.outcome);
        }
    }

    /// Appends, predicting the answer from the model, and checks it.
    fn append(&mut self, sender: DeviceKey, id: u8, copies: &[(DeviceKey, usize, bool)]) -> Appended {
        self.append_as(sender, id, copies, false)
    }

    /// The same, below the free-space floor if `full`.
    fn append_as(&mut self, sender: DeviceKey, id: u8, copies: &[(DeviceKey, usize, bool)], full: bool) -> Appended {
        let key = (sender, MsgId([id; 16]));
        let m = NewMessage {
            sender,
            id: key.1,
            to: UserId(9),
            copies: copies
                .iter()
                .map(|(d, len, online)| (*d, bytes::Bytes::from(vec![id; *len]), *online))
                .collect(),
            now_ms: self.ms,
            mono: self.now(),
        };
        let w = self.waiter();
        let (want, queued) = self.predict(key, &m, full);
        let got = self.live.lock().append(m, self.now(), &w, full);
        assert_eq!(got, want, "append of {key:?}");
        match got {
            Appended::Queued { time_ms } => {
                let mut msg = Msg {
                    time_ms,
                    tokens: vec![w.token],
                    ..Msg::default()
                };
                for (d, e) in queued {
                    let seq = self.live.lock().last_seq(d);
                    let before = self.given.insert(d, seq);
                    assert!(before.is_none_or(|b| b < seq), "{d}: {seq} given out after {before:?}");
                    self.model.insert((d, seq), e);
                    msg.copies.push((d, seq));
                }
                self.msgs.insert(key, msg);
                self.known.insert(key);
                self.restored.remove(&key);
            }
            Appended::Waiting => self.msgs.get_mut(&key).unwrap().tokens.push(w.token),
            _ => {}
        }
        got
    }

    /// What `Live` should answer to `m`, and the entries it should queue:
    /// a retraction answers first; a retry of a message restored at open
    /// queues copies only for the devices whose copy was not still queued,
    /// with the original time; a retry of a message known in this run waits
    /// for it or is a duplicate; anything else is new.
    fn predict(&self, key: MsgKey, m: &NewMessage, full: bool) -> (Appended, Vec<(DeviceKey, Entry)>) {
        if let Some(&time_ms) = self.tombs.get(&(key.0.user, key.1)) {
            return (Appended::Duplicate { time_ms }, Vec::new());
        }
        let mut copies: Vec<(DeviceKey, bytes::Bytes)> = m.copies.iter().map(|(d, b, _)| (*d, b.clone())).collect();
        let mut time_ms = m.now_ms;
        if let Some((t, queued)) = self.restored.get(&key) {
            copies.retain(|(d, _)| !queued.contains(d));
            time_ms = *t;
            if copies.is_empty() {
                return (Appended::Duplicate { time_ms }, Vec::new());
            }
        } else if self.known.contains(&key) {
            let m = &self.msgs[&key];
            let answer = if m.settled {
                Appended::Duplicate { time_ms: m.time_ms }
            } else {
                Appended::Waiting
            };
            return (answer, Vec::new());
        }
        if full {
            return (Appended::Refused(Refused::StorageFull), Vec::new());
        }
        if copies.is_empty() {
            return (Appended::Duplicate { time_ms }, Vec::new());
        }
        let entries: Vec<(DeviceKey, Entry)> = copies
            .into_iter()
            .map(|(d, body)| {
                let e = Entry::Message(QueuedMessage {
                    id: key.1,
                    from_user: key.0.user.0,
                    from_device: key.0.device.0,
                    to_user: m.to.0,
                    time_ms,
                    body,
                });
                (d, e)
            })
            .collect();
        let live = self.live.lock();
        let quotas = live.config.quotas;
        let total: u64 = entries.iter().map(|(_, e)| e.stored_len()).sum::<u64>();
        if live.disk_bytes + live.unwritten() + total > quotas.disk_budget {
            return (Appended::Refused(Refused::Quota(Quota::Disk)), Vec::new());
        }
        for (d, e) in &entries {
            let (count, bytes) = live.usage(*d);
            let next = live.last_seq(*d) + 1;
            if count + 1 > quotas.queue_messages || bytes + e.stored_len() > quotas.queue_bytes || next >= live.ceiling
            {
                return (Appended::Refused(Refused::Quota(Quota::Queue(*d))), Vec::new());
            }
        }
        (Appended::Queued { time_ms }, entries)
    }

    fn ack(&mut self, d: DeviceKey, up_to: u64) {
        self.live.lock().ack(d, up_to);
        let gone: Vec<_> = self.model.range((d, 0)..=(d, up_to)).map(|(k, _)| *k).collect();
        for k in gone {
            self.model.remove(&k);
        }
    }

    /// The store thread's turn: deletes, then writes what is due.
    fn turn(&mut self) {
        let (mut writes, mut deletes, mut removes) = (Vec::new(), Vec::new(), Vec::new());
        self.live
            .lock()
            .take(self.now(), &mut writes, &mut deletes, &mut removes);
        assert!(removes.is_empty());
        let mut live = self.live.lock();
        for (d, up_to) in deletes {
            let gone: Vec<_> = self.disk.range((d, 0)..=(d, up_to)).map(|(k, v)| (*k, *v)).collect();
            for (k, _) in &gone {
                self.disk.remove(k);
            }
            live.deleted(d, gone.len() as u64, gone.iter().map(|(_, s)| s).sum());
        }
        for w in writes {
            assert_eq!(
                Some(&w.entry),
                self.model.get(&(w.device, w.seq)),
                "wrote something not queued"
            );
            assert!(self.disk.insert((w.device, w.seq), w.entry.stored_len()).is_none());
            self.batch.push((w.device, w.seq));
        }
    }

    /// The flusher made the last batches durable.
    fn flush(&mut self) {
        let b = std::mem::take(&mut self.batch);
        self.durable.extend(b.iter().copied());
        self.live.lock().durable(&b);
    }

    /// As retraction and folding do.
    fn remove(&mut self, d: DeviceKey, seq: u64) {
        let mut live = self.live.lock();
        match live.remove(d, seq) {
            Removed::Memory => assert!(!self.disk.contains_key(&(d, seq))),
            Removed::Disk | Removed::NotInMemory => {
                if let Some(size) = self.disk.remove(&(d, seq)) {
                    live.deleted(d, 1, size);
                }
            }
        }
        self.model.remove(&(d, seq));
    }

    /// As revocation does.
    fn clear(&mut self, d: DeviceKey) {
        let mut live = self.live.lock();
        live.clear(d);
        let gone: Vec<_> = self.disk.range((d, 0)..=(d, u64::MAX)).map(|(k, v)| (*k, *v)).collect();
        for (k, _) in &gone {
            self.disk.remove(k);
        }
        live.deleted(d, gone.len() as u64, gone.iter().map(|(_, s)| s).sum());
        let gone: Vec<_> = self.model.range((d, 0)..=(d, u64::MAX)).map(|(k, _)| *k).collect();
        for k in gone {
            self.model.remove(&k);
        }
    }

    /// A receipt or notice the store thread writes in its batch.
    fn push_written(&mut self, d: DeviceKey, n: u8) {
        let e = Entry::Receipt(QueuedReceipt {
            from_user: 5,
            from_device: 1,
            to_user: 9,
            kind: 1,
            ids: vec![MsgId([n; 16])],
            time_ms: self.ms,
        });
        let seq = self.live.lock().push_written(d, e.clone());
        let before = self.given.insert(d, seq);
        assert!(before.is_none_or(|b| b < seq));
        self.disk.insert((d, seq), e.stored_len());
        self.batch.push((d, seq));
        self.model.insert((d, seq), e);
    }

    /// Every invariant of the module docs.
    fn check(&mut self) {
        self.drain();
        {
            let live = self.live.lock();
            let i: &Inner = &live;
            let (mut unwritten, mut cached) = (0, 0);
            for (d, q) in &i.queues {
                let on_disk: Vec<(u64, u64)> = self
                    .disk
                    .range((*d, 0)..=(*d, u64::MAX))
                    .map(|((_, s), b)| (*s, *b))
                    .collect();
                assert_eq!(q.on_disk, on_disk.len() as u64, "{d}: on_disk");
                assert!(q.mem.iter().zip(q.mem.iter().skip(1)).all(|(a, b)| a.seq < b.seq));
                assert!(
                    q.mem.front().is_none_or(|s| s.seq > q.disk_hi),
                    "{d}: memory at or below disk_hi"
                );
                // The suffix property, against the model: above disk_hi,
                // memory holds exactly what exists.
                let above: Vec<(u64, &Entry)> = self
                    .model
                    .range((*d, q.disk_hi.saturating_add(1))..=(*d, u64::MAX))
                    .map(|((_, s), e)| (*s, e))
                    .collect();
                let mem: Vec<(u64, &Entry)> = q.mem.iter().map(|s| (s.seq, &s.entry)).collect();
                assert_eq!(mem, above, "{d}: memory against what exists above {}", q.disk_hi);
                // At or below it, what exists is on disk.
                for ((_, s), _) in self.model.range((*d, 0)..=(*d, q.disk_hi)) {
                    assert!(
                        self.disk.contains_key(&(*d, *s)),
                        "{d}: {s} is neither in memory nor on disk"
                    );
                }
                let (mut n, mut b, mut c) = (0, 0, 0);
                for s in &q.mem {
                    assert_eq!(s.size, s.entry.stored_len());
                    let written = self.disk.contains_key(&(*d, s.seq));
                    match s.state {
                        State::Unwritten => {
                            assert!(!written, "{d}: {} unwritten but on disk", s.seq);
                            n += 1;
                            b += s.size;
                        }
                        State::Writing => assert!(written && !self.durable.contains(&(*d, s.seq))),
                        State::Durable => {
                            assert!(written && self.durable.contains(&(*d, s.seq)));
                            c += 1;
                            cached += s.size;
                        }
                    }
                }
                unwritten += b;
                assert_eq!(q.cached, c, "{d}: cached");
                assert_eq!(
                    (q.count, q.bytes),
                    (
                        on_disk.len() as u64 + n,
                        on_disk.iter().map(|(_, b)| b).sum::<u64>() + b
                    ),
                    "{d}: count and bytes"
                );
                assert_eq!(q.next - 1, self.given.get(d).copied().unwrap_or(i.base - 1));
            }
            assert_eq!(i.unwritten, unwritten, "unwritten");
            assert_eq!(i.cached, cached, "cached");
            assert_eq!(i.disk_bytes, self.disk.values().sum::<u64>(), "disk_bytes");
            // Reads from memory, wherever they are allowed, are exact.
            for (d, q) in &i.queues {
                for from in [0, q.disk_hi, q.disk_hi + 1, q.disk_hi + 2, q.next] {
                    for max in [1, 2, 100] {
                        let mut out = Vec::new();
                        let r = live.read(*d, from, max, &mut out);
                        let all: Vec<(u64, Entry)> = self
                            .model
                            .range((*d, from)..=(*d, u64::MAX))
                            .map(|((_, s), e)| (*s, e.clone()))
                            .collect();
                        match r {
                            Read::OnDisk => assert!(from <= q.disk_hi && q.on_disk > 0),
                            Read::Memory { more } => {
                                assert_eq!(
                                    out,
                                    all.iter().take(max).cloned().collect::<Vec<_>>(),
                                    "{d} from {from}"
                                );
                                assert_eq!(more, all.len() > max);
                            }
                        }
                    }
                }
            }
        }
        // Settlement: exactly the messages whose every copy is safe.
        let mut newly = Vec::new();
        for (key, m) in &mut self.msgs {
            let safe = m
                .copies
                .iter()
                .all(|c| !self.model.contains_key(c) || self.durable.contains(c));
            if safe && !m.settled {
                m.settled = true;
                newly.push(*key);
            }
            for t in &m.tokens {
                let heard = self.heard.get(t).map_or(&[][..], |v| &v[..]);
                let want: &[Outcome] = if m.settled {
                    &[Outcome::Settled { time_ms: m.time_ms }]
                } else {
                    &[]
                };
                assert_eq!(heard, want, "{key:?}, waiter {t}");
            }
        }
        // What `Live` forgets of settled messages: the oldest beyond
        // `recent` (exact when messages settle one at a time).
        for key in newly {
            self.settled_order.push_back(key);
        }
        let recent = self.live.config.recent;
        while self.settled_order.len() > recent {
            let old = self.settled_order.pop_front().unwrap();
            self.known.remove(&old);
        }
    }
}

#[test]
fn a_copy_acked_before_it_is_due_is_never_taken() {
    let mut f = Fake::new(config());
    let (a, b) = (dev(1, 1), dev(2, 1));
    f.append(a, 1, &[(b, 10, true)]);
    f.check();
    f.turn();
    assert!(f.disk.is_empty(), "taken before its deadline");
    f.ack(b, 1);
    f.check();
    assert_eq!(f.heard[&1], vec![Outcome::Settled { time_ms: 0 }]);
    f.ms += 100;
    f.turn();
    f.flush();
    f.check();
    assert!(f.disk.is_empty());
    assert_eq!(f.live.lock().usage(b), (0, 0));
    assert!(!f.live.lock().due(f.now()).0, "nothing left to do");
}

/// A copy due now (its device is offline) is taken at the next turn even
/// when copies waiting for their ack came before it.
#[test]
fn a_copy_due_now_is_taken_before_earlier_ones_that_wait() {
    let mut f = Fake::new(config());
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    f.append(a, 1, &[(b, 10, true)]);
    f.append(a, 2, &[(c, 10, false), (b, 10, true)]);
    f.append(a, 3, &[(c, 10, false)]);
    assert!(f.live.lock().urgent);
    let (ready, next) = f.live.lock().due(f.now());
    assert!(ready);
    assert_eq!(next, Some(f.now()));
    f.turn();
    assert_eq!(f.disk.keys().copied().collect::<Vec<_>>(), vec![(c, 1), (c, 2)]);
    f.check();
    // The ones waiting are due at their deadline, in order.
    let (ready, next) = f.live.lock().due(f.now());
    assert!(!ready);
    assert_eq!(next, Some(f.now() + DELAY));
    f.ms += DELAY.as_millis() as u64;
    f.turn();
    f.flush();
    f.check();
    assert_eq!(f.disk.len(), 4);
}

#[test]
fn past_the_memory_bound_the_oldest_are_taken() {
    let mut f = Fake::new(roomy());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..5 {
        f.append(a, i, &[(b, 300, true)]);
    }
    assert!(f.live.lock().due(f.now()).0, "over the bound: due now");
    f.turn();
    f.check();
    assert!(f.live.lock().unwritten() <= 1000);
    // 338 bytes each: three go for the rest to fit.
    let written: Vec<u64> = f.disk.keys().map(|(_, s)| *s).collect();
    assert_eq!(written, vec![1, 2, 3]);
}

#[test]
fn durable_copies_settle_are_cached_and_evicted_from_the_front() {
    let mut f = Fake::new(roomy());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..6 {
        f.append(a, i, &[(b, 20, false)]);
    }
    f.turn();
    f.check();
    f.flush();
    f.check();
    for t in 1..=6 {
        assert_eq!(f.heard[&t].len(), 1);
    }
    // Three durable entries kept per queue: the first three evicted.
    assert_eq!(f.live.lock().disk_hi(b), 3);
    let mut out = Vec::new();
    assert_eq!(f.live.lock().read(b, 3, 10, &mut out), Read::OnDisk);
    assert_eq!(f.live.lock().read(b, 4, 10, &mut out), Read::Memory { more: false });
    assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 5, 6]);
    // An unwritten copy in front keeps later durable ones in memory: the
    // suffix holds.
    let c = dev(3, 1);
    f.append(a, 10, &[(c, 20, true)]);
    for i in 11..16 {
        f.append(a, i, &[(c, 20, false)]);
    }
    f.turn();
    f.flush();
    f.check();
    assert_eq!(f.live.lock().disk_hi(c), 0);
    f.ack(c, 1);
    f.turn();
    f.flush();
    f.check();
    // Acked: the durable ones are evicted at the next batch made durable.
    f.append(a, 16, &[(c, 20, false)]);
    f.turn();
    f.flush();
    f.check();
    assert_eq!(f.live.lock().disk_hi(c), 4);
    // The global cap: at most cache_bytes of durable entries.
    assert!(f.live.lock().held().1 <= 600);
}

#[test]
fn an_ack_while_being_written_settles_and_deletes_after_the_write() {
    let mut f = Fake::new(config());
    let (a, b) = (dev(1, 1), dev(2, 1));
    f.append(a, 1, &[(b, 10, false)]);
    f.turn();
    f.check();
    f.ack(b, 1);
    f.check();
    assert_eq!(f.heard[&1].len(), 1, "acked while writing: safe");
    assert_eq!(f.live.lock().acked(b), Some(1));
    assert!(f.live.lock().has_deletes());
    f.flush();
    f.check();
    f.turn();
    f.check();
    assert!(f.disk.is_empty());
    assert_eq!(f.live.lock().usage(b), (0, 0));
    assert_eq!(f.live.lock().acked(b), None);
}

/// An ack covers what was given out when it came: a receipt the store
/// thread queues after it, with a number below the ack's, stays.
#[test]
fn an_ack_past_the_last_entry_does_not_cover_later_ones() {
    let mut f = Fake::new(config());
    let (a, b) = (dev(1, 1), dev(2, 1));
    f.append(a, 1, &[(b, 10, false)]);
    f.turn();
    f.ack(b, u64::MAX);
    f.push_written(b, 1);
    f.turn();
    f.flush();
    f.check();
    assert_eq!(f.disk.keys().copied().collect::<Vec<_>>(), vec![(b, 2)]);
    assert_eq!(f.live.lock().usage(b).0, 1);
}

#[test]
fn remove_in_every_state() {
    let mut f = Fake::new(config());
    let (a, b) = (dev(1, 1), dev(2, 1));
    f.append(a, 1, &[(b, 10, true)]);
    f.append(a, 2, &[(b, 10, false)]);
    f.turn();
    f.append(a, 3, &[(b, 10, false)]);
    f.turn();
    f.flush();
    f.append(a, 4, &[(b, 10, false)]);
    f.turn();
    f.check();
    // 1 unwritten, 2 and 3 durable, 4 writing.
    f.remove(b, 1);
    f.check();
    f.remove(b, 3);
    f.check();
    f.remove(b, 4);
    f.check();
    // Not in memory at all: reported so, the caller deletes the record.
    assert_eq!(f.live.lock().remove(b, 99), Removed::NotInMemory);
    assert_eq!(f.live.lock().remove(dev(7, 7), 1), Removed::NotInMemory);
    f.flush();
    f.check();
    assert_eq!(f.model.keys().copied().collect::<Vec<_>>(), vec![(b, 2)]);
    for t in 1..=4 {
        assert_eq!(f.heard[&t].len(), 1, "waiter {t}");
    }
}

#[test]
fn clear_forgets_a_queue_and_settles_what_waited() {
    let mut f = Fake::new(config());
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    f.append(a, 1, &[(b, 10, false)]);
    f.turn();
    f.flush();
    f.append(a, 2, &[(b, 10, false), (c, 10, false)]);
    f.turn();
    f.append(a, 3, &[(b, 10, true)]);
    f.push_written(b, 1);
    f.check();
    f.clear(b);
    f.check();
    assert_eq!(f.live.lock().usage(b), (0, 0));
    assert!(f.heard.contains_key(&3), "only b's copy waited");
    assert!(!f.heard.contains_key(&2), "c's copy is not durable yet");
    f.flush();
    f.check();
    assert!(f.heard.contains_key(&2));
    // New entries go on past everything given out.
    f.append(a, 4, &[(b, 10, false)]);
    f.check();
    assert_eq!(f.live.lock().last_seq(b), 5);
}

#[test]
fn retries_are_recalled_and_tombstones_answer_first() {
    let mut f = Fake::new(config());
    let (a, a2, b) = (dev(1, 1), dev(1, 2), dev(2, 1));
    f.append(a, 1, &[(b, 10, false)]);
    assert_eq!(f.append(a, 1, &[(b, 10, false)]), Appended::Waiting);
    let w = f.waiter();
    assert_eq!(f.live.lock().recall(a, MsgId([1; 16]), &w), Some(Appended::Waiting));
    f.msgs.get_mut(&(a, MsgId([1; 16]))).unwrap().tokens.push(w.token);
    assert_eq!(f.live.lock().recall(a, MsgId([2; 16]), &w), None);
    f.turn();
    f.flush();
    f.check();
    assert_eq!(f.append(a, 1, &[(b, 10, false)]), Appended::Duplicate { time_ms: 0 });
    // A retracted message: answered for any device of the user.
    f.live.lock().tombstone(UserId(1), MsgId([7; 16]), 42);
    for s in [a, a2] {
        assert_eq!(
            f.live.lock().recall(s, MsgId([7; 16]), &w),
            Some(Appended::Duplicate { time_ms: 42 })
        );
        assert_eq!(
            f.live.lock().append(
                NewMessage {
                    sender: s,
                    id: MsgId([7; 16]),
                    to: UserId(2),
                    copies: vec![(b, bytes::Bytes::from_static(b"x"), false)],
                    now_ms: 50,
                    mono: f.now(),
                },
                f.now(),
                &w,
                false
            ),
            Appended::Duplicate { time_ms: 42 }
        );
    }
    f.live.lock().forget_tombstone(UserId(1), MsgId([7; 16]));
    assert_eq!(f.live.lock().recall(a, MsgId([7; 16]), &w), None);
    // Below the free-space floor only retries are answered.
    let full = f.live.lock().append(
        NewMessage {
            sender: a,
            id: MsgId([8; 16]),
            to: UserId(2),
            copies: vec![(b, bytes::Bytes::from_static(b"x"), false)],
            now_ms: 50,
            mono: f.now(),
        },
        f.now(),
        &w,
        true,
    );
    assert_eq!(full, Appended::Refused(Refused::StorageFull));
    f.check();
}

#[test]
fn settled_messages_are_remembered_for_a_while() {
    let mut f = Fake::new(roomy());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..12 {
        f.append(a, i, &[(b, 1, true)]);
        f.ack(b, u64::MAX);
        f.check();
    }
    assert_eq!(f.live.lock().remembered(), 8);
    // The oldest are forgotten: a retry is queued again (the client drops
    // it by id).
    assert!(matches!(f.append(a, 0, &[(b, 1, true)]), Appended::Queued { .. }));
    assert_eq!(f.append(a, 11, &[(b, 1, true)]), Appended::Duplicate { time_ms: 0 });
    f.check();
}

#[test]
fn quotas_refuse_as_a_whole() {
    let mut f = Fake::new(config());
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    for i in 0..6 {
        assert!(matches!(
            f.append(a, i, &[(b, 10, i % 2 == 0)]),
            Appended::Queued { .. }
        ));
    }
    let before = f.live.lock().last_seq(c);
    assert_eq!(
        f.append(a, 9, &[(c, 10, false), (b, 10, false)]),
        Appended::Refused(Refused::Quota(Quota::Queue(b)))
    );
    assert_eq!(f.live.lock().last_seq(c), before, "nothing given out");
    assert_eq!(f.live.lock().usage(c), (0, 0));
    f.check();
    // Bytes: 700 a queue.
    assert_eq!(
        f.append(a, 10, &[(c, 700, false)]),
        Appended::Refused(Refused::Quota(Quota::Queue(c)))
    );
    // The disk budget counts unwritten copies.
    let mut i = 20;
    while matches!(
        f.append(a, i, &[(dev(4, i as u32), 600, true)]),
        Appended::Queued { .. }
    ) {
        i += 1;
    }
    let live = f.live.lock();
    assert!(live.disk_bytes + live.unwritten() <= 4000);
    drop(live);
    f.check();
}

/// Numbers come from below the durable ceiling; past it appends are
/// refused until it is raised.
#[test]
fn the_ceiling_bounds_the_numbers_given_out() {
    let mut loaded = HashMap::new();
    let b = dev(2, 1);
    loaded.insert(
        b,
        Loaded {
            max_seq: 7,
            count: 1,
            bytes: 40,
        },
    );
    let mut f = Fake::loaded(roomy(), loaded, 5, 10);
    // As open found it: the record of 7 on disk.
    f.disk.insert((b, 7), 40);
    f.given.insert(b, 7);
    assert_eq!(f.live.lock().last_seq(b), 7);
    assert_eq!(f.live.lock().last_seq(dev(3, 1)), 4, "new queues start at the base");
    let a = dev(1, 1);
    assert!(matches!(f.append(a, 1, &[(b, 1, true)]), Appended::Queued { .. }));
    assert!(matches!(f.append(a, 2, &[(b, 1, true)]), Appended::Queued { .. }));
    assert_eq!(f.live.lock().last_seq(b), 9);
    assert_eq!(
        f.append(a, 3, &[(b, 1, true)]),
        Appended::Refused(Refused::Quota(Quota::Queue(b)))
    );
    assert_eq!(f.live.lock().max_next, 10);
    f.live.lock().set_ceiling(100);
    f.live.lock().set_ceiling(50);
    assert_eq!(f.live.lock().ceiling, 100, "never lowered");
    assert!(matches!(f.append(a, 3, &[(b, 1, true)]), Appended::Queued { .. }));
    assert_eq!(f.live.lock().last_seq(b), 10);
}

// ---- retries of messages restored at open ----

/// A message spilled before a restart, to b and c, both copies still
/// queued at open.
fn restored_to_b_and_c() -> (Fake, DeviceKey, DeviceKey, DeviceKey) {
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    let f = Fake::opened(roomy(), Opened::spilled(&[(a, 1, 77, &[(b, 1, 10), (c, 1, 10)])]));
    (f, a, b, c)
}

/// Every device whose copy is still queued has the message: a retry is a
/// duplicate, answered with the original time, and queues nothing.
#[test]
fn a_retry_of_a_restored_message_whose_copies_are_all_queued_is_a_duplicate() {
    let (mut f, a, b, c) = restored_to_b_and_c();
    f.check();
    f.ms = 5000;
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, true)]),
        Appended::Duplicate { time_ms: 77 }
    );
    assert_eq!(f.append(a, 1, &[(c, 10, true)]), Appended::Duplicate { time_ms: 77 });
    assert_eq!(f.live.lock().last_seq(b), 1, "nothing queued");
    assert_eq!(f.live.lock().unwritten(), 0);
    // Still so once a device acknowledged its copy (it has it).
    f.ack(b, 1);
    f.turn();
    f.check();
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, true)]),
        Appended::Duplicate { time_ms: 77 }
    );
    f.check();
}

/// A device whose copy is not queued at open (delivered, or lost
/// unwritten with the restart: the store cannot tell) gets the retry's
/// copy, with the original time; so does a device the first send did not
/// name. The retry is answered `Queued` with the original time and
/// settles with it; from then on it is known as any message is.
#[test]
fn a_retry_of_a_restored_message_queues_only_the_missing_copies() {
    let (a, b, c, d) = (dev(1, 1), dev(2, 1), dev(3, 1), dev(4, 1));
    let mut f = Fake::opened(roomy(), Opened::spilled(&[(a, 1, 77, &[(b, 1, 10)])]));
    f.ms = 5000;
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false), (d, 10, true)]),
        Appended::Queued { time_ms: 77 }
    );
    f.check();
    assert_eq!(f.live.lock().last_seq(b), 1, "b has its copy");
    let mut out = Vec::new();
    assert_eq!(f.live.lock().read(c, 0, 10, &mut out), Read::Memory { more: false });
    match &out[..] {
        [(2, Entry::Message(m))] => assert_eq!((m.time_ms, m.body.len()), (77, 10)),
        other => panic!("{other:?}"),
    }
    // In flight: a retry waits for it.
    assert_eq!(f.append(a, 1, &[(c, 10, false)]), Appended::Waiting);
    f.turn();
    f.flush();
    f.check();
    assert!(!f.heard.contains_key(&1), "d's copy waits for its ack");
    f.ack(d, u64::MAX);
    f.check();
    assert_eq!(f.heard[&1], vec![Outcome::Settled { time_ms: 77 }]);
    assert_eq!(f.heard[&2], vec![Outcome::Settled { time_ms: 77 }]);
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false), (d, 10, true)]),
        Appended::Duplicate { time_ms: 77 }
    );
    f.check();
}

/// The hub asks `recall` when a retry's devices do not match the user's
/// (a device was linked or revoked meanwhile), to answer a known retry
/// `Accepted` before comparing them. A restored message is known only in
/// part: which of its devices miss a copy shows only against the retry's
/// copies. So `recall` does not answer for it, the hub answers `Mismatch`,
/// and the client's corrected retry reaches the devices that miss it
/// through `append`. Answering `Duplicate` would tell the sender that a
/// copy lost unwritten with the restart is safe.
#[test]
fn recall_does_not_answer_for_a_restored_message() {
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    let mut f = Fake::opened(roomy(), Opened::spilled(&[(a, 1, 77, &[(b, 1, 10)])]));
    let w = f.waiter();
    assert_eq!(f.live.lock().recall(a, MsgId([1; 16]), &w), None);
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false)]),
        Appended::Queued { time_ms: 77 }
    );
    // Once queued it is known as any message is.
    let w = f.waiter();
    assert_eq!(f.live.lock().recall(a, MsgId([1; 16]), &w), Some(Appended::Waiting));
    f.msgs.get_mut(&(a, MsgId([1; 16]))).unwrap().tokens.push(w.token);
    f.check();
}

/// Below the free-space floor a retry of a restored message that would
/// queue a copy is refused, not answered `Accepted`: the device's copy
/// may have been lost unwritten with the restart, and the sender must not
/// be told it is safe (DESIGN, guarantee 1). One with nothing to queue is
/// a duplicate as before.
#[test]
fn below_the_floor_a_retry_of_a_restored_message_with_a_missing_copy_is_refused() {
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    let mut f = Fake::opened(roomy(), Opened::spilled(&[(a, 1, 77, &[(b, 1, 10)])]));
    assert_eq!(
        f.append_as(a, 1, &[(b, 10, false), (c, 10, false)], true),
        Appended::Refused(Refused::StorageFull)
    );
    assert_eq!(
        f.append_as(a, 1, &[(b, 10, false)], true),
        Appended::Duplicate { time_ms: 77 }
    );
    f.check();
    // Space back: the retry reaches c.
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false)]),
        Appended::Queued { time_ms: 77 }
    );
    f.check();
}

/// A retry of a restored message refused by a quota leaves it restored:
/// a later retry still reaches only the devices that miss it, with the
/// original time.
#[test]
fn a_refused_retry_of_a_restored_message_is_recognised_later() {
    let (a, e, b, c) = (dev(1, 1), dev(1, 2), dev(2, 1), dev(3, 1));
    let mut f = Fake::opened(config(), Opened::spilled(&[(a, 1, 77, &[(b, 1, 10)])]));
    // c's queue is full (six entries).
    for i in 0..6 {
        assert!(matches!(f.append(e, i, &[(c, 10, false)]), Appended::Queued { .. }));
    }
    f.ms = 5000;
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false)]),
        Appended::Refused(Refused::Quota(Quota::Queue(c)))
    );
    f.check();
    f.turn();
    f.flush();
    f.ack(c, u64::MAX);
    f.turn();
    f.check();
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false)]),
        Appended::Queued { time_ms: 77 }
    );
    assert_eq!(f.live.lock().last_seq(b), 1, "b has its copy");
    f.check();
}

/// A retraction answers first (spec §5.5): a message retracted before the
/// restart whose copy came back at open (an acknowledged copy whose mark
/// was not yet written) is not brought back to the other devices by a
/// retry.
#[test]
fn a_retry_of_a_restored_message_that_was_retracted_is_a_duplicate() {
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    let mut o = Opened::spilled(&[(a, 1, 77, &[(b, 1, 10)])]);
    o.tombstones.insert((UserId(1), MsgId([1; 16])), 77);
    let mut f = Fake::opened(roomy(), o);
    assert_eq!(
        f.append(a, 1, &[(b, 10, false), (c, 10, false)]),
        Appended::Duplicate { time_ms: 77 }
    );
    assert_eq!(f.live.lock().usage(c), (0, 0), "nothing queued for c");
    f.check();
}

// ---- any sequence ----

const QUEUES: u8 = 4;

fn device(i: u8) -> DeviceKey {
    dev(2 + u32::from(i % QUEUES), 1)
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        sender: u8,
        id: u8,
        targets: u8,
        online: u8,
        len: usize,
    },
    Ack {
        device: u8,
        up_to: u64,
    },
    Turn {
        advance: u64,
    },
    Flush,
    Remove {
        device: u8,
        nth: usize,
    },
    Clear {
        device: u8,
    },
    Receipt {
        device: u8,
        n: u8,
    },
    RaiseCeiling,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0u8..2, 0u8..10, 1u8..16, any::<u8>(), 0usize..200)
            .prop_map(|(sender, id, targets, online, len)| Op::Append { sender, id, targets, online, len }),
        5 => (0..QUEUES, prop_oneof![0u64..40, Just(u64::MAX)]).prop_map(|(device, up_to)| Op::Ack { device, up_to }),
        5 => prop_oneof![Just(0u64), 1u64..80].prop_map(|advance| Op::Turn { advance }),
        4 => Just(Op::Flush),
        2 => (0..QUEUES, 0usize..8).prop_map(|(device, nth)| Op::Remove { device, nth }),
        1 => (0..QUEUES).prop_map(|device| Op::Clear { device }),
        2 => (0..QUEUES, any::<u8>()).prop_map(|(device, n)| Op::Receipt { device, n }),
        1 => Just(Op::RaiseCeiling),
    ]
}

fn run(ops: Vec<Op>) {
    // Settled messages all remembered: which are forgotten first depends
    // on the order copies became safe (settled_messages_are_remembered_…).
    let config = LiveConfig {
        recent: 1 << 20,
        ..config()
    };
    // Messages spilled before a restart, restored at open: appends of the
    // same ids (sender 0's 0 and 1, sender 1's 2) are retries of them.
    let (s0, s1) = (dev(1, 1), dev(1, 2));
    let mut o = Opened::spilled(&[
        (s0, 0, 0, &[(device(0), 1, 20), (device(1), 1, 20)]),
        (s0, 1, 0, &[(device(0), 2, 20)]),
        (s1, 2, 0, &[(device(2), 1, 20), (device(3), 1, 20)]),
    ]);
    o.ceiling = 30;
    let mut f = Fake::opened(config, o);
    f.check();
    for op in ops {
        match op {
            Op::Append {
                sender,
                id,
                targets,
                online,
                len,
            } => {
                let copies: Vec<(DeviceKey, usize, bool)> = (0..QUEUES)
                    .filter(|i| targets & (1 << i) != 0)
                    .map(|i| (device(i), len, online & (1 << i) != 0))
                    .collect();
                f.append(dev(1, 1 + u32::from(sender)), id, &copies);
            }
            Op::Ack { device: d, up_to } => f.ack(device(d), up_to),
            Op::Turn { advance } => {
                f.ms += advance;
                f.turn();
            }
            Op::Flush => f.flush(),
            Op::Remove { device: d, nth } => {
                let d = device(d);
                let seqs: Vec<u64> = f.model.range((d, 0)..=(d, u64::MAX)).map(|((_, s), _)| *s).collect();
                if let Some(seq) = seqs.get(nth) {
                    f.remove(d, *seq);
                }
            }
            Op::Clear { device: d } => f.clear(device(d)),
            Op::Receipt { device: d, n } => f.push_written(device(d), n),
            Op::RaiseCeiling => {
                let c = f.live.lock().ceiling;
                f.live.lock().set_ceiling(c + 20);
            }
        }
        f.check();
    }
    // In the end everything is written or acknowledged, and settles.
    f.ms += 1000;
    f.turn();
    f.flush();
    f.check();
    for (key, m) in &f.msgs {
        assert!(m.settled, "{key:?} never settled");
    }
}

proptest! {
    // `PROPTEST_CASES` sets the number of cases (default 256 here).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_queues_keep_their_books_under_any_sequence(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}
