//! End-to-end encryption through the real `tidingsd`: several devices per
//! user, what the server and the wire can see, device changes while a
//! sender is offline, one-time keys handed out once, undecryptable bodies
//! and session resets, identity warnings and safety numbers.

use std::collections::HashSet;
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::Daemon;
use common::cli::{Listener, stdout, tidings, tidings_cmd};
use common::profiles::{messages, notices, open, open_receiving, sync, texts};
use tidings::client::e2e::Known;
use tidings::client::{self, Event, Notice};
use tidings::wire::{DeviceAddr, DeviceId};

fn addr(user: &str, device: u32) -> DeviceAddr {
    DeviceAddr {
        user: user.into(),
        device: DeviceId(device),
    }
}

#[test]
fn two_users_with_two_devices_each_see_the_whole_conversation() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-phone");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-phone");
    let devices = [(&alice, "bob"), (&alice2, "bob"), (&bob, "alice"), (&bob2, "alice")];
    let script: [(&Path, &str, &str); 8] = [
        (&alice, "bob", "a1: hello bob"),
        (&bob2, "alice", "b2: hi alice, from my phone"),
        (&alice2, "bob", "a2: and hi from mine"),
        (&bob, "alice", "b1: back at my desk"),
        (&alice, "bob", "a1: two in a row"),
        (&alice, "bob", "a1: (the second)"),
        (&bob2, "alice", "b2: ok"),
        (&alice2, "bob", "a2: bye"),
    ];
    for (i, (from, to, text)) in script.iter().enumerate() {
        open(from).send(to, text).unwrap();
        // Everyone else catches up now and then, so sessions run both ways
        // (pre-key messages first, normal ones after).
        if i % 3 == 2 {
            for (dev, _) in devices {
                sync(dev);
            }
        }
    }
    for (dev, _) in devices {
        sync(dev);
    }
    let want: HashSet<&str> = script.iter().map(|(_, _, t)| *t).collect();
    for (dev, peer) in devices {
        let h = open(dev).history(peer).unwrap();
        assert!(h.iter().all(|m| !m.undecryptable), "{}: {h:?}", dev.display());
        let got: HashSet<&str> = h.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(got, want, "{}", dev.display());
        assert_eq!(h.len(), script.len(), "each once on {}", dev.display());
        // Each sender's messages in the order sent.
        for sender in ["a1:", "a2:", "b1:", "b2:"] {
            let theirs: Vec<&str> = texts(&h).into_iter().filter(|t| t.starts_with(sender)).collect();
            let sent: Vec<&str> = script
                .iter()
                .map(|(_, _, t)| *t)
                .filter(|t| t.starts_with(sender))
                .collect();
            assert_eq!(theirs, sent, "{}", dev.display());
        }
    }
}

/// A forwarding TCP proxy that keeps every byte in both directions.
struct Proxy {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn bind() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    fn start(listener: TcpListener, upstream: String) -> Proxy {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = listener.local_addr().unwrap().to_string();
        let s = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    s.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy { addr, seen }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for entry in std::fs::read_dir(&p).unwrap() {
            let entry = entry.unwrap();
            let t = entry.file_type().unwrap();
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                out.extend(std::fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

#[test]
fn the_server_and_the_wire_never_see_the_text() {
    let (listener, proxy_addr) = Proxy::bind();
    let mut d = Daemon::start_with(&["--public-addr", &proxy_addr]);
    let proxy = Proxy::start(listener, d.addr().to_string());
    assert_eq!(d.invite(1).addr, proxy.addr, "clients connect through the proxy");
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-phone");
    let bob = d.user("bob");
    let marker = format!("MARKER-{:016x}", rand_u64());
    let reply = format!("REPLY-{:016x}", rand_u64());
    open(&alice).send("bob", &marker).unwrap();
    assert_eq!(texts(&messages(&sync(&bob))), [marker.as_str()]);
    open(&bob).send("alice", &reply).unwrap();
    assert_eq!(texts(&messages(&sync(&alice))), [reply.as_str()]);
    assert_eq!(texts(&messages(&sync(&alice2))), [marker.as_str(), reply.as_str()]);
    // Something else stays queued on the server, undelivered.
    open(&alice).send("bob", &format!("{marker}-queued")).unwrap();
    d.kill9();
    let data = all_bytes(d.data_dir());
    assert!(data.len() > 10_000, "the daemon wrote its database");
    let wire = proxy.seen.lock().unwrap().clone();
    assert!(wire.len() > 1_000, "the proxy saw the traffic");
    for secret in [&marker, &reply] {
        assert!(!contains(&data, secret.as_bytes()), "{secret} in the data directory");
        assert!(!contains(&wire, secret.as_bytes()), "{secret} on the wire");
    }
    // The search works: the clients' own histories hold the text.
    assert!(contains(&all_bytes(&bob), marker.as_bytes()));
    assert!(contains(&all_bytes(&alice), reply.as_bytes()));
    let h = open(&bob).history("alice").unwrap();
    assert_eq!(texts(&h), [marker.as_str(), reply.as_str()]);
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[test]
fn a_device_added_or_removed_while_the_sender_is_offline() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    open(&alice).send("bob", "first").unwrap();
    // Alice is offline (no process runs on her profile) while bob adds a
    // device.
    let bob3 = d.link(&bob, "bob-3");
    let mut a = open(&alice);
    a.send("bob", "second").unwrap();
    // Her stored device list was stale: the server said Mismatch, she
    // claimed keys for the new device and retried.
    assert_eq!(
        notices(&mut a),
        vec![Notice::NewDevice {
            user: "bob".into(),
            device: DeviceId(3)
        }]
    );
    drop(a);
    assert_eq!(texts(&messages(&sync(&bob))), ["first", "second"]);
    assert_eq!(texts(&messages(&sync(&bob2))), ["first", "second"]);
    assert_eq!(texts(&messages(&sync(&bob3))), ["second"]);
    // Now bob drops a device while alice is offline.
    open(&bob).revoke(DeviceId(2)).unwrap();
    let mut a = open(&alice);
    a.send("bob", "third").unwrap();
    assert_eq!(
        notices(&mut a),
        vec![Notice::DeviceRemoved {
            user: "bob".into(),
            device: DeviceId(2)
        }]
    );
    drop(a);
    assert_eq!(texts(&messages(&sync(&bob))), ["third"]);
    assert_eq!(texts(&messages(&sync(&bob3))), ["third"]);
    let e = open_receiving(&bob2).sync(&mut |_| {}).unwrap_err();
    assert!(matches!(e, client::Error::Closed(_)), "{e}");
    // Exactly bob's current devices: the server keeps a queue for each
    // current device only, and both were drained.
    let listed = d.operator(&["devices", "bob"]);
    assert_eq!(listed.len(), 2, "{listed:?}");
    // The other way: bob has written to alice, so a new device of hers is
    // news to him.
    open(&bob).send("alice", "got them").unwrap();
    let alice2 = d.link(&alice, "alice-2");
    let mut b = open(&bob);
    b.send("alice", "to both of you").unwrap();
    assert_eq!(
        notices(&mut b),
        vec![Notice::NewDevice {
            user: "alice".into(),
            device: DeviceId(2)
        }]
    );
    drop(b);
    assert_eq!(texts(&messages(&sync(&alice2))), ["to both of you"]);
}

#[test]
fn one_time_keys_are_never_handed_out_twice() {
    let d = Daemon::start();
    let _bob = d.user("bob");
    let claimers: Vec<PathBuf> = (0..8).map(|i| d.user(&format!("claimer{i}"))).collect();
    // Bob published 50 one-time keys; 8 claimers at once claim 7 times
    // each (within the per-device rate limit): 50 one-time keys, then the
    // fallback key.
    let handles: Vec<_> = claimers
        .into_iter()
        .map(|dir| {
            std::thread::spawn(move || {
                let mut c = open(&dir);
                let mut got = Vec::new();
                for _ in 0..7 {
                    let keys = c.claim_keys("bob").unwrap();
                    assert_eq!(keys.len(), 1);
                    let k = &keys[0];
                    got.push((k.one_time.unwrap().key, k.fallback));
                }
                got
            })
        })
        .collect();
    let all: Vec<([u8; 32], bool)> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let one_time: Vec<_> = all.iter().filter(|(_, f)| !f).map(|(k, _)| *k).collect();
    let distinct: HashSet<_> = one_time.iter().collect();
    assert_eq!(one_time.len(), 50, "every one-time key handed out");
    assert_eq!(distinct.len(), 50, "and none twice");
    let fallback: HashSet<_> = all.iter().filter(|(_, f)| *f).map(|(k, _)| *k).collect();
    assert_eq!(fallback.len(), 1, "then the one fallback key");
    assert!(!distinct.contains(fallback.iter().next().unwrap()));
}

#[test]
fn keys_are_topped_up_when_the_server_says_they_run_low() {
    let d = Daemon::start();
    let bob = d.user("bob");
    // 45 claims, by two devices (each may claim 30 a minute).
    for (name, n) in [("carol", 25), ("erin", 20)] {
        let mut c = open(&d.user(name));
        for _ in 0..n {
            assert!(!c.claim_keys("bob").unwrap()[0].fallback);
        }
    }
    // Bob's next connection hears that 5 are left and publishes more.
    assert!(messages(&sync(&bob)).is_empty());
    let dave = d.user("dave");
    let mut c = open(&dave);
    let mut fallbacks = 0;
    for _ in 0..25 {
        fallbacks += usize::from(c.claim_keys("bob").unwrap()[0].fallback);
    }
    assert_eq!(fallbacks, 0, "50 again after the top-up");
}

/// Removes a profile's Olm sessions with `peer`, as a restored backup or a
/// lost disk would (the profile must not be open).
fn lose_sessions(profile: &Path, peer: &str) {
    let db = sled::open(profile.join("history")).unwrap();
    let tree = db.open_tree("e2e").unwrap();
    let prefix = [b"s\0".as_slice(), peer.as_bytes(), b"\0"].concat();
    let keys: Vec<_> = tree.scan_prefix(&prefix).map(|r| r.unwrap().0).collect();
    assert!(!keys.is_empty());
    for k in keys {
        tree.remove(k).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn an_undecryptable_message_is_shown_and_the_session_reset() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    open(&alice).send("bob", "one").unwrap();
    assert_eq!(texts(&messages(&sync(&bob))), ["one"]);
    lose_sessions(&bob, "alice");
    open(&alice).send("bob", "two").unwrap();
    open(&alice).send("bob", "three").unwrap();
    // Shown as undecryptable (the two in a row from one device as one
    // notice), acked (the queue moves on), and bob's device sent alice's a
    // session reset.
    let got = messages(&sync(&bob));
    assert_eq!(got.len(), 1);
    assert!(
        got.iter()
            .all(|m| m.undecryptable && m.text.is_empty() && m.from == "alice")
    );
    assert!(messages(&sync(&bob)).is_empty(), "acked");
    // The reset is not shown to alice, but her device now uses the new
    // session.
    assert!(messages(&sync(&alice)).is_empty());
    open(&alice).send("bob", "four").unwrap();
    let got = messages(&sync(&bob));
    assert_eq!(texts(&got), ["four"]);
    assert!(!got[0].undecryptable);
    let h = open(&bob).history("alice").unwrap();
    assert_eq!(
        h.iter().map(|m| (m.undecryptable, m.repeats)).collect::<Vec<_>>(),
        [(false, 0), (true, 1), (false, 0)]
    );
    // And the other way round.
    open(&bob).send("alice", "five").unwrap();
    assert_eq!(texts(&messages(&sync(&alice))), ["five"]);
}

#[test]
fn a_changed_identity_is_a_warning_before_the_next_message() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    open(&alice).send("bob", "hi").unwrap();
    sync(&bob);
    open(&bob).send("alice", "hello").unwrap();
    // What alice remembers of bob's device now differs from the key its
    // session is bound to, as it would if the server had swapped keys.
    let tamper = |dir: &Path| {
        let mut a = open(dir);
        let crypto = a.profile_mut().crypto_mut();
        crypto.set_known_for_test(
            &addr("bob", 1),
            Known {
                curve25519: [7; 32],
                ed25519: Some([8; 32]),
            },
        );
        crypto.persist().unwrap();
        a.profile().history().flush().unwrap();
    };
    tamper(&alice);
    // Receiving: the warning comes before the message (receipts for
    // alice's "hi" aside).
    let events: Vec<Event> = sync(&alice)
        .into_iter()
        .filter(|e| !matches!(e, Event::Receipt(_)))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(
        &events[0],
        Event::Notice(Notice::IdentityChanged { user, device: DeviceId(1) }) if user == "bob"
    ));
    assert!(matches!(&events[1], Event::Message(m) if m.text == "hello"));
    // Once told, not again.
    let mut a = open(&alice);
    a.send("bob", "again").unwrap();
    assert!(notices(&mut a).is_empty());
    drop(a);
    // Sending: the same.
    tamper(&alice);
    let mut a = open(&alice);
    a.send("bob", "and again").unwrap();
    assert_eq!(
        notices(&mut a),
        vec![Notice::IdentityChanged {
            user: "bob".into(),
            device: DeviceId(1)
        }]
    );
    drop(a);
    // The command line: a warning on stderr, and with --json a warning
    // line before the message.
    open(&bob).send("alice", "last").unwrap();
    tamper(&alice);
    let out = tidings(&alice, &["sync", "--json"]);
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["type"], "warning");
    assert_eq!(lines[0]["event"], "identity_changed");
    assert_eq!(
        (lines[0]["user"].as_str(), lines[0]["device"].as_u64()),
        (Some("bob"), Some(1))
    );
    assert_eq!(
        (lines[1]["type"].as_str(), lines[1]["text"].as_str()),
        (Some("message"), Some("last"))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: the identity key of bob's device 1 changed"));
}

#[test]
fn safety_numbers_match_on_both_sides_and_follow_the_devices() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let _alice2 = d.link(&alice, "alice-2");
    let bob = d.user("bob");
    let number = |dir: &Path, user: &str| {
        let out = stdout(&tidings(dir, &["verify", user]));
        out.lines().last().unwrap().to_owned()
    };
    let a = number(&alice, "bob");
    let b = number(&bob, "alice");
    assert_eq!(a, b);
    assert_eq!(a.split(' ').count(), 12);
    assert!(
        a.split(' ')
            .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit()))
    );
    // The second device of alice's sees it too.
    assert_eq!(number(&d.profile("alice-2"), "bob"), a);
    // A new device of bob's changes it, on both sides alike; alice hears
    // of the device.
    let _bob2 = d.link(&bob, "bob-2");
    let out = tidings(&alice, &["verify", "bob", "--json"]);
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["type"], "notice");
    assert_eq!(lines[0]["event"], "new_device");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "safety_number");
    assert_eq!(last["devices"].as_array().unwrap().len(), 4);
    let a2 = last["number"].as_str().unwrap().to_owned();
    assert_ne!(a2, a);
    assert_eq!(number(&bob, "alice"), a2);
    assert_eq!(number(&d.profile("bob-2"), "alice"), a2);
}

#[test]
fn cli_announces_a_new_device_and_keeps_the_id_last() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    stdout(&tidings(&alice, &["send", "bob", "one"]));
    let _bob2 = d.link(&bob, "bob-2");
    let out = tidings(&alice, &["send", "bob", "two"]);
    let id = stdout(&out);
    assert_eq!(id.lines().count(), 1);
    assert_eq!(id.trim().len(), 32);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bob added a device (device 2)"));
    let _bob3 = d.link(&bob, "bob-3");
    let out = stdout(&tidings(&alice, &["send", "bob", "three", "--json"]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["type"].as_str(), lines[0]["device"].as_u64()),
        (Some("notice"), Some(3))
    );
    assert_eq!(lines[1]["type"], "sent");
}

#[test]
fn a_passphrase_protects_the_keys() {
    let d = Daemon::start();
    let alice = d.profile("alice");
    let invite = d.invite(1).to_string();
    let run = |pass: Option<&str>, args: &[&str]| {
        let mut cmd = tidings_cmd(&alice);
        cmd.args(args);
        match pass {
            Some(p) => cmd.env("TIDINGS_PASSPHRASE", p),
            None => cmd.env_remove("TIDINGS_PASSPHRASE"),
        };
        cmd.output().unwrap()
    };
    stdout(&run(Some("s3cret"), &["register", &invite, "alice"]));
    let bob = d.user("bob");
    open(&bob).send("alice", "for your eyes").unwrap();
    let out = run(None, &["sync"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TIDINGS_PASSPHRASE"));
    let out = run(Some("guess"), &["sync"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    let out = stdout(&run(Some("s3cret"), &["sync"]));
    assert!(out.contains("for your eyes"), "{out}");
    // A profile made without a passphrase says so once, when it is made,
    // not on every command; it is encrypted once a passphrase is set.
    let carol = d.profile("carol");
    let out = tidings(&carol, &["register", &d.invite(1).to_string(), "carol"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unencrypted"));
    let out = tidings(&bob, &["history", "alice"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("unencrypted"));
    let out = tidings_cmd(&bob)
        .args(["history", "alice"])
        .env("TIDINGS_PASSPHRASE", "later")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = tidings(&bob, &["history", "alice"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TIDINGS_PASSPHRASE"));
}

/// Every 32-byte window of `bytes` tried as a Noise private key: whether
/// one authenticates to the daemon as a registered device.
fn any_window_authenticates(d: &Daemon, bytes: &[u8]) -> bool {
    use common::raw::RawClient;
    use tidings::noise::Keypair;
    use tidings::wire::{ClientFrame, ServerFrame};
    for w in bytes.windows(32) {
        let Some(key) = Keypair::from_private(w) else { continue };
        // The daemon takes 32 handshakes a second from one address: wait
        // for a token rather than count a refusal as an answer.
        let mut tries = 0;
        let mut raw = loop {
            match RawClient::connect(d.addr(), &d.server_key(), key.clone()) {
                Ok(raw) => break raw,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 50, "cannot connect: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        };
        if let Ok(ServerFrame::MyDevices { .. }) = raw.request(&ClientFrame::MyDevices, common::WAIT) {
            return true;
        }
    }
    false
}

#[test]
fn a_copied_profile_with_a_passphrase_cannot_authenticate_without_it() {
    let d = Daemon::start();
    let alice = d.profile("alice");
    let invite = d.invite(2).to_string();
    let out = tidings_cmd(&alice)
        .args(["register", &invite, "alice"])
        .env("TIDINGS_PASSPHRASE", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // An attacker's copy of the whole profile directory.
    let copy = d.profile("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in walk(&alice) {
        let rel = entry.strip_prefix(&alice).unwrap();
        if rel.as_os_str() == "lock" {
            continue;
        }
        let to = copy.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    for args in [&["devices"][..], &["link-code"], &["revoke", "1"], &["sync"]] {
        let out = tidings_cmd(&copy)
            .args(args)
            .env_remove("TIDINGS_PASSPHRASE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("TIDINGS_PASSPHRASE"),
            "{args:?}"
        );
    }
    // Nor does the key file hold the key for anyone who reads it by hand.
    let key_file = std::fs::read(copy.join("key")).unwrap();
    assert!(!any_window_authenticates(&d, &key_file));
    // With the passphrase, the copy is the device (what a passphrase
    // cannot help with).
    let out = tidings_cmd(&copy)
        .args(["devices"])
        .env("TIDINGS_PASSPHRASE", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Without a passphrase, the key file alone is the device: the control
    // that the check above can tell.
    let bob = d.profile("bob");
    let out = tidings_cmd(&bob)
        .args(["register", &invite, "bob"])
        .env_remove("TIDINGS_PASSPHRASE")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(any_window_authenticates(&d, &std::fs::read(bob.join("key")).unwrap()));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_receiver_killed_mid_stream_loses_nothing_and_keeps_its_sessions() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    const N: usize = 600;
    let sender = {
        let alice = alice.clone();
        std::thread::spawn(move || {
            let mut a = open(&alice);
            for i in 0..N {
                a.send("bob", &format!("m{i}")).unwrap();
            }
        })
    };
    // SIGKILL bob's listener three times while messages stream in (or wait
    // in his queue), each time right after it printed its 60th message, so
    // while it decrypts, stores and acks the next ones.
    for _ in 0..3 {
        let listener = Listener::start(&bob);
        for _ in 0..60 {
            listener.next("60 lines");
        }
        drop(listener);
    }
    sender.join().unwrap();
    sync(&bob);
    let h = open(&bob).history("alice").unwrap();
    assert!(
        h.iter().all(|m| !m.undecryptable),
        "{:?}",
        h.iter().filter(|m| m.undecryptable).count()
    );
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        texts(&h),
        want.iter().map(String::as_str).collect::<Vec<_>>(),
        "all, once, in order"
    );
    // The sessions survived: both ways still work.
    open(&bob).send("alice", "still here").unwrap();
    assert_eq!(texts(&messages(&sync(&alice))), ["still here"]);
    open(&alice).send("bob", "me too").unwrap();
    assert_eq!(texts(&messages(&sync(&bob))), ["me too"]);
}
