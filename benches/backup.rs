//! Backups with the spill log (issue 12): a store holding 100,000
//! messages of 200 bytes waiting in the spill log for 1,000 offline
//! devices (100 each). Timed:
//!
//! - `backup`: the store thread's backup ([`Op::Backup`]: every moved mark
//!   written, a flush, then every tree of the database and every segment
//!   of the spill log copied to a file, with its SHA-256), on the bench's
//!   thread through `Store::step`, as the simulation runs the store
//!   thread; the daemon's store thread does nothing else meanwhile.
//! - `restore`: `backup::restore` of that file into a new directory
//!   (checksum checked first, then the database and the segments written
//!   and synced).
//! - `oldest`: `Store::oldest_queued_ms`, what `tidingsd status` and the
//!   `STATUS=` line read on their own thread: one read of the first copy
//!   of each of the 1,000 queues from the spill log.
//!
//! The store lives under `target/tmp`, on the real disk. The bench prints
//! the backup's size once.
//!
//! Run: `cargo bench --bench backup` (add `-- --quick` for a short run).
//! The medians are in `target/criterion/backup/<what>/new/estimates.json`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use tidings::ids::{DeviceKey, UserId};
use tidings::store::{
    Appended, BackupSink, Completion, NewMessage, Op, Outcome, Sink, Store, StoreApi, StoreConfig, Waiter, backup,
};
use tidings::wire::{DeviceId, MsgId};

const DEVICES: u32 = 1_000;
const PER_DEVICE: u32 = 100;
const BODY_LEN: usize = 200;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Fills `store` with the messages, every copy written to the spill log.
fn fill(store: &Store, sink: &Arc<Sink>) {
    let w = Waiter {
        sink: sink.clone(),
        token: 0,
    };
    let sender = DeviceKey {
        user: UserId(1),
        device: DeviceId(1),
    };
    let body = Bytes::from(vec![0xa5; BODY_LEN]);
    let mut n: u64 = 0;
    for round in 0..PER_DEVICE {
        for user in 0..DEVICES {
            n += 1;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&n.to_be_bytes());
            let to = DeviceKey {
                user: UserId(user + 2),
                device: DeviceId(1),
            };
            let m = NewMessage {
                sender,
                id: MsgId(id),
                to: to.user,
                copies: vec![(to, body.clone(), false)],
                now_ms: now_ms(),
                mono: Instant::now(),
            };
            let got = store.append(m, &w);
            assert!(matches!(got, Appended::Queued { .. }), "{got:?}");
        }
        assert!(store.step(Instant::now(), now_ms(), true), "a store turn failed");
        let _ = round;
    }
    let mut got = Vec::new();
    sink.take(&mut got);
    assert_eq!(got.len() as u64, n, "every message settled");
}

fn backup_bench(c: &mut Criterion) {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    let dir = tempfile::tempdir_in(base).expect("temp dir on disk");
    let data = dir.path().join("data");
    let config = StoreConfig {
        min_free: 0,
        ..StoreConfig::default()
    };
    let store = Store::open(&data, &config).expect("store");
    let sink = Sink::new(|| {});
    fill(&store, &sink);
    assert_eq!(
        store.queue_totals().0,
        u64::from(DEVICES * PER_DEVICE),
        "every copy queued"
    );
    let file = dir.path().join("backup");

    let mut group = c.benchmark_group("backup");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    let mut size = None;
    group.bench_function("backup", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let out = std::fs::File::create(&file).expect("backup file");
                let w = Waiter {
                    sink: sink.clone(),
                    token: 7,
                };
                let start = Instant::now();
                store.submit(
                    Op::Backup {
                        out: BackupSink::new(out),
                    },
                    Some(w),
                );
                assert!(store.step(Instant::now(), now_ms(), false));
                total += start.elapsed();
                let mut got: Vec<Completion> = Vec::new();
                sink.take(&mut got);
                match got.pop().map(|c| c.outcome) {
                    Some(Outcome::BackedUp(Ok(written))) => {
                        if size.is_none() {
                            eprintln!(
                                "backup of {} messages: {} bytes ({} records, {} files)",
                                DEVICES * PER_DEVICE,
                                written.bytes,
                                written.records,
                                written.files
                            );
                        }
                        size = Some(written.bytes);
                    }
                    other => panic!("{other:?}"),
                }
            }
            total
        })
    });
    group.bench_function("restore", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let target = tempfile::tempdir_in(base).expect("temp dir");
                let start = Instant::now();
                let r = backup::restore(&file, &target.path().join("data")).expect("restore");
                total += start.elapsed();
                assert!(r.files > 0, "no segment restored");
            }
            total
        })
    });
    group.bench_function("oldest", |b| {
        b.iter(|| {
            let oldest = store.oldest_queued_ms().expect("oldest");
            assert!(oldest.is_some());
        })
    });
    group.finish();
}

criterion_group!(benches, backup_bench);
criterion_main!(benches);
