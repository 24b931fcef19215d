//! The store path per message, both ways a copy goes (issue 9): N
//! messages for one recipient device (200-byte bodies) per store-thread
//! turn, for N in 1, 10, 100, reported per message (criterion prints the
//! throughput in messages a second).
//!
//! - `elided`: the recipient is online and acknowledges each copy before
//!   its write deadline, as a connected device does. Timed: N appends (the
//!   loops' memory calls), reading them for delivery, the ack (which
//!   settles them), and one store-thread turn, which finds nothing to
//!   write. Nothing touches the disk.
//! - `spilled`: the recipient is offline. Timed: N appends, one turn that
//!   appends the N copies to the spill log's current segment, the group
//!   flush (an `fdatasync` of that segment, then sled's flush and an
//!   `fdatasync` of its file) and the turn that settles them; then, as
//!   when the device comes back, delivery (from memory, or from the spill
//!   log through the store thread for what the cache no longer holds), the
//!   ack, and the turn that moves the device's mark past the N copies
//!   (the mark is written at most once a second, and a segment file is
//!   deleted once every copy in it is gone, both made durable by a later
//!   flush). The store lives under `target/tmp`, on the real disk, so the
//!   flush pays a real sync.
//!
//! The turns run on the bench's thread with `Store::step`, as the
//! simulation runs them; the daemon runs the same code on its store
//! thread.
//!
//! Run: `cargo bench --bench store` (add `-- --quick` for a short run, or
//! a filter such as `-- elided`). The medians are in
//! `target/criterion/store_path/<way>/<N>/new/estimates.json`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tidings::ids::{DeviceKey, UserId};
use tidings::store::{Appended, Completion, NewMessage, Op, Outcome, Read, Sink, Store, StoreApi, StoreConfig, Waiter};
use tidings::wire::{DeviceId, MsgId};

const BODY_LEN: usize = 200;

struct Rig {
    store: Store,
    sink: Arc<Sink>,
    sender: DeviceKey,
    recipient: DeviceKey,
    body: Bytes,
    next_id: u64,
    got: Vec<Completion>,
    delivered: Vec<(u64, tidings::store::Entry)>,
}

impl Rig {
    fn turn(&self, flush: bool) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        assert!(self.store.step(Instant::now(), now_ms, flush), "a store turn failed");
    }

    /// Appends `n` messages for the recipient, online or not.
    fn append(&mut self, n: u64, online: bool) {
        let w = Waiter {
            sink: self.sink.clone(),
            token: 0,
        };
        for _ in 0..n {
            self.next_id += 1;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&self.next_id.to_be_bytes());
            let m = NewMessage {
                sender: self.sender,
                id: MsgId(id),
                to: self.recipient.user,
                copies: vec![(self.recipient, self.body.clone(), online)],
                now_ms: self.next_id,
                mono: Instant::now(),
            };
            let got = self.store.append(m, &w);
            assert!(matches!(got, Appended::Queued { .. }), "{got:?}");
        }
    }

    /// Delivers the last `n` entries of the recipient's queue as the hub
    /// does (from memory, or from disk through the store thread when they
    /// are no longer cached) and acknowledges them.
    fn deliver_and_ack(&mut self, n: u64) {
        self.delivered.clear();
        let last = self.store.last_seq(self.recipient);
        let mut from = last + 1 - n;
        loop {
            match self.store.read(self.recipient, from, n as usize, &mut self.delivered) {
                Read::Memory { .. } => break,
                Read::OnDisk => {
                    let w = Waiter {
                        sink: self.sink.clone(),
                        token: 1,
                    };
                    self.store.submit(
                        Op::ReadBacklog {
                            device: self.recipient,
                            from,
                            max: n as usize,
                        },
                        Some(w),
                    );
                    self.turn(false);
                    self.got.clear();
                    self.sink.take(&mut self.got);
                    let Some(Completion {
                        outcome: Outcome::Backlog { entries, covered, .. },
                        ..
                    }) = self.got.pop()
                    else {
                        panic!("no backlog")
                    };
                    self.delivered.extend(entries);
                    from = covered + 1;
                }
            }
        }
        assert_eq!(self.delivered.len() as u64, n);
        self.store.ack(self.recipient, last);
    }

    /// Every one of the last `n` messages is settled.
    fn settled(&mut self, n: u64) {
        self.got.clear();
        self.sink.take(&mut self.got);
        assert_eq!(self.got.len() as u64, n, "settlements");
    }
}

fn store_path(c: &mut Criterion) {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    let dir = tempfile::tempdir_in(base).expect("temp dir on disk");
    let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
    let mut rig = Rig {
        store,
        sink: Sink::new(|| {}),
        sender: DeviceKey {
            user: UserId(1),
            device: DeviceId(1),
        },
        recipient: DeviceKey {
            user: UserId(2),
            device: DeviceId(1),
        },
        body: Bytes::from(vec![0xa5; BODY_LEN]),
        next_id: 0,
        got: Vec::new(),
        delivered: Vec::new(),
    };

    let mut group = c.benchmark_group("store_path");
    for n in [1u64, 10, 100] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("elided", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rig.append(n, true);
                    rig.deliver_and_ack(n);
                    rig.turn(false);
                    rig.settled(n);
                }
                let took = start.elapsed();
                assert_eq!(rig.store.queued_bytes(), 0, "an acked copy was written");
                assert_eq!(rig.store.spill_bytes(), 0, "an acked copy was spilled");
                took
            })
        });
    }
    for n in [1u64, 10, 100] {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::new("spilled", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    rig.append(n, false);
                    rig.turn(true);
                    rig.settled(n);
                    rig.deliver_and_ack(n);
                    rig.turn(false);
                    total += start.elapsed();
                }
                // What was delivered left the spill log: what is counted
                // is the device's mark, and the spill log keeps at most
                // the segment being appended to and one not yet deleted.
                assert_eq!(rig.store.queue_usage(rig.recipient), (0, 0));
                assert!(rig.store.queued_bytes() <= 17, "{}", rig.store.queued_bytes());
                assert!(rig.store.spill_bytes() <= 2 * (4 << 20), "{}", rig.store.spill_bytes());
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, store_path);
criterion_main!(benches);
