//! Unit tests of the hub against the `BTreeMap` test store: no sessions,
//! no sockets, no disk, no threads. Each test runs in milliseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::noise::Keypair;
use crate::store::testing::TestStore;
use crate::wire::{Body, ErrorCode, MsgId, Receipt, Seen, Send};

/// One hub over a test store, and the connections a test opened on it.
struct Rig {
    store: Arc<TestStore>,
    hub: Hub,
    now: Now,
    keys: Vec<PublicKey>,
}

fn conn(serial: u64) -> ConnId {
    ConnId { worker: 0, serial }
}

impl Rig {
    fn new(config: HubConfig) -> Rig {
        let store = TestStore::new();
        let shared = Shared::new(store.clone() as Arc<dyn StoreApi>, config);
        let hub = Hub::new(shared, 0, Sink::new(|| {}));
        Rig {
            store,
            hub,
            now: Now {
                mono: Instant::now(),
                unix_ms: 1_795_000_000_000,
            },
            keys: Vec::new(),
        }
    }

    fn key(&mut self) -> PublicKey {
        let k = Keypair::generate().unwrap().public;
        self.keys.push(k);
        k
    }

    fn view(&self, device: Option<DeviceKey>) -> ConnView<'static> {
        ConnView {
            device,
            remote: None,
            room: 1 << 20,
        }
    }

    /// Authenticates `device` on connection `serial`; returns what it got.
    fn online(&mut self, serial: u64, device: DeviceKey) -> Vec<Effect> {
        let view = self.view(Some(device));
        self.hub
            .handle(conn(serial), view, Event::Authenticated(device), self.now);
        self.effects()
    }

    /// Handles a frame from `device` on `serial`; then the store's
    /// outcomes; returns every effect, with wakes of this hub's
    /// connections turned into their deliveries.
    fn frame(&mut self, serial: u64, device: DeviceKey, req: u32, frame: ClientFrame) -> Vec<Effect> {
        let view = self.view(Some(device));
        self.hub
            .handle(conn(serial), view, Event::Frame { req, frame }, self.now);
        self.effects()
    }

    /// The store runs its operations; the hub takes the outcomes.
    fn settle(&mut self) -> Vec<Effect> {
        self.store.run();
        self.effects()
    }

    fn effects(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        loop {
            self.hub.poll_store(self.now);
            let batch: Vec<Effect> = self.hub.effects().collect();
            if batch.is_empty() {
                return out;
            }
            for e in batch {
                if let Effect::Wake(c) = e {
                    self.hub.pump(c, 1 << 20, self.now);
                } else {
                    out.push(e);
                }
            }
        }
    }
}

fn dev(user: u32, device: u32) -> DeviceKey {
    DeviceKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

fn send(id: u8, to: &str, bodies: &[u32], own: &[u32]) -> ClientFrame {
    let b = |d: &u32| Body {
        device: DeviceId(*d),
        data: Bytes::from(vec![*d as u8; 3]),
    };
    ClientFrame::Send(Send {
        id: MsgId([id; 16]),
        to: to.into(),
        bodies: bodies.iter().map(b).collect(),
        own: own.iter().map(b).collect(),
    })
}

fn frames_to(effects: &[Effect], serial: u64) -> Vec<(u32, ServerFrame)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { conn: c, req, frame } if c.serial == serial => Some((*req, frame.clone())),
            _ => None,
        })
        .collect()
}

fn code_of(f: &(u32, ServerFrame)) -> Option<ErrorCode> {
    match f {
        (_, ServerFrame::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

/// alice (user 1, devices 1 and 2) and bob (user 2, device 1), alice's
/// device 1 online on connection 1 and bob's on connection 2.
fn alice_and_bob() -> Rig {
    let mut r = Rig::new(HubConfig::default());
    let (a1, a2, b1) = (r.key(), r.key(), r.key());
    r.store.add_user("alice", &[a1, a2]);
    r.store.add_user("bob", &[b1]);
    r.online(1, dev(1, 1));
    r.online(2, dev(2, 1));
    r
}

#[test]
fn a_send_is_delivered_at_once_and_accepted_once_every_copy_is_acked() {
    let mut r = alice_and_bob();
    let got = r.frame(1, dev(1, 1), 5, send(1, "bob", &[1], &[2]));
    // Bob (online) has it; alice's device 2 (offline) does not; no tick.
    let to_bob = frames_to(&got, 2);
    assert!(matches!(&to_bob[..], [(0, ServerFrame::Deliver(d))] if d.seq == 1 && d.to == "bob"));
    assert!(frames_to(&got, 1).is_empty());
    // Bob acks: his copy is safe; alice's other device's copy is not yet.
    let got = r.frame(2, dev(2, 1), 1, ClientFrame::Ack { up_to: 1 });
    assert!(frames_to(&got, 1).is_empty());
    // The store writes alice's copy: now every copy is safe.
    r.store.flush();
    let got = r.effects();
    assert!(
        matches!(&frames_to(&got, 1)[..], [(5, ServerFrame::Accepted { id, .. })] if *id == MsgId([1; 16])),
        "{got:?}"
    );
}

#[test]
fn a_retry_waits_for_the_original_then_is_answered_with_its_time() {
    let mut r = alice_and_bob();
    r.frame(1, dev(1, 1), 1, send(9, "bob", &[1], &[2]));
    // The connection drops before the answer; the retry comes on another.
    let got = r.frame(3, dev(1, 1), 1, send(9, "bob", &[1], &[2]));
    assert!(got.is_empty(), "{got:?}");
    r.store.flush();
    let got = r.effects();
    let times: Vec<u64> = got
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                frame: ServerFrame::Accepted { time_ms, .. },
                ..
            } => Some(*time_ms),
            _ => None,
        })
        .collect();
    assert_eq!(times.len(), 2);
    assert_eq!(times[0], times[1]);
    // Once settled, a retry is answered at once, with the same time.
    r.now.unix_ms += 5000;
    let got = r.frame(1, dev(1, 1), 2, send(9, "bob", &[1], &[2]));
    assert!(matches!(&frames_to(&got, 1)[..], [(2, ServerFrame::Accepted { time_ms, .. })] if *time_ms == times[0]));
    // Also when the devices changed since (answered before the mismatch).
    let got = r.frame(1, dev(1, 1), 3, send(9, "bob", &[1, 7], &[]));
    assert!(matches!(&frames_to(&got, 1)[..], [(3, ServerFrame::Accepted { .. })]));
}

#[test]
fn a_mismatch_names_missing_and_extra_devices_sorted_and_queues_nothing() {
    let mut r = alice_and_bob();
    let got = r.frame(1, dev(1, 1), 4, send(1, "bob", &[3, 1, 2], &[]));
    match &frames_to(&got, 1)[..] {
        [(4, ServerFrame::Mismatch { missing, extra, .. })] => {
            assert_eq!(
                missing,
                &vec![DeviceAddr {
                    user: "alice".into(),
                    device: DeviceId(2)
                }]
            );
            assert_eq!(
                extra,
                &vec![
                    DeviceAddr {
                        user: "bob".into(),
                        device: DeviceId(2)
                    },
                    DeviceAddr {
                        user: "bob".into(),
                        device: DeviceId(3)
                    }
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(r.store.queue(dev(2, 1)).is_empty());
}

#[test]
fn every_bad_send_gets_its_code_from_the_one_map() {
    let mut r = alice_and_bob();
    let big = ClientFrame::Send(Send {
        id: MsgId([2; 16]),
        to: "bob".into(),
        bodies: vec![Body {
            device: DeviceId(1),
            data: Bytes::from(vec![0; crate::wire::MAX_BODY_LEN + 1]),
        }],
        own: vec![],
    });
    let cases = [
        (send(1, "nobody", &[1], &[]), Refusal::UnknownUser),
        (big, Refusal::BodyTooLarge),
        (
            send(3, "bob", &(0..16).collect::<Vec<_>>(), &[]),
            Refusal::TooManyBodies,
        ),
        (send(4, "bob", &[1, 1], &[2]), Refusal::TwoBodies),
        (send(5, "alice", &[2], &[2]), Refusal::OwnToSelf),
        (send(6, "alice", &[1, 2], &[]), Refusal::BodyForSender),
    ];
    for (i, (frame, why)) in cases.into_iter().enumerate() {
        let req = i as u32 + 10;
        let got = r.frame(1, dev(1, 1), req, frame);
        assert_eq!(frames_to(&got, 1), vec![(req, why.frame())], "{why:?}");
    }
}

#[test]
fn delivery_stays_within_the_window_until_acks_open_it() {
    let mut r = Rig::new(HubConfig {
        window: 3,
        ..HubConfig::default()
    });
    let (a, b) = (r.key(), r.key());
    r.store.add_user("alice", &[a]);
    r.store.add_user("bob", &[b]);
    r.online(1, dev(1, 1));
    for i in 1..=7 {
        r.frame(1, dev(1, 1), i as u32, send(i, "bob", &[1], &[]));
    }
    let got = r.online(2, dev(2, 1));
    let seqs = |fs: Vec<(u32, ServerFrame)>| -> Vec<u64> {
        fs.into_iter()
            .filter_map(|(_, f)| match f {
                ServerFrame::Deliver(d) => Some(d.seq),
                _ => None,
            })
            .collect()
    };
    assert_eq!(seqs(frames_to(&got, 2)), vec![1, 2, 3]);
    // An ack beyond what was delivered is refused and changes nothing.
    let got = r.frame(2, dev(2, 1), 9, ClientFrame::Ack { up_to: 5 });
    assert_eq!(code_of(&frames_to(&got, 2)[0]), Some(ErrorCode::BAD_REQUEST));
    let got = r.frame(2, dev(2, 1), 10, ClientFrame::Ack { up_to: 2 });
    assert_eq!(seqs(frames_to(&got, 2)), vec![4, 5]);
    let got = r.frame(2, dev(2, 1), 11, ClientFrame::Ack { up_to: 5 });
    let f = frames_to(&got, 2);
    assert_eq!(seqs(f.clone()), vec![6, 7]);
    assert!(matches!(f.last(), Some((0, ServerFrame::QueueDrained))));
}

/// Issue 9 (*A full disk that heals*): below the floor, every request that
/// adds data is refused at once with `STORAGE_FULL`; deliveries, acks and
/// retries of accepted messages go on; accepting resumes by itself.
#[test]
fn below_the_floor_what_adds_data_is_refused_and_the_rest_goes_on() {
    let mut r = alice_and_bob();
    r.frame(1, dev(1, 1), 1, send(1, "bob", &[1], &[2]));
    r.store.flush();
    r.effects();
    r.store.set_full(true);
    let full = Some(ErrorCode::STORAGE_FULL);
    let got = r.frame(1, dev(1, 1), 2, send(2, "bob", &[1], &[2]));
    assert_eq!(code_of(&frames_to(&got, 1)[0]), full);
    let receipt = ClientFrame::Receipt(Receipt {
        to: "alice".into(),
        kind: ReceiptKind::READ,
        ids: vec![MsgId([1; 16])],
    });
    let got = r.frame(2, dev(2, 1), 3, receipt.clone());
    assert_eq!(code_of(&frames_to(&got, 2)[0]), full);
    let got = r.frame(1, dev(1, 1), 4, ClientFrame::RequestLink);
    assert_eq!(code_of(&frames_to(&got, 1)[0]), full);
    // A retry of what was accepted is still answered.
    let got = r.frame(1, dev(1, 1), 5, send(1, "bob", &[1], &[2]));
    assert!(matches!(&frames_to(&got, 1)[..], [(5, ServerFrame::Accepted { .. })]));
    // Acks still work (nothing to answer), and delivery goes on.
    let got = r.frame(2, dev(2, 1), 6, ClientFrame::Ack { up_to: 1 });
    assert!(frames_to(&got, 2).is_empty());
    // Space returns: accepted again, without a restart.
    r.store.set_full(false);
    let got = r.frame(2, dev(2, 1), 7, receipt);
    assert!(got.is_empty());
    let got = r.settle();
    assert!(matches!(&frames_to(&got, 2)[..], [(7, ServerFrame::Done)]), "{got:?}");
    // The receipt reached alice's online device.
    assert!(
        frames_to(&got, 1)
            .iter()
            .any(|(_, f)| matches!(f, ServerFrame::Receipt(_)))
    );
}

#[test]
fn a_revoked_device_is_closed_and_its_frames_are_not_acted_on() {
    let mut r = alice_and_bob();
    let alice2 = dev(1, 2);
    r.online(3, alice2);
    let got = r.frame(1, dev(1, 1), 1, ClientFrame::RevokeDevice { device: DeviceId(2) });
    assert!(got.is_empty());
    // Applied by the store; from then on device 2's frames are dropped
    // without an answer, and once the revoke's answer comes, it is closed.
    r.store.run();
    let got = r.frame(3, alice2, 1, ClientFrame::MyDevices);
    assert!(frames_to(&got, 3).is_empty());
    assert!(matches!(&frames_to(&got, 1)[..], [(1, ServerFrame::Done)]));
    assert!(got.contains(&Effect::Close {
        conn: conn(3),
        why: Refusal::Revoked
    }));
    // The account's last device cannot go.
    let got = r.frame(1, dev(1, 1), 2, ClientFrame::RevokeDevice { device: DeviceId(1) });
    assert_eq!(frames_to(&got, 1), vec![(2, Refusal::LastDevice.frame())]);
    // A revoked device that authenticates again is closed at once.
    let got = r.online(4, alice2);
    assert!(got.contains(&Effect::Close {
        conn: conn(4),
        why: Refusal::Revoked
    }));
    assert_eq!(r.hub.shared().connection_of(alice2), None);
}

#[test]
fn receipts_go_to_the_senders_devices_and_the_readers_other_devices() {
    let mut r = alice_and_bob();
    let receipt = ClientFrame::Receipt(Receipt {
        to: "alice".into(),
        kind: ReceiptKind::DELIVERED,
        ids: vec![MsgId([1; 16])],
    });
    r.frame(2, dev(2, 1), 1, receipt);
    let got = r.settle();
    assert_eq!(frames_to(&got, 2), vec![(1, ServerFrame::Done)]);
    // Alice's online device gets it; her other device has it queued.
    assert!(matches!(&frames_to(&got, 1)[..], [(0, ServerFrame::Receipt(rd))] if rd.to == "alice"));
    assert_eq!(r.store.queue(dev(1, 2)).len(), 1);
    // Kind 0 and empty id lists are refused.
    let bad = ClientFrame::Receipt(Receipt {
        to: "alice".into(),
        kind: ReceiptKind(0),
        ids: vec![MsgId([1; 16])],
    });
    let got = r.frame(2, dev(2, 1), 2, bad);
    assert_eq!(frames_to(&got, 2), vec![(2, Refusal::BadReceipt.frame())]);
}

#[test]
fn a_device_connecting_again_closes_its_older_connection() {
    let mut r = alice_and_bob();
    let got = r.online(9, dev(2, 1));
    assert!(got.contains(&Effect::Close {
        conn: conn(2),
        why: Refusal::ConnectedElsewhere
    }));
    assert_eq!(r.hub.shared().connection_of(dev(2, 1)), Some(conn(9)));
    // The old connection closing does not take the new one's entry.
    r.hub.closed(conn(2));
    assert_eq!(r.hub.shared().connection_of(dev(2, 1)), Some(conn(9)));
    r.hub.closed(conn(9));
    assert_eq!(r.hub.shared().connection_of(dev(2, 1)), None);
}

#[test]
fn key_claims_are_rate_limited_per_device() {
    let mut r = Rig::new(HubConfig {
        claims_per_minute: 2,
        ..HubConfig::default()
    });
    let (a, b) = (r.key(), r.key());
    r.store.add_user("alice", &[a]);
    r.store.add_user("bob", &[b]);
    r.online(1, dev(1, 1));
    for req in 1..=2 {
        let got = r.frame(1, dev(1, 1), req, ClientFrame::ClaimKeys { user: "bob".into() });
        assert!(frames_to(&got, 1).is_empty());
    }
    let got = r.frame(1, dev(1, 1), 3, ClientFrame::ClaimKeys { user: "bob".into() });
    // The wait comes first, unasked (spec §5.3): a token every 30 s.
    assert_eq!(
        frames_to(&got, 1),
        vec![
            (0, ServerFrame::RetryAfter { after_ms: 30_000 }),
            (3, Refusal::ClaimRate.frame())
        ]
    );
    r.now.mono += Duration::from_secs(30);
    let got = r.frame(1, dev(1, 1), 4, ClientFrame::ClaimKeys { user: "bob".into() });
    assert!(frames_to(&got, 1).is_empty());
}

// ---- ephemeral sends and presence (spec §5.6) ----

impl Rig {
    /// Connection `serial` closes at the rig's time; returns what follows.
    fn close(&mut self, serial: u64) -> Vec<Effect> {
        self.effects();
        self.hub.closed(conn(serial));
        self.effects()
    }
}

fn ephemeral(to: &str, bodies: &[u32], len: usize) -> ClientFrame {
    ClientFrame::Ephemeral(crate::wire::Ephemeral {
        to: to.into(),
        bodies: bodies
            .iter()
            .map(|d| Body {
                device: DeviceId(*d),
                data: Bytes::from(vec![*d as u8; len]),
            })
            .collect(),
    })
}

fn watch(users: &[&str]) -> ClientFrame {
    ClientFrame::WatchPresence {
        users: users.iter().map(|u| u.to_string()).collect(),
    }
}

fn presence(user: &str, seen: Seen) -> ServerFrame {
    ServerFrame::Presence(crate::wire::Presence {
        user: user.into(),
        seen,
    })
}

fn online(devices: &[u32]) -> Seen {
    Seen::Online {
        devices: devices.iter().map(|d| DeviceId(*d)).collect(),
    }
}

/// alice (devices 1 and 2) and bob (devices 1 and 2) and carol (device
/// 1); alice's device 1 online on connection 1, bob's device 1 on 2.
fn three_users() -> Rig {
    let mut r = Rig::new(HubConfig::default());
    let keys: Vec<PublicKey> = (0..5).map(|_| r.key()).collect();
    r.store.add_user("alice", &keys[0..2]);
    r.store.add_user("bob", &keys[2..4]);
    r.store.add_user("carol", &keys[4..5]);
    r.online(1, dev(1, 1));
    r.online(2, dev(2, 1));
    // Their `Touch`es.
    r.store.run();
    r
}

#[test]
fn an_ephemeral_reaches_the_online_devices_at_once_and_never_the_store() {
    let mut r = three_users();
    let got = r.frame(1, dev(1, 1), 7, ephemeral("bob", &[1, 2], 40));
    // Done at once, without the store; bob's device 1 (online) gets its
    // body, his device 2 (offline) nothing, and nothing waits for it.
    assert_eq!(frames_to(&got, 1), vec![(7, ServerFrame::Done)]);
    match &frames_to(&got, 2)[..] {
        [(0, ServerFrame::Ephemeral(e))] => {
            assert_eq!(
                e.from,
                DeviceAddr {
                    user: "alice".into(),
                    device: DeviceId(1)
                }
            );
            assert_eq!((e.to.as_str(), &e.body[..]), ("bob", &[1u8; 40][..]));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(r.store.ops_waiting(), 0, "no store operation");
    assert!(r.store.queue(dev(2, 2)).is_empty(), "not queued for the offline device");
    assert!(!r.hub.has_pending());
    // Bob's device 2 comes online: nothing of it waits there.
    let got = r.online(3, dev(2, 2));
    assert!(
        !frames_to(&got, 3)
            .iter()
            .any(|(_, f)| matches!(f, ServerFrame::Ephemeral(_)))
    );
    // To one's own other devices, likewise.
    let got = r.frame(1, dev(1, 1), 8, ephemeral("alice", &[2], 10));
    assert_eq!(frames_to(&got, 1), vec![(8, ServerFrame::Done)]);
}

#[test]
fn every_bad_ephemeral_gets_its_code_from_the_one_map() {
    let mut r = three_users();
    let cases = [
        (ephemeral("nobody", &[1], 10), Refusal::UnknownUser),
        (
            ephemeral("bob", &[1], crate::wire::MAX_EPHEMERAL_LEN + 1),
            Refusal::EphemeralTooLarge,
        ),
        (
            ephemeral("bob", &(1..=9).collect::<Vec<_>>(), 1),
            Refusal::TooManyBodies,
        ),
        (ephemeral("bob", &[1, 1], 1), Refusal::TwoBodies),
        (ephemeral("alice", &[1], 1), Refusal::BodyForSender),
    ];
    for (i, (frame, why)) in cases.into_iter().enumerate() {
        let req = i as u32 + 10;
        let got = r.frame(1, dev(1, 1), req, frame);
        assert_eq!(frames_to(&got, 1), vec![(req, why.frame())], "{why:?}");
        assert!(frames_to(&got, 2).is_empty(), "{why:?}: nothing reached bob");
    }
    let (code, _) = Refusal::EphemeralTooLarge.describe();
    assert_eq!(code, ErrorCode::BODY_TOO_LARGE);
}

#[test]
fn ephemeral_requests_are_rate_limited_per_device() {
    let mut r = Rig::new(HubConfig {
        ephemeral_per_minute: 3,
        ..HubConfig::default()
    });
    let keys: Vec<PublicKey> = (0..3).map(|_| r.key()).collect();
    r.store.add_user("alice", &keys[0..2]);
    r.store.add_user("bob", &keys[2..3]);
    r.online(1, dev(1, 1));
    r.online(2, dev(2, 1));
    r.online(3, dev(1, 2));
    // Typing and watching draw on one allowance.
    r.frame(1, dev(1, 1), 1, ephemeral("bob", &[1], 10));
    r.frame(1, dev(1, 1), 2, watch(&["bob"]));
    r.frame(1, dev(1, 1), 3, ephemeral("bob", &[1], 10));
    let got = r.frame(1, dev(1, 1), 4, ephemeral("bob", &[1], 10));
    assert_eq!(
        frames_to(&got, 1),
        vec![
            (0, ServerFrame::RetryAfter { after_ms: 20_000 }),
            (4, Refusal::EphemeralRate.frame())
        ]
    );
    assert!(frames_to(&got, 2).is_empty());
    assert_eq!(Refusal::EphemeralRate.code(), ErrorCode::RATE_LIMITED);
    // Another device of the same user has its own.
    let got = r.frame(3, dev(1, 2), 1, ephemeral("bob", &[1], 10));
    assert_eq!(frames_to(&got, 3), vec![(1, ServerFrame::Done)]);
    // One more every 20 s.
    r.now.mono += Duration::from_secs(20);
    let got = r.frame(1, dev(1, 1), 5, ephemeral("bob", &[1], 10));
    assert_eq!(frames_to(&got, 1), vec![(5, ServerFrame::Done)]);
}

#[test]
fn a_watcher_is_told_presence_now_and_at_each_change() {
    let mut r = three_users();
    let t0 = r.now.unix_ms;
    let got = r.frame(1, dev(1, 1), 3, watch(&["bob", "carol", "nobody", "bob"]));
    // Done, then each user once; names of no user are passed over.
    assert_eq!(
        frames_to(&got, 1),
        vec![
            (3, ServerFrame::Done),
            (0, presence("bob", online(&[1]))),
            (0, presence("carol", Seen::Away { last_seen_ms: 0 })),
        ]
    );
    // Bob's second device: the online list changes.
    let got = r.online(3, dev(2, 2));
    assert_eq!(frames_to(&got, 1), vec![(0, presence("bob", online(&[1, 2])))]);
    // One of them goes: still online.
    r.now.unix_ms = t0 + 60_000;
    let got = r.close(3);
    assert_eq!(frames_to(&got, 1), vec![(0, presence("bob", online(&[1])))]);
    // The last one goes: last seen now, and the device's time is stored.
    r.now.unix_ms = t0 + 120_000;
    let got = r.close(2);
    let away = Seen::Away {
        last_seen_ms: t0 + 120_000,
    };
    assert_eq!(frames_to(&got, 1), vec![(0, presence("bob", away.clone()))]);
    r.store.run();
    let stored = r.store.device_infos(UserId(2));
    assert_eq!(stored[0].last_seen_ms, t0 + 120_000);
    // Watching again says the same; a watch replaces the earlier one.
    let got = r.frame(1, dev(1, 1), 4, watch(&["bob"]));
    assert_eq!(
        frames_to(&got, 1),
        vec![(4, ServerFrame::Done), (0, presence("bob", away))]
    );
    let got = r.online(5, dev(3, 1));
    assert!(frames_to(&got, 1).is_empty(), "carol is not watched any more");
    // Too many names are refused; closing forgets the watches.
    let many: Vec<String> = (0..=crate::wire::MAX_WATCHED).map(|i| format!("user{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let got = r.frame(1, dev(1, 1), 5, watch(&many));
    assert_eq!(frames_to(&got, 1), vec![(5, Refusal::TooManyWatched.frame())]);
    assert_eq!(r.hub.shared().watching_count(), 1);
    r.close(1);
    assert_eq!(r.hub.shared().watching_count(), 0);
}

#[test]
fn who_hides_their_presence_shows_hidden_and_sees_no_one() {
    let mut r = three_users();
    r.frame(1, dev(1, 1), 1, watch(&["bob"]));
    r.frame(2, dev(2, 1), 1, watch(&["alice", "carol"]));
    // Bob hides: answered once durable; then alice sees him hidden, and
    // he sees no one.
    let got = r.frame(2, dev(2, 1), 2, ClientFrame::SetLastSeen { everyone: false });
    assert!(frames_to(&got, 2).is_empty(), "not before the store says so");
    let got = r.settle();
    assert_eq!(
        frames_to(&got, 2),
        vec![
            (2, ServerFrame::Done),
            (0, presence("alice", Seen::Hidden)),
            (0, presence("carol", Seen::Hidden)),
        ]
    );
    assert_eq!(frames_to(&got, 1), vec![(0, presence("bob", Seen::Hidden))]);
    // Bob's comings and goings now leave no trace in alice's frames.
    let got = r.online(3, dev(2, 2));
    assert!(frames_to(&got, 1).is_empty(), "{got:?}");
    let got = r.close(3);
    assert!(frames_to(&got, 1).is_empty(), "{got:?}");
    // A new watch of bob says hidden too.
    let got = r.online(4, dev(1, 2));
    assert!(frames_to(&got, 2).is_empty(), "bob sees nothing of alice");
    let got = r.frame(4, dev(1, 2), 1, watch(&["bob"]));
    assert_eq!(frames_to(&got, 4)[1], (0, presence("bob", Seen::Hidden)));
    // Bob shows it again: everyone is told, and he sees them again.
    r.frame(2, dev(2, 1), 3, ClientFrame::SetLastSeen { everyone: true });
    let got = r.settle();
    assert_eq!(
        frames_to(&got, 2),
        vec![
            (3, ServerFrame::Done),
            (0, presence("alice", online(&[1, 2]))),
            (0, presence("carol", Seen::Away { last_seen_ms: 0 })),
        ]
    );
    assert_eq!(frames_to(&got, 1), vec![(0, presence("bob", online(&[1])))]);
    assert_eq!(frames_to(&got, 4), vec![(0, presence("bob", online(&[1])))]);
}

#[test]
fn no_ephemeral_reaches_a_revoked_device_still_closing() {
    let mut r = three_users();
    r.online(3, dev(1, 2));
    r.frame(1, dev(1, 1), 1, ClientFrame::RevokeDevice { device: DeviceId(2) });
    let got = r.settle();
    assert!(got.contains(&Effect::Close {
        conn: conn(3),
        why: Refusal::Revoked
    }));
    // Its connection has not closed yet; bob types to both of alice's.
    let got = r.frame(2, dev(2, 1), 2, ephemeral("alice", &[1, 2], 10));
    assert_eq!(frames_to(&got, 2), vec![(2, ServerFrame::Done)]);
    assert_eq!(frames_to(&got, 1).len(), 1);
    assert!(frames_to(&got, 3).is_empty(), "{got:?}");
}

/// Issue 14 (spec §6): a device's sends past its burst and rate are
/// refused with `SLOW_DOWN`, after a `RetryAfter` that says when one goes
/// through; nothing of a refused send is stored, and the user's other
/// devices have their own allowance.
#[test]
fn sends_past_the_device_rate_slow_down_with_the_wait() {
    let mut r = Rig::new(HubConfig {
        send_rate: Rate {
            per_minute: 60,
            burst: 3,
        },
        ..HubConfig::default()
    });
    let (a1, a2, b1) = (r.key(), r.key(), r.key());
    r.store.add_user("alice", &[a1, a2]);
    r.store.add_user("bob", &[b1]);
    r.online(1, dev(1, 1));
    r.online(3, dev(1, 2));
    for id in 1..=3 {
        let got = r.frame(1, dev(1, 1), u32::from(id), send(id, "bob", &[1], &[2]));
        assert!(frames_to(&got, 1).is_empty(), "{got:?}");
    }
    let got = r.frame(1, dev(1, 1), 4, send(4, "bob", &[1], &[2]));
    assert_eq!(
        frames_to(&got, 1),
        vec![
            (0, ServerFrame::RetryAfter { after_ms: 1000 }),
            (4, Refusal::SendRate.frame())
        ]
    );
    assert_eq!(Refusal::SendRate.code(), ErrorCode::SLOW_DOWN);
    r.store.flush();
    let got = r.effects();
    let mut ids = accepted_ids(&got, 1);
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(r.store.queue(dev(2, 1)).len(), 3, "the refused send stored nothing");
    // alice's other device has its own allowance.
    let got = r.frame(3, dev(1, 2), 1, send(5, "bob", &[1], &[1]));
    assert!(frames_to(&got, 3).is_empty(), "{got:?}");
    // After the wait it goes through.
    r.now.mono += Duration::from_secs(1);
    let got = r.frame(1, dev(1, 1), 6, send(4, "bob", &[1], &[2]));
    assert!(frames_to(&got, 1).is_empty(), "{got:?}");
    r.store.flush();
    let got = r.effects();
    assert_eq!(accepted_ids(&got, 1), vec![4]);
}

/// The first byte of each message id `Accepted` on `serial`.
fn accepted_ids(effects: &[Effect], serial: u64) -> Vec<u8> {
    frames_to(effects, serial)
        .into_iter()
        .filter_map(|(_, f)| match f {
            ServerFrame::Accepted { id, .. } => Some(id.0[0]),
            _ => None,
        })
        .collect()
}

/// Issue 14 (spec §5.4): one device's one-time keys go at most at their
/// hand-out rate, whoever claims them and from however many devices; past
/// it, claimers get the fallback key and nothing is taken. The owner hears
/// of a low stock.
#[test]
fn one_time_keys_go_at_their_rate_whoever_claims() {
    let mut r = Rig::new(HubConfig {
        key_handouts: Rate {
            per_minute: 1,
            burst: 2,
        },
        low_keys: 4,
        ..HubConfig::default()
    });
    let keys: Vec<PublicKey> = (0..6).map(|_| r.key()).collect();
    r.store.add_user("bob", &keys[0..1]);
    r.store.add_user("mallory", &keys[1..6]);
    r.store.set_keys(dev(1, 1), 5);
    r.online(1, dev(1, 1));
    let mut fallbacks = Vec::new();
    let mut notices = Vec::new();
    // Five of mallory's devices claim one after another, each well within
    // its own claim rate.
    for m in 1..=5u32 {
        let serial = 10 + u64::from(m);
        r.online(serial, dev(2, m));
        r.frame(serial, dev(2, m), 1, ClientFrame::ClaimKeys { user: "bob".into() });
        let got = r.settle();
        for (_, f) in frames_to(&got, serial) {
            let ServerFrame::Keys { devices, .. } = f else {
                panic!("{f:?}")
            };
            fallbacks.push(devices[0].fallback);
        }
        notices.extend(frames_to(&got, 1));
    }
    assert_eq!(fallbacks, vec![false, false, true, true, true]);
    assert_eq!(r.store.one_time_keys(dev(1, 1)), Some(3));
    // bob heard his stock fell under the mark.
    assert_eq!(notices, vec![(0, ServerFrame::KeyCount { one_time: 3 })]);
    // A minute later, one more.
    r.now.mono += Duration::from_secs(60);
    r.frame(11, dev(2, 1), 2, ClientFrame::ClaimKeys { user: "bob".into() });
    r.settle();
    assert_eq!(r.store.one_time_keys(dev(1, 1)), Some(2));
}

mod blobs;

// ---- groups and blocking (spec §5.8) ----

const G: crate::wire::GroupId = crate::wire::GroupId([0x6e; 16]);

fn names(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| u.to_string()).collect()
}

/// The digest of a group's member devices, as a client computes it.
fn digest(info: &crate::wire::GroupInfo) -> [u8; 8] {
    crate::keys::devices_digest(
        info.members
            .iter()
            .map(|m| (m.user.as_str(), m.devices.iter().copied())),
    )
}

fn group_send(id: u8, info: &crate::wire::GroupInfo) -> ClientFrame {
    ClientFrame::GroupSend(crate::wire::GroupSend {
        id: MsgId([id; 16]),
        group: info.group,
        version: info.version,
        devices: digest(info),
        body: Bytes::from(vec![id; 40]),
    })
}

/// The group info in an answer.
fn info_in(frames: &[(u32, ServerFrame)], req: u32) -> crate::wire::GroupInfo {
    frames
        .iter()
        .find_map(|(r, f)| match f {
            ServerFrame::Group(i) if *r == req => Some(i.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Group answer to {req}: {frames:?}"))
}

/// alice, bob and carol (three_users) and dave (user 4, device 1, online
/// on connection 4); alice made group G with bob and carol.
fn a_group() -> (Rig, crate::wire::GroupInfo) {
    let mut r = three_users();
    let d = r.key();
    r.store.add_user("dave", &[d]);
    r.online(4, dev(4, 1));
    r.store.run();
    let create = ClientFrame::CreateGroup {
        group: G,
        members: names(&["bob", "carol"]),
    };
    assert!(
        frames_to(&r.frame(1, dev(1, 1), 1, create), 1).is_empty(),
        "once durable"
    );
    let got = r.settle();
    let info = info_in(&frames_to(&got, 1), 1);
    (r, info)
}

#[test]
fn a_group_message_is_one_body_for_every_member_device_but_the_senders() {
    let (mut r, info) = a_group();
    assert_eq!(info.version, 1);
    let members: Vec<(&str, bool, usize)> = info
        .members
        .iter()
        .map(|m| (m.user.as_str(), m.admin, m.devices.len()))
        .collect();
    assert_eq!(members, [("alice", true, 2), ("bob", false, 2), ("carol", false, 1)]);
    // Every member device was told, in its queue, the sender's other one
    // included.
    for d in [dev(1, 1), dev(1, 2), dev(2, 1), dev(2, 2), dev(3, 1)] {
        assert!(
            r.store
                .queue(d)
                .iter()
                .any(|(_, e)| matches!(e, Entry::GroupNotice(n) if n.version == 1)),
            "{d}"
        );
    }
    assert!(r.store.queue(dev(4, 1)).is_empty(), "dave is not a member");
    let got = r.frame(1, dev(1, 1), 2, group_send(7, &info));
    let to_bob = frames_to(&got, 2);
    let body = match &to_bob[..] {
        [(0, ServerFrame::GroupDeliver(d))] => {
            assert_eq!((d.group, d.id, d.from.user.as_str()), (G, MsgId([7; 16]), "alice"));
            d.body.clone()
        }
        other => panic!("{other:?}"),
    };
    // One body, the same for all: alice's other device, bob's, carol's.
    for d in [dev(1, 2), dev(2, 2), dev(3, 1)] {
        let q = r.store.queue(d);
        assert!(
            q.iter()
                .any(|(_, e)| matches!(e, Entry::Group(g) if g.body == body && g.fanout == 4)),
            "{d}: {q:?}"
        );
    }
    assert!(
        !r.store
            .queue(dev(1, 1))
            .iter()
            .any(|(_, e)| matches!(e, Entry::Group(_)))
    );
    assert!(r.store.queue(dev(4, 1)).is_empty());
    r.store.flush();
    let got = r.effects();
    assert!(
        matches!(&frames_to(&got, 1)[..], [(2, ServerFrame::Accepted { .. })]),
        "{got:?}"
    );
}

#[test]
fn a_send_for_an_older_version_or_other_devices_is_a_mismatch_that_says_what_is() {
    let (mut r, info) = a_group();
    r.frame(
        1,
        dev(1, 1),
        2,
        ClientFrame::AddMembers {
            group: G,
            users: names(&["dave"]),
        },
    );
    let got = r.settle();
    let now = info_in(&frames_to(&got, 1), 2);
    assert_eq!(now.version, 2);
    let got = r.frame(1, dev(1, 1), 3, group_send(8, &info));
    match &frames_to(&got, 1)[..] {
        [(3, ServerFrame::GroupMismatch { id, group })] => {
            assert_eq!((*id, group), (MsgId([8; 16]), &now));
        }
        other => panic!("{other:?}"),
    }
    // The right version with a stale device list: a mismatch too.
    let mut stale = now.clone();
    stale.members[1].devices.pop();
    let got = r.frame(1, dev(1, 1), 4, group_send(8, &stale));
    assert!(matches!(
        &frames_to(&got, 1)[..],
        [(4, ServerFrame::GroupMismatch { .. })]
    ));
    assert!(
        !r.store
            .queue(dev(2, 1))
            .iter()
            .any(|(_, e)| matches!(e, Entry::Group(_)))
    );
    // As the server says: sent.
    let got = r.frame(1, dev(1, 1), 5, group_send(8, &now));
    assert!(
        frames_to(&got, 4)
            .iter()
            .any(|(_, f)| matches!(f, ServerFrame::GroupDeliver(_)))
    );
}

#[test]
fn a_non_member_cannot_read_send_share_or_receipt_and_cannot_tell_whether_a_group_exists() {
    let (mut r, info) = a_group();
    let other = crate::wire::GroupId([1; 16]);
    for g in [G, other] {
        let mut i = info.clone();
        i.group = g;
        let frames = [
            ClientFrame::GetGroup { group: g },
            group_send(9, &i),
            ClientFrame::GroupKeys(crate::wire::GroupKeys {
                id: MsgId([9; 16]),
                group: g,
                bodies: vec![],
            }),
            ClientFrame::GroupReceipt(crate::wire::GroupReceipt {
                group: g,
                to: "alice".into(),
                kind: ReceiptKind::READ,
                ids: vec![MsgId([1; 16])],
            }),
            ClientFrame::LeaveGroup { group: g },
            ClientFrame::AddMembers {
                group: g,
                users: names(&["dave"]),
            },
        ];
        for (n, f) in frames.into_iter().enumerate() {
            let req = 10 + n as u32;
            let mut got = frames_to(&r.frame(4, dev(4, 1), req, f), 4);
            got.extend(frames_to(&r.settle(), 4));
            assert_eq!(got, vec![(req, Refusal::NotAMember.frame())], "{g:?} {n}");
        }
    }
    assert!(
        r.store
            .queue(dev(2, 1))
            .iter()
            .all(|(_, e)| !matches!(e, Entry::Group(_)))
    );
    // Its list is empty.
    let got = r.frame(4, dev(4, 1), 30, ClientFrame::ListGroups);
    assert_eq!(frames_to(&got, 4), vec![(30, ServerFrame::Groups { groups: vec![] })]);
    let got = r.frame(2, dev(2, 1), 31, ClientFrame::ListGroups);
    assert_eq!(
        frames_to(&got, 2),
        vec![(
            31,
            ServerFrame::Groups {
                groups: vec![crate::wire::GroupVersion { group: G, version: 1 }]
            }
        )]
    );
}

#[test]
fn only_admins_change_a_group_and_each_limit_has_its_code() {
    let mut r = Rig::new(HubConfig {
        group_members: 3,
        groups_per_user: 1,
        ..HubConfig::default()
    });
    let keys: Vec<PublicKey> = (0..4).map(|_| r.key()).collect();
    for (n, u) in ["alice", "bob", "carol", "dave"].iter().enumerate() {
        r.store.add_user(u, &keys[n..n + 1]);
        r.online(n as u64 + 1, dev(n as u32 + 1, 1));
    }
    r.store.run();
    let ask = |r: &mut Rig, who: u32, req: u32, f: ClientFrame| {
        let mut got = frames_to(&r.frame(u64::from(who), dev(who, 1), req, f), u64::from(who));
        got.extend(frames_to(&r.settle(), u64::from(who)));
        got.into_iter().find(|(q, _)| *q == req).map(|(_, f)| f)
    };
    let create = |g: u8, members: &[&str]| ClientFrame::CreateGroup {
        group: crate::wire::GroupId([g; 16]),
        members: names(members),
    };
    assert!(matches!(
        ask(&mut r, 1, 1, create(1, &["bob"])),
        Some(ServerFrame::Group(_))
    ));
    let cases = [
        (2, create(1, &[]), Refusal::GroupExists),
        (1, create(2, &[]), Refusal::TooManyGroups),
        (3, create(3, &["bob"]), Refusal::TooManyGroups),
        (
            2,
            ClientFrame::AddMembers {
                group: crate::wire::GroupId([1; 16]),
                users: names(&["carol"]),
            },
            Refusal::NotAdmin,
        ),
        (
            1,
            ClientFrame::AddMembers {
                group: crate::wire::GroupId([1; 16]),
                users: names(&["carol", "dave"]),
            },
            Refusal::GroupFull,
        ),
        (
            1,
            ClientFrame::AddMembers {
                group: crate::wire::GroupId([1; 16]),
                users: names(&["nobody"]),
            },
            Refusal::UnknownUser,
        ),
        (
            1,
            ClientFrame::RemoveMembers {
                group: crate::wire::GroupId([1; 16]),
                users: (0..300).map(|n| format!("u{n}")).collect(),
            },
            Refusal::TooManyUsers,
        ),
        (
            2,
            ClientFrame::MakeAdmin {
                group: crate::wire::GroupId([1; 16]),
                user: "bob".into(),
            },
            Refusal::NotAdmin,
        ),
    ];
    for (n, (who, f, why)) in cases.into_iter().enumerate() {
        assert_eq!(ask(&mut r, who, 100 + n as u32, f), Some(why.frame()), "{why:?}");
    }
    // The creator is admin; it promotes bob, then leaves: bob runs it.
    let g = crate::wire::GroupId([1; 16]);
    let info = |f: Option<ServerFrame>| match f {
        Some(ServerFrame::Group(i)) => i,
        other => panic!("{other:?}"),
    };
    let i = info(ask(
        &mut r,
        1,
        200,
        ClientFrame::MakeAdmin {
            group: g,
            user: "bob".into(),
        },
    ));
    assert!(i.members.iter().all(|m| m.admin));
    assert_eq!(
        ask(&mut r, 1, 201, ClientFrame::LeaveGroup { group: g }),
        Some(ServerFrame::Done)
    );
    let i = info(ask(
        &mut r,
        2,
        202,
        ClientFrame::AddMembers {
            group: g,
            users: names(&["carol"]),
        },
    ));
    assert_eq!(i.version, 4);
    let m: Vec<(&str, bool)> = i.members.iter().map(|m| (m.user.as_str(), m.admin)).collect();
    assert_eq!(m, [("bob", true), ("carol", false)]);
}

#[test]
fn when_the_last_admin_leaves_the_longest_standing_member_runs_the_group() {
    let (mut r, _) = a_group();
    r.frame(1, dev(1, 1), 2, ClientFrame::LeaveGroup { group: G });
    let got = r.settle();
    assert!(frames_to(&got, 1).contains(&(2, ServerFrame::Done)));
    let got = r.frame(2, dev(2, 1), 3, ClientFrame::GetGroup { group: G });
    let i = info_in(&frames_to(&got, 2), 3);
    let m: Vec<(&str, bool)> = i.members.iter().map(|m| (m.user.as_str(), m.admin)).collect();
    assert_eq!(m, [("bob", true), ("carol", false)]);
    // Bob's device heard it as one notice: alice left, bob promoted.
    let notices: Vec<crate::wire::GroupNotice> = frames_to(&got, 2)
        .into_iter()
        .chain(frames_to(&r.effects(), 2))
        .filter_map(|(_, f)| match f {
            ServerFrame::GroupNotice(n) => Some(n),
            _ => None,
        })
        .collect();
    let last = r.store.queue(dev(2, 2));
    assert!(
        last.iter()
            .any(|(_, e)| matches!(e, Entry::GroupNotice(n) if n.version == 2)),
        "{notices:?}"
    );
}

#[test]
fn a_removed_member_is_told_and_gets_nothing_after() {
    let (mut r, _) = a_group();
    r.frame(
        1,
        dev(1, 1),
        2,
        ClientFrame::RemoveMembers {
            group: G,
            users: names(&["carol"]),
        },
    );
    let got = r.settle();
    let now = info_in(&frames_to(&got, 1), 2);
    let notices = |r: &Rig| -> Vec<u64> {
        r.store
            .queue(dev(3, 1))
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::GroupNotice(n) => Some(n.version),
                _ => None,
            })
            .collect()
    };
    assert_eq!(notices(&r), [1, 2], "carol heard of her removal");
    r.frame(1, dev(1, 1), 3, group_send(5, &now));
    assert!(
        r.store
            .queue(dev(3, 1))
            .iter()
            .all(|(_, e)| !matches!(e, Entry::Group(_)))
    );
    let got = r.frame(3, dev(3, 1), 4, ClientFrame::GetGroup { group: G });
    assert_eq!(frames_to(&got, 3), vec![(4, Refusal::NotAMember.frame())]);
}

#[test]
fn key_shares_go_to_member_devices_as_direct_messages_each_to_its_own_user() {
    let (mut r, _) = a_group();
    let body = |user: &str, device: u32| crate::wire::KeyBody {
        user: user.into(),
        device: DeviceId(device),
        data: Bytes::from(format!("{user}/{device}")),
    };
    let keys = |bodies| {
        ClientFrame::GroupKeys(crate::wire::GroupKeys {
            id: MsgId([3; 16]),
            group: G,
            bodies,
        })
    };
    let got = r.frame(
        1,
        dev(1, 1),
        2,
        keys(vec![body("bob", 1), body("carol", 1), body("alice", 2), body("bob", 9)]),
    );
    match &frames_to(&got, 2)[..] {
        [(0, ServerFrame::Deliver(d))] => assert_eq!((d.to.as_str(), &d.body[..]), ("bob", &b"bob/1"[..])),
        other => panic!("{other:?}"),
    }
    let q = r.store.queue(dev(3, 1));
    assert!(
        q.iter()
            .any(|(_, e)| matches!(e, Entry::Message(m) if m.to_user == 3 && &m.body[..] == b"carol/1"))
    );
    let q = r.store.queue(dev(1, 2));
    assert!(q.iter().any(|(_, e)| matches!(e, Entry::Message(m) if m.to_user == 1)));
    // A non-member among the addressees, or the sender itself: refused.
    let got = r.frame(1, dev(1, 1), 3, keys(vec![body("dave", 1)]));
    assert_eq!(frames_to(&got, 1), vec![(3, Refusal::NotAMember.frame())]);
    let got = r.frame(1, dev(1, 1), 4, keys(vec![body("alice", 1)]));
    assert_eq!(frames_to(&got, 1), vec![(4, Refusal::BodyForSender.frame())]);
}

#[test]
fn a_group_receipt_reaches_the_senders_devices_and_the_readers_other_devices() {
    let (mut r, _) = a_group();
    let receipt = ClientFrame::GroupReceipt(crate::wire::GroupReceipt {
        group: G,
        to: "alice".into(),
        kind: ReceiptKind::READ,
        ids: vec![MsgId([5; 16])],
    });
    r.frame(2, dev(2, 1), 2, receipt);
    let got = r.settle();
    assert_eq!(frames_to(&got, 2), vec![(2, ServerFrame::Done)]);
    match &frames_to(&got, 1)[..] {
        [(0, ServerFrame::GroupReceipt(g))] => {
            assert_eq!((g.group, g.from.user.as_str(), g.to.as_str()), (G, "bob", "alice"));
        }
        other => panic!("{other:?}"),
    }
    for d in [dev(1, 2), dev(2, 2)] {
        assert!(
            r.store
                .queue(d)
                .iter()
                .any(|(_, e)| matches!(e, Entry::GroupReceipt(_))),
            "{d}"
        );
    }
    assert!(
        !r.store
            .queue(dev(3, 1))
            .iter()
            .any(|(_, e)| matches!(e, Entry::GroupReceipt(_)))
    );
}

#[test]
fn a_block_stops_direct_messages_receipts_and_typing_silently_but_not_group_messages() {
    let (mut r, info) = a_group();
    r.frame(
        2,
        dev(2, 1),
        2,
        ClientFrame::Block {
            user: "alice".into(),
            blocked: true,
        },
    );
    let got = r.settle();
    assert_eq!(frames_to(&got, 2), vec![(2, ServerFrame::Done)]);
    // Bob's other device hears of it.
    assert!(
        r.store
            .queue(dev(2, 2))
            .iter()
            .any(|(_, e)| matches!(e, Entry::Block(b) if b.user == 1 && b.blocked))
    );
    let got = r.frame(2, dev(2, 1), 3, ClientFrame::ListBlocked);
    assert_eq!(
        frames_to(&got, 2),
        vec![(
            3,
            ServerFrame::Blocked {
                users: names(&["alice"])
            }
        )]
    );
    let before = r.store.queue(dev(2, 1)).len();
    // Alice's message is accepted, her other device has it, bob's do not.
    let got = r.frame(1, dev(1, 1), 4, send(1, "bob", &[1, 2], &[2]));
    assert!(frames_to(&got, 2).is_empty());
    r.store.flush();
    let got = r.effects();
    assert!(
        matches!(&frames_to(&got, 1)[..], [(4, ServerFrame::Accepted { .. })]),
        "{got:?}"
    );
    assert_eq!(r.store.queue(dev(2, 1)).len(), before);
    assert!(
        r.store
            .queue(dev(1, 2))
            .iter()
            .any(|(_, e)| matches!(e, Entry::Message(m) if m.id == MsgId([1; 16])))
    );
    // A receipt and typing: done, and nothing for bob.
    r.frame(
        1,
        dev(1, 1),
        5,
        ClientFrame::Receipt(Receipt {
            to: "bob".into(),
            kind: ReceiptKind::READ,
            ids: vec![MsgId([2; 16])],
        }),
    );
    let got = r.settle();
    assert_eq!(frames_to(&got, 1), vec![(5, ServerFrame::Done)]);
    assert!(frames_to(&got, 2).is_empty());
    let got = r.frame(1, dev(1, 1), 6, ephemeral("bob", &[1], 10));
    assert_eq!(frames_to(&got, 1), vec![(6, ServerFrame::Done)]);
    assert!(frames_to(&got, 2).is_empty());
    // In the group they share, alice's messages still reach bob.
    let got = r.frame(1, dev(1, 1), 7, group_send(3, &info));
    assert!(
        frames_to(&got, 2)
            .iter()
            .any(|(_, f)| matches!(f, ServerFrame::GroupDeliver(_)))
    );
    // Unblocked: direct messages arrive again.
    r.frame(
        2,
        dev(2, 1),
        8,
        ClientFrame::Block {
            user: "alice".into(),
            blocked: false,
        },
    );
    r.settle();
    let got = r.frame(1, dev(1, 1), 9, send(4, "bob", &[1, 2], &[2]));
    assert!(
        frames_to(&got, 2)
            .iter()
            .any(|(_, f)| matches!(f, ServerFrame::Deliver(_)))
    );
    // Blocking oneself or nobody: refused.
    let got = r.frame(
        2,
        dev(2, 1),
        10,
        ClientFrame::Block {
            user: "bob".into(),
            blocked: true,
        },
    );
    assert_eq!(frames_to(&got, 2), vec![(10, Refusal::BlockSelf.frame())]);
}
