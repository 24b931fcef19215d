//! The client connection against the server's real [`Session`], in memory,
//! with a virtual clock. The test plays the hub.

use std::sync::Arc;

use super::*;
use crate::ids::{DeviceKey, UserId};
use crate::session::{Event, Identity, Phase, Session, SessionConfig};
use crate::wire::{DeviceAddr, DeviceId, MsgId, PREAMBLE, Refusal, Token};

const ALICE: DeviceKey = DeviceKey {
    user: UserId(1),
    device: DeviceId(1),
};

struct Pair {
    server_key: Arc<Keypair>,
    session: Session,
    conn: Conn,
    now: Instant,
    identity: Identity,
}

impl Pair {
    fn new(identity: Identity) -> Pair {
        let now = Instant::now();
        let server_key = Arc::new(Keypair::generate().unwrap());
        let session = Session::new(server_key.clone(), SessionConfig::default(), now);
        let client_key = Keypair::generate().unwrap();
        let conn = Conn::new(&client_key, &server_key.public, ConnConfig::default(), now).unwrap();
        Pair {
            server_key,
            session,
            conn,
            now,
            identity,
        }
    }

    /// Moves bytes both ways until neither side has anything to write.
    fn pump(&mut self) {
        loop {
            let c2s = self.conn.transmit().to_vec();
            self.conn.advance(c2s.len());
            let id = self.identity;
            self.session.handle_input(&c2s, self.now, &mut |_| id);
            let s2c = self.session.transmit().to_vec();
            self.session.advance(s2c.len());
            self.conn.handle_input(&s2c, self.now);
            if c2s.is_empty() && s2c.is_empty() {
                break;
            }
        }
    }

    fn events(&mut self) -> Vec<ConnEvent> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    fn server_events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }

    fn ready(identity: Identity) -> Pair {
        let mut p = Pair::new(identity);
        p.pump();
        assert_eq!(p.events(), vec![ConnEvent::Ready]);
        p
    }
}

fn deliver(seq: u64) -> Deliver {
    Deliver {
        seq,
        id: MsgId([seq as u8; 16]),
        from: DeviceAddr {
            user: "bob".into(),
            device: DeviceId(2),
        },
        to: "alice".into(),
        time_ms: 1000 + seq,
        body: bytes::Bytes::from_static(b"\x00\x02hi\x01"),
    }
}

#[test]
fn handshake_then_request_and_answer() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    assert_eq!(p.session.phase(), Phase::Authenticated);
    assert_eq!(p.server_events(), vec![Event::Authenticated(ALICE)]);
    assert!(p.conn.is_open());
    let req = p.conn.request(&ClientFrame::MyDevices, p.now).unwrap();
    assert_eq!(req, 1);
    p.pump();
    assert_eq!(
        p.server_events(),
        vec![Event::Frame {
            req: 1,
            frame: ClientFrame::MyDevices
        }]
    );
    p.session.send(req, &ServerFrame::Done, p.now);
    p.pump();
    assert_eq!(
        p.events(),
        vec![ConnEvent::Answer {
            req: 1,
            frame: ServerFrame::Done
        }]
    );
    // Request ids count up.
    assert_eq!(p.conn.request(&ClientFrame::MyDevices, p.now), Ok(2));
}

#[test]
fn requests_wait_for_the_handshake() {
    let mut p = Pair::new(Identity::Unregistered);
    assert_eq!(p.conn.request(&ClientFrame::Ping, p.now), Err(ConnError::NotOpen));
    // The transmit buffer holds exactly the preamble and message 1.
    assert_eq!(&p.conn.transmit()[..8], &PREAMBLE);
    assert_eq!(p.conn.transmit().len(), 8 + 2 + 48);
}

#[test]
fn register_while_unregistered() {
    let mut p = Pair::ready(Identity::Unregistered);
    let reg = ClientFrame::Register {
        invite: Token {
            id: [1; 8],
            secret: [2; 16],
        },
        name: "alice".into(),
    };
    let req = p.conn.request(&reg, p.now).unwrap();
    p.pump();
    assert_eq!(p.server_events(), vec![Event::Frame { req, frame: reg }]);
    p.session.set_device(ALICE);
    p.session.send(
        req,
        &ServerFrame::Registered {
            user: "alice".into(),
            device: DeviceId(1),
        },
        p.now,
    );
    p.pump();
    assert_eq!(
        p.events(),
        vec![ConnEvent::Answer {
            req,
            frame: ServerFrame::Registered {
                user: "alice".into(),
                device: DeviceId(1)
            }
        }]
    );
}

#[test]
fn deliveries_and_drain_are_events_and_acks_reach_the_server() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    p.server_events();
    for seq in 1..=3 {
        p.session.send(0, &ServerFrame::Deliver(deliver(seq)), p.now);
    }
    p.session.send(0, &ServerFrame::QueueDrained, p.now);
    p.pump();
    assert_eq!(
        p.events(),
        vec![
            ConnEvent::Deliver(deliver(1)),
            ConnEvent::Deliver(deliver(2)),
            ConnEvent::Deliver(deliver(3)),
            ConnEvent::QueueDrained
        ]
    );
    p.conn.notify(&ClientFrame::Ack { up_to: 3 }, p.now).unwrap();
    p.pump();
    assert_eq!(
        p.server_events(),
        vec![Event::Frame {
            req: 0,
            frame: ClientFrame::Ack { up_to: 3 }
        }]
    );
}

#[test]
fn server_ping_is_answered_and_client_pings_on_silence() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    let t0 = p.now;
    // The server pings after 30 s of silence: the client answers at once,
    // which resets the server's idle clock.
    p.now = t0 + Duration::from_secs(30);
    p.session.handle_timeout(p.now);
    p.pump();
    assert!(p.events().is_empty());
    assert_eq!(p.session.poll_timeout(), Some(p.now + Duration::from_secs(30)));
    // The client's own ping after 30 s without hearing anything.
    let deadline = p.conn.poll_timeout().unwrap();
    assert_eq!(deadline, p.now + Duration::from_secs(30));
    p.now = deadline;
    p.conn.handle_timeout(p.now);
    p.pump();
    // The answer is a Pong to request 1; it proves the server alive.
    assert_eq!(
        p.events(),
        vec![ConnEvent::Answer {
            req: 1,
            frame: ServerFrame::Pong
        }]
    );
    assert_eq!(p.conn.poll_timeout(), Some(p.now + Duration::from_secs(30)));
}

#[test]
fn a_silent_server_times_out() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    let t0 = p.now;
    p.conn.handle_timeout(t0 + Duration::from_secs(30));
    // The ping goes nowhere.
    assert!(!p.conn.transmit().is_empty());
    assert_eq!(p.conn.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    p.conn.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(p.events(), vec![ConnEvent::Closed(Closed::TimedOut)]);
    assert!(p.conn.is_closed());
    assert_eq!(p.conn.request(&ClientFrame::Ping, p.now), Err(ConnError::NotOpen));
}

#[test]
fn handshake_timeout() {
    let mut p = Pair::new(Identity::Device(ALICE));
    let deadline = p.conn.poll_timeout().unwrap();
    p.conn.handle_timeout(deadline);
    assert_eq!(p.events(), vec![ConnEvent::Closed(Closed::TimedOut)]);
}

#[test]
fn revoked_device_learns_why() {
    let mut p = Pair::new(Identity::Revoked);
    p.pump();
    let events = p.events();
    assert!(
        matches!(
            &events[..],
            [
                ConnEvent::Ready,
                ConnEvent::Closed(Closed::ByServer {
                    code: ErrorCode::REVOKED,
                    ..
                })
            ]
        ),
        "{events:?}"
    );
}

#[test]
fn connected_elsewhere_close() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    p.session
        .close(ErrorCode::CONNECTED_ELSEWHERE, "connected elsewhere", p.now);
    p.pump();
    assert!(matches!(
        &p.events()[..],
        [ConnEvent::Closed(Closed::ByServer {
            code: ErrorCode::CONNECTED_ELSEWHERE,
            ..
        })]
    ));
}

#[test]
fn refusal_is_recognised_even_split() {
    for split in [1, 3, 10] {
        let mut p = Pair::new(Identity::Device(ALICE));
        let mut bytes = PREAMBLE.to_vec();
        bytes[7] = 9; // the server will refuse this version
        p.conn.advance(p.conn.transmit().len());
        let id = p.identity;
        p.session.handle_input(&bytes, p.now, &mut |_| id);
        let refusal = p.session.transmit().to_vec();
        for chunk in refusal.chunks(split) {
            p.conn.handle_input(chunk, p.now);
        }
        assert_eq!(
            p.events(),
            vec![ConnEvent::Closed(Closed::Refused(RefusalNotice {
                reason: Refusal::UnsupportedVersion as u8,
                version: 1,
                retry_after: None
            }))]
        );
    }
}

/// spec §2: a busy refusal carries a retry-after, however it is split.
#[test]
fn busy_refusal_is_recognised_even_split() {
    for split in [1, 5, 11, 12] {
        let mut p = Pair::new(Identity::Device(ALICE));
        p.conn.advance(p.conn.transmit().len());
        let refusal = Refusal::AddressRate.busy_bytes(3);
        for chunk in refusal.chunks(split) {
            p.conn.handle_input(chunk, p.now);
        }
        let events = p.events();
        assert_eq!(
            events,
            vec![ConnEvent::Closed(Closed::Refused(RefusalNotice {
                reason: 4,
                version: 1,
                retry_after: Some(3)
            }))]
        );
        let ConnEvent::Closed(closed) = &events[0] else {
            unreachable!()
        };
        let e = crate::client::Error::Closed(closed.clone());
        assert!(e.is_transient(), "a busy server is worth trying again");
        assert!(!e.to_string().contains("key"), "{e}");
    }
}

#[test]
fn wrong_server_key_fails_the_handshake() {
    let mut p = Pair::new(Identity::Device(ALICE));
    let other = Keypair::generate().unwrap();
    let client_key = Keypair::generate().unwrap();
    p.conn = Conn::new(&client_key, &other.public, ConnConfig::default(), p.now).unwrap();
    p.pump();
    // The server closes silently; the client sees the end of the stream.
    assert!(p.session.is_closed());
    p.conn.handle_eof();
    assert_eq!(p.events(), vec![ConnEvent::Closed(Closed::Handshake)]);
    let _ = &p.server_key;
}

#[test]
fn byte_by_byte_input() {
    let mut p = Pair::new(Identity::Device(ALICE));
    let c2s = p.conn.transmit().to_vec();
    p.conn.advance(c2s.len());
    let id = p.identity;
    p.session.handle_input(&c2s, p.now, &mut |_| id);
    let s2c = p.session.transmit().to_vec();
    p.session.advance(s2c.len());
    for b in &s2c {
        p.conn.handle_input(std::slice::from_ref(b), p.now);
    }
    assert_eq!(p.events(), vec![ConnEvent::Ready]);
    p.pump();
    p.session.send(0, &ServerFrame::Deliver(deliver(7)), p.now);
    p.session.send(0, &ServerFrame::QueueDrained, p.now);
    let s2c = p.session.transmit().to_vec();
    p.session.advance(s2c.len());
    for b in &s2c {
        p.conn.handle_input(std::slice::from_ref(b), p.now);
    }
    assert_eq!(
        p.events(),
        vec![ConnEvent::Deliver(deliver(7)), ConnEvent::QueueDrained]
    );
}

#[test]
fn garbage_after_the_handshake_breaks_the_connection() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    let mut junk = Vec::new();
    wire::write_record(&[0u8; 40], &mut junk);
    p.conn.handle_input(&junk, p.now);
    assert_eq!(p.events(), vec![ConnEvent::Closed(Closed::Broken)]);
}

#[test]
fn close_says_goodbye() {
    let mut p = Pair::ready(Identity::Device(ALICE));
    p.conn.close(p.now);
    assert_eq!(p.events(), vec![ConnEvent::Closed(Closed::Local)]);
    p.pump();
    assert!(p.session.is_closed());
}

#[test]
fn receipts_and_notices_are_events() {
    use crate::wire::{ExpiredNotice, GapNotice, Lost, ReceiptDeliver, ReceiptKind};
    let mut p = Pair::ready(Identity::Device(ALICE));
    p.server_events();
    let bob = DeviceAddr {
        user: "bob".into(),
        device: DeviceId(2),
    };
    let receipt = ReceiptDeliver {
        seq: 4,
        from: bob.clone(),
        to: "alice".into(),
        kind: ReceiptKind::READ,
        ids: vec![MsgId([1; 16])],
        time_ms: 5,
    };
    let gap = GapNotice {
        seq: 5,
        lost: vec![Lost {
            from: bob.clone(),
            count: 2,
            first_ms: 1,
            last_ms: 2,
        }],
    };
    let expired = ExpiredNotice {
        seq: 6,
        device: bob,
        ids: vec![MsgId([2; 16])],
    };
    p.session.send(0, &ServerFrame::Receipt(receipt.clone()), p.now);
    p.session.send(0, &ServerFrame::Gap(gap.clone()), p.now);
    p.session.send(0, &ServerFrame::Expired(expired.clone()), p.now);
    p.pump();
    assert_eq!(
        p.events(),
        vec![
            ConnEvent::Receipt(receipt),
            ConnEvent::Gap(gap),
            ConnEvent::Expired(expired)
        ]
    );
}
