//! End-to-end encryption through the real `tidingsd`: several devices per
//! user, what the server and the wire can see, device changes while a
//! sender is offline, one-time keys handed out once, undecryptable bodies
//! and session resets, identity warnings and safety numbers.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidings::client::e2e::Known;
use tidings::client::{self, Client, Code, Event, Message, Notice, Profile};
use tidings::wire::{DeviceAddr, DeviceId, ErrorCode};

const WAIT: Duration = Duration::from_secs(20);

/// A running daemon with its own data directory, killed on drop.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    /// Where it listens.
    listen: String,
}

impl Daemon {
    /// A daemon on a loopback port; invites carry `public` if given.
    fn start(public: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidingsd"));
        cmd.arg("--data-dir").arg(dir.path().join("data"));
        cmd.args(["--listen", "127.0.0.1:0"]);
        if let Some(p) = public {
            cmd.args(["--public-addr", p]);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let listen = first.strip_prefix("tidingsd listening on ").unwrap().to_owned();
        std::thread::spawn(move || for _ in lines {});
        let deadline = Instant::now() + WAIT;
        while !dir.path().join("data").join("admin.sock").exists() {
            assert!(Instant::now() < deadline, "the daemon never opened its admin socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, dir, listen }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn invite(&self) -> Code {
        let out = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
            .args(["invite", "--uses", "50", "--data-dir"])
            .arg(self.data())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        Code::parse(text.lines().last().unwrap()).unwrap()
    }

    fn profile(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A registered profile named after its user.
    fn user(&self, name: &str) -> PathBuf {
        let dir = self.profile(name);
        open(&dir).register(&self.invite(), name).unwrap();
        dir
    }

    /// A new device of the account of `existing`, in profile `name`.
    fn link(&self, existing: &Path, name: &str) -> PathBuf {
        let dir = self.profile(name);
        let (code, _) = open(existing).link_code().unwrap();
        open(&dir).link(&code).unwrap();
        dir
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open(dir: &Path) -> Client {
    Client::new(Profile::open(dir, Duration::from_secs(10)).unwrap(), true)
}

/// Syncs `dir`; returns the events (messages and notices) in order.
fn sync(dir: &Path) -> Vec<Event> {
    let mut c = open(dir);
    let mut got = Vec::new();
    c.sync_events(&mut |e| got.push(e.clone())).unwrap();
    got
}

fn messages(events: &[Event]) -> Vec<Message> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn texts(msgs: &[Message]) -> Vec<&str> {
    msgs.iter().map(|m| m.text.as_str()).collect()
}

fn notices(c: &mut Client) -> Vec<Notice> {
    let mut out = Vec::new();
    while let Some(e) = c.poll_event() {
        if let Event::Notice(n) = e {
            out.push(n);
        }
    }
    out
}

fn addr(user: &str, device: u32) -> DeviceAddr {
    DeviceAddr {
        user: user.into(),
        device: DeviceId(device),
    }
}

#[test]
fn two_users_with_two_devices_each_see_the_whole_conversation() {
    let d = Daemon::start(None);
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
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
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
    let mut d = Daemon::start(Some(&proxy_addr));
    let proxy = Proxy::start(listener, d.listen.clone());
    assert_eq!(d.invite().addr, proxy.addr, "clients connect through the proxy");
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
    d.stop();
    let data = all_bytes(&d.data());
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
