//! `tidings-load`: a load generator for a running `tidingsd`.
//!
//! It opens N registered devices (registering the missing ones through an
//! invite with many uses, and saving their keys so that later runs reuse
//! them), lets devices 2i send to 2i+1 for the first P pairs while the rest
//! stay connected and idle, and reports delivered messages per second,
//! send-to-delivery latency percentiles, the daemon's CPU time per
//! delivered message (user + system from `/proc/PID/stat` across the
//! measured window) and its resident memory. With `--group-size N` the
//! devices are dealt into groups of N instead, and the first member of
//! each sending group sends to its group (one `GroupSend`, fanned out by
//! the daemon to the N-1 others). With `--mqtt` it measures an
//! MQTT broker the same way; with `--late-receivers` half the receivers
//! connect only after the traffic, so that the daemon's queues fill.
//!
//! Every device is the library's sans-I/O [`Conn`], driven by `mio` in a
//! few threads (non-blocking sockets, no thread per connection). Bodies are
//! raw bytes: the relay never looks inside them, so they need not be Olm
//! ciphertext; the first 16 bytes carry a run nonce and the send time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tidings::client::conn::{Conn, ConnConfig};
use tidings::code::Code;
use tidings::noise::{Keypair, PublicKey};
use tidings::wire::{self, ErrorCode, MsgId};

mod link;

use link::{Ev, Link, MqttLink, TidingsLink};

const AFTER_HELP: &str = "\
Bodies are raw bytes (--size of them; the first 16 carry a run nonce and the send time): \
the daemon relays ciphertext it cannot read, so it does not care that these are not Olm \
messages. Latency is measured from the moment a Send is written to the moment its Deliver \
is read, on one clock (the load generator's). The daemon's CPU time (user + system, all its \
threads, from /proc/PID/stat) over the measured window, divided by the messages delivered in \
it, is the CPU time per message: on a shared machine it moves far less than the rates.

The daemon limits new connections per source address (limits.handshakes_per_second_per_ip, \
default 32) and open connections per address (limits.connections_per_ip, default 256). \
Every device here comes from 127.0.0.1, so for more than 256 devices start the daemon \
with a config that raises them, e.g.

    [limits]
    connections_per_ip = 100000
    handshakes_per_second_per_ip = 100000

and pass a matching --connect-rate. Each device is one socket here and one in the daemon: \
`ulimit -n` must exceed --devices in both processes.

Devices are registered through --invite (make one with `tidingsd invite --uses N`) unless \
--devices-file already holds enough of them; newly registered ones are appended to that file \
(private keys: mode 0600), so later runs connect without registering.";

/// A load generator for tidingsd.
#[derive(Parser, Debug)]
#[command(name = "tidings-load", version, after_help = AFTER_HELP, args_override_self = true)]
struct Args {
    /// host:port of the daemon [default: the invite's or the devices file's address].
    #[arg(long)]
    addr: Option<String>,
    /// An invite code (tidingsd invite --uses N) to register missing devices.
    #[arg(long)]
    invite: Option<String>,
    /// The daemon's static key in hex, when neither an invite nor a devices
    /// file gives it.
    #[arg(long)]
    server_key: Option<String>,
    /// Number of connected devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// A JSON file of registered devices: read if it exists, written with any
    /// newly registered ones.
    #[arg(long)]
    devices_file: Option<PathBuf>,
    /// Sending pairs (device 2i sends to 2i+1); the other devices stay idle.
    /// 0 only connects the devices (for the daemon's memory per idle
    /// connection; give --duration 0s --warmup 0s).
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// Half the receivers (those of pairs 0, 2, 4, ...) stay offline while
    /// the others send, so that their messages wait in the daemon's queues
    /// (the spill path), and connect once the traffic ends; the run then
    /// waits up to --drain-timeout for their backlog. A send refused because
    /// such a queue is full (QUOTA_EXCEEDED) is counted, not an error, and
    /// its sender pauses for a second.
    #[arg(long, conflicts_with = "mqtt")]
    late_receivers: bool,
    /// Messages per second in total; 0 sends as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Sends per sender that may wait for `Accepted`.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Body size in bytes (at least 16).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Traffic before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// New connections per second (stay under the daemon's
    /// limits.handshakes_per_second_per_ip); 0 for no limit.
    #[arg(long, default_value_t = 30.0)]
    connect_rate: f64,
    /// Event-loop threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The daemon's process id, for its RSS [default: the process listening
    /// on --addr's port, found through /proc].
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Idle time between all devices connected and reading the RSS.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Longest wait, before connecting, for the daemon's RSS to hold still
    /// (a daemon that just started may still be filling its caches).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    baseline_wait: Duration,
    /// Longest wait, after the measurement, for outstanding messages.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Group mode: deal the devices into groups of N members (one device
    /// each, 2 to 1024; the daemon's groups.max_members must allow N), and
    /// let the first member of each of the first --groups groups send to
    /// its group: one GroupSend a message, which the daemon fans out to the
    /// N-1 other member devices. Rates and latencies are then per member
    /// device delivery; --pairs is not used. The groups are created in the
    /// warm-up (their ids follow from the sender's name and N, so a later
    /// run with the same devices file reuses them).
    #[arg(long, conflicts_with_all = ["mqtt", "late_receivers"])]
    group_size: Option<usize>,
    /// Sending groups in group mode.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Measure an MQTT broker instead (QoS 1, each device subscribed to its
    /// own name; --addr defaults to 127.0.0.1:1883), for comparison.
    #[arg(long, conflicts_with_all = ["invite", "server_key", "devices_file"])]
    mqtt: bool,
}

// ---------------------------------------------------------------------------
// The devices file.

#[derive(Serialize, Deserialize)]
struct DevicesFile {
    /// The daemon's address when the devices were registered.
    addr: String,
    /// The daemon's static key (hex).
    server_key: String,
    devices: Vec<SavedDevice>,
}

#[derive(Serialize, Deserialize, Clone)]
struct SavedDevice {
    user: String,
    /// Noise private key (hex).
    key: String,
}

fn load_devices(path: &Path) -> Result<Option<DevicesFile>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_devices(path: &Path, file: &DevicesFile) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The daemon's memory.

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A process's RSS once two readings half a second apart differ by at most
/// 64 KiB, or the last reading after `wait`.
fn steady_rss(pid: u32, wait: Duration) -> Option<u64> {
    let deadline = Instant::now() + wait;
    let mut last = rss_kib(pid)?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid)?;
        if now.abs_diff(last) <= 64 {
            return Some(now);
        }
        last = now;
    }
    Some(last)
}

/// The process with a listening TCP socket on `port`, through /proc.
fn find_listener(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------
// CPU time.

/// The unit of the times in `/proc/PID/stat` and `/proc/stat` (`USER_HZ`,
/// `getconf CLK_TCK`): 100 a second on every architecture Rust builds Linux
/// programs for (alpha's 1024 is the exception).
const USER_HZ: f64 = 100.0;

/// User and system CPU time of a process, all its threads together (those
/// that exited included), in ticks, from `/proc/PID/stat` (`self` for this
/// one).
fn proc_cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime and stime from the text of a `/proc/PID/stat`.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    // The command name, in parentheses, may hold spaces and parentheses:
    // fields count from after the last ')'. utime and stime are fields 14
    // and 15 (proc(5)); field 3 is the first after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(14 - 3);
    let user = f.next()?.parse().ok()?;
    let system = f.next()?.parse().ok()?;
    Some((user, system))
}

/// The whole machine's CPU time, all cores together, in ticks, from the
/// `cpu` line of `/proc/stat`.
#[derive(Clone, Copy)]
struct MachineTicks {
    total: u64,
    /// Idle and waiting for I/O.
    idle: u64,
    /// Taken by the hypervisor for other guests.
    steal: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The `cpu` line from the text of `/proc/stat`.
fn parse_machine_stat(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // counted in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    Some(MachineTicks {
        total: v.iter().sum(),
        idle: v[3] + v[4],
        steal: v[7],
    })
}

/// CPU counters at one instant.
#[derive(Clone, Copy)]
struct CpuSample {
    daemon: Option<(u64, u64)>,
    generator: Option<(u64, u64)>,
    machine: Option<MachineTicks>,
}

impl CpuSample {
    fn take(pid: Option<u32>) -> CpuSample {
        CpuSample {
            daemon: pid.and_then(|p| proc_cpu_ticks(&p.to_string())),
            generator: proc_cpu_ticks("self"),
            machine: machine_ticks(),
        }
    }
}

/// CPU time spent between two samples: the measured window.
#[derive(Clone, Copy)]
struct CpuWindow {
    /// The daemon's user and system time, in seconds.
    daemon: Option<(f64, f64)>,
    /// This process's user plus system time, in seconds.
    generator: Option<f64>,
    /// Of all the machine's cores: the busy share, and the share stolen by
    /// the hypervisor.
    machine: Option<(f64, f64)>,
}

impl CpuWindow {
    fn between(a: &CpuSample, b: &CpuSample) -> CpuWindow {
        let secs = |t: u64| t as f64 / USER_HZ;
        CpuWindow {
            daemon: a
                .daemon
                .zip(b.daemon)
                .map(|((u0, s0), (u1, s1))| (secs(u1.saturating_sub(u0)), secs(s1.saturating_sub(s0)))),
            generator: a
                .generator
                .zip(b.generator)
                .map(|((u0, s0), (u1, s1))| secs((u1 + s1).saturating_sub(u0 + s0))),
            machine: a.machine.zip(b.machine).and_then(|(m0, m1)| {
                let total = m1.total.checked_sub(m0.total).filter(|&t| t > 0)? as f64;
                let idle = m1.idle.saturating_sub(m0.idle) as f64;
                let steal = m1.steal.saturating_sub(m0.steal) as f64;
                Some(((total - idle) / total, steal / total))
            }),
        }
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------
// What the threads share.

/// The traffic timeline, fixed by the main thread once every device is
/// connected.
#[derive(Clone, Copy)]
struct Schedule {
    /// Senders start.
    start: Instant,
    /// Measurement starts.
    measure: Instant,
    /// Measurement and sending end.
    end: Instant,
}

struct Shared {
    /// The clock every timestamp counts from.
    base: Instant,
    run: [u8; 8],
    connected: AtomicUsize,
    failed: AtomicUsize,
    refused: AtomicUsize,
    sent: AtomicU64,
    accepted: AtomicU64,
    delivered: AtomicU64,
    /// Sends refused because a late receiver's queue was full.
    full: AtomicU64,
    lost: AtomicUsize,
    /// Receivers that connect only once the traffic ends.
    late: usize,
    /// Deliveries one send makes: 1, or a group's other members.
    fanout: u64,
    schedule: OnceLock<Schedule>,
    stop: AtomicBool,
    fatal: Mutex<Option<String>>,
    registered: Mutex<Vec<(usize, String, Keypair)>>,
}

impl Shared {
    fn fail(&self, why: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }

    fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What one thread measured.
struct Tally {
    latency: Histogram<u64>,
    accept: Histogram<u64>,
    sent_window: u64,
    accepted_window: u64,
    delivered_window: u64,
    /// Delivered to late receivers (not in the latency or the rate).
    delivered_late: u64,
    /// Sends refused because a late receiver's queue was full.
    full: u64,
    stale: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Tally {
        let h = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds");
        Tally {
            latency: h(),
            accept: h(),
            sent_window: 0,
            accepted_window: 0,
            delivered_window: 0,
            delivered_late: 0,
            full: 0,
            stale: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        let _ = self.accept.add(&other.accept);
        self.sent_window += other.sent_window;
        self.accepted_window += other.accepted_window;
        self.delivered_window += other.delivered_window;
        self.delivered_late += other.delivered_late;
        self.full += other.full;
        self.stale += other.stale;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

// ---------------------------------------------------------------------------
// One thread's devices.

/// What the devices talk to.
#[derive(Clone, Copy)]
enum Proto {
    /// tidingsd, whose static key is this.
    Tidings(PublicKey),
    /// An MQTT broker (QoS 1), for comparison.
    Mqtt,
}

/// A device this thread drives.
struct Dev {
    index: usize,
    user: String,
    /// Its Noise key (tidings).
    key: Option<Keypair>,
    /// The invite to register with, for a device not registered yet.
    register: Option<wire::Token>,
    /// For a sender: its receiver's user name.
    to: Option<String>,
    /// For a group's sender (group mode): its group.
    group: Option<GroupSender>,
    /// A receiver that connects only once the traffic ends.
    late: bool,
    /// A sender whose receiver is late.
    to_late: bool,
    /// Sender: no sends before this (its receiver's queue was full).
    paused_until: Option<Instant>,
    stream: Option<TcpStream>,
    link: Option<Link>,
    /// The TCP connect completed.
    tcp_up: bool,
    state: DevState,
    attempts: u32,
    /// When the current connection attempt began.
    since: Instant,
    /// Sender: sends waiting for `Accepted`, by request id.
    inflight: HashMap<u32, Instant>,
    /// Sender: messages sent since traffic started.
    sent: u64,
}

/// A group a device sends to (group mode).
struct GroupSender {
    id: wire::GroupId,
    /// The other members, by name.
    members: Vec<String>,
    state: GroupState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum GroupState {
    /// Not asked for yet.
    New,
    /// Waiting for the answer to this request (`CreateGroup` or `GetGroup`).
    Asking(u32),
    /// The membership version and device digest to send with.
    Ready { version: u64, devices: [u8; 8] },
}

/// The group id a sender uses for groups of `size` (the same every run).
fn group_id(sender: &str, size: usize) -> wire::GroupId {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"tidings-load group\0");
    ctx.update(sender.as_bytes());
    ctx.update(&(size as u64).to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&ctx.finish().as_ref()[..16]);
    wire::GroupId(id)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DevState {
    /// Waiting for its turn (or a retry) to connect.
    Waiting,
    /// Connecting, handshaking, registering, or draining its queue.
    Connecting,
    /// Authenticated and drained.
    Live,
    /// Gave up or lost.
    Dead,
}

struct Worker {
    shared: Arc<Shared>,
    addr: SocketAddr,
    proto: Proto,
    poll: Poll,
    devs: Vec<Dev>,
    /// The indices of the devices that send.
    senders: Vec<usize>,
    /// Devices waiting to connect, with the earliest time to try.
    queue: VecDeque<(usize, Instant)>,
    /// Late receivers, queued to connect once the traffic ends.
    late: Vec<usize>,
    connecting: usize,
    /// Connect tokens (a bucket refilled at `connect_rate`).
    tokens: f64,
    last_refill: Instant,
    connect_rate: f64,
    /// Per-sender rate (messages per second), 0 for window-bound.
    rate: f64,
    window: usize,
    size: usize,
    buf: Vec<u8>,
    evs: Vec<Ev>,
    dirty: Vec<usize>,
    tally: Tally,
    /// Counts not yet added to the shared totals.
    sent: u64,
    accepted: u64,
    delivered: u64,
    full: u64,
    msg_counter: u64,
}

/// Most handshakes one thread has in progress.
const MAX_CONNECTING: usize = 512;
/// From connect to `QueueDrained`, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect attempts per device.
const MAX_ATTEMPTS: u32 = 5;

impl Worker {
    fn run(mut self) -> Tally {
        let mut events = Events::with_capacity(1024);
        let mut last_timers = Instant::now();
        let mut closing_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if self.shared.stop.load(Ordering::Acquire) {
                match closing_since {
                    None => {
                        closing_since = Some(now);
                        for i in 0..self.devs.len() {
                            if let Some(l) = self.devs[i].link.as_mut() {
                                l.close(now);
                                self.write(i);
                            }
                        }
                    }
                    Some(t) if now >= t + Duration::from_millis(200) => break,
                    Some(_) => {}
                }
            } else {
                if !self.late.is_empty() && self.shared.schedule.get().is_some_and(|s| now >= s.end) {
                    for i in std::mem::take(&mut self.late) {
                        self.queue.push_back((i, now));
                    }
                }
                self.start_connects(now);
                self.send_due(now);
                if now >= last_timers + Duration::from_millis(500) {
                    last_timers = now;
                    for i in 0..self.devs.len() {
                        if let Some(l) = self.devs[i].link.as_mut() {
                            l.handle_timeout(now);
                            self.process(i, now);
                        }
                        let dev = &self.devs[i];
                        if dev.state == DevState::Connecting && now >= dev.since + CONNECT_TIMEOUT {
                            let why = "not ready in time (a device the daemon does not know?)";
                            self.connect_failed(i, now, why.into());
                        }
                    }
                }
            }
            self.flush_dirty();
            self.publish();
            let timeout = if closing_since.is_some() {
                Duration::from_millis(20)
            } else if !self.queue.is_empty() {
                Duration::from_millis(5)
            } else if self.shared.schedule.get().is_some_and(|s| now < s.end) {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(50)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                self.shared.fail(format!("poll: {e}"));
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                let i = event.token().0;
                if i < self.devs.len() {
                    self.on_ready(i, now);
                }
            }
        }
        self.publish();
        self.tally
    }

    /// Adds this thread's new counts to the shared totals.
    fn publish(&mut self) {
        let s = &self.shared;
        if self.sent > 0 {
            s.sent.fetch_add(std::mem::take(&mut self.sent), Ordering::Relaxed);
        }
        if self.accepted > 0 {
            s.accepted
                .fetch_add(std::mem::take(&mut self.accepted), Ordering::Relaxed);
        }
        if self.delivered > 0 {
            s.delivered
                .fetch_add(std::mem::take(&mut self.delivered), Ordering::Relaxed);
        }
        if self.full > 0 {
            s.full.fetch_add(std::mem::take(&mut self.full), Ordering::Relaxed);
        }
    }

    fn error(&mut self, what: String) {
        *self.tally.errors.entry(what).or_default() += 1;
    }

    fn start_connects(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
        if self.connect_rate > 0.0 {
            let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.connect_rate).min(self.connect_rate.max(1.0));
            self.last_refill = now;
        }
        while self.connecting < MAX_CONNECTING {
            let Some(&(i, at)) = self.queue.front() else { break };
            if at > now || (self.connect_rate > 0.0 && self.tokens < 1.0) {
                break;
            }
            self.queue.pop_front();
            self.tokens -= 1.0;
            self.connect(i, now);
        }
    }

    fn connect(&mut self, i: usize, now: Instant) {
        let dev = &mut self.devs[i];
        dev.attempts += 1;
        dev.since = now;
        dev.tcp_up = false;
        dev.state = DevState::Connecting;
        self.connecting += 1;
        let link = match (self.proto, &dev.key) {
            (Proto::Tidings(server_key), Some(key)) => {
                let config = ConnConfig {
                    handshake_timeout: Duration::from_secs(10),
                    ping_after: Duration::from_secs(30),
                    dead_after: Duration::from_secs(90),
                };
                match Conn::new(key, &server_key, config, now) {
                    Ok(c) => {
                        let register = dev.register.clone().map(|t| (dev.user.clone(), t));
                        Link::Tidings(TidingsLink::new(c, register))
                    }
                    Err(e) => {
                        self.shared.fail(format!("bad server key: {e}"));
                        return;
                    }
                }
            }
            _ => Link::Mqtt(MqttLink::new(dev.user.clone(), now)),
        };
        let mut stream = match TcpStream::connect(self.addr) {
            Ok(s) => s,
            Err(e) => {
                self.connect_failed(i, now, format!("connect: {e}"));
                return;
            }
        };
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
        {
            self.connect_failed(i, now, format!("register: {e}"));
            return;
        }
        let dev = &mut self.devs[i];
        dev.stream = Some(stream);
        dev.link = Some(link);
    }

    /// A connection attempt ended before the device was live: try again
    /// later, or give up.
    fn connect_failed(&mut self, i: usize, now: Instant, why: String) {
        self.drop_socket(i);
        self.connecting = self.connecting.saturating_sub(1);
        let dev = &mut self.devs[i];
        if dev.attempts < MAX_ATTEMPTS {
            dev.state = DevState::Waiting;
            let at = now + Duration::from_millis(500 * u64::from(dev.attempts));
            self.queue.push_back((i, at));
        } else {
            dev.state = DevState::Dead;
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
            self.error(format!("connect gave up: {why}"));
        }
    }

    fn drop_socket(&mut self, i: usize) {
        let dev = &mut self.devs[i];
        if let Some(mut s) = dev.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        dev.link = None;
        dev.inflight.clear();
    }

    fn on_ready(&mut self, i: usize, now: Instant) {
        let dev = &mut self.devs[i];
        let Some(stream) = dev.stream.as_mut() else { return };
        if !dev.tcp_up {
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    self.connect_failed(i, now, format!("connect: {e}"));
                    return;
                }
            }
            match stream.peer_addr() {
                Ok(_) => dev.tcp_up = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    self.connect_failed(i, now, format!("connect: {e}"));
                    return;
                }
            }
            let _ = stream.set_nodelay(true);
        }
        // Read until WouldBlock (readiness is edge-triggered).
        loop {
            let dev = &mut self.devs[i];
            let (Some(stream), Some(link)) = (dev.stream.as_mut(), dev.link.as_mut()) else {
                return;
            };
            match stream.read(&mut self.buf) {
                Ok(0) => {
                    link.handle_eof();
                    self.process(i, now);
                    break;
                }
                Ok(n) => {
                    link.handle_input(&self.buf[..n], now);
                    self.process(i, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    link.handle_eof();
                    self.process(i, now);
                    break;
                }
            }
        }
        self.write(i);
    }

    /// Writes a device's pending bytes until done or `WouldBlock`.
    fn write(&mut self, i: usize) {
        let dev = &mut self.devs[i];
        if !dev.tcp_up {
            return;
        }
        let (Some(stream), Some(link)) = (dev.stream.as_mut(), dev.link.as_mut()) else {
            return;
        };
        loop {
            let out = link.transmit();
            if out.is_empty() {
                return;
            }
            match stream.write(out) {
                Ok(n) => link.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    link.handle_eof();
                    return;
                }
            }
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.write(i);
            // A write failure surfaces as an event.
            if self.devs[i].link.as_ref().is_some_and(|l| l.is_closed()) {
                self.process(i, Instant::now());
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Handles a device's connection events.
    fn process(&mut self, i: usize, now: Instant) {
        let schedule = self.shared.schedule.get().copied();
        let mut evs = std::mem::take(&mut self.evs);
        if let Some(l) = self.devs[i].link.as_mut() {
            l.drain(now, &mut evs);
            if !l.transmit().is_empty() {
                self.dirty.push(i);
            }
        }
        for ev in evs.drain(..) {
            match ev {
                Ev::Registered => {
                    let dev = &mut self.devs[i];
                    dev.register = None;
                    if let Some(key) = dev.key.clone() {
                        let entry = (dev.index, dev.user.clone(), key);
                        self.shared
                            .registered
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(entry);
                    }
                }
                Ev::Live => {
                    let dev = &mut self.devs[i];
                    if dev.state == DevState::Connecting {
                        dev.state = DevState::Live;
                        self.connecting = self.connecting.saturating_sub(1);
                        self.shared.connected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ev::Accepted(req) => self.accepted(i, req, now, schedule),
                Ev::Group(req, info) => {
                    if let Some(g) = self.devs[i].group.as_mut()
                        && g.state == GroupState::Asking(req)
                    {
                        let devices = tidings::keys::devices_digest(
                            info.members
                                .iter()
                                .map(|m| (m.user.as_str(), m.devices.iter().copied())),
                        );
                        g.state = GroupState::Ready {
                            version: info.version,
                            devices,
                        };
                    }
                }
                Ev::Refused(req, code, why)
                    if self.devs[i].group.as_ref().map(|g| g.state) == Some(GroupState::Asking(req)) =>
                {
                    let dev = &mut self.devs[i];
                    if code == Some(ErrorCode::GROUP_EXISTS)
                        && let (Some(g), Some(link)) = (dev.group.as_mut(), dev.link.as_mut())
                        && let Some(req) = link.request(&wire::ClientFrame::GetGroup { group: g.id }, now)
                    {
                        // An earlier run made it: read its membership.
                        g.state = GroupState::Asking(req);
                        self.dirty.push(i);
                    } else {
                        self.shared
                            .fail(format!("device {} could not make its group: {why}", dev.user));
                    }
                }
                Ev::Refused(req, code, why) => {
                    if self.devs[i].inflight.remove(&req).is_some() {
                        if code == Some(ErrorCode::QUOTA_EXCEEDED) && self.devs[i].to_late {
                            // A backlog that reached its quota: what a
                            // real client would see; it waits a little.
                            self.tally.full += 1;
                            self.full += 1;
                            self.devs[i].paused_until = Some(now + Duration::from_secs(1));
                        } else if code == Some(ErrorCode::SLOW_DOWN) {
                            self.error(format!(
                                "send refused: {why}: the daemon's per-device send rate is lower than this load \
                                 (raise limits.sends_per_minute and limits.send_burst, as scripts/load does)"
                            ));
                        } else {
                            self.error(format!("send refused: {why}"));
                        }
                    }
                }
                Ev::Delivered(body) => {
                    let late = self.devs[i].late;
                    self.delivered(&body, now, schedule, late)
                }
                Ev::Fatal(why) => self.shared.fail(format!("device {}: {why}", self.devs[i].user)),
                Ev::Closed { why, dropped, fatal } => {
                    self.closed(i, why, dropped, fatal, now);
                    break;
                }
            }
        }
        self.evs = evs;
        self.evs.clear();
    }

    fn closed(&mut self, i: usize, why: String, dropped: bool, fatal: bool, now: Instant) {
        match self.devs[i].state {
            DevState::Connecting => {
                if dropped {
                    self.shared.refused.fetch_add(1, Ordering::Relaxed);
                }
                if fatal {
                    self.shared.fail(format!("device {}: {why}", self.devs[i].user));
                }
                self.connect_failed(i, now, why);
            }
            DevState::Live => {
                self.drop_socket(i);
                self.devs[i].state = DevState::Dead;
                if !self.shared.stop.load(Ordering::Acquire) {
                    self.shared.lost.fetch_add(1, Ordering::Relaxed);
                    self.error(format!("connection lost: {why}"));
                }
            }
            DevState::Waiting | DevState::Dead => self.drop_socket(i),
        }
    }

    fn accepted(&mut self, i: usize, req: u32, now: Instant, schedule: Option<Schedule>) {
        let Some(sent_at) = self.devs[i].inflight.remove(&req) else {
            return;
        };
        self.accepted += 1;
        if let Some(s) = schedule
            && sent_at >= s.measure
            && sent_at < s.end
        {
            self.tally.accepted_window += 1;
            let us = now.saturating_duration_since(sent_at).as_micros() as u64;
            let _ = self.tally.accept.record(us.max(1));
        }
    }

    fn delivered(&mut self, body: &[u8], now: Instant, schedule: Option<Schedule>, late: bool) {
        if body.len() < 16 || body[..8] != self.shared.run {
            // Left in a queue by an earlier run.
            self.tally.stale += 1;
            return;
        }
        self.delivered += 1;
        if late {
            self.tally.delivered_late += 1;
            return;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&body[8..16]);
        let sent_at = self.shared.base + Duration::from_nanos(u64::from_le_bytes(ts));
        let Some(s) = schedule else { return };
        if now >= s.measure && now < s.end {
            self.tally.delivered_window += 1;
        }
        if sent_at >= s.measure && sent_at < s.end {
            let us = now.saturating_duration_since(sent_at).as_micros() as u64;
            let _ = self.tally.latency.record(us.max(1));
        }
    }

    /// Sends what each sender may send now.
    fn send_due(&mut self, now: Instant) {
        let Some(s) = self.shared.schedule.get().copied() else {
            return;
        };
        if now < s.start || now >= s.end {
            return;
        }
        let elapsed = now.saturating_duration_since(s.start).as_secs_f64();
        for k in 0..self.senders.len() {
            let i = self.senders[k];
            if self.devs[i].state != DevState::Live {
                continue;
            }
            if let Some(t) = self.devs[i].paused_until {
                if now < t {
                    continue;
                }
                self.devs[i].paused_until = None;
            }
            if let Some(g) = self.devs[i].group.as_mut() {
                match g.state {
                    GroupState::Ready { .. } => {}
                    GroupState::Asking(_) => continue,
                    GroupState::New => {
                        let frame = wire::ClientFrame::CreateGroup {
                            group: g.id,
                            members: g.members.clone(),
                        };
                        if let Some(req) = self.devs[i].link.as_mut().and_then(|l| l.request(&frame, now))
                            && let Some(g) = self.devs[i].group.as_mut()
                        {
                            g.state = GroupState::Asking(req);
                            self.dirty.push(i);
                        }
                        continue;
                    }
                }
            }
            let due = if self.rate > 0.0 {
                (elapsed * self.rate) as u64 + 1
            } else {
                u64::MAX
            };
            let mut wrote = false;
            while self.devs[i].sent < due && self.devs[i].inflight.len() < self.window {
                if !self.send_one(i, now, &s) {
                    break;
                }
                wrote = true;
            }
            if wrote {
                self.dirty.push(i);
            }
        }
    }

    fn send_one(&mut self, i: usize, now: Instant, s: &Schedule) -> bool {
        let mut body = vec![0u8; self.size];
        body[..8].copy_from_slice(&self.shared.run);
        let ts = now.saturating_duration_since(self.shared.base).as_nanos() as u64;
        body[8..16].copy_from_slice(&ts.to_le_bytes());
        self.msg_counter += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.shared.run);
        id[8..12].copy_from_slice(&(self.devs[i].index as u32).to_le_bytes());
        id[12..].copy_from_slice(&(self.msg_counter as u32).to_le_bytes());
        let dev = &mut self.devs[i];
        let Some(link) = dev.link.as_mut() else {
            return false;
        };
        let req = match (&dev.group, dev.to.as_deref()) {
            (
                Some(GroupSender {
                    id: group,
                    state: GroupState::Ready { version, devices },
                    ..
                }),
                _,
            ) => {
                let frame = wire::ClientFrame::GroupSend(wire::GroupSend {
                    id: MsgId(id),
                    group: *group,
                    version: *version,
                    devices: *devices,
                    body: Bytes::from(body),
                });
                link.request(&frame, now)
            }
            (None, Some(to)) => link.send(to, MsgId(id), Bytes::from(body), now),
            _ => None,
        };
        match req {
            Some(req) => {
                dev.inflight.insert(req, now);
                dev.sent += 1;
                self.sent += 1;
                if now >= s.measure {
                    self.tally.sent_window += 1;
                }
                true
            }
            None => false,
        }
    }
}

// ---------------------------------------------------------------------------
// The run.

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidings-load: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Report {
    json: serde_json::Value,
    text: String,
    ok: bool,
}

fn run(args: &Args) -> Result<ExitCode, String> {
    if args.size < 16 || args.size > wire::MAX_BODY_LEN {
        return Err(format!("--size must be 16 to {}", wire::MAX_BODY_LEN));
    }
    if let Some(n) = args.group_size {
        if !(2..=wire::MAX_GROUP_MEMBERS).contains(&n) {
            return Err(format!("--group-size must be 2 to {}", wire::MAX_GROUP_MEMBERS));
        }
        if args.groups == 0 || args.groups * n > args.devices {
            return Err(format!(
                "--groups {} of --group-size {n} need at least {} devices (and at least one group)",
                args.groups,
                args.groups * n
            ));
        }
    } else if args.pairs * 2 > args.devices {
        return Err(format!(
            "--pairs {} needs at least {} devices",
            args.pairs,
            args.pairs * 2
        ));
    }
    if args.window == 0 {
        return Err("--window must be at least 1".into());
    }
    if args.late_receivers && args.pairs == 0 {
        return Err("--late-receivers needs at least one pair".into());
    }
    let threads = args.threads.clamp(1, 64);
    if let Some(limit) = open_files_limit()
        && (args.devices as u64) + 64 > limit
    {
        return Err(format!(
            "{} devices need more open files than this process may have ({limit}): raise it with `ulimit -n` (hard limit: `ulimit -Hn`)",
            args.devices
        ));
    }

    // Who to talk to, and as whom.
    let rng = SystemRandom::new();
    let setup = if args.mqtt {
        Setup {
            proto: Proto::Mqtt,
            addr_text: args.addr.clone().unwrap_or_else(|| "127.0.0.1:1883".into()),
            devices: (0..args.devices).map(|i| (format!("load.{i}"), None, false)).collect(),
            saved: Vec::new(),
            invite: None,
        }
    } else {
        tidings_setup(args, &rng)?
    };
    let Setup {
        proto,
        addr_text,
        devices,
        mut saved,
        invite,
    } = setup;
    let to_register = devices.iter().filter(|d| d.2).count();
    // A late receiver connects only after the traffic: registered then,
    // every send to it before would be refused as an unknown user.
    if args.late_receivers {
        let late_new = (0..args.pairs.min(args.devices / 2))
            .filter(|k| k % 2 == 0)
            .filter(|k| devices.get(2 * k + 1).is_some_and(|d| d.2))
            .count();
        if late_new > 0 {
            return Err(format!(
                "{late_new} late receivers are not registered yet: register every device first, \
                 with a run without --late-receivers (for example --pairs 0 --duration 0s --warmup 0s)"
            ));
        }
    }
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| format!("{addr_text}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr_text}: no address"))?;

    let pid = args.daemon_pid.or_else(|| {
        if addr.ip().is_loopback() {
            find_listener(addr.port())
        } else {
            None
        }
    });
    let rss_before = pid.and_then(|p| steady_rss(p, args.baseline_wait));

    let mut run_nonce = [0u8; 8];
    rng.fill(&mut run_nonce).map_err(|_| "no randomness")?;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        run: run_nonce,
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        full: AtomicU64::new(0),
        lost: AtomicUsize::new(0),
        late: if args.late_receivers { args.pairs.div_ceil(2) } else { 0 },
        fanout: args.group_size.map_or(1, |n| n as u64 - 1),
        schedule: OnceLock::new(),
        stop: AtomicBool::new(false),
        fatal: Mutex::new(None),
        registered: Mutex::new(Vec::new()),
    });

    if !args.json {
        eprintln!(
            "tidings-load: {} devices at {addr} ({} to register), {} pairs sending, {} threads{}",
            args.devices,
            to_register,
            args.pairs,
            threads,
            pid.map(|p| format!(", daemon pid {p}")).unwrap_or_default()
        );
    }

    // Deal the devices to the threads.
    let start = Instant::now();
    let names: Vec<String> = devices.iter().map(|d| d.0.clone()).collect();
    let mut per_thread: Vec<Vec<Dev>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, (user, key, new)) in devices.into_iter().enumerate() {
        let (to, group) = match args.group_size {
            Some(n) if i % n == 0 && i < args.groups * n => {
                let g = GroupSender {
                    id: group_id(&user, n),
                    members: names[i + 1..i + n].to_vec(),
                    state: GroupState::New,
                };
                (None, Some(g))
            }
            Some(_) => (None, None),
            None if i % 2 == 0 && i < args.pairs * 2 => (Some(names[i + 1].clone()), None),
            None => (None, None),
        };
        // Pair k is device 2k sending to 2k+1; the even pairs' receivers
        // are the late ones.
        let late_pair = args.late_receivers && i < args.pairs * 2 && (i / 2) % 2 == 0;
        per_thread[i % threads].push(Dev {
            index: i,
            user,
            key,
            register: if new {
                invite.as_ref().map(|c| c.token.clone())
            } else {
                None
            },
            to,
            group,
            late: late_pair && i % 2 == 1,
            to_late: late_pair && i % 2 == 0,
            paused_until: None,
            stream: None,
            link: None,
            tcp_up: false,
            state: DevState::Waiting,
            attempts: 0,
            since: start,
            inflight: HashMap::new(),
            sent: 0,
        });
    }
    let mut handles = Vec::new();
    for (t, devs) in per_thread.into_iter().enumerate() {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let queue = (0..devs.len()).filter(|&i| !devs[i].late).map(|i| (i, start)).collect();
        let late = (0..devs.len()).filter(|&i| devs[i].late).collect();
        let senders = (0..devs.len())
            .filter(|&i| devs[i].to.is_some() || devs[i].group.is_some())
            .collect();
        let worker = Worker {
            shared: shared.clone(),
            addr,
            proto,
            poll,
            devs,
            senders,
            queue,
            late,
            connecting: 0,
            tokens: 1.0,
            last_refill: start,
            connect_rate: args.connect_rate / threads as f64,
            rate: args.rate / senders_count(args) as f64,
            window: args.window,
            size: args.size,
            buf: vec![0; 64 * 1024],
            evs: Vec::new(),
            dirty: Vec::new(),
            tally: Tally::new(),
            sent: 0,
            accepted: 0,
            delivered: 0,
            full: 0,
            msg_counter: 0,
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || worker.run())
                .map_err(|e| format!("thread: {e}"))?,
        );
    }

    let result = drive(args, &shared, pid, start);
    shared.stop.store(true, Ordering::Release);
    let mut tally = Tally::new();
    for h in handles {
        if let Ok(t) = h.join() {
            tally.merge(t);
        }
    }

    // Save newly registered devices, whatever else happened.
    if let Some(path) = &args.devices_file {
        let mut fresh = std::mem::take(&mut *shared.registered.lock().unwrap_or_else(|e| e.into_inner()));
        if !fresh.is_empty() {
            fresh.sort_by_key(|(i, _, _)| *i);
            saved.extend(fresh.into_iter().map(|(_, user, key)| SavedDevice {
                user,
                key: hex::encode(key.private()),
            }));
            let file = DevicesFile {
                addr: addr_text.clone(),
                server_key: match proto {
                    Proto::Tidings(k) => hex::encode(k),
                    Proto::Mqtt => String::new(),
                },
                devices: saved,
            };
            save_devices(path, &file)?;
        }
    }

    let phases = result?;
    let report = report(args, &shared, &tally, &phases, rss_before, threads);
    if args.json {
        println!("{}", report.json);
    } else {
        print!("{}", report.text);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Devices that send: one per pair, or one per sending group.
fn senders_count(args: &Args) -> usize {
    match args.group_size {
        Some(_) => args.groups.max(1),
        None => args.pairs.max(1),
    }
}

/// The daemon, and the devices to connect as.
struct Setup {
    proto: Proto,
    addr_text: String,
    /// Name, Noise key (tidings), whether to register it.
    devices: Vec<(String, Option<Keypair>, bool)>,
    /// The devices file's devices.
    saved: Vec<SavedDevice>,
    invite: Option<Code>,
}

fn tidings_setup(args: &Args, rng: &SystemRandom) -> Result<Setup, String> {
    let file = match &args.devices_file {
        Some(p) => load_devices(p)?,
        None => None,
    };
    let invite = args
        .invite
        .as_deref()
        .map(Code::parse)
        .transpose()
        .map_err(|e| format!("--invite: {e}"))?;
    let mut server_key: Option<PublicKey> = None;
    if let Some(hexkey) = &args.server_key {
        let mut k = [0u8; 32];
        hex::decode_to_slice(hexkey.trim(), &mut k).map_err(|_| "--server-key: 64 hex digits".to_string())?;
        server_key = Some(k);
    }
    for (what, key) in [
        ("the invite", invite.as_ref().map(|c| c.server_key)),
        (
            "the devices file",
            file.as_ref().and_then(|f| {
                let mut k = [0u8; 32];
                hex::decode_to_slice(&f.server_key, &mut k).ok().map(|_| k)
            }),
        ),
    ] {
        match (server_key, key) {
            (None, Some(k)) => server_key = Some(k),
            (Some(a), Some(b)) if a != b => {
                return Err(format!("{what} names another server key than the one given before it"));
            }
            _ => {}
        }
    }
    let server_key = server_key.ok_or("give --invite, --server-key or an existing --devices-file")?;
    let addr_text = args
        .addr
        .clone()
        .or_else(|| invite.as_ref().map(|c| c.addr.clone()))
        .or_else(|| file.as_ref().map(|f| f.addr.clone()))
        .unwrap_or_else(|| format!("127.0.0.1:{}", tidings::server::DEFAULT_PORT));
    let saved: Vec<SavedDevice> = file.as_ref().map(|f| f.devices.clone()).unwrap_or_default();
    let mut devices: Vec<(String, Option<Keypair>, bool)> = Vec::with_capacity(args.devices);
    for d in saved.iter().take(args.devices) {
        let mut k = [0u8; 32];
        hex::decode_to_slice(&d.key, &mut k).map_err(|_| format!("damaged key for {} in the devices file", d.user))?;
        let key = Keypair::from_private(&k).ok_or("damaged key in the devices file")?;
        devices.push((d.user.clone(), Some(key), false));
    }
    let to_register = args.devices.saturating_sub(devices.len());
    if to_register > 0 {
        if invite.is_none() {
            return Err(format!(
                "{to_register} more devices are needed than the devices file has: give --invite (tidingsd invite --uses {to_register})"
            ));
        }
        let mut tag = [0u8; 4];
        rng.fill(&mut tag).map_err(|_| "no randomness")?;
        let tag = hex::encode(tag);
        for i in devices.len()..args.devices {
            let key = Keypair::generate().map_err(|e| e.to_string())?;
            devices.push((format!("load{tag}.{i}"), Some(key), true));
        }
    }

    Ok(Setup {
        proto: Proto::Tidings(server_key),
        addr_text,
        devices,
        saved,
        invite,
    })
}

/// What the main thread saw while the workers ran.
struct Phases {
    connect_time: Duration,
    rss_connected: Option<u64>,
    rss_end: Option<u64>,
    measured: Duration,
    /// CPU time spent in the measured window.
    cpu: CpuWindow,
    drained: bool,
}

/// Sleeps until `t` (at once if it has passed).
fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn drive(args: &Args, shared: &Shared, pid: Option<u32>, start: Instant) -> Result<Phases, String> {
    let tick = Duration::from_millis(20);
    let mut last_print = Instant::now();
    // Connect everyone but the late receivers.
    let early = args.devices - shared.late;
    loop {
        if let Some(f) = shared.fatal() {
            return Err(f);
        }
        let up = shared.connected.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        if up + failed >= early {
            if failed > 0 {
                let refused = shared.refused.load(Ordering::Relaxed);
                return Err(format!(
                    "{failed} of {} devices could not connect ({refused} connection attempts were dropped during the handshake: \
                     the daemon's per-address limits? raise limits.connections_per_ip and \
                     limits.handshakes_per_second_per_ip, or lower --connect-rate)",
                    args.devices
                ));
            }
            break;
        }
        if !args.json && last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("  connected {up} of {early}");
        }
        std::thread::sleep(tick);
    }
    let connect_time = start.elapsed();
    if !args.json {
        eprintln!(
            "  all {early} connected in {:.1} s{}; idle for {}",
            connect_time.as_secs_f64(),
            if shared.late > 0 {
                format!(" ({} late receivers wait)", shared.late)
            } else {
                String::new()
            },
            humantime::format_duration(args.settle)
        );
    }
    std::thread::sleep(args.settle);
    let rss_connected = pid.and_then(rss_kib);

    // Traffic. The CPU counters are read as close to the window's edges as
    // the scheduler allows.
    let now = Instant::now();
    let schedule = Schedule {
        start: now,
        measure: now + args.warmup,
        end: now + args.warmup + args.duration,
    };
    let _ = shared.schedule.set(schedule);
    let mut cpu_start: Option<CpuSample> = None;
    let mut last = (Instant::now(), 0u64);
    loop {
        if let Some(f) = shared.fatal() {
            return Err(f);
        }
        let now = Instant::now();
        if cpu_start.is_none() && now >= schedule.measure {
            cpu_start = Some(CpuSample::take(pid));
        }
        if now >= schedule.end {
            break;
        }
        let next = if cpu_start.is_none() {
            schedule.measure
        } else {
            schedule.end
        };
        sleep_until(next.min(now + tick));
        if !args.json && last.0.elapsed() >= Duration::from_secs(1) {
            let d = shared.delivered.load(Ordering::Relaxed);
            let rate = (d - last.1) as f64 / last.0.elapsed().as_secs_f64();
            eprintln!("  {:>8.0} msg/s delivered", rate);
            last = (Instant::now(), d);
        }
    }
    let cpu_end = CpuSample::take(pid);
    let cpu = CpuWindow::between(&cpu_start.unwrap_or(cpu_end), &cpu_end);
    let measured = schedule.end - schedule.measure;
    if !args.json {
        let sent = shared.sent.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        eprintln!(
            "  traffic done; waiting for {} of {} deliveries{}",
            (sent * shared.fanout).saturating_sub(delivered),
            sent * shared.fanout,
            if shared.late > 0 {
                " (the late receivers connect now)"
            } else {
                ""
            }
        );
    }
    // Let what was sent arrive (the late receivers connect now). A send
    // refused because its queue was full will never arrive.
    let deadline = Instant::now() + args.drain_timeout;
    let mut last_print = Instant::now();
    let drained = loop {
        let sent = shared.sent.load(Ordering::Relaxed);
        let full = shared.full.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let f = shared.fanout;
        if delivered + full * f >= sent * f && shared.accepted.load(Ordering::Relaxed) + full >= sent {
            break true;
        }
        if Instant::now() >= deadline
            || shared.lost.load(Ordering::Relaxed) > 0
            || shared.failed.load(Ordering::Relaxed) > 0
            || shared.fatal().is_some()
        {
            break false;
        }
        if !args.json && last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  waiting for {} deliveries",
                ((sent - full) * f).saturating_sub(delivered)
            );
        }
        std::thread::sleep(tick);
    };
    if let Some(f) = shared.fatal() {
        return Err(f);
    }
    let rss_end = pid.and_then(rss_kib);
    Ok(Phases {
        connect_time,
        rss_connected,
        rss_end,
        measured,
        cpu,
        drained,
    })
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn report(args: &Args, shared: &Shared, tally: &Tally, p: &Phases, rss_before: Option<u64>, threads: usize) -> Report {
    let sent = shared.sent.load(Ordering::Relaxed);
    let accepted = shared.accepted.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let lost = shared.lost.load(Ordering::Relaxed);
    let full = shared.full.load(Ordering::Relaxed);
    let secs = p.measured.as_secs_f64();
    let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let per_sec = per_second(tally.delivered_window);
    let accepted_per_sec = per_second(tally.accepted_window);
    // CPU time per message delivered in the window, in microseconds.
    let per_msg = |cpu_s: f64| (tally.delivered_window > 0).then(|| cpu_s * 1e6 / tally.delivered_window as f64);
    let daemon_cpu = p.cpu.daemon.map(|(u, s)| u + s);
    let cpu_us_per_msg = daemon_cpu.and_then(per_msg);
    let generator_us_per_msg = p.cpu.generator.and_then(per_msg);
    let round1 = |v: f64| (v * 10.0).round() / 10.0;
    let per_device = match (rss_before, p.rss_connected) {
        (Some(b), Some(c)) => Some((c.saturating_sub(b) * 1024) as f64 / args.devices as f64),
        _ => None,
    };
    let errors: u64 = tally.errors.values().sum();
    let ok = (delivered > 0 || args.pairs == 0) && lost == 0 && errors == 0;
    let json = serde_json::json!({
        "devices": args.devices,
        "pairs": if args.group_size.is_some() { 0 } else { args.pairs },
        "group_size": args.group_size,
        "groups": args.group_size.map(|_| args.groups),
        "fanout": shared.fanout,
        "threads": threads,
        "rate": args.rate,
        "window": args.window,
        "size": args.size,
        "warmup_s": args.warmup.as_secs_f64(),
        "duration_s": secs,
        "connect_s": p.connect_time.as_secs_f64(),
        "sent": sent,
        "accepted": accepted,
        "delivered": delivered,
        "sent_in_window": tally.sent_window,
        "accepted_in_window": tally.accepted_window,
        "delivered_in_window": tally.delivered_window,
        "msgs_per_sec": per_sec.round(),
        "accepted_per_sec": accepted_per_sec.round(),
        "cpu_us_per_msg": cpu_us_per_msg.map(round1),
        "cpu": {
            "daemon_user_s": p.cpu.daemon.map(|d| d.0),
            "daemon_system_s": p.cpu.daemon.map(|d| d.1),
            "generator_s": p.cpu.generator,
            "generator_us_per_msg": generator_us_per_msg.map(round1),
            "machine_busy": p.cpu.machine.map(|m| (m.0 * 1000.0).round() / 1000.0),
            "machine_steal": p.cpu.machine.map(|m| (m.1 * 1000.0).round() / 1000.0),
            "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        },
        "late_receivers": shared.late,
        "delivered_late": tally.delivered_late,
        "refused_queue_full": full,
        "latency_us": percentiles(&tally.latency),
        "accept_latency_us": percentiles(&tally.accept),
        "drained": p.drained,
        "stale_deliveries": tally.stale,
        "connections_lost": lost,
        "errors": tally.errors,
        "rss_kib": {
            "before": rss_before,
            "connected": p.rss_connected,
            "end": p.rss_end,
        },
        "rss_per_device_bytes": per_device.map(|b| b.round()),
    });
    let mut text = String::new();
    let rate = if args.rate > 0.0 {
        format!("{} msg/s", args.rate)
    } else {
        "as fast as the window allows".into()
    };
    let sending = match args.group_size {
        Some(n) => format!(
            "{} groups of {n} sending: one GroupSend a message, {} deliveries each",
            args.groups,
            n - 1
        ),
        None => format!("{} pairs sending", args.pairs),
    };
    let _ = writeln!(
        text,
        "{} devices ({sending}), window {}, {}-byte bodies, {rate}; measured {:.1} s after {} warm-up",
        args.devices,
        args.window,
        args.size,
        secs,
        humantime::format_duration(args.warmup)
    );
    let _ = writeln!(
        text,
        "throughput   {per_sec:.0} msg/s delivered, {accepted_per_sec:.0} msg/s accepted (run totals: sent {sent}, accepted {accepted}, delivered {delivered})"
    );
    if let Some((user, system)) = p.cpu.daemon {
        let _ = writeln!(
            text,
            "daemon CPU   {} per delivered message (user {user:.2} s + system {system:.2} s in the window, {} deliveries)",
            cpu_us_per_msg.map_or("?".to_string(), |c| format!("{c:.1} µs")),
            tally.delivered_window
        );
    }
    let _ = writeln!(
        text,
        "other CPU    generator {}; machine {} busy, {} stolen by the hypervisor ({} cores)",
        generator_us_per_msg.map_or("?".to_string(), |c| format!("{c:.1} µs per message")),
        p.cpu
            .machine
            .map_or("?".to_string(), |m| format!("{:.0}%", m.0 * 100.0)),
        p.cpu
            .machine
            .map_or("?".to_string(), |m| format!("{:.1}%", m.1 * 100.0)),
        std::thread::available_parallelism().map_or("?".to_string(), |n| n.to_string())
    );
    if shared.late > 0 {
        let _ = writeln!(
            text,
            "late         {} receivers connected after the traffic and read {} messages; {full} sends refused with a full queue",
            shared.late, tally.delivered_late
        );
    }
    for (what, h) in [("send→deliver", &tally.latency), ("send→accepted", &tally.accept)] {
        if h.is_empty() {
            let _ = writeln!(text, "latency      {what}: no samples");
        } else {
            let _ = writeln!(
                text,
                "latency      {what:<14} p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                h.len()
            );
        }
    }
    let kib = |v: Option<u64>| v.map_or("?".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let _ = writeln!(
        text,
        "daemon RSS   before {}, all connected {}, end {}; per connected device {}",
        kib(rss_before),
        kib(p.rss_connected),
        kib(p.rss_end),
        per_device.map_or("?".to_string(), |b| format!("{b:.0} bytes"))
    );
    if !p.drained {
        let _ = writeln!(
            text,
            "warning      not everything sent was accepted and delivered within --drain-timeout"
        );
    }
    if tally.stale > 0 {
        let _ = writeln!(
            text,
            "note         {} deliveries left over from earlier runs",
            tally.stale
        );
    }
    if lost > 0 {
        let _ = writeln!(text, "error        {lost} connections lost during the run");
    }
    for (e, n) in &tally.errors {
        let _ = writeln!(text, "error        {n} × {e}");
    }
    Report { json, text, ok }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_from_proc() {
        // A command name with a space and parentheses; utime 1234, stime 56.
        let stat = "4242 (tidings (x) d) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 56 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_proc_stat(stat), Some((1234, 56)));
        assert_eq!(parse_proc_stat("4242 (short) S 1"), None);
        let machine = "cpu  100 5 50 800 20 1 2 30 0 0\ncpu0 50 2 25 400 10 1 1 15 0 0\n";
        let m = parse_machine_stat(machine).unwrap();
        assert_eq!((m.total, m.idle, m.steal), (1008, 820, 30));
        // Ours, live.
        assert!(proc_cpu_ticks("self").is_some());
        let a = CpuSample::take(None);
        let w = CpuWindow::between(&a, &a);
        assert_eq!(w.daemon, None);
        assert_eq!(w.generator, Some(0.0));
    }
}
