//! Append + group-commit flush: the cost of making N messages durable with
//! one flush, as the daemon does for every batch of sends (DESIGN.md,
//! guarantee 1). Each iteration appends N fresh messages for one recipient
//! device (200-byte bodies) and then runs `Flusher::flush_now`; the store
//! lives in a temporary directory under `target/tmp`, on the real disk, so
//! the flush pays a real sync.
//!
//! `cargo bench --bench store`. Throughput is reported in messages, so
//! criterion prints the per-message rate too; the medians are in
//! `target/criterion/store_append_flush/<way>/N/new/estimates.json`.
//!
//! Two ways, measured side by side in one run:
//! - `batch_per_message`: one `Store::append` (one sled batch) per message,
//!   as the daemon did at first. sled seals and writes an io buffer for
//!   every batch (a `pwrite` and a `sync_file_range`), so the per-message
//!   cost barely falls with N;
//! - `batch_per_turn`: N appends in one `Store::apply` (one sled batch), as
//!   the daemon now does for all the sends of one event-loop turn, then the
//!   one group flush.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tidings::ids::{DeviceKey, UserId};
use tidings::store::{Op, Store, StoreConfig};
use tidings::wire::{DeviceId, MsgId};

const BODY_LEN: usize = 200;
/// The recipient's queue is acked (untimed) past this many entries, so
/// that it stays the size of a real backlog rather than growing with the
/// number of iterations.
const MAX_BACKLOG: u64 = 10_000;

fn append_and_flush(c: &mut Criterion) {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("target tmp dir");
    let dir = tempfile::tempdir_in(base).expect("temp dir on disk");
    let store = Store::open(dir.path(), &StoreConfig::default()).expect("store");
    let sender = DeviceKey {
        user: UserId(1),
        device: DeviceId(1),
    };
    let recipient = DeviceKey {
        user: UserId(2),
        device: DeviceId(1),
    };
    let body = Bytes::from(vec![0xa5; BODY_LEN]);
    let mut next_id: u64 = 0;
    let mut acked: u64 = 0;

    let mut group = c.benchmark_group("store_append_flush");
    for per_turn in [false, true] {
        let name = if per_turn {
            "batch_per_turn"
        } else {
            "batch_per_message"
        };
        for n in [1u64, 10, 100] {
            group.throughput(Throughput::Elements(n));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut ops = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            next_id += 1;
                            let mut id = [0u8; 16];
                            id[8..].copy_from_slice(&next_id.to_be_bytes());
                            ops.push(Op::Append {
                                sender,
                                id: MsgId(id),
                                to: recipient.user,
                                bodies: vec![(recipient, body.clone())],
                                now_ms: next_id,
                            });
                        }
                        let start = Instant::now();
                        if per_turn {
                            store.apply(&ops).expect("apply");
                        } else {
                            for op in &ops {
                                store.apply(std::slice::from_ref(op)).expect("apply");
                            }
                        }
                        assert!(store.flusher().flush_now(), "flush failed");
                        total += start.elapsed();
                        if next_id - acked > MAX_BACKLOG {
                            acked = store.last_seq(recipient).expect("last_seq");
                            store.ack(recipient, acked).expect("ack");
                            store.flush().expect("flush");
                        }
                    }
                    total
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, append_and_flush);
criterion_main!(benches);
