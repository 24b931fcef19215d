//! Crash test of the first guarantee, "nothing acknowledged is lost"
//! (DESIGN.md; issue 3): the real `tidingsd`, killed with SIGKILL at
//! random moments while a sender has sends in flight.
//!
//! Each round, on one data directory that lives across rounds (so later
//! rounds crash a database that already recovered from a crash):
//! 1. a sender and a recipient register; the recipient hangs up;
//! 2. the sender pipelines [`MESSAGES`] `Send`s to the recipient (distinct
//!    ids, the body is the message's index, at most [`WINDOW`] without an
//!    answer) and notes which got `Accepted`;
//! 3. once a random number of them are accepted, and after a further random
//!    delay, the daemon is killed with SIGKILL;
//! 4. it restarts on the same data directory and port; in odd rounds the
//!    sender reconnects and sends every message not accepted again, same
//!    id and body (a retry), and must get `Accepted` for all; in even
//!    rounds it does not come back;
//! 5. the recipient connects and takes its queue up to `QueueDrained`,
//!    acking as it goes.
//!
//! Checked: every message the sender saw accepted is delivered; nothing is
//! delivered twice (one id, one delivery); deliveries come in send order
//! (indices and queue sequence numbers strictly increase); nothing is
//! delivered that was never sent, and each body matches its id; with
//! retries, all of them arrive; and after the acks a reconnecting recipient
//! finds its queue empty.
//!
//! The kill points come from a xorshift generator seeded from the clock,
//! or from `TIDINGS_CRASH_SEED` to replay a failure; the seed is printed
//! (run with `--nocapture` to see it on success too).
//! `TIDINGS_CRASH_ROUNDS=100` soaks it with more kill points.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Daemon;
use common::raw::{ClientError, RawClient};
use tidings::noise::{Keypair, PublicKey};
use tidings::wire::{Body, ClientFrame, DeviceId, MsgId, Send, ServerFrame};

/// Messages a round's sender sends.
const MESSAGES: usize = 2000;
/// Most sends in flight without an answer.
const WINDOW: usize = 64;
/// Kill points in one run, unless `TIDINGS_CRASH_ROUNDS` says otherwise
/// (for soaking).
const ROUNDS: u32 = 4;
/// How long any expected frame may take.
const PATIENCE: Duration = Duration::from_secs(20);
/// The recipient acks after this many deliveries (and at the end).
const ACK_EVERY: usize = 16;

/// xorshift64*: enough to pick kill points reproducibly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("TIDINGS_CRASH_SEED") {
        Ok(s) => s.trim().parse().expect("TIDINGS_CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// The id of message `index` of round `round`.
fn msg_id(round: u32, index: usize) -> MsgId {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(b"crsh");
    id[4..8].copy_from_slice(&round.to_be_bytes());
    id[8..].copy_from_slice(&(index as u64).to_be_bytes());
    MsgId(id)
}

fn send_frame(round: u32, to: &str, index: usize) -> ClientFrame {
    ClientFrame::Send(Send {
        id: msg_id(round, index),
        to: to.into(),
        bodies: vec![Body {
            device: DeviceId(1),
            data: Bytes::copy_from_slice(&(index as u32).to_be_bytes()),
        }],
        own: vec![],
    })
}

/// What a sender saw.
#[derive(Default)]
struct Sent {
    /// Indices written to the socket.
    sent: BTreeSet<usize>,
    /// Indices answered `Accepted`.
    accepted: BTreeSet<usize>,
    /// Why it stopped early, if it did.
    stopped: Option<String>,
}

/// Sends `indices` in order with at most [`WINDOW`] unanswered, until all
/// are accepted or the connection dies. `progress` counts acceptances.
/// After a failed write it still reads what the server sent before it
/// closed (the last answers and its `Close`).
fn pump_sends(client: &mut RawClient, round: u32, to: &str, indices: &[usize], progress: &AtomicUsize, out: &mut Sent) {
    let mut next = 0;
    let mut in_flight: HashMap<u32, usize> = HashMap::new();
    let mut write_failed = None;
    let result = (|| -> Result<(), ClientError> {
        while next < indices.len() || !in_flight.is_empty() {
            while write_failed.is_none() && next < indices.len() && in_flight.len() < WINDOW {
                let i = indices[next];
                let req = client.next_req();
                // Counted as sent before the write: a failed write may
                // still have reached the server.
                out.sent.insert(i);
                in_flight.insert(req, i);
                next += 1;
                if let Err(e) = client.send(&send_frame(round, to, i)) {
                    write_failed = Some(e);
                }
            }
            let (req, frame) = match client.expect_frame(PATIENCE) {
                Ok(f) => f,
                Err(e) => {
                    return Err(match write_failed.take() {
                        Some(w) => ClientError::Protocol(format!("{w}, then {e}")),
                        None => e,
                    });
                }
            };
            match frame {
                ServerFrame::Accepted { id, .. } => {
                    let i = in_flight
                        .remove(&req)
                        .unwrap_or_else(|| panic!("Accepted for request {req}, which is not in flight"));
                    assert_eq!(id, msg_id(round, i), "Accepted names another message");
                    out.accepted.insert(i);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                ServerFrame::QueueDrained | ServerFrame::Ping | ServerFrame::KeyCount { .. } => {}
                ServerFrame::Close { code, text } => {
                    return Err(ClientError::Protocol(format!("closed: {code} {text}")));
                }
                other => panic!("round {round}: unexpected answer to a send: {other:?}"),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        out.stopped = Some(e.to_string());
    }
}

/// A recipient's drain: the indices in delivery order, checked as they
/// come.
fn drain(addr: std::net::SocketAddr, server: &PublicKey, key: &Keypair, round: u32, from: &str) -> Vec<usize> {
    let mut client = RawClient::connect(addr, server, key.clone()).expect("recipient reconnects");
    let mut got = Vec::new();
    let mut ids = BTreeSet::new();
    let mut last_seq = 0;
    let mut unacked = 0;
    loop {
        let (_, frame) = client
            .expect_frame(PATIENCE)
            .unwrap_or_else(|e| panic!("round {round}: recipient after {} deliveries: {e}", got.len()));
        match frame {
            ServerFrame::Deliver(d) => {
                assert!(d.seq > last_seq, "round {round}: seq {} after {last_seq}", d.seq);
                last_seq = d.seq;
                assert_eq!(d.from.user, from);
                assert_eq!(d.from.device, DeviceId(1));
                let index = u32::from_be_bytes(d.body[..].try_into().expect("a 4-byte body")) as usize;
                assert_eq!(d.id, msg_id(round, index), "round {round}: body and id disagree");
                assert!(ids.insert(d.id), "round {round}: message {index} delivered twice");
                got.push(index);
                unacked += 1;
                if unacked == ACK_EVERY {
                    client.send(&ClientFrame::Ack { up_to: d.seq }).expect("ack");
                    unacked = 0;
                }
            }
            ServerFrame::QueueDrained => break,
            ServerFrame::Ping | ServerFrame::KeyCount { .. } => {}
            other => panic!("round {round}: recipient got {other:?}"),
        }
    }
    client.send(&ClientFrame::Ack { up_to: last_seq }).expect("ack");
    // Nothing more may come: nobody sends now.
    if let Some((_, f)) = client.recv(Duration::from_millis(200)).expect("recipient connection") {
        assert!(
            !matches!(f, ServerFrame::Deliver(_)),
            "round {round}: a delivery after QueueDrained: {f:?}"
        );
    }
    // Ack answers nothing; a ping round trip shows the server handled it.
    assert_eq!(
        client.request(&ClientFrame::Ping, PATIENCE).expect("pong"),
        ServerFrame::Pong
    );
    client.hang_up();
    got
}

/// How a round stops the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGKILL: nothing runs after it.
    Kill,
    /// SIGTERM: the daemon finishes its flushes and closes cleanly.
    Term,
}

/// One round on `daemon`: register, send, stop the daemon at a random
/// moment, restart, retry (if `retry`), drain and check. Returns the
/// indices the sender saw accepted and those delivered, in order.
fn round(daemon: &mut Daemon, rng: &mut Rng, seed: u64, round: u32, stop: Stop, retry: bool) -> (Sent, Vec<usize>) {
    let (sender_name, recipient_name) = (format!("sender{round}"), format!("recipient{round}"));
    let invite = daemon.invite(2);
    let addr = daemon.addr();
    let server = daemon.server_key();
    let sender = RawClient::register(addr, &invite, &sender_name).expect("sender registers");
    let recipient = RawClient::register(addr, &invite, &recipient_name).expect("recipient registers");
    let recipient_key = recipient.client.key().clone();
    recipient.client.hang_up();
    let sender_key = sender.client.key().clone();

    // Stop once `threshold` sends are accepted, plus `delay`.
    let threshold = rng.below(MESSAGES as u64 * 9 / 10) as usize;
    let delay = Duration::from_micros(rng.below(3000));
    eprintln!("round {round}: {stop:?} after {threshold} accepted + {delay:?}; retry after restart: {retry}");

    let progress = Arc::new(AtomicUsize::new(0));
    let thread = {
        let progress = progress.clone();
        let to = recipient_name.clone();
        let mut client = sender.client;
        std::thread::spawn(move || {
            let mut out = Sent::default();
            let all: Vec<usize> = (0..MESSAGES).collect();
            pump_sends(&mut client, round, &to, &all, &progress, &mut out);
            (out, Instant::now())
        })
    };
    let wait_until = Instant::now() + PATIENCE * 3;
    while progress.load(Ordering::SeqCst) < threshold && !thread.is_finished() {
        assert!(
            Instant::now() < wait_until,
            "round {round}: the sender makes no progress"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
    std::thread::sleep(delay);
    let stopped_daemon_at = Instant::now();
    match stop {
        Stop::Kill => daemon.kill9(),
        Stop::Term => {
            let status = daemon.stop();
            assert!(
                status.success(),
                "round {round}: tidingsd exited with {status}\n{}",
                daemon.log()
            );
        }
    }
    let (mut seen, stopped_at) = thread.join().expect("sender thread");
    if let Some(why) = &seen.stopped {
        assert!(
            stopped_at >= stopped_daemon_at,
            "round {round}: the sender failed before the daemon stopped: {why}\n{}",
            daemon.log()
        );
        if stop == Stop::Term {
            assert!(why.contains("SHUTTING_DOWN"), "round {round}: not a clean close: {why}");
        }
    }
    eprintln!(
        "round {round}: {} sent, {} accepted before the stop ({})",
        seen.sent.len(),
        seen.accepted.len(),
        seen.stopped.as_deref().unwrap_or("all done first")
    );
    assert!(seen.accepted.is_subset(&seen.sent));

    daemon.restart();
    assert_eq!(daemon.server_key(), server, "the server key survives");
    if retry {
        let mut client = RawClient::connect(addr, &server, sender_key).expect("sender reconnects");
        let missing: Vec<usize> = (0..MESSAGES).filter(|i| !seen.accepted.contains(i)).collect();
        let mut again = Sent::default();
        pump_sends(
            &mut client,
            round,
            &recipient_name,
            &missing,
            &AtomicUsize::new(0),
            &mut again,
        );
        assert!(
            again.stopped.is_none(),
            "round {round}: retrying after the restart failed: {:?}\n{}",
            again.stopped,
            daemon.log()
        );
        assert_eq!(again.accepted.len(), missing.len());
        seen.sent.extend(again.sent);
        seen.accepted.extend(again.accepted);
        client.hang_up();
    }

    let got = drain(addr, &server, &recipient_key, round, &sender_name);
    let delivered: BTreeSet<usize> = got.iter().copied().collect();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "round {round} (seed {seed}): out of order: {:?}",
        got.windows(2).find(|w| w[0] >= w[1])
    );
    let lost: Vec<usize> = seen.accepted.difference(&delivered).copied().collect();
    assert!(
        lost.is_empty(),
        "round {round} (seed {seed}): {} accepted messages lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        delivered.is_subset(&seen.sent),
        "round {round}: delivered what was never sent"
    );
    if retry {
        assert_eq!(
            got,
            (0..MESSAGES).collect::<Vec<_>>(),
            "round {round}: with retries, all arrive"
        );
    }
    eprintln!(
        "round {round}: {} delivered ({} accepted, {} stored but unanswered)",
        got.len(),
        seen.accepted.len(),
        got.len() - seen.accepted.len()
    );

    // The acks took: the queue is empty now.
    let again = drain(addr, &server, &recipient_key, round, &sender_name);
    assert!(
        again.is_empty(),
        "round {round}: {} redelivered after acks",
        again.len()
    );
    (seen, got)
}

/// What a recipient that stayed connected saw: `(seq, index)` per
/// delivery, in order, on each of its connections.
type Deliveries = Vec<Vec<(u64, usize)>>;

/// An online recipient: reads and acks as a client does, now and then
/// pausing longer than the daemon's write delay (so that some copies are
/// acknowledged before any write and others spill to disk), until the
/// connection dies.
fn live_recipient(
    addr: std::net::SocketAddr,
    server: PublicKey,
    key: Keypair,
    round: u32,
    seed: u64,
) -> std::thread::JoinHandle<Vec<(u64, usize)>> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ u64::from(round) ^ 0x5eed);
        let mut client = RawClient::connect(addr, &server, key).expect("recipient connects");
        let mut got = Vec::new();
        let mut unacked = 0;
        loop {
            let frame = match client.recv(Duration::from_secs(30)) {
                Ok(Some((_, f))) => f,
                Ok(None) | Err(_) => return got,
            };
            if let ServerFrame::Deliver(d) = frame {
                let index = u32::from_be_bytes(d.body[..].try_into().expect("a 4-byte body")) as usize;
                assert_eq!(d.id, msg_id(round, index), "round {round}: body and id disagree");
                got.push((d.seq, index));
                unacked += 1;
                if unacked == ACK_EVERY {
                    if client.send(&ClientFrame::Ack { up_to: d.seq }).is_err() {
                        return got;
                    }
                    unacked = 0;
                    if rng.below(8) == 0 {
                        // Slower than the write delay: these copies spill.
                        std::thread::sleep(Duration::from_millis(rng.below(120)));
                    }
                }
            }
        }
    })
}

/// Issue 9: the crash test with the fast path in play. The recipient is
/// connected while the sender sends, so some copies are acknowledged
/// before any write and never written, others spill to disk; the daemon
/// is killed at a random moment, restarts, the sender retries in odd
/// rounds, and the recipient drains what is left. Checked: every message
/// accepted (before the kill or on a retry) reached the recipient, live
/// or after the restart; a message accepted before the kill never arrives
/// as two different copies (a redelivery has the same `seq`: its ack was
/// lost in the kill); on each connection sequences increase and the
/// messages accepted before the kill come in the order they were sent;
/// nothing arrives that was never sent; and the acks of the drain took.
fn online_round(daemon: &mut Daemon, rng: &mut Rng, seed: u64, round: u32, retry: bool) {
    let (sender_name, recipient_name) = (format!("sender{round}"), format!("recipient{round}"));
    let invite = daemon.invite(2);
    let addr = daemon.addr();
    let server = daemon.server_key();
    let sender = RawClient::register(addr, &invite, &sender_name).expect("sender registers");
    let recipient = RawClient::register(addr, &invite, &recipient_name).expect("recipient registers");
    let recipient_key = recipient.client.key().clone();
    recipient.client.hang_up();
    let sender_key = sender.client.key().clone();
    let live = live_recipient(addr, server, recipient_key.clone(), round, seed);
    // The recipient is online before the first send.
    std::thread::sleep(Duration::from_millis(100));

    let threshold = rng.below(MESSAGES as u64 * 9 / 10) as usize;
    let delay = Duration::from_micros(rng.below(3000));
    eprintln!("online round {round}: kill after {threshold} accepted + {delay:?}; retry after restart: {retry}");
    let progress = Arc::new(AtomicUsize::new(0));
    let thread = {
        let progress = progress.clone();
        let to = recipient_name.clone();
        let mut client = sender.client;
        std::thread::spawn(move || {
            let mut out = Sent::default();
            let all: Vec<usize> = (0..MESSAGES).collect();
            pump_sends(&mut client, round, &to, &all, &progress, &mut out);
            out
        })
    };
    let wait_until = Instant::now() + PATIENCE * 3;
    while progress.load(Ordering::SeqCst) < threshold && !thread.is_finished() {
        assert!(Instant::now() < wait_until, "online round {round}: no progress");
        std::thread::sleep(Duration::from_micros(100));
    }
    std::thread::sleep(delay);
    daemon.kill9();
    let mut seen = thread.join().expect("sender thread");
    let before: BTreeSet<usize> = seen.accepted.clone();
    let mut connections: Deliveries = vec![live.join().expect("recipient thread")];

    daemon.restart();
    if retry {
        let mut client = RawClient::connect(addr, &server, sender_key).expect("sender reconnects");
        let missing: Vec<usize> = (0..MESSAGES).filter(|i| !seen.accepted.contains(i)).collect();
        let mut again = Sent::default();
        pump_sends(
            &mut client,
            round,
            &recipient_name,
            &missing,
            &AtomicUsize::new(0),
            &mut again,
        );
        assert!(
            again.stopped.is_none(),
            "online round {round}: retry failed: {:?}",
            again.stopped
        );
        seen.sent.extend(again.sent);
        seen.accepted.extend(again.accepted);
        client.hang_up();
    }
    // The drain, keeping the seq of each delivery.
    let mut client = RawClient::connect(addr, &server, recipient_key.clone()).expect("recipient reconnects");
    let mut drained = Vec::new();
    let mut last = 0;
    loop {
        match client.expect_frame(PATIENCE).expect("drain") {
            (_, ServerFrame::Deliver(d)) => {
                let index = u32::from_be_bytes(d.body[..].try_into().expect("a 4-byte body")) as usize;
                assert_eq!(d.id, msg_id(round, index));
                drained.push((d.seq, index));
                last = d.seq;
                if drained.len() % ACK_EVERY == 0 {
                    client.send(&ClientFrame::Ack { up_to: d.seq }).expect("ack");
                }
            }
            (_, ServerFrame::QueueDrained) => break,
            _ => {}
        }
    }
    if last > 0 {
        client.send(&ClientFrame::Ack { up_to: last }).expect("ack");
    }
    assert_eq!(
        client.request(&ClientFrame::Ping, PATIENCE).expect("pong"),
        ServerFrame::Pong
    );
    client.hang_up();
    connections.push(drained);

    let case = format!("online round {round} (seed {seed})");
    let mut seqs: HashMap<usize, BTreeSet<u64>> = HashMap::new();
    for conn in &connections {
        assert!(conn.windows(2).all(|w| w[0].0 < w[1].0), "{case}: seq order {conn:?}");
        let firsts: Vec<usize> = conn.iter().map(|d| d.1).filter(|i| before.contains(i)).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "{case}: out of order {firsts:?}"
        );
        for &(seq, i) in conn {
            assert!(seen.sent.contains(&i), "{case}: {i} was never sent");
            seqs.entry(i).or_default().insert(seq);
        }
    }
    let lost: Vec<usize> = seen
        .accepted
        .iter()
        .filter(|i| !seqs.contains_key(i))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{case}: {} accepted messages lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let twice: Vec<usize> = before.iter().filter(|i| seqs[i].len() > 1).copied().collect();
    assert!(
        twice.is_empty(),
        "{case}: accepted messages delivered as two copies: {twice:?}"
    );
    eprintln!(
        "{case}: {} accepted before the kill, {} delivered live, {} after the restart",
        before.len(),
        connections[0].len(),
        connections[1].len()
    );
    let again = drain(addr, &server, &recipient_key, round, &sender_name);
    assert!(again.is_empty(), "{case}: {} redelivered after acks", again.len());
}

#[test]
fn nothing_accepted_is_lost_across_sigkill_with_the_recipient_online() {
    online_rounds(&["--workers", "1"]);
}

#[test]
fn nothing_accepted_is_lost_across_sigkill_with_the_recipient_online_and_two_loops() {
    online_rounds(&["--workers", "2"]);
}

/// A daemon with `args` (`--workers N` only) whose per-device send rate
/// does not stop the test's senders: they send as fast as the daemon
/// answers, which is what the crash must meet.
fn start(args: &[&str]) -> Daemon {
    let mut toml = String::new();
    if let [flag, n] = args {
        assert_eq!(*flag, "--workers");
        toml.push_str(&format!("workers = {n}\n"));
    }
    toml.push_str("[limits]\nsends_per_minute = 100000000\nsend_burst = 1000000\n");
    toml.push_str("writes_per_minute = 100000000\nwrite_burst = 1000000\n");
    Daemon::start_with_config(&toml)
}

fn online_rounds(args: &[&str]) {
    let seed = seed();
    eprintln!("online crash test {args:?} seed {seed} (replay with TIDINGS_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mut daemon = start(args);
    let rounds = std::env::var("TIDINGS_CRASH_ROUNDS")
        .ok()
        .map(|r| r.trim().parse().expect("TIDINGS_CRASH_ROUNDS is a number"))
        .unwrap_or(ROUNDS);
    for r in 0..rounds {
        online_round(&mut daemon, &mut rng, seed, r, r % 2 == 1);
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
}

#[test]
fn nothing_accepted_is_lost_across_sigkill() {
    crash_rounds(&["--workers", "1"]);
}

/// The same with two event loops (issue 6): sender and recipient may be on
/// different loops, and acks cross the flusher's wake-up of both.
#[test]
fn nothing_accepted_is_lost_across_sigkill_with_two_loops() {
    crash_rounds(&["--workers", "2"]);
}

fn crash_rounds(args: &[&str]) {
    let seed = seed();
    eprintln!("crash test {args:?} seed {seed} (replay with TIDINGS_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut daemon = start(args);
    let rounds = std::env::var("TIDINGS_CRASH_ROUNDS")
        .ok()
        .map(|r| r.trim().parse().expect("TIDINGS_CRASH_ROUNDS is a number"))
        .unwrap_or(ROUNDS);
    for r in 0..rounds {
        round(&mut daemon, &mut rng, seed, r, Stop::Kill, r % 2 == 1);
    }
    // A clean stop after all that.
    assert!(daemon.stop().success(), "{}", daemon.log());
    eprintln!("crash test done in {:?}", started.elapsed());
}

/// SIGTERM "finishes in-flight flushes and closes connections cleanly"
/// (issue 3): whatever the daemon stored before it stopped reading, the
/// sender was told `Accepted` for, before the `Close`.
#[test]
fn sigterm_answers_everything_it_stored() {
    let seed = seed();
    eprintln!("sigterm test seed {seed} (replay with TIDINGS_CRASH_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mut daemon = start(&[]);
    for r in 0..2 {
        let (seen, got) = round(&mut daemon, &mut rng, seed, r, Stop::Term, false);
        let delivered: BTreeSet<usize> = got.into_iter().collect();
        let unanswered: Vec<usize> = delivered.difference(&seen.accepted).copied().collect();
        assert!(
            unanswered.is_empty(),
            "round {r} (seed {seed}): {} messages stored but not answered before the close, first {:?}",
            unanswered.len(),
            &unanswered[..unanswered.len().min(10)]
        );
    }
    assert!(daemon.stop().success(), "{}", daemon.log());
}
