//! Hub and core behaviour through the simulation harness: real sessions,
//! real store, virtual clock, no sockets.

use std::time::Duration;

use bytes::Bytes;

use super::sim::World;
use crate::hub::HubConfig;
use crate::ids::ConnId;
use crate::wire::{Body, ClientFrame, DeviceAddr, DeviceId, ErrorCode, MsgId, Send, ServerFrame};

fn body(device: u32, data: &'static [u8]) -> Body {
    Body {
        device: DeviceId(device),
        data: Bytes::from_static(data),
    }
}

fn send(id: u8, to: &str, bodies: Vec<Body>, own: Vec<Body>) -> ClientFrame {
    ClientFrame::Send(Send {
        id: MsgId([id; 16]),
        to: to.into(),
        bodies,
        own,
    })
}

fn delivered(frames: &[(u32, ServerFrame)]) -> Vec<(u64, MsgId, Bytes)> {
    frames
        .iter()
        .filter_map(|(_, f)| match f {
            ServerFrame::Deliver(d) => Some((d.seq, d.id, d.body.clone())),
            _ => None,
        })
        .collect()
}

fn accepted(frames: &[(u32, ServerFrame)]) -> Vec<MsgId> {
    frames
        .iter()
        .filter_map(|(_, f)| match f {
            ServerFrame::Accepted { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn ack(w: &mut World, conn: ConnId, up_to: u64) {
    w.request(conn, &ClientFrame::Ack { up_to });
    w.run();
}

/// Issue 9: a copy its online device acknowledges before the write delay
/// is never written; the sender gets `Accepted` on the ack (spec §10).
#[test]
fn an_online_copy_acked_in_time_is_accepted_and_never_written() {
    let mut w = World::new(1);
    w.auto_ack = false;
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    let _ = w.inbox(bob);
    w.request(alice, &send(1, "bob", vec![body(1, b"hi bob")], vec![]));
    w.run();
    // Bob has it at once; Alice has no tick until bob's ack.
    assert_eq!(
        delivered(&w.inbox(bob)),
        vec![(1, MsgId([1; 16]), Bytes::from_static(b"hi bob"))]
    );
    assert!(w.inbox(alice).is_empty());
    ack(&mut w, bob, 1);
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([1; 16])]);
    // Nothing of it ever reached the disk.
    w.advance(Duration::from_secs(1));
    assert_eq!(w.store.queued_bytes(), 0);
    assert_eq!(w.store.queue_totals(), (0, 0));
}

/// A copy its online device does not acknowledge in time is written, and
/// the sender gets `Accepted` once that is durable; the ack then deletes
/// it, and its message's shared record with it.
#[test]
fn an_online_copy_not_acked_in_time_is_written_then_accepted() {
    let mut w = World::new(1);
    w.auto_ack = false;
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    let _ = w.inbox(bob);
    w.request(alice, &send(1, "bob", vec![body(1, b"hi bob")], vec![]));
    w.run();
    assert_eq!(delivered(&w.inbox(bob)).len(), 1);
    assert!(w.inbox(alice).is_empty());
    w.auto_flush = false;
    w.advance(crate::store::StoreConfig::default().write_delay);
    // Written, not yet flushed: still no tick.
    assert!(w.store.queued_bytes() > 0);
    assert!(w.inbox(alice).is_empty());
    w.auto_flush = true;
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([1; 16])]);
    ack(&mut w, bob, 1);
    w.advance(Duration::from_millis(10));
    // Gone; what stays is bob's mark in the spill log (one small record).
    assert_eq!(w.store.queue_totals(), (0, 0));
    assert!(w.store.queued_bytes() <= 32, "{}", w.store.queued_bytes());
}

/// A copy for an offline device is written at once; `Accepted` waits for
/// the flush.
#[test]
fn an_offline_copy_is_accepted_only_after_the_flush() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.request(bob, &ClientFrame::Close);
    w.run();
    w.auto_flush = false;
    w.request(alice, &send(1, "bob", vec![body(1, b"hi bob")], vec![]));
    w.run();
    assert!(w.store.queued_bytes() > 0);
    assert!(w.inbox(alice).is_empty());
    w.auto_flush = true;
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([1; 16])]);
}

#[test]
fn registered_waits_for_the_flush() {
    let mut w = World::new(1);
    let invite = w.invite();
    w.auto_flush = false;
    let c = w.connect(0, crate::noise::Keypair::generate().unwrap());
    w.request(
        c,
        &ClientFrame::Register {
            invite,
            name: "alice".into(),
        },
    );
    w.run();
    assert!(w.inbox(c).is_empty());
    w.auto_flush = true;
    w.run();
    let got = w.inbox(c);
    assert!(matches!(&got[0], (1, ServerFrame::Registered { user, device: DeviceId(1) }) if user == "alice"));
    assert!(matches!(&got[1], (0, ServerFrame::QueueDrained)));
}

#[test]
fn offline_delivery_in_order_then_drained() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.clients.get_mut(&bob).unwrap(); // bob goes away
    w.request(bob, &ClientFrame::Close);
    w.run();
    assert!(w.is_dead(bob));
    for i in 1..=3 {
        w.request(alice, &send(i, "bob", vec![body(1, b"x")], vec![]));
    }
    w.run();
    assert_eq!(accepted(&w.inbox(alice)).len(), 3);
    let bob2 = w.reconnect(bob, 0);
    let got = w.inbox(bob2);
    let ids: Vec<_> = delivered(&got).iter().map(|d| d.1).collect();
    assert_eq!(ids, vec![MsgId([1; 16]), MsgId([2; 16]), MsgId([3; 16])]);
    assert!(matches!(got.last(), Some((0, ServerFrame::QueueDrained))));
    // Acked entries are gone; a new connection gets nothing more.
    ack(&mut w, bob2, 3);
    w.request(bob2, &ClientFrame::Close);
    w.run();
    let bob3 = w.reconnect(bob, 0);
    assert_eq!(w.inbox(bob3), vec![(0, ServerFrame::QueueDrained)]);
}

#[test]
fn unacked_messages_come_again_on_the_next_connection() {
    let mut w = World::new(1);
    w.auto_ack = false;
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    let _ = w.inbox(bob);
    w.request(alice, &send(1, "bob", vec![body(1, b"x")], vec![]));
    w.request(alice, &send(2, "bob", vec![body(1, b"y")], vec![]));
    w.run();
    assert_eq!(delivered(&w.inbox(bob)).len(), 2);
    ack(&mut w, bob, 1);
    let bob2 = w.reconnect(bob, 0);
    let got = w.inbox(bob2);
    assert_eq!(delivered(&got).iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn window_bounds_unacked_deliveries() {
    let mut w = World::with_config(
        1,
        HubConfig {
            window: 4,
            ..HubConfig::default()
        },
    );
    w.auto_ack = false;
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.request(bob, &ClientFrame::Close);
    w.run();
    for i in 1..=10 {
        w.request(alice, &send(i, "bob", vec![body(1, b"x")], vec![]));
    }
    w.run();
    let bob = w.reconnect(bob, 0);
    let first = delivered(&w.inbox(bob));
    assert_eq!(first.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    // An ack beyond what was delivered is refused and deletes nothing.
    ack(&mut w, bob, 100);
    assert!(matches!(
        &w.inbox(bob)[..],
        [(
            _,
            ServerFrame::Error {
                code: ErrorCode::BAD_REQUEST,
                ..
            }
        )]
    ));
    ack(&mut w, bob, 4);
    let next = w.inbox(bob);
    assert_eq!(
        delivered(&next).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    ack(&mut w, bob, 8);
    let last = w.inbox(bob);
    assert_eq!(delivered(&last).iter().map(|d| d.0).collect::<Vec<_>>(), vec![9, 10]);
    assert!(matches!(last.last(), Some((0, ServerFrame::QueueDrained))));
}

#[test]
fn a_retry_is_accepted_again_and_stored_once() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.request(bob, &ClientFrame::Close);
    w.run();
    w.request(alice, &send(7, "bob", vec![body(1, b"x")], vec![]));
    w.request(alice, &send(7, "bob", vec![body(1, b"x")], vec![]));
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([7; 16]), MsgId([7; 16])]);
    let bob = w.reconnect(bob, 0);
    assert_eq!(delivered(&w.inbox(bob)).len(), 1);
}

#[test]
fn mismatch_lists_missing_and_extra_devices_and_stores_nothing() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let alice2 = w.link(alice, 0);
    let bob = w.register(0, "bob");
    let bob2 = w.link(bob, 0);
    for c in [alice, alice2, bob, bob2] {
        let _ = w.inbox(c);
    }
    // Bob has devices 1 and 2; Alice writes for 1 and 3, and forgets her 2.
    w.request(alice, &send(1, "bob", vec![body(1, b"a"), body(3, b"c")], vec![]));
    w.run();
    let got = w.inbox(alice);
    let (missing, extra) = match &got[..] {
        [(_, ServerFrame::Mismatch { missing, extra, .. })] => (missing.clone(), extra.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        missing,
        vec![
            DeviceAddr {
                user: "alice".into(),
                device: DeviceId(2)
            },
            DeviceAddr {
                user: "bob".into(),
                device: DeviceId(2)
            },
        ]
    );
    assert_eq!(
        extra,
        vec![DeviceAddr {
            user: "bob".into(),
            device: DeviceId(3)
        }]
    );
    assert!(w.inbox(bob).is_empty());
    // The retry with the same id and the right devices goes through.
    w.request(
        alice,
        &send(1, "bob", vec![body(1, b"a"), body(2, b"b")], vec![body(2, b"own")]),
    );
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([1; 16])]);
    assert_eq!(delivered(&w.inbox(bob))[0].2, Bytes::from_static(b"a"));
    assert_eq!(delivered(&w.inbox(bob2))[0].2, Bytes::from_static(b"b"));
    let copy = w.inbox(alice2);
    match &copy[..] {
        [(0, ServerFrame::Deliver(d))] => {
            assert_eq!(d.to, "bob");
            assert_eq!(
                d.from,
                DeviceAddr {
                    user: "alice".into(),
                    device: DeviceId(1)
                }
            );
            assert_eq!(d.body, Bytes::from_static(b"own"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_sends_get_their_codes() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let _bob = w.register(0, "bob");
    let big: &'static [u8] = Box::leak(vec![0u8; crate::wire::MAX_BODY_LEN + 1].into_boxed_slice());
    let cases = [
        (send(1, "nobody", vec![body(1, b"x")], vec![]), ErrorCode::UNKNOWN_USER),
        (send(2, "bob", vec![body(1, big)], vec![]), ErrorCode::BODY_TOO_LARGE),
        (
            send(3, "bob", (0..16).map(|d| body(d, b"x")).collect(), vec![]),
            ErrorCode::TOO_MANY_BODIES,
        ),
        (
            send(4, "bob", vec![body(1, b"x"), body(1, b"y")], vec![]),
            ErrorCode::BAD_REQUEST,
        ),
        (send(5, "alice", vec![], vec![body(1, b"x")]), ErrorCode::BAD_REQUEST),
        (
            send(6, "bob", vec![body(1, b"x")], vec![body(1, b"me")]),
            ErrorCode::BAD_REQUEST,
        ),
        (
            send(7, "bob", vec![body(9, b"x"), body(9, b"y")], vec![]),
            ErrorCode::BAD_REQUEST,
        ),
        (send(8, "alice", vec![body(1, b"x")], vec![]), ErrorCode::BAD_REQUEST),
    ];
    for (frame, code) in cases {
        let req = w.request(alice, &frame);
        w.run();
        let got = w.inbox(alice);
        assert!(
            matches!(&got[..], [(r, ServerFrame::Error { code: c, .. })] if *r == req && *c == code),
            "{code:?}: {got:?}"
        );
    }
}

#[test]
fn a_device_connecting_again_closes_the_older_connection() {
    let mut w = World::new(1);
    let bob = w.register(0, "bob");
    let _ = w.inbox(bob);
    let bob_again = w.reconnect(bob, 0);
    let got = w.inbox(bob);
    assert!(
        matches!(
            &got[..],
            [(
                0,
                ServerFrame::Close {
                    code: ErrorCode::CONNECTED_ELSEWHERE,
                    ..
                }
            )]
        ),
        "{got:?}"
    );
    assert!(w.is_dead(bob));
    assert!(!w.is_dead(bob_again));
    assert_eq!(
        w.shared.connection_of(w.cores[0].device_of(bob_again.serial).unwrap()),
        Some(bob_again)
    );
}

#[test]
fn revoke_cuts_a_device_off() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let alice2 = w.link(alice, 0);
    let _ = w.inbox(alice);
    let _ = w.inbox(alice2);
    w.request(alice, &ClientFrame::RevokeDevice { device: DeviceId(2) });
    w.run();
    assert!(matches!(&w.inbox(alice)[..], [(_, ServerFrame::Done)]));
    assert!(matches!(
        &w.inbox(alice2)[..],
        [(
            0,
            ServerFrame::Close {
                code: ErrorCode::REVOKED,
                ..
            }
        )]
    ));
    assert!(w.is_dead(alice2));
    let again = w.reconnect(alice2, 0);
    assert!(matches!(
        &w.inbox(again)[..],
        [(
            0,
            ServerFrame::Close {
                code: ErrorCode::REVOKED,
                ..
            }
        )]
    ));
    w.request(alice, &ClientFrame::RevokeDevice { device: DeviceId(2) });
    w.run();
    assert!(matches!(
        &w.inbox(alice)[..],
        [(
            _,
            ServerFrame::Error {
                code: ErrorCode::UNKNOWN_DEVICE,
                ..
            }
        )]
    ));
    // The last device cannot revoke itself.
    w.request(alice, &ClientFrame::RevokeDevice { device: DeviceId(1) });
    w.run();
    assert!(matches!(
        &w.inbox(alice)[..],
        [(
            _,
            ServerFrame::Error {
                code: ErrorCode::BAD_REQUEST,
                ..
            }
        )]
    ));
    w.request(alice, &ClientFrame::ListDevices { user: "alice".into() });
    w.run();
    assert!(
        matches!(&w.inbox(alice)[..], [(_, ServerFrame::Devices { devices, .. })] if devices == &vec![DeviceId(1)])
    );
}

#[test]
fn idle_devices_are_pinged_and_keep_their_connection() {
    let mut w = World::new(1);
    let bob = w.register(0, "bob");
    let _ = w.inbox(bob);
    // The sim client answers pings, so the connection survives an hour.
    for _ in 0..120 {
        w.advance(Duration::from_secs(31));
    }
    assert!(!w.is_dead(bob));
    assert!(w.inbox(bob).iter().all(|(_, f)| *f == ServerFrame::Ping));
}

#[test]
fn two_loops_deliver_across() {
    let mut w = World::new(2);
    let alice = w.register(0, "alice");
    let bob = w.register(1, "bob");
    let _ = w.inbox(bob);
    for i in 1..=50 {
        w.request(alice, &send(i, "bob", vec![body(1, b"x")], vec![]));
    }
    w.run();
    assert_eq!(accepted(&w.inbox(alice)).len(), 50);
    let ids: Vec<u8> = delivered(&w.inbox(bob)).iter().map(|d| d.1.0[0]).collect();
    assert_eq!(ids, (1..=50).collect::<Vec<_>>());
    // Connecting on the other loop closes the first connection there.
    let bob_again = w.reconnect(bob, 0);
    assert!(w.is_dead(bob));
    assert!(!w.is_dead(bob_again));
}

/// Typing and presence through the real sessions and store, across two
/// loops (spec §5.6): an ephemeral body reaches the online device on the
/// other loop at once and is never queued; a watcher on one loop hears a
/// device on the other come and go.
#[test]
fn ephemerals_and_presence_cross_loops_and_nothing_is_queued() {
    let mut w = World::new(2);
    let alice = w.register(0, "alice");
    let bob = w.register(1, "bob");
    let _ = w.inbox(bob);
    let _ = w.inbox(alice);
    let typing = |bodies| {
        ClientFrame::Ephemeral(crate::wire::Ephemeral {
            to: "bob".into(),
            bodies,
        })
    };
    let req = w.request(alice, &typing(vec![body(1, b"typing")]));
    w.run();
    assert_eq!(w.inbox(alice), vec![(req, ServerFrame::Done)]);
    match &w.inbox(bob)[..] {
        [(0, ServerFrame::Ephemeral(e))] => {
            assert_eq!((e.from.user.as_str(), e.to.as_str()), ("alice", "bob"));
            assert_eq!(&e.body[..], b"typing");
        }
        other => panic!("{other:?}"),
    }
    // Alice watches bob; bob goes away: nothing waits for him.
    let req = w.request(
        alice,
        &ClientFrame::WatchPresence {
            users: vec!["bob".into()],
        },
    );
    w.run();
    let got = w.inbox(alice);
    assert_eq!(got[0], (req, ServerFrame::Done));
    assert!(
        matches!(&got[1], (0, ServerFrame::Presence(p)) if p.seen == crate::wire::Seen::Online { devices: vec![crate::wire::DeviceId(1)] }),
        "{got:?}"
    );
    w.request(bob, &ClientFrame::Close);
    w.run();
    let got = w.inbox(alice);
    assert!(
        matches!(&got[..], [(0, ServerFrame::Presence(p))] if matches!(p.seen, crate::wire::Seen::Away { last_seen_ms } if last_seen_ms > 0)),
        "{got:?}"
    );
    let req = w.request(alice, &typing(vec![body(1, b"again")]));
    w.run();
    assert_eq!(w.inbox(alice), vec![(req, ServerFrame::Done)]);
    let bob = w.reconnect(bob, 1);
    let got = w.inbox(bob);
    assert!(
        !got.iter()
            .any(|(_, f)| matches!(f, ServerFrame::Ephemeral(_) | ServerFrame::Deliver(_))),
        "{got:?}"
    );
    let got = w.inbox(alice);
    assert!(
        matches!(&got[..], [(0, ServerFrame::Presence(p))] if matches!(p.seen, crate::wire::Seen::Online { .. })),
        "{got:?}"
    );
    let _ = bob;
}

mod keys {
    use super::*;
    use crate::wire::{IdentityKeys, PublishKeys, Signature, SignedKey};
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    struct Device {
        signer: Ed25519KeyPair,
        identity: IdentityKeys,
    }

    fn device() -> Device {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let signer = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let ed25519: [u8; 32] = signer.public_key().as_ref().try_into().unwrap();
        let curve25519 = [0x42; 32];
        let sig = signer.sign(&crate::keys::identity_message(&curve25519, &ed25519));
        let identity = IdentityKeys {
            curve25519,
            ed25519,
            signature: Signature(sig.as_ref().try_into().unwrap()),
        };
        Device { signer, identity }
    }

    impl Device {
        fn key(&self, n: u8) -> SignedKey {
            let key = [n; 32];
            let sig = self.signer.sign(&crate::keys::one_time_message(&key));
            SignedKey {
                key,
                signature: Signature(sig.as_ref().try_into().unwrap()),
            }
        }

        fn publish(&self, keys: std::ops::Range<u8>, fallback: bool) -> ClientFrame {
            ClientFrame::PublishKeys(Box::new(PublishKeys {
                identity: Some(self.identity),
                one_time: keys.map(|n| self.key(n)).collect(),
                fallback: fallback.then(|| self.key(255)),
            }))
        }
    }

    #[test]
    fn publish_and_claim_each_key_once_then_the_fallback() {
        let mut w = World::new(1);
        let alice = w.register(0, "alice");
        let bob = w.register(0, "bob");
        let _ = w.inbox(bob);
        let _ = w.inbox(alice);
        let bob_keys = device();
        w.request(bob, &bob_keys.publish(1..4, true));
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(_, ServerFrame::KeyCount { one_time: 3 })]
        ));
        let mut seen = Vec::new();
        for _ in 0..3 {
            w.request(alice, &ClientFrame::ClaimKeys { user: "bob".into() });
            w.run();
            match &w.inbox(alice)[..] {
                [(_, ServerFrame::Keys { user, devices })] => {
                    assert_eq!(user, "bob");
                    assert_eq!(devices.len(), 1);
                    assert_eq!(devices[0].identity, bob_keys.identity);
                    assert!(!devices[0].fallback);
                    let k = devices[0].one_time.unwrap();
                    assert!(crate::keys::verify_signed_key(&devices[0].identity, &k));
                    seen.push(k.key);
                }
                other => panic!("{other:?}"),
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "each one-time key once");
        // Bob is told his stock is low as it drains.
        let told: Vec<_> = w.inbox(bob).into_iter().map(|(_, f)| f).collect();
        assert_eq!(told.last(), Some(&ServerFrame::KeyCount { one_time: 0 }));
        w.request(alice, &ClientFrame::ClaimKeys { user: "bob".into() });
        w.run();
        match &w.inbox(alice)[..] {
            [(_, ServerFrame::Keys { devices, .. })] => {
                assert!(devices[0].fallback);
                assert_eq!(devices[0].one_time.unwrap().key, [255; 32]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_uploads_are_refused() {
        let mut w = World::new(1);
        let bob = w.register(0, "bob");
        let _ = w.inbox(bob);
        let d = device();
        let mut forged = d.publish(1..2, false);
        if let ClientFrame::PublishKeys(p) = &mut forged {
            p.one_time[0].key[0] ^= 1;
        }
        w.request(bob, &forged);
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::BAD_REQUEST,
                    ..
                }
            )]
        ));
        // Keys without any identity.
        w.request(
            bob,
            &ClientFrame::PublishKeys(Box::new(PublishKeys {
                identity: None,
                one_time: vec![d.key(1)],
                fallback: None,
            })),
        );
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::BAD_REQUEST,
                    ..
                }
            )]
        ));
        w.request(bob, &d.publish(1..2, false));
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(_, ServerFrame::KeyCount { one_time: 1 })]
        ));
        // Another identity for the same device is refused.
        w.request(bob, &device().publish(5..6, false));
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::NOT_ALLOWED,
                    ..
                }
            )]
        ));
        // Too many.
        w.request(bob, &d.publish(10..120, false));
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::BAD_REQUEST,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn claims_are_rate_limited_per_device() {
        let mut w = World::with_config(
            1,
            HubConfig {
                claims_per_minute: 5,
                ..HubConfig::default()
            },
        );
        let alice = w.register(0, "alice");
        let _bob = w.register(0, "bob");
        let _ = w.inbox(alice);
        let claim = ClientFrame::ClaimKeys { user: "bob".into() };
        for _ in 0..5 {
            w.request(alice, &claim);
        }
        w.run();
        assert!(
            w.inbox(alice)
                .iter()
                .all(|(_, f)| matches!(f, ServerFrame::Keys { .. }))
        );
        w.request(alice, &claim);
        w.run();
        assert!(matches!(
            &w.inbox(alice)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::RATE_LIMITED,
                    ..
                }
            )]
        ));
        // A reconnect does not reset it; time does.
        let alice = w.reconnect(alice, 0);
        let _ = w.inbox(alice);
        w.request(alice, &claim);
        w.run();
        assert!(matches!(
            &w.inbox(alice)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::RATE_LIMITED,
                    ..
                }
            )]
        ));
        w.advance(Duration::from_secs(13));
        w.request(alice, &claim);
        w.run();
        assert!(matches!(&w.inbox(alice)[..], [(_, ServerFrame::Keys { .. })]));
    }
}

mod receipts_and_retract {
    use super::*;
    use crate::store::{Quotas, StoreConfig};
    use crate::wire::{Receipt, ReceiptKind};

    #[test]
    fn receipts_reach_the_senders_devices_and_the_readers_other_devices() {
        let mut w = World::new(2);
        let alice = w.register(0, "alice");
        let alice2 = w.link(alice, 1);
        let bob = w.register(1, "bob");
        let bob2 = w.link(bob, 0);
        w.request(
            alice,
            &send(1, "bob", vec![body(1, b"a"), body(2, b"b")], vec![body(2, b"c")]),
        );
        w.run();
        for c in [alice, alice2, bob, bob2] {
            let _ = w.inbox(c);
        }
        let receipt = ClientFrame::Receipt(Receipt {
            to: "alice".into(),
            kind: ReceiptKind::READ,
            ids: vec![MsgId([1; 16])],
        });
        let req = w.request(bob, &receipt);
        w.run();
        assert_eq!(w.inbox(bob), vec![(req, ServerFrame::Done)]);
        for c in [alice, alice2, bob2] {
            match &w.inbox(c)[..] {
                [(0, ServerFrame::Receipt(r))] => {
                    assert_eq!(
                        r.from,
                        DeviceAddr {
                            user: "bob".into(),
                            device: DeviceId(1)
                        }
                    );
                    assert_eq!(r.to, "alice");
                    assert_eq!(r.kind, ReceiptKind::READ);
                    assert_eq!(r.ids, vec![MsgId([1; 16])]);
                }
                other => panic!("{c:?}: {other:?}"),
            }
        }
        let bad = ClientFrame::Receipt(Receipt {
            to: "alice".into(),
            kind: ReceiptKind::READ,
            ids: vec![],
        });
        w.request(bob, &bad);
        w.run();
        assert!(matches!(
            &w.inbox(bob)[..],
            [(
                _,
                ServerFrame::Error {
                    code: ErrorCode::BAD_REQUEST,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn receipts_for_an_offline_device_are_folded() {
        let mut w = World::new(1);
        let alice = w.register(0, "alice");
        let bob = w.register(0, "bob");
        w.request(alice, &ClientFrame::Close);
        w.run();
        for i in 1..=20 {
            w.request(
                bob,
                &ClientFrame::Receipt(Receipt {
                    to: "alice".into(),
                    kind: ReceiptKind::DELIVERED,
                    ids: vec![MsgId([i; 16])],
                }),
            );
        }
        w.run();
        let alice = w.reconnect(alice, 0);
        let got = w.inbox(alice);
        let receipts: Vec<_> = got
            .iter()
            .filter(|(_, f)| matches!(f, ServerFrame::Receipt(_)))
            .collect();
        assert_eq!(receipts.len(), 1, "{got:?}");
        if let ServerFrame::Receipt(r) = &receipts[0].1 {
            assert_eq!(r.ids.len(), 20);
        }
    }

    #[test]
    fn a_retract_removes_the_copies_still_queued() {
        let mut w = World::new(1);
        w.auto_ack = false;
        let alice = w.register(0, "alice");
        let bob = w.register(0, "bob");
        w.request(bob, &ClientFrame::Close);
        w.run();
        w.request(alice, &send(1, "bob", vec![body(1, b"oops")], vec![]));
        w.request(alice, &send(2, "bob", vec![body(1, b"fine")], vec![]));
        w.run();
        let _ = w.inbox(alice);
        w.request(alice, &ClientFrame::Retract { id: MsgId([1; 16]) });
        w.run();
        assert!(matches!(&w.inbox(alice)[..], [(_, ServerFrame::Done)]));
        let bob = w.reconnect(bob, 0);
        let ids: Vec<MsgId> = delivered(&w.inbox(bob)).iter().map(|d| d.1).collect();
        assert_eq!(ids, vec![MsgId([2; 16])]);
        // Bob cannot retract alice's message.
        w.request(bob, &ClientFrame::Retract { id: MsgId([2; 16]) });
        w.run();
        let _ = w.inbox(bob);
        let bob2 = w.reconnect(bob, 0);
        assert_eq!(delivered(&w.inbox(bob2)).len(), 1);
    }

    #[test]
    fn a_full_queue_refuses_and_keeps_what_it_has() {
        let quotas = Quotas {
            queue_messages: 5,
            ..Quotas::default()
        };
        let mut w = World::with_configs(
            1,
            HubConfig::default(),
            StoreConfig {
                quotas,
                ..StoreConfig::default()
            },
        );
        let alice = w.register(0, "alice");
        let bob = w.register(0, "bob");
        w.request(bob, &ClientFrame::Close);
        w.run();
        for i in 1..=6 {
            w.request(alice, &send(i, "bob", vec![body(1, b"x")], vec![]));
        }
        w.run();
        let got = w.inbox(alice);
        assert_eq!(accepted(&got).len(), 5);
        assert!(got.iter().any(|(_, f)| matches!(
            f,
            ServerFrame::Error {
                code: ErrorCode::QUOTA_EXCEEDED,
                ..
            }
        )));
        let bob = w.reconnect(bob, 0);
        let ids: Vec<u8> = delivered(&w.inbox(bob)).iter().map(|d| d.1.0[0]).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    }
}

#[test]
fn expiry_notices_reach_both_sides() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.request(bob, &ClientFrame::Close);
    w.run();
    w.request(alice, &send(1, "bob", vec![body(1, b"x")], vec![]));
    w.request(alice, &send(2, "bob", vec![body(1, b"y")], vec![]));
    w.run();
    let _ = w.inbox(alice);
    // Everything accepted so far is past its retention.
    let cutoff = w.now.unix_ms + 1;
    w.sweep(cutoff);
    // Alice is online: told at once which ids never reached which device.
    match &w.inbox(alice)[..] {
        [(0, ServerFrame::Expired(e))] => {
            assert_eq!(
                e.device,
                DeviceAddr {
                    user: "bob".into(),
                    device: DeviceId(1)
                }
            );
            assert_eq!(e.ids, vec![MsgId([1; 16]), MsgId([2; 16])]);
        }
        other => panic!("{other:?}"),
    }
    // Bob, when he connects: a gap notice, then the drain.
    let bob = w.reconnect(bob, 0);
    let got = w.inbox(bob);
    match &got[..] {
        [(0, ServerFrame::Gap(g)), (0, ServerFrame::QueueDrained)] => {
            assert_eq!(g.lost.len(), 1);
            assert_eq!(
                g.lost[0].from,
                DeviceAddr {
                    user: "alice".into(),
                    device: DeviceId(1)
                }
            );
            assert_eq!(g.lost[0].count, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retry_after_a_device_change_is_still_accepted() {
    let mut w = World::new(1);
    let alice = w.register(0, "alice");
    let bob = w.register(0, "bob");
    w.request(alice, &send(3, "bob", vec![body(1, b"x")], vec![]));
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([3; 16])]);
    // Bob links a second device; alice's retry (same id, old device list)
    // is answered from the dedup record, not with a mismatch.
    let _bob2 = w.link(bob, 0);
    w.request(alice, &send(3, "bob", vec![body(1, b"x")], vec![]));
    w.run();
    assert_eq!(accepted(&w.inbox(alice)), vec![MsgId([3; 16])]);
    let _ = w.inbox(bob);
}

/// Issue 14: revocation holds across loops. Each test runs its steps in
/// every order the loops could take them (a simulated schedule over two
/// loops, a fresh world each time) and checks the outcome of each.
mod revocation {
    use super::*;
    use crate::ids::{DeviceKey, UserId};
    use crate::noise::Keypair;

    /// Every order of `n` steps in which each `(a, b)` of `before` has `a`
    /// before `b`.
    fn orders(n: usize, before: &[(usize, usize)]) -> Vec<Vec<usize>> {
        fn go(n: usize, before: &[(usize, usize)], prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            if prefix.len() == n {
                out.push(prefix.clone());
                return;
            }
            for s in 0..n {
                let ready = !prefix.contains(&s) && before.iter().all(|&(a, b)| b != s || prefix.contains(&a));
                if ready {
                    prefix.push(s);
                    go(n, before, prefix, out);
                    prefix.pop();
                }
            }
        }
        let mut out = Vec::new();
        go(n, before, &mut Vec::new(), &mut out);
        out
    }

    /// Who revokes alice's device 2.
    #[derive(Debug, Clone, Copy)]
    enum Revoker {
        /// Alice's device 1, on loop 0.
        Device,
        /// The operator (`tidingsd revoke`), through the admin socket,
        /// whose close reaches the loop through its mailbox.
        Operator,
    }

    const ALICE2: DeviceKey = DeviceKey {
        user: UserId(1),
        device: DeviceId(2),
    };

    /// The revoke, as one step: a turn of loop 0 on alice's `RevokeDevice`
    /// (queued by `prepare`), or the operator's command, and the store
    /// thread's turn that applies it (not flushed: its answer, and the
    /// close that follows, wait for the flush step).
    fn revoke(w: &mut World, revoker: Revoker, alice: ConnId) {
        match revoker {
            Revoker::Device => w.turn(alice),
            Revoker::Operator => w.operator_revoke(ALICE2),
        }
        w.step_store(false);
    }

    fn prepare(w: &mut World, revoker: Revoker, alice: ConnId) {
        if let Revoker::Device = revoker {
            w.request(alice, &ClientFrame::RevokeDevice { device: DeviceId(2) });
        }
    }

    fn is_revoked_close(f: &(u32, ServerFrame)) -> bool {
        matches!(
            f,
            (
                0,
                ServerFrame::Close {
                    code: ErrorCode::REVOKED,
                    ..
                }
            )
        )
    }

    /// Point 7 of the issue: device 2 reconnects on loop 1 while it is
    /// revoked on loop 0. Its handshake's identify, its entry in the online
    /// map, the revoke, the flush and the hand-over between loops come in
    /// every order; in each, the connection ends closed with `REVOKED` (and
    /// is never served if the revoke came before its entry in the online
    /// map), and the online map forgets it.
    #[test]
    fn a_revoke_between_identify_and_the_online_map_still_closes_the_connection() {
        for revoker in [Revoker::Device, Revoker::Operator] {
            // Steps: 0 loop 1 reads the handshake's last message (identify),
            // 1 loop 1 handles the events (online map), 2 the revoke, 3 a
            // flush, 4 loops exchange effects and output.
            for order in orders(5, &[(0, 1)]) {
                let mut w = World::new(2);
                let alice = w.register(0, "alice");
                let alice2 = w.link(alice, 1);
                w.request(alice2, &ClientFrame::Close);
                w.run();
                assert!(w.is_dead(alice2));
                let key = w.clients[&alice2].key.clone();
                let _ = w.inbox(alice);
                let again = w.connect_pending(1, key);
                prepare(&mut w, revoker, alice);
                for &step in &order {
                    match step {
                        0 => w.read_only(again),
                        1 => w.handle_read(again),
                        2 => revoke(&mut w, revoker, alice),
                        3 => w.flush(),
                        _ => {
                            w.exchange();
                        }
                    }
                }
                w.run();
                let got = w.inbox(again);
                let case = format!("{revoker:?}, order {order:?}: {got:?}");
                assert!(got.iter().any(is_revoked_close), "{case}");
                // Served only if it was online before the revoke.
                let pos = |s: usize| order.iter().position(|&x| x == s);
                if pos(2) < pos(1) {
                    assert!(!got.iter().any(|f| f.1 == ServerFrame::QueueDrained), "{case}");
                }
                assert!(w.is_dead(again), "{case}");
                assert_eq!(w.shared.connection_of(ALICE2), None, "{case}");
                if let Revoker::Device = revoker {
                    assert!(matches!(&w.inbox(alice)[..], [(_, ServerFrame::Done)]), "{case}");
                }
            }
        }
    }

    /// Device 2, online on loop 1, asks for a link code while it is revoked
    /// on loop 0, in every order of the two turns, the flush and the
    /// exchange between loops: whatever code it got never redeems, the
    /// user has no code left outstanding, and the connection is closed.
    #[test]
    fn a_code_asked_for_around_a_revoke_never_redeems() {
        for revoker in [Revoker::Device, Revoker::Operator] {
            // Steps: 0 loop 1's turn on `RequestLink`, 1 the revoke, 2 a
            // flush, 3 loops exchange effects and output.
            for order in orders(4, &[]) {
                let mut w = World::new(2);
                let alice = w.register(0, "alice");
                let alice2 = w.link(alice, 1);
                let _ = w.inbox(alice);
                let _ = w.inbox(alice2);
                w.request(alice2, &ClientFrame::RequestLink);
                prepare(&mut w, revoker, alice);
                for &step in &order {
                    match step {
                        0 => w.turn(alice2),
                        1 => revoke(&mut w, revoker, alice),
                        2 => w.flush(),
                        _ => {
                            w.exchange();
                        }
                    }
                }
                w.run();
                let got = w.inbox(alice2);
                let case = format!("{revoker:?}, order {order:?}: {got:?}");
                assert!(got.iter().any(is_revoked_close), "{case}");
                assert!(w.is_dead(alice2), "{case}");
                assert_eq!(
                    w.store.accounts().outstanding_links(UserId(1), w.now.unix_ms),
                    0,
                    "{case}"
                );
                for (_, frame) in got {
                    if let ServerFrame::LinkCode { code, .. } = frame {
                        let stranger = w.connect(0, Keypair::generate().unwrap());
                        let req = w.request(stranger, &ClientFrame::RedeemLink { code });
                        w.run();
                        assert!(
                            matches!(
                                &w.inbox(stranger)[..],
                                [(r, ServerFrame::Error { code: ErrorCode::INVALID_LINK_CODE, .. })] if *r == req
                            ),
                            "{case}"
                        );
                    }
                }
                let mut devices = Vec::new();
                w.store.accounts().current_devices(UserId(1), &mut devices);
                assert_eq!(devices, vec![DeviceId(1)], "{case}");
            }
        }
    }

    /// A revoked device's frames are not acted on even while the close from
    /// the revoking loop is still on its way: loop 1 handles `RequestLink`
    /// after the revoke on loop 0 but before the close arrives, and answers
    /// nothing.
    #[test]
    fn frames_after_the_revoke_are_not_acted_on() {
        let mut w = World::new(2);
        let alice = w.register(0, "alice");
        let alice2 = w.link(alice, 1);
        let _ = w.inbox(alice2);
        w.request(alice, &ClientFrame::RevokeDevice { device: DeviceId(2) });
        w.turn(alice);
        // The store thread applies it; not yet durable, so not answered.
        w.step_store(false);
        w.request(alice2, &ClientFrame::RequestLink);
        w.request(alice2, &ClientFrame::MyDevices);
        w.turn(alice2);
        w.flush();
        assert_eq!(w.store.accounts().outstanding_links(UserId(1), w.now.unix_ms), 0);
        w.run();
        let got = w.inbox(alice2);
        assert!(matches!(&got[..], [f] if is_revoked_close(f)), "{got:?}");
    }

    /// Link-code limits through the hub: refusals carry `RATE_LIMITED` and,
    /// at eight devices, `DEVICE_LIMIT`.
    #[test]
    fn link_code_limits() {
        let mut w = World::new(1);
        let alice = w.register(0, "alice");
        let _ = w.inbox(alice);
        for _ in 0..crate::store::MAX_LINK_CODES {
            w.request(alice, &ClientFrame::RequestLink);
        }
        let over = w.request(alice, &ClientFrame::RequestLink);
        w.run();
        let got = w.inbox(alice);
        let codes: Vec<_> = got
            .iter()
            .filter_map(|(_, f)| match f {
                ServerFrame::LinkCode { code, .. } => Some(code.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(codes.len(), crate::store::MAX_LINK_CODES, "{got:?}");
        assert!(
            got.iter()
                .any(|f| matches!(f, (r, ServerFrame::Error { code: ErrorCode::RATE_LIMITED, .. }) if *r == over)),
            "{got:?}"
        );
        // Use them, and link more, up to eight devices.
        for code in codes {
            let c = w.connect(0, Keypair::generate().unwrap());
            w.request(c, &ClientFrame::RedeemLink { code });
            w.run();
        }
        while w.store.accounts().device_infos(UserId(1)).len() < crate::wire::MAX_DEVICES_PER_USER {
            w.link(alice, 0);
        }
        let req = w.request(alice, &ClientFrame::RequestLink);
        w.run();
        assert!(
            matches!(&w.inbox(alice)[..], [(r, ServerFrame::Error { code: ErrorCode::DEVICE_LIMIT, .. })] if *r == req)
        );
    }
}
