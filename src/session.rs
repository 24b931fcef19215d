//! One server connection's protocol state machine, sans-I/O (spec §8).
//!
//! A [`Session`] takes the bytes read from its socket and the current time,
//! and produces bytes to write, [`Event`]s for the hub, and its next
//! deadline. It never touches a socket or reads the clock, so tests drive
//! it entirely in memory.
//!
//! Order of calls, for a driver: [`Session::handle_input`] with what was
//! read (or [`Session::handle_timeout`] when [`Session::poll_timeout`] has
//! passed); then [`Session::poll_event`] until `None`, answering with
//! [`Session::send`] and friends; then write [`Session::transmit`] and
//! report what was written with [`Session::advance`]; drop the connection
//! once [`Session::is_closed`].
//!
//! States, named by what they wait for: `ExpectPreamble` →
//! `ExpectClientHello` → `ExpectClientAuth` → `Unregistered` or
//! `Authenticated` → `Closing` → `Closed`. The session itself answers
//! `Ping`, enforces which frames each state allows, and answers malformed
//! and unknown frames; everything else goes to the hub as
//! [`Event::Frame`]. What it does not do: decide who a key belongs to
//! (the caller's `identify` does), or anything about accounts and queues.
//!
//! Memory (DESIGN, guarantee 7): a session holds a buffer only while it
//! has something in it. Output is freed once written, the event queue
//! once polled empty, the record decoder's buffer once its record is
//! whole; the plaintext of the record being handled and the encoding of a
//! frame use buffers of the thread that drives the session, since both
//! are done with before a call returns. The Noise transport keeps its
//! keys and counters and nothing else (see [`crate::noise`]). An idle
//! authenticated session is therefore its own struct, a boxed transport
//! and two 32-byte keys.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use crate::ids::DeviceKey;
pub use crate::ids::Identity;
use crate::noise::{ExpectClientAuth, ExpectClientHello, Keypair, Opened, PublicKey, Transport};
use crate::wire::{
    self, ClientFrame, ErrorCode, Flow, FrameError, HANDSHAKE_RECORD_CAP, MAX_RECORD_LEN, MAX_TEXT_LEN, PREAMBLE_LEN,
    RecordDecoder, RecordError, ServerFrame,
};

/// How a connection's start ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// A current device's key.
    Authenticated,
    /// A key no device has (it may register).
    Unregistered,
    /// A revoked device's key (told so).
    Revoked,
    /// The handshake failed (a wrong server key among the reasons).
    Failed,
    /// It did not finish in time.
    TimedOut,
    /// The preamble was refused.
    BadPreamble,
}

/// Watches what sessions do (metrics); shared by every session.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A frame was queued for a client.
    fn frame_sent(&self, frame: &ServerFrame);
    /// A connection's start ended so.
    fn handshake(&self, outcome: HandshakeOutcome);
}

/// Limits and timeouts for sessions (spec §9).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// From accept to the end of the handshake.
    pub handshake_timeout: Duration,
    /// Without anything received for this long, the server sends `Ping`.
    pub ping_after: Duration,
    /// Without anything received for this long, the server closes.
    pub idle_timeout: Duration,
    /// How long a closing session may take to flush its last bytes.
    pub linger: Duration,
    /// Most bytes waiting to be written: past it the server stops reading
    /// the connection's input (spec §9), so that a client that reads is
    /// slowed down, never dropped.
    pub max_output: usize,
    /// Who counts what sessions do, if anyone.
    pub observer: Option<std::sync::Arc<dyn Observer>>,
}

/// Output a connection may have waiting beyond [`SessionConfig::max_output`]
/// (answers to requests read before the input paused) before the peer
/// counts as not reading at all: then it gets `Close SLOW_CONSUMER` and is
/// dropped (spec §9).
pub const OUTPUT_SLACK: usize = 1 << 20;

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            handshake_timeout: Duration::from_secs(10),
            ping_after: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            linger: Duration::from_secs(5),
            max_output: 1 << 20,
            observer: None,
        }
    }
}

/// What the session hands to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection is now this device (after the handshake or after
    /// [`Session::set_device`]).
    Authenticated(DeviceKey),
    /// A frame the state allows and the session does not handle itself.
    Frame {
        /// To echo in the answer.
        req: u32,
        /// The frame.
        frame: ClientFrame,
    },
}

/// Where a connection stands.
enum State {
    ExpectPreamble {
        got: [u8; PREAMBLE_LEN],
        len: usize,
    },
    ExpectClientHello(Box<ExpectClientHello>),
    ExpectClientAuth(Box<ExpectClientAuth>),
    Unregistered(Box<Transport>),
    Authenticated(Box<Transport>, DeviceKey),
    /// Flushing its last bytes; reads nothing more.
    Closing {
        since: Instant,
    },
    Closed,
}

/// The kind of state, for callers and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before and during the handshake.
    Handshaking,
    /// Handshake done, key not registered.
    Unregistered,
    /// A known device.
    Authenticated,
    /// Writing its last bytes.
    Closing,
    /// Done; drop the connection.
    Closed,
}

/// The parts of a session the record callback needs, split from the
/// decoder so both can be borrowed at once.
struct Inner {
    state: State,
    /// Bytes to write; no allocation while empty.
    out: Vec<u8>,
    /// Bytes of `out` already written.
    out_pos: usize,
    /// No allocation while empty.
    events: VecDeque<Event>,
    /// When the connection was accepted, during the handshake; when the
    /// last whole record arrived, after it.
    since: Instant,
    ping_sent: bool,
    /// Who the peer was when it sent `Close`: the frames it sent before
    /// are still handled as that key and device (spec §5.2 `Close`:
    /// requests in progress complete). Boxed: nothing while unused.
    leaving: Option<Box<(PublicKey, Option<DeviceKey>)>>,
    config: Arc<SessionConfig>,
}

/// A server connection's protocol state.
pub struct Session {
    decoder: RecordDecoder,
    inner: Inner,
    server_key: Arc<Keypair>,
}

/// Thread buffers above this capacity are freed after use rather than kept.
const KEEP_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// The plaintext of the record being handled.
    static PLAIN: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// A frame being encoded, or re-encoded for the canonical check.
    static ENCODED: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Lends this thread's `buffer` (empty) for the length of `f`. A nested
/// loan of the same buffer gets a fresh one: slower, never wrong.
fn with_buffer<R>(buffer: &'static LocalKey<Cell<Vec<u8>>>, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = buffer.take();
    buf.clear();
    let result = f(&mut buf);
    if buf.capacity() <= KEEP_CAPACITY {
        buffer.set(buf);
    }
    result
}

impl Session {
    /// A session for a connection accepted at `now`. Sessions of one
    /// server share their configuration (pass an `Arc`), or each gets a
    /// copy.
    pub fn new(server_key: Arc<Keypair>, config: impl Into<Arc<SessionConfig>>, now: Instant) -> Session {
        Session {
            decoder: RecordDecoder::new(),
            inner: Inner {
                state: State::ExpectPreamble {
                    got: [0; PREAMBLE_LEN],
                    len: 0,
                },
                out: Vec::new(),
                out_pos: 0,
                events: VecDeque::new(),
                since: now,
                ping_sent: false,
                leaving: None,
                config: config.into(),
            },
            server_key,
        }
    }

    /// Handles bytes read from the peer. `identify` says who a client's
    /// static key belongs to once the handshake completes.
    pub fn handle_input(&mut self, mut data: &[u8], now: Instant, identify: &mut dyn FnMut(&PublicKey) -> Identity) {
        let inner = &mut self.inner;
        if data.is_empty() {
            return;
        }
        if let State::ExpectPreamble { got, len } = &mut inner.state {
            let take = (PREAMBLE_LEN - *len).min(data.len());
            got[*len..*len + take].copy_from_slice(&data[..take]);
            *len += take;
            data = &data[take..];
            if *len < PREAMBLE_LEN {
                return;
            }
            // spec §2: a wrong magic or version gets the refusal, then close.
            match wire::check_preamble(got) {
                Ok(()) => match ExpectClientHello::new(&self.server_key) {
                    Ok(h) => inner.state = State::ExpectClientHello(Box::new(h)),
                    Err(_) => inner.state = State::Closed,
                },
                Err(refusal) => {
                    inner.observe(HandshakeOutcome::BadPreamble);
                    inner.out.extend_from_slice(&refusal.to_bytes());
                    inner.state = State::Closing { since: now };
                    return;
                }
            }
        }
        let Some(cap) = inner.record_cap() else { return };
        let result = self
            .decoder
            .feed(data, cap, |body| inner.on_record(body, now, identify));
        if result.is_err() {
            // spec §3: a record over the cap, or a fatal Noise failure:
            // the stream cannot be trusted; close without detail.
            if matches!(inner.state, State::ExpectClientHello(_) | State::ExpectClientAuth(_)) {
                inner.observe(HandshakeOutcome::Failed);
            }
            inner.state = State::Closed;
        }
    }

    /// Handles the passing of time. Call when [`Session::poll_timeout`] is
    /// reached (calling earlier is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        let inner = &mut self.inner;
        match inner.state {
            State::ExpectPreamble { .. } | State::ExpectClientHello(_) | State::ExpectClientAuth(_) => {
                if now >= inner.since + inner.config.handshake_timeout {
                    // spec §9: silent close.
                    inner.observe(HandshakeOutcome::TimedOut);
                    inner.state = State::Closed;
                }
            }
            State::Unregistered(_) | State::Authenticated(..) => {
                if now >= inner.since + inner.config.idle_timeout {
                    // Input is not read while the output is over the cap:
                    // silence then means the peer does not read (spec §9).
                    if inner.pending() > inner.config.max_output {
                        inner.close(ErrorCode::SLOW_CONSUMER, "not reading", now);
                    } else {
                        inner.close(ErrorCode::IDLE_TIMEOUT, "idle timeout", now);
                    }
                } else if !inner.ping_sent && now >= inner.since + inner.config.ping_after {
                    inner.ping_sent = true;
                    inner.send(0, &ServerFrame::Ping, now);
                }
            }
            State::Closing { since } => {
                if now >= since + inner.config.linger {
                    inner.state = State::Closed;
                }
            }
            State::Closed => {}
        }
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let i = &self.inner;
        match i.state {
            State::ExpectPreamble { .. } | State::ExpectClientHello(_) | State::ExpectClientAuth(_) => {
                Some(i.since + i.config.handshake_timeout)
            }
            State::Unregistered(_) | State::Authenticated(..) => Some(if i.ping_sent {
                i.since + i.config.idle_timeout
            } else {
                i.since + i.config.ping_after
            }),
            State::Closing { since } => Some(since + i.config.linger),
            State::Closed => None,
        }
    }

    /// The next event for the hub.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.inner.events.pop_front();
        if event.is_none() && self.inner.events.capacity() > 0 {
            self.inner.events = VecDeque::new();
        }
        event
    }

    /// Sends a frame, if the connection is in a transport state. Returns
    /// whether it was queued. A peer that lets more than
    /// [`SessionConfig::max_output`] and [`OUTPUT_SLACK`] bytes pile up
    /// gets `Close SLOW_CONSUMER` and is dropped.
    pub fn send(&mut self, req: u32, frame: &ServerFrame, now: Instant) -> bool {
        self.inner.send(req, frame, now)
    }

    /// Sends an `Error` answer to `req`.
    pub fn send_error(&mut self, req: u32, code: ErrorCode, text: &str, now: Instant) -> bool {
        self.inner.send(req, &ServerFrame::error(code, text), now)
    }

    /// Sends `Close` (if the connection can still send) and stops reading.
    pub fn close(&mut self, code: ErrorCode, text: &str, now: Instant) {
        self.inner.close(code, text, now)
    }

    /// Marks an unregistered connection as the device it just registered or
    /// linked; emits [`Event::Authenticated`]. Ignored in any other state.
    pub fn set_device(&mut self, device: DeviceKey) {
        let inner = &mut self.inner;
        if let State::Unregistered(_) = inner.state {
            let State::Unregistered(t) = std::mem::replace(&mut inner.state, State::Closed) else {
                unreachable!("checked above")
            };
            inner.state = State::Authenticated(t, device);
            inner.events.push_back(Event::Authenticated(device));
        }
    }

    /// Bytes waiting to be written. Nothing once the session is `Closed`
    /// (a hard close drops what was queued).
    pub fn transmit(&self) -> &[u8] {
        if matches!(self.inner.state, State::Closed) {
            return &[];
        }
        &self.inner.out[self.inner.out_pos..]
    }

    /// Reports that `n` bytes of [`Session::transmit`] were written. Once
    /// everything is written the output buffer is freed.
    pub fn advance(&mut self, n: usize) {
        let i = &mut self.inner;
        i.out_pos = (i.out_pos + n).min(i.out.len());
        if i.out_pos == i.out.len() {
            i.out = Vec::new();
            i.out_pos = 0;
        }
    }

    /// Number of bytes waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.inner.pending()
    }

    /// Whether the driver should read the connection's input: not while
    /// more than [`SessionConfig::max_output`] bytes wait to be written
    /// (spec §9); the driver reads again once [`Session::advance`] brought
    /// the output back under it.
    pub fn wants_input(&self) -> bool {
        self.inner.pending() <= self.inner.config.max_output
    }

    /// Whether the hub may queue more deliveries without piling up output:
    /// less than a quarter of the output cap is waiting.
    pub fn wants_more(&self) -> bool {
        self.room() > 0
    }

    /// Output bytes deliveries may still add before they pause (a quarter
    /// of the output cap, less what is waiting); 0 unless authenticated.
    pub fn room(&self) -> usize {
        if !matches!(self.inner.state, State::Authenticated(..)) {
            return 0;
        }
        (self.inner.config.max_output / 4).saturating_sub(self.pending_output())
    }

    /// Whether the connection is finished: closed, or closing with nothing
    /// left to write.
    pub fn is_closed(&self) -> bool {
        match self.inner.state {
            State::Closed => true,
            State::Closing { .. } => self.pending_output() == 0,
            _ => false,
        }
    }

    /// Where the connection stands.
    pub fn phase(&self) -> Phase {
        match self.inner.state {
            State::ExpectPreamble { .. } | State::ExpectClientHello(_) | State::ExpectClientAuth(_) => {
                Phase::Handshaking
            }
            State::Unregistered(_) => Phase::Unregistered,
            State::Authenticated(..) => Phase::Authenticated,
            State::Closing { .. } => Phase::Closing,
            State::Closed => Phase::Closed,
        }
    }

    /// The device this connection is, once authenticated (and after the
    /// client's `Close`, for the frames it sent before it).
    pub fn device(&self) -> Option<DeviceKey> {
        match self.inner.state {
            State::Authenticated(_, d) => Some(d),
            State::Closing { .. } => self.inner.leaving.as_deref().and_then(|(_, d)| *d),
            _ => None,
        }
    }

    /// The client's static key, once the handshake is done and until close
    /// (and after the client's `Close`, for the frames it sent before it).
    pub fn remote_static(&self) -> Option<&PublicKey> {
        match &self.inner.state {
            State::Unregistered(t) | State::Authenticated(t, _) => t.remote_static(),
            State::Closing { .. } => self.inner.leaving.as_deref().map(|(k, _)| k),
            _ => None,
        }
    }

    /// Heap bytes this session holds in its buffers (for memory tests).
    pub fn buffer_capacity(&self) -> usize {
        self.decoder.capacity()
            + self.inner.out.capacity()
            + self.inner.events.capacity() * std::mem::size_of::<Event>()
    }
}

/// The record-level failures that end a connection.
enum Fatal {
    Record,
}

impl From<RecordError> for Fatal {
    fn from(_: RecordError) -> Fatal {
        Fatal::Record
    }
}

impl Inner {
    /// The cap on the next record in this state (spec §3); `None` when no
    /// more input is read.
    fn record_cap(&self) -> Option<usize> {
        match self.state {
            State::ExpectPreamble { .. } => None,
            State::ExpectClientHello(_) | State::ExpectClientAuth(_) => Some(HANDSHAKE_RECORD_CAP),
            State::Unregistered(_) | State::Authenticated(..) => Some(MAX_RECORD_LEN),
            State::Closing { .. } | State::Closed => None,
        }
    }

    fn next(&self) -> Flow {
        match self.record_cap() {
            Some(cap) => Flow::Continue(cap),
            None => Flow::Stop,
        }
    }

    fn on_record(
        &mut self,
        body: &[u8],
        now: Instant,
        identify: &mut dyn FnMut(&PublicKey) -> Identity,
    ) -> Result<Flow, Fatal> {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::ExpectClientHello(h) => {
                // spec §4: a failed handshake closes without a word.
                match h.handle(body, &mut self.out) {
                    Ok(next) => self.state = State::ExpectClientAuth(Box::new(next)),
                    Err(_) => self.observe(HandshakeOutcome::Failed),
                }
            }
            State::ExpectClientAuth(a) => match a.handle(body, now) {
                Ok((transport, remote)) => {
                    self.since = now;
                    match identify(&remote) {
                        Identity::Device(d) => {
                            self.observe(HandshakeOutcome::Authenticated);
                            self.state = State::Authenticated(Box::new(transport), d);
                            self.events.push_back(Event::Authenticated(d));
                        }
                        Identity::Unregistered => {
                            self.observe(HandshakeOutcome::Unregistered);
                            self.state = State::Unregistered(Box::new(transport));
                        }
                        Identity::Revoked => {
                            self.observe(HandshakeOutcome::Revoked);
                            self.state = State::Unregistered(Box::new(transport));
                            self.close(ErrorCode::REVOKED, "this device was revoked", now);
                        }
                        Identity::Refused => self.observe(HandshakeOutcome::Failed),
                    }
                }
                Err(_) => self.observe(HandshakeOutcome::Failed),
            },
            // spec §4.3: a record that fails to open leaves the state Closed.
            State::Unregistered(mut t) => with_buffer(&PLAIN, |plain| {
                if let Ok(opened) = t.open(body, plain) {
                    self.active(now);
                    self.state = State::Unregistered(t);
                    if opened == Opened::Frame {
                        self.on_frame(plain, now);
                    }
                }
            }),
            State::Authenticated(mut t, d) => with_buffer(&PLAIN, |plain| {
                if let Ok(opened) = t.open(body, plain) {
                    self.active(now);
                    self.state = State::Authenticated(t, d);
                    if opened == Opened::Frame {
                        self.on_frame(plain, now);
                    }
                }
            }),
            other => self.state = other,
        }
        Ok(self.next())
    }

    /// A whole, authentic record arrived: the peer is alive (spec §9). Bytes
    /// that do not complete a record do not count, so a peer trickling
    /// bytes cannot hold a connection open.
    fn active(&mut self, now: Instant) {
        self.since = now;
        self.ping_sent = false;
    }

    /// Handles the frame in `plain` (spec §8).
    fn on_frame(&mut self, plain: &[u8], now: Instant) {
        let (req, frame) = match with_buffer(&ENCODED, |scratch| wire::decode_client(plain, scratch)) {
            Ok(f) => f,
            Err(e) => {
                // spec §5.1, vector server-03-error-unsupported: the text
                // names the tag.
                let text = match e {
                    FrameError::Unsupported { tag, .. } => format!("unsupported frame kind {tag}"),
                    FrameError::NonCanonical { .. } => "non-canonical encoding".into(),
                    _ => "malformed frame".into(),
                };
                self.send(e.req(), &ServerFrame::error(e.code(), &text), now);
                return;
            }
        };
        let registered = matches!(self.state, State::Authenticated(..));
        match frame {
            ClientFrame::Ping => {
                self.send(req, &ServerFrame::Pong, now);
            }
            ClientFrame::Pong => {}
            ClientFrame::Close => {
                // spec §5.2 `Close`: requests in progress complete, among
                // them those that came in the same read before it, which
                // the hub handles after this; it needs to know who sent
                // them.
                let device = match self.state {
                    State::Authenticated(_, d) => Some(d),
                    _ => None,
                };
                if let State::Unregistered(t) | State::Authenticated(t, _) = &self.state
                    && let Some(key) = t.remote_static()
                {
                    self.leaving = Some(Box::new((*key, device)));
                }
                self.state = State::Closing { since: now };
            }
            ClientFrame::Register { .. } | ClientFrame::RedeemLink { .. } if registered => {
                self.send(
                    req,
                    &ServerFrame::error(ErrorCode::NOT_ALLOWED, "already registered"),
                    now,
                );
            }
            ClientFrame::Register { .. } | ClientFrame::RedeemLink { .. } => {
                self.events.push_back(Event::Frame { req, frame });
            }
            _ if !registered => {
                self.send(req, &ServerFrame::error(ErrorCode::NOT_ALLOWED, "register first"), now);
            }
            _ => self.events.push_back(Event::Frame { req, frame }),
        }
    }

    fn send(&mut self, req: u32, frame: &ServerFrame, now: Instant) -> bool {
        let transport = match &mut self.state {
            State::Unregistered(t) | State::Authenticated(t, _) => t,
            _ => return false,
        };
        if self.out.len() - self.out_pos > self.config.max_output.saturating_add(OUTPUT_SLACK) {
            // spec §9: its input was not read since the output reached the
            // cap, and the output still grew: the peer does not read. It
            // gets `Close` (which it may never read) and is dropped.
            let close = ServerFrame::Close {
                code: ErrorCode::SLOW_CONSUMER,
                text: "not reading".into(),
            };
            let out = &mut self.out;
            let _ = with_buffer(&ENCODED, |encoded| {
                wire::encode_server(0, &close, encoded);
                transport.seal(encoded, now, out)
            });
            self.state = State::Closing { since: now };
            return false;
        }
        let out = &mut self.out;
        let sealed = with_buffer(&ENCODED, |encoded| {
            wire::encode_server(req, frame, encoded);
            transport.seal(encoded, now, out)
        });
        if sealed.is_err() {
            log::error!("server frame {} does not fit in a record", frame.kind());
            return false;
        }
        if let Some(o) = &self.config.observer {
            o.frame_sent(frame);
        }
        true
    }

    fn observe(&self, outcome: HandshakeOutcome) {
        if let Some(o) = &self.config.observer {
            o.handshake(outcome);
        }
    }

    fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn close(&mut self, code: ErrorCode, text: &str, now: Instant) {
        if matches!(self.state, State::Closing { .. } | State::Closed) {
            // Already closing: a second close must not extend the linger.
            return;
        }
        let text: String = text.chars().take(MAX_TEXT_LEN).collect();
        self.send(0, &ServerFrame::Close { code, text }, now);
        if !matches!(self.state, State::Closed) {
            self.state = State::Closing { since: now };
        }
    }
}

#[cfg(test)]
mod tests;
