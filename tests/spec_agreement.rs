//! Where an outside implementer found the daemon and the spec disagreeing
//! (issue 12), checked against the real daemon: a `Send` followed by
//! `Close` in one write is stored (spec §5.2 `Close`), and a client that
//! reads all along is never dropped however much it pipelines (§9). The
//! revoked key told at its handshake and `RequestLink` at eight devices
//! are in `tests/revoke.rs`.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::Daemon;
use common::raw::RawClient;
use tidings::wire::{self, Body, ClientFrame, DeviceId, MsgId, ServerFrame};

fn send(id: u8) -> ClientFrame {
    ClientFrame::Send(wire::Send {
        id: MsgId([id; 16]),
        to: "bob".into(),
        bodies: vec![Body {
            device: DeviceId(1),
            data: bytes::Bytes::from(vec![id; 40]),
        }],
        own: vec![],
    })
}

/// spec §5.2 `Close`: requests written before the `Close` in the same
/// write complete. Twelve tries, as the report had (3 of 12 were lost).
#[test]
fn a_send_then_close_in_one_write_is_stored() {
    let daemon = Daemon::start();
    let invite = daemon.invite(2);
    let alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    let bob = RawClient::register(daemon.addr(), &invite, "bob").unwrap().client;
    let (alice_key, bob_key) = (alice.key().clone(), bob.key().clone());
    bob.hang_up();
    alice.hang_up();
    for i in 1..=12u8 {
        let mut a = RawClient::connect(daemon.addr(), &invite.server_key, alice_key.clone()).unwrap();
        a.queue(1, &send(i));
        a.queue(0, &ClientFrame::Close);
        a.flush().unwrap();
        // The server closes; nothing answers.
        while let Ok(Some(_)) = a.recv(Duration::from_secs(5)) {}
    }
    let mut b = RawClient::connect(daemon.addr(), &invite.server_key, bob_key).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 12 && Instant::now() < deadline {
        if let Some((_, ServerFrame::Deliver(d))) = b.recv(Duration::from_millis(200)).unwrap() {
            got.push(d.id.0[0]);
            b.send(&ClientFrame::Ack { up_to: d.seq }).unwrap();
        }
    }
    got.sort();
    assert_eq!(got, (1..=12).collect::<Vec<u8>>());
}

/// spec §9: 50,000 `Ping`s in one write from a client that reads all
/// along: every one is answered and the connection stays; the server
/// stopped reading while its answers piled up instead of dropping it.
#[test]
fn a_reading_client_that_pipelines_50000_pings_is_never_dropped() {
    const PINGS: u32 = 50_000;
    let daemon = Daemon::start();
    let invite = daemon.invite(1);
    let mut c = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    for i in 1..=PINGS {
        c.queue(i, &ClientFrame::Ping);
    }
    let bytes = c.take_queued();
    assert!(bytes.len() > 1 << 20, "more than the 1 MiB cap of answers");
    let mut w = c.writer();
    let writer = std::thread::spawn(move || w.write_all(&bytes));
    let mut pongs = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while pongs < PINGS {
        assert!(Instant::now() < deadline, "only {pongs} pongs");
        match c.recv(Duration::from_secs(1)).unwrap() {
            Some((_, ServerFrame::Pong)) => pongs += 1,
            Some((_, ServerFrame::Close { code, text })) => panic!("closed: {code:?} {text}"),
            _ => {}
        }
    }
    writer.join().unwrap().unwrap();
    assert_eq!(
        c.request(&ClientFrame::Ping, Duration::from_secs(5)).unwrap(),
        ServerFrame::Pong
    );
}
