//! Integration tests: the real `tidingsd` on a loopback port, driven by the
//! real client library and the `tidings` command line.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cli::{Listener, TIDINGS, stdout, tidings};
use common::profiles::{open, open_receiving, sync_messages, texts};
use common::{Daemon, WAIT};
use tidings::client::{self, Direction, Event, Message, Status, conn::Closed};
use tidings::wire::{DeviceId, ErrorCode};

/// Listens on `dir` in a thread until a message with text `stop` arrives;
/// every event goes to the channel.
fn listen_until_stop(
    dir: PathBuf,
) -> (
    mpsc::Receiver<Event>,
    std::thread::JoinHandle<Result<(), client::Error>>,
) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        client::listen(&dir, &mut |e| {
            let _ = tx.send(e.clone());
            !matches!(e, Event::Message(m) if m.text == "stop")
        })
    });
    (rx, handle)
}

fn next_message(rx: &mpsc::Receiver<Event>) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Message(m)) => return m,
            Ok(_) => {}
            Err(e) => panic!("no message: {e}"),
        }
    }
}

fn wait_connected(rx: &mpsc::Receiver<Event>) {
    loop {
        match rx.recv_timeout(WAIT).expect("listener never connected") {
            Event::Connected => return,
            Event::Disconnected(why) => panic!("listener: {why}"),
            _ => {}
        }
    }
}

#[test]
fn online_delivery() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let (rx, listener) = listen_until_stop(bob.clone());
    wait_connected(&rx);
    let mut a = open(&alice);
    let sent = a.send("bob", "hello bob").unwrap();
    assert_eq!(sent.status, Status::Sent);
    let got = next_message(&rx);
    assert_eq!(
        (got.id, got.from.as_str(), got.text.as_str()),
        (sent.id, "alice", "hello bob")
    );
    assert_eq!(got.direction, Direction::In);
    assert_eq!(got.ts_ms, sent.ts_ms, "both sides show the server's time");
    a.send("bob", "stop").unwrap();
    listener.join().unwrap().unwrap();
    // The listener stored what it printed.
    let h = open(&bob).history("alice").unwrap();
    assert_eq!(texts(&h), ["hello bob", "stop"]);
}

#[test]
fn offline_delivery_after_reconnect_and_ack() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    {
        let mut a = open(&alice);
        for t in ["one", "two", "three"] {
            a.send("bob", t).unwrap();
        }
    }
    let got = sync_messages(&bob);
    assert_eq!(texts(&got), ["one", "two", "three"]);
    // Acked: nothing comes twice.
    assert!(sync_messages(&bob).is_empty());
    let h = open(&bob).history("alice").unwrap();
    assert_eq!(texts(&h), ["one", "two", "three"]);
    assert!(h.iter().all(|m| m.status == Status::Received));
    let mine = open(&alice).history("bob").unwrap();
    assert!(
        mine.iter()
            .all(|m| m.status == Status::Sent && m.direction == Direction::Out)
    );
}

#[test]
fn order_of_a_thousand_messages_is_kept() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let mut a = open(&alice);
    for i in 0..1000 {
        a.send("bob", &i.to_string()).unwrap();
    }
    drop(a);
    let got = sync_messages(&bob);
    let want: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    assert_eq!(texts(&got), want);
    assert_eq!(open(&bob).history("alice").unwrap().len(), 1000);
}

#[test]
fn a_retried_send_is_stored_once() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let mut a = open(&alice);
    let id = a.new_id().unwrap();
    let first = a.send_with_id(id, "bob", "once").unwrap();
    // The retry on a new connection, as after a dropped one.
    a.disconnect();
    let again = a.send_with_id(id, "bob", "once").unwrap();
    assert_eq!(
        first.ts_ms, again.ts_ms,
        "the server answers with its first acceptance time"
    );
    drop(a);
    let got = sync_messages(&bob);
    assert_eq!(texts(&got), ["once"]);
    assert_eq!(open(&alice).history("bob").unwrap().len(), 1);
}

#[test]
fn a_linked_second_device_gets_the_conversation() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let phone = d.profile("alice-phone");
    let (code, _) = open(&alice).link_code().unwrap();
    let reg = open(&phone).link(&code).unwrap();
    assert_eq!((reg.user.as_str(), reg.device), ("alice", 2));
    // A link code works once.
    let e = open(&d.profile("thief")).link(&code).unwrap_err();
    assert!(
        matches!(
            e,
            client::Error::Server {
                code: ErrorCode::INVALID_LINK_CODE,
                ..
            }
        ),
        "{e}"
    );

    open(&bob).send("alice", "hi alice").unwrap();
    open(&alice).send("bob", "hi bob").unwrap();
    let on_phone = sync_messages(&phone);
    assert_eq!(texts(&on_phone), ["hi alice", "hi bob"]);
    assert_eq!(on_phone[1].direction, Direction::Out);
    assert_eq!((on_phone[1].from.as_str(), on_phone[1].to.as_str()), ("alice", "bob"));
    let h = open(&phone).history("bob").unwrap();
    assert_eq!(texts(&h), ["hi alice", "hi bob"]);
    // The first device got bob's message too; bob got one copy.
    assert_eq!(texts(&sync_messages(&alice)), ["hi alice"]);
    assert_eq!(texts(&sync_messages(&bob)), ["hi bob"]);
    // Messages to oneself reach one's other devices.
    open(&phone).send("alice", "note to self").unwrap();
    assert_eq!(texts(&sync_messages(&alice)), ["note to self"]);
    let devices = open(&alice).my_devices().unwrap();
    assert_eq!(
        devices.iter().map(|d| d.device).collect::<Vec<_>>(),
        [DeviceId(1), DeviceId(2)]
    );
}

#[test]
fn revoke_cuts_a_device_off() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let phone = d.profile("phone");
    let (code, _) = open(&alice).link_code().unwrap();
    open(&phone).link(&code).unwrap();
    open(&alice).revoke(DeviceId(2)).unwrap();
    let e = open_receiving(&phone).sync(&mut |_| {}).unwrap_err();
    assert!(
        matches!(
            &e,
            client::Error::Closed(Closed::ByServer {
                code: ErrorCode::REVOKED,
                ..
            })
        ),
        "{e:?}"
    );
    assert!(!e.is_transient());
    // Sends from alice now need no body for the revoked device.
    let bob = d.user("bob");
    open(&alice).send("bob", "after").unwrap();
    assert_eq!(texts(&sync_messages(&bob)), ["after"]);
}

#[test]
fn a_device_connecting_elsewhere_closes_the_older_connection() {
    let d = Daemon::start();
    let alice = d.user("alice");
    // The same device key in a second profile (a copied profile).
    let copy = d.profile("alice-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["key", "profile.json"] {
        std::fs::copy(alice.join(f), copy.join(f)).unwrap();
    }
    let (rx, listener) = listen_until_stop(alice.clone());
    wait_connected(&rx);
    let mut other = open(&copy);
    other.connect().unwrap();
    let e = listener.join().unwrap().unwrap_err();
    assert!(
        matches!(
            &e,
            client::Error::Closed(Closed::ByServer {
                code: ErrorCode::CONNECTED_ELSEWHERE,
                ..
            })
        ),
        "{e:?}"
    );
    // The newer connection works.
    assert!(other.my_devices().is_ok());
}

#[test]
fn send_mismatch_is_retried_with_fresh_device_lists() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let mut a = open(&alice);
    // Alice caches bob's device list...
    a.send("bob", "before").unwrap();
    // ...then bob adds a device.
    let tablet = d.profile("bob-tablet");
    let (code, _) = open(&bob).link_code().unwrap();
    open(&tablet).link(&code).unwrap();
    a.send("bob", "after").unwrap();
    assert_eq!(texts(&sync_messages(&tablet)), ["after"]);
    assert_eq!(texts(&sync_messages(&bob)), ["before", "after"]);
}

#[test]
fn errors_are_reported_and_leave_no_pending_message() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let mut a = open(&alice);
    let e = a.send("nobody", "hi").unwrap_err();
    assert!(
        matches!(
            e,
            client::Error::Server {
                code: ErrorCode::UNKNOWN_USER,
                ..
            }
        ),
        "{e}"
    );
    assert!(a.history("nobody").unwrap().is_empty());
    let e = a.send("bob", &"x".repeat(5000)).unwrap_err();
    assert!(matches!(e, client::Error::Body(_)), "{e}");
    let e = open(&d.profile("carol")).register(&d.invite(1), "alice").unwrap_err();
    assert!(
        matches!(
            e,
            client::Error::Server {
                code: ErrorCode::NAME_TAKEN,
                ..
            }
        ),
        "{e}"
    );
    // A wrong server key fails the handshake.
    let mut bad = d.invite(1);
    bad.server_key[0] ^= 1;
    let e = open(&d.profile("dave")).register(&bad, "dave").unwrap_err();
    assert!(matches!(e, client::Error::Closed(Closed::Handshake)), "{e:?}");
}

#[test]
fn send_reconnects_and_retries_after_the_connection_drops() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let mut a = open(&alice);
    a.send("bob", "before").unwrap();
    assert!(a.is_connected());
    // The daemon dies under the open connection and comes back.
    d.restart();
    a.send("bob", "after the restart").unwrap();
    // Down for a while: the send waits it out (same id throughout).
    d.kill9();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        d.restart();
        d
    });
    a.send("bob", "while it was down").unwrap();
    let _d = starter.join().unwrap();
    drop(a);
    assert_eq!(
        texts(&sync_messages(&bob)),
        ["before", "after the restart", "while it was down"]
    );
}

#[test]
fn listen_reconnects_after_the_daemon_restarts() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let (rx, listener) = listen_until_stop(bob.clone());
    wait_connected(&rx);
    d.restart();
    // It notices, reconnects (with backoff) and carries on.
    let deadline = Instant::now() + WAIT;
    let mut saw_disconnect = false;
    loop {
        match rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap()
        {
            Event::Disconnected(_) => saw_disconnect = true,
            Event::Connected if saw_disconnect => break,
            _ => {}
        }
    }
    let mut a = open(&alice);
    a.send("bob", "after").unwrap();
    assert_eq!(next_message(&rx).text, "after");
    a.send("bob", "stop").unwrap();
    listener.join().unwrap().unwrap();
}

#[test]
fn a_delivery_already_stored_is_acked_but_not_shown_again() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let sent = open(&alice).send("bob", "once only").unwrap();
    // As if bob had stored it and crashed before his ack reached the server.
    {
        let b = open(&bob);
        let copy = Message {
            id: sent.id,
            from: "alice".into(),
            from_device: DeviceId(1),
            to: "bob".into(),
            text: "once only".into(),
            ts_ms: sent.ts_ms,
            direction: Direction::In,
            status: Status::Received,
            ..Message::default()
        };
        assert!(b.profile().history().insert("bob", &copy).unwrap());
        b.profile().history().flush().unwrap();
    }
    assert!(sync_messages(&bob).is_empty(), "a duplicate is not shown");
    assert!(sync_messages(&bob).is_empty(), "and it was acked");
    assert_eq!(open(&bob).history("alice").unwrap().len(), 1);
}

#[test]
fn listen_resends_a_message_left_pending() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    // As if alice's send had crashed after storing, before `Accepted`.
    let id = {
        let a = open(&alice);
        let m = Message {
            id: a.new_id().unwrap(),
            from: "alice".into(),
            from_device: DeviceId(1),
            to: "bob".into(),
            text: "left pending".into(),
            ts_ms: 1,
            direction: Direction::Out,
            status: Status::Pending,
            ..Message::default()
        };
        a.profile().history().insert("alice", &m).unwrap();
        a.profile().history().flush().unwrap();
        m.id
    };
    let (rx, listener) = listen_until_stop(alice.clone());
    wait_connected(&rx);
    // The listener resends right after connecting; wait for it to land.
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(Instant::now() < deadline, "the pending message never arrived");
        got = sync_messages(&bob);
    }
    assert_eq!(texts(&got), ["left pending"]);
    assert_eq!(got[0].id, id);
    open(&bob).send("alice", "stop").unwrap();
    listener.join().unwrap().unwrap();
    let h = open(&alice).history("bob").unwrap();
    // Sent, and bob's sync said it was delivered (its receipt reached the
    // listener before "stop" did).
    assert_eq!(h[0].status, Status::Delivered);
}

// ---- the command line ----

#[test]
fn cli_send_from_a_second_terminal_while_listen_runs() {
    let d = Daemon::start();
    let alice = d.profile("alice");
    let bob = d.profile("bob");
    let invite = d.invite(2).to_string();
    assert_eq!(
        stdout(&tidings(&alice, &["register", &invite, "alice"])).trim(),
        "alice 1"
    );
    // --json and --profile after the subcommand.
    let reg = Command::new(TIDINGS)
        .args(["register", &invite, "bob", "--json", "--profile"])
        .arg(&bob)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout(&reg).trim()).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["user"].as_str()),
        (Some("registered"), Some("bob"))
    );

    let listener = Listener::start(&bob);
    // A second command on bob's profile goes through the listener.
    let id = stdout(&tidings(&bob, &["send", "alice", "from the second terminal"]));
    let id = id.lines().last().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    // Alice answers; the listener prints it as JSON.
    let sent = stdout(&tidings(&alice, &["send", "bob", "hello"]));
    let v = listener.next("alice's message");
    assert_eq!(v["type"], "message");
    assert_eq!(v["id"], sent.trim());
    assert_eq!(
        (v["from"].as_str(), v["from_device"].as_u64()),
        (Some("alice"), Some(1))
    );
    assert_eq!((v["to"].as_str(), v["text"].as_str()), (Some("bob"), Some("hello")));
    assert!(v["ts"].as_u64().unwrap() > 1_600_000_000_000);
    // History through the listener, in JSON, both directions.
    let hist = stdout(&tidings(&bob, &["history", "alice", "--json"]));
    let hist: Vec<serde_json::Value> = hist.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(hist.len(), 2);
    assert_eq!(
        (hist[0]["direction"].as_str(), hist[0]["status"].as_str()),
        (Some("out"), Some("sent"))
    );
    assert_eq!((hist[0]["id"].as_str()), Some(id));
    assert_eq!(
        (hist[1]["direction"].as_str(), hist[1]["status"].as_str()),
        (Some("in"), Some("received"))
    );
    // A second listen is refused.
    let second = tidings(&bob, &["listen"]);
    assert!(!second.status.success());
    assert!(second.stdout.is_empty());
    drop(listener);
    // Without the listener, commands open the profile themselves (the
    // socket it left behind is stale).
    let hist = stdout(&tidings(&bob, &["history", "alice"]));
    assert_eq!(hist.lines().count(), 2);
    // Alice's sync gets bob's message.
    // Alice's sync gets bob's message, and his device's word that "hello"
    // was delivered.
    let synced = stdout(&tidings(&alice, &["sync"]));
    assert!(
        synced
            .lines()
            .any(|l| l.ends_with("bob/1 -> alice: from the second terminal")),
        "{synced}"
    );
    assert!(
        synced
            .lines()
            .any(|l| l.contains(sent.trim()) && l.contains("✓✓ delivered (reported by bob/1)")),
        "{synced}"
    );
}

#[test]
fn cli_failures_print_nothing_on_stdout() {
    let d = Daemon::start();
    let alice = d.profile("alice");
    let out = tidings(&alice, &["send", "bob", "hi"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));
    stdout(&tidings(&alice, &["register", &d.invite(1).to_string(), "alice"]));
    for args in [
        &["send", "nobody", "hi"][..],
        &["register", &d.invite(1).to_string(), "alice"],
        &["link", "tidings://nope"],
        &["revoke", "7"],
        &["history", "nobody"],
        &["history", "Not A Name"],
        &["send", "alice", ""],
        &["send", "alice", &"x".repeat(3501)],
    ] {
        let out = tidings(&alice, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn send_with_the_daemon_stopped_is_pending_and_goes_with_sync() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    stdout(&tidings(&alice, &["send", "bob", "before"]));
    d.kill9();
    let started = Instant::now();
    let out = tidings(&alice, &["send", "bob", "while it was down"]);
    let took = started.elapsed();
    // The client gives up on the server after 2.5 s by its own clock (see
    // the unit test of `send`, on a virtual clock); what a real process
    // took, on a shared machine, is printed rather than asserted closely.
    eprintln!("send with the daemon stopped answered in {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(out.status.code(), Some(75), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pending: it goes when the server is back"));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(id.len(), 32, "{id:?}");
    let out = tidings(&alice, &["send", "bob", "and this", "--json"]);
    assert_eq!(out.status.code(), Some(75));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "pending");
    let id2 = v["id"].as_str().unwrap().to_owned();
    let statuses = |out: &std::process::Output| -> Vec<(String, String)> {
        stdout(out)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["id"].as_str().unwrap().to_owned(),
                    v["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let hist = statuses(&tidings(&alice, &["history", "bob", "--json"]));
    assert_eq!(
        hist[1..],
        [(id.clone(), "pending".into()), (id2.clone(), "pending".into())]
    );
    let plain = stdout(&tidings(&alice, &["history", "bob"]));
    assert!(plain.lines().nth(1).unwrap().contains("[pending]"), "{plain}");
    d.restart();
    stdout(&tidings(&alice, &["sync"]));
    let hist = statuses(&tidings(&alice, &["history", "bob", "--json"]));
    assert!(hist.iter().all(|(_, s)| s != "pending"), "{hist:?}");
    let got = sync_messages(&bob);
    assert_eq!(texts(&got), ["before", "while it was down", "and this"]);
    assert_eq!(got[1].id.to_string(), id, "the same id throughout");
}
