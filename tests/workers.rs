//! Issue 6: with `--workers 2`, messages between devices on different
//! event loops arrive once and in order; and a daemon started only from a
//! TOML file serves, while a typo in a key stops it naming the key.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Daemon;
use common::raw::RawClient;
use tidings::client::Code;
use tidings::noise::Keypair;
use tidings::wire::{Body, ClientFrame, DeviceId, MsgId, Send, ServerFrame};

const USERS: usize = 8;
const MESSAGES: usize = 200;

/// Which loop each user's device 1 is on, from `tidingsd devices`.
fn loops(daemon: &Daemon, users: &[String]) -> BTreeMap<String, Option<u32>> {
    users
        .iter()
        .map(|u| {
            let lines = daemon.operator(&["devices", u]);
            let line = lines.first().cloned().unwrap_or_default();
            let l = line
                .split("online (loop ")
                .nth(1)
                .and_then(|r| r.trim_end_matches(')').parse().ok());
            (u.clone(), l)
        })
        .collect()
}

#[test]
fn two_loops_deliver_once_and_in_order() {
    let daemon = Daemon::start_with(&["--workers", "2"]);
    let invite = daemon.invite(USERS as u32);
    let names: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    let mut keys: Vec<Keypair> = Vec::new();
    let mut clients: Vec<RawClient> = Vec::new();
    for n in &names {
        let r = RawClient::register(daemon.addr(), &invite, n).expect("register");
        keys.push(r.client.key().clone());
        clients.push(r.client);
    }
    // Reconnect until both loops hold devices and some sender's recipient
    // is on the other loop (the kernel picks which loop accepts).
    let mut placed = loops(&daemon, &names);
    for attempt in 0..50 {
        let on: Vec<Option<u32>> = names.iter().map(|n| placed[n]).collect();
        let cross =
            (0..USERS).any(|i| on[i].is_some() && on[(i + 1) % USERS].is_some() && on[i] != on[(i + 1) % USERS]);
        if cross {
            break;
        }
        assert!(attempt < 49, "connections never spread over both loops: {placed:?}");
        let i = attempt % USERS;
        let key = keys[i].clone();
        let _ = std::mem::replace(
            &mut clients[i],
            RawClient::connect(daemon.addr(), &invite.server_key, key).unwrap(),
        );
        std::thread::sleep(Duration::from_millis(50));
        placed = loops(&daemon, &names);
    }
    eprintln!("placement: {placed:?}");
    // Each user sends MESSAGES to the next one, pipelined.
    for (i, c) in clients.iter_mut().enumerate() {
        for m in 0..MESSAGES {
            let frame = ClientFrame::Send(Send {
                id: msg_id(i, m),
                to: names[(i + 1) % USERS].clone(),
                bodies: vec![Body {
                    device: DeviceId(1),
                    data: Bytes::from(format!("{i}:{m}")),
                }],
                own: vec![],
            });
            let req = c.next_req();
            c.queue(req, &frame);
        }
        c.flush().expect("send");
    }
    // Everyone collects: accepted answers for what they sent, deliveries
    // from their predecessor, acking as they go.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut accepted = [0usize; USERS];
    let mut got: Vec<Vec<usize>> = vec![Vec::new(); USERS];
    while Instant::now() < deadline
        && (accepted.iter().any(|&a| a < MESSAGES) || got.iter().any(|g| g.len() < MESSAGES))
    {
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some((_, frame)) = c.recv(Duration::from_millis(5)).expect("recv") {
                match frame {
                    ServerFrame::Accepted { .. } => accepted[i] += 1,
                    ServerFrame::Deliver(d) => {
                        let text = String::from_utf8(d.body.to_vec()).unwrap();
                        let (from, m) = text.split_once(':').unwrap();
                        assert_eq!(from.parse::<usize>().unwrap(), (i + USERS - 1) % USERS);
                        got[i].push(m.parse().unwrap());
                        c.send(&ClientFrame::Ack { up_to: d.seq }).expect("ack");
                    }
                    ServerFrame::QueueDrained | ServerFrame::Pong => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
    for i in 0..USERS {
        assert_eq!(accepted[i], MESSAGES, "user{i} accepted");
        assert_eq!(
            got[i],
            (0..MESSAGES).collect::<Vec<_>>(),
            "user{i} got every message once, in order"
        );
    }
}

fn msg_id(i: usize, m: usize) -> MsgId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    id[8..].copy_from_slice(&(m as u64).to_be_bytes());
    MsgId(id)
}

#[test]
fn a_daemon_runs_from_its_config_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidingsd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nworkers = 2\n[timeouts]\nidle = \"2m\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr: std::net::SocketAddr = first
        .trim()
        .strip_prefix("tidingsd listening on ")
        .unwrap()
        .parse()
        .unwrap();
    // Operator commands find the data directory through the same file.
    let invite = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
        .arg("invite")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(invite.status.success(), "{}", String::from_utf8_lossy(&invite.stderr));
    let code = Code::parse(String::from_utf8(invite.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(code.addr, addr.to_string());
    let mut alice = RawClient::register(addr, &code, "alice")
        .expect("the daemon serves")
        .client;
    assert_eq!(
        alice.request(&ClientFrame::Ping, Duration::from_secs(5)).unwrap(),
        ServerFrame::Pong
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_typo_in_the_config_file_stops_the_daemon_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("listn = \"127.0.0.1:0\"\n", "listn"),
        ("[limits]\ndelivery_windw = 4\n", "delivery_windw"),
        ("[retention]\nperiod = \"soon\"\n", "period"),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty(), "nothing on stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains("bad.toml"), "names the file: {err}");
    }
}
