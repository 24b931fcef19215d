//! Unit tests of the store: the data directory (server key, format and
//! migrations, lock), accounts, and the store path. The store path is
//! driven without threads: appends, reads and acks are the loops' memory
//! calls; [`Store::step`] runs one store-thread turn at a virtual time;
//! completions are drained from a [`Sink`]. What is on disk is read
//! straight from the `queues` tree and from the spill log's index.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::api::{QueuedGroupMessage, QueuedGroupNotice, Swept};
use super::*;
use crate::ids::{DeviceKey, Identity, UserId};
use crate::wire::{DeviceId, MAX_DEVICES_PER_USER, MsgId, ReceiptKind};

/// Opens the store, waiting while an instance this test just dropped still
/// holds the lock: sled's background threads can keep the database file
/// open for a moment after the last handle goes (about one reopen in 300).
fn try_open_with(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(dir, config) {
            Err(StoreError::Locked) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            r => return r,
        }
    }
}

fn try_open(dir: &Path) -> Result<Store, StoreError> {
    try_open_with(dir, &StoreConfig::default())
}

fn open(dir: &Path) -> Store {
    try_open(dir).unwrap()
}

fn msg(e: &Entry) -> &QueuedMessage {
    match e {
        Entry::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// A link code asked for by `by` at time 0, expiring at `expires_ms`.
fn link_code(a: &Accounts, by: DeviceKey, expires_ms: u64) -> crate::wire::Token {
    a.request_link(by, 0, Duration::from_millis(expires_ms))
        .unwrap()
        .unwrap()
        .0
}

fn dev(u: u32, d: u32) -> DeviceKey {
    DeviceKey {
        user: UserId(u),
        device: DeviceId(d),
    }
}

fn id(n: u8) -> MsgId {
    MsgId([n; 16])
}

/// Keys as a device publishes them, signed for real (the store checks
/// every signature): an identity, `n` one-time keys, a fallback key.
fn signed_keys(seed: u8, n: u8) -> crate::wire::PublishKeys {
    use crate::wire::{IdentityKeys, PublishKeys, Signature, SignedKey};
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let pair = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
    let ed25519: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
    let sign = |m: &[u8]| Signature(pair.sign(m).as_ref().try_into().unwrap());
    let curve25519 = [seed ^ 0x55; 32];
    let key = |k: [u8; 32]| SignedKey {
        key: k,
        signature: sign(&crate::keys::one_time_message(&k)),
    };
    PublishKeys {
        identity: Some(IdentityKeys {
            curve25519,
            ed25519,
            signature: sign(&crate::keys::identity_message(&curve25519, &ed25519)),
        }),
        one_time: (0..n).map(|i| key([i; 32])).collect(),
        fallback: Some(key([0xff; 32])),
    }
}

/// The records of one kind in the `queues` tree (`q`, `t`, `r`, `w`,
/// `x`; `m` in format 3).
fn records(s: &Store, tag: u8) -> Vec<(Vec<u8>, Vec<u8>)> {
    s.queues
        .scan_prefix([tag])
        .map(|r| {
            let (k, v) = r.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// The copies the spill log indexes: (device, sequence, bytes as
/// counted), in order.
fn spilled(s: &Store) -> Vec<(DeviceKey, u64, u64)> {
    s.spill.lock().unwrap_or_else(|e| e.into_inner()).indexed()
}

/// Where the spill log's indexed copies are: (device, sequence).
fn spilled_at(s: &Store) -> Vec<(DeviceKey, u64)> {
    spilled(s).into_iter().map(|(d, seq, _)| (d, seq)).collect()
}

/// The segment files of the spill log.
fn segments(s: &Store) -> Vec<u32> {
    s.spill.lock().unwrap_or_else(|e| e.into_inner()).segments()
}

/// A device's mark in sled: every copy of it up to this is gone.
fn mark(s: &Store, d: DeviceKey) -> Option<u64> {
    s.queues.get(disk::mark_key(d)).unwrap().as_deref().and_then(be_u64)
}

/// The bytes of every record the disk budget counts: sled's receipts and
/// notices, retraction, fold, mark and removal records (key and value),
/// and the spill log's records that hold an indexed copy (header and
/// payload), read from its files.
fn counted_bytes(s: &Store) -> u64 {
    let sled: u64 = [disk::QUEUE, disk::TOMBSTONE, disk::FOLD, disk::MARK, disk::REMOVED]
        .into_iter()
        .flat_map(|tag| records(s, tag))
        .map(|(k, v)| disk::record_len(&k, &v))
        .sum();
    sled + s.spill.lock().unwrap_or_else(|e| e.into_inner()).held_on_disk() + s.blobs.counted()
}

/// `disk_bytes` (what the budget counts) is exactly what sled and the
/// spill log hold.
#[track_caller]
fn check_bytes(s: &Store) {
    assert_eq!(
        s.queued_bytes(),
        counted_bytes(s),
        "disk_bytes against the records in sled and the spill log"
    );
}

/// With no acknowledgement waiting for the store thread: the bytes of all
/// queues are those of their records on disk (receipts and notices in
/// sled, copies in the spill log) and of their copies waiting in memory.
#[track_caller]
fn check_totals(s: &Store) {
    let q = records(s, disk::QUEUE);
    let copies = spilled(s);
    let on_disk: u64 =
        q.iter().map(|(k, v)| disk::record_len(k, v)).sum::<u64>() + copies.iter().map(|(_, _, b)| b).sum::<u64>();
    let count = (q.len() + copies.len()) as u64;
    let (entries, bytes) = s.queue_totals();
    assert_eq!(bytes, on_disk + s.memory_held().0, "queue bytes: on disk and unwritten");
    assert!(entries >= count, "{entries} entries counted, {count} on disk");
}

/// The fair shares count exactly what each sender has queued: its
/// receipts in sled, its copies in the spill log and its copies waiting
/// in memory, per queue and in all, and in all the records of the
/// messages it retracted (acknowledged records count until the
/// store thread deleted them, as the queues' own counts do).
#[track_caller]
fn check_shares(s: &Store) {
    let mut per_queue: BTreeMap<(DeviceKey, UserId), shares::Use> = BTreeMap::new();
    let mut per_user: BTreeMap<UserId, shares::Use> = BTreeMap::new();
    let mut count = |d: DeviceKey, sender: Option<UserId>, bytes: u64| {
        if let Some(u) = sender {
            for c in [per_queue.entry((d, u)).or_default(), per_user.entry(u).or_default()] {
                c.count += 1;
                c.bytes += bytes;
            }
        }
    };
    for (k, v) in records(s, disk::QUEUE) {
        count(
            disk::parse_dev(&k).unwrap(),
            disk::record_sender(&v),
            disk::record_len(&k, &v),
        );
    }
    for (d, u, bytes) in s.spill.lock().unwrap_or_else(|e| e.into_inner()).indexed_senders() {
        count(d, Some(u), bytes);
    }
    let live = s.live.lock();
    for (d, u, bytes) in live.unwritten_senders() {
        count(d, u, bytes);
    }
    // The records of retracted messages count for their user.
    for (k, v) in records(s, disk::TOMBSTONE) {
        let (u, _) = disk::parse_tombstone(&k).unwrap();
        let c = per_user.entry(u).or_default();
        c.count += 1;
        c.bytes += disk::record_len(&k, &v);
    }
    assert_eq!(live.shares_snapshot(), (per_queue, per_user), "the fair shares");
}

/// The time the test's clock starts at.
const T0_MS: u64 = 1_700_000_000_000;

/// A store driven by hand: a virtual clock, one sink for every answer.
struct Rig {
    s: Store,
    sink: Arc<Sink>,
    t0: Instant,
    ms: u64,
    token: u64,
    got: Vec<Completion>,
    config: StoreConfig,
}

impl Rig {
    fn open(dir: &Path) -> Rig {
        Rig::with(dir, StoreConfig::default())
    }

    fn with(dir: &Path, config: StoreConfig) -> Rig {
        // Whatever the free space of the test machine's disk.
        let config = StoreConfig { min_free: 0, ..config };
        Rig {
            s: try_open_with(dir, &config).unwrap(),
            sink: Sink::new(|| {}),
            t0: Instant::now(),
            ms: 0,
            token: 0,
            got: Vec::new(),
            config,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms)
    }

    fn now_ms(&self) -> u64 {
        T0_MS + self.ms
    }

    fn advance(&mut self, by: Duration) {
        self.ms += by.as_millis() as u64;
    }

    /// Past every deadline of a copy waiting now.
    fn past_deadline(&mut self) {
        let d = self.config.write_delay + Duration::from_millis(1);
        self.advance(d);
    }

    fn waiter(&mut self) -> Waiter {
        self.token += 1;
        Waiter {
            sink: self.sink.clone(),
            token: self.token,
        }
    }

    /// Appends message `id` from `sender` to `to`, one copy per
    /// `(device, body, online)`, accepted at `now_ms`. Returns the
    /// waiter's token and the answer.
    fn send_at(
        &mut self,
        sender: DeviceKey,
        id: MsgId,
        to: UserId,
        copies: &[(DeviceKey, &[u8], bool)],
        now_ms: u64,
    ) -> (u64, Appended) {
        let w = self.waiter();
        let m = NewMessage {
            sender,
            id,
            to,
            copies: copies
                .iter()
                .map(|(d, b, online)| (*d, Bytes::copy_from_slice(b), *online))
                .collect(),
            now_ms,
            mono: self.now(),
        };
        (w.token, self.s.append(m, &w))
    }

    fn send(
        &mut self,
        sender: DeviceKey,
        id: MsgId,
        to: UserId,
        copies: &[(DeviceKey, &[u8], bool)],
    ) -> (u64, Appended) {
        let now_ms = self.now_ms();
        self.send_at(sender, id, to, copies, now_ms)
    }

    /// A retry: what the hub asks first.
    fn recall(&mut self, sender: DeviceKey, id: MsgId) -> (u64, Option<Appended>) {
        let w = self.waiter();
        (w.token, self.s.recall(sender, id, &w))
    }

    /// One store-thread turn now, then a flush if `flush`.
    fn step(&mut self, flush: bool) {
        assert!(self.s.step(self.now(), self.now_ms(), flush), "a store turn failed");
        check_bytes(&self.s);
    }

    /// Every completion for `token` so far.
    fn outcomes(&mut self, token: u64) -> Vec<Outcome> {
        self.sink.take(&mut self.got);
        let (mine, rest) = std::mem::take(&mut self.got)
            .into_iter()
            .partition(|c| c.token == token);
        self.got = rest;
        mine.into_iter().map(|c: Completion| c.outcome).collect()
    }

    /// The settlement `token` heard, if any (at most one).
    fn settled(&mut self, token: u64) -> Option<u64> {
        let o = self.outcomes(token);
        assert!(o.len() <= 1, "{token}: {o:?}");
        o.into_iter().next().map(|o| match o {
            Outcome::Settled { time_ms } => time_ms,
            other => panic!("{token}: {other:?}"),
        })
    }

    /// Submits `op`, runs a turn and a flush, and returns its answer.
    fn call(&mut self, op: Op) -> Outcome {
        let w = self.waiter();
        self.s.submit(op, Some(w.clone()));
        self.step(true);
        let mut o = self.outcomes(w.token);
        assert_eq!(o.len(), 1, "{o:?}");
        o.pop().unwrap()
    }

    fn receipt(
        &mut self,
        from: DeviceKey,
        to: UserId,
        kind: ReceiptKind,
        ids: &[MsgId],
        targets: &[DeviceKey],
    ) -> Outcome {
        let now_ms = self.now_ms();
        self.call(Op::Receipt {
            from,
            to,
            kind,
            ids: ids.to_vec(),
            targets: targets.to_vec(),
            now_ms,
        })
    }

    /// One whole pass of the retention sweep, `max_keys` keys a turn.
    fn sweep(&mut self, cutoff_ms: u64, max_keys: usize) -> Swept {
        let mut cursor = Vec::new();
        let mut total = Swept::default();
        for _ in 0..10_000 {
            let now_ms = self.now_ms();
            let Outcome::Swept(s, next) = self.call(Op::Sweep {
                cursor,
                cutoff_ms,
                max_keys,
                now_ms,
            }) else {
                panic!("not a sweep's answer")
            };
            cursor = next;
            total.expired += s.expired;
            total.forgotten += s.forgotten;
            total.notified.extend(s.notified);
            if s.wrapped {
                total.wrapped = true;
                return total;
            }
        }
        panic!("the sweep never wrapped");
    }

    /// The queue as a tool sees it (disk, then memory).
    fn queue(&self, d: DeviceKey) -> Vec<(u64, Entry)> {
        let mut out = Vec::new();
        self.s.read_queue(d, 0, 10_000, &mut out).unwrap();
        out
    }

    /// What the hub delivers: memory reads, and backlog reads from disk
    /// through the store thread, from `from` on.
    fn deliver(&mut self, d: DeviceKey, mut from: u64) -> Vec<(u64, Entry)> {
        let mut out = Vec::new();
        loop {
            match self.s.read(d, from, 16, &mut out) {
                Read::Memory { more: false } => return out,
                Read::Memory { more: true } => from = out.last().unwrap().0 + 1,
                Read::OnDisk => {
                    let Outcome::Backlog {
                        device,
                        entries,
                        covered,
                        ..
                    } = self.call(Op::ReadBacklog {
                        device: d,
                        from,
                        max: 16,
                    })
                    else {
                        panic!("not a backlog")
                    };
                    assert_eq!(device, d);
                    assert!(covered >= from, "a backlog read that covered nothing");
                    out.extend(entries);
                    from = covered + 1;
                }
            }
        }
    }

    /// A crash: what was written is flushed (as sled would have on its
    /// own), what waited in memory is lost; then the directory reopens.
    fn reopen(self) -> Rig {
        self.reopen_after(|_| {})
    }

    /// The same, with `damage` done to the data directory while the store
    /// is down.
    fn reopen_after(self, damage: impl FnOnce(&Path)) -> Rig {
        let Rig { s, t0, ms, config, .. } = self;
        let dir = s.dir().to_path_buf();
        s.flush().unwrap();
        drop(s);
        damage(&dir);
        let s = try_open_with(&dir, &config).unwrap();
        check_bytes(&s);
        Rig {
            s,
            sink: Sink::new(|| {}),
            t0,
            ms,
            token: 0,
            got: Vec::new(),
            config,
        }
    }
}

// ---- the data directory ----

#[test]
fn server_key_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = open(dir.path()).server_key().public;
    let k2 = open(dir.path()).server_key().public;
    assert_eq!(k1, k2);
    assert_eq!(
        fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("tidings-data {FORMAT_VERSION}\n")
    );
    assert_eq!(FORMAT_VERSION, 5);
}

/// A new data directory is written in the current format, not taken for
/// format 0 (sled creates `db/conf` while opening, so the check for an
/// existing database must look before that) and run through migrations.
#[test]
fn a_new_directory_is_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // Each migration step leaves its marker in the queues tree.
    assert_eq!(s.queues.get(b"v2").unwrap(), None);
    assert_eq!(s.queues.get(b"v3").unwrap(), None);
}

#[test]
fn newer_format_is_refused_and_older_migrated() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    fs::write(dir.path().join("FORMAT"), "tidings-data 99\n").unwrap();
    assert!(matches!(try_open(dir.path()), Err(StoreError::TooNew { found: 99 })));
    fs::write(dir.path().join("FORMAT"), "tidings-data 0\n").unwrap();
    drop(open(dir.path()));
    assert_eq!(
        fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("tidings-data {FORMAT_VERSION}\n")
    );
    // A directory with a database and no FORMAT file is format 0.
    fs::remove_file(dir.path().join("FORMAT")).unwrap();
    drop(open(dir.path()));
    assert_eq!(
        fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("tidings-data {FORMAT_VERSION}\n")
    );
}

/// Format 4 becomes 5 by its number alone: the new trees start empty.
#[test]
fn format_4_directories_open_as_format_5() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    fs::write(dir.path().join("FORMAT"), "tidings-data 4\n").unwrap();
    let s = open(dir.path());
    assert_eq!(
        fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        "tidings-data 5\n"
    );
    assert!(s.groups().read().groups_of(crate::ids::UserId(1)).is_empty());
}

#[test]
fn second_open_is_refused_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path());
    assert!(matches!(
        Store::open(dir.path(), &StoreConfig::default()),
        Err(StoreError::Locked)
    ));
}

fn queue_key_of(d: DeviceKey, seq: u64) -> Vec<u8> {
    disk::queue_key(d, seq).to_vec()
}

fn old_key(tag: u8, d: DeviceKey, tail: &[u8]) -> Vec<u8> {
    let mut k = disk::dev_prefix(tag, d).to_vec();
    k.extend_from_slice(tail);
    k
}

/// Writes what format 1 wrote into a fresh directory and marks it format
/// 1: a bare message as a queue value, a bare time as dedup value, an
/// 8-byte next-sequence record.
fn write_format_1(dir: &Path) {
    let s = open(dir);
    let (a, b) = (dev(1, 1), dev(2, 1));
    let old = QueuedMessage {
        id: id(5),
        from_user: 1,
        from_device: 1,
        to_user: 2,
        time_ms: 77,
        body: Bytes::from_static(b"old"),
    };
    s.queues
        .insert(queue_key_of(b, 1), postcard::to_stdvec(&old).unwrap())
        .unwrap();
    s.queues.insert(old_key(b'n', b, &[]), &2u64.to_be_bytes()).unwrap();
    s.queues
        .insert(old_key(b'd', a, &[5; 16]), &77u64.to_be_bytes())
        .unwrap();
    s.flush().unwrap();
    drop(s);
    fs::write(dir.join("FORMAT"), "tidings-data 1\n").unwrap();
}

/// What format 1's message became: a copy in the spill log, readable at
/// once, counted, its retry known, its sequence number not given out
/// again.
fn check_migrated_message(dir: &Path) {
    let mut r = Rig::open(dir);
    assert_eq!(
        fs::read_to_string(dir.join("FORMAT")).unwrap(),
        format!("tidings-data {FORMAT_VERSION}\n")
    );
    let (a, b) = (dev(1, 1), dev(2, 1));
    let q = r.queue(b);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].0, 1);
    let m = msg(&q[0].1);
    assert_eq!(
        (m.body.as_ref(), m.time_ms, m.to_user, m.from()),
        (&b"old"[..], 77, 2, a)
    );
    // Delivered as the hub reads it.
    assert_eq!(r.deliver(b, 0), q);
    // Counted as stored: a copy in the spill log.
    let copies = spilled(&r.s);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!((copies[0].0, copies[0].1), (b, 1));
    assert_eq!(copies[0].2, q[0].1.stored_len());
    assert_eq!(r.s.queue_usage(b), (1, copies[0].2));
    assert!(r.s.last_seq(b) >= 1);
    // Old dedup and queue meta records are gone, so are message records
    // and the copy's queue record.
    assert!(records(&r.s, b'd').is_empty() && records(&r.s, b'n').is_empty());
    assert!(records(&r.s, disk::MESSAGE).is_empty() && records(&r.s, disk::QUEUE).is_empty());
    check_bytes(&r.s);
    // A retry of it is recognised: its copy is still queued.
    let (_, got) = r.send(a, id(5), UserId(2), &[(b, b"old again", false)]);
    assert_eq!(got, Appended::Duplicate { time_ms: 77 });
    r.step(true);
    assert_eq!(r.queue(b).len(), 1);
    // A new message goes after it.
    let (_, got) = r.send(a, id(6), UserId(2), &[(b, b"new", false)]);
    assert!(matches!(got, Appended::Queued { .. }));
    r.step(true);
    let q = r.queue(b);
    assert_eq!(q.len(), 2);
    assert!(q[1].0 > 1);
}

#[test]
fn format_1_directories_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    write_format_1(dir.path());
    check_migrated_message(dir.path());
}

/// A crash after every step ran but before the FORMAT file was written:
/// the rerun of the steps from format 1 changes nothing.
#[test]
fn a_rerun_of_a_finished_migration_from_format_1_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_format_1(dir.path());
    drop(open(dir.path()));
    let before: Vec<_> = open(dir.path()).queues.iter().map(|r| r.unwrap()).collect();
    fs::write(dir.path().join("FORMAT"), "tidings-data 1\n").unwrap();
    let s = try_open(dir.path()).expect("a rerun of the migration");
    let after: Vec<_> = s.queues.iter().map(|r| r.unwrap()).collect();
    assert_eq!(before, after);
    drop(s);
    check_migrated_message(dir.path());
}

/// Format 2: entries were an enum with the whole header in each copy,
/// dedup records said where a message was queued, `n` records held each
/// queue's next sequence.
#[test]
fn format_2_directories_are_migrated_and_reruns_change_nothing() {
    use super::migrate::{DedupRecord, OldEntry};
    let dir = tempfile::tempdir().unwrap();
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    {
        let s = open(dir.path());
        for (d, seq) in [(b1, 4u64), (b2, 9)] {
            let old = OldEntry::Message(QueuedMessage {
                id: id(5),
                from_user: 1,
                from_device: 1,
                to_user: 2,
                time_ms: 77,
                body: Bytes::copy_from_slice(&seq.to_be_bytes()),
            });
            s.queues
                .insert(queue_key_of(d, seq), postcard::to_stdvec(&old).unwrap())
                .unwrap();
        }
        let receipt = OldEntry::Receipt(disk::QueuedReceipt {
            from_user: 2,
            from_device: 1,
            to_user: 1,
            kind: 2,
            ids: vec![id(1)],
            time_ms: 70,
        });
        s.queues
            .insert(queue_key_of(a, 3), postcard::to_stdvec(&receipt).unwrap())
            .unwrap();
        // b2's queue once went up to 40 (acked since): 41 is next.
        let mut meta = 41u64.to_be_bytes().to_vec();
        meta.extend_from_slice(&[0; 16]);
        s.queues.insert(old_key(b'n', b2, &[]), meta).unwrap();
        let dedup = DedupRecord {
            time_ms: 77,
            queued: vec![(2, 1, 4), (2, 2, 9)],
        };
        s.queues
            .insert(old_key(b'd', a, &[5; 16]), postcard::to_stdvec(&dedup).unwrap())
            .unwrap();
        s.queues.insert(b"v2", &2u32.to_be_bytes()).unwrap();
        s.flush().unwrap();
    }
    fs::write(dir.path().join("FORMAT"), "tidings-data 2\n").unwrap();
    let check = |s: &Store| {
        assert_eq!(
            fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
            format!("tidings-data {FORMAT_VERSION}\n")
        );
        let mut out = Vec::new();
        s.read_queue(b2, 0, 10, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 9);
        assert_eq!(msg(&out[0].1).time_ms, 77);
        assert_eq!(msg(&out[0].1).body.as_ref(), &9u64.to_be_bytes());
        out.clear();
        s.read_queue(a, 0, 10, &mut out).unwrap();
        assert!(matches!(&out[..], [(3, Entry::Receipt(r))] if r.ids == vec![id(1)]));
        // Sequence numbers never come back, not even acked ones.
        assert!(s.last_seq(b2) >= 41, "{}", s.last_seq(b2));
        assert!(records(s, b'd').is_empty() && records(s, b'n').is_empty());
        // The copies in the spill log, each once; the receipt in sled.
        assert!(records(s, disk::MESSAGE).is_empty());
        assert_eq!(spilled_at(s), vec![(b1, 4), (b2, 9)]);
        assert_eq!(records(s, disk::QUEUE).len(), 1);
        assert_eq!(s.queue_usage(b1).0, 1);
        check_bytes(s);
    };
    let before = {
        let s = open(dir.path());
        check(&s);
        s.queues.iter().map(|r| r.unwrap()).collect::<Vec<_>>()
    };
    // A crash before FORMAT was written: the step runs again.
    fs::write(dir.path().join("FORMAT"), "tidings-data 2\n").unwrap();
    let s = open(dir.path());
    check(&s);
    assert_eq!(s.queues.iter().map(|r| r.unwrap()).collect::<Vec<_>>(), before);
}

/// Format 3: a copy was a `q` record holding its body, and what every copy
/// of a message shared was one `m` record. The migration to 4 moves the
/// copies to the spill log (readable at once, counted, their retries
/// recognised) and drops both kinds of record; receipts stay in sled. A
/// crash after the copies were appended but before sled's batch that
/// removes the old records (or before FORMAT was written) runs it again:
/// each copy is indexed once, and the segment of the duplicates goes.
#[test]
fn format_3_copies_move_to_the_spill_log_and_a_rerun_indexes_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let copy = |seq: u64| {
        disk::encode(&disk::DiskEntry::Message {
            from_user: 1,
            from_device: 1,
            id: id(5),
            body: Bytes::copy_from_slice(&seq.to_be_bytes()),
        })
    };
    let format_3: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (queue_key_of(b1, 4), copy(4)),
        (queue_key_of(b2, 9), copy(9)),
        // A copy whose message record is missing: dropped, with a warning.
        (
            queue_key_of(b2, 10),
            disk::encode(&disk::DiskEntry::Message {
                from_user: 1,
                from_device: 1,
                id: id(6),
                body: Bytes::from_static(b"orphan"),
            }),
        ),
        (
            queue_key_of(a, 3),
            disk::encode(&disk::DiskEntry::Receipt(disk::QueuedReceipt {
                from_user: 2,
                from_device: 1,
                to_user: 1,
                kind: 2,
                ids: vec![id(1)],
                time_ms: 70,
            })),
        ),
        (
            disk::message_key(a, id(5)).to_vec(),
            disk::encode(&disk::MsgRecord {
                to_user: 2,
                time_ms: 77,
                copies: vec![(2, 1, 4), (2, 2, 9)],
            }),
        ),
    ];
    let write_3 = |dir: &Path| {
        let s = open(dir);
        for (k, v) in &format_3 {
            s.queues.insert(&k[..], &v[..]).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        fs::write(dir.join("FORMAT"), "tidings-data 3\n").unwrap();
    };
    let check = |r: &mut Rig| {
        assert_eq!(
            fs::read_to_string(r.s.dir().join("FORMAT")).unwrap(),
            format!("tidings-data {FORMAT_VERSION}\n")
        );
        assert_eq!(spilled_at(&r.s), vec![(b1, 4), (b2, 9)]);
        assert!(records(&r.s, disk::MESSAGE).is_empty());
        assert_eq!(records(&r.s, disk::QUEUE).len(), 1, "the receipt stays in sled");
        assert_eq!(r.s.queue_usage(b1), (1, spilled(&r.s)[0].2));
        assert_eq!(r.s.queue_usage(b2).0, 1);
        // Delivered at once, with the header the message record held.
        let got = r.deliver(b2, 0);
        match &got[..] {
            [(9, Entry::Message(m))] => assert_eq!(
                (m.time_ms, m.to_user, m.from(), m.body.as_ref()),
                (77, 2, a, &9u64.to_be_bytes()[..])
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.deliver(b1, 0).len(), 1);
        assert!(matches!(&r.deliver(a, 0)[..], [(3, Entry::Receipt(_))]));
        // The dropped copy's number is not given out again.
        assert!(r.s.last_seq(b2) >= 10);
        check_bytes(&r.s);
        check_totals(&r.s);
        // A retry of the message is recognised: both copies are queued.
        let (_, got) = r.send(a, id(5), UserId(2), &[(b1, b"again", false), (b2, b"again", false)]);
        assert_eq!(got, Appended::Duplicate { time_ms: 77 });
    };
    write_3(dir.path());
    let mut r = Rig::open(dir.path());
    check(&mut r);
    assert_eq!(segments(&r.s).len(), 1);
    drop(r);
    // A crash before the batch that removes the old records was applied:
    // they are all there again, and FORMAT says 3.
    write_3(dir.path());
    let mut r = Rig::open(dir.path());
    check(&mut r);
    assert_eq!(
        segments(&r.s).len(),
        1,
        "the rerun's duplicates went with their segment"
    );
}

// ---- accounts ----

#[test]
fn the_presence_setting_and_last_seen_times_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let invite = r.s.accounts().create_invite(2, None).unwrap();
    let alice = r.s.accounts().register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let bob = r.s.accounts().register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    assert!(!r.s.hides_presence(alice.user), "no one hides by default");
    let o = r.call(Op::SetLastSeen {
        user: alice.user,
        everyone: false,
    });
    assert_eq!(o, Outcome::LastSeenSet);
    r.s.submit(
        Op::Touch {
            device: bob,
            now_ms: 77,
            persist: true,
        },
        None,
    );
    r.step(true);
    let mut r = r.reopen();
    assert!(r.s.hides_presence(alice.user));
    assert!(!r.s.hides_presence(bob.user));
    assert_eq!(r.s.device_infos(bob.user)[0].last_seen_ms, 77);
    r.call(Op::SetLastSeen {
        user: alice.user,
        everyone: true,
    });
    let r = r.reopen();
    assert!(!r.s.hides_presence(alice.user));
}

/// A device's last-seen time on authenticating is kept in memory only
/// (a write per connection cost sled a page version per device); it is
/// written when the device goes offline, and at a clean stop for the
/// devices still online. A crash loses only that: "last seen" is then
/// older.
#[test]
fn last_seen_on_connect_is_written_at_a_clean_stop_not_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = {
        let mut r = Rig::open(dir.path());
        let invite = r.s.accounts().create_invite(2, None).unwrap();
        let alice = r.s.accounts().register(&invite, "alice", &[1; 32], 5).unwrap().unwrap();
        let bob = r.s.accounts().register(&invite, "bob", &[2; 32], 5).unwrap().unwrap();
        for (device, now_ms, persist) in [(alice, 70, false), (bob, 80, false), (bob, 90, true)] {
            r.s.submit(
                Op::Touch {
                    device,
                    now_ms,
                    persist,
                },
                None,
            );
        }
        r.step(true);
        assert_eq!(r.s.device_infos(alice.user)[0].last_seen_ms, 70, "in memory at once");
        // A crash: alice's connect time was never written.
        let r = r.reopen();
        assert_eq!(r.s.device_infos(alice.user)[0].last_seen_ms, 5);
        assert_eq!(r.s.device_infos(bob.user)[0].last_seen_ms, 90);
        (alice, bob)
    };
    // Running, then stopped cleanly while alice is online.
    let s = open(dir.path());
    let threads = s.start().unwrap();
    s.submit(
        Op::Touch {
            device: alice,
            now_ms: 100,
            persist: false,
        },
        None,
    );
    s.stop(threads);
    drop(s);
    let s = open(dir.path());
    assert!(s.device_infos(alice.user)[0].last_seen_ms > 100, "the time it stopped");
    assert_eq!(s.device_infos(bob.user)[0].last_seen_ms, 90);
}

#[test]
fn register_link_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let invite = a.create_invite(2, None).unwrap();
    assert_eq!(
        a.register(&invite, "Bad Name", &[1; 32], 0).unwrap(),
        Err(RegisterError::InvalidName)
    );
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    assert_eq!(alice, dev(1, 1));
    assert_eq!(
        a.register(&invite, "alice", &[2; 32], 0).unwrap(),
        Err(RegisterError::NameTaken)
    );
    let mut wrong = invite.clone();
    wrong.secret[0] ^= 1;
    assert_eq!(
        a.register(&wrong, "bob", &[2; 32], 0).unwrap(),
        Err(RegisterError::InvalidInvite)
    );
    assert_eq!(
        a.register(&wrong, "alice", &[2; 32], 0).unwrap(),
        Err(RegisterError::InvalidInvite)
    );
    let bob = a.register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    assert_eq!(bob, dev(2, 1));
    // Used up.
    assert_eq!(
        a.register(&invite, "carol", &[3; 32], 0).unwrap(),
        Err(RegisterError::InvalidInvite)
    );
    // Expired.
    let old = a.create_invite(1, Some(100)).unwrap();
    assert_eq!(
        a.register(&old, "carol", &[3; 32], 100).unwrap(),
        Err(RegisterError::InvalidInvite)
    );

    let link = link_code(a, alice, 1000);
    let alice2 = a.redeem_link(&link, &[4; 32], 10).unwrap().unwrap();
    assert_eq!(alice2, dev(1, 2));
    assert_eq!(a.redeem_link(&link, &[5; 32], 10).unwrap(), Err(LinkError::InvalidCode));
    let late = link_code(a, alice, 1000);
    assert_eq!(
        a.redeem_link(&late, &[5; 32], 1000).unwrap(),
        Err(LinkError::InvalidCode)
    );

    assert_eq!(a.identify(&[4; 32]), Identity::Device(alice2));
    assert_eq!(a.identify(&[9; 32]), Identity::Unregistered);
    assert!(a.revoke(alice2, 20).unwrap());
    assert!(!a.revoke(alice2, 20).unwrap());
    assert_eq!(a.identify(&[4; 32]), Identity::Revoked);
    let mut devs = Vec::new();
    assert!(a.current_devices(alice.user, &mut devs));
    assert_eq!(devs, vec![DeviceId(1)]);
    assert!(!a.is_current(alice2));

    // All of it survives a reopen.
    s.flush().unwrap();
    drop(s);
    let s = open(dir.path());
    let a = s.accounts();
    assert_eq!(a.user_id("bob"), Some(bob.user));
    assert_eq!(a.identify(&[4; 32]), Identity::Revoked);
    assert_eq!(a.identify(&[1; 32]), Identity::Device(alice));
    // Device numbers are not reused.
    let link = link_code(a, alice, 1000);
    assert_eq!(a.redeem_link(&link, &[6; 32], 10).unwrap(), Ok(dev(1, 3)));
    assert_eq!(
        a.users().iter().map(|u| (&*u.0, u.2)).collect::<Vec<_>>(),
        vec![("alice", 2), ("bob", 1)]
    );
}

/// The same through the store thread: every answer waits for the flush
/// that made it durable; a revocation takes the device's queue (memory,
/// sled, the spill log: its mark moves past it all) and its keys with it,
/// and nothing of the queue comes back after a reopen.
#[test]
fn accounts_through_the_store_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let Outcome::Token(invite, None) = r.call(Op::Invite {
        uses: 2,
        expires_ms: None,
    }) else {
        panic!("no invite")
    };
    let w = r.waiter();
    r.s.submit(
        Op::Register {
            invite: invite.clone(),
            name: "alice".into(),
            key: [1; 32],
            now_ms: 0,
        },
        Some(w.clone()),
    );
    r.step(false);
    assert_eq!(r.outcomes(w.token), vec![], "answered before it was durable");
    r.step(true);
    assert_eq!(r.outcomes(w.token), vec![Outcome::Registered(Ok(dev(1, 1)))]);
    let alice = dev(1, 1);
    let Outcome::Registered(Ok(bob)) = r.call(Op::Register {
        invite,
        name: "bob".into(),
        key: [2; 32],
        now_ms: 0,
    }) else {
        panic!("bob")
    };
    let Outcome::LinkCode(Ok((code, 1000))) = r.call(Op::RequestLink {
        device: bob,
        now_ms: 0,
        ttl: Duration::from_secs(1),
    }) else {
        panic!("no link code")
    };
    let Outcome::Linked(Ok(phone)) = r.call(Op::RedeemLink {
        code: code.clone(),
        key: [3; 32],
        now_ms: 1,
    }) else {
        panic!("not linked")
    };
    assert_eq!(phone, dev(2, 2));
    assert_eq!(
        r.call(Op::RedeemLink {
            code,
            key: [4; 32],
            now_ms: 1,
        }),
        Outcome::Linked(Err(LinkError::InvalidCode))
    );
    assert_eq!(
        r.call(Op::Publish {
            device: phone,
            keys: Box::new(signed_keys(3, 1)),
        }),
        Outcome::Published(Ok(1))
    );
    assert_eq!(r.s.one_time_keys(phone), Some(1));
    // The phone's queue: one message spilled, one waiting in memory, a
    // receipt; the spilled message went to bob's first device too.
    r.send(
        alice,
        id(1),
        bob.user,
        &[(phone, b"spilled", false), (bob, b"x", false)],
    );
    r.step(true);
    r.send(alice, id(2), bob.user, &[(phone, b"waiting", true)]);
    r.receipt(alice, bob.user, ReceiptKind::READ, &[id(9)], &[phone]);
    assert_eq!(r.queue(phone).len(), 3);
    r.s.ack(bob, u64::MAX);
    r.step(true);
    assert_eq!(spilled_at(&r.s), vec![(phone, 1)], "bob's copy went, the phone's stays");
    assert_eq!(
        r.call(Op::Revoke {
            device: phone,
            now_ms: 5
        }),
        Outcome::Revoked(true)
    );
    assert_eq!(r.s.identify(&[3; 32]), Identity::Revoked);
    assert!(!r.s.is_current(phone));
    assert_eq!(r.queue(phone), vec![]);
    assert_eq!(r.s.queue_usage(phone), (0, 0));
    assert_eq!(r.s.memory_held().0, 0);
    assert_eq!(r.s.one_time_keys(phone), None);
    assert_eq!(
        r.call(Op::Claim {
            devices: vec![phone],
            over_rate: vec![],
        }),
        Outcome::Claimed(vec![], vec![])
    );
    assert!(records(&r.s, disk::QUEUE).is_empty());
    assert!(records(&r.s, disk::FOLD).is_empty());
    assert_eq!(spilled(&r.s), vec![], "the phone's copy left the spill log");
    assert!(mark(&r.s, phone) >= Some(1), "its mark covers its spilled copy");
    assert_eq!(
        r.call(Op::Revoke {
            device: phone,
            now_ms: 6
        }),
        Outcome::Revoked(false)
    );
    r.past_deadline();
    r.step(true);
    assert!(records(&r.s, disk::QUEUE).is_empty());
    check_totals(&r.s);
    let mut r = r.reopen();
    assert_eq!(r.s.identify(&[3; 32]), Identity::Revoked);
    assert_eq!(r.deliver(phone, 0), vec![]);
    assert_eq!(r.s.queue_usage(phone), (0, 0));
    assert_eq!(spilled(&r.s), vec![]);
}

/// Registers alice (1, 1) and bob (2, 1), and links bob's phone (2, 2).
fn alice_bob_and_phone(r: &Rig) -> (DeviceKey, DeviceKey, DeviceKey) {
    let a = r.s.accounts();
    let invite = a.create_invite(2, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let bob = a.register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    let phone = a.redeem_link(&link_code(a, bob, 1000), &[3; 32], 0).unwrap().unwrap();
    (alice, bob, phone)
}

/// A revoked device's spilled copies do not come back after a reopen,
/// also one that was retracted: its removal record goes with the queue,
/// so the mark must cover it, whatever the device acknowledged.
#[test]
fn a_revoked_device_s_retracted_copy_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (alice, _, phone) = alice_bob_and_phone(&r);
    for i in 1..=3u8 {
        r.send(alice, id(i), phone.user, &[(phone, &[i], false)]);
    }
    r.step(true);
    r.s.ack(phone, 1);
    r.step(true);
    assert_eq!(mark(&r.s, phone), Some(1));
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: alice.user,
            senders: vec![alice],
            id: id(3),
            now_ms,
        }),
        Outcome::Retracted(1)
    );
    assert_eq!(records(&r.s, disk::REMOVED).len(), 1);
    assert_eq!(r.call(Op::Revoke { device: phone, now_ms }), Outcome::Revoked(true));
    assert_eq!(spilled(&r.s), vec![]);
    r.past_deadline();
    r.step(true);
    let r = r.reopen();
    assert_eq!(r.queue(phone), vec![], "a revoked device's queue came back");
    assert_eq!(r.s.queue_usage(phone), (0, 0));
    assert_eq!(spilled(&r.s), vec![]);
}

#[test]
fn device_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let alice = a.register(&invite, "alice", &[0; 32], 0).unwrap().unwrap();
    let ttl = Duration::from_secs(600);
    for i in 1..MAX_DEVICES_PER_USER - 1 {
        let link = link_code(a, alice, 1000);
        assert!(a.redeem_link(&link, &[i as u8; 32], 0).unwrap().is_ok());
    }
    // Seven devices: two codes may be outstanding, only one redeems.
    let last = a.request_link(alice, 1, ttl).unwrap().unwrap().0;
    let extra = a.request_link(alice, 1, ttl).unwrap().unwrap().0;
    assert!(a.redeem_link(&last, &[50; 32], 2).unwrap().is_ok());
    assert_eq!(
        a.redeem_link(&extra, &[99; 32], 2).unwrap(),
        Err(LinkError::DeviceLimit)
    );
    // At the limit no code is handed out.
    assert_eq!(
        a.request_link(alice, 3, ttl).unwrap(),
        Err(LinkRequestError::DeviceLimit)
    );
}

/// Issue 14: a link code belongs to the device that asked for it and dies
/// with it, across a reopen too; other devices' codes live on.
#[test]
fn link_codes_die_with_the_device_that_asked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let phone = a.redeem_link(&link_code(a, alice, 1000), &[2; 32], 0).unwrap().unwrap();
    let from_phone = link_code(a, phone, 1000);
    let from_phone2 = link_code(a, phone, 1000);
    let from_alice = link_code(a, alice, 1000);
    assert_eq!(a.outstanding_links(alice.user, 0), 3);
    assert!(a.revoke(phone, 5).unwrap());
    assert_eq!(a.outstanding_links(alice.user, 5), 1);
    assert_eq!(
        a.redeem_link(&from_phone, &[3; 32], 6).unwrap(),
        Err(LinkError::InvalidCode)
    );
    assert_eq!(
        a.request_link(phone, 6, Duration::from_secs(600)).unwrap(),
        Err(LinkRequestError::Revoked)
    );
    s.flush().unwrap();
    drop(s);
    let s = open(dir.path());
    let a = s.accounts();
    assert_eq!(a.outstanding_links(alice.user, 7), 1);
    assert_eq!(
        a.redeem_link(&from_phone2, &[3; 32], 7).unwrap(),
        Err(LinkError::InvalidCode)
    );
    assert_eq!(a.redeem_link(&from_alice, &[3; 32], 7).unwrap(), Ok(dev(1, 3)));
    assert_eq!(a.outstanding_links(alice.user, 7), 0);
}

/// At most `MAX_LINK_CODES` outstanding per user (all devices together);
/// used and expired ones make room.
#[test]
fn outstanding_link_codes_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let ttl = Duration::from_millis(100);
    let first = a.request_link(alice, 0, ttl).unwrap().unwrap().0;
    let phone = a.redeem_link(&first, &[2; 32], 0).unwrap().unwrap();
    let mut codes = Vec::new();
    for i in 0..MAX_LINK_CODES {
        let by = if i % 2 == 0 { alice } else { phone };
        codes.push(a.request_link(by, 10, ttl).unwrap().unwrap().0);
    }
    for by in [alice, phone] {
        assert_eq!(a.request_link(by, 10, ttl).unwrap(), Err(LinkRequestError::Outstanding));
    }
    // One used: room for one.
    a.redeem_link(&codes[0], &[3; 32], 20).unwrap().unwrap();
    a.request_link(alice, 20, ttl).unwrap().unwrap();
    assert_eq!(
        a.request_link(alice, 20, ttl).unwrap(),
        Err(LinkRequestError::Outstanding)
    );
    // Expired ones do not count.
    a.request_link(alice, 110, ttl).unwrap().unwrap();
}

/// The allowance: `LINK_REQUESTS_BURST` at once, then one per
/// `LINK_REQUEST_REFILL`; refusals use none of it.
#[test]
fn link_requests_are_rate_limited_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let ttl = Duration::from_millis(1);
    let mut t = 0;
    for _ in 0..LINK_REQUESTS_BURST {
        t += 2;
        a.request_link(alice, t, ttl).unwrap().unwrap();
    }
    t += 2;
    assert_eq!(
        a.request_link(alice, t, ttl).unwrap(),
        Err(LinkRequestError::RateLimited)
    );
    let refill = LINK_REQUEST_REFILL.as_millis() as u64;
    t += refill - 100;
    assert_eq!(
        a.request_link(alice, t, ttl).unwrap(),
        Err(LinkRequestError::RateLimited)
    );
    t += 100;
    a.request_link(alice, t, ttl).unwrap().unwrap();
    t += 2;
    assert_eq!(
        a.request_link(alice, t, ttl).unwrap(),
        Err(LinkRequestError::RateLimited)
    );
    // A clock stepping back refills nothing.
    assert_eq!(
        a.request_link(alice, 0, ttl).unwrap(),
        Err(LinkRequestError::RateLimited)
    );
}

/// The sweeper's part: expired link codes and invites are removed from
/// the database, valid ones stay; the store thread's sweep does it once a
/// pass.
#[test]
fn expired_codes_and_invites_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.accounts();
    let forever = a.create_invite(5, None).unwrap();
    let _short = a.create_invite(1, Some(100)).unwrap();
    let _later = a.create_invite(1, Some(10_000)).unwrap();
    let alice = a.register(&forever, "alice", &[1; 32], 0).unwrap().unwrap();
    let _old = link_code(a, alice, 100);
    let young = link_code(a, alice, 10_000);
    assert_eq!(a.stored_codes(), (3, 2));
    assert_eq!(a.sweep_codes(50).unwrap(), (0, 0));
    assert_eq!(a.sweep_codes(100).unwrap(), (1, 1));
    assert_eq!(a.stored_codes(), (2, 1));
    assert_eq!(a.outstanding_links(alice.user, 100), 1);
    assert_eq!(a.redeem_link(&young, &[2; 32], 200).unwrap(), Ok(dev(1, 2)));
    drop(s);
    // The rest through the store thread's sweep.
    let mut r = Rig::open(dir.path());
    r.s.accounts().create_invite(1, Some(T0_MS - 1)).unwrap();
    assert_eq!(r.s.accounts().stored_codes(), (3, 0));
    r.sweep(0, 100);
    assert_eq!(r.s.accounts().stored_codes(), (1, 0));
    r.s.accounts()
        .register(&forever, "bob", &[3; 32], 20_000)
        .unwrap()
        .unwrap();
}

/// Link codes of the version before they were bound to a device are not
/// trusted: they are dropped when the store opens.
#[test]
fn old_unbound_link_codes_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let old = s.db.open_tree("links").unwrap();
        old.insert([1u8; 8], &b"an old code"[..]).unwrap();
        s.flush().unwrap();
    }
    let s = open(dir.path());
    assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"links"));
}

// ---- the store path ----

#[test]
fn append_read_ack_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a1, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let bodies: [(DeviceKey, &[u8], bool); 2] = [(b1, b"for b1", false), (b2, b"for b2", false)];
    let t1 = r.now_ms();
    let (first, got) = r.send(a1, id(1), UserId(2), &bodies);
    assert_eq!(got, Appended::Queued { time_ms: t1 });
    // A retry while the first is being made safe waits for it.
    r.advance(Duration::from_millis(5));
    let (again, got) = r.send(a1, id(1), UserId(2), &bodies);
    assert_eq!(got, Appended::Waiting);
    let (recalled, got) = r.recall(a1, id(1));
    assert_eq!(got, Some(Appended::Waiting));
    // Not settled before the flush.
    r.step(false);
    assert_eq!(r.settled(first), None);
    r.step(true);
    for t in [first, again, recalled] {
        assert_eq!(r.settled(t), Some(t1), "waiter {t}");
    }
    // Once settled, a retry is answered at once with the first time.
    r.advance(Duration::from_millis(5));
    let (_, got) = r.send(a1, id(1), UserId(2), &bodies);
    assert_eq!(got, Appended::Duplicate { time_ms: t1 });
    assert_eq!(r.recall(a1, id(1)).1, Some(Appended::Duplicate { time_ms: t1 }));
    assert_eq!(r.recall(a1, id(7)).1, None);
    let t3 = r.now_ms();
    r.send(a1, id(2), UserId(2), &bodies[..1]);
    r.step(true);
    let out = r.deliver(b1, 0);
    assert_eq!(
        out.iter().map(|(seq, m)| (*seq, msg(m).id)).collect::<Vec<_>>(),
        vec![(1, id(1)), (2, id(2))]
    );
    assert_eq!(out, r.queue(b1));
    let m = msg(&out[0].1);
    assert_eq!(
        (m.body.as_ref(), m.from(), m.to_user, m.time_ms),
        (&b"for b1"[..], a1, 2, t1)
    );
    assert_eq!(msg(&out[1].1).time_ms, t3);
    assert_eq!(r.s.last_seq(b1), 2);
    assert_eq!(r.s.last_seq(b2), 1);
    r.s.ack(b1, 1);
    // Delivery goes on from past the ack; the record goes in the next turn.
    assert_eq!(r.deliver(b1, 2).len(), 1);
    assert_eq!(r.queue(b1).len(), 1, "an acked entry is not read back");
    r.step(true);
    let out = r.queue(b1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 2);
    assert_eq!(r.s.queue_usage(b1), (1, Entry::stored_len(&out[0].1)));
    check_totals(&r.s);
    // Sequence numbers survive an emptied queue and a reopen (the mark is
    // written at most once a second: a crash before would deliver 2
    // again).
    r.s.ack(b1, 2);
    r.step(true);
    r.advance(Duration::from_secs(1));
    r.step(true);
    let mut r = r.reopen();
    assert!(r.s.last_seq(b1) >= 2);
    r.send(a1, id(3), UserId(2), &bodies[..1]);
    r.step(true);
    let out = r.queue(b1);
    assert_eq!(out.len(), 1);
    assert!(out[0].0 > 2);
}

/// The flusher and the store thread, running: an append settles, and an
/// operation answers through `Store::call`.
#[test]
fn the_threads_settle_appends_and_answer_calls() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let threads = s.start().unwrap();
    assert!(s.start().is_err(), "started twice");
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let sink = Sink::new(move || {
        let _ = tx.lock().unwrap().send(());
    });
    let w = Waiter {
        sink: sink.clone(),
        token: 7,
    };
    let now = Instant::now();
    let m = NewMessage {
        sender: dev(1, 1),
        id: id(1),
        to: UserId(2),
        copies: vec![(dev(2, 1), Bytes::from_static(b"x"), false)],
        now_ms: 1,
        mono: now,
    };
    assert_eq!(s.append(m, &w), Appended::Queued { time_ms: 1 });
    let mut got = Vec::new();
    while got.is_empty() {
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        sink.take(&mut got);
    }
    assert_eq!(
        got,
        vec![Completion {
            token: 7,
            outcome: Outcome::Settled { time_ms: 1 }
        }]
    );
    assert!(s.flusher().flushes() >= 1);
    assert_eq!(s.call(Op::Sync), Outcome::Synced);
    // A copy for an online device waits for its ack; stopping writes it.
    let m = NewMessage {
        sender: dev(1, 1),
        id: id(2),
        to: UserId(2),
        copies: vec![(dev(2, 1), Bytes::from_static(b"y"), true)],
        now_ms: 2,
        mono: Instant::now(),
    };
    assert_eq!(s.append(m, &w), Appended::Queued { time_ms: 2 });
    s.write_all();
    s.stop(threads);
    assert!(!s.failed());
    drop(s);
    let s = open(dir.path());
    let mut out = Vec::new();
    s.read_queue(dev(2, 1), 0, 10, &mut out).unwrap();
    assert_eq!(out.len(), 2, "{out:?}");
}

/// A clean stop writes every mark that moved, also one that waits for
/// its second: after a restart nothing acknowledged is delivered again.
#[test]
fn a_clean_stop_writes_the_marks_that_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    {
        let s = open(dir.path());
        let threads = s.start().unwrap();
        let w = Waiter {
            sink: Sink::new(|| {}),
            token: 1,
        };
        for i in 1..=3u8 {
            let m = NewMessage {
                sender: a,
                id: id(i),
                to: UserId(2),
                copies: vec![(b, Bytes::from_static(b"x"), false)],
                now_ms: 1,
                mono: Instant::now(),
            };
            assert!(matches!(s.append(m, &w), Appended::Queued { .. }));
        }
        assert_eq!(s.call(Op::Sync), Outcome::Synced);
        s.ack(b, 1);
        assert_eq!(s.call(Op::Sync), Outcome::Synced);
        assert_eq!(mark(&s, b), Some(1));
        // Within the second: this mark waits.
        s.ack(b, 3);
        s.stop(threads);
        assert!(!s.failed());
    }
    let s = open(dir.path());
    let mut out = Vec::new();
    s.read_queue(b, 0, 10, &mut out).unwrap();
    assert_eq!(out, vec![], "acknowledged before the stop, delivered again");
    assert_eq!(mark(&s, b), Some(3));
}

#[test]
fn concurrent_claims_never_hand_out_a_key_twice() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(dir.path()));
    let threads = s.start().unwrap();
    let bob = dev(2, 1);
    assert_eq!(
        s.call(Op::Publish {
            device: bob,
            keys: Box::new(signed_keys(2, MAX_ONE_TIME_KEYS as u8)),
        }),
        Outcome::Published(Ok(100))
    );
    let claimers: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                (0..20)
                    .map(|_| {
                        match s.call(Op::Claim {
                            devices: vec![bob],
                            over_rate: vec![],
                        }) {
                            Outcome::Claimed(mut k, _) if k.len() == 1 => k.remove(0),
                            other => panic!("{other:?}"),
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let claims: Vec<_> = claimers.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let mut one_time: Vec<[u8; 32]> = claims
        .iter()
        .filter(|c| !c.fallback)
        .map(|c| c.one_time.unwrap().key)
        .collect();
    assert_eq!(one_time.len(), 100, "every key handed out");
    one_time.sort();
    one_time.dedup();
    assert_eq!(one_time.len(), 100, "none twice");
    assert!(
        claims
            .iter()
            .filter(|c| c.fallback)
            .all(|c| c.one_time.unwrap().key == [0xff; 32])
    );
    assert_eq!(s.one_time_keys(bob), Some(0));
    s.stop(threads);
    assert_eq!(keys::one_time_count(&s.db.open_tree("e2e").unwrap(), bob).unwrap(), 0);
}

/// Issue 14: a device over its hand-out rate gives its fallback key and
/// keeps its one-time keys.
#[test]
fn a_claim_over_the_rate_gets_the_fallback_key_and_takes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let bob = dev(2, 1);
    assert_eq!(
        r.call(Op::Publish {
            device: bob,
            keys: Box::new(signed_keys(2, 5)),
        }),
        Outcome::Published(Ok(5))
    );
    let Outcome::Claimed(k, counts) = r.call(Op::Claim {
        devices: vec![bob],
        over_rate: vec![bob],
    }) else {
        panic!()
    };
    assert!(k[0].fallback && k[0].one_time.unwrap().key == [0xff; 32]);
    assert_eq!(counts, vec![], "no one-time key went");
    assert_eq!(r.s.one_time_keys(bob), Some(5));
    let Outcome::Claimed(k, counts) = r.call(Op::Claim {
        devices: vec![bob],
        over_rate: vec![],
    }) else {
        panic!()
    };
    assert!(!k[0].fallback);
    assert_eq!(counts, vec![(bob, 4)]);
}

/// Issue 9: a copy its device acknowledges before its deadline is never
/// written; the message settles at the ack.
#[test]
fn a_copy_acked_before_its_deadline_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    let mut tokens = Vec::new();
    for i in 0..10u8 {
        let (t, got) = r.send(a, id(i), UserId(2), &[(b, &[i; 100], true)]);
        assert!(matches!(got, Appended::Queued { .. }));
        tokens.push((t, r.now_ms()));
        r.advance(Duration::from_millis(1));
    }
    // Delivered from memory at once.
    let out = r.deliver(b, 0);
    assert_eq!(out.len(), 10);
    assert!(r.s.memory_held().0 > 0);
    // Turns before the deadline write nothing.
    r.step(true);
    r.step(true);
    assert_eq!(spilled(&r.s), vec![]);
    assert_eq!(r.s.spill_bytes(), 0, "not a byte in the spill log");
    for (t, _) in &tokens {
        assert_eq!(r.settled(*t), None, "settled while neither acked nor durable");
    }
    r.s.ack(b, out[9].0);
    for (t, time) in &tokens {
        assert_eq!(r.settled(*t), Some(*time));
    }
    // Past the deadline: still nothing written, nothing counted.
    r.past_deadline();
    r.step(true);
    assert_eq!(spilled(&r.s), vec![]);
    assert_eq!(segments(&r.s), Vec::<u32>::new());
    assert!(
        records(&r.s, disk::MARK).is_empty(),
        "no mark for what was never written"
    );
    assert_eq!(r.s.queued_bytes(), 0);
    assert_eq!(r.s.queue_usage(b), (0, 0));
    assert_eq!(r.s.memory_held(), (0, 0));
    assert_eq!(r.deliver(b, 0), vec![]);
    // And a retry is still known.
    assert_eq!(
        r.send(a, id(3), UserId(2), &[(b, b"again", true)]).1,
        Appended::Duplicate { time_ms: tokens[3].1 }
    );
}

/// A copy for an offline device is written at once (the next turn) to the
/// spill log, whole, and survives a reopen; a copy for an online one is
/// written once its deadline passes. Nothing of them goes to sled.
#[test]
fn copies_spill_when_offline_or_late_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let t1 = r.now_ms();
    let (tok, _) = r.send(a, id(1), UserId(2), &[(b1, b"off", false), (b2, b"on", true)]);
    r.step(true);
    assert_eq!(spilled_at(&r.s), vec![(b1, 1)], "the offline copy");
    assert_eq!(r.settled(tok), None, "b2's copy is neither acked nor durable");
    r.advance(Duration::from_millis(10));
    r.step(true);
    assert_eq!(spilled_at(&r.s), vec![(b1, 1)], "before b2's deadline");
    r.past_deadline();
    r.step(true);
    assert_eq!(spilled_at(&r.s), vec![(b1, 1), (b2, 1)]);
    assert!(records(&r.s, disk::QUEUE).is_empty(), "no copy in sled");
    assert_eq!(r.settled(tok), Some(t1));
    check_totals(&r.s);
    let before = (r.queue(b1), r.queue(b2));
    let mut r = r.reopen();
    assert_eq!((r.queue(b1), r.queue(b2)), before);
    // After a reopen the hub reads them from disk through the store thread.
    assert_eq!(r.s.read(b1, 0, 10, &mut Vec::new()), Read::OnDisk);
    assert_eq!(r.deliver(b1, 0), before.0);
    assert_eq!(r.deliver(b2, 0), before.1);
    let m = msg(&before.0[0].1);
    assert_eq!(
        (m.body.as_ref(), m.to_user, m.time_ms, m.from()),
        (&b"off"[..], 2, t1, a)
    );
    check_totals(&r.s);
}

/// Copies wait in memory up to `write_memory` bytes; past it the oldest
/// are written at once, whatever their deadline.
#[test]
fn copies_past_the_memory_bound_are_written_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        write_memory: 1000,
        ..StoreConfig::default()
    };
    let mut r = Rig::with(dir.path(), config);
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..4u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i; 300], true)]);
    }
    assert!(r.s.memory_held().0 > 1000);
    r.step(true);
    assert!(r.s.memory_held().0 <= 1000, "{:?}", r.s.memory_held());
    let written = spilled_at(&r.s);
    assert!(!written.is_empty());
    // The oldest first.
    assert_eq!(written[0], (b, 1));
    check_totals(&r.s);
}

/// Spec §10: `Accepted` (a settlement) only once every copy is acked or
/// durable; written but not yet flushed is not durable.
#[test]
fn a_message_settles_only_when_every_copy_is_acked_or_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2, b3) = (dev(1, 1), dev(2, 1), dev(2, 2), dev(2, 3));
    let t1 = r.now_ms();
    let (tok, _) = r.send(
        a,
        id(1),
        UserId(2),
        &[(b1, b"1", true), (b2, b"2", false), (b3, b"3", true)],
    );
    r.step(false);
    assert_eq!(spilled_at(&r.s), vec![(b2, 1)], "b2's copy is written");
    assert_eq!(r.settled(tok), None, "written is not durable");
    r.step(true);
    assert_eq!(r.settled(tok), None, "b1 and b3 wait");
    r.s.ack(b1, 1);
    assert_eq!(r.settled(tok), None, "b3 waits");
    r.past_deadline();
    r.step(false);
    assert_eq!(spilled_at(&r.s), vec![(b2, 1), (b3, 1)], "b3's copy is written");
    assert_eq!(r.settled(tok), None, "not flushed");
    // Acked while being written: safe too.
    r.s.ack(b3, 1);
    assert_eq!(r.settled(tok), Some(t1));
    r.step(true);
    assert_eq!(r.settled(tok), None, "settled once");
    // b1's copy was never written; b3's is gone (its mark moved); b2's
    // stays.
    assert_eq!(spilled_at(&r.s), vec![(b2, 1)]);
    assert_eq!(mark(&r.s, b3), Some(1));
    assert_eq!(mark(&r.s, b1), None, "nothing of b1 was written");
    check_totals(&r.s);
}

/// Spec §5.3: numbers given out are never given out again, even for
/// copies that were never written and are lost with a crash, because a
/// durable ceiling runs ahead of them.
#[test]
fn sequence_numbers_never_go_backwards_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    let ceiling = |s: &Store| be_u64(&s.meta.get(SEQ_CEILING).unwrap().expect("a ceiling")).expect("eight bytes");
    let mut given: BTreeMap<DeviceKey, Vec<u64>> = BTreeMap::new();
    for round in 0..4u8 {
        for i in 0..3u8 {
            // b online and never acked nor written: lost with the crash;
            // c offline: spilled.
            r.send(a, id(round * 10 + i), UserId(2), &[(b, b"x", true)]);
            given.entry(b).or_default().push(r.s.last_seq(b));
            r.send(a, id(round * 10 + i + 100), UserId(3), &[(c, b"y", false)]);
            given.entry(c).or_default().push(r.s.last_seq(c));
        }
        r.step(true);
        assert!(ceiling(&r.s) > r.s.last_seq(b).max(r.s.last_seq(c)));
        r = r.reopen();
        assert_eq!(r.queue(b), vec![], "never settled, never written: lost");
        assert_eq!(r.queue(c).len(), 3 * (round as usize + 1));
        for (d, seqs) in &given {
            assert!(r.s.last_seq(*d) >= *seqs.last().unwrap(), "{d} went back");
        }
    }
    for seqs in given.values() {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
    // A device never seen starts above every number given out too.
    assert!(r.s.last_seq(dev(9, 9)) >= *given[&b].last().unwrap());
}

/// The ceiling is raised, durably, before numbers reach it; an append
/// that would pass the durable ceiling is refused, not numbered.
#[test]
fn the_sequence_ceiling_is_raised_before_it_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let stored = |s: &Store| be_u64(&s.meta.get(SEQ_CEILING).unwrap().unwrap()).unwrap();
    let first = stored(&r.s);
    assert_eq!(r.s.live.lock().ceiling, first);
    // As if numbers had come close to the ceiling.
    r.s.live.lock().max_next = first - 10;
    r.step(false);
    assert_eq!(stored(&r.s), first + engine::CEILING_STEP, "written");
    assert_eq!(r.s.live.lock().ceiling, first, "not used before it is durable");
    r.step(true);
    assert_eq!(r.s.live.lock().ceiling, first + engine::CEILING_STEP);
    // Once: the new ceiling is far enough ahead.
    r.step(true);
    assert_eq!(stored(&r.s), first + engine::CEILING_STEP);
}

/// Spec §10 (*Retries*): the newest messages with a copy in the spill log
/// are restored at open. A retry of one whose every target still has its
/// copy queued (or acknowledged it since) is a duplicate: answered at once
/// with the original time, queueing nothing, whether its devices are
/// online or not.
#[test]
fn a_retry_of_a_spilled_message_after_a_reopen_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let t1 = r.now_ms();
    r.send(a, id(1), UserId(2), &[(b1, b"one", false), (b2, b"one", false)]);
    r.advance(Duration::from_millis(3));
    let t2 = r.now_ms();
    r.send(a, id(2), UserId(2), &[(b1, b"two", false)]);
    r.step(true);
    let before = (r.queue(b1), r.queue(b2));
    let bytes = r.s.queued_bytes();
    let mut r = r.reopen();
    r.advance(Duration::from_secs(1));
    let both: [(DeviceKey, &[u8], bool); 2] = [(b1, b"one", false), (b2, b"one", false)];
    assert_eq!(
        r.send(a, id(1), UserId(2), &both).1,
        Appended::Duplicate { time_ms: t1 }
    );
    assert_eq!(
        r.send(a, id(2), UserId(2), &[(b1, b"two", true)]).1,
        Appended::Duplicate { time_ms: t2 }
    );
    assert_eq!(
        r.send(a, id(1), UserId(2), &[(b2, b"one", true)]).1,
        Appended::Duplicate { time_ms: t1 }
    );
    r.past_deadline();
    r.step(true);
    assert_eq!((r.queue(b1), r.queue(b2)), before);
    assert_eq!(r.s.queued_bytes(), bytes);
    assert_eq!(r.s.memory_held().0, 0);
    check_totals(&r.s);
    // A device that acknowledged its copy since has it.
    r.s.ack(b2, u64::MAX);
    r.step(true);
    assert_eq!(
        r.send(a, id(1), UserId(2), &both).1,
        Appended::Duplicate { time_ms: t1 }
    );
    assert_eq!(r.queue(b2), vec![]);
    // The same id from another device is another message.
    assert!(matches!(
        r.send(dev(1, 2), id(1), UserId(2), &both).1,
        Appended::Queued { .. }
    ));
}

/// A message for two devices: one copy spilled, the other waited in
/// memory and was lost with a crash, so the sender was never answered and
/// sends it again. The retry's copy for the device whose copy is queued
/// goes; the other's is queued with the original time, and the retry
/// settles with it. The store cannot tell a lost copy from a delivered
/// one, nor a device the first send did not name from one it did: each
/// gets the retry's copy (a client drops an id it already has).
#[test]
fn a_retry_after_a_crash_reaches_the_device_whose_copy_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2, b3) = (dev(1, 1), dev(2, 1), dev(2, 2), dev(2, 3));
    let t1 = r.now_ms();
    let (tok, _) = r.send(a, id(1), UserId(2), &[(b1, b"one", false), (b2, b"two", true)]);
    r.step(true);
    assert_eq!(r.settled(tok), None);
    let mut r = r.reopen();
    assert_eq!(r.queue(b2), vec![], "lost unwritten");
    r.advance(Duration::from_secs(1));
    let copies: [(DeviceKey, &[u8], bool); 3] = [(b1, b"one", false), (b2, b"two", false), (b3, b"three", false)];
    let (retry, got) = r.send(a, id(1), UserId(2), &copies);
    assert_eq!(got, Appended::Queued { time_ms: t1 });
    // Known from now on as any message: a second retry waits for it.
    let (again, got) = r.send(a, id(1), UserId(2), &copies[..2]);
    assert_eq!(got, Appended::Waiting);
    r.step(true);
    assert_eq!(r.settled(retry), Some(t1));
    assert_eq!(r.settled(again), Some(t1));
    assert_eq!(r.queue(b1).len(), 1, "b1 has the first copy, once");
    let got = r.deliver(b2, 0);
    assert_eq!(got.len(), 1);
    let m = msg(&got[0].1);
    assert_eq!((m.body.as_ref(), m.time_ms, m.to_user), (&b"two"[..], t1, 2));
    assert_eq!(r.deliver(b3, 0).len(), 1);
    check_totals(&r.s);
    // The same from disk; a retry now finds every copy queued.
    let mut r = r.reopen();
    assert_eq!(r.deliver(b2, 0), got);
    assert_eq!(
        r.send(a, id(1), UserId(2), &copies).1,
        Appended::Duplicate { time_ms: t1 }
    );
}

/// A retracted message whose acknowledged copy comes back after a crash
/// (its device's mark was not yet written) is restored at open with that
/// copy; a retry of it is still answered as retracted, not queued for the
/// devices whose copies the retraction removed (spec §5.5).
#[test]
fn a_retry_after_a_crash_does_not_bring_back_a_retracted_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    r.send(a, id(1), UserId(2), &[(b1, b"w", false)]);
    r.step(true);
    r.s.ack(b1, 1);
    r.step(true);
    assert_eq!(mark(&r.s, b1), Some(1));
    let t = r.now_ms();
    let copies: [(DeviceKey, &[u8], bool); 2] = [(b1, b"x", false), (b2, b"x", false)];
    r.send(a, id(2), UserId(2), &copies);
    r.step(true);
    r.advance(Duration::from_millis(10));
    r.s.ack(b1, 2);
    r.step(true);
    assert_eq!(mark(&r.s, b1), Some(1), "written at most once a second");
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: a.user,
            senders: vec![a],
            id: id(2),
            now_ms,
        }),
        Outcome::Retracted(1)
    );
    let mut r = r.reopen();
    assert_eq!(r.queue(b1).len(), 1, "b1's acknowledged copy is delivered again");
    assert_eq!(r.queue(b2), vec![]);
    assert_eq!(
        r.send(a, id(2), UserId(2), &copies).1,
        Appended::Duplicate { time_ms: t }
    );
    r.step(true);
    assert_eq!(r.queue(b2), vec![], "the retracted message came back");
}

/// At open the spill log is read and every copy comes back that no mark
/// (every copy of the device up to it is gone) and no removal (a
/// retracted copy) covers, with the same numbers, bodies and counts.
#[test]
fn spilled_copies_come_back_after_a_reopen_less_what_marks_and_removals_cover() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    for i in 1..=6u8 {
        r.send(a, id(i), UserId(2), &[(b1, &[i; 10], false), (b2, &[i; 20], false)]);
    }
    r.step(true);
    r.s.ack(b1, 2);
    r.s.ack(b2, 1);
    r.step(true);
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: a.user,
            senders: vec![a],
            id: id(4),
            now_ms,
        }),
        Outcome::Retracted(2)
    );
    assert_eq!(records(&r.s, disk::REMOVED).len(), 2);
    r.advance(Duration::from_secs(2));
    r.s.ack(b2, 5);
    r.step(true);
    // b2's mark covers its removal: the record went with the mark.
    assert_eq!((mark(&r.s, b1), mark(&r.s, b2)), (Some(2), Some(5)));
    assert_eq!(records(&r.s, disk::REMOVED).len(), 1);
    let before = (r.queue(b1), r.queue(b2));
    let seqs = |q: &[(u64, Entry)]| q.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    assert_eq!((seqs(&before.0), seqs(&before.1)), (vec![3, 5, 6], vec![6]));
    let usage = (r.s.queue_usage(b1), r.s.queue_usage(b2));
    let bytes = r.s.queued_bytes();
    let mut r = r.reopen();
    assert_eq!((r.deliver(b1, 0), r.deliver(b2, 0)), before);
    assert_eq!((r.s.queue_usage(b1), r.s.queue_usage(b2)), usage);
    assert_eq!(r.s.queued_bytes(), bytes);
    assert!(r.s.last_seq(b1) >= 6 && r.s.last_seq(b2) >= 6);
    check_totals(&r.s);
}

/// A device's mark (every copy up to it is gone) is written at most once
/// a second while its acks keep coming. A crash loses the acks since the
/// last mark written: those copies are delivered again (a client drops an
/// id it has), none is lost, and every copy past them is there. Once the
/// second is up the mark is written, and then they stay gone.
#[test]
fn copies_acked_since_the_last_mark_come_back_after_a_crash_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 1..=10u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i], false)]);
    }
    r.step(true);
    r.s.ack(b, 3);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(3), "a first mark is written at once");
    r.advance(Duration::from_millis(100));
    r.s.ack(b, 7);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(3), "written at most once a second");
    assert_eq!(spilled_at(&r.s), (8..=10).map(|s| (b, s)).collect::<Vec<_>>());
    assert_eq!(r.s.queue_usage(b).0, 3);
    let mut r = r.reopen();
    let q = r.deliver(b, 0);
    let seqs: Vec<u64> = q.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (4..=10).collect::<Vec<_>>(), "4 to 7 again, 8 to 10 kept");
    for (seq, e) in &q {
        assert_eq!(msg(e).body.as_ref(), &[*seq as u8]);
    }
    assert_eq!(r.s.queue_usage(b).0, 7);
    check_totals(&r.s);
    r.s.ack(b, 7);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(7));
    r.advance(Duration::from_millis(100));
    r.s.ack(b, 9);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(7));
    // The second is up: the next turn writes it, acks or not.
    r.advance(Duration::from_secs(1));
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(9));
    let mut r = r.reopen();
    assert_eq!(r.deliver(b, 0).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10]);
}

/// A retraction's removal record may go once the device's mark covers the
/// copy, and not before that mark is durable: were it deleted while the
/// mark that covers the copy was not yet written (at most once a second),
/// a crash would bring the retracted copy back (spec §5.5).
#[test]
fn a_retracted_copy_does_not_come_back_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 1..=3u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i], false)]);
    }
    r.step(true);
    r.s.ack(b, 1);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(1));
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: a.user,
            senders: vec![a],
            id: id(2),
            now_ms,
        }),
        Outcome::Retracted(1)
    );
    assert_eq!(records(&r.s, disk::REMOVED).len(), 1);
    r.advance(Duration::from_millis(10));
    r.s.ack(b, 3);
    r.step(true);
    assert_eq!(spilled(&r.s), vec![]);
    let mut r = r.reopen();
    let q = r.deliver(b, 0);
    assert!(
        q.iter().all(|(_, e)| msg(e).id != id(2)),
        "the retracted copy came back: {q:?}"
    );
    assert_eq!(q.len(), 1, "copy 3, acknowledged since the last mark");
    // Its removal goes with the mark that covers it.
    r.s.ack(b, 3);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(3));
    assert_eq!(records(&r.s, disk::REMOVED), vec![]);
    check_bytes(&r.s);
}

/// A crash in the middle of an append leaves a torn record at the end of
/// the last segment (records are synced before anything counts on them,
/// so that copy was never settled): the scan at open stops there and
/// loses that copy only; every copy before it comes back, counted
/// exactly, and numbers go on above it.
#[test]
fn a_torn_last_record_loses_only_that_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    // One batch each, so that copy 5 is the last record of the segment
    // (within a batch, copies for offline devices are written newest
    // first).
    for i in 1..=5u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i; 50], false)]);
        r.step(true);
    }
    let seg = *segments(&r.s).last().unwrap();
    let mut r = r.reopen_after(|dir| {
        let path = dir.join("spill").join(format!("{seg:010}.log"));
        let len = fs::metadata(&path).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
    });
    let q = r.deliver(b, 0);
    assert_eq!(q.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    for (seq, e) in &q {
        assert_eq!(msg(e).body.as_ref(), &[*seq as u8; 50]);
    }
    let bytes: u64 = q.iter().map(|(_, e)| e.stored_len()).sum();
    assert_eq!(r.s.queue_usage(b), (4, bytes));
    check_totals(&r.s);
    assert!(r.s.last_seq(b) >= 5, "the torn copy's number is not given out again");
    // New copies go to a new segment, after the old ones.
    r.send(a, id(6), UserId(2), &[(b, b"new", false)]);
    r.step(true);
    assert_eq!(segments(&r.s).len(), 2);
    let q = r.queue(b);
    assert_eq!(q.len(), 5);
    assert!(q[4].0 > 5);
    // Acked: the torn segment goes like any other.
    r.s.ack(b, u64::MAX);
    r.step(true);
    let r = r.reopen();
    assert_eq!(r.queue(b), vec![]);
    assert!(segments(&r.s).len() <= 1);
}

/// Durable entries beyond the memory cache are read from disk through
/// the store thread (`Read::OnDisk`, then `Op::ReadBacklog`), in order,
/// with nothing missing or repeated where disk and memory meet.
#[test]
fn a_long_backlog_is_read_from_disk_then_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..150u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i], false)]);
        if i % 40 == 0 {
            r.step(true);
        }
    }
    r.step(true);
    // And some still waiting in memory for an online device.
    for i in 150..155u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i], true)]);
    }
    assert!(r.s.live.lock().disk_hi(b) > 0, "the cache kept everything");
    assert_eq!(r.s.read(b, 1, 10, &mut Vec::new()), Read::OnDisk);
    let got = r.deliver(b, 0);
    assert_eq!(got.len(), 155);
    for (i, (seq, e)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(msg(e).body.as_ref(), &[i as u8]);
    }
    assert_eq!(got, r.queue(b));
    // From the middle too.
    assert_eq!(r.deliver(b, 77), got[76..].to_vec());
}

#[test]
fn receipts_fold_while_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (alice, bob) = (dev(1, 1), dev(2, 1));
    for i in 0..5u8 {
        assert_eq!(
            r.receipt(bob, UserId(1), ReceiptKind::DELIVERED, &[id(i)], &[alice]),
            Outcome::Receipt(Ok(vec![alice]))
        );
        r.advance(Duration::from_millis(1));
    }
    let last_delivered = r.now_ms() - 1;
    r.receipt(bob, UserId(1), ReceiptKind::READ, &[id(0)], &[alice]);
    let q = r.queue(alice);
    assert_eq!(q.len(), 2, "{q:?}");
    match &q[0].1 {
        Entry::Receipt(rc) => {
            assert_eq!(rc.kind, 1);
            assert_eq!(rc.ids.len(), 5);
            assert_eq!(rc.time_ms, last_delivered);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&q[1].1, Entry::Receipt(rc) if rc.kind == 2));
    assert_eq!(r.s.queue_usage(alice).0, 2);
    assert_eq!(records(&r.s, disk::QUEUE).len(), 2);
    // Once acknowledged, the next receipt starts a new entry.
    r.s.ack(alice, q[1].0);
    r.step(true);
    r.receipt(bob, UserId(1), ReceiptKind::DELIVERED, &[id(7)], &[alice]);
    let q = r.queue(alice);
    assert!(matches!(&q[..], [(_, Entry::Receipt(rc))] if rc.ids == vec![id(7)]));
    check_totals(&r.s);
    // Folding goes on across a reopen.
    let mut r = r.reopen();
    r.receipt(bob, UserId(1), ReceiptKind::DELIVERED, &[id(8)], &[alice]);
    let q2 = r.queue(alice);
    assert!(matches!(&q2[..], [(s, Entry::Receipt(rc))] if rc.ids == vec![id(7), id(8)] && *s > q[0].0));
}

#[test]
fn receipts_about_different_conversations_are_not_folded_together() {
    // Bob's device 1 reads a message of alice's, then one of carol's; his
    // device 2, offline, gets a copy of each receipt. Folding them into one
    // entry would tell it that carol's message belongs to the conversation
    // with alice (spec §5.5: receipts fold per reporting device, kind and
    // conversation).
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (bob1, bob2) = (dev(2, 1), dev(2, 2));
    let (alice, carol) = (UserId(1), UserId(3));
    let read = ReceiptKind::READ;
    r.receipt(bob1, alice, read, &[id(1)], &[bob2]);
    r.receipt(bob1, carol, read, &[id(3)], &[bob2]);
    r.receipt(bob1, alice, read, &[id(2)], &[bob2]);
    let q = r.queue(bob2);
    let receipts: Vec<(u32, Vec<MsgId>)> = q
        .iter()
        .map(|(_, e)| match e {
            Entry::Receipt(rc) => (rc.to_user, rc.ids.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(receipts, vec![(3, vec![id(3)]), (1, vec![id(1), id(2)])]);
    assert_eq!(r.s.queue_usage(bob2).0, 2);
}

#[test]
fn the_sweep_forgets_fold_records_of_entries_that_are_gone() {
    // The fold index says which entry of a queue later receipts fold into,
    // so it names who sent receipts to whom. Once that entry is
    // acknowledged the record is useless, and the sweep must not keep it
    // past the entries it was about (spec §10, §12).
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (alice, bob) = (dev(1, 1), dev(2, 1));
    let read = ReceiptKind::READ;
    r.receipt(bob, UserId(1), read, &[id(1)], &[alice]);
    assert_eq!(records(&r.s, disk::FOLD).len(), 1);
    // Still waiting: kept, and folding still works.
    r.sweep(0, 1000);
    assert_eq!(records(&r.s, disk::FOLD).len(), 1);
    r.receipt(bob, UserId(1), read, &[id(2)], &[alice]);
    assert_eq!(r.queue(alice).len(), 1);
    // Acknowledged: the next pass forgets the record. What is left is the
    // queue's mark.
    r.s.ack(alice, u64::MAX);
    r.step(true);
    r.sweep(0, 1000);
    assert_eq!(records(&r.s, disk::FOLD).len(), 0);
    let marks: u64 = records(&r.s, disk::MARK)
        .iter()
        .map(|(k, v)| disk::record_len(k, v))
        .sum();
    assert_eq!(r.s.queued_bytes(), marks);
    // A receipt after that starts a new entry, as before.
    r.receipt(bob, UserId(1), read, &[id(3)], &[alice]);
    assert!(matches!(&r.queue(alice)[..], [(_, Entry::Receipt(rc))] if rc.ids == vec![id(3)]));
}

#[test]
fn retract_removes_queued_copies_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a1, a2, b1, b2) = (dev(1, 1), dev(1, 2), dev(2, 1), dev(2, 2));
    let copies: [(DeviceKey, &[u8], bool); 3] = [(b1, b"x", false), (b2, b"y", false), (a2, b"z", false)];
    let t1 = r.now_ms();
    r.send(a1, id(1), UserId(2), &copies);
    r.send(a1, id(2), UserId(2), &copies);
    r.step(true);
    // One more waiting in memory, for online devices.
    let online = copies.map(|(d, b, _)| (d, b, true));
    let (tok3, _) = r.send(a1, id(3), UserId(2), &online);
    // b2 already took the first one.
    r.s.ack(b2, 1);
    r.step(true);
    // Any device of the sender's user may retract.
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: UserId(1),
            senders: vec![a1, a2],
            id: id(1),
            now_ms,
        }),
        Outcome::Retracted(2)
    );
    for d in [b1, b2, a2] {
        let q = r.queue(d);
        assert!(q.iter().all(|(_, e)| msg(e).id != id(1)), "{d}: {q:?}");
    }
    assert_eq!(r.s.queue_usage(b1).0, 2);
    // The spilled copies are removed from the spill log, each with a
    // removal record; b2's was acknowledged (its mark covers it).
    assert!(!spilled_at(&r.s).contains(&(b1, 1)) && !spilled_at(&r.s).contains(&(a2, 1)));
    let removed: Vec<(DeviceKey, u64)> = records(&r.s, disk::REMOVED)
        .iter()
        .map(|(k, _)| (disk::parse_dev(k).unwrap(), disk::queue_seq(k).unwrap()))
        .collect();
    assert_eq!(removed, vec![(a2, 1), (b1, 1)]);
    // Copies in memory go too, and their message settles (nothing of it is
    // left to make safe).
    assert_eq!(
        r.call(Op::Retract {
            user: UserId(1),
            senders: vec![a2, a1],
            id: id(3),
            now_ms,
        }),
        Outcome::Retracted(3)
    );
    assert!(r.settled(tok3).is_some());
    assert_eq!(r.s.memory_held().0, 0);
    // Another user's message cannot be retracted by this one.
    assert_eq!(
        r.call(Op::Retract {
            user: UserId(2),
            senders: vec![b1],
            id: id(2),
            now_ms,
        }),
        Outcome::Retracted(0)
    );
    assert_eq!(r.queue(b1).len(), 1);
    check_totals(&r.s);
    // A late retry, from any device of the user, is not queued again: now,
    // and after a reopen.
    for d in [a1, a2] {
        assert_eq!(
            r.send(d, id(1), UserId(2), &copies).1,
            Appended::Duplicate { time_ms: t1 }
        );
        assert!(matches!(
            r.send(d, id(3), UserId(2), &online).1,
            Appended::Duplicate { .. }
        ));
    }
    let mut r = r.reopen();
    assert_eq!(
        r.send(a2, id(1), UserId(2), &copies).1,
        Appended::Duplicate { time_ms: t1 }
    );
    assert!(matches!(
        r.send(a1, id(3), UserId(2), &online).1,
        Appended::Duplicate { .. }
    ));
    r.step(true);
    assert_eq!(r.queue(b1).len(), 1);
    assert_eq!(records(&r.s, disk::TOMBSTONE).len(), 2);
    // The tombstones are forgotten with the retention period (once
    // everything else is delivered, so that nothing else expires).
    for d in [b1, b2, a2] {
        r.s.ack(d, u64::MAX);
    }
    r.step(true);
    // The removals went with the marks that cover them.
    assert_eq!(records(&r.s, disk::REMOVED), vec![]);
    assert_eq!(spilled(&r.s), vec![]);
    let swept = r.sweep(r.now_ms() + 1, 1000);
    assert_eq!(swept.forgotten, 2);
    assert!(records(&r.s, disk::TOMBSTONE).is_empty());
    check_bytes(&r.s);
}

/// A retraction after a reopen of a message memory no longer knows (it is
/// not among the newest restored at open): its copies are found in the
/// spill log by their tag and checked against their records, removed for
/// good, and the message is remembered as retracted with its original
/// time (spec §5.5).
#[test]
fn a_retraction_finds_a_spilled_copy_that_memory_no_longer_knows() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, a2, b1, b2, c) = (dev(1, 1), dev(1, 2), dev(2, 1), dev(2, 2), dev(3, 1));
    let t1 = r.now_ms();
    let copies: [(DeviceKey, &[u8], bool); 2] = [(b1, b"x", false), (b2, b"y", false)];
    r.send(a, id(1), UserId(2), &copies);
    // Another message of the same id from another user, and enough newer
    // messages that the first is not among those restored.
    r.send(dev(3, 1), id(1), UserId(2), &[(b1, b"z", false)]);
    r.advance(Duration::from_millis(1));
    for n in 0..RECENT_MESSAGES as u32 {
        let mut newer = [9u8; 16];
        newer[..4].copy_from_slice(&n.to_be_bytes());
        r.send(a2, MsgId(newer), UserId(3), &[(c, b"", false)]);
        if n % 4096 == 0 {
            r.step(true);
        }
    }
    r.step(true);
    let mut r = r.reopen();
    assert_eq!(r.s.remembered(), RECENT_MESSAGES);
    assert_eq!(r.s.live.lock().time_of((a, id(1))), None, "still known");
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Retract {
            user: a.user,
            senders: vec![a, a2],
            id: id(1),
            now_ms,
        }),
        Outcome::Retracted(2)
    );
    assert_eq!(r.queue(b2), vec![]);
    let q = r.queue(b1);
    assert_eq!(q.len(), 1, "the other user's message of that id stays");
    assert_eq!(msg(&q[0].1).from_user, 3);
    assert_eq!(records(&r.s, disk::REMOVED).len(), 2);
    check_totals(&r.s);
    assert_eq!(
        r.send(a, id(1), UserId(2), &copies).1,
        Appended::Duplicate { time_ms: t1 }
    );
    // For good: the removals and the retraction record survive a reopen.
    let mut r = r.reopen();
    assert_eq!(r.queue(b2), vec![]);
    assert_eq!(r.queue(b1).len(), 1);
    assert_eq!(
        r.send(a2, id(1), UserId(2), &copies).1,
        Appended::Duplicate { time_ms: t1 }
    );
    r.step(true);
    assert_eq!(r.queue(b2), vec![]);
}

#[test]
fn quotas_and_shares_refuse_and_drop_nothing() {
    let (a, b, c, e) = (dev(1, 1), dev(2, 1), dev(3, 1), dev(4, 1));
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 4,
            queue_bytes: 1 << 20,
            disk_budget: u64::MAX,
            total_messages: 1_000_000,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    // A lone sender gets half of the queue.
    for i in 0..2u8 {
        // Spilled or waiting alike.
        assert!(matches!(
            r.send(a, id(i), UserId(2), &[(b, b"x", i == 0)]).1,
            Appended::Queued { .. }
        ));
    }
    r.step(true);
    assert_eq!(
        r.send(a, id(9), UserId(2), &[(b, b"x", false)]).1,
        Appended::Refused(Refused::Quota(Quota::Sender(b)))
    );
    // Refused as a whole: no copy for another device either.
    assert_eq!(
        r.send(a, id(9), UserId(2), &[(dev(2, 2), b"x", false), (b, b"x", false)])
            .1,
        Appended::Refused(Refused::Quota(Quota::Sender(b)))
    );
    assert_eq!(r.s.queue_usage(dev(2, 2)), (0, 0));
    assert_eq!(r.s.queue_usage(b).0, 2);
    assert_eq!(r.recall(a, id(9)).1, None, "not remembered");
    // Another sender finds room: half of what is left.
    assert!(matches!(
        r.send(c, id(1), UserId(2), &[(b, b"x", false)]).1,
        Appended::Queued { .. }
    ));
    r.step(true);
    assert_eq!(r.s.held_by(b, UserId(1)).0.0, 2);
    assert_eq!(r.s.held_by(b, UserId(3)).0.0, 1);
    // With one entry of room left, nobody may take it: the queue is full
    // for everyone.
    assert_eq!(
        r.send(e, id(1), UserId(2), &[(b, b"x", false)]).1,
        Appended::Refused(Refused::Quota(Quota::Queue(b)))
    );
    // After an ack it goes through.
    r.s.ack(b, 2);
    r.step(true);
    assert_eq!(r.s.held_by(b, UserId(1)).0.0, 0);
    assert!(matches!(
        r.send(a, id(9), UserId(2), &[(b, b"x", false)]).1,
        Appended::Queued { .. }
    ));
    assert_eq!(r.s.queue_usage(b).0, 2);
    // Receipts too: folding into a waiting entry is fine, a new entry is
    // not.
    r.step(true);
    assert_eq!(
        r.receipt(a, UserId(2), ReceiptKind::READ, &[id(1)], &[b]),
        Outcome::Receipt(Err(Refused::Quota(Quota::Sender(b))))
    );
    assert_eq!(r.queue(b).len(), 2);
    // Counted again on open, whoever they are from.
    let r = r.reopen();
    let (mine, theirs) = (r.s.held_by(b, UserId(1)).0, r.s.held_by(b, UserId(3)).0);
    assert_eq!((mine.0, theirs.0), (1, 1));
    assert_eq!((mine.0 + theirs.0, mine.1 + theirs.1), r.s.queue_usage(b));

    // Bytes.
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 100,
            queue_bytes: 800,
            disk_budget: u64::MAX,
            total_messages: 1_000_000,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    let body = [0u8; 200];
    assert!(matches!(
        r.send(a, id(1), UserId(2), &[(b, &body, true)]).1,
        Appended::Queued { .. }
    ));
    assert_eq!(
        r.send(a, id(2), UserId(2), &[(b, &body, false)]).1,
        Appended::Refused(Refused::Quota(Quota::Sender(b)))
    );
    // An ack of a copy that was never written frees its room at once.
    r.s.ack(b, u64::MAX);
    assert_eq!(r.s.held_by(b, UserId(1)), ((0, 0), (0, 0)));
    assert!(matches!(
        r.send(a, id(2), UserId(2), &[(b, &body, false)]).1,
        Appended::Queued { .. }
    ));

    // The disk budget.
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            disk_budget: 1,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    assert_eq!(
        r.send(a, id(1), UserId(2), &[(b, b"x", true)]).1,
        Appended::Refused(Refused::Quota(Quota::Disk))
    );
    assert_eq!(r.s.queue_usage(b), (0, 0));
    assert_eq!(r.s.last_seq(b), 0, "no number given out");
}

/// A user's share of the storage: its fixed share of the budget, and half
/// of the room the others leave; a user holding nothing is refused only
/// when the budget itself is out of room.
#[test]
fn a_user_holds_at_most_its_share_of_the_storage() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = (dev(1, 1), dev(3, 1));
    let config = StoreConfig {
        quotas: Quotas {
            disk_budget: 100_000,
            ..Quotas::default()
        }
        .with_default_shares(),
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    let body = [0u8; 1000];
    // The fixed share, an eighth of the budget, across queues.
    let mut n = 0u8;
    while matches!(
        r.send(a, id(n), UserId(2), &[(dev(2, u32::from(n % 4) + 1), &body, false)])
            .1,
        Appended::Queued { .. }
    ) {
        n += 1;
    }
    assert_eq!(n, 11, "11 copies of 1053 bytes fit in 12500");
    assert_eq!(
        r.send(a, id(n), UserId(2), &[(dev(2, 9), &body, false)]).1,
        Appended::Refused(Refused::Quota(Quota::User))
    );
    // Someone else is not refused for it.
    assert!(matches!(
        r.send(c, id(1), UserId(2), &[(dev(2, 1), &body, false)]).1,
        Appended::Queued { .. }
    ));
    r.step(true);
    let ((_, _), (count, bytes)) = r.s.held_by(dev(2, 1), UserId(1));
    assert_eq!(count, 11);
    assert!(bytes <= 12_500);
    // Half of the room the others leave: many users each filling their
    // fixed share never take the last of the budget.
    let mut users = 10u32;
    loop {
        let s = dev(users, 1);
        let mut got = 0;
        for i in 0..20u8 {
            match r
                .send(s, id(i), UserId(2), &[(dev(2, u32::from(i % 8) + 1), &body, false)])
                .1
            {
                Appended::Queued { .. } => got += 1,
                Appended::Refused(Refused::Quota(Quota::User | Quota::Disk)) => break,
                other => panic!("user {users}: {other:?}"),
            }
        }
        r.step(true);
        users += 1;
        if got == 0 {
            break;
        }
    }
    // Each took at most half of what was left: the last left at least
    // as much as it took.
    let used = r.s.queued_bytes();
    assert!(used <= 100_000 - 1053, "{used}");
    // A newcomer with a small message still gets in.
    assert!(matches!(
        r.send(dev(99, 1), id(1), UserId(2), &[(dev(2, 1), b"hello", false)]).1,
        Appended::Queued { .. }
    ));
}

/// Below the free-space floor, appends and receipts are refused in
/// words; acks and deliveries go on; accepting resumes by itself.
#[test]
fn below_the_free_space_floor_new_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    let t1 = r.now_ms();
    r.send(a, id(1), UserId(2), &[(b, b"before", false)]);
    r.step(true);
    r.s.set_min_free(u64::MAX);
    assert!(r.s.storage_full());
    assert_eq!(
        r.send(a, id(2), UserId(2), &[(b, b"x", false)]).1,
        Appended::Refused(Refused::StorageFull)
    );
    // Retries of what was accepted are still answered.
    assert_eq!(
        r.send(a, id(1), UserId(2), &[(b, b"before", false)]).1,
        Appended::Duplicate { time_ms: t1 }
    );
    assert_eq!(
        r.receipt(b, UserId(1), ReceiptKind::READ, &[id(1)], &[a]),
        Outcome::Receipt(Err(Refused::StorageFull))
    );
    assert_eq!(r.deliver(b, 0).len(), 1);
    r.s.ack(b, u64::MAX);
    r.step(true);
    assert_eq!(r.queue(b), vec![]);
    r.s.set_min_free(0);
    assert!(!r.s.storage_full());
    assert!(matches!(
        r.send(a, id(2), UserId(2), &[(b, b"x", false)]).1,
        Appended::Queued { .. }
    ));
}

/// After a restart, below the floor: a retry of a spilled message whose
/// copies are all queued is answered `Accepted` as before; one that would
/// queue a copy for a device whose copy is not queued (lost unwritten
/// with the crash, as far as the store can tell) is refused, not
/// answered `Accepted` with that copy missing; once space is back, it
/// reaches that device.
#[test]
fn below_the_floor_after_a_restart_a_retry_is_accepted_only_with_every_copy_safe() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let t1 = r.now_ms();
    let copies: [(DeviceKey, &[u8], bool); 2] = [(b1, b"one", false), (b2, b"two", true)];
    r.send(a, id(1), UserId(2), &copies);
    r.step(true);
    let mut r = r.reopen();
    r.s.set_min_free(u64::MAX);
    assert_eq!(
        r.send(a, id(1), UserId(2), &copies[..1]).1,
        Appended::Duplicate { time_ms: t1 }
    );
    assert_eq!(
        r.send(a, id(1), UserId(2), &copies).1,
        Appended::Refused(Refused::StorageFull)
    );
    r.step(true);
    assert_eq!(r.queue(b2), vec![]);
    r.s.set_min_free(0);
    let (tok, got) = r.send(a, id(1), UserId(2), &copies);
    assert_eq!(got, Appended::Queued { time_ms: t1 });
    r.s.ack(b2, u64::MAX);
    assert_eq!(r.settled(tok), Some(t1));
}

#[test]
fn retention_expires_with_notices_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let a = r.s.accounts();
    let invite = a.create_invite(3, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let bob = a.register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    let link = link_code(a, alice, 10_000);
    let alice2 = a.redeem_link(&link, &[3; 32], 0).unwrap().unwrap();
    // Old messages at t=100 and t=200, a fresh one at t=5000.
    for (i, t) in [(1u8, 100), (2, 200), (3, 5000)] {
        r.send_at(alice, id(i), bob.user, &[(bob, b"x", false)], t);
    }
    r.step(true);
    assert_eq!(spilled_at(&r.s), vec![(bob, 1), (bob, 2), (bob, 3)]);
    // Small turns: bounded work each, until the pass wraps.
    let swept = r.sweep(1000, 2);
    assert_eq!(swept.expired, 2);
    let q = r.queue(bob);
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(matches!(&q[0].1, Entry::Message(m) if m.id == id(3)));
    match &q[1].1 {
        Entry::Gap(g) => {
            assert_eq!(g.lost.len(), 1);
            assert_eq!((g.lost[0].count, g.lost[0].first_ms, g.lost[0].last_ms), (2, 100, 200));
            assert_eq!((g.lost[0].from_user, g.lost[0].from_device), (alice.user.0, 1));
        }
        other => panic!("{other:?}"),
    }
    for d in [alice, alice2] {
        let q = r.queue(d);
        match &q[..] {
            [(_, Entry::Expired(e))] => {
                assert_eq!(e.ids, vec![id(1), id(2)]);
                assert_eq!((e.device_user, e.device), (bob.user.0, 1));
            }
            other => panic!("{d}: {other:?}"),
        }
        assert!(swept.notified.contains(&d));
    }
    // The expired copies leave the spill log in the same pass: bob's mark
    // moves past them, written at once.
    assert_eq!(spilled_at(&r.s), vec![(bob, 3)]);
    assert_eq!(mark(&r.s, bob), Some(2));
    assert_eq!(r.s.queue_usage(bob).0, 2);
    check_totals(&r.s);
    // The notices are delivered like anything else, and the expired
    // copies do not come back.
    let mut r = r.reopen();
    assert_eq!(r.deliver(bob, 0), q);
    // A second pass finds nothing more to expire.
    let swept = r.sweep(1000, 2);
    assert_eq!(swept.expired, 0);
    assert_eq!(r.queue(bob), q);
}

/// Runs a blob operation on the caller's thread; its answer.
fn blob_call(r: &mut Rig, op: super::blobs::BlobOp) -> super::blobs::BlobOutcome {
    let w = r.waiter();
    r.s.blobs.submit(op, Some(w.clone()));
    r.s.blobs.step();
    match r.outcomes(w.token).pop() {
        Some(Outcome::Blob(o)) => o,
        other => panic!("{other:?}"),
    }
}

#[test]
fn spilled_messages_and_blobs_share_the_disk_budget() {
    use super::blobs::{BlobOp, BlobOutcome, BlobRefused};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let budget = 200_000;
    let config = StoreConfig {
        quotas: Quotas {
            disk_budget: budget,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config.clone());
    let body = [7u8; 4000];
    for i in 0..20u8 {
        assert!(matches!(
            r.send(a, id(i), UserId(2), &[(b, &body, false)]).1,
            Appended::Queued { .. }
        ));
    }
    r.step(true);
    let spilled_bytes = r.s.queued_bytes();
    assert!(spilled_bytes > 80_000, "{spilled_bytes}");
    assert!(!spilled(&r.s).is_empty(), "the copies are in the spill log");
    let start = |blob: u8, size: u64, now_ms: u64| BlobOp::Start {
        device: a,
        id: crate::wire::BlobId([blob; 32]),
        size,
        access: vec![UserId(2)],
        expect: vec![b],
        now_ms,
    };
    // A blob that fits the budget alone but not beside the spilled
    // messages is refused.
    let now_ms = r.now_ms();
    let too_big = budget - spilled_bytes + 1;
    assert_eq!(
        blob_call(&mut r, start(1, too_big, now_ms)),
        BlobOutcome::Refused(BlobRefused::DiskBudget)
    );
    // One that fits beside them is taken, and counted in full from its
    // start (ciphertext and record).
    let size = budget - spilled_bytes - 20_000;
    assert!(matches!(
        blob_call(&mut r, start(2, size, now_ms)),
        BlobOutcome::Status(_)
    ));
    let with_blob = r.s.queued_bytes();
    assert!(with_blob > spilled_bytes + size, "{with_blob}");
    check_bytes(&r.s);
    // Now the messages find the room taken: five more do not fit.
    let refused = (100..105u8)
        .filter(|i| {
            // The budget, or the sender's share of the room the blob
            // leaves (spec §10, *Fair shares*).
            matches!(
                r.send(a, id(*i), UserId(2), &[(b, &body, false)]).1,
                Appended::Refused(Refused::Quota(Quota::Disk | Quota::User))
            )
        })
        .count();
    assert!(refused > 0, "the blob's room was taken by messages");
    r.step(true);
    check_bytes(&r.s);
    // Letting go of the blob gives its room back to messages.
    assert_eq!(
        blob_call(
            &mut r,
            BlobOp::Delete {
                device: a,
                id: crate::wire::BlobId([2; 32])
            }
        ),
        BlobOutcome::Done
    );
    assert!(r.s.queued_bytes() < spilled_bytes + 5 * 4100);
    assert!(matches!(
        r.send(a, id(200), UserId(2), &[(b, &body, false)]).1,
        Appended::Queued { .. }
    ));
    r.step(true);
    check_bytes(&r.s);
    // An upload under way is counted again on open, beside the spill log.
    let now_ms = r.now_ms();
    assert!(matches!(
        blob_call(&mut r, start(3, 10_000, now_ms)),
        BlobOutcome::Status(_)
    ));
    let before = r.s.queued_bytes();
    let r = r.reopen();
    assert_eq!(r.s.queued_bytes(), before);
    check_bytes(&r.s);
}

#[test]
fn the_room_an_upload_will_write_is_kept_from_messages_above_the_floor() {
    use super::blobs::{BlobConfig, BlobOp, BlobOutcome};
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let config = StoreConfig {
        blobs: BlobConfig {
            max_size: 4 * GIB,
            user_budget: 8 * GIB,
            ..BlobConfig::default()
        },
        quotas: Quotas {
            disk_budget: 16 * GIB,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    r.s.set_min_free(0);
    let free = r.s.free_space();
    if free < 6 * GIB {
        eprintln!("skipped: {} MiB free, 6 GiB needed for the margins", free >> 20);
        return;
    }
    // 4 GiB above the floor; an upload of 3 GiB (nothing written yet:
    // the room is only promised) is taken.
    r.s.set_min_free(free - 4 * GIB);
    let size = 3 * GIB;
    let now_ms = r.now_ms();
    let op = BlobOp::Start {
        device: a,
        id: crate::wire::BlobId([9; 32]),
        size,
        access: vec![UserId(2)],
        expect: vec![b],
        now_ms,
    };
    assert!(matches!(blob_call(&mut r, op), BlobOutcome::Status(_)));
    let body = [1u8; 100];
    assert!(matches!(
        r.send(a, id(1), UserId(2), &[(b, &body, false)]).1,
        Appended::Queued { .. }
    ));
    // The disk fills (the floor rises by 2 GiB, the same to the store):
    // 2 GiB above the floor, all of it promised to the upload, so
    // messages are refused although the disk itself is above the floor.
    r.s.set_min_free(free - 2 * GIB);
    assert!(r.s.free_space() > r.s.min_free());
    assert!(r.s.storage_full());
    assert_eq!(
        r.send(a, id(2), UserId(2), &[(b, &body, false)]).1,
        Appended::Refused(Refused::StorageFull)
    );
    // The upload is abandoned: the room is free for messages again.
    let op = BlobOp::Delete {
        device: a,
        id: crate::wire::BlobId([9; 32]),
    };
    assert_eq!(blob_call(&mut r, op), BlobOutcome::Done);
    assert!(!r.s.storage_full());
    assert!(matches!(
        r.send(a, id(2), UserId(2), &[(b, &body, false)]).1,
        Appended::Queued { .. }
    ));
}

#[test]
fn the_budget_counts_queued_bytes_exactly_and_receipts_too() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let config = StoreConfig {
        quotas: Quotas {
            disk_budget: 1000,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config.clone());
    let body = [0u8; 250];
    // Two senders: each may hold at most half of the room the others
    // leave, so a third finds too little.
    let c = dev(3, 1);
    for (i, s) in [a, c].into_iter().enumerate() {
        assert!(matches!(
            r.send(s, id(i as u8), UserId(2), &[(b, &body, false)]).1,
            Appended::Queued { .. }
        ));
    }
    // Waiting copies count against the budget before they are written.
    assert_eq!(
        r.send(dev(4, 1), id(9), UserId(2), &[(b, &body, false)]).1,
        Appended::Refused(Refused::Quota(Quota::Disk))
    );
    r.step(true);
    let used = r.s.queued_bytes();
    assert_eq!(used, counted_bytes(&r.s));
    // The copies' records in the spill log, exactly: nothing else yet.
    assert_eq!(used, r.s.queue_usage(b).1);
    assert_eq!(used, spilled(&r.s).iter().map(|(_, _, b)| b).sum::<u64>());
    assert_eq!(
        r.send(dev(4, 1), id(9), UserId(2), &[(b, &body, false)]).1,
        Appended::Refused(Refused::Quota(Quota::Disk))
    );
    // Receipts cannot fill it either.
    let ids: Vec<MsgId> = (0..64u8).map(id).collect();
    assert_eq!(
        r.receipt(b, UserId(1), ReceiptKind::READ, &ids, &[a]),
        Outcome::Receipt(Err(Refused::Quota(Quota::Disk)))
    );
    // An ack frees the budget once the store thread deleted the records.
    r.s.ack(b, 1);
    r.step(true);
    assert!(r.s.queued_bytes() < used);
    assert!(matches!(
        r.send(a, id(9), UserId(2), &[(b, &body, false)]).1,
        Appended::Queued { .. }
    ));
    r.step(true);
    // Counted again on open.
    let r = r.reopen();
    assert_eq!(r.s.queued_bytes(), counted_bytes(&r.s));
}

#[test]
fn receipts_that_start_an_entry_count_against_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 4,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    let read = ReceiptKind::READ;
    let delivered = ReceiptKind::DELIVERED;
    r.receipt(b, UserId(1), read, &[id(1)], &[a]);
    r.receipt(b, UserId(1), delivered, &[id(1)], &[a]);
    // Folding into a waiting entry is fine; a third entry of b's is not:
    // b has its share of the queue.
    assert_eq!(
        r.receipt(b, UserId(1), read, &[id(2)], &[a]),
        Outcome::Receipt(Ok(vec![a]))
    );
    assert_eq!(r.s.queue_usage(a).0, 2);
    assert_eq!(
        r.receipt(b, UserId(1), ReceiptKind(3), &[id(2)], &[a]),
        Outcome::Receipt(Err(Refused::Quota(Quota::Sender(a))))
    );
    // Another reader gets half of what is left; then the queue is full.
    assert_eq!(
        r.receipt(dev(3, 1), UserId(1), read, &[id(3)], &[a]),
        Outcome::Receipt(Ok(vec![a]))
    );
    assert_eq!(
        r.receipt(dev(4, 1), UserId(1), read, &[id(3)], &[a]),
        Outcome::Receipt(Err(Refused::Quota(Quota::Queue(a))))
    );
    assert_eq!(r.s.queue_usage(a).0, 3);
    // Refused as a whole: not queued for a target with room either.
    assert_eq!(
        r.receipt(dev(4, 1), UserId(1), read, &[id(3)], &[dev(1, 2), a]),
        Outcome::Receipt(Err(Refused::Quota(Quota::Queue(a))))
    );
    assert_eq!(r.s.queue_usage(dev(1, 2)), (0, 0));
}

/// Several operations in one turn: each sees what the ones before it
/// wrote.
#[test]
fn one_turn_of_many_ops_sees_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    let read = ReceiptKind::READ;
    let (t1, _) = r.send(a, id(1), UserId(2), &[(b, b"x", false)]);
    let (t2, got) = r.send(a, id(1), UserId(2), &[(b, b"x", false)]);
    assert_eq!(got, Appended::Waiting);
    let (t3, _) = r.send(a, id(2), UserId(2), &[(b, b"x", false)]);
    let mut tokens = Vec::new();
    for i in 1..=3u8 {
        let w = r.waiter();
        tokens.push(w.token);
        r.s.submit(
            Op::Receipt {
                from: b,
                to: UserId(1),
                kind: read,
                ids: vec![id(i)],
                targets: vec![a],
                now_ms: i as u64,
            },
            Some(w),
        );
    }
    let w = r.waiter();
    let now_ms = r.now_ms();
    r.s.submit(
        Op::Retract {
            user: UserId(1),
            senders: vec![a],
            id: id(2),
            now_ms,
        },
        Some(w.clone()),
    );
    r.step(true);
    let time = r.now_ms();
    for t in [t1, t2, t3] {
        assert_eq!(r.settled(t), Some(time));
    }
    for t in tokens {
        assert_eq!(r.outcomes(t), vec![Outcome::Receipt(Ok(vec![a]))]);
    }
    // The copy written in this very turn is found and removed.
    assert_eq!(r.outcomes(w.token), vec![Outcome::Retracted(1)]);
    assert_eq!(r.queue(b).len(), 1);
    let receipts = r.queue(a);
    assert!(
        matches!(&receipts[..], [(_, Entry::Receipt(rc))] if rc.ids.len() == 3),
        "{receipts:?}"
    );
    assert_eq!(r.s.queue_usage(a).0, 1);
    // Overlapping acks count each entry once.
    r.s.ack(b, 1);
    r.s.ack(b, 2);
    r.step(true);
    assert_eq!(r.s.queue_usage(b), (0, 0));
    assert_eq!(r.s.queued_bytes(), counted_bytes(&r.s));
    check_totals(&r.s);
}

#[test]
fn reads_see_exactly_what_is_on_disk_after_folds_in_one_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 1..=3u8 {
        r.s.submit(
            Op::Receipt {
                from: b,
                to: UserId(1),
                kind: ReceiptKind::READ,
                ids: vec![id(i)],
                targets: vec![a],
                now_ms: i as u64,
            },
            None,
        );
    }
    // Three folds in one turn: the first two entries are replaced within it.
    r.step(true);
    // What sled holds, bypassing memory.
    let on_disk: Vec<Entry> = records(&r.s, disk::QUEUE)
        .iter()
        .map(|(_, v)| disk::decode_disk(v).unwrap().into_entry(None).unwrap())
        .collect();
    assert_eq!(on_disk.len(), 1);
    // A read from the first sequence this turn gave out is served from
    // memory; it must hold what sled holds, nothing folded away.
    let from_memory = r.deliver(a, 1);
    assert_eq!(from_memory.len(), 1, "{from_memory:?}");
    assert_eq!(from_memory[0].1, on_disk[0]);
    assert_eq!(r.queue(a), from_memory);
}

// ---- the budget's count against sled, after anything ----

mod budget {
    use proptest::prelude::*;

    use super::*;

    const DEVICES: u32 = 3;

    fn device(i: u8) -> DeviceKey {
        dev(1 + u32::from(i) / DEVICES, 1 + u32::from(i) % DEVICES)
    }

    #[derive(Debug, Clone)]
    enum Step {
        Send {
            sender: u8,
            id: u8,
            targets: u8,
            online: u8,
            len: usize,
            old: bool,
        },
        Receipt {
            from: u8,
            kind: u8,
            id: u8,
            targets: u8,
        },
        Ack {
            device: u8,
            up_to: u64,
        },
        Retract {
            sender: u8,
            id: u8,
        },
        Revoke {
            device: u8,
        },
        Advance {
            ms: u64,
        },
        Turn {
            flush: bool,
        },
        Sweep {
            keys: usize,
        },
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u8..6, 0u8..8, 1u8..64, any::<u8>(), 0usize..300, proptest::bool::weighted(0.2))
                .prop_map(|(sender, id, targets, online, len, old)| Step::Send { sender, id, targets, online, len, old }),
            3 => (0u8..6, 1u8..=2, 0u8..8, 1u8..64).prop_map(|(from, kind, id, targets)| Step::Receipt { from, kind, id, targets }),
            5 => (0u8..6, prop_oneof![0u64..12, Just(u64::MAX)]).prop_map(|(device, up_to)| Step::Ack { device, up_to }),
            2 => (0u8..6, 0u8..8).prop_map(|(sender, id)| Step::Retract { sender, id }),
            1 => (0u8..6).prop_map(|device| Step::Revoke { device }),
            3 => (0u64..80).prop_map(|ms| Step::Advance { ms }),
            5 => any::<bool>().prop_map(|flush| Step::Turn { flush }),
            1 => (1usize..20).prop_map(|keys| Step::Sweep { keys }),
            1 => Just(Step::Reopen),
        ]
    }

    fn targets(mask: u8) -> Vec<DeviceKey> {
        (0..6).filter(|i| mask & (1 << i) != 0).map(device).collect()
    }

    fn run(steps: Vec<Step>) {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Rig::open(dir.path());
        {
            let a = r.s.accounts();
            let invite = a.create_invite(2, None).unwrap();
            for u in 1..=2u8 {
                let first = a
                    .register(&invite, &format!("user{u}"), &[u * 10; 32], 0)
                    .unwrap()
                    .unwrap();
                for d in 2..=DEVICES as u8 {
                    let code = link_code(a, first, u64::MAX / 2);
                    a.redeem_link(&code, &[u * 10 + d; 32], 0).unwrap().unwrap();
                }
            }
        }
        for s in steps {
            match s {
                Step::Send {
                    sender,
                    id: n,
                    targets: mask,
                    online,
                    len,
                    old,
                } => {
                    let sender = device(sender);
                    let body = vec![n; len];
                    let copies: Vec<(DeviceKey, &[u8], bool)> = targets(mask)
                        .into_iter()
                        .filter(|d| r.s.is_current(*d))
                        .enumerate()
                        .map(|(i, d)| (d, &body[..], online & (1 << i) != 0))
                        .collect();
                    let now_ms = if old { 10 } else { r.now_ms() };
                    let to = UserId(if sender.user.0 == 1 { 2 } else { 1 });
                    r.send_at(sender, id(n), to, &copies, now_ms);
                }
                Step::Receipt {
                    from,
                    kind,
                    id: n,
                    targets: mask,
                } => {
                    let from = device(from);
                    let targets: Vec<DeviceKey> = targets(mask).into_iter().filter(|d| r.s.is_current(*d)).collect();
                    r.receipt(from, UserId(1), ReceiptKind(kind), &[id(n)], &targets);
                }
                Step::Ack { device: d, up_to } => r.s.ack(device(d), up_to),
                Step::Retract { sender, id: n } => {
                    let sender = device(sender);
                    let mut senders = Vec::new();
                    r.s.all_devices(sender.user, &mut senders);
                    let now_ms = r.now_ms();
                    r.call(Op::Retract {
                        user: sender.user,
                        senders: senders.into_iter().map(|d| dev(sender.user.0, d.0)).collect(),
                        id: id(n),
                        now_ms,
                    });
                }
                Step::Revoke { device: d } => {
                    let now_ms = r.now_ms();
                    r.call(Op::Revoke {
                        device: device(d),
                        now_ms,
                    });
                }
                Step::Advance { ms } => r.advance(Duration::from_millis(ms)),
                Step::Turn { flush } => r.step(flush),
                Step::Sweep { keys } => {
                    r.sweep(1000, keys);
                }
                Step::Reopen => r = r.reopen(),
            }
            check_bytes(&r.s);
            check_shares(&r.s);
        }
        // Everything acknowledged: nothing of the queues is left on disk
        // but retractions and marks (one per device that had a copy
        // spilled); once the marks are written (at most once a second), no
        // removal record; no segment but the one being appended to; and
        // once the sweep passed, no fold record.
        for i in 0..6 {
            r.s.ack(device(i), u64::MAX);
        }
        r.step(true);
        r.advance(Duration::from_secs(1));
        r.step(true);
        check_totals(&r.s);
        assert_eq!(records(&r.s, disk::QUEUE), vec![]);
        assert_eq!(spilled(&r.s), vec![]);
        for (k, _) in records(&r.s, disk::REMOVED) {
            let (d, seq) = (disk::parse_dev(&k).unwrap(), disk::queue_seq(&k).unwrap());
            assert!(
                mark(&r.s, d) < Some(seq),
                "the removal of {d}'s {seq} outlived the mark that covers it"
            );
        }
        assert!(segments(&r.s).len() <= 1, "{:?}", segments(&r.s));
        assert_eq!(r.s.queue_totals(), (0, 0));
        assert_eq!(r.s.memory_held().0, 0);
        r.sweep(0, 1000);
        assert_eq!(records(&r.s, disk::FOLD), vec![]);
        let kept: u64 = [disk::TOMBSTONE, disk::MARK, disk::REMOVED]
            .into_iter()
            .flat_map(|tag| records(&r.s, tag))
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        assert_eq!(r.s.queued_bytes(), kept);
        // And nothing comes back.
        let r = r.reopen();
        for i in 0..6 {
            assert_eq!(r.queue(device(i)), vec![], "{}", device(i));
        }
        assert_eq!(r.s.queued_bytes(), kept);
    }

    proptest! {
        // `PROPTEST_CASES` sets the number of cases (default 48 here).
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
            ..ProptestConfig::default()
        })]

        #[test]
        fn disk_bytes_is_the_sum_of_the_records(steps in proptest::collection::vec(step(), 1..80)) {
            run(steps);
        }
    }
}

/// Issue 9 (*bounded disk*): spilled bodies live in the spill log's
/// segment files, which are deleted once no queued copy refers to them
/// (after the deletion is durable), so the data directory gives the space
/// of what was delivered back to the filesystem; and a body comes back
/// whole after a reopen.
#[test]
fn spill_segments_go_once_their_copies_are_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let mut r = Rig::open(dir.path());
    let body = vec![0x5a; 4000];
    // About three segments' worth, for a device that is offline.
    for i in 0..3000u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        r.send(a, MsgId(id), UserId(2), &[(b, &body, false)]);
        if i % 100 == 99 {
            r.step(true);
        }
    }
    r.step(true);
    let files = |dir: &Path| std::fs::read_dir(dir.join("spill")).unwrap().count();
    assert!(files(dir.path()) >= 3, "{} segments", files(dir.path()));
    assert_eq!(segments(&r.s).len(), files(dir.path()), "nothing but segments");
    assert!(r.s.spill_bytes() >= 3000 * 4000);
    // A reopen reads the bodies back from the segments.
    let mut r = r.reopen();
    let q = r.queue(b);
    assert_eq!(q.len(), 3000);
    assert!(q.iter().all(|(_, e)| msg(e).body.as_ref() == &body[..]));
    // Acknowledged in part: a segment whose copies are all gone goes, one
    // that still holds one stays.
    let before = segments(&r.s);
    r.s.ack(b, q[1500].0);
    r.step(true);
    let after = segments(&r.s);
    assert!(after.len() < before.len() && after.len() >= 2, "{before:?} → {after:?}");
    assert_eq!(mark(&r.s, b), Some(q[1500].0), "written with the segments' deletion");
    // Acked whole: the segments go once the mark that emptied them is
    // durable (written in the turn that freed them, flushed with it), not
    // before.
    let last = q.last().unwrap().0;
    r.advance(Duration::from_millis(10));
    r.s.ack(b, last);
    r.step(false);
    assert_eq!(segments(&r.s), after, "deleted before the mark was durable");
    assert_eq!(
        mark(&r.s, b),
        Some(last),
        "a segment went free: the mark is written at once"
    );
    r.step(true);
    assert!(files(dir.path()) <= 1, "{} segments left", files(dir.path()));
    assert!(r.s.spill_bytes() < 4 << 20);
    assert_eq!(r.s.queue_usage(b), (0, 0));
    // And nothing comes back.
    let r = r.reopen();
    assert_eq!(r.queue(b), vec![]);
    assert_eq!(r.s.spill_bytes(), 0);
}

/// Issue 14: the record a retraction leaves (kept for the retention
/// period) counts in its user's share, so sending and retracting without
/// end cannot grow the database (or the server's memory of them) past the
/// share; the count comes back at a reopen and goes at the sweep.
#[test]
fn retraction_records_count_in_the_user_share() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let config = StoreConfig {
        quotas: Quotas {
            user_messages: 3,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let mut r = Rig::with(dir.path(), config);
    for n in 0..3u8 {
        assert!(matches!(
            r.send(a, id(n), UserId(2), &[(b, b"x", false)]).1,
            Appended::Queued { .. }
        ));
        r.step(true);
        let now_ms = r.now_ms();
        assert_eq!(
            r.call(Op::Retract {
                user: a.user,
                senders: vec![a],
                id: id(n),
                now_ms,
            }),
            Outcome::Retracted(1)
        );
    }
    assert_eq!(r.s.queue_usage(b), (0, 0), "every copy went");
    let refused = Appended::Refused(Refused::Quota(Quota::User));
    assert_eq!(r.send(a, id(9), UserId(2), &[(b, b"x", false)]).1, refused);
    check_shares(&r.s);
    let mut r = r.reopen();
    check_shares(&r.s);
    assert_eq!(r.send(a, id(9), UserId(2), &[(b, b"x", false)]).1, refused);
    // Past the retention period (here: everything before now) the sweep
    // removes them, and the share is free again.
    r.advance(Duration::from_secs(60));
    let cutoff_ms = r.now_ms();
    r.sweep(cutoff_ms, 1000);
    check_shares(&r.s);
    assert!(matches!(
        r.send(a, id(9), UserId(2), &[(b, b"x", false)]).1,
        Appended::Queued { .. }
    ));
}

// ---- groups (spec §5.8) ----

/// alice (1/1, 1/2), bob (2/1, 2/2), carol (3/1) registered; group `g`
/// made by alice with bob and carol.
fn group_rig(dir: &Path, config: StoreConfig) -> (Rig, crate::wire::GroupId) {
    let mut r = Rig::with(dir, config);
    let a = r.s.accounts();
    let invite = a.create_invite(3, None).unwrap();
    let alice = a.register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let bob = a.register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    a.register(&invite, "carol", &[3; 32], 0).unwrap().unwrap();
    a.redeem_link(&link_code(a, alice, 1000), &[4; 32], 0).unwrap().unwrap();
    a.redeem_link(&link_code(a, bob, 1000), &[5; 32], 0).unwrap().unwrap();
    let g = crate::wire::GroupId([0x33; 16]);
    let now_ms = r.now_ms();
    let Outcome::Group(Ok((view, told))) = r.call(Op::Group {
        by: UserId(1),
        group: g,
        change: GroupChangeOp::Create {
            members: vec![UserId(2), UserId(3)],
        },
        limits: GroupLimits::default(),
        now_ms,
    }) else {
        panic!("not created")
    };
    assert_eq!(view.version, 1);
    assert_eq!(told.len(), 5);
    (r, g)
}

impl Rig {
    /// The digest of `g`'s member devices now, as a client computes it.
    fn digest(&self, g: crate::wire::GroupId) -> [u8; 8] {
        let view = self.s.group(g).unwrap();
        let members: Vec<(String, Vec<DeviceId>)> = view
            .members
            .iter()
            .map(|(u, _)| {
                let mut ds = Vec::new();
                self.s.accounts().current_devices(*u, &mut ds);
                (self.s.accounts().user_name(*u).unwrap().to_string(), ds)
            })
            .collect();
        crate::keys::devices_digest(members.iter().map(|(n, ds)| (n.as_str(), ds.iter().copied())))
    }

    fn group_send(
        &mut self,
        sender: DeviceKey,
        id: MsgId,
        g: crate::wire::GroupId,
        body: &[u8],
        online: bool,
    ) -> (u64, GroupAppended) {
        let w = self.waiter();
        let m = NewGroupMessage {
            sender,
            id,
            group: g,
            version: self.s.group(g).map_or(0, |v| v.version),
            devices: self.digest(g),
            body: Bytes::copy_from_slice(body),
            now_ms: self.now_ms(),
            mono: self.now(),
        };
        (w.token, self.s.append_group(m, &|_| online, &w))
    }
}

/// A group message's copies for every member device but the sender's are
/// written as one record with the body once: the disk budget counts that
/// record, each queue its share; after a reopen every copy is read back as
/// the group message it was, and a retry of it is recognised.
#[test]
fn a_group_message_is_stored_once_for_all_its_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, g) = group_rig(dir.path(), StoreConfig::default());
    let before = r.s.queued_bytes();
    let body = vec![0xab; 3000];
    let (tok, a) = r.group_send(dev(1, 1), id(1), g, &body, false);
    assert!(
        matches!(a, GroupAppended::Appended { appended: Appended::Queued { .. }, ref skipped, .. } if skipped.is_empty()),
        "{a:?}"
    );
    r.step(true);
    assert!(r.settled(tok).is_some(), "every copy durable");
    let targets = [dev(1, 2), dev(2, 1), dev(2, 2), dev(3, 1)];
    assert_eq!(spilled_at(&r.s).len(), 4);
    // The body is on disk once: the record is about one body long.
    let grown = r.s.queued_bytes() - before;
    assert!(grown < 3300, "{grown} bytes for four copies of a 3000-byte body");
    check_totals(&r.s);
    // The copies count for their sender (spec §10, *Fair shares*), before
    // and after a reopen.
    check_shares(&r.s);
    let mut r = r.reopen();
    check_shares(&r.s);
    for d in targets {
        let q = r.deliver(d, 0);
        let groups: Vec<&QueuedGroupMessage> = q
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Group(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(
            matches!(&groups[..], [m] if m.body == body && m.group == g.0 && m.id == id(1) && m.fanout == 4),
            "{d}: {q:?}"
        );
    }
    assert!(
        r.deliver(dev(1, 1), 0)
            .iter()
            .all(|(_, e)| !matches!(e, Entry::Group(_)))
    );
    // A retry after the restart is a duplicate: every copy is still queued.
    let (_, a) = r.group_send(dev(1, 1), id(1), g, &body, false);
    assert!(
        matches!(
            a,
            GroupAppended::Appended {
                appended: Appended::Duplicate { .. },
                ..
            }
        ),
        "{a:?}"
    );
    // Acked everywhere: the record goes.
    for d in targets {
        let last = r.s.last_seq(d);
        r.s.ack(d, last);
    }
    r.step(true);
    assert!(spilled_at(&r.s).is_empty());
    check_totals(&r.s);
    check_shares(&r.s);
}

/// A group message counts for its sender like a direct one (spec §10,
/// *Fair shares*): past the sender's share of the storage the whole send
/// is refused, and nothing is queued.
#[test]
fn a_group_send_past_the_senders_share_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            user_messages: 3,
            ..Quotas::default()
        },
        ..StoreConfig::default()
    };
    let (mut r, g) = group_rig(dir.path(), config);
    let before: Vec<usize> = [dev(2, 1), dev(3, 1)].iter().map(|d| r.queue(*d).len()).collect();
    // Four copies (alice's other device, bob's two, carol's) for a share
    // of three.
    let (_, a) = r.group_send(dev(1, 1), id(1), g, b"m", false);
    assert!(
        matches!(
            a,
            GroupAppended::Appended {
                appended: Appended::Refused(Refused::Quota(Quota::User)),
                ..
            }
        ),
        "{a:?}"
    );
    r.step(true);
    let after: Vec<usize> = [dev(2, 1), dev(3, 1)].iter().map(|d| r.queue(*d).len()).collect();
    assert_eq!(before, after, "nothing queued");
    check_shares(&r.s);
}

/// A non-member cannot send; a stale version or device list is refused
/// before anything is queued; a retraction removes every queued copy.
#[test]
fn group_sends_are_checked_and_retracted_like_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, g) = group_rig(dir.path(), StoreConfig::default());
    let a = r.s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let dave = a.register(&invite, "dave", &[6; 32], 0).unwrap().unwrap();
    assert_eq!(r.group_send(dave, id(1), g, b"x", false).1, GroupAppended::NotMember);
    // Stale: the version names the group before dave joins.
    let w = r.waiter();
    let digest = r.digest(g);
    let now_ms = r.now_ms();
    r.call(Op::Group {
        by: UserId(1),
        group: g,
        change: GroupChangeOp::Add { users: vec![dave.user] },
        limits: GroupLimits::default(),
        now_ms,
    });
    let m = NewGroupMessage {
        sender: dev(1, 1),
        id: id(2),
        group: g,
        version: 1,
        devices: digest,
        body: Bytes::from_static(b"stale"),
        now_ms,
        mono: r.now(),
    };
    assert_eq!(r.s.append_group(m, &|_| true, &w), GroupAppended::Mismatch);
    assert!(spilled_at(&r.s).is_empty() && r.s.memory_held().0 == 0);
    let (tok, _) = r.group_send(dev(1, 1), id(3), g, b"now", true);
    assert!(r.s.memory_held().0 > 0, "waits for acks in memory");
    r.past_deadline();
    r.step(true);
    assert!(r.settled(tok).is_some());
    let now_ms = r.now_ms();
    let Outcome::Retracted(n) = r.call(Op::Retract {
        user: UserId(1),
        senders: vec![dev(1, 1), dev(1, 2)],
        id: id(3),
        now_ms,
    }) else {
        panic!()
    };
    assert_eq!(n, 5);
    assert!(spilled_at(&r.s).is_empty());
    assert!(r.queue(dave).iter().all(|(_, e)| !matches!(e, Entry::Group(_))));
    check_totals(&r.s);
}

/// One member whose queue is full does not stop a group: its device gets
/// no copy and a gap notice instead; the others get theirs.
#[test]
fn a_full_queue_is_skipped_with_a_gap_notice_not_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 8,
            ..Quotas::default()
        },
        ..StoreConfig::default()
    };
    let (mut r, g) = group_rig(dir.path(), config);
    // carol's queue: the creation notice, three messages from bob and two
    // group messages from alice fill it for alice (a sender holds at most
    // half of the room the others leave: spec §10, *Fair shares*); the
    // others hold three entries and have room.
    for n in 5..=7 {
        r.send(dev(2, 1), id(n), UserId(3), &[(dev(3, 1), b"hi", false)]);
    }
    for n in 1..=2 {
        r.group_send(dev(1, 1), id(n), g, b"m", false);
    }
    r.step(true);
    let (_, a) = r.group_send(dev(1, 1), id(9), g, b"m", false);
    let GroupAppended::Appended { appended, skipped, .. } = a else {
        panic!("{a:?}")
    };
    assert!(matches!(appended, Appended::Queued { .. }));
    assert_eq!(skipped, vec![dev(3, 1)]);
    assert!(
        r.queue(dev(2, 1))
            .iter()
            .any(|(_, e)| matches!(e, Entry::Group(m) if m.id == id(9)))
    );
    let now_ms = r.now_ms();
    let Outcome::Notified(told) = r.call(Op::Skipped {
        sender: dev(1, 1),
        time_ms: now_ms,
        devices: skipped.clone(),
    }) else {
        panic!()
    };
    assert_eq!(told, skipped);
    let q = r.queue(dev(3, 1));
    assert!(
        matches!(q.last(), Some((_, Entry::Gap(gap))) if gap.lost[0].count == 1),
        "{q:?}"
    );
}

/// Group notices fold while they wait: one per device and group, however
/// many changes.
#[test]
fn group_notices_fold_while_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, g) = group_rig(dir.path(), StoreConfig::default());
    let a = r.s.accounts();
    let invite = a.create_invite(1, None).unwrap();
    let dave = a.register(&invite, "dave", &[6; 32], 0).unwrap().unwrap();
    for n in 0..40 {
        let change = if n % 2 == 0 {
            GroupChangeOp::Add { users: vec![dave.user] }
        } else {
            GroupChangeOp::Remove { users: vec![dave.user] }
        };
        let now_ms = r.now_ms();
        r.call(Op::Group {
            by: UserId(1),
            group: g,
            change,
            limits: GroupLimits::default(),
            now_ms,
        });
    }
    let notices: Vec<QueuedGroupNotice> = r
        .queue(dev(3, 1))
        .into_iter()
        .filter_map(|(_, e)| match e {
            Entry::GroupNotice(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].version, 41);
    assert!(notices[0].changes.is_empty(), "past its bounds it only says: changed");
    // Dave, out at the end, heard of it too, once.
    let dave_notices = r
        .queue(dave)
        .iter()
        .filter(|(_, e)| matches!(e, Entry::GroupNotice(_)))
        .count();
    assert_eq!(dave_notices, 1);
    check_totals(&r.s);
}

/// A user whose last device is revoked leaves every group.
#[test]
fn revoking_a_users_last_device_takes_it_out_of_every_group() {
    let dir = tempfile::tempdir().unwrap();
    let (mut r, g) = group_rig(dir.path(), StoreConfig::default());
    let now_ms = r.now_ms();
    assert_eq!(
        r.call(Op::Revoke {
            device: dev(3, 1),
            now_ms
        }),
        Outcome::Revoked(true)
    );
    let view = r.s.group(g).unwrap();
    assert!(!view.is_member(UserId(3)));
    assert_eq!(view.version, 2);
    // Bob's device 1 goes, device 2 stays: bob stays.
    assert_eq!(
        r.call(Op::Revoke {
            device: dev(2, 1),
            now_ms
        }),
        Outcome::Revoked(true)
    );
    assert!(r.s.group(g).unwrap().is_member(UserId(2)));
    // The operator's path for a user deleted outright.
    let Outcome::Notified(told) = r.call(Op::LeaveAllGroups {
        user: UserId(2),
        now_ms,
    }) else {
        panic!()
    };
    assert!(told.contains(&dev(1, 1)) && told.contains(&dev(2, 2)));
    assert_eq!(r.s.group(g).unwrap().members, vec![(UserId(1), true)]);
    // It all survives a reopen.
    let r = r.reopen();
    assert_eq!(r.s.group(g).unwrap().version, 3);
}

/// A backup taken on the store thread carries sled and the spill log from
/// one moment: restored, the copies waiting in the spill log come back
/// with their numbers and bodies, the copies acknowledged before it stay
/// gone (the backup writes the marks that had not been written yet), new
/// numbers start past every old one, and the files under `blobs/` travel
/// with it.
#[test]
fn a_backup_restores_the_spill_log_with_its_marks_and_the_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let (a, b, c) = (dev(1, 1), dev(2, 1), dev(3, 1));
    for i in 1..=10u8 {
        r.send(a, id(i), UserId(2), &[(b, &[i; 100], false)]);
    }
    r.step(true);
    r.s.ack(b, 3);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(3));
    r.advance(Duration::from_millis(100));
    r.s.ack(b, 7);
    r.step(true);
    assert_eq!(mark(&r.s, b), Some(3), "the mark waits its second");
    // A copy for an online device waits for its ack in memory: it was
    // never acknowledged to its sender, and a backup need not have it.
    r.send(a, id(11), UserId(3), &[(c, b"online", true)]);
    assert!(!segments(&r.s).is_empty());
    // A finished blob for bob, and an upload under way.
    use super::blobs::{BlobOp, BlobOutcome};
    let data = bytes::Bytes::from_static(b"an attachment");
    let blob_id = crate::wire::BlobId(
        ring::digest::digest(&ring::digest::SHA256, &data)
            .as_ref()
            .try_into()
            .unwrap(),
    );
    let now_ms = r.now_ms();
    let start = |id, size| BlobOp::Start {
        device: a,
        id,
        size,
        access: vec![UserId(2)],
        expect: vec![b],
        now_ms,
    };
    assert!(matches!(
        blob_call(&mut r, start(blob_id, data.len() as u64)),
        BlobOutcome::Status(_)
    ));
    let chunk = BlobOp::Chunk {
        device: a,
        id: blob_id,
        offset: 0,
        data: data.clone(),
    };
    assert!(matches!(blob_call(&mut r, chunk), BlobOutcome::Status(_)));
    let finish = BlobOp::Finish {
        device: a,
        id: blob_id,
        now_ms,
    };
    assert!(matches!(
        blob_call(&mut r, finish),
        BlobOutcome::Status(crate::wire::UploadStatus { complete: true, .. })
    ));
    let half = crate::wire::BlobId([0xab; 32]);
    assert!(matches!(blob_call(&mut r, start(half, 1000)), BlobOutcome::Status(_)));
    let blob_files = |root: &Path| {
        let mut n = 0;
        for shard in std::fs::read_dir(root.join("blobs")).unwrap() {
            n += std::fs::read_dir(shard.unwrap().path()).unwrap().count();
        }
        n
    };
    let blob_count = blob_files(dir.path());

    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("backup");
    let written = match r.call(Op::Backup {
        out: BackupSink::new(std::fs::File::create(&file).unwrap()),
    }) {
        Outcome::BackedUp(Ok(w)) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(mark(&r.s, b), Some(7), "the backup wrote the mark first");
    assert_eq!(
        written.files,
        segments(&r.s).len() + blob_count,
        "every segment and every blob file"
    );
    assert_eq!(written.bytes, std::fs::metadata(&file).unwrap().len());
    let before = r.queue(b);
    assert_eq!(before.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![8, 9, 10]);
    let last_before = r.s.last_seq(b);

    let target = out.path().join("restored");
    let restored = backup::restore(&file, &target).unwrap();
    assert_eq!(restored.format, FORMAT_VERSION);
    assert_eq!(restored.files, written.files);
    assert!(restored.ceiling > last_before + backup::RESTORE_JUMP);
    let mut r2 = Rig::open(&target);
    // The blob reads back whole for bob; the upload resumes where it was.
    let read = BlobOp::Read {
        device: b,
        id: blob_id,
        offset: 0,
        len: 100,
    };
    match blob_call(&mut r2, read) {
        BlobOutcome::Data(d) => assert_eq!(d.data, data),
        other => panic!("{other:?}"),
    }
    match blob_call(&mut r2, start(half, 1000)) {
        BlobOutcome::Status(s) => assert_eq!((s.received, s.complete), (0, false)),
        other => panic!("{other:?}"),
    }
    assert_eq!(r2.deliver(b, 0), before, "the spilled copies, and only those");
    assert_eq!(r2.s.queue_usage(b), r.s.queue_usage(b));
    check_totals(&r2.s);
    // New numbers start past everything the old server could have given.
    r2.send(a, id(12), UserId(2), &[(b, b"after", false)]);
    r2.step(true);
    assert!(r2.s.last_seq(b) > last_before + backup::RESTORE_JUMP);
}

/// Deleting an account purges the spill log's copies of every one of its
/// devices: nothing comes back after a reopen, nothing stays counted, and
/// the segments that held only them go.
#[test]
fn a_deleted_user_leaves_nothing_in_the_spill_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Rig::open(dir.path());
    let Outcome::Token(invite, None) = r.call(Op::Invite {
        uses: 2,
        expires_ms: None,
    }) else {
        panic!("no invite")
    };
    let register = |r: &mut Rig, name: &str, key: u8| {
        let Outcome::Registered(Ok(d)) = r.call(Op::Register {
            invite: invite.clone(),
            name: name.into(),
            key: [key; 32],
            now_ms: 0,
        }) else {
            panic!("{name}")
        };
        d
    };
    let alice = register(&mut r, "alice", 1);
    let bob = register(&mut r, "bob", 2);
    let Outcome::LinkCode(Ok((code, _))) = r.call(Op::RequestLink {
        device: bob,
        now_ms: 0,
        ttl: Duration::from_secs(60),
    }) else {
        panic!("no link code")
    };
    let Outcome::Linked(Ok(phone)) = r.call(Op::RedeemLink {
        code,
        key: [3; 32],
        now_ms: 1,
    }) else {
        panic!("not linked")
    };
    for i in 1..=5u8 {
        r.send(
            alice,
            id(i),
            bob.user,
            &[(bob, &[i; 50], false), (phone, &[i; 60], false)],
        );
    }
    r.step(true);
    assert_eq!(spilled(&r.s).len(), 10);
    let now_ms = r.now_ms();
    match r.call(Op::DeleteUser { user: bob.user, now_ms }) {
        Outcome::UserDeleted(Some(revoked)) => assert_eq!(revoked.len(), 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(spilled(&r.s), vec![]);
    assert_eq!(r.s.queue_totals(), (0, 0));
    r.past_deadline();
    r.step(true);
    let r = r.reopen();
    assert_eq!((r.queue(bob), r.queue(phone)), (vec![], vec![]));
    assert_eq!(spilled(&r.s), vec![]);
    assert_eq!(r.s.spill_bytes(), 0, "the segments that held only them");
}
