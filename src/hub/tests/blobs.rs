//! The blob frames (spec §5.7) against the test store's blob rules: an
//! upload, its checks and its refusals, downloads and who may make them,
//! grants, and the bounds on requests in flight.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::store::BlobConfig;
use crate::store::testing::TestStore;
use crate::wire::{BlobGrant, BlobId, Download, MAX_BLOB_DATA, MAX_BLOB_USERS, UploadChunk, UploadStart, UploadStatus};

/// alice (devices 1 and 2), bob and carol, each device 1 online on the
/// connection of its user's number.
fn rig(config: BlobConfig) -> Rig {
    let store = Arc::new(TestStore::with_blobs(config));
    let shared = Shared::new(store.clone() as Arc<dyn StoreApi>, HubConfig::default());
    let mut r = Rig {
        store,
        hub: Hub::new(shared, 0, Sink::new(|| {})),
        now: Now {
            mono: Instant::now(),
            unix_ms: 1_795_000_000_000,
        },
        keys: Vec::new(),
    };
    let keys: Vec<_> = (0..4).map(|_| r.key()).collect();
    r.store.add_user("alice", &keys[..2]);
    r.store.add_user("bob", &keys[2..3]);
    r.store.add_user("carol", &keys[3..4]);
    for user in 1..=3 {
        r.online(u64::from(user), dev(user, 1));
    }
    r
}

fn id_of(data: &[u8]) -> BlobId {
    BlobId(
        ring::digest::digest(&ring::digest::SHA256, data)
            .as_ref()
            .try_into()
            .unwrap(),
    )
}

fn start(id: BlobId, size: u64, to: &[&str]) -> ClientFrame {
    ClientFrame::UploadStart(UploadStart {
        id,
        size,
        to: to.iter().map(|s| s.to_string()).collect(),
    })
}

fn chunk(id: BlobId, offset: u64, data: &[u8]) -> ClientFrame {
    ClientFrame::UploadChunk(UploadChunk {
        id,
        offset,
        data: Bytes::copy_from_slice(data),
    })
}

fn download(id: BlobId, offset: u64, len: u32) -> ClientFrame {
    ClientFrame::Download(Download { id, offset, len })
}

impl Rig {
    /// A frame from `user`'s device 1 on its connection, and the answer
    /// once the store ran.
    fn ask(&mut self, user: u32, req: u32, frame: ClientFrame) -> ServerFrame {
        let mut got = self.frame(u64::from(user), dev(user, 1), req, frame);
        got.extend(self.settle());
        match &frames_to(&got, u64::from(user))[..] {
            [(r, f)] if *r == req => f.clone(),
            other => panic!("expected one answer to {req}: {other:?}"),
        }
    }

    /// Uploads (or finishes uploading) `data` from alice's device 1 for
    /// `to`.
    fn upload(&mut self, data: &[u8], to: &[&str]) -> BlobId {
        let id = id_of(data);
        let got = self.ask(1, 1, start(id, data.len() as u64, to));
        let ServerFrame::UploadStatus(UploadStatus {
            received,
            complete: false,
            ..
        }) = got
        else {
            panic!("{got:?}")
        };
        for (i, part) in data.chunks(MAX_BLOB_DATA).enumerate() {
            let offset = (i * MAX_BLOB_DATA) as u64;
            if offset < received {
                continue;
            }
            let got = self.ask(1, 2 + i as u32, chunk(id, offset, part));
            assert!(
                matches!(got, ServerFrame::UploadStatus(s) if s.received == offset + part.len() as u64),
                "{got:?}"
            );
        }
        let got = self.ask(1, 999, ClientFrame::UploadFinish { id });
        assert_eq!(
            got,
            ServerFrame::UploadStatus(UploadStatus {
                id,
                received: data.len() as u64,
                complete: true
            })
        );
        id
    }
}

fn error(f: &ServerFrame) -> Option<ErrorCode> {
    match f {
        ServerFrame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn an_upload_is_downloaded_by_its_readers_only() {
    let mut r = rig(BlobConfig::default());
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let id = id_of(&data);
    // Not readable before it is finished.
    r.ask(1, 1, start(id, data.len() as u64, &["bob"]));
    r.ask(1, 2, chunk(id, 0, &data[..MAX_BLOB_DATA]));
    assert_eq!(error(&r.ask(2, 1, download(id, 0, 100))), Some(ErrorCode::UNKNOWN_BLOB));
    // Resumed: the start again says how far it got.
    let again = r.ask(1, 3, start(id, data.len() as u64, &["bob"]));
    assert!(matches!(again, ServerFrame::UploadStatus(s) if s.received == MAX_BLOB_DATA as u64 && !s.complete));
    let id = r.upload(&data, &["bob"]);
    let mut got = Vec::new();
    while got.len() < data.len() {
        match r.ask(2, 10, download(id, got.len() as u64, MAX_BLOB_DATA as u32)) {
            ServerFrame::BlobData(d) => got.extend_from_slice(&d.data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, data);
    // Carol may not: the same answer as for no blob at all.
    assert_eq!(error(&r.ask(3, 1, download(id, 0, 100))), Some(ErrorCode::UNKNOWN_BLOB));
    assert_eq!(
        error(&r.ask(3, 2, download(BlobId([1; 32]), 0, 100))),
        Some(ErrorCode::UNKNOWN_BLOB)
    );
    // Bob forwards it to carol, who may then.
    let grant = ClientFrame::BlobGrant(BlobGrant {
        id,
        to: vec!["carol".into()],
    });
    assert_eq!(r.ask(2, 11, grant), ServerFrame::Done);
    assert!(matches!(r.ask(3, 3, download(id, 0, 100)), ServerFrame::BlobData(d) if d.data.len() == 100));
    // Every device it was for has it: gone.
    for (user, device) in [(2, 1), (3, 1)] {
        let f = r.frame(u64::from(user), dev(user, device), 20, ClientFrame::BlobFetched { id });
        assert!(f.is_empty());
    }
    r.settle();
    assert!(
        r.store.with_blob_files(|f| f.blobs.contains_key(&id)),
        "alice's device 2 has not"
    );
    r.online(4, dev(1, 2));
    r.frame(4, dev(1, 2), 1, ClientFrame::BlobFetched { id });
    r.settle();
    assert!(!r.store.with_blob_files(|f| f.blobs.contains_key(&id)));
    assert_eq!(
        error(&r.ask(2, 12, download(id, 0, 100))),
        Some(ErrorCode::UNKNOWN_BLOB)
    );
    assert_eq!(r.hub.shared().blob_memory(), 0);
}

#[test]
fn bad_blob_requests_are_refused_with_their_codes() {
    let mut r = rig(BlobConfig {
        max_size: 100_000,
        user_budget: 160_000,
        ..BlobConfig::default()
    });
    let id = BlobId([5; 32]);
    assert_eq!(
        error(&r.ask(1, 1, start(id, 10, &["nobody"]))),
        Some(ErrorCode::UNKNOWN_USER)
    );
    assert_eq!(
        error(&r.ask(1, 2, start(id, 0, &["bob"]))),
        Some(ErrorCode::BAD_REQUEST)
    );
    let many: Vec<String> = (0..=MAX_BLOB_USERS).map(|_| "bob".to_string()).collect();
    let names: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(error(&r.ask(1, 3, start(id, 10, &names))), Some(ErrorCode::BAD_REQUEST));
    assert_eq!(
        error(&r.ask(1, 4, start(id, crate::wire::sealed_len(100_000) + 1, &["bob"]))),
        Some(ErrorCode::BLOB_TOO_LARGE)
    );
    assert!(matches!(
        r.ask(1, 5, start(id, 90_000, &["bob"])),
        ServerFrame::UploadStatus(_)
    ));
    assert_eq!(
        error(&r.ask(1, 6, start(BlobId([6; 32]), 90_000, &["bob"]))),
        Some(ErrorCode::BLOB_BUDGET)
    );
    let big = vec![0u8; MAX_BLOB_DATA + 1];
    assert_eq!(error(&r.ask(1, 7, chunk(id, 0, &big))), Some(ErrorCode::BAD_REQUEST));
    assert_eq!(error(&r.ask(1, 8, chunk(id, 0, &[]))), Some(ErrorCode::BAD_REQUEST));
    assert_eq!(error(&r.ask(1, 9, chunk(id, 5, b"late"))), Some(ErrorCode::BAD_REQUEST));
    assert_eq!(
        error(&r.ask(2, 1, download(id, 0, MAX_BLOB_DATA as u32 + 1))),
        Some(ErrorCode::BAD_REQUEST)
    );
    // Bytes that are not what the id says: dropped, and said so.
    let bytes = vec![7u8; 90_000];
    for (i, part) in bytes.chunks(MAX_BLOB_DATA).enumerate() {
        r.ask(1, 20 + i as u32, chunk(id, (i * MAX_BLOB_DATA) as u64, part));
    }
    assert_eq!(
        error(&r.ask(1, 30, ClientFrame::UploadFinish { id })),
        Some(ErrorCode::BLOB_MISMATCH)
    );
    // Its budget came back.
    assert!(matches!(
        r.ask(1, 31, start(BlobId([6; 32]), 90_000, &["bob"])),
        ServerFrame::UploadStatus(_)
    ));
    // Below the free-space floor: nothing new, reads go on.
    let id = r.upload(b"small file", &["bob"]);
    r.store.set_full(true);
    assert_eq!(
        error(&r.ask(1, 40, start(BlobId([8; 32]), 10, &["bob"]))),
        Some(ErrorCode::STORAGE_FULL)
    );
    assert_eq!(
        error(&r.ask(1, 41, chunk(BlobId([6; 32]), 0, b"x"))),
        Some(ErrorCode::STORAGE_FULL)
    );
    let grant = ClientFrame::BlobGrant(BlobGrant {
        id,
        to: vec!["carol".into()],
    });
    assert_eq!(error(&r.ask(2, 2, grant)), Some(ErrorCode::STORAGE_FULL));
    assert!(matches!(r.ask(2, 3, download(id, 0, 5)), ServerFrame::BlobData(_)));
}

#[test]
fn requests_in_flight_are_bounded_per_connection() {
    let mut r = rig(BlobConfig::default());
    let data = vec![3u8; 20 * 1000];
    let id = id_of(&data);
    r.ask(1, 1, start(id, data.len() as u64, &["bob"]));
    let window = HubConfig::default().blob_window as usize;
    let mut refused = 0;
    for i in 0..window + 2 {
        let got = r.frame(
            1,
            dev(1, 1),
            10 + i as u32,
            chunk(id, (i * 1000) as u64, &data[i * 1000..(i + 1) * 1000]),
        );
        for (_, f) in frames_to(&got, 1) {
            assert_eq!(error(&f), Some(ErrorCode::RATE_LIMITED));
            refused += 1;
        }
    }
    assert_eq!(refused, 2);
    assert_eq!(r.hub.shared().blob_memory(), (window * 1000) as u64);
    let got = r.settle();
    let statuses = frames_to(&got, 1)
        .into_iter()
        .filter(|(_, f)| matches!(f, ServerFrame::UploadStatus(_)))
        .count();
    assert_eq!(statuses, window);
    assert_eq!(r.hub.shared().blob_memory(), 0);
    // The window is open again.
    let got = r.ask(
        1,
        50,
        chunk(id, (window * 1000) as u64, &data[window * 1000..(window + 1) * 1000]),
    );
    assert!(matches!(got, ServerFrame::UploadStatus(s) if s.received == ((window + 1) * 1000) as u64));
}
