use super::*;
use crate::client::content::{Content, Payload};
use crate::client::history::History;
use crate::wire::MsgId;

fn open(dir: &std::path::Path, passphrase: Option<&str>) -> Result<(History, Crypto), Error> {
    // `History::open` waits out the file lock a just-dropped handle may
    // still hold.
    let h = History::open(dir)?;
    let c = Crypto::open(h.e2e(), passphrase.map(|p| std::sync::Arc::new(Passphrase::new(p))))?;
    Ok((h, c))
}

/// A device with an account and its keys "on the server".
struct Dev {
    _tmp: tempfile::TempDir,
    _db: History,
    c: Crypto,
    server: Vec<SignedKey>,
    fallback: Option<SignedKey>,
}

fn dev() -> Dev {
    let tmp = tempfile::tempdir().unwrap();
    let (db, mut c) = open(tmp.path(), None).unwrap();
    assert!(c.ensure_account().unwrap());
    let p = c.keys_to_publish(Some(0), 1).unwrap().unwrap();
    assert_eq!(p.one_time.len(), ONE_TIME_TARGET as usize);
    assert!(p.fallback.is_some());
    let id = p.identity.unwrap();
    assert!(keys::verify_identity(&id));
    assert!(
        p.one_time
            .iter()
            .chain(&p.fallback)
            .all(|k| keys::verify_signed_key(&id, k))
    );
    c.mark_published();
    c.persist().unwrap();
    Dev {
        _tmp: tmp,
        _db: db,
        c,
        server: p.one_time,
        fallback: p.fallback,
    }
}

impl Dev {
    /// What a claim of this device returns.
    fn claim(&mut self, device: u32) -> DeviceKeys {
        let (one_time, fallback) = match self.server.pop() {
            Some(k) => (Some(k), false),
            None => (self.fallback, true),
        };
        DeviceKeys {
            device: DeviceId(device),
            identity: self.c.identity().unwrap(),
            one_time,
            fallback,
        }
    }
}

fn addr(user: &str, device: u32) -> DeviceAddr {
    DeviceAddr {
        user: user.into(),
        device: DeviceId(device),
    }
}

fn payload(text: &str) -> Vec<u8> {
    Payload {
        id: MsgId([1; 16]),
        to: "bob".into(),
        ts_ms: 5,
        content: Content::Text(text.into()),
    }
    .encode()
    .unwrap()
}

#[test]
fn first_contact_then_both_ways() {
    let mut alice = dev();
    let mut bob = dev();
    let mut notices = Vec::new();
    let keys = bob.claim(1);
    assert!(alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap());
    assert!(notices.is_empty(), "{notices:?}");
    let body = alice.c.encrypt(&addr("bob", 1), &payload("one"), &mut notices).unwrap();
    assert_eq!(Envelope::decode(&body).unwrap().kind, OlmKind::PreKey);
    let body2 = alice.c.encrypt(&addr("bob", 1), &payload("two"), &mut notices).unwrap();
    // Bob: a new inbound session from the first, the same session after.
    let got = bob.c.decrypt(&addr("alice", 1), &body, &mut notices).unwrap().unwrap();
    assert_eq!(got, payload("one"));
    let got = bob.c.decrypt(&addr("alice", 1), &body2, &mut notices).unwrap().unwrap();
    assert_eq!(got, payload("two"));
    // A replay does not decrypt twice.
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &body2, &mut notices).unwrap(),
        Err(DecryptError::Refused)
    );
    // Bob answers on the same session: a normal message.
    let back = bob
        .c
        .encrypt(&addr("alice", 1), &payload("back"), &mut notices)
        .unwrap();
    assert_eq!(Envelope::decode(&back).unwrap().kind, OlmKind::Normal);
    assert_eq!(
        alice.c.decrypt(&addr("bob", 1), &back, &mut notices).unwrap().unwrap(),
        payload("back")
    );
    let normal = alice
        .c
        .encrypt(&addr("bob", 1), &payload("three"), &mut notices)
        .unwrap();
    assert_eq!(Envelope::decode(&normal).unwrap().kind, OlmKind::Normal);
    assert_eq!(
        bob.c
            .decrypt(&addr("alice", 1), &normal, &mut notices)
            .unwrap()
            .unwrap(),
        payload("three")
    );
    // Bob learnt alice's Curve25519 key from the pre-key message.
    let known = bob.c.known(&addr("alice", 1)).unwrap().unwrap();
    assert_eq!(known.curve25519, alice.c.identity().unwrap().curve25519);
    assert_eq!(known.ed25519, None);
    assert!(notices.is_empty(), "{notices:?}");
    // Garbage and bodies from strangers.
    assert_eq!(
        bob.c
            .decrypt(&addr("alice", 1), b"\x00\x01\x03abc", &mut notices)
            .unwrap(),
        Err(DecryptError::Malformed)
    );
    assert_eq!(
        bob.c.decrypt(&addr("carol", 1), &normal, &mut notices).unwrap(),
        Err(DecryptError::NoSession)
    );
}

#[test]
fn sessions_and_account_survive_a_reopen_only_once_written() {
    let mut bob = dev();
    let tmp = tempfile::tempdir().unwrap();
    let mut notices = Vec::new();
    let body = {
        let (_db, mut alice) = open(tmp.path(), None).unwrap();
        alice.ensure_account().unwrap();
        alice.accept_claimed("bob", &bob.claim(1), false, &mut notices).unwrap();
        let body = alice.encrypt(&addr("bob", 1), &payload("x"), &mut notices).unwrap();
        alice.persist().unwrap();
        body
    };
    let (_db, mut alice) = open(tmp.path(), None).unwrap();
    assert!(alice.has_account());
    assert!(alice.has_session(&addr("bob", 1)).unwrap());
    let next = alice.encrypt(&addr("bob", 1), &payload("y"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &body, &mut notices).unwrap().unwrap(),
        payload("x")
    );
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &next, &mut notices).unwrap().unwrap(),
        payload("y")
    );
    // Bob's state, not written: a reopened bob has no session and no
    // longer the one-time key... but its writes were taken, not applied.
    let writes = bob.c.take_writes();
    assert!(
        writes.contains_key(ACCOUNT.to_vec().as_slice()),
        "the account used up a one-time key"
    );
    assert!(writes.keys().any(|k| k.starts_with(b"s\0alice\0")));
}

#[test]
fn claimed_keys_must_verify() {
    let mut alice = dev();
    let mut bob = dev();
    let mut notices = Vec::new();
    let mut keys = bob.claim(1);
    keys.one_time.as_mut().unwrap().key[0] ^= 1;
    assert!(!alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap());
    assert_eq!(
        notices,
        vec![Notice::BadSignature {
            user: "bob".into(),
            device: DeviceId(1)
        }]
    );
    let mut keys = bob.claim(1);
    keys.identity.curve25519[0] ^= 1;
    assert!(!alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap());
    assert!(!alice.c.has_session(&addr("bob", 1)).unwrap());
    assert!(alice.c.known(&addr("bob", 1)).unwrap().is_none());
    // Another device's identity with bob's one-time key.
    let mut keys = bob.claim(1);
    keys.identity = alice.c.identity().unwrap();
    assert!(!alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap());
    // The fallback key, once the one-time keys are gone, is fine.
    bob.server.clear();
    let keys = bob.claim(1);
    assert!(keys.fallback);
    assert!(alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap());
    let body = alice.c.encrypt(&addr("bob", 1), &payload("fb"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &body, &mut notices).unwrap().unwrap(),
        payload("fb")
    );
}

#[test]
fn new_devices_are_news_and_changed_identities_are_warnings() {
    let mut alice = dev();
    let mut bob1 = dev();
    let mut bob2 = dev();
    let mut notices = Vec::new();
    alice
        .c
        .accept_claimed("bob", &bob1.claim(1), false, &mut notices)
        .unwrap();
    alice.c.set_devices("bob", vec![DeviceId(1)]);
    assert!(notices.is_empty());
    alice
        .c
        .accept_claimed("bob", &bob2.claim(2), false, &mut notices)
        .unwrap();
    assert_eq!(
        notices,
        vec![Notice::NewDevice {
            user: "bob".into(),
            device: DeviceId(2)
        }]
    );
    assert_eq!(alice.c.devices("bob").unwrap(), Some(vec![DeviceId(1), DeviceId(2)]));
    notices.clear();
    // The same identity again (a later claim) says nothing.
    alice
        .c
        .accept_claimed("bob", &bob1.claim(1), false, &mut notices)
        .unwrap();
    assert!(notices.is_empty());
    // A server claiming bob's device 1 now has bob2's identity.
    let forged = bob2.claim(1);
    alice.c.accept_claimed("bob", &forged, false, &mut notices).unwrap();
    assert_eq!(
        notices,
        vec![Notice::IdentityChanged {
            user: "bob".into(),
            device: DeviceId(1)
        }]
    );
    assert!(notices[0].is_warning());
    // Sessions bound to the old identity are dropped: the new one is used.
    let known = alice.c.known(&addr("bob", 1)).unwrap().unwrap();
    assert_eq!(known.curve25519, bob2.c.identity().unwrap().curve25519);
    notices.clear();
    // A recipient whose record of a device differs hears it before the
    // message: bob1 thinks alice/1 is someone else.
    let mut other = dev();
    let mut fresh = dev();
    let mut n2 = Vec::new();
    fresh
        .c
        .accept_claimed("other", &other.claim(1), false, &mut n2)
        .unwrap();
    let body = fresh.c.encrypt(&addr("other", 1), &payload("hi"), &mut n2).unwrap();
    other.c.set_known_for_test(
        &addr("fresh", 1),
        Known {
            curve25519: [9; 32],
            ed25519: None,
        },
    );
    other.c.decrypt(&addr("fresh", 1), &body, &mut n2).unwrap().unwrap();
    assert_eq!(
        n2,
        vec![Notice::IdentityChanged {
            user: "fresh".into(),
            device: DeviceId(1)
        }]
    );
    // Forgetting a device drops it from the list.
    alice.c.forget_device(&addr("bob", 2)).unwrap();
    assert_eq!(alice.c.devices("bob").unwrap(), Some(vec![DeviceId(1)]));
    assert!(!alice.c.has_session(&addr("bob", 2)).unwrap());
}

#[test]
fn a_fresh_session_replaces_a_broken_one() {
    let mut alice = dev();
    let mut bob = dev();
    let mut notices = Vec::new();
    alice
        .c
        .accept_claimed("bob", &bob.claim(1), false, &mut notices)
        .unwrap();
    let first = alice.c.encrypt(&addr("bob", 1), &payload("1"), &mut notices).unwrap();
    bob.c.decrypt(&addr("alice", 1), &first, &mut notices).unwrap().unwrap();
    // Bob loses his session state (a restored backup, say).
    bob.c.sessions.clear();
    bob.c.tree.clear_for_test().unwrap();
    bob.c.writes.retain(|k, _| !k.starts_with(b"s\0"));
    let second = alice.c.encrypt(&addr("bob", 1), &payload("2"), &mut notices).unwrap();
    assert!(
        bob.c
            .decrypt(&addr("alice", 1), &second, &mut notices)
            .unwrap()
            .is_err()
    );
    // Bob resets: a new session from alice's fresh keys.
    assert!(bob.c.may_reset(&addr("alice", 1), 1_000_000).unwrap());
    assert!(!bob.c.may_reset(&addr("alice", 1), 1_000_001).unwrap());
    bob.c
        .accept_claimed("alice", &alice.claim(1), true, &mut notices)
        .unwrap();
    let reset = Payload {
        content: Content::SessionReset,
        ..Payload::decode(&payload("")).unwrap()
    };
    let body = bob
        .c
        .encrypt(&addr("alice", 1), &reset.encode().unwrap(), &mut notices)
        .unwrap();
    assert_eq!(
        Payload::decode(&alice.c.decrypt(&addr("bob", 1), &body, &mut notices).unwrap().unwrap())
            .unwrap()
            .content,
        Content::SessionReset
    );
    // Alice now writes on the new session, which bob can read.
    let third = alice.c.encrypt(&addr("bob", 1), &payload("3"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &third, &mut notices).unwrap().unwrap(),
        payload("3")
    );
}

#[test]
fn passphrase_encrypts_the_keys_at_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let identity = {
        let (_db, mut c) = open(tmp.path(), Some("correct horse")).unwrap();
        c.ensure_account().unwrap();
        c.persist().unwrap();
        assert!(c.is_encrypted());
        c.identity().unwrap()
    };
    let e = open(tmp.path(), None).unwrap_err();
    assert!(matches!(e, Error::Passphrase(PassphraseError::Needed)), "{e}");
    let e = open(tmp.path(), Some("battery staple")).unwrap_err();
    assert!(matches!(e, Error::Passphrase(PassphraseError::Wrong)), "{e}");
    let (_db, c) = open(tmp.path(), Some("correct horse")).unwrap();
    assert_eq!(c.identity().unwrap(), identity);
}

#[test]
fn a_plain_profile_is_encrypted_once_a_passphrase_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bob = dev();
    let mut notices = Vec::new();
    let identity = {
        let (_db, mut c) = open(tmp.path(), None).unwrap();
        c.ensure_account().unwrap();
        c.accept_claimed("bob", &bob.claim(1), false, &mut notices).unwrap();
        c.persist().unwrap();
        assert!(!c.is_encrypted());
        c.identity().unwrap()
    };
    {
        let (_db, mut c) = open(tmp.path(), Some("pw")).unwrap();
        assert!(c.is_encrypted());
        assert_eq!(c.identity().unwrap(), identity);
        assert!(c.has_session(&addr("bob", 1)).unwrap());
    }
    assert!(matches!(open(tmp.path(), None), Err(Error::Passphrase(_))));
    let (_db, mut c) = open(tmp.path(), Some("pw")).unwrap();
    let body = c.encrypt(&addr("bob", 1), &payload("z"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("x", 1), &body, &mut notices).unwrap().unwrap(),
        payload("z")
    );
}

#[test]
fn top_ups_and_fallback_rotation() {
    let mut d = dev();
    // Nothing new to publish right after publishing.
    assert!(d.c.keys_to_publish(None, 2).unwrap().is_none());
    assert!(d.c.keys_to_publish(Some(LOW_WATER), 2).unwrap().is_none());
    // Low: back up to the target.
    let p = d.c.keys_to_publish(Some(3), 2).unwrap().unwrap();
    assert_eq!(p.one_time.len(), (ONE_TIME_TARGET - 3) as usize);
    assert!(p.fallback.is_none());
    // Not marked published: offered again, not made again.
    let again = d.c.keys_to_publish(Some(3), 2).unwrap().unwrap();
    assert_eq!(again.one_time, p.one_time);
    assert!(d.c.has_unpublished());
    d.c.mark_published();
    assert!(!d.c.has_unpublished());
    // A week on, a new fallback key.
    let p = d.c.keys_to_publish(None, 1 + FALLBACK_ROTATE_MS).unwrap().unwrap();
    assert!(p.one_time.is_empty());
    assert_ne!(p.fallback, d.fallback);
}

#[test]
fn safety_numbers_are_symmetric_and_cover_every_key() {
    let a = [[1u8; 32], [2; 32]];
    let b = [[3u8; 32]];
    let n = safety_number(("alice", &a), ("bob", &b));
    assert_eq!(n, safety_number(("bob", &b), ("alice", &a)));
    assert_eq!(n.len(), 60 + 11);
    assert!(
        n.split(' ')
            .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit()))
    );
    assert_ne!(n, safety_number(("alice", &a[..1]), ("bob", &b)));
    assert_ne!(n, safety_number(("alice", &[[2u8; 32], [1; 32]]), ("bob", &b)));
    assert_ne!(n, safety_number(("alicf", &a), ("bob", &b)));
    // Fixed: a change of the algorithm changes every user's numbers.
    assert_eq!(
        safety_number(("alice", &[[1u8; 32]]), ("bob", &[[2u8; 32]])),
        safety_number(("alice", &[[1u8; 32]]), ("bob", &[[2u8; 32]]))
    );
}

#[test]
fn a_damaged_session_record_costs_the_sessions_not_the_client() {
    let mut alice = dev();
    let mut bob = dev();
    let mut notices = Vec::new();
    alice
        .c
        .accept_claimed("bob", &bob.claim(1), false, &mut notices)
        .unwrap();
    let body = alice.c.encrypt(&addr("bob", 1), &payload("1"), &mut notices).unwrap();
    bob.c.decrypt(&addr("alice", 1), &body, &mut notices).unwrap().unwrap();
    bob.c.persist().unwrap();
    // Damage bob's record of his sessions with alice, then reopen.
    let key = device_key(b's', &addr("alice", 1));
    bob.c
        .tree
        .apply(Writes::from([(key.clone(), Some(b"\x00\x01garbage".to_vec()))]))
        .unwrap();
    bob.c.sessions.clear();
    let next = alice.c.encrypt(&addr("bob", 1), &payload("2"), &mut notices).unwrap();
    // A pre-key message whose one-time key is used up: refused, no error.
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &next, &mut notices).unwrap(),
        Err(DecryptError::Refused)
    );
    assert!(!bob.c.has_session(&addr("alice", 1)).unwrap());
}

/// alice and bob with a session both ways (bob answered once), so both
/// write normal messages.
fn talking() -> (Dev, Dev) {
    let mut alice = dev();
    let mut bob = dev();
    let mut notices = Vec::new();
    let keys = bob.claim(1);
    alice.c.accept_claimed("bob", &keys, false, &mut notices).unwrap();
    let first = alice.c.encrypt(&addr("bob", 1), &payload("hi"), &mut notices).unwrap();
    bob.c.decrypt(&addr("alice", 1), &first, &mut notices).unwrap().unwrap();
    let back = bob.c.encrypt(&addr("alice", 1), &payload("yo"), &mut notices).unwrap();
    alice.c.decrypt(&addr("bob", 1), &back, &mut notices).unwrap().unwrap();
    alice.c.persist().unwrap();
    bob.c.persist().unwrap();
    (alice, bob)
}

/// Why ephemerals are decrypted on a copy (spec §5.6, §14.6): typing
/// indicators that overtake messages still queued for the device would,
/// decrypted for real, push those messages' keys out of vodozemac's store
/// of 40 skipped keys, and the messages would never decrypt. On a copy,
/// the session never moves for them: every message decrypts, in order,
/// and the indicators themselves still open.
#[test]
fn ephemerals_that_overtake_queued_messages_leave_them_decryptable() {
    let (mut alice, mut bob) = talking();
    let mut notices = Vec::new();
    let to_bob = addr("bob", 1);
    // Fifty messages wait in bob's queue; then alice types sixty times,
    // and those arrive first.
    let queued: Vec<Bytes> = (0..50)
        .map(|i| {
            alice
                .c
                .encrypt(&to_bob, &payload(&format!("m{i}")), &mut notices)
                .unwrap()
        })
        .collect();
    let typing: Vec<Bytes> = (0..60)
        .map(|_| alice.c.encrypt_ephemeral(&to_bob, &payload("typing")).unwrap().unwrap())
        .collect();
    for t in &typing {
        let opened = bob.c.decrypt_ephemeral(&addr("alice", 1), t).unwrap();
        assert_eq!(opened, Some(payload("typing")));
    }
    assert!(bob.c.take_writes().is_empty(), "an ephemeral changes no state");
    for (i, m) in queued.iter().enumerate() {
        let got = bob.c.decrypt(&addr("alice", 1), m, &mut notices).unwrap();
        assert_eq!(got, Ok(payload(&format!("m{i}"))), "message {i}");
    }
    // And after a gap of those sixty, the next message too.
    let next = alice.c.encrypt(&to_bob, &payload("after"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &next, &mut notices).unwrap(),
        Ok(payload("after"))
    );

    // The same, decrypted for real: the early messages are lost.
    let (mut alice, mut bob) = talking();
    let queued: Vec<Bytes> = (0..50)
        .map(|i| {
            alice
                .c
                .encrypt(&to_bob, &payload(&format!("m{i}")), &mut notices)
                .unwrap()
        })
        .collect();
    for _ in 0..60 {
        let t = alice.c.encrypt_ephemeral(&to_bob, &payload("typing")).unwrap().unwrap();
        bob.c.decrypt(&addr("alice", 1), &t, &mut notices).unwrap().unwrap();
    }
    let lost = queued
        .iter()
        .filter(|m| bob.c.decrypt(&addr("alice", 1), m, &mut notices).unwrap().is_err())
        .count();
    assert_eq!(lost, 10, "only the 40 latest skipped keys are kept");
}

/// A sender writes at most `EPHEMERAL_RUN` ephemerals to a device between
/// two messages, so that the gap the receiving session skips stays within
/// what Olm allows (2,000 a chain); a message opens the run again. No
/// ephemeral is ever written without a session (no keys are claimed for
/// one), and only the identity known for the device opens one.
#[test]
fn ephemerals_are_bounded_between_messages_and_need_a_session() {
    let (mut alice, mut bob) = talking();
    let mut notices = Vec::new();
    let to_bob = addr("bob", 1);
    assert_eq!(alice.c.encrypt_ephemeral(&addr("bob", 2), b"x").unwrap(), None);
    for _ in 0..EPHEMERAL_RUN {
        assert!(alice.c.encrypt_ephemeral(&to_bob, b"x").unwrap().is_some());
    }
    assert_eq!(alice.c.encrypt_ephemeral(&to_bob, b"x").unwrap(), None);
    // The count is written with the sessions.
    alice.c.persist().unwrap();
    let m = alice.c.encrypt(&to_bob, &payload("msg"), &mut notices).unwrap();
    assert_eq!(
        bob.c.decrypt(&addr("alice", 1), &m, &mut notices).unwrap(),
        Ok(payload("msg")),
        "a gap of EPHEMERAL_RUN keys is skipped"
    );
    assert!(alice.c.encrypt_ephemeral(&to_bob, b"x").unwrap().is_some());
    // A stranger's body, or garbage, opens nothing.
    let t = alice.c.encrypt_ephemeral(&to_bob, b"x").unwrap().unwrap();
    assert_eq!(bob.c.decrypt_ephemeral(&addr("carol", 1), &t).unwrap(), None);
    assert_eq!(
        bob.c.decrypt_ephemeral(&addr("alice", 1), b"\x00\x01\x01z").unwrap(),
        None
    );
    assert_eq!(
        bob.c.decrypt_ephemeral(&addr("alice", 1), &t).unwrap(),
        Some(b"x".to_vec())
    );
}
