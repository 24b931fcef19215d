//! Refusals in the clear (spec §2, issue 12): a connection the daemon
//! will not take (per-address connections, per-address handshake rate,
//! the server full) gets a 12-byte refusal with its reason and a
//! retry-after, not a silent close that looks like a wrong server key; the
//! client says so in words and tries again.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Daemon;
use common::cli::{stdout, tidings};
use tidings::wire::{BUSY_REFUSAL_LEN, PREAMBLE, Refusal, RefusalNotice};

/// Connects, sends the preamble, and reads what comes back until the
/// server closes: a refusal, or nothing (the handshake waits for us).
fn knock(daemon: &Daemon) -> Option<RefusalNotice> {
    let mut s = TcpStream::connect(daemon.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let _ = s.write_all(&PREAMBLE);
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    if got.is_empty() {
        return None;
    }
    assert_eq!(got.len(), BUSY_REFUSAL_LEN, "{got:02x?}");
    Some(RefusalNotice::parse(&got).expect("a refusal"))
}

#[test]
fn a_burst_over_the_handshake_rate_is_refused_with_a_retry_after() {
    let daemon = Daemon::start_with_config("[limits]\nhandshakes_per_second_per_ip = 3\n");
    let mut open = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        let mut s = TcpStream::connect(daemon.addr()).unwrap();
        s.write_all(&PREAMBLE).unwrap();
        open.push(s);
    }
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf)
            && n > 0
        {
            refused = RefusalNotice::parse(&buf[..n]);
            break;
        }
    }
    let n = refused.expect("a connection over the rate is refused in the clear");
    assert_eq!(n.known(), Some(Refusal::AddressRate));
    assert_eq!(n.retry_after, Some(1));
}

#[test]
fn connections_over_the_per_address_cap_and_the_server_cap_are_refused() {
    let daemon = Daemon::start_with_config("[limits]\nconnections_per_ip = 2\n");
    let a = TcpStream::connect(daemon.addr()).unwrap();
    let b = TcpStream::connect(daemon.addr()).unwrap();
    let n = knock(&daemon).expect("the third is refused");
    assert_eq!(n.known(), Some(Refusal::AddressConnections));
    assert_eq!(n.retry_after, Some(5));
    drop((a, b));

    let daemon = Daemon::start_with_config("[limits]\nmax_connections = 1\n");
    let _a = TcpStream::connect(daemon.addr()).unwrap();
    let n = knock(&daemon).expect("the second is refused");
    assert_eq!(n.known(), Some(Refusal::ServerFull));
    assert_eq!(n.retry_after, Some(10));
}

/// The script: 80 sends in a quick loop against the default
/// limits all succeed.
#[test]
fn eighty_sends_in_a_quick_loop_all_succeed() {
    let daemon = Daemon::start();
    let alice = daemon.user("alice");
    let _bob = daemon.user("bob");
    for i in 0..80 {
        let out = tidings(&alice, &["send", "bob", &format!("n{i}")]);
        stdout(&out);
    }
}

/// With a handshake rate of 1 a second, sends in a quick loop are refused
/// as busy; the client says so in words (not "wrong server key") and
/// waits as told, and every send succeeds.
#[test]
fn the_client_waits_out_a_busy_refusal_and_says_why() {
    let daemon = Daemon::start_with_config("[limits]\nhandshakes_per_second_per_ip = 1\n");
    let alice = daemon.user("alice");
    let _bob = daemon.user("bob");
    let mut told = false;
    for i in 0..4 {
        let out = tidings(&alice, &["send", "bob", &format!("n{i}")]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("server's key"), "{err}");
        told |= err.contains("too many new connections came from this address");
        stdout(&out);
    }
    assert!(told, "no send was refused as busy");
}
