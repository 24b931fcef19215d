//! Revocation that holds (issue 14) and revoked devices told (issue 12),
//! against the real daemon with two event loops: a link code dies with the
//! device that asked for it, whichever of the three ways it is revoked;
//! link codes are bounded per user and refused at the device limit; a
//! revoked key's handshake is answered `Close REVOKED`, and the `tidings`
//! command line says so and stops instead of reconnecting; expired codes
//! and invites are swept.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{tidings, tidings_cmd};
use common::raw::RawClient;
use common::{Daemon, WAIT};
use tidings::code::Code;
use tidings::noise::Keypair;
use tidings::store::{MAX_LINK_CODES, Store};
use tidings::wire::{ClientFrame, DeviceId, ErrorCode, MAX_DEVICES_PER_USER, ServerFrame, Token};

const T: Duration = Duration::from_secs(10);

fn daemon() -> Daemon {
    Daemon::start_with(&["--workers", "2"])
}

/// A link code from `c`, which must get one.
fn request_link(c: &mut RawClient) -> Token {
    match c.request(&ClientFrame::RequestLink, T).unwrap() {
        ServerFrame::LinkCode { code, .. } => code,
        other => panic!("expected a link code, got {other:?}"),
    }
}

/// What the server answers a new key's `RedeemLink` with `code`.
fn redeem(d: &Daemon, code: &Token) -> (RawClient, ServerFrame) {
    let mut c = RawClient::connect(d.addr(), &d.server_key(), Keypair::generate().unwrap()).unwrap();
    let answer = c.request(&ClientFrame::RedeemLink { code: code.clone() }, T).unwrap();
    (c, answer)
}

/// A new device of `existing`'s account, connected.
fn link(d: &Daemon, existing: &mut RawClient) -> RawClient {
    let code = request_link(existing);
    match redeem(d, &code) {
        (c, ServerFrame::Registered { .. }) => c,
        (_, other) => panic!("expected Registered, got {other:?}"),
    }
}

fn is_error(frame: &ServerFrame, want: ErrorCode) -> bool {
    matches!(frame, ServerFrame::Error { code, .. } if *code == want)
}

/// Waits for the `Close` frame the server ends `c` with; its code.
fn close_code(c: &mut RawClient) -> Option<ErrorCode> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match c.recv(Duration::from_millis(200)) {
            Ok(Some((_, ServerFrame::Close { code, .. }))) => return Some(code),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[derive(Debug, Clone, Copy)]
enum Path3 {
    /// The device revokes itself.
    Itself,
    /// Another device of the account revokes it.
    OtherDevice,
    /// `tidingsd revoke USER --device N`.
    Operator,
}

/// Issue 14, point 1: after a revoke, by each of the three paths, no code
/// the revoked device asked for redeems; a code the remaining device asked
/// for still does.
#[test]
fn no_code_a_revoked_device_asked_for_redeems() {
    for path in [Path3::Itself, Path3::OtherDevice, Path3::Operator] {
        let d = daemon();
        let invite = d.invite(1);
        let mut alice = RawClient::register(d.addr(), &invite, "alice").unwrap().client;
        let mut phone = link(&d, &mut alice);
        let stolen: Vec<Token> = (0..MAX_LINK_CODES - 1).map(|_| request_link(&mut phone)).collect();
        let honest = request_link(&mut alice);
        match path {
            Path3::Itself => {
                let answer = phone
                    .request(&ClientFrame::RevokeDevice { device: DeviceId(2) }, T)
                    .unwrap();
                assert_eq!(answer, ServerFrame::Done, "{path:?}");
            }
            Path3::OtherDevice => {
                let answer = alice
                    .request(&ClientFrame::RevokeDevice { device: DeviceId(2) }, T)
                    .unwrap();
                assert_eq!(answer, ServerFrame::Done, "{path:?}");
            }
            Path3::Operator => {
                assert_eq!(
                    d.operator(&["revoke", "alice", "--device", "2"]),
                    ["revoked alice device 2"]
                );
            }
        }
        assert_eq!(close_code(&mut phone), Some(ErrorCode::REVOKED), "{path:?}");
        for code in &stolen {
            let (_, answer) = redeem(&d, code);
            assert!(is_error(&answer, ErrorCode::INVALID_LINK_CODE), "{path:?}: {answer:?}");
        }
        let (_, answer) = redeem(&d, &honest);
        assert!(
            matches!(
                answer,
                ServerFrame::Registered {
                    device: DeviceId(3),
                    ..
                }
            ),
            "{path:?}: {answer:?}"
        );
    }
}

/// At most `MAX_LINK_CODES` outstanding per user, whichever device asks;
/// one more is `RATE_LIMITED`, and a used code makes room.
#[test]
fn outstanding_link_codes_are_capped_per_user() {
    let d = daemon();
    let invite = d.invite(1);
    let mut alice = RawClient::register(d.addr(), &invite, "alice").unwrap().client;
    let mut phone = link(&d, &mut alice);
    let mut codes = Vec::new();
    for i in 0..MAX_LINK_CODES {
        codes.push(request_link(if i % 2 == 0 { &mut alice } else { &mut phone }));
    }
    for c in [&mut alice, &mut phone] {
        let answer = c.request(&ClientFrame::RequestLink, T).unwrap();
        assert!(is_error(&answer, ErrorCode::RATE_LIMITED), "{answer:?}");
    }
    let (_, answer) = redeem(&d, &codes[0]);
    assert!(matches!(answer, ServerFrame::Registered { .. }), "{answer:?}");
    request_link(&mut phone);
}

/// Issue 12, spec point 3: `RequestLink` with the most devices is refused
/// `DEVICE_LIMIT`; after a revoke there is room again.
#[test]
fn request_link_at_the_device_limit_is_refused() {
    let d = daemon();
    let invite = d.invite(1);
    let mut alice = RawClient::register(d.addr(), &invite, "alice").unwrap().client;
    let mut others: Vec<RawClient> = (1..MAX_DEVICES_PER_USER).map(|_| link(&d, &mut alice)).collect();
    let answer = alice.request(&ClientFrame::RequestLink, T).unwrap();
    assert!(is_error(&answer, ErrorCode::DEVICE_LIMIT), "{answer:?}");
    let answer = others[0].request(&ClientFrame::RequestLink, T).unwrap();
    assert!(is_error(&answer, ErrorCode::DEVICE_LIMIT), "{answer:?}");
    let answer = alice
        .request(&ClientFrame::RevokeDevice { device: DeviceId(8) }, T)
        .unwrap();
    assert_eq!(answer, ServerFrame::Done);
    request_link(&mut alice);
}

/// Issue 12, spec point 2: a revoked key's handshake is answered with
/// `Close REVOKED`, also when the client pipelines a request right behind
/// its last handshake message, and the request is not answered.
#[test]
fn a_revoked_key_is_told_at_the_handshake() {
    let d = daemon();
    let invite = d.invite(1);
    let mut alice = RawClient::register(d.addr(), &invite, "alice").unwrap().client;
    let phone = link(&d, &mut alice);
    let key = phone.key().clone();
    phone.hang_up();
    let answer = alice
        .request(&ClientFrame::RevokeDevice { device: DeviceId(2) }, T)
        .unwrap();
    assert_eq!(answer, ServerFrame::Done);
    for pipelined in [false, true] {
        let mut again = RawClient::connect(d.addr(), &d.server_key(), key.clone()).unwrap();
        if pipelined {
            again.send(&ClientFrame::MyDevices).unwrap();
        }
        let first = again.expect_frame(T).unwrap();
        assert!(
            matches!(
                first,
                (
                    0,
                    ServerFrame::Close {
                        code: ErrorCode::REVOKED,
                        ..
                    }
                )
            ),
            "{first:?}"
        );
        assert!(again.recv(T).is_err(), "nothing after the close");
    }
}

/// Runs `tidings ARGS` on `profile` and waits for it to exit by itself
/// (killed, and the test failed, if it keeps going: it would be
/// reconnecting).
fn run_to_exit(profile: &Path, args: &[&str]) -> (bool, String) {
    let mut child = tidings_cmd(profile)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tidings {args:?} did not stop on a revoked device: it keeps reconnecting");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The command line on a revoked device: `listen`, `sync` and `send` say
/// in words that the device was revoked and exit non-zero, without
/// retrying.
#[test]
fn the_cli_on_a_revoked_device_says_so_and_stops() {
    let d = daemon();
    let alice = d.user("alice");
    let phone = d.link(&alice, "phone");
    assert!(tidings(&alice, &["revoke", "2"]).status.success());
    for args in [&["listen"][..], &["sync"], &["send", "alice", "hi"]] {
        let (ok, err) = run_to_exit(&phone, args);
        assert!(!ok, "tidings {args:?} succeeded on a revoked device");
        assert!(err.contains("this device was revoked"), "tidings {args:?}: {err}");
        assert!(!err.contains("reconnecting"), "tidings {args:?}: {err}");
    }
}

/// Issue 14, point 4: expired link codes and invites are removed by the
/// retention sweeper, so they cannot pile up; valid ones stay.
#[test]
fn expired_codes_and_invites_are_swept() {
    let mut d =
        Daemon::start_with_config("workers = 2\n[timeouts]\nlink_code = \"1s\"\n[retention]\nsweep_every = \"1s\"\n");
    let invite = d.invite(1);
    let short = d.operator(&["invite", "--expires", "1s"]);
    Code::parse(short.last().unwrap()).unwrap();
    let mut alice = RawClient::register(d.addr(), &invite, "alice").unwrap().client;
    for _ in 0..MAX_LINK_CODES {
        request_link(&mut alice);
    }
    let _kept = d.invite(1);
    // Both expire after a second; the sweeper runs every second (and at
    // start). Look until they are gone.
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + WAIT;
    loop {
        d.stop();
        let stored = Store::open(d.data_dir(), &Default::default())
            .unwrap()
            .accounts()
            .stored_codes();
        if stored == (1, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still stored (invites, link codes): {stored:?}"
        );
        d.restart();
        std::thread::sleep(Duration::from_millis(500));
    }
}
