//! Model test of the queue store (`tidings::store`) against a `BTreeMap`,
//! in the manner of sled's own testing strategy: random sequences of
//! appends, receipts, retractions, acks, reads, sequence and usage
//! queries, queue deletions, flushes and reopens of the database, each
//! checked against a plain in-memory model.
//!
//! What it pins down:
//! - an append puts one entry, with its body, at the end of each target
//!   device's queue, at the next sequence number of that queue;
//! - a second append with the same (sender device, message id) appends
//!   nothing and answers `Duplicate` with the first acceptance time, for
//!   any targets, before and after acks and reopens;
//! - an append that would take a queue past its entry or byte quota is
//!   refused as a whole, naming the first such queue, and leaves no dedup
//!   record (a later retry may succeed);
//! - a receipt folds into the pending receipt of the same sending device,
//!   kind and addressee in each target queue (removed, and re-appended
//!   merged at the tail), or is appended; one that would start an entry
//!   in a full queue is refused as a whole;
//! - a retraction removes exactly the still-queued copies of that message
//!   from those senders, and says how many;
//! - `read_queue` returns exactly the model's entries from `from` on, in
//!   order, at most `max`; `queue_usage` (entries, bytes) and `last_seq`
//!   agree with it;
//! - a cumulative ack removes exactly the entries up to its sequence and
//!   says how many; sequence numbers are never given out twice, even once
//!   a queue is emptied by acks or deleted and the database reopened;
//! - epochs returned by appends never go backwards, and after
//!   `flush_now` the durable epoch covers every one of them;
//! - all of it survives `Store::flush`, drop and `Store::open`;
//! - with appends from several threads at once, readers never see a gap,
//!   and dedup and per-sender order hold (`concurrent_appends_…`).
//!
//! Not modelled: the retention sweep and the disk budget.
//!
//! `PROPTEST_CASES` sets the number of cases (default 64 here).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use tidings::ids::{DeviceKey, UserId};
use tidings::store::{
    Appended, Entry, Epoch, Op as StoreOp, Outcome, QueuedMessage, QueuedReceipt, Quota, Quotas, Store, StoreConfig,
    StoreError,
};
use tidings::wire::{DeviceId, MsgId, ReceiptKind};

/// Users 1..=3, each with devices 1..=3: nine queues.
const USERS: u32 = 3;
const DEVICES: u32 = 3;
const QUEUES: u8 = (USERS * DEVICES) as u8;

/// Small quotas, so that refusals are common.
const QUOTAS: Quotas = Quotas {
    queue_messages: 8,
    queue_bytes: 1500,
    disk_budget: u64::MAX,
};

fn device(i: u8) -> DeviceKey {
    let i = u32::from(i % QUEUES);
    DeviceKey {
        user: UserId(1 + i / DEVICES),
        device: DeviceId(1 + i % DEVICES),
    }
}

fn msg_id(i: u8) -> MsgId {
    MsgId([i; 16])
}

/// The queues whose bit is set in `mask`, in order.
fn devices(mask: u16) -> Vec<DeviceKey> {
    (0..QUEUES).filter(|i| mask & (1 << i) != 0).map(device).collect()
}

/// A sequence number to ack up to or read from: small ones mostly (queues
/// here hold tens of entries), sometimes the extremes.
fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..40, 1 => Just(0), 1 => Just(u64::MAX)]
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        sender: u8,
        /// From a small pool, so that retries and id reuse across senders
        /// are common.
        id: u8,
        to: u32,
        /// Bit `i` set: a body for `device(i)`.
        targets: u16,
        body_len: usize,
    },
    Receipt {
        from: u8,
        to: u32,
        kind: u8,
        ids: Vec<u8>,
        targets: u16,
    },
    Retract {
        user: u32,
        /// Bit `i` set: device `i + 1` of `user` is among the senders.
        senders: u8,
        id: u8,
    },
    Ack {
        device: u8,
        up_to: u64,
    },
    Read {
        device: u8,
        from: u64,
        max: usize,
    },
    LastSeq {
        device: u8,
    },
    DedupLookup {
        sender: u8,
        id: u8,
    },
    DeleteQueue {
        device: u8,
    },
    FlushNow,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..QUEUES, 0u8..12, 1..=USERS, 0u16..(1 << QUEUES), 0usize..300).prop_map(
            |(sender, id, to, targets, body_len)| Op::Append { sender, id, to, targets, body_len }
        ),
        3 => (0..QUEUES, 1..=USERS, 1u8..=2, proptest::collection::vec(0u8..12, 1..4), 0u16..(1 << QUEUES))
            .prop_map(|(from, to, kind, ids, targets)| Op::Receipt { from, to, kind, ids, targets }),
        2 => (1..=USERS, 1u8..8, 0u8..12).prop_map(|(user, senders, id)| Op::Retract { user, senders, id }),
        4 => (0..QUEUES, seq()).prop_map(|(device, up_to)| Op::Ack { device, up_to }),
        3 => (0..QUEUES, seq(), 0usize..12).prop_map(|(device, from, max)| Op::Read { device, from, max }),
        1 => (0..QUEUES).prop_map(|device| Op::LastSeq { device }),
        1 => (0..QUEUES, 0u8..12).prop_map(|(sender, id)| Op::DedupLookup { sender, id }),
        1 => (0..QUEUES).prop_map(|device| Op::DeleteQueue { device }),
        1 => Just(Op::FlushNow),
        1 => Just(Op::Reopen),
    ]
}

/// A first acceptance: when, and where the copies went.
struct Accepted {
    time_ms: u64,
    queued: Vec<(DeviceKey, u64)>,
}

/// What the store should hold.
#[derive(Default)]
struct Model {
    queues: BTreeMap<DeviceKey, BTreeMap<u64, Entry>>,
    /// The last sequence number given out per queue.
    last: BTreeMap<DeviceKey, u64>,
    /// (sender, id) → first acceptance.
    dedup: BTreeMap<(DeviceKey, MsgId), Accepted>,
    /// (target, receipt sender, kind, addressee) → the seq of the receipt
    /// entry later ones fold into, if it is still queued.
    folds: BTreeMap<(DeviceKey, DeviceKey, u8, u32), u64>,
}

/// The stored size of an entry, which byte quotas count.
fn size(e: &Entry) -> u64 {
    postcard::to_stdvec(e).expect("encode an entry").len() as u64
}

impl Model {
    fn queue(&mut self, d: DeviceKey) -> &mut BTreeMap<u64, Entry> {
        self.queues.entry(d).or_default()
    }

    fn usage(&self, d: DeviceKey) -> (u64, u64) {
        self.queues
            .get(&d)
            .map(|q| (q.len() as u64, q.values().map(size).sum()))
            .unwrap_or((0, 0))
    }

    fn push(&mut self, d: DeviceKey, e: Entry) -> u64 {
        let last = self.last.entry(d).or_insert(0);
        *last += 1;
        let seq = *last;
        self.queue(d).insert(seq, e);
        seq
    }

    fn ack(&mut self, d: DeviceKey, up_to: u64) -> usize {
        let q = self.queue(d);
        let keep = match up_to.checked_add(1) {
            Some(first_kept) => q.split_off(&first_kept),
            None => BTreeMap::new(),
        };
        let removed = q.len();
        *q = keep;
        removed
    }

    fn entries(&self, d: DeviceKey, from: u64, max: usize) -> Vec<(u64, Entry)> {
        self.queues
            .get(&d)
            .map(|q| q.range(from..).take(max).map(|(s, e)| (*s, e.clone())).collect())
            .unwrap_or_default()
    }
}

/// Opens the store, waiting while the instance just dropped still holds
/// the lock: sled's background threads can keep the database file open
/// for a moment after the last handle goes (seen about once in 300
/// reopens). Another process would hold it for good; nothing else here
/// does.
fn open(dir: &Path) -> Store {
    open_with(dir, QUOTAS)
}

fn open_with(dir: &Path, quotas: Quotas) -> Store {
    let config = StoreConfig {
        quotas,
        ..StoreConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(dir, &config) {
            Err(StoreError::Locked) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            r => return r.expect("open the store"),
        }
    }
}

/// The body an append at `step` carries for queue `i`: unique per step and
/// device, so a misplaced entry shows.
fn body(step: usize, i: u8, len: usize) -> Bytes {
    let mut b = Vec::with_capacity(len + 9);
    b.extend_from_slice(&(step as u64).to_be_bytes());
    b.push(i);
    b.resize(len + 9, i ^ step as u8);
    Bytes::from(b)
}

/// Every queue, read whole, equals the model's.
fn check_all(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    for i in 0..QUEUES {
        let d = device(i);
        let mut got = Vec::new();
        store.read_queue(d, 0, usize::MAX, &mut got).expect("read_queue");
        prop_assert_eq!(&got, &model.entries(d, 0, usize::MAX), "queue {}", d);
        prop_assert_eq!(
            store.queue_usage(d).expect("queue_usage"),
            model.usage(d),
            "usage of {}",
            d
        );
        prop_assert_eq!(store.queue_len(d).expect("queue_len"), got.len());
        prop_assert_eq!(
            store.last_seq(d).expect("last_seq"),
            model.last.get(&d).copied().unwrap_or(0)
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path());
    let mut model = Model::default();
    // Epochs are per store instance (the flusher starts over on open).
    let mut max_epoch = Epoch(0);
    for (step, op) in ops.into_iter().enumerate() {
        let now_ms = 1_000 + step as u64;
        match op {
            Op::Append {
                sender,
                id,
                to,
                targets,
                body_len,
            } => {
                let sender = device(sender);
                let id = msg_id(id);
                let bodies: Vec<(DeviceKey, Bytes)> = (0..QUEUES)
                    .filter(|i| targets & (1 << i) != 0)
                    .map(|i| (device(i), body(step, i, body_len)))
                    .collect();
                let op = StoreOp::Append {
                    sender,
                    id,
                    to: UserId(to),
                    bodies: bodies.clone(),
                    now_ms,
                };
                let (mut outcomes, epoch) = store.apply(std::slice::from_ref(&op)).expect("append");
                let Some(Outcome::Appended(got)) = outcomes.pop() else {
                    panic!("one outcome")
                };
                let entries: Vec<(DeviceKey, Entry)> = bodies
                    .iter()
                    .map(|(d, data)| {
                        let m = QueuedMessage {
                            id,
                            from_user: sender.user.0,
                            from_device: sender.device.0,
                            to_user: to,
                            time_ms: now_ms,
                            body: data.clone(),
                        };
                        (*d, Entry::Message(m))
                    })
                    .collect();
                let over = entries.iter().find(|(d, e)| {
                    let (count, bytes) = model.usage(*d);
                    count + 1 > QUOTAS.queue_messages || bytes + size(e) > QUOTAS.queue_bytes
                });
                match (got, model.dedup.get(&(sender, id)), over) {
                    (Appended::Duplicate { time_ms }, Some(first), _) => {
                        prop_assert_eq!(time_ms, first.time_ms, "a duplicate answers the first time");
                        prop_assert!(epoch >= max_epoch, "epoch {:?} after {:?}", epoch, max_epoch);
                        max_epoch = epoch;
                    }
                    (Appended::OverQuota(Quota::Queue(q)), None, Some((d, _))) => {
                        prop_assert_eq!(q, *d, "the first queue over its quota");
                    }
                    (Appended::New { time_ms }, None, None) => {
                        prop_assert_eq!(time_ms, now_ms);
                        prop_assert!(epoch >= max_epoch, "epoch {:?} after {:?}", epoch, max_epoch);
                        max_epoch = epoch;
                        let queued = entries.into_iter().map(|(d, e)| (d, model.push(d, e))).collect();
                        model.dedup.insert(
                            (sender, id),
                            Accepted {
                                time_ms: now_ms,
                                queued,
                            },
                        );
                    }
                    (got, first, over) => {
                        return Err(TestCaseError::fail(format!(
                            "append of {id:?} from {sender}: got {got:?}, model: first time {:?}, over quota {:?}",
                            first.map(|a| a.time_ms),
                            over.map(|(d, _)| d)
                        )));
                    }
                }
            }
            Op::Receipt {
                from,
                to,
                kind,
                ids,
                targets,
            } => {
                let from = device(from);
                let ids: Vec<MsgId> = ids.into_iter().map(msg_id).collect();
                let targets = devices(targets);
                let got = store
                    .append_receipt(from, UserId(to), ReceiptKind(kind), &ids, &targets, now_ms)
                    .expect("append_receipt");
                let entry = QueuedReceipt {
                    from_user: from.user.0,
                    from_device: from.device.0,
                    to_user: to,
                    kind,
                    ids: ids.clone(),
                    time_ms: now_ms,
                };
                // Per target: the pending entry it folds into, if any.
                let plan: Vec<(DeviceKey, Option<u64>)> = targets
                    .iter()
                    .map(|t| {
                        let pending = model.folds.get(&(*t, from, kind, to)).copied();
                        let live = pending.filter(|seq| {
                            matches!(model.queues.get(t).and_then(|q| q.get(seq)), Some(Entry::Receipt(_)))
                        });
                        (*t, live)
                    })
                    .collect();
                // A receipt that starts an entry counts against the quota.
                let over = plan.iter().find(|(t, folds)| {
                    let (count, bytes) = model.usage(*t);
                    folds.is_none()
                        && (count + 1 > QUOTAS.queue_messages
                            || bytes + size(&Entry::Receipt(entry.clone())) > QUOTAS.queue_bytes)
                });
                match (got, over) {
                    (Err(Quota::Queue(q)), Some((t, _))) => {
                        prop_assert_eq!(q, *t, "the first queue over its quota");
                        continue;
                    }
                    (Ok(epoch), None) => {
                        prop_assert!(epoch >= max_epoch, "epoch {:?} after {:?}", epoch, max_epoch);
                        max_epoch = epoch;
                    }
                    (got, over) => {
                        return Err(TestCaseError::fail(format!(
                            "receipt from {from} to {to}: got {got:?}, model: over quota {:?}",
                            over.map(|(t, _)| t)
                        )));
                    }
                }
                for (t, folds) in plan {
                    let mut entry = entry.clone();
                    if let Some(seq) = folds
                        && let Some(Entry::Receipt(old)) = model.queue(t).remove(&seq)
                    {
                        let mut merged = old.ids;
                        for id in &ids {
                            if !merged.contains(id) {
                                merged.push(*id);
                            }
                        }
                        entry.ids = merged;
                    }
                    let seq = model.push(t, Entry::Receipt(entry));
                    model.folds.insert((t, from, kind, to), seq);
                }
            }
            Op::Retract { user, senders, id } => {
                let senders: Vec<DeviceKey> = (0..DEVICES)
                    .filter(|i| senders & (1 << i) != 0)
                    .map(|i| DeviceKey {
                        user: UserId(user),
                        device: DeviceId(1 + i),
                    })
                    .collect();
                let id = msg_id(id);
                let (removed, epoch) = store.retract(&senders, id).expect("retract");
                prop_assert!(epoch >= max_epoch, "epoch {:?} after {:?}", epoch, max_epoch);
                max_epoch = epoch;
                let mut want = 0;
                for s in &senders {
                    let queued = match model.dedup.get(&(*s, id)) {
                        Some(a) => a.queued.clone(),
                        None => continue,
                    };
                    for (d, seq) in queued {
                        if matches!(model.queue(d).get(&seq), Some(Entry::Message(m)) if m.id == id) {
                            model.queue(d).remove(&seq);
                            want += 1;
                        }
                    }
                }
                prop_assert_eq!(removed, want, "retract {:?} from {:?}", id, senders);
            }
            Op::Ack { device: i, up_to } => {
                let d = device(i);
                let removed = store.ack(d, up_to).expect("ack");
                prop_assert_eq!(removed, model.ack(d, up_to), "ack {} up to {}", d, up_to);
            }
            Op::Read { device: i, from, max } => {
                let d = device(i);
                let mut got = Vec::new();
                store.read_queue(d, from, max, &mut got).expect("read_queue");
                prop_assert_eq!(got, model.entries(d, from, max), "read {} from {} max {}", d, from, max);
            }
            Op::LastSeq { device: i } => {
                let d = device(i);
                prop_assert_eq!(
                    store.last_seq(d).expect("last_seq"),
                    model.last.get(&d).copied().unwrap_or(0)
                );
            }
            Op::DedupLookup { sender, id } => {
                let (sender, id) = (device(sender), msg_id(id));
                prop_assert_eq!(
                    store.dedup_lookup(sender, id).expect("dedup_lookup"),
                    model.dedup.get(&(sender, id)).map(|a| a.time_ms)
                );
            }
            Op::DeleteQueue { device: i } => {
                let d = device(i);
                let removed = store.delete_queue(d).expect("delete_queue");
                prop_assert_eq!(removed, model.ack(d, u64::MAX));
            }
            Op::FlushNow => {
                prop_assert!(store.flusher().flush_now(), "flush failed");
                prop_assert!(
                    store.flusher().durable() >= max_epoch,
                    "durable {:?} behind {:?}",
                    store.flusher().durable(),
                    max_epoch
                );
            }
            Op::Reopen => {
                store.flush().expect("flush");
                drop(store);
                store = open(dir.path());
                max_epoch = Epoch(0);
                check_all(&store, &model)?;
            }
        }
    }
    check_all(&store, &model)?;
    // And once more from disk.
    store.flush().expect("flush");
    drop(store);
    check_all(&open(dir.path()), &model)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn queue_store_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}

fn append(sender: u8, id: u8, device: u8) -> Op {
    Op::Append {
        sender,
        id,
        to: 2,
        targets: 1 << device,
        body_len: 3,
    }
}

/// The sequence numbers of an emptied, deleted and reopened queue go on
/// from where they were (a fixed case of the property, readable on its
/// own).
#[test]
fn sequence_numbers_survive_acks_deletes_and_reopens() {
    let ops = vec![
        append(0, 1, 3),
        append(0, 2, 3),
        Op::Ack { device: 3, up_to: 2 },
        Op::Reopen,
        append(0, 3, 3),
        Op::DeleteQueue { device: 3 },
        Op::Reopen,
        append(0, 2, 3),
        append(1, 2, 3),
        Op::LastSeq { device: 3 },
        Op::Read {
            device: 3,
            from: 0,
            max: 10,
        },
    ];
    run(ops).unwrap();
}

/// A device reads receipts from one of its user's devices about two
/// conversations: they must not fold into one entry, or the receipts about
/// one conversation arrive addressed to the other.
#[test]
fn receipts_about_different_conversations_do_not_fold() {
    let ops = vec![
        Op::Receipt {
            from: 3,
            to: 1,
            kind: 2,
            ids: vec![1],
            targets: 1 << 4,
        },
        Op::Receipt {
            from: 3,
            to: 3,
            kind: 2,
            ids: vec![2],
            targets: 1 << 4,
        },
        Op::Read {
            device: 4,
            from: 0,
            max: 10,
        },
    ];
    run(ops).unwrap();
}

/// Appends from several threads at once (the daemon's loops share one
/// store), with a reader scanning as they go: a reader never sees a gap
/// in a queue (an entry becomes visible only with every lower sequence
/// number), each sender's messages keep their order in every queue, every
/// queue has the messages in the same order, and a message sent by
/// several threads at once under one id is stored once.
#[test]
fn concurrent_appends_keep_order_and_dedup() {
    const THREADS: u8 = 4;
    const PER_THREAD: u32 = 150;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = std::sync::Arc::new(open_with(dir.path(), Quotas::default()));
    let targets: Vec<DeviceKey> = (0..3).map(|i| device(6 + i)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut scans = 0;
            loop {
                let last = done.load(std::sync::atomic::Ordering::SeqCst);
                for d in &targets {
                    let mut got = Vec::new();
                    store.read_queue(*d, 0, usize::MAX, &mut got).expect("read_queue");
                    for (i, (seq, _)) in got.iter().enumerate() {
                        assert_eq!(*seq, i as u64 + 1, "a gap in {d}");
                    }
                }
                scans += 1;
                if last {
                    return scans;
                }
            }
        });
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                let targets = &targets;
                s.spawn(move || {
                    let sender = device(t);
                    let mut new = 0;
                    for n in 0..PER_THREAD {
                        // Every thread also sends id (0xff, n / 10) as sender 5:
                        // concurrent retries of one message.
                        let (sender, id) = if n % 10 == 0 {
                            (
                                device(5),
                                MsgId([0xff, (n / 10) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                            )
                        } else {
                            let mut id = [t; 16];
                            id[12..].copy_from_slice(&n.to_be_bytes());
                            (sender, MsgId(id))
                        };
                        let bodies: Vec<(DeviceKey, Bytes)> = targets
                            .iter()
                            .map(|d| (*d, Bytes::copy_from_slice(&n.to_be_bytes())))
                            .collect();
                        if let Appended::New { .. } = store.append(sender, id, UserId(3), &bodies, 1).expect("append") {
                            new += 1;
                        }
                    }
                    new
                })
            })
            .collect();
        let new: u32 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let scans = reader.join().expect("reader");
        eprintln!("{scans} scans while appending");
        // Each thread's 135 own messages, plus 15 shared ones stored once.
        let shared = PER_THREAD / 10;
        assert_eq!(new, u32::from(THREADS) * (PER_THREAD - shared) + shared);
        let mut first_order: Option<Vec<MsgId>> = None;
        for d in &targets {
            let mut got = Vec::new();
            store.read_queue(*d, 0, usize::MAX, &mut got).expect("read_queue");
            assert_eq!(got.len() as u32, new, "queue {d}");
            // One append is one batch under the sequence lock: every
            // target queue has the messages in the same order.
            let order: Vec<MsgId> = got
                .iter()
                .map(|(_, e)| match e {
                    Entry::Message(m) => m.id,
                    other => panic!("only messages were queued, got {other:?}"),
                })
                .collect();
            match &first_order {
                None => first_order = Some(order),
                Some(first) => assert_eq!(first, &order, "queue {d} differs in order"),
            }
            // Per sender, bodies (the sender's counter) only go up.
            let mut last: BTreeMap<(u32, u32), u32> = BTreeMap::new();
            for (_, e) in &got {
                let Entry::Message(m) = e else {
                    panic!("only messages were queued")
                };
                let n = u32::from_be_bytes(m.body[..].try_into().expect("4 bytes"));
                let key = (m.from_user, m.from_device);
                if let Some(prev) = last.insert(key, n)
                    && key != (device(5).user.0, device(5).device.0)
                {
                    assert!(n > prev, "sender {key:?}: {n} after {prev} in {d}");
                }
            }
        }
    });
}
