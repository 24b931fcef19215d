//! Session tests: a client made of the same `noise` and `wire` pieces,
//! driven in memory with a virtual clock. No sockets.

use std::sync::Arc;

use super::*;
use crate::ids::UserId;
use crate::noise::{self, ExpectServerHello};
use crate::wire::{DeviceId, MsgId, PREAMBLE, Refusal, Token};

const ALICE: DeviceKey = DeviceKey {
    user: UserId(1),
    device: DeviceId(1),
};

struct Client {
    key: Keypair,
    transport: Option<Transport>,
    decoder: RecordDecoder,
    hello: Option<ExpectServerHello>,
    plain: Vec<u8>,
    scratch: Vec<u8>,
}

fn records(dec: &mut RecordDecoder, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    dec.feed(bytes, MAX_RECORD_LEN, |r: &[u8]| {
        out.push(r.to_vec());
        Ok::<_, RecordError>(Flow::Continue(MAX_RECORD_LEN))
    })
    .unwrap();
    out
}

impl Client {
    fn new() -> Client {
        Client {
            key: Keypair::generate().unwrap(),
            transport: None,
            decoder: RecordDecoder::new(),
            hello: None,
            plain: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Preamble and first handshake message.
    fn start(&mut self, server: &PublicKey) -> Vec<u8> {
        let mut out = Vec::new();
        self.hello = Some(noise::client_start(&self.key, server, &mut out).unwrap());
        out
    }

    /// Reads the server's hello, returns the third message.
    fn finish(&mut self, from_server: &[u8], now: Instant) -> Vec<u8> {
        let recs = records(&mut self.decoder, from_server);
        assert_eq!(recs.len(), 1);
        let mut out = Vec::new();
        self.transport = Some(self.hello.take().unwrap().handle(&recs[0], now, &mut out).unwrap());
        out
    }

    fn frame(&mut self, req: u32, frame: &ClientFrame, now: Instant) -> Vec<u8> {
        let mut plain = Vec::new();
        wire::encode_client(req, frame, &mut plain);
        self.raw(&plain, now)
    }

    fn raw(&mut self, plain: &[u8], now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        self.transport.as_mut().unwrap().seal(plain, now, &mut out).unwrap();
        out
    }

    fn read(&mut self, from_server: &[u8]) -> Vec<(u32, ServerFrame)> {
        let mut frames = Vec::new();
        for r in records(&mut self.decoder, from_server) {
            match self.transport.as_mut().unwrap().open(&r, &mut self.plain).unwrap() {
                Opened::Frame => frames.push(wire::decode_server(&self.plain, &mut self.scratch).unwrap()),
                Opened::Rekeyed => {}
            }
        }
        frames
    }
}

struct Pair {
    server_key: Arc<Keypair>,
    session: Session,
    client: Client,
    now: Instant,
    identity: Identity,
}

impl Pair {
    fn new(identity: Identity) -> Pair {
        let now = Instant::now();
        let server_key = Arc::new(Keypair::generate().unwrap());
        let session = Session::new(server_key.clone(), SessionConfig::default(), now);
        Pair {
            server_key,
            session,
            client: Client::new(),
            now,
            identity,
        }
    }

    fn input(&mut self, bytes: &[u8]) {
        let id = self.identity;
        self.session.handle_input(bytes, self.now, &mut |_| id);
    }

    /// Everything the server wrote since last time.
    fn output(&mut self) -> Vec<u8> {
        let out = self.session.transmit().to_vec();
        self.session.advance(out.len());
        out
    }

    fn handshake(&mut self) {
        let server_pub = self.server_key.public;
        let m1 = self.client.start(&server_pub);
        self.input(&m1);
        let m2 = self.output();
        let m3 = self.client.finish(&m2, self.now);
        self.input(&m3);
    }

    fn request(&mut self, req: u32, frame: &ClientFrame) -> Vec<(u32, ServerFrame)> {
        let bytes = self.client.frame(req, frame, self.now);
        self.input(&bytes);
        let out = self.output();
        self.client.read(&out)
    }
}

fn send_frame() -> ClientFrame {
    ClientFrame::Send(wire::Send {
        id: MsgId([1; 16]),
        to: "bob".into(),
        bodies: vec![],
        own: vec![],
    })
}

#[test]
fn handshake_then_ping_while_unregistered() {
    let mut p = Pair::new(Identity::Unregistered);
    p.handshake();
    assert_eq!(p.session.phase(), Phase::Unregistered);
    assert_eq!(p.session.remote_static(), Some(&p.client.key.public));
    assert_eq!(p.request(7, &ClientFrame::Ping), vec![(7, ServerFrame::Pong)]);
    assert!(p.session.poll_event().is_none());
}

#[test]
fn unregistered_may_only_register_link_ping_close() {
    let mut p = Pair::new(Identity::Unregistered);
    p.handshake();
    for frame in [
        send_frame(),
        ClientFrame::Ack { up_to: 1 },
        ClientFrame::RequestLink,
        ClientFrame::MyDevices,
        ClientFrame::ListDevices { user: "bob".into() },
        ClientFrame::RevokeDevice { device: DeviceId(1) },
    ] {
        let got = p.request(3, &frame);
        assert!(
            matches!(
                &got[..],
                [(
                    3,
                    ServerFrame::Error {
                        code: ErrorCode::NOT_ALLOWED,
                        ..
                    }
                )]
            ),
            "{frame:?}: {got:?}"
        );
    }
    assert!(p.session.poll_event().is_none());
    let reg = ClientFrame::Register {
        invite: Token {
            id: [1; 8],
            secret: [2; 16],
        },
        name: "alice".into(),
    };
    assert!(p.request(4, &reg).is_empty());
    assert_eq!(p.session.poll_event(), Some(Event::Frame { req: 4, frame: reg }));
    let link = ClientFrame::RedeemLink {
        code: Token {
            id: [1; 8],
            secret: [2; 16],
        },
    };
    assert!(p.request(5, &link).is_empty());
    assert_eq!(p.session.poll_event(), Some(Event::Frame { req: 5, frame: link }));
    // The hub registers it: now it is a device.
    p.session.set_device(ALICE);
    assert_eq!(p.session.poll_event(), Some(Event::Authenticated(ALICE)));
    assert!(p.request(6, &send_frame()).is_empty());
    assert_eq!(
        p.session.poll_event(),
        Some(Event::Frame {
            req: 6,
            frame: send_frame()
        })
    );
    assert!(!p.session.is_closed());
}

#[test]
fn known_device_is_authenticated_at_handshake() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    assert_eq!(p.session.poll_event(), Some(Event::Authenticated(ALICE)));
    assert_eq!(p.session.device(), Some(ALICE));
    let reg = ClientFrame::Register {
        invite: Token {
            id: [1; 8],
            secret: [2; 16],
        },
        name: "alice".into(),
    };
    let got = p.request(2, &reg);
    assert!(matches!(
        &got[..],
        [(
            2,
            ServerFrame::Error {
                code: ErrorCode::NOT_ALLOWED,
                ..
            }
        )]
    ));
}

#[test]
fn revoked_device_is_told_and_closed() {
    let mut p = Pair::new(Identity::Revoked);
    p.handshake();
    let out = p.output();
    let got = p.client.read(&out);
    assert!(matches!(
        &got[..],
        [(
            0,
            ServerFrame::Close {
                code: ErrorCode::REVOKED,
                ..
            }
        )]
    ));
    assert!(p.session.is_closed());
    assert!(p.session.poll_event().is_none());
}

#[test]
fn bad_preamble_gets_refusal_and_close() {
    let mut p = Pair::new(Identity::Unregistered);
    p.input(b"GET / HTTP/1.1\r\n");
    let out = p.output();
    assert_eq!(Refusal::parse(&out), Some((Refusal::BadMagic, 1)));
    assert!(p.session.is_closed());

    let mut p = Pair::new(Identity::Unregistered);
    let mut v9 = PREAMBLE;
    v9[7] = 9;
    for b in v9 {
        p.input(&[b]);
    }
    assert_eq!(Refusal::parse(&p.output()), Some((Refusal::UnsupportedVersion, 1)));
    assert!(p.session.is_closed());
}

#[test]
fn garbage_handshake_closes_silently() {
    let mut p = Pair::new(Identity::Unregistered);
    let mut bytes = PREAMBLE.to_vec();
    wire::write_record(&[0x55; 48], &mut bytes);
    p.input(&bytes);
    assert!(p.output().is_empty());
    assert!(p.session.is_closed());
}

#[test]
fn oversized_handshake_record_closes_before_buffering() {
    let mut p = Pair::new(Identity::Unregistered);
    let mut bytes = PREAMBLE.to_vec();
    bytes.extend_from_slice(&[0xff, 0xff]);
    p.input(&bytes);
    assert!(p.output().is_empty());
    assert!(p.session.is_closed());
    assert_eq!(p.session.buffer_capacity(), 0);
}

#[test]
fn a_frame_before_the_handshake_closes_silently() {
    // A client that skips the handshake and sends an (unencrypted) frame.
    let mut p = Pair::new(Identity::Unregistered);
    let mut bytes = PREAMBLE.to_vec();
    let mut frame = Vec::new();
    wire::encode_client(1, &ClientFrame::Ping, &mut frame);
    wire::write_record(&frame, &mut bytes);
    p.input(&bytes);
    assert!(p.output().is_empty());
    assert!(p.session.is_closed());
}

#[test]
fn malformed_and_unknown_frames_get_errors_and_the_connection_stays() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let _ = p.session.poll_event();
    // Unknown tag 99 with request id 42.
    let bytes = p.client.raw(&[42, 99], p.now);
    p.input(&bytes);
    let out = p.output();
    assert!(matches!(
        &p.client.read(&out)[..],
        [(
            42,
            ServerFrame::Error {
                code: ErrorCode::UNSUPPORTED,
                ..
            }
        )]
    ));
    // Truncated Send.
    let bytes = p.client.raw(&[43, 9, 1, 2], p.now);
    p.input(&bytes);
    let out = p.output();
    assert!(matches!(
        &p.client.read(&out)[..],
        [(
            43,
            ServerFrame::Error {
                code: ErrorCode::MALFORMED,
                ..
            }
        )]
    ));
    // Overlong varint: Ack { up_to: 1 } as 0x81 0x00.
    let bytes = p.client.raw(&[44, 10, 0x81, 0x00], p.now);
    p.input(&bytes);
    let out = p.output();
    assert!(matches!(
        &p.client.read(&out)[..],
        [(
            44,
            ServerFrame::Error {
                code: ErrorCode::MALFORMED,
                ..
            }
        )]
    ));
    // Still usable.
    assert_eq!(p.request(45, &ClientFrame::Ping), vec![(45, ServerFrame::Pong)]);
    assert!(p.session.poll_event().is_none());
}

#[test]
fn a_tampered_record_closes_silently() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let mut bytes = p.client.frame(1, &ClientFrame::Ping, p.now);
    bytes[4] ^= 0x80;
    p.input(&bytes);
    assert!(p.output().is_empty());
    assert!(p.session.is_closed());
}

#[test]
fn input_split_into_single_bytes() {
    let mut p = Pair::new(Identity::Device(ALICE));
    let server_pub = p.server_key.public;
    let m1 = p.client.start(&server_pub);
    for b in &m1 {
        p.input(std::slice::from_ref(b));
    }
    let m2 = p.output();
    let mut m3 = p.client.finish(&m2, p.now);
    m3.extend(p.client.frame(9, &ClientFrame::Ping, p.now));
    m3.extend(p.client.frame(10, &ClientFrame::Ack { up_to: 3 }, p.now));
    for b in &m3 {
        p.input(std::slice::from_ref(b));
    }
    let out = p.output();
    assert_eq!(p.client.read(&out), vec![(9, ServerFrame::Pong)]);
    assert_eq!(p.session.poll_event(), Some(Event::Authenticated(ALICE)));
    assert_eq!(
        p.session.poll_event(),
        Some(Event::Frame {
            req: 10,
            frame: ClientFrame::Ack { up_to: 3 }
        })
    );
}

#[test]
fn handshake_timeout_closes_silently() {
    let mut p = Pair::new(Identity::Unregistered);
    p.input(&PREAMBLE[..3]);
    let deadline = p.session.poll_timeout().unwrap();
    assert_eq!(deadline, p.now + Duration::from_secs(10));
    p.session.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!p.session.is_closed());
    p.session.handle_timeout(deadline);
    assert!(p.session.is_closed());
    assert!(p.output().is_empty());
}

#[test]
fn idle_connection_is_pinged_then_closed() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let t0 = p.now;
    assert_eq!(p.session.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    p.session.handle_timeout(t0 + Duration::from_secs(30));
    let out = p.output();
    assert_eq!(p.client.read(&out), vec![(0, ServerFrame::Ping)]);
    // A pong resets the clock.
    p.now = t0 + Duration::from_secs(40);
    assert!(p.request(0, &ClientFrame::Pong).is_empty());
    assert_eq!(p.session.poll_timeout(), Some(p.now + Duration::from_secs(30)));
    // Silence: ping, then close at 90 s.
    let t1 = p.now;
    p.session.handle_timeout(t1 + Duration::from_secs(30));
    p.session.handle_timeout(t1 + Duration::from_secs(90));
    let out = p.output();
    let got = p.client.read(&out);
    assert!(matches!(
        &got[..],
        [
            (0, ServerFrame::Ping),
            (
                0,
                ServerFrame::Close {
                    code: ErrorCode::IDLE_TIMEOUT,
                    ..
                }
            )
        ]
    ));
    assert!(p.session.is_closed());
}

#[test]
fn client_close_ends_the_session() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    assert!(p.request(3, &ClientFrame::Close).is_empty());
    assert!(p.session.is_closed());
}

/// spec §9: past the cap the driver stops reading the input; a peer whose
/// output still grows past the slack gets `Close SLOW_CONSUMER` (queued
/// behind what it did not read) and is dropped after the linger.
#[test]
fn peer_that_does_not_read_gets_close_then_is_dropped() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let big = ServerFrame::Error {
        code: ErrorCode::INTERNAL,
        text: "x".repeat(60_000),
    };
    let mut sent = 0;
    while p.session.send(0, &big, p.now) {
        sent += 1;
        assert!(sent < 100);
        if sent == 18 {
            assert!(!p.session.wants_input(), "input waits past the 1 MiB cap");
        }
    }
    assert!(sent >= 34, "{sent}");
    assert_eq!(p.session.phase(), Phase::Closing);
    assert!(!p.session.is_closed(), "the Close waits to be written");
    let out = p.output();
    let frames = p.client.read(&out);
    assert!(matches!(
        frames.last(),
        Some((
            0,
            ServerFrame::Close {
                code: ErrorCode::SLOW_CONSUMER,
                ..
            }
        ))
    ));
    assert!(p.session.is_closed());
}

/// spec §9: a client that reads is never dropped: its input waits while
/// the output is over the cap, and is read again once it drained.
#[test]
fn output_over_the_cap_pauses_input_only() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let big = ServerFrame::Error {
        code: ErrorCode::INTERNAL,
        text: "x".repeat(60_000),
    };
    while p.session.wants_input() {
        assert!(p.session.send(0, &big, p.now));
    }
    assert_eq!(p.session.phase(), Phase::Authenticated);
    let out = p.output();
    assert_eq!(p.client.read(&out).len(), 18);
    assert!(p.session.wants_input());
    assert_eq!(p.request(9, &ClientFrame::Ping), vec![(9, ServerFrame::Pong)]);
}

/// spec §9: a peer whose input waited (output over the cap) and that read
/// nothing until the idle timeout is told it does not read.
#[test]
fn silence_with_the_output_over_the_cap_is_a_slow_consumer() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let big = ServerFrame::Error {
        code: ErrorCode::INTERNAL,
        text: "x".repeat(60_000),
    };
    while p.session.wants_input() {
        assert!(p.session.send(0, &big, p.now));
    }
    p.now += SessionConfig::default().idle_timeout;
    p.session.handle_timeout(p.now);
    let out = p.output();
    assert!(matches!(
        p.client.read(&out).last(),
        Some((
            0,
            ServerFrame::Close {
                code: ErrorCode::SLOW_CONSUMER,
                ..
            }
        ))
    ));
}

/// spec §5.2 `Close`: a request in the same read as the `Close` behind it
/// still reaches the hub as the device that sent it.
#[test]
fn a_request_before_close_in_one_read_is_still_the_devices() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    assert_eq!(p.session.poll_event(), Some(Event::Authenticated(ALICE)));
    let mut bytes = p.client.frame(4, &send_frame(), p.now);
    bytes.extend(p.client.frame(0, &ClientFrame::Close, p.now));
    p.input(&bytes);
    assert_eq!(
        p.session.poll_event(),
        Some(Event::Frame {
            req: 4,
            frame: send_frame()
        })
    );
    assert_eq!(p.session.device(), Some(ALICE));
    assert_eq!(p.session.remote_static(), Some(&p.client.key.public));
    assert_eq!(p.session.room(), 0, "nothing more is delivered");
    assert!(p.session.is_closed());
}

#[test]
fn client_rekey_marker_is_followed() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    // Sealing an hour later makes the client send a marker first.
    let later = p.now + noise::REKEY_AFTER;
    let bytes = p.client.frame(5, &ClientFrame::Ping, later);
    p.now = later;
    p.input(&bytes);
    let out = p.output();
    // The server also rekeys its own direction an hour in.
    assert_eq!(p.client.read(&out), vec![(5, ServerFrame::Pong)]);
}

#[test]
fn quiet_sessions_hold_no_buffers() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    // The handshake's output was written; the Authenticated event is still
    // queued for the hub.
    assert!(p.session.buffer_capacity() > 0);
    assert_eq!(p.session.poll_event(), Some(Event::Authenticated(ALICE)));
    assert_eq!(p.session.poll_event(), None);
    assert_eq!(p.session.buffer_capacity(), 0);
    assert_eq!(p.request(1, &ClientFrame::Ping).len(), 1);
    assert_eq!(p.session.buffer_capacity(), 0);
    // A record split across reads is buffered until whole, then freed.
    let bytes = p.client.frame(2, &send_frame(), p.now);
    p.input(&bytes[..bytes.len() / 2]);
    assert!(p.session.buffer_capacity() > 0);
    p.input(&bytes[bytes.len() / 2..]);
    assert!(matches!(p.session.poll_event(), Some(Event::Frame { req: 2, .. })));
    assert_eq!(p.session.poll_event(), None);
    assert_eq!(p.session.buffer_capacity(), 0);
    // Output is held until written, then freed, however large it was.
    let big = ServerFrame::Error {
        code: ErrorCode::INTERNAL,
        text: "x".repeat(50_000),
    };
    p.session.send(0, &big, p.now);
    assert!(p.session.buffer_capacity() > 50_000);
    let out = p.session.transmit().len();
    p.session.advance(out - 1);
    assert!(p.session.buffer_capacity() > 50_000);
    p.session.advance(1);
    assert_eq!(p.session.buffer_capacity(), 0);
}

#[test]
fn trickled_bytes_do_not_keep_a_connection_alive() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let t0 = p.now;
    // A record that never completes: one byte every 20 s.
    let bytes = p.client.frame(1, &ClientFrame::Ping, p.now);
    for (i, b) in bytes[..bytes.len() - 1].iter().enumerate() {
        p.now = t0 + Duration::from_secs(20 * (i as u64 + 1));
        p.input(std::slice::from_ref(b));
        p.session.handle_timeout(p.now);
        if p.session.is_closed() {
            break;
        }
    }
    assert!(p.session.is_closed(), "closed by the idle timeout");
}

#[test]
fn closing_again_does_not_extend_the_linger() {
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let t0 = p.now;
    p.session.close(ErrorCode::SHUTTING_DOWN, "bye", t0);
    // The peer reads nothing; the output stays pending.
    assert!(!p.session.is_closed());
    p.session
        .close(ErrorCode::SHUTTING_DOWN, "bye", t0 + Duration::from_secs(4));
    p.session.handle_timeout(t0 + Duration::from_secs(5));
    assert!(p.session.is_closed());
}

/// Vector `server-03-error-unsupported` is what the session answers to
/// vector `invalid-client-unknown-tag`, byte for byte (spec §5.1, §5.3).
#[test]
fn the_unsupported_vector_is_the_sessions_answer() {
    let vector = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("protocol-spec/vectors")
            .join(name);
        let text = std::fs::read_to_string(path).unwrap();
        let hex: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
            .collect();
        hex::decode(hex).unwrap()
    };
    let mut p = Pair::new(Identity::Device(ALICE));
    p.handshake();
    let _ = p.session.poll_event();
    let bytes = p.client.raw(&vector("invalid-client-unknown-tag.hex"), p.now);
    p.input(&bytes);
    let out = p.output();
    let records = records(&mut p.client.decoder, &out);
    assert_eq!(records.len(), 1);
    p.client
        .transport
        .as_mut()
        .unwrap()
        .open(&records[0], &mut p.client.plain)
        .unwrap();
    assert_eq!(p.client.plain, vector("server-03-error-unsupported.hex"));
}
