//! Operator commands (issue 3): they work while the daemon runs, through
//! its admin socket, and when it does not, on the data directory itself;
//! `revoke` disconnects a device at once and its key is refused after.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Daemon;
use common::raw::RawClient;
use tidings::client::Code;
use tidings::wire::{ErrorCode, ServerFrame};

fn tidingsd(args: &[&str], data_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidingsd"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

#[test]
fn revoke_through_the_admin_socket_cuts_the_device_off_at_once() {
    let daemon = Daemon::start();
    let invite = daemon.invite(2);
    let mut bob = RawClient::register(daemon.addr(), &invite, "bob").unwrap().client;
    let _alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap();
    assert_eq!(daemon.operator(&["users"]), vec!["alice\t1 device", "bob\t1 device"]);
    let devices = daemon.operator(&["devices", "bob"]);
    assert!(
        devices[0].starts_with("1\t") && devices[0].contains("online"),
        "{devices:?}"
    );

    let out = daemon.operator(&["revoke", "bob", "--device", "1"]);
    assert_eq!(out, vec!["revoked bob device 1"]);
    // The open connection is told and closed.
    let mut closed = None;
    for _ in 0..100 {
        if let Some((_, ServerFrame::Close { code, .. })) = bob.recv(Duration::from_millis(100)).unwrap() {
            closed = Some(code);
            break;
        }
    }
    assert_eq!(closed, Some(ErrorCode::REVOKED));
    // The key is refused from then on.
    let mut again = RawClient::connect(daemon.addr(), &invite.server_key, bob.key().clone()).unwrap();
    assert!(matches!(
        again.expect_frame(Duration::from_secs(5)).unwrap(),
        (
            0,
            ServerFrame::Close {
                code: ErrorCode::REVOKED,
                ..
            }
        )
    ));
    assert_eq!(daemon.operator(&["devices", "bob"]), Vec::<String>::new());
}

#[test]
fn commands_work_without_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Issue 12: no command makes a data directory where none is.
    let out = tidingsd(&["invite", "--public-addr", "chat.example.org:7420"], &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such data directory"));
    assert!(!data.exists());
    // A data directory whose daemon is stopped and never recorded an
    // address (as a daemon's first start makes it, less the address).
    drop(tidings::store::Store::open(&data, &Default::default()).unwrap());
    let out = tidingsd(&["invite"], &data);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--public-addr"));
    let out = tidingsd(
        &[
            "invite",
            "--uses",
            "3",
            "--expires",
            "7d",
            "--public-addr",
            "chat.example.org:7420",
        ],
        &data,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = Code::parse(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(code.addr, "chat.example.org:7420");
    // The flag makes one code; only a daemon run records an address.
    assert!(!tidingsd(&["invite"], &data).status.success());
    let users = tidingsd(&["users"], &data);
    assert!(users.status.success());
    assert!(users.stdout.is_empty());
    let unknown = tidingsd(&["devices", "nobody"], &data);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no user nobody"));
}

/// Issue 6: one address cannot take every connection. Past
/// `limits.connections_per_ip`, a new connection is closed before its
/// handshake; a freed slot can be used again.
#[test]
fn per_address_connection_cap() {
    let daemon = Daemon::start_with_config("[limits]\nconnections_per_ip = 3\nhandshakes_per_second_per_ip = 100\n");
    let invite = daemon.invite(1);
    let key = || tidings::noise::Keypair::generate().unwrap();
    let mut open: Vec<RawClient> = (0..3)
        .map(|_| RawClient::connect(daemon.addr(), &invite.server_key, key()).unwrap())
        .collect();
    for c in &mut open {
        assert_eq!(
            c.request(&tidings::wire::ClientFrame::Ping, Duration::from_secs(5))
                .unwrap(),
            ServerFrame::Pong
        );
    }
    assert!(
        RawClient::connect(daemon.addr(), &invite.server_key, key()).is_err(),
        "a fourth is refused"
    );
    // The open ones carry on.
    assert_eq!(
        open[0]
            .request(&tidings::wire::ClientFrame::Ping, Duration::from_secs(5))
            .unwrap(),
        ServerFrame::Pong
    );
    open.pop().unwrap().hang_up();
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = RawClient::connect(daemon.addr(), &invite.server_key, key()) {
            again = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut again = again.expect("a freed slot is usable again");
    assert_eq!(
        again
            .request(&tidings::wire::ClientFrame::Ping, Duration::from_secs(5))
            .unwrap(),
        ServerFrame::Pong
    );
}
