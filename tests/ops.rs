//! Operating the daemon (issue 12): systemd readiness and watchdog on a
//! real `NOTIFY_SOCKET`, `status --json`, metrics scraped over HTTP,
//! operator commands that never create a server, invites that expire and
//! can be listed and revoked, deleted accounts, and a backup taken under
//! load and restored.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Daemon;
use common::raw::RawClient;
use tidings::wire::{self, Body, ClientFrame, DeviceId, ErrorCode, MsgId, ServerFrame};

const TIDINGSD: &str = env!("CARGO_BIN_EXE_tidingsd");

fn tidingsd(args: &[&str], data_dir: &Path) -> Output {
    Command::new(TIDINGSD)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn send_to_bob(id: MsgId) -> ClientFrame {
    ClientFrame::Send(wire::Send {
        id,
        to: "bob".into(),
        bodies: vec![Body {
            device: DeviceId(1),
            data: bytes::Bytes::from_static(b"ciphertext"),
        }],
        own: vec![],
    })
}

#[test]
fn operator_commands_on_a_missing_directory_fail_and_create_nothing() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");
    for args in [
        &["users"][..],
        &["invite"],
        &["invites"],
        &["invite", "--revoke", "0011223344556677"],
        &["devices", "bob"],
        &["revoke", "bob"],
        &["delete-user", "bob", "--yes"],
        &["backup", "b.bak"],
        &["status"],
        &["status", "--json"],
    ] {
        let out = tidingsd(args, &missing);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&*missing.to_string_lossy()), "{args:?}: {err}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // A directory that is something else is refused too, untouched.
    let foreign = root.path().join("home");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let out = tidingsd(&["users"], &foreign);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a tidings data directory"));
    let out = Command::new(TIDINGSD)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the daemon takes over a foreign directory");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
}

/// `status --json` has exactly the keys the issue names; stopped, it says
/// unhealthy with exit 1.
#[test]
fn status_json_has_the_fields_and_says_healthy() {
    let mut daemon = Daemon::start();
    let out = daemon.operator_output(&["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "version",
        "uptime_s",
        "connections",
        "online_devices",
        "queued_messages",
        "queued_bytes",
        "oldest_undelivered_s",
        "disk_used_bytes",
        "disk_free_bytes",
        "min_free_bytes",
        "flush_p99_ms",
        "healthy",
    ];
    want.sort();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, want);
    assert_eq!(v["healthy"], true);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["disk_used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["min_free_bytes"], 128u64 << 20);
    assert!(v["oldest_undelivered_s"].is_null(), "nothing queued");

    // Something queued for an offline device shows, with its age.
    let invite = daemon.invite(2);
    let mut alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    RawClient::register(daemon.addr(), &invite, "bob")
        .unwrap()
        .client
        .hang_up();
    let answer = alice
        .request(&send_to_bob(MsgId([1; 16])), Duration::from_secs(10))
        .unwrap();
    assert!(matches!(answer, ServerFrame::Accepted { .. }), "{answer:?}");
    let out = daemon.operator_output(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queued_messages"], 1);
    assert!(v["queued_bytes"].as_u64().unwrap() > 0);
    assert!(v["oldest_undelivered_s"].is_u64(), "the copy in the spill log: {v}");
    // The copy is in the spill log, and disk use counts it.
    let spilled = spill_bytes(daemon.data_dir());
    assert!(spilled > 0, "nothing in the spill log");
    assert!(v["disk_used_bytes"].as_u64().unwrap() > spilled);
    assert!(v["connections"].as_u64().unwrap() >= 1);
    assert_eq!(v["online_devices"], 1);

    daemon.stop();
    let out = daemon.operator_output(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    let out = daemon.operator_output(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_metrics_scrape_moves_after_a_send() {
    // A free port for the endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with_config(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    let before = scrape(&addr);
    let invite = daemon.invite(2);
    let mut alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    let mut bob = RawClient::register(daemon.addr(), &invite, "bob").unwrap().client;
    let answer = alice
        .request(&send_to_bob(MsgId([7; 16])), Duration::from_secs(10))
        .unwrap();
    assert!(matches!(answer, ServerFrame::Accepted { .. }));
    loop {
        if let (_, ServerFrame::Deliver(d)) = bob.expect_frame(Duration::from_secs(10)).unwrap() {
            bob.send(&ClientFrame::Ack { up_to: d.seq }).unwrap();
            break;
        }
    }
    let unknown = alice
        .request(
            &ClientFrame::ListDevices { user: "nobody".into() },
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(matches!(
        unknown,
        ServerFrame::Error {
            code: ErrorCode::UNKNOWN_USER,
            ..
        }
    ));
    let after = scrape(&addr);
    for name in ["tidings_messages_accepted_total", "tidings_messages_delivered_total"] {
        assert_eq!(metric(&after, name) - metric(&before, name), 1.0, "{name}");
    }
    assert!(metric(&after, "tidings_bytes_in_total") > metric(&before, "tidings_bytes_in_total"));
    assert!(metric(&after, "tidings_bytes_out_total") > metric(&before, "tidings_bytes_out_total"));
    assert_eq!(
        metric(&after, "tidings_requests_refused_total{code=\"UNKNOWN_USER\"}"),
        1.0
    );
    assert!(metric(&after, "tidings_handshakes_total{outcome=\"unregistered\"}") >= 2.0);
    assert_eq!(metric(&after, "tidings_connections"), 2.0);
    assert!(metric(&after, "tidings_flush_seconds_count") >= 1.0);
    assert!(metric(&after, "tidings_store_bytes") > 0.0);
    assert!(after.contains("tidings_queued_entries"));
}

/// systemd's notify protocol on a real datagram socket: `READY=1` once
/// listening, `STATUS=` lines, and `WATCHDOG=1` while all is well.
#[test]
fn ready_watchdog_and_status_reach_the_notify_socket() {
    let root = tempfile::tempdir().unwrap();
    let sock_path = root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let notify = sock_path.to_str().unwrap().to_string();
    let _daemon = Daemon::start_in_with_env(root, &[], &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")]);
    let (mut ready, mut watchdog, mut status) = (false, 0, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !(ready && watchdog >= 2 && status) {
        assert!(
            Instant::now() < deadline,
            "ready {ready}, watchdog {watchdog}, status {status}"
        );
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        for line in text.lines() {
            match line {
                "READY=1" => ready = true,
                "WATCHDOG=1" => {
                    assert!(ready, "WATCHDOG=1 before READY=1");
                    watchdog += 1;
                }
                l if l.starts_with("STATUS=") && l.contains("connections") => status = true,
                _ => {}
            }
        }
    }
}

#[test]
fn invites_expire_by_default_and_are_listed_and_revoked() {
    let daemon = Daemon::start();
    let out = daemon.operator_output(&["invite"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("valid for 7days"), "{err}");
    let id = err
        .split(", id ")
        .nth(1)
        .and_then(|r| r.get(..16))
        .unwrap_or_else(|| panic!("no id in {err}"))
        .to_string();
    let code = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(code.lines().count(), 1, "only the code on stdout");
    let forever = daemon.operator_output(&["invite", "--uses", "3", "--expires", "never"]);
    assert!(String::from_utf8_lossy(&forever.stderr).contains("valid until used"));
    let list = daemon.operator(&["invites"]);
    assert_eq!(list.len(), 2, "{list:?}");
    let mine = list.iter().find(|l| l.starts_with(&id)).expect("listed by id");
    assert!(mine.contains("1 use left") && mine.contains("expires "), "{mine}");
    assert!(
        list.iter().any(|l| l.contains("3 uses left\tnever expires")),
        "{list:?}"
    );
    assert_eq!(
        daemon.operator(&["invite", "--revoke", &id]),
        vec![format!("revoked invite {id}")]
    );
    assert_eq!(daemon.operator(&["invites"]).len(), 1);
    // A revoked invite no longer registers anyone.
    let code = tidings::code::Code::parse(&code).unwrap();
    assert!(RawClient::register(daemon.addr(), &code, "carol").is_err());
    let bad = daemon.operator_output(&["invite", "--expires", "soon"]);
    assert!(!bad.status.success());
}

#[test]
fn a_deleted_user_is_cut_off_and_its_name_reserved() {
    let daemon = Daemon::start();
    let invite = daemon.invite(3);
    let mut bob = RawClient::register(daemon.addr(), &invite, "bob").unwrap().client;
    let mut alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    let refused = daemon.operator_output(&["delete-user", "bob"]);
    assert!(!refused.status.success(), "needs --yes");
    let out = daemon.operator(&["delete-user", "bob", "--yes"]);
    assert!(out[0].starts_with("deleted bob: 1 device revoked"), "{out:?}");
    // The connected device is told.
    let mut code = None;
    for _ in 0..50 {
        if let Ok(Some((_, ServerFrame::Close { code: c, .. }))) = bob.recv(Duration::from_millis(100)) {
            code = Some(c);
            break;
        }
    }
    assert_eq!(code, Some(ErrorCode::REVOKED));
    // Nobody sends to it, and nobody new takes the name.
    let answer = alice
        .request(&send_to_bob(MsgId([3; 16])), Duration::from_secs(10))
        .unwrap();
    assert!(
        matches!(
            answer,
            ServerFrame::Error {
                code: ErrorCode::UNKNOWN_USER,
                ..
            }
        ),
        "{answer:?}"
    );
    match RawClient::register(daemon.addr(), &invite, "bob") {
        Err(common::raw::ClientError::Unexpected(frame)) if matches!(*frame, ServerFrame::Error { .. }) => {
            let ServerFrame::Error { code, .. } = *frame else {
                unreachable!()
            };
            assert_eq!(code, ErrorCode::NAME_TAKEN)
        }
        other => panic!("registered a reserved name: {:?}", other.map(|r| r.device)),
    }
    let users = daemon.operator(&["users"]);
    assert!(users.iter().any(|l| l.starts_with("bob\tdeleted")), "{users:?}");
}

/// Bytes of the spill log's segment files in `data_dir`.
fn spill_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("spill"))
        .map(|rd| rd.flatten().map(|e| e.metadata().map_or(0, |m| m.len())).sum())
        .unwrap_or(0)
}

/// A backup taken while messages are being sent, restored into a new
/// directory: a daemon started on it delivers every message accepted
/// before the backup began (their copies wait in the spill log: the
/// recipient is offline, so they are written at once), none that was
/// delivered and acknowledged before it, and its queues continue past
/// the old numbers.
#[test]
fn a_backup_under_load_restores_everything_accepted_before_it() {
    // The sender keeps 32 in flight as fast as the daemon answers: past
    // the per-device send rate, raised here.
    let daemon = Daemon::start_with_config("[limits]\nsends_per_minute = 100000000\nsend_burst = 1000000\n");
    let invite = daemon.invite(2);
    let mut alice = RawClient::register(daemon.addr(), &invite, "alice").unwrap().client;
    let bob = RawClient::register(daemon.addr(), &invite, "bob").unwrap().client;
    let bob_key = bob.key().clone();
    bob.hang_up();

    // Twenty messages spilled for the offline bob, then delivered to him
    // and acknowledged: their copies are gone, and must stay gone after
    // the restore (the backup carries the spill log's marks).
    let mut acked = std::collections::HashSet::new();
    for n in 0..20u8 {
        let id = MsgId([0xa0 ^ n; 16]);
        let answer = alice.request(&send_to_bob(id), Duration::from_secs(10)).unwrap();
        assert!(matches!(answer, ServerFrame::Accepted { .. }), "{answer:?}");
        acked.insert(id);
    }
    assert!(spill_bytes(daemon.data_dir()) > 0, "nothing in the spill log");
    let mut b = RawClient::connect(daemon.addr(), &daemon.server_key(), bob_key.clone()).unwrap();
    let mut seen = 0;
    while seen < acked.len() {
        if let (_, ServerFrame::Deliver(d)) = b.expect_frame(Duration::from_secs(20)).unwrap() {
            assert!(acked.contains(&d.id));
            seen += 1;
            b.send(&ClientFrame::Ack { up_to: d.seq }).unwrap();
        }
    }
    // The acks are in before the answer to a later request.
    let pong = b.request(&ClientFrame::Ping, Duration::from_secs(10)).unwrap();
    assert!(matches!(pong, ServerFrame::Pong), "{pong:?}");
    b.hang_up();

    // Alice sends in a loop, keeping 32 in flight, and notes each
    // acceptance.
    let started = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, halt) = (started.clone(), stop.clone());
    let sender = std::thread::spawn(move || {
        let mut accepted_before: Vec<MsgId> = Vec::new();
        let mut in_flight = std::collections::HashMap::new();
        let mut n: u32 = 0;
        while !halt.load(Ordering::SeqCst) || !in_flight.is_empty() {
            while in_flight.len() < 32 && !halt.load(Ordering::SeqCst) {
                n += 1;
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&n.to_be_bytes());
                let req = alice.send(&send_to_bob(MsgId(id))).unwrap();
                in_flight.insert(req, MsgId(id));
            }
            if let Some((req, frame)) = alice.recv(Duration::from_millis(100)).unwrap() {
                if let ServerFrame::Accepted { id, .. } = frame {
                    in_flight.remove(&req);
                    if !flag.load(Ordering::SeqCst) {
                        accepted_before.push(id);
                    }
                } else if req != 0 {
                    panic!("{frame:?}");
                }
            }
        }
        (accepted_before, n)
    });
    std::thread::sleep(Duration::from_millis(500));
    let file = daemon.dir().join("backup.tidings");
    started.store(true, Ordering::SeqCst);
    daemon.operator(&["backup", file.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (accepted_before, sent) = sender.join().unwrap();
    assert!(
        accepted_before.len() >= 10,
        "only {} accepted before",
        accepted_before.len()
    );
    assert!((sent as usize) > accepted_before.len(), "no load during the backup");

    // Restore into a new directory (not into a non-empty one).
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("data");
    let out = tidingsd(&["restore", file.to_str().unwrap()], daemon.data_dir());
    assert!(!out.status.success(), "restored over a live data directory");
    let out = tidingsd(&["restore", file.to_str().unwrap()], &target);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(said.contains("one-time keys dropped"), "{said}");
    assert!(!said.contains(" 0 files"), "the spill log was not restored: {said}");
    assert!(spill_bytes(&target) > 0, "no spill segment restored");
    let restored = Daemon::start_in_with_env(root, &[], &[]);
    assert_eq!(restored.server_key(), daemon.server_key(), "the same server");

    let mut b = RawClient::connect(restored.addr(), &restored.server_key(), bob_key).unwrap();
    let mut got = std::collections::HashSet::new();
    let mut first_seq = None;
    loop {
        match b.expect_frame(Duration::from_secs(20)).unwrap() {
            (_, ServerFrame::Deliver(d)) => {
                first_seq.get_or_insert(d.seq);
                assert!(!acked.contains(&d.id), "an acknowledged message came back");
                got.insert(d.id);
                b.send(&ClientFrame::Ack { up_to: d.seq }).unwrap();
            }
            (_, ServerFrame::QueueDrained) => break,
            _ => {}
        }
    }
    let missing: Vec<_> = accepted_before.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} missing",
        missing.len(),
        accepted_before.len()
    );
    // New entries continue far past anything the old server numbered.
    let mut a2 = RawClient::register(restored.addr(), &restored.invite(1), "carol")
        .unwrap()
        .client;
    let answer = a2
        .request(
            &ClientFrame::Send(wire::Send {
                id: MsgId([9; 16]),
                to: "bob".into(),
                bodies: vec![Body {
                    device: DeviceId(1),
                    data: bytes::Bytes::from_static(b"after"),
                }],
                own: vec![],
            }),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(matches!(answer, ServerFrame::Accepted { .. }));
    loop {
        if let (_, ServerFrame::Deliver(d)) = b.expect_frame(Duration::from_secs(20)).unwrap() {
            assert!(d.seq > first_seq.unwrap_or(0) + (1 << 39), "seq {}", d.seq);
            break;
        }
    }
}

/// `tidings server-address HOST:PORT` moves a profile to its server's new
/// address; the pinned key stays.
#[test]
fn a_profile_follows_its_server_to_a_new_address() {
    use common::cli::{stdout, tidings};
    let daemon = Daemon::start();
    let alice = daemon.user("alice");
    let _bob = daemon.user("bob");
    let key_before = std::fs::read_to_string(alice.join("profile.json")).unwrap();
    let bad = tidings(&alice, &["server-address", "nowhere"]);
    assert!(!bad.status.success());
    stdout(&tidings(&alice, &["server-address", "chat.example.org:7000"]));
    let moved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(alice.join("profile.json")).unwrap()).unwrap();
    assert_eq!(moved["server"], "chat.example.org:7000");
    // Back where the server is.
    let moved = tidings(&alice, &["server-address", &daemon.addr().to_string()]);
    assert!(String::from_utf8_lossy(&moved.stderr).contains("the pinned server key stays"));
    stdout(&tidings(&alice, &["send", "bob", "found"]));
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(alice.join("profile.json")).unwrap()).unwrap();
    let before: serde_json::Value = serde_json::from_str(&key_before).unwrap();
    assert_eq!(after["server_key"], before["server_key"]);
}

/// `tidingsd doctor` on a running daemon: every check has a line, the
/// daemon and its data directory are fine.
#[test]
fn doctor_checks_a_running_daemon() {
    let daemon = Daemon::start();
    let out = daemon.operator_output(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    for want in [
        "ok    the daemon runs and is healthy",
        "a data directory, owner and mode 700 are right",
        "MiB free (floor 128 MiB)",
        "file-descriptor limit",
        "clock",
        "resolves",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

/// A backup of a stopped daemon's directory works too; a damaged backup
/// is refused before anything is written.
#[test]
fn a_stopped_daemon_is_backed_up_and_a_damaged_backup_refused() {
    let mut daemon = Daemon::start();
    let invite = daemon.invite(1);
    RawClient::register(daemon.addr(), &invite, "alice")
        .unwrap()
        .client
        .hang_up();
    daemon.stop();
    let file = daemon.dir().join("stopped.tidings");
    daemon.operator(&["backup", file.to_str().unwrap()]);
    let root = tempfile::tempdir().unwrap();
    let out = tidingsd(&["restore", file.to_str().unwrap()], &root.path().join("data"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored = Daemon::start_in_with_env(root, &[], &[]);
    assert_eq!(restored.operator(&["users"]), vec!["alice\t1 device"]);

    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let damaged = daemon.dir().join("damaged.tidings");
    std::fs::write(&damaged, bytes).unwrap();
    let target = daemon.dir().join("from-damaged");
    let out = tidingsd(&["restore", damaged.to_str().unwrap()], &target);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists(), "a damaged backup wrote something");
}

/// A backup of a stopped directory in an older data format is refused
/// with what to do, and the directory is left as it was (opening the
/// store would migrate it, and the operator backs up before an upgrade
/// precisely to keep the old format).
#[test]
fn a_stopped_directory_in_an_older_format_is_refused_and_left_alone() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("FORMAT"), "tidings-data 3\n").unwrap();
    let file = root.path().join("old.tidings");
    let out = tidingsd(&["backup", file.to_str().unwrap()], &dir);
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("data format 3, older than this build's"), "{said}");
    assert_eq!(std::fs::read_to_string(dir.join("FORMAT")).unwrap(), "tidings-data 3\n");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("FORMAT")], "something was written");
    assert!(!file.exists());
}
