//! The blob rules over files in memory (and once over a real directory):
//! uploads, resumption across a restart, checks, access, budgets, grants,
//! deletion and the sweep.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::book::{BLOB_OVERHEAD, Blobs, Files, MAX_UPLOADS_PER_USER};
use super::dir::Dir;
use super::mem::MemFiles;
use super::*;
use crate::store::testing::TestEnv;
use crate::wire::{DeviceId, MAX_BLOB_DATA};

const ALICE: DeviceKey = DeviceKey {
    user: UserId(1),
    device: DeviceId(1),
};
const ALICE2: DeviceKey = DeviceKey {
    user: UserId(1),
    device: DeviceId(2),
};
const BOB: DeviceKey = DeviceKey {
    user: UserId(2),
    device: DeviceId(1),
};
const CAROL: DeviceKey = DeviceKey {
    user: UserId(3),
    device: DeviceId(1),
};
const T0: u64 = 1_795_000_000_000;

fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn id_of(data: &[u8]) -> BlobId {
    BlobId(
        ring::digest::digest(&ring::digest::SHA256, data)
            .as_ref()
            .try_into()
            .unwrap(),
    )
}

fn env() -> Arc<TestEnv> {
    let env = Arc::new(TestEnv::default());
    env.budget.store(1 << 30, Ordering::SeqCst);
    env.above_floor.store(u64::MAX, Ordering::SeqCst);
    env
}

fn open<F: Files>(files: F, env: &Arc<TestEnv>, config: BlobConfig) -> Blobs<F, Arc<TestEnv>> {
    Blobs::open(files, env.clone(), config).unwrap()
}

fn start(id: BlobId, size: u64, by: DeviceKey, to: &[DeviceKey]) -> BlobOp {
    let mut access: Vec<UserId> = to.iter().map(|d| d.user).collect();
    access.dedup();
    BlobOp::Start {
        device: by,
        id,
        size,
        access,
        expect: to.to_vec(),
        now_ms: T0,
    }
}

fn status(id: BlobId, received: u64, complete: bool) -> BlobOutcome {
    BlobOutcome::Status(UploadStatus { id, received, complete })
}

fn refused(r: BlobRefused) -> BlobOutcome {
    BlobOutcome::Refused(r)
}

/// Uploads `data` in chunks of `chunk` from `from` on.
fn send<F: Files>(b: &mut Blobs<F, Arc<TestEnv>>, id: BlobId, data: &[u8], from: usize, chunk: usize) {
    let mut at = from;
    while at < data.len() {
        let end = (at + chunk).min(data.len());
        let got = b.handle(BlobOp::Chunk {
            device: ALICE,
            id,
            offset: at as u64,
            data: Bytes::copy_from_slice(&data[at..end]),
        });
        assert_eq!(got, status(id, end as u64, false));
        at = end;
    }
}

fn read_all<F: Files>(b: &mut Blobs<F, Arc<TestEnv>>, id: BlobId, by: DeviceKey, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < size {
        match b.handle(BlobOp::Read {
            device: by,
            id,
            offset: out.len() as u64,
            len: MAX_BLOB_DATA as u32,
        }) {
            BlobOutcome::Data(d) => {
                assert_eq!(d.offset, out.len() as u64);
                assert!(!d.data.is_empty());
                out.extend_from_slice(&d.data);
            }
            other => panic!("read: {other:?}"),
        }
    }
    out
}

fn finish(id: BlobId, by: DeviceKey) -> BlobOp {
    BlobOp::Finish {
        device: by,
        id,
        now_ms: T0 + 10,
    }
}

#[test]
fn an_upload_is_read_by_its_readers_and_goes_once_all_fetched_it() {
    let env = env();
    let mut b = open(MemFiles::default(), &env, BlobConfig::default());
    let data = bytes_of(150_000, 1);
    let id = id_of(&data);
    let size = data.len() as u64;
    assert_eq!(b.handle(start(id, size, ALICE, &[ALICE2, BOB])), status(id, 0, false));
    let counted = env.used.load(Ordering::SeqCst);
    assert!(counted > size && counted < size + 200, "{counted}");
    send(&mut b, id, &data, 0, MAX_BLOB_DATA);
    // Half-finished: nobody reads it, not even its uploader.
    for who in [ALICE, BOB] {
        let r = b.handle(BlobOp::Read {
            device: who,
            id,
            offset: 0,
            len: 10,
        });
        assert_eq!(r, refused(BlobRefused::Unknown));
    }
    assert_eq!(b.handle(finish(id, ALICE)), status(id, size, true));
    assert_eq!(
        b.handle(finish(id, ALICE)),
        status(id, size, true),
        "finishing again is harmless"
    );
    assert!(b.files().blobs.contains_key(&id) && b.files().parts.is_empty());
    assert_eq!(read_all(&mut b, id, BOB, data.len()), data);
    // A stranger learns nothing: the same answer as for no blob at all.
    let stranger = b.handle(BlobOp::Read {
        device: CAROL,
        id,
        offset: 0,
        len: 10,
    });
    assert_eq!(stranger, refused(BlobRefused::Unknown));
    assert_eq!(
        b.handle(BlobOp::Read {
            device: BOB,
            id,
            offset: size + 1,
            len: 10
        }),
        refused(BlobRefused::PastEnd { size })
    );
    // The end of the blob: a short range.
    let BlobOutcome::Data(tail) = b.handle(BlobOp::Read {
        device: BOB,
        id,
        offset: size - 5,
        len: 100,
    }) else {
        panic!()
    };
    assert_eq!(tail.data.len(), 5);
    // Fetched by bob, then by alice's other device: gone.
    assert_eq!(b.handle(BlobOp::Fetched { device: BOB, id }), BlobOutcome::Done);
    assert!(b.files().blobs.contains_key(&id));
    assert_eq!(b.handle(BlobOp::Fetched { device: CAROL, id }), BlobOutcome::Done);
    assert!(b.files().blobs.contains_key(&id), "a stranger's word changes nothing");
    assert_eq!(b.handle(BlobOp::Fetched { device: ALICE2, id }), BlobOutcome::Done);
    assert!(b.files().blobs.is_empty() && b.files().metas.is_empty());
    assert_eq!(env.used.load(Ordering::SeqCst), 0, "everything given back");
    assert_eq!(b.stats(), BlobStats::default());
    assert_eq!(
        b.handle(BlobOp::Read {
            device: BOB,
            id,
            offset: 0,
            len: 10
        }),
        refused(BlobRefused::Unknown)
    );
}

#[test]
fn an_upload_resumes_after_a_restart_and_is_checked_then() {
    let env = env();
    let mut b = open(MemFiles::default(), &env, BlobConfig::default());
    let data = bytes_of(200_000, 2);
    let id = id_of(&data);
    let size = data.len() as u64;
    b.handle(start(id, size, ALICE, &[BOB]));
    send(&mut b, id, &data[..100_000], 0, 40_000);
    let counted = env.used.load(Ordering::SeqCst);
    // The daemon stops; its files stay.
    let files = b.files().clone();
    drop(b);
    let env = self::env();
    let mut b = open(files, &env, BlobConfig::default());
    assert_eq!(env.used.load(Ordering::SeqCst), counted, "counted again at start");
    assert_eq!(b.stats().uploads, 1);
    // Asking again says how far it got; a chunk that is not next is
    // refused; one that overlaps what is there adds only the rest.
    assert_eq!(b.handle(start(id, size, ALICE, &[BOB])), status(id, 100_000, false));
    assert_eq!(
        b.handle(start(id, size + 1, ALICE, &[BOB])),
        refused(BlobRefused::SizeMismatch { size })
    );
    let skip = BlobOp::Chunk {
        device: ALICE,
        id,
        offset: 120_000,
        data: Bytes::from_static(b"x"),
    };
    assert_eq!(b.handle(skip), refused(BlobRefused::Offset { received: 100_000 }));
    assert_eq!(
        b.handle(finish(id, ALICE)),
        refused(BlobRefused::Incomplete { received: 100_000 })
    );
    send(&mut b, id, &data, 90_000, 50_000);
    assert_eq!(b.handle(finish(id, ALICE)), status(id, size, true));
    assert_eq!(read_all(&mut b, id, BOB, data.len()), data);
}

#[test]
fn bytes_that_do_not_hash_to_the_id_are_dropped() {
    let env = env();
    let mut b = open(MemFiles::default(), &env, BlobConfig::default());
    let data = bytes_of(70_000, 3);
    let id = id_of(&data);
    b.handle(start(id, data.len() as u64, ALICE, &[BOB]));
    let mut bad = data.clone();
    bad[65_000] ^= 1;
    send(&mut b, id, &bad, 0, MAX_BLOB_DATA);
    assert_eq!(b.handle(finish(id, ALICE)), refused(BlobRefused::Mismatch));
    assert!(b.files().metas.is_empty() && b.files().parts.is_empty() && b.files().blobs.is_empty());
    assert_eq!(env.used.load(Ordering::SeqCst), 0);
    // And after a restart (the hash read again from the file) too.
    b.handle(start(id, data.len() as u64, ALICE, &[BOB]));
    send(&mut b, id, &bad, 0, MAX_BLOB_DATA);
    let files = b.files().clone();
    let mut b = open(files, &env, BlobConfig::default());
    assert_eq!(b.handle(finish(id, ALICE)), refused(BlobRefused::Mismatch));
    assert!(b.files().metas.is_empty());
}

#[test]
fn limits_and_budgets_refuse_with_their_reasons() {
    let env = env();
    let config = BlobConfig {
        max_size: 1000,
        user_budget: 3 * (800 + BLOB_OVERHEAD),
        ..BlobConfig::default()
    };
    let mut b = open(MemFiles::default(), &env, config);
    let id = |n: u8| BlobId([n; 32]);
    assert_eq!(
        b.handle(start(id(1), 1017, ALICE, &[BOB])),
        refused(BlobRefused::TooLarge { max: 1016 }),
        "a file of 1000 bytes, sealed, is 1016"
    );
    assert_eq!(b.handle(start(id(1), 0, ALICE, &[BOB])), refused(BlobRefused::Empty));
    for n in 1..=3 {
        assert_eq!(b.handle(start(id(n), 800, ALICE, &[BOB])), status(id(n), 0, false));
    }
    // Alice's budget is used up; bob's is not.
    assert_eq!(
        b.handle(start(id(4), 800, ALICE2, &[BOB])),
        refused(BlobRefused::Budget)
    );
    assert_eq!(b.handle(start(id(4), 800, BOB, &[ALICE])), status(id(4), 0, false));
    // Someone else's upload is not yours to add to or finish.
    let theirs = BlobOp::Chunk {
        device: CAROL,
        id: id(1),
        offset: 0,
        data: Bytes::from_static(b"x"),
    };
    assert_eq!(b.handle(theirs), refused(BlobRefused::Unknown));
    assert_eq!(b.handle(finish(id(1), CAROL)), refused(BlobRefused::Unknown));
    assert_eq!(b.handle(start(id(1), 800, CAROL, &[])), refused(BlobRefused::Taken));
    // Past the end.
    let long = BlobOp::Chunk {
        device: ALICE,
        id: id(1),
        offset: 0,
        data: Bytes::from(vec![0; 801]),
    };
    assert_eq!(b.handle(long), refused(BlobRefused::PastEnd { size: 800 }));
    // Giving an upload up gives its budget back.
    assert_eq!(
        b.handle(BlobOp::Delete {
            device: ALICE,
            id: id(3)
        }),
        BlobOutcome::Done
    );
    assert_eq!(b.handle(start(id(5), 800, ALICE, &[BOB])), status(id(5), 0, false));
    // The disk budget, shared with the queues.
    env.budget
        .store(env.used.load(Ordering::SeqCst) + 500, Ordering::SeqCst);
    assert_eq!(
        b.handle(start(id(6), 600, CAROL, &[BOB])),
        refused(BlobRefused::DiskBudget)
    );
    env.budget.store(1 << 30, Ordering::SeqCst);
    // Below the free-space floor nothing new is taken, but reads go on.
    env.full.store(true, Ordering::SeqCst);
    assert_eq!(
        b.handle(start(id(6), 600, CAROL, &[BOB])),
        refused(BlobRefused::StorageFull)
    );
    let chunk = BlobOp::Chunk {
        device: ALICE,
        id: id(1),
        offset: 0,
        data: Bytes::from_static(b"x"),
    };
    assert_eq!(b.handle(chunk.clone()), refused(BlobRefused::StorageFull));
    env.full.store(false, Ordering::SeqCst);
    assert_eq!(b.handle(chunk), status(id(1), 1, false));
    // Above the floor, but not by as much as the uploads under way and a
    // new one will write.
    let to_come = 799 + 3 * 800;
    env.above_floor.store(to_come + 599, Ordering::SeqCst);
    assert_eq!(
        b.handle(start(id(7), 600, CAROL, &[BOB])),
        refused(BlobRefused::StorageFull)
    );
    env.above_floor.store(to_come + 600, Ordering::SeqCst);
    assert_eq!(b.handle(start(id(7), 600, CAROL, &[BOB])), status(id(7), 0, false));
}

#[test]
fn a_user_has_a_bounded_number_of_uploads_under_way() {
    let env = env();
    let mut b = open(MemFiles::default(), &env, BlobConfig::default());
    for n in 0..MAX_UPLOADS_PER_USER {
        let id = BlobId([n as u8; 32]);
        assert_eq!(b.handle(start(id, 10, ALICE, &[BOB])), status(id, 0, false));
    }
    assert_eq!(
        b.handle(start(BlobId([99; 32]), 10, ALICE2, &[BOB])),
        refused(BlobRefused::Uploads)
    );
}

#[test]
fn grants_let_others_read_and_holders_let_go() {
    let env = env();
    let mut b = open(MemFiles::default(), &env, BlobConfig::default());
    let data = bytes_of(1000, 4);
    let id = id_of(&data);
    b.handle(start(id, 1000, ALICE, &[BOB]));
    send(&mut b, id, &data, 0, 1000);
    b.handle(finish(id, ALICE));
    let read = |b: &mut Blobs<MemFiles, Arc<TestEnv>>, who| {
        b.handle(BlobOp::Read {
            device: who,
            id,
            offset: 0,
            len: 4,
        })
    };
    assert_eq!(read(&mut b, CAROL), refused(BlobRefused::Unknown));
    // Carol cannot grant herself; bob (a reader) forwards to her.
    let grant = |by, to: DeviceKey| BlobOp::Grant {
        device: by,
        id,
        access: vec![to.user],
        expect: vec![to],
        now_ms: T0 + 100,
    };
    assert_eq!(b.handle(grant(CAROL, CAROL)), refused(BlobRefused::Unknown));
    assert_eq!(b.handle(grant(BOB, CAROL)), BlobOutcome::Done);
    assert!(matches!(read(&mut b, CAROL), BlobOutcome::Data(_)));
    // Alice deletes her message for everyone: bob's forward still holds it.
    assert_eq!(b.handle(BlobOp::Delete { device: ALICE, id }), BlobOutcome::Done);
    assert!(matches!(read(&mut b, CAROL), BlobOutcome::Data(_)));
    // A reader who holds nothing lets go of nothing.
    assert_eq!(b.handle(BlobOp::Delete { device: CAROL, id }), BlobOutcome::Done);
    assert!(matches!(read(&mut b, CAROL), BlobOutcome::Data(_)));
    assert_eq!(b.handle(BlobOp::Delete { device: BOB, id }), BlobOutcome::Done);
    assert_eq!(read(&mut b, CAROL), refused(BlobRefused::Unknown));
    assert_eq!(env.used.load(Ordering::SeqCst), 0);
}

#[test]
fn the_sweep_removes_expired_blobs_stale_uploads_and_blobs_nobody_can_fetch() {
    let env = env();
    let config = BlobConfig {
        upload_ttl: Duration::from_secs(3600),
        ..BlobConfig::default()
    };
    let mut b = open(MemFiles::default(), &env, config);
    let mut ids = Vec::new();
    for seed in 0..3u8 {
        let data = bytes_of(100 + seed as usize, seed);
        let id = id_of(&data);
        b.handle(start(
            id,
            data.len() as u64,
            ALICE,
            &[if seed == 2 { CAROL } else { BOB }],
        ));
        send(&mut b, id, &data, 0, 1000);
        b.handle(BlobOp::Finish {
            device: ALICE,
            id,
            now_ms: T0 + u64::from(seed) * 1000,
        });
        ids.push(id);
    }
    let stale = BlobId([7; 32]);
    b.handle(start(stale, 10, ALICE, &[BOB]));
    let sweep_all = |b: &mut Blobs<MemFiles, Arc<TestEnv>>, cutoff_ms, now_ms| {
        let mut shard = Some(0);
        let mut removed = 0;
        while let Some(s) = shard {
            match b.handle(BlobOp::Sweep {
                shard: s,
                cutoff_ms,
                now_ms,
            }) {
                BlobOutcome::Swept { next, removed: n } => {
                    shard = next;
                    removed += n;
                }
                other => panic!("{other:?}"),
            }
        }
        removed
    };
    assert_eq!(sweep_all(&mut b, T0, T0 + 1000), 0);
    // Carol's only device is revoked: nobody will fetch the third one.
    env.revoked.lock().unwrap().insert(CAROL);
    assert_eq!(sweep_all(&mut b, T0, T0 + 1000), 1);
    assert!(!b.files().metas.contains_key(&ids[2]));
    // The first expires; the stale upload goes after its hour.
    assert_eq!(sweep_all(&mut b, T0 + 500, T0 + 3_600_001), 2);
    assert_eq!(b.files().metas.keys().copied().collect::<Vec<_>>(), vec![ids[1]]);
    assert_eq!(b.stats().uploads, 0);
}

#[test]
fn blobs_in_a_directory_survive_a_restart_and_leftovers_are_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("blobs");
    let env = env();
    let data = bytes_of(130_000, 5);
    let id = id_of(&data);
    let partial = bytes_of(5000, 6);
    let pid = id_of(&partial);
    {
        let mut b = open(Dir::open(&root).unwrap(), &env, BlobConfig::default());
        b.handle(start(id, data.len() as u64, ALICE, &[BOB]));
        send(&mut b, id, &data, 0, MAX_BLOB_DATA);
        assert_eq!(b.handle(finish(id, ALICE)), status(id, data.len() as u64, true));
        b.handle(start(pid, partial.len() as u64, ALICE, &[BOB]));
        send(&mut b, pid, &partial[..3000], 0, 1000);
    }
    let shard = root.join(format!("{:02x}", id.0[0]));
    assert!(shard.join(format!("{id}.blob")).exists());
    assert!(!shard.join(format!("{id}.part")).exists());
    // What a crash between two steps leaves: a record being replaced, bytes
    // without a record.
    std::fs::write(shard.join(format!("{id}.meta.tmp")), b"half").unwrap();
    let orphan = BlobId([0xee; 32]);
    let orphan_dir = root.join("ee");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    std::fs::write(orphan_dir.join(format!("{orphan}.part")), b"lost").unwrap();
    let env = self::env();
    let mut b = open(Dir::open(&root).unwrap(), &env, BlobConfig::default());
    assert!(!shard.join(format!("{id}.meta.tmp")).exists());
    assert!(!orphan_dir.join(format!("{orphan}.part")).exists());
    assert_eq!(b.stats().uploads, 1);
    assert_eq!(read_all(&mut b, id, BOB, data.len()), data);
    assert_eq!(
        b.handle(start(pid, partial.len() as u64, ALICE, &[BOB])),
        status(pid, 3000, false)
    );
    send(&mut b, pid, &partial, 3000, 1000);
    assert_eq!(b.handle(finish(pid, ALICE)), status(pid, partial.len() as u64, true));
    assert_eq!(read_all(&mut b, pid, BOB, partial.len()), partial);
    assert_eq!(b.handle(BlobOp::Fetched { device: BOB, id }), BlobOutcome::Done);
    assert!(!shard.join(format!("{id}.blob")).exists());
    assert!(!shard.join(format!("{id}.meta")).exists());
    // Only the other blob is counted now.
    let counted = env.used.load(Ordering::SeqCst);
    assert!(
        counted > partial.len() as u64 && counted < partial.len() as u64 + 200,
        "{counted}"
    );
}
