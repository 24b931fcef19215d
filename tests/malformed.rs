//! Bad input hurts only its sender (DESIGN.md, guarantee 6), against the
//! real daemon: a malformed frame gets a typed error on a connection that
//! stays usable, and so does an oversized body; a record that does not
//! authenticate, or a handshake record over its cap, closes that
//! connection; and meanwhile other connections carry messages as before.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::Daemon;
use common::raw::{ClientError, RawClient};
use tidings::wire::{Body, ClientFrame, DeviceId, ErrorCode, MAX_BODY_LEN, MsgId, PREAMBLE, Send, ServerFrame};

const PATIENCE: Duration = Duration::from_secs(10);

fn hello(id: u8) -> ClientFrame {
    ClientFrame::Send(Send {
        id: MsgId([id; 16]),
        to: "bob".into(),
        bodies: vec![Body {
            device: DeviceId(1),
            data: Bytes::from_static(b"hello"),
        }],
        own: vec![],
    })
}

/// The connection was closed (end of stream or reset), not timed out.
fn expect_closed(r: Result<(), ClientError>) {
    match r {
        Err(ClientError::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        other => panic!("expected the connection to close, got {other:?}"),
    }
}

/// The next frame that is not a keepalive or the end of the queue.
fn next(client: &mut RawClient) -> (u32, ServerFrame) {
    loop {
        match client.expect_frame(PATIENCE).expect("a frame") {
            (_, ServerFrame::Ping | ServerFrame::QueueDrained) => continue,
            f => return f,
        }
    }
}

#[test]
fn bad_frames_hurt_only_their_sender() {
    let daemon = Daemon::start();
    let invite = daemon.invite(3);
    let addr = daemon.addr();
    let mut alice = RawClient::register(addr, &invite, "alice").expect("alice").client;
    let mut bob = RawClient::register(addr, &invite, "bob").expect("bob").client;
    let mut mallory = RawClient::register(addr, &invite, "mallory").expect("mallory").client;

    // Request 7, then a frame tag nobody knows: unsupported, and the
    // connection lives on.
    mallory.send_sealed(&[0x07, 0x7f]).unwrap();
    match next(&mut mallory) {
        (7, ServerFrame::Error { code, .. }) => assert_eq!(code, ErrorCode::UNSUPPORTED),
        other => panic!("expected UNSUPPORTED for request 7, got {other:?}"),
    }
    // Request 8, an Ack (tag 10) with trailing garbage: malformed.
    mallory.send_sealed(&[0x08, 0x0a, 0x01, 0xff]).unwrap();
    match next(&mut mallory) {
        (8, ServerFrame::Error { code, .. }) => assert_eq!(code, ErrorCode::MALFORMED),
        other => panic!("expected MALFORMED for request 8, got {other:?}"),
    }
    assert_eq!(
        mallory.request(&ClientFrame::Ping, PATIENCE).unwrap(),
        ServerFrame::Pong
    );

    // Meanwhile alice and bob talk.
    let req = alice.send(&hello(1)).unwrap();
    assert!(matches!(next(&mut alice), (r, ServerFrame::Accepted { .. }) if r == req));
    assert!(matches!(next(&mut bob), (0, ServerFrame::Deliver(d)) if d.id == MsgId([1; 16])));

    // A body over the limit: its error code, and the connection lives on.
    let mut big = hello(3);
    if let ClientFrame::Send(send) = &mut big {
        send.bodies[0].data = Bytes::from(vec![0; MAX_BODY_LEN + 1]);
    }
    let req = mallory.send(&big).unwrap();
    match next(&mut mallory) {
        (r, ServerFrame::Error { code, .. }) if r == req => assert_eq!(code, ErrorCode::BODY_TOO_LARGE),
        other => panic!("expected BODY_TOO_LARGE for request {req}, got {other:?}"),
    }

    // A record that does not authenticate: the stream cannot be trusted
    // any more, and the connection closes without a word.
    mallory.send_raw(&[0x00, 0x20]).unwrap();
    mallory.send_raw(&[0xAA; 0x20]).unwrap();
    expect_closed(mallory.recv(PATIENCE).map(|_| ()));

    // A handshake record over its cap: closed on the header, without
    // waiting for the 65,535 bytes it announces.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(PATIENCE)).unwrap();
    raw.write_all(&PREAMBLE).unwrap();
    raw.write_all(&[0xff, 0xff]).unwrap();
    let mut buf = [0u8; 64];
    match raw.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the server answered {n} bytes"),
        Err(e) => expect_closed(Err(ClientError::Io(e))),
    }

    // Alice and bob are unaffected.
    let req = alice.send(&hello(2)).unwrap();
    assert!(matches!(next(&mut alice), (r, ServerFrame::Accepted { .. }) if r == req));
    assert!(matches!(next(&mut bob), (0, ServerFrame::Deliver(d)) if d.id == MsgId([2; 16])));
}
