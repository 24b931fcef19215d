//! The daemon's event loops: thin `mio` drivers around [`core::Core`].
//!
//! A [`Worker`] owns a `mio::Poll`, the listener (each worker polls the
//! same listening socket; whoever accepts first owns the connection), its
//! connections' sockets, and a [`Mailbox`] through which other threads hand
//! it effects (from other loops' hubs, the admin thread) and through which
//! the flusher wakes it. On each turn it reads every readable socket until
//! `WouldBlock`, lets the core work, then writes each connection's whole
//! output with one `write` call per turn where the kernel takes it.
//!
//! What it guarantees: the loop never waits on the disk for an ack (the
//! flusher thread does the flushing), one connection's bytes never stall
//! another's, and a flush failure stops the daemon before anything more is
//! acknowledged. What it does not do: protocol logic of any kind.

pub mod admin;
pub mod core;
pub mod doctor;
pub mod health;
pub mod limits;
pub mod metrics;
#[cfg(test)]
mod sim;
pub mod sweeper;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use thiserror::Error;

use self::core::Core;
use self::limits::{IpLimitConfig, IpLimits};
use self::sweeper::{RetentionConfig, Sweeper};
use crate::hub::{Effect, HubConfig, Now, Refusal, Shared};
use crate::session::SessionConfig;
use crate::store::{Sink, Store, StoreApi, StoreConfig, StoreError, StoreThreads};
use crate::wire::Refusal as WireRefusal;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Bytes read per `read` call, into the loop's one read buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Refused connections kept open per loop, reading and discarding what the
/// client sent, so that closing them does not reset the connection before
/// the client read the refusal; past it they are closed at once.
const MAX_LINGERING: usize = 256;
/// How long a refused connection lingers at most.
const LINGER: Duration = Duration::from_secs(2);

/// Seconds a refused client is told to wait (spec §2), per reason.
fn retry_after(why: WireRefusal) -> u16 {
    match why {
        WireRefusal::AddressRate => 1,
        WireRefusal::AddressConnections | WireRefusal::ShuttingDown => 5,
        WireRefusal::ServerFull => 10,
        WireRefusal::BadMagic | WireRefusal::UnsupportedVersion => 0,
    }
}

/// A daemon failure.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sockets and threads.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The failure.
        source: io::Error,
    },
    /// A flush failed; the daemon stopped without acknowledging what it
    /// could not make durable.
    #[error("a flush failed; stopped without acknowledging unflushed writes")]
    FlushFailed,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Io { what, source }
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The `host:port` invites carry, if not the listen address.
    pub public_addr: Option<String>,
    /// Number of event loops.
    pub workers: usize,
    /// Session limits and timeouts.
    pub session: SessionConfig,
    /// Hub settings.
    pub hub: HubConfig,
    /// Store tuning.
    pub store: StoreConfig,
    /// Limits per source address, before authentication.
    pub per_ip: IpLimitConfig,
    /// Most open connections in all (`limits.max_connections`).
    pub max_connections: u32,
    /// Retention.
    pub retention: RetentionConfig,
    /// The configuration file, re-read on SIGHUP (for `store.min_free`).
    pub config_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`[metrics] listen`), if at all.
    pub metrics_listen: Option<SocketAddr>,
}

impl ServerConfig {
    /// The embedded defaults, for a data directory.
    pub fn new(data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            public_addr: None,
            workers: 1,
            session: SessionConfig::default(),
            hub: HubConfig::default(),
            store: StoreConfig::default(),
            per_ip: IpLimitConfig::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            retention: RetentionConfig::default(),
            config_file: None,
            metrics_listen: None,
        }
    }
}

/// The port the daemon listens on by default.
pub const DEFAULT_PORT: u16 = 7420;
/// Most open connections in all, by default (`limits.max_connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;

/// Work handed to a loop from other threads.
pub struct Mailbox {
    effects: Mutex<Vec<Effect>>,
    waker: Waker,
    stop: AtomicBool,
    /// Turns of the loop: the watchdog's sign that it is not stuck.
    beats: std::sync::atomic::AtomicU64,
}

impl Mailbox {
    /// Queues an effect for this loop and wakes it.
    pub fn post(&self, effect: Effect) {
        self.effects.lock().unwrap_or_else(|e| e.into_inner()).push(effect);
        self.wake();
    }

    /// Wakes the loop (to look at the flusher and its mailbox).
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake an event loop: {e}");
        }
    }

    /// Asks the loop to shut down.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }
}

/// Handles to every loop, for routing effects between them.
#[derive(Clone)]
pub struct Loops {
    mailboxes: Arc<Vec<Arc<Mailbox>>>,
}

impl Loops {
    /// Hands an effect to the loop that owns its connection.
    pub fn post(&self, effect: Effect) {
        if let Some(m) = self.mailboxes.get(effect.conn().worker as usize) {
            m.post(effect);
        }
    }

    /// Hands a turn's effects to the loops that own their connections:
    /// one lock and one wake per loop, not per effect.
    pub fn post_all(&self, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        for (w, m) in self.mailboxes.iter().enumerate() {
            let mut mine = effects.iter().filter(|e| e.conn().worker as usize == w).peekable();
            if mine.peek().is_none() {
                continue;
            }
            m.effects
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(mine.cloned());
            m.wake();
        }
    }

    /// Stops every loop.
    pub fn stop(&self) {
        for m in self.mailboxes.iter() {
            m.stop();
        }
    }

    /// Each loop's turns so far.
    pub fn beats(&self) -> Vec<u64> {
        self.mailboxes.iter().map(|m| m.beats.load(Ordering::Relaxed)).collect()
    }

    /// Wakes every loop for a turn (the watchdog's probe).
    pub fn wake_all(&self) {
        for m in self.mailboxes.iter() {
            m.wake();
        }
    }
}

/// A connection's socket and where it comes from.
pub struct Socket {
    stream: TcpStream,
    ip: IpAddr,
    /// Input left unread while the output is over the cap (spec §9); read
    /// again once the output drains.
    paused: bool,
}

/// One event loop.
pub struct Worker {
    poll: Poll,
    listener: Option<TcpListener>,
    mailbox: Arc<Mailbox>,
    loops: Loops,
    core: Core<Socket>,
    limits: Arc<IpLimits>,
    store: Arc<Store>,
    read_buf: Vec<u8>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    /// Connections were closed for the shutdown.
    closed: bool,
    /// Re-read on SIGHUP.
    config_file: Option<PathBuf>,
    /// Open connections of every loop (`limits.max_connections`).
    open: Arc<AtomicUsize>,
    max_connections: usize,
    /// Refused connections being drained before they close.
    lingering: VecDeque<(TcpStream, Instant)>,
    /// Shutting down: new connections are refused.
    stopping: bool,
    metrics: Arc<metrics::Metrics>,
}

/// A running daemon.
pub struct Server {
    store: Arc<Store>,
    shared: Arc<Shared>,
    loops: Loops,
    local_addr: SocketAddr,
    workers: Vec<Worker>,
    /// Serving from [`Server::bind`] on, so that operator commands work as
    /// soon as the daemon says it listens; stopped when the server ends.
    admin: Option<admin::AdminServer>,
    retention: RetentionConfig,
    /// The store thread and flusher, running from [`Server::bind`] on so
    /// that operator commands are served at once.
    store_threads: Option<StoreThreads>,
    health: Arc<health::Health>,
    /// The metrics endpoint, if configured.
    metrics_endpoint: Option<metrics::Endpoint>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.admin.take();
        if let Some(t) = self.store_threads.take() {
            self.store.stop(t);
        }
    }
}

impl Server {
    /// Opens the store, binds the listener, starts the admin socket and
    /// prepares the loops (connections wait in the listen backlog until
    /// [`Server::run`]).
    ///
    /// # Errors
    /// If the data directory cannot be opened or the address bound.
    pub fn bind(config: &ServerConfig) -> Result<Server, ServerError> {
        let store = Arc::new(Store::open(&config.data_dir, &config.store)?);
        let std_listener = std::net::TcpListener::bind(config.listen).map_err(io_err("binding the listen address"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("configuring the listener"))?;
        let local_addr = std_listener
            .local_addr()
            .map_err(io_err("reading the listen address"))?;
        // Record the address invites carry: the flag, else a concrete
        // listen address; a wildcard address says nothing.
        if let Some(addr) = &config.public_addr {
            store.set_public_addr(addr)?;
        } else if !local_addr.ip().is_unspecified() {
            store.set_public_addr(&local_addr.to_string())?;
        }
        store.flush()?;
        let shared = Shared::new(store.clone() as Arc<dyn StoreApi>, config.hub.clone());
        let server_key = Arc::new(store.server_key().clone());
        let n = config.workers.max(1);
        let mut polls = Vec::with_capacity(n);
        let mut mailboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new().map_err(io_err("creating a poller"))?;
            let waker = Waker::new(poll.registry(), WAKER).map_err(io_err("creating a waker"))?;
            mailboxes.push(Arc::new(Mailbox {
                effects: Mutex::new(Vec::new()),
                waker,
                stop: AtomicBool::new(false),
                beats: std::sync::atomic::AtomicU64::new(0),
            }));
            polls.push(poll);
        }
        let loops = Loops {
            mailboxes: Arc::new(mailboxes),
        };
        let ip_limits = Arc::new(IpLimits::new(config.per_ip));
        let open = Arc::new(AtomicUsize::new(0));
        let metrics = metrics::Metrics::new();
        {
            let m = metrics.clone();
            store.flusher().on_flush_time(move |d| m.flushed(d));
        }
        let mut session_config = config.session.clone();
        session_config.observer = Some(metrics.clone());
        let mut workers = Vec::with_capacity(n);
        for (i, poll) in polls.into_iter().enumerate() {
            let listener = std_listener.try_clone().map_err(io_err("sharing the listener"))?;
            let mut listener = TcpListener::from_std(listener);
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)
                .map_err(io_err("registering the listener"))?;
            let mailbox = loops.mailboxes[i].clone();
            let m = mailbox.clone();
            store.on_failure(move || m.wake());
            let m = mailbox.clone();
            let sink = Sink::new(move || m.wake());
            workers.push(Worker {
                poll,
                listener: Some(listener),
                mailbox,
                loops: loops.clone(),
                core: Core::new(
                    i as u16,
                    shared.clone(),
                    server_key.clone(),
                    session_config.clone(),
                    sink,
                ),
                limits: ip_limits.clone(),
                store: store.clone(),
                read_buf: vec![0; READ_CHUNK],
                signals: None,
                closed: false,
                config_file: config.config_file.clone(),
                open: open.clone(),
                max_connections: config.max_connections as usize,
                lingering: VecDeque::new(),
                stopping: false,
                metrics: metrics.clone(),
            });
        }
        let health = health::Health::new(store.clone(), shared.clone(), loops.clone(), open, metrics.clone());
        let store_threads = store.start().map_err(io_err("starting the store thread"))?;
        let metrics_endpoint = match config.metrics_listen {
            Some(addr) => {
                let h = health.clone();
                Some(
                    metrics::Endpoint::start(addr, metrics, move || h.gauges())
                        .map_err(io_err("binding the metrics address"))?,
                )
            }
            None => None,
        };
        let admin = admin::AdminServer::start(store.clone(), shared.clone(), loops.clone(), health.clone())
            .map_err(io_err("starting the admin socket"))?;
        Ok(Server {
            store,
            shared,
            loops,
            local_addr,
            workers,
            admin: Some(admin),
            retention: config.retention,
            store_threads: Some(store_threads),
            health,
            metrics_endpoint,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A handle that stops the daemon.
    pub fn loops(&self) -> Loops {
        self.loops.clone()
    }

    /// The daemon's health (what `tidingsd status` shows).
    pub fn health(&self) -> &Arc<health::Health> {
        &self.health
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint.as_ref().map(metrics::Endpoint::addr)
    }

    /// Runs until SIGTERM/SIGINT (if `handle_signals`) or
    /// [`Loops::stop`]: starts the flusher and the loops, then shuts down
    /// cleanly.
    ///
    /// # Errors
    /// On a failure that stops the daemon (a flush failure among them).
    pub fn run(mut self, handle_signals: bool) -> Result<(), ServerError> {
        let admin = self.admin.take();
        let sweeper = Sweeper::start(
            self.store.clone(),
            self.shared.clone(),
            self.loops.clone(),
            self.retention,
        )
        .map_err(io_err("starting the sweeper"))?;
        let watchdog = health::Watchdog::start(self.health.clone()).map_err(io_err("starting the watchdog"))?;
        if handle_signals {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            let mut signals = signal_hook_mio::v1_0::Signals::new([SIGTERM, SIGINT, SIGHUP])
                .map_err(io_err("installing signal handlers"))?;
            self.workers[0]
                .poll
                .registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)
                .map_err(io_err("registering signals"))?;
            self.workers[0].signals = Some(signals);
        }
        let mut threads = Vec::new();
        let mut first = None;
        for w in self.workers.drain(..) {
            if first.is_none() {
                first = Some(w);
                continue;
            }
            let name = format!("loop-{}", w.core.worker());
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || w.run())
                    .map_err(io_err("starting a loop"))?,
            );
        }
        let mut result = first.map(|w| w.run()).unwrap_or(Ok(()));
        self.loops.stop();
        for t in threads {
            let r = t.join().unwrap_or(Ok(()));
            if result.is_ok() {
                result = r;
            }
        }
        drop(admin);
        watchdog.stop();
        self.metrics_endpoint.take();
        sweeper.stop();
        if let Some(t) = self.store_threads.take() {
            self.store.stop(t);
        }
        if self.store.failed() {
            return Err(ServerError::FlushFailed);
        }
        self.store.flush()?;
        result
    }
}

impl Worker {
    fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        let mut stopping: Option<Instant> = None;
        loop {
            self.mailbox.beats.fetch_add(1, Ordering::Relaxed);
            let timeout = self
                .core
                .next_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let timeout = match (timeout, stopping.is_some() || !self.lingering.is_empty()) {
                (Some(t), true) => Some(t.min(Duration::from_millis(50))),
                (None, true) => Some(Duration::from_millis(50)),
                (t, false) => t,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(ServerError::Io {
                    what: "polling",
                    source: e,
                });
            }
            let now = Now::read();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    SIGNALS => {
                        let pending: Vec<i32> = match self.signals.as_mut() {
                            Some(s) => s.pending().collect(),
                            None => Vec::new(),
                        };
                        for signal in pending {
                            if signal == signal_hook::consts::SIGHUP {
                                self.reload();
                            } else {
                                log::info!("signal received: shutting down");
                                self.loops.stop();
                            }
                        }
                    }
                    Token(serial) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(serial as u64, now);
                        }
                        if event.is_writable() {
                            self.write(serial as u64, now);
                        }
                    }
                }
            }
            // Other threads' work: effects, flushes.
            let effects = std::mem::take(&mut *self.mailbox.effects.lock().unwrap_or_else(|e| e.into_inner()));
            for effect in effects {
                self.core.apply(effect, now);
            }
            self.core.end_turn(now);
            if self.store.failed() {
                log::error!("stopping: the store failed");
                self.loops.stop();
                return Err(ServerError::FlushFailed);
            }
            self.core.timeout(now);
            if self.mailbox.stop.load(Ordering::SeqCst) && stopping.is_none() {
                stopping = Some(now.mono);
                self.begin_shutdown(now);
            }
            self.flush_output(now);
            self.loops.post_all(self.core.take_remote());
            self.drain_lingering(now.mono);
            if let Some(since) = stopping {
                // Answers that wait for the store go out before the
                // connections close (the store thread writes every copy
                // still in memory at once while stopping).
                let answered = !self.core.has_pending() || self.store.failed();
                if answered && !self.closed {
                    self.closed = true;
                    self.core.close_all(Refusal::ShuttingDown, now);
                    self.flush_output(now);
                }
                if (self.core.is_empty() && answered) || now.mono >= since + Duration::from_secs(3) {
                    return Ok(());
                }
            }
        }
    }

    /// SIGHUP: re-reads the configuration file's settings that apply to a
    /// running daemon (`store.min_free`).
    fn reload(&mut self) {
        let Some(path) = self.config_file.as_ref() else {
            log::info!("SIGHUP: no configuration file to re-read");
            return;
        };
        match crate::config::FileConfig::load(path) {
            Ok(file) => {
                let min_free = file.to_server_config().store.min_free;
                self.store.set_min_free(min_free);
                log::info!(
                    "SIGHUP: re-read {}; store.min_free is {} MiB",
                    path.display(),
                    min_free >> 20
                );
            }
            Err(e) => log::error!("SIGHUP: {e}; keeping the settings in force"),
        }
    }

    /// Refuses new connections from now on (spec §2, `SHUTTING_DOWN`),
    /// and asks the store to write every copy still in memory now, so that
    /// what waits for it is answered before the connections close.
    fn begin_shutdown(&mut self, _now: Now) {
        self.stopping = true;
        self.store.write_all();
    }

    /// Refuses a connection in the clear (spec §2): the refusal, then
    /// our side closed; what the client sent is read and dropped for a
    /// moment so that the close does not reset the connection before the
    /// client read the refusal.
    fn refuse(&mut self, mut stream: TcpStream, why: WireRefusal, now: Instant) {
        // A fresh socket's send buffer always takes 12 bytes.
        let _ = stream.write(&why.busy_bytes(retry_after(why)));
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if self.lingering.len() >= MAX_LINGERING {
            self.lingering.pop_front();
        }
        self.lingering.push_back((stream, now + LINGER));
    }

    /// Reads and drops what refused clients sent; closes each at its end
    /// of stream or deadline.
    fn drain_lingering(&mut self, now: Instant) {
        let mut buf = [0u8; 1024];
        self.lingering.retain_mut(|(stream, deadline)| {
            if now >= *deadline {
                return false;
            }
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
        });
    }

    fn accept(&mut self, now: Now) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    // spec §2, §9: the server's and the per-address limits,
                    // before a byte is read; refused in the clear.
                    let refusal = if self.stopping {
                        Some(WireRefusal::ShuttingDown)
                    } else if self.open.load(Ordering::Relaxed) >= self.max_connections {
                        Some(WireRefusal::ServerFull)
                    } else {
                        match self.limits.admit(peer.ip(), now.mono) {
                            Ok(()) => None,
                            Err(limits::Refused::Connections) => Some(WireRefusal::AddressConnections),
                            Err(limits::Refused::Rate) => Some(WireRefusal::AddressRate),
                        }
                    };
                    if let Some(why) = refusal {
                        log::debug!("refused a connection from {}: {why:?}", peer.ip());
                        self.metrics.limited(why);
                        self.refuse(stream, why, now.mono);
                        continue;
                    }
                    self.open.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    let serial = self.core.accept(
                        Socket {
                            stream,
                            ip: peer.ip(),
                            paused: false,
                        },
                        now,
                    );
                    let Some(conn) = self.core.conn_mut(serial) else {
                        continue;
                    };
                    if let Err(e) = self.poll.registry().register(
                        &mut conn.io.stream,
                        Token(serial as usize),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a connection from {peer}: {e}");
                        self.core.hang_up(serial);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: try again on
                    // the next readiness event rather than spin.
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads until `WouldBlock` (readiness is edge-triggered), or until
    /// the connection's output is over the cap: then its input waits
    /// (spec §9) until [`Worker::write`] drained the output.
    fn read(&mut self, serial: u64, now: Now) {
        loop {
            let Some(conn) = self.core.conn_mut(serial) else { return };
            if !conn.session.wants_input() {
                conn.io.paused = true;
                return;
            }
            conn.io.paused = false;
            match conn.io.stream.read(&mut self.read_buf) {
                Ok(0) => {
                    self.core.hang_up(serial);
                    return;
                }
                Ok(n) => {
                    self.metrics.read(n);
                    self.core.input(serial, &self.read_buf[..n], now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.core.hang_up(serial);
                    return;
                }
            }
        }
    }

    /// Writes a connection's pending output until done or `WouldBlock`.
    fn write(&mut self, serial: u64, now: Now) {
        loop {
            let Some(conn) = self.core.conn_mut(serial) else { return };
            let out = conn.session.transmit();
            if out.is_empty() {
                return;
            }
            match conn.io.stream.write(out) {
                Ok(n) => {
                    self.metrics.wrote(n);
                    self.core.wrote(serial, n, now);
                    if let Some(conn) = self.core.conn_mut(serial)
                        && conn.io.paused
                        && conn.session.wants_input()
                    {
                        // Readiness was consumed while paused: read now.
                        self.read(serial, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.core.hang_up(serial);
                    return;
                }
            }
        }
    }

    /// Writes every connection with new output, and drops finished ones.
    fn flush_output(&mut self, now: Now) {
        loop {
            let dirty = self.core.take_dirty();
            if dirty.is_empty() {
                break;
            }
            for serial in dirty {
                self.write(serial, now);
            }
        }
        for (_, mut socket) in self.core.take_dead() {
            let _ = self.poll.registry().deregister(&mut socket.stream);
            self.limits.release(socket.ip);
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    /// The retry-after the daemon sends is the one the spec's vectors show
    /// (spec §2).
    #[test]
    fn busy_refusals_are_the_vectors() {
        for (why, file) in [
            (WireRefusal::AddressConnections, "refusal-address-connections.hex"),
            (WireRefusal::AddressRate, "refusal-address-rate.hex"),
            (WireRefusal::ServerFull, "refusal-server-full.hex"),
            (WireRefusal::ShuttingDown, "refusal-shutting-down.hex"),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("protocol-spec/vectors")
                .join(file);
            let text = std::fs::read_to_string(path).unwrap();
            let hex: String = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
                .collect();
            assert_eq!(hex::decode(hex).unwrap(), why.busy_bytes(retry_after(why)), "{file}");
        }
    }
}
