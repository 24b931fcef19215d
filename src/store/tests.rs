use bytes::Bytes;

use super::*;
use crate::ids::{DeviceKey, UserId};
use crate::session::Identity;
use crate::wire::{DeviceId, MAX_DEVICES_PER_USER, MsgId};
use std::time::Duration;

/// Opens the store, waiting while an instance this test just dropped still
/// holds the lock: sled's background threads can keep the database file
/// open for a moment after the last handle goes (about one reopen in 300).
fn try_open(dir: &Path) -> Result<Store, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir, &StoreConfig::default()) {
            Err(StoreError::Locked) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            r => return r,
        }
    }
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
    a.request_link(by, 0, std::time::Duration::from_millis(expires_ms))
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

#[test]
fn server_key_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = open(dir.path()).server_key().public;
    let k2 = open(dir.path()).server_key().public;
    assert_eq!(k1, k2);
    assert!(
        fs::read_to_string(dir.path().join("FORMAT"))
            .unwrap()
            .starts_with("tidings-data 2")
    );
}

/// A new data directory is written in the current format, not taken for
/// format 0 (sled creates `db/conf` while opening, so the check for an
/// existing database must look before that) and run through migrations.
#[test]
fn a_new_directory_is_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // The format 1 → 2 migration leaves its marker in the queues tree.
    assert_eq!(s.queues.get(b"v2").unwrap(), None);
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
        "tidings-data 2\n"
    );
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

    assert_eq!(a.identify(&[4; 32]).unwrap(), Identity::Device(alice2));
    assert_eq!(a.identify(&[9; 32]).unwrap(), Identity::Unregistered);
    assert!(a.revoke(alice2, 20).unwrap());
    assert!(!a.revoke(alice2, 20).unwrap());
    assert_eq!(a.identify(&[4; 32]).unwrap(), Identity::Revoked);
    let mut devs = Vec::new();
    assert!(a.current_devices(alice.user, &mut devs));
    assert_eq!(devs, vec![DeviceId(1)]);

    // All of it survives a reopen.
    s.flush().unwrap();
    drop(s);
    let s = open(dir.path());
    let a = s.accounts();
    assert_eq!(a.user_id("bob"), Some(bob.user));
    assert_eq!(a.identify(&[4; 32]).unwrap(), Identity::Revoked);
    assert_eq!(a.identify(&[1; 32]).unwrap(), Identity::Device(alice));
    // Device numbers are not reused.
    let link = link_code(a, alice, 1000);
    assert_eq!(a.redeem_link(&link, &[6; 32], 10).unwrap(), Ok(dev(1, 3)));
    assert_eq!(
        a.users().iter().map(|u| (&*u.0, u.2)).collect::<Vec<_>>(),
        vec![("alice", 2), ("bob", 1)]
    );
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
/// the database, valid ones stay.
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
    let links = s.db.open_tree("link_codes").unwrap();
    let invites = s.db.open_tree("invites").unwrap();
    assert_eq!((invites.len(), links.len()), (3, 2));
    assert_eq!(a.sweep_codes(50).unwrap(), (0, 0));
    assert_eq!(a.sweep_codes(100).unwrap(), (1, 1));
    assert_eq!((invites.len(), links.len()), (2, 1));
    assert_eq!(a.outstanding_links(alice.user, 100), 1);
    assert_eq!(a.redeem_link(&young, &[2; 32], 200).unwrap(), Ok(dev(1, 2)));
    assert_eq!(a.sweep_codes(20_000).unwrap(), (1, 0));
    assert_eq!((invites.len(), links.len()), (1, 0));
    a.register(&forever, "bob", &[3; 32], 20_000).unwrap().unwrap();
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

#[test]
fn append_read_ack_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a1, b1, b2) = (dev(1, 1), dev(2, 1), dev(2, 2));
    let bodies = [(b1, Bytes::from_static(b"for b1")), (b2, Bytes::from_static(b"for b2"))];
    let first = s.append(a1, MsgId([1; 16]), UserId(2), &bodies, 1000).unwrap();
    assert!(matches!(first, Appended::New { time_ms: 1000, .. }));
    let again = s.append(a1, MsgId([1; 16]), UserId(2), &bodies, 2000).unwrap();
    assert!(matches!(again, Appended::Duplicate { time_ms: 1000, .. }));
    s.append(a1, MsgId([2; 16]), UserId(2), &bodies[..1], 3000).unwrap();
    let mut out = Vec::new();
    s.read_queue(b1, 0, 10, &mut out).unwrap();
    assert_eq!(
        out.iter().map(|(seq, m)| (*seq, msg(m).id)).collect::<Vec<_>>(),
        vec![(1, MsgId([1; 16])), (2, MsgId([2; 16]))]
    );
    assert_eq!(msg(&out[0].1).body, Bytes::from_static(b"for b1"));
    assert_eq!(msg(&out[0].1).from(), a1);
    assert_eq!(s.last_seq(b1).unwrap(), 2);
    assert_eq!(s.last_seq(b2).unwrap(), 1);
    assert_eq!(s.ack(b1, 1).unwrap(), 1);
    out.clear();
    s.read_queue(b1, 0, 10, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 2);
    // Sequence numbers survive an emptied queue and a reopen.
    s.ack(b1, 2).unwrap();
    s.flush().unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.last_seq(b1).unwrap(), 2);
    s.append(a1, MsgId([3; 16]), UserId(2), &bodies[..1], 4000).unwrap();
    out.clear();
    s.read_queue(b1, 0, 10, &mut out).unwrap();
    assert_eq!(out[0].0, 3);
    assert_eq!(s.dedup_lookup(a1, MsgId([1; 16])).unwrap(), Some(1000));
}

#[test]
fn flusher_makes_epochs_durable() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let f = s.flusher().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    f.on_flush(move || {
        let _ = tx.lock().unwrap().send(());
    });
    let handle = f.start().unwrap();
    let op = Op::Append {
        sender: dev(1, 1),
        id: MsgId([1; 16]),
        to: UserId(2),
        bodies: vec![(dev(2, 1), Bytes::from_static(b"x"))],
        now_ms: 1,
    };
    let (outcomes, epoch) = s.apply(&[op]).unwrap();
    assert!(matches!(outcomes[..], [Outcome::Appended(Appended::New { .. })]));
    while f.durable() < epoch {
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    }
    assert!(f.flushes() >= 1);
    f.stop();
    handle.join().unwrap();
}

#[test]
fn concurrent_claims_never_hand_out_a_key_twice() {
    use crate::wire::{IdentityKeys, Signature, SignedKey};
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(dir.path()));
    let bob = dev(2, 1);
    let sig = Signature([0; 64]);
    let identity = IdentityKeys {
        curve25519: [1; 32],
        ed25519: [2; 32],
        signature: sig,
    };
    let keys: Vec<SignedKey> = (0..MAX_ONE_TIME_KEYS as u8)
        .map(|n| SignedKey {
            key: [n; 32],
            signature: sig,
        })
        .collect();
    let fallback = SignedKey {
        key: [0xff; 32],
        signature: sig,
    };
    assert_eq!(
        s.publish_keys(bob, Some(&identity), &keys, Some(&fallback))
            .unwrap()
            .unwrap()
            .0,
        100
    );
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || (0..20).map(|_| s.claim_keys(bob).unwrap().unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let claims: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
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
    assert_eq!(s.one_time_count(bob).unwrap(), 0);
}

fn ids_of(s: &Store, d: DeviceKey) -> Vec<(u64, Entry)> {
    let mut out = Vec::new();
    s.read_queue(d, 0, 1000, &mut out).unwrap();
    out
}

#[test]
fn receipts_fold_while_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (alice, bob) = (dev(1, 1), dev(2, 1));
    for i in 0..5u8 {
        s.append_receipt(
            bob,
            UserId(1),
            crate::wire::ReceiptKind::DELIVERED,
            &[MsgId([i; 16])],
            &[alice],
            i as u64,
        )
        .unwrap()
        .unwrap();
    }
    s.append_receipt(
        bob,
        UserId(1),
        crate::wire::ReceiptKind::READ,
        &[MsgId([0; 16])],
        &[alice],
        9,
    )
    .unwrap()
    .unwrap();
    let q = ids_of(&s, alice);
    assert_eq!(q.len(), 2, "{q:?}");
    match &q[0].1 {
        Entry::Receipt(r) => {
            assert_eq!(r.kind, 1);
            assert_eq!(r.ids.len(), 5);
            assert_eq!(r.time_ms, 4);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&q[1].1, Entry::Receipt(r) if r.kind == 2));
    assert_eq!(s.queue_len(alice).unwrap(), 2);
    // Once acknowledged, the next receipt starts a new entry.
    s.ack(alice, q[1].0).unwrap();
    s.append_receipt(
        bob,
        UserId(1),
        crate::wire::ReceiptKind::DELIVERED,
        &[MsgId([7; 16])],
        &[alice],
        10,
    )
    .unwrap()
    .unwrap();
    let q = ids_of(&s, alice);
    assert!(matches!(&q[..], [(_, Entry::Receipt(r))] if r.ids == vec![MsgId([7; 16])]));
}

#[test]
fn receipts_about_different_conversations_are_not_folded_together() {
    // Bob's device 1 reads a message of alice's, then one of carol's; his
    // device 2, offline, gets a copy of each receipt. Folding them into one
    // entry would tell it that carol's message belongs to the conversation
    // with alice (spec §5.5: receipts fold per reporting device, kind and
    // conversation).
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (bob1, bob2) = (dev(2, 1), dev(2, 2));
    let (alice, carol) = (UserId(1), UserId(3));
    let read = crate::wire::ReceiptKind::READ;
    s.append_receipt(bob1, alice, read, &[MsgId([1; 16])], &[bob2], 1)
        .unwrap()
        .unwrap();
    s.append_receipt(bob1, carol, read, &[MsgId([3; 16])], &[bob2], 2)
        .unwrap()
        .unwrap();
    s.append_receipt(bob1, alice, read, &[MsgId([2; 16])], &[bob2], 3)
        .unwrap()
        .unwrap();
    let q = ids_of(&s, bob2);
    let receipts: Vec<(u32, Vec<MsgId>)> = q
        .iter()
        .map(|(_, e)| match e {
            Entry::Receipt(r) => (r.to_user, r.ids.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        receipts,
        vec![(3, vec![MsgId([3; 16])]), (1, vec![MsgId([1; 16]), MsgId([2; 16])])]
    );
    assert_eq!(s.queue_len(bob2).unwrap(), 2);
}

#[test]
fn the_sweep_forgets_fold_records_of_entries_that_are_gone() {
    // The fold index says which entry of a queue later receipts fold into,
    // so it names who sent receipts to whom. Once that entry is
    // acknowledged the record is useless, and the sweep must not keep it
    // past the entries it was about (spec §10, §12).
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (alice, bob) = (dev(1, 1), dev(2, 1));
    let fold_records = |s: &Store| s.queues.scan_prefix(b"r").count();
    let read = crate::wire::ReceiptKind::READ;
    s.append_receipt(bob, UserId(1), read, &[MsgId([1; 16])], &[alice], 1)
        .unwrap()
        .unwrap();
    assert_eq!(fold_records(&s), 1);
    let mut cursor = Vec::new();
    // Still waiting: kept, and folding still works.
    while !s.sweep(&mut cursor, 0, 1000, 2).unwrap().wrapped {}
    assert_eq!(fold_records(&s), 1);
    s.append_receipt(bob, UserId(1), read, &[MsgId([2; 16])], &[alice], 3)
        .unwrap()
        .unwrap();
    assert_eq!(ids_of(&s, alice).len(), 1);
    // Acknowledged: the next pass forgets the record.
    s.ack(alice, u64::MAX).unwrap();
    while !s.sweep(&mut cursor, 0, 1000, 4).unwrap().wrapped {}
    assert_eq!(fold_records(&s), 0);
    // A receipt after that starts a new entry, as before.
    s.append_receipt(bob, UserId(1), read, &[MsgId([3; 16])], &[alice], 5)
        .unwrap()
        .unwrap();
    assert!(matches!(&ids_of(&s, alice)[..], [(_, Entry::Receipt(r))] if r.ids == vec![MsgId([3; 16])]));
}

#[test]
fn retract_removes_queued_copies_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a1, a2, b1, b2) = (dev(1, 1), dev(1, 2), dev(2, 1), dev(2, 2));
    let bodies = [
        (b1, Bytes::from_static(b"x")),
        (b2, Bytes::from_static(b"y")),
        (a2, Bytes::from_static(b"z")),
    ];
    s.append(a1, MsgId([1; 16]), UserId(2), &bodies, 1).unwrap();
    s.append(a1, MsgId([2; 16]), UserId(2), &bodies, 2).unwrap();
    // b2 already took the first one.
    s.ack(b2, 1).unwrap();
    // Any device of the sender's user may retract.
    let (removed, _) = s.retract(&[a1, a2], MsgId([1; 16])).unwrap();
    assert_eq!(removed, 2);
    for d in [b1, b2, a2] {
        let q = ids_of(&s, d);
        assert!(q.iter().all(|(_, e)| msg(e).id == MsgId([2; 16])), "{d}: {q:?}");
    }
    assert_eq!(s.queue_len(b1).unwrap(), 1);
    // Another user's message cannot be retracted by this one.
    assert_eq!(s.retract(&[b1], MsgId([2; 16])).unwrap().0, 0);
    // The dedup record stays: a late retry is not stored again.
    assert!(matches!(
        s.append(a1, MsgId([1; 16]), UserId(2), &bodies, 3).unwrap(),
        Appended::Duplicate { .. }
    ));
}

#[test]
fn quotas_refuse_and_drop_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 3,
            queue_bytes: 1 << 20,
            disk_budget: u64::MAX,
        },
        ..Default::default()
    };
    let s = Store::open(dir.path(), &config).unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    for i in 0..3u8 {
        assert!(matches!(
            s.append(a, MsgId([i; 16]), UserId(2), &[(b, Bytes::from_static(b"x"))], 1)
                .unwrap(),
            Appended::New { .. }
        ));
    }
    assert_eq!(
        s.append(a, MsgId([9; 16]), UserId(2), &[(b, Bytes::from_static(b"x"))], 1)
            .unwrap(),
        Appended::OverQuota(Quota::Queue(b))
    );
    assert_eq!(s.queue_len(b).unwrap(), 3);
    // Not remembered as sent: after an ack it goes through.
    s.ack(b, 1).unwrap();
    assert!(matches!(
        s.append(a, MsgId([9; 16]), UserId(2), &[(b, Bytes::from_static(b"x"))], 1)
            .unwrap(),
        Appended::New { .. }
    ));
    // Bytes.
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 100,
            queue_bytes: 300,
            disk_budget: u64::MAX,
        },
        ..Default::default()
    };
    let s = Store::open(dir.path(), &config).unwrap();
    let body = Bytes::from(vec![0u8; 200]);
    assert!(matches!(
        s.append(a, MsgId([1; 16]), UserId(2), &[(b, body.clone())], 1).unwrap(),
        Appended::New { .. }
    ));
    assert_eq!(
        s.append(a, MsgId([2; 16]), UserId(2), &[(b, body)], 1).unwrap(),
        Appended::OverQuota(Quota::Queue(b))
    );
    // The disk budget.
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quotas: Quotas {
            disk_budget: 1,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let s = Store::open(dir.path(), &config).unwrap();
    assert_eq!(
        s.append(a, MsgId([1; 16]), UserId(2), &[(b, Bytes::from_static(b"x"))], 1)
            .unwrap(),
        Appended::OverQuota(Quota::Disk)
    );
}

#[test]
fn retention_expires_with_notices_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let invite = s.accounts().create_invite(3, None).unwrap();
    let alice = s.accounts().register(&invite, "alice", &[1; 32], 0).unwrap().unwrap();
    let bob = s.accounts().register(&invite, "bob", &[2; 32], 0).unwrap().unwrap();
    let link = link_code(s.accounts(), alice, 10_000);
    let alice2 = s.accounts().redeem_link(&link, &[3; 32], 0).unwrap().unwrap();
    // Old messages at t=100 and t=200, a fresh one at t=5000.
    for (i, t) in [(1u8, 100), (2, 200), (3, 5000)] {
        s.append(alice, MsgId([i; 16]), bob.user, &[(bob, Bytes::from_static(b"x"))], t)
            .unwrap();
    }
    let mut cursor = Vec::new();
    let mut total = Swept::default();
    // Small turns: bounded work each, until the pass wraps.
    for _ in 0..100 {
        let swept = s.sweep(&mut cursor, 1000, 2, 6000).unwrap();
        total.expired += swept.expired;
        total.notified.extend(swept.notified);
        if swept.wrapped {
            break;
        }
    }
    assert_eq!(total.expired, 2);
    let q = ids_of(&s, bob);
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(matches!(&q[0].1, Entry::Message(m) if m.id == MsgId([3; 16])));
    match &q[1].1 {
        Entry::Gap(g) => {
            assert_eq!(g.lost.len(), 1);
            assert_eq!((g.lost[0].count, g.lost[0].first_ms, g.lost[0].last_ms), (2, 100, 200));
            assert_eq!((g.lost[0].from_user, g.lost[0].from_device), (alice.user.0, 1));
        }
        other => panic!("{other:?}"),
    }
    for d in [alice, alice2] {
        let q = ids_of(&s, d);
        match &q[..] {
            [(_, Entry::Expired(e))] => {
                assert_eq!(e.ids, vec![MsgId([1; 16]), MsgId([2; 16])]);
                assert_eq!((e.device_user, e.device), (bob.user.0, 1));
            }
            other => panic!("{d}: {other:?}"),
        }
        assert!(total.notified.contains(&d));
    }
    // Dedup records of expired messages are forgotten too.
    assert_eq!(s.dedup_lookup(alice, MsgId([1; 16])).unwrap(), None);
    assert_eq!(s.dedup_lookup(alice, MsgId([3; 16])).unwrap(), Some(5000));
    assert_eq!(s.queue_len(bob).unwrap(), 2);
}

#[test]
fn format_1_directories_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    {
        let s = open(dir.path());
        // Write what format 1 wrote: a bare message value, a bare time as
        // dedup value, an 8-byte next-sequence record.
        let old = QueuedMessage {
            id: MsgId([5; 16]),
            from_user: 1,
            from_device: 1,
            to_user: 2,
            time_ms: 77,
            body: Bytes::from_static(b"old"),
        };
        let mut qk = vec![b'q'];
        qk.extend_from_slice(&2u32.to_be_bytes());
        qk.extend_from_slice(&1u32.to_be_bytes());
        qk.extend_from_slice(&1u64.to_be_bytes());
        s.queues.insert(qk, postcard::to_stdvec(&old).unwrap()).unwrap();
        let mut nk = vec![b'n'];
        nk.extend_from_slice(&2u32.to_be_bytes());
        nk.extend_from_slice(&1u32.to_be_bytes());
        s.queues.insert(nk, &2u64.to_be_bytes()).unwrap();
        let mut dk = vec![b'd'];
        dk.extend_from_slice(&1u32.to_be_bytes());
        dk.extend_from_slice(&1u32.to_be_bytes());
        dk.extend_from_slice(&[5; 16]);
        s.queues.insert(dk, &77u64.to_be_bytes()).unwrap();
        s.queues.remove(b"v2").unwrap();
        s.flush().unwrap();
    }
    fs::write(dir.path().join("FORMAT"), "tidings-data 1\n").unwrap();
    let s = open(dir.path());
    assert_eq!(
        fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        "tidings-data 2\n"
    );
    let q = ids_of(&s, b);
    assert_eq!(q.len(), 1);
    assert_eq!(msg(&q[0].1).body, Bytes::from_static(b"old"));
    assert_eq!(s.dedup_lookup(a, MsgId([5; 16])).unwrap(), Some(77));
    assert_eq!(s.queue_usage(b).unwrap().0, 1);
    assert_eq!(s.last_seq(b).unwrap(), 1);
    // A rerun (as after a crash before FORMAT was written) changes nothing.
    drop(s);
    fs::write(dir.path().join("FORMAT"), "tidings-data 1\n").unwrap();
    let s = open(dir.path());
    assert_eq!(msg(&ids_of(&s, b)[0].1).body, Bytes::from_static(b"old"));
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
    {
        let s = Store::open(dir.path(), &config).unwrap();
        let body = Bytes::from(vec![0u8; 300]);
        for i in 0..3u8 {
            assert!(matches!(
                s.append(a, MsgId([i; 16]), UserId(2), &[(b, body.clone())], 1).unwrap(),
                Appended::New { .. }
            ));
        }
        let used = s.queued_bytes();
        assert_eq!(used, s.queue_usage(b).unwrap().1);
        assert_eq!(
            s.append(a, MsgId([9; 16]), UserId(2), &[(b, body.clone())], 1).unwrap(),
            Appended::OverQuota(Quota::Disk)
        );
        // Receipts cannot fill it either.
        let ids: Vec<MsgId> = (0..64u8).map(|i| MsgId([i; 16])).collect();
        assert_eq!(
            s.append_receipt(b, UserId(1), crate::wire::ReceiptKind::READ, &ids, &[a], 1)
                .unwrap(),
            Err(Quota::Disk)
        );
        // An ack frees budget at once.
        s.ack(b, 2).unwrap();
        assert!(s.queued_bytes() < used);
        assert!(matches!(
            s.append(a, MsgId([9; 16]), UserId(2), &[(b, body)], 1).unwrap(),
            Appended::New { .. }
        ));
        s.flush().unwrap();
    }
    // Counted again on open.
    let s = Store::open(dir.path(), &config).unwrap();
    assert_eq!(s.queued_bytes(), s.queue_usage(b).unwrap().1);
}

#[test]
fn receipts_that_start_an_entry_count_against_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dev(1, 1), dev(2, 1));
    let config = StoreConfig {
        quotas: Quotas {
            queue_messages: 2,
            ..Quotas::default()
        },
        ..Default::default()
    };
    let s = Store::open(dir.path(), &config).unwrap();
    let read = crate::wire::ReceiptKind::READ;
    let delivered = crate::wire::ReceiptKind::DELIVERED;
    s.append_receipt(b, UserId(1), read, &[MsgId([1; 16])], &[a], 1)
        .unwrap()
        .unwrap();
    s.append_receipt(b, UserId(1), delivered, &[MsgId([1; 16])], &[a], 1)
        .unwrap()
        .unwrap();
    // Folding into a waiting entry is fine; a third entry is not.
    s.append_receipt(b, UserId(1), read, &[MsgId([2; 16])], &[a], 1)
        .unwrap()
        .unwrap();
    assert_eq!(s.queue_len(a).unwrap(), 2);
    assert_eq!(
        s.append_receipt(dev(3, 1), UserId(1), read, &[MsgId([3; 16])], &[a], 1)
            .unwrap(),
        Err(Quota::Queue(a))
    );
    assert_eq!(s.queue_len(a).unwrap(), 2);
}

#[test]
fn one_batch_of_many_ops_sees_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    let x = || vec![(b, Bytes::from_static(b"x"))];
    let read = crate::wire::ReceiptKind::READ;
    let ops = [
        Op::Append {
            sender: a,
            id: MsgId([1; 16]),
            to: UserId(2),
            bodies: x(),
            now_ms: 1,
        },
        Op::Append {
            sender: a,
            id: MsgId([1; 16]),
            to: UserId(2),
            bodies: x(),
            now_ms: 2,
        },
        Op::Append {
            sender: a,
            id: MsgId([2; 16]),
            to: UserId(2),
            bodies: x(),
            now_ms: 3,
        },
        Op::Receipt {
            from: b,
            to: UserId(1),
            kind: read,
            ids: vec![MsgId([1; 16])],
            targets: vec![a],
            now_ms: 4,
        },
        Op::Receipt {
            from: b,
            to: UserId(1),
            kind: read,
            ids: vec![MsgId([2; 16])],
            targets: vec![a],
            now_ms: 5,
        },
    ];
    let (outcomes, _) = s.apply(&ops).unwrap();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Appended(Appended::New { time_ms: 1 }),
            Outcome::Appended(Appended::Duplicate { time_ms: 1 }),
            Outcome::Appended(Appended::New { time_ms: 3 }),
            Outcome::Receipt(Ok(())),
            Outcome::Receipt(Ok(())),
        ]
    );
    assert_eq!(ids_of(&s, b).len(), 2);
    let receipts = ids_of(&s, a);
    assert!(
        matches!(&receipts[..], [(_, Entry::Receipt(r))] if r.ids.len() == 2),
        "{receipts:?}"
    );
    assert_eq!(s.queue_usage(a).unwrap().0, 1);
    // Overlapping acks in one batch count each entry once.
    let (outcomes, _) = s
        .apply(&[Op::Ack { device: b, up_to: 1 }, Op::Ack { device: b, up_to: 2 }])
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Acked(1), Outcome::Acked(1)]);
    assert_eq!(s.queue_usage(b).unwrap(), (0, 0));
    assert_eq!(s.queued_bytes(), s.queue_usage(a).unwrap().1);
}

#[test]
fn reads_see_exactly_what_is_on_disk_after_folds_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (a, b) = (dev(1, 1), dev(2, 1));
    let read = crate::wire::ReceiptKind::READ;
    let receipt = |i: u8| Op::Receipt {
        from: b,
        to: UserId(1),
        kind: read,
        ids: vec![MsgId([i; 16])],
        targets: vec![a],
        now_ms: i as u64,
    };
    // Three folds in one batch: the first two entries are replaced within it.
    s.apply(&[receipt(1), receipt(2), receipt(3)]).unwrap();
    // What sled holds, bypassing the in-memory tail.
    let mut on_disk = Vec::new();
    for item in s.queues.scan_prefix([b'q']) {
        let (_, v) = item.unwrap();
        on_disk.push(decode_entry(&v).unwrap());
    }
    assert_eq!(on_disk.len(), 1);
    // A read from the first sequence this batch gave out is served by the
    // tail; it must hold what sled holds, nothing folded away.
    let mut from_tail = Vec::new();
    s.read_queue(a, 1, 100, &mut from_tail).unwrap();
    assert_eq!(from_tail.len(), 1, "{from_tail:?}");
    assert_eq!(from_tail[0].1, on_disk[0]);
}
