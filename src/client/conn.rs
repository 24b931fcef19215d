//! One client connection's protocol state, sans-I/O.
//!
//! A [`Conn`] takes the bytes read from the socket and the current time and
//! produces bytes to write, [`ConnEvent`]s and its next deadline; it never
//! touches a socket or reads the clock, so tests drive it against the
//! server's [`crate::session::Session`] in memory.
//!
//! Order of calls, for a driver: [`Conn::new`] queues the preamble and the
//! first handshake message; write [`Conn::transmit`] and report it with
//! [`Conn::advance`]; feed what is read to [`Conn::handle_input`] (and
//! [`Conn::handle_eof`] at end of stream), call [`Conn::handle_timeout`]
//! when [`Conn::poll_timeout`] passes; after each input, take
//! [`Conn::poll_event`] until `None` and write again. Requests
//! ([`Conn::request`]) are possible once [`ConnEvent::Ready`] was seen.
//!
//! States, named by what they wait for: `ExpectServerHello` → `Open` →
//! `Closed`. The connection answers the server's `Ping` itself and pings
//! after [`ConnConfig::ping_after`] without hearing anything, and gives up
//! after [`ConnConfig::dead_after`] of silence. What it does not do: decide
//! what answers mean, store anything, or retry.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::noise::{self, ExpectServerHello, Keypair, NoiseError, Opened, PublicKey, Transport};
use crate::wire::{
    self, ClientFrame, Deliver, EphemeralDeliver, ErrorCode, ExpiredNotice, Flow, FrameError, GapNotice,
    HANDSHAKE_RECORD_CAP, MAX_RECORD_LEN, Presence, REFUSAL_LEN, ReceiptDeliver, RecordDecoder, RecordError,
    RefusalNotice, ServerFrame,
};

/// Timeouts of a client connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// From the first byte sent to the end of the handshake.
    pub handshake_timeout: Duration,
    /// Without anything received for this long, send `Ping` (the server
    /// pings after 30 s and closes after 90 s of silence from the client;
    /// spec §9: clients ping after 30 s in which they received nothing).
    pub ping_after: Duration,
    /// Without anything received for this long, the connection is dead.
    pub dead_after: Duration,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            handshake_timeout: Duration::from_secs(10),
            ping_after: Duration::from_secs(30),
            dead_after: Duration::from_secs(60),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The server refused the connection in the clear (spec §2): a bad
    /// preamble, or (reasons 3 and up) it is busy and says when to come
    /// back.
    Refused(RefusalNotice),
    /// The handshake failed: usually not the server the code named, or the
    /// server closed without a word (for example a revoked key on an older
    /// server).
    Handshake,
    /// The server said `Close`.
    ByServer {
        /// Why.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// The server sent something that cannot be trusted (a record that
    /// does not open, an oversized record, a frame that does not decode).
    Broken,
    /// Nothing heard for too long.
    TimedOut,
    /// The stream ended.
    EndOfStream,
    /// This side closed it.
    Local,
}

/// What the connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    /// The handshake is done; requests may be sent.
    Ready,
    /// The answer to a request.
    Answer {
        /// The request id it echoes.
        req: u32,
        /// The answer (`Error` included; an answer of a kind this build
        /// does not know arrives as `Error { code: UNSUPPORTED }`).
        frame: ServerFrame,
    },
    /// A queued message for this device.
    Deliver(Deliver),
    /// A queued receipt (spec §5.5); acknowledged like a message.
    Receipt(ReceiptDeliver),
    /// A queued gap notice: messages for this device expired (spec §10);
    /// acknowledged like a message.
    Gap(GapNotice),
    /// A queued expiry notice: messages of this user expired undelivered
    /// in a device's queue (spec §10); acknowledged like a message.
    Expired(ExpiredNotice),
    /// An ephemeral body (spec §5.6): not a queue entry, not acknowledged.
    Ephemeral(EphemeralDeliver),
    /// A watched user's presence (spec §5.6).
    Presence(Presence),
    /// Everything queued at authentication has been delivered.
    QueueDrained,
    /// The server says this device's stock of one-time keys is low (spec
    /// §5.4: sent unasked at authentication and when claims drain it).
    KeyCount(u32),
    /// How long to wait before trying again a request refused for a rate:
    /// it comes right before that refusal (spec §5.3, `RetryAfter`).
    RetryAfter(std::time::Duration),
    /// A queued group message, group notice, group receipt or block
    /// notice (spec §5.8); acknowledged like a message.
    Queued(ServerFrame),
    /// The connection is over; no more events follow.
    Closed(Closed),
}

/// Errors from the sending side of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The handshake has not finished, or the connection is closed.
    #[error("the connection is not open")]
    NotOpen,
    /// The frame does not fit in a record.
    #[error("the request is too large for one record")]
    TooLarge,
}

enum State {
    ExpectServerHello(Box<ExpectServerHello>),
    Open(Box<Transport>),
    Closed,
}

/// A client connection.
pub struct Conn {
    state: State,
    decoder: RecordDecoder,
    /// The first bytes from the server while they may be a refusal.
    sniff: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    plain: Vec<u8>,
    scratch: Vec<u8>,
    events: VecDeque<ConnEvent>,
    next_req: u32,
    started: Instant,
    last_rx: Instant,
    ping_sent: bool,
    /// Whether [`ConnEvent::Closed`] was reported.
    ended: bool,
    config: ConnConfig,
}

impl Conn {
    /// Starts a connection as `local` to the server whose static key is
    /// `server`, at `now`: the preamble and first handshake message are
    /// ready in [`Conn::transmit`].
    ///
    /// # Errors
    /// [`NoiseError::Handshake`] if `server` is not a usable key.
    pub fn new(local: &Keypair, server: &PublicKey, config: ConnConfig, now: Instant) -> Result<Conn, NoiseError> {
        let mut out = Vec::new();
        let hello = noise::client_start(local, server, &mut out)?;
        Ok(Conn {
            state: State::ExpectServerHello(Box::new(hello)),
            decoder: RecordDecoder::new(),
            sniff: Vec::new(),
            out,
            out_pos: 0,
            plain: Vec::new(),
            scratch: Vec::new(),
            events: VecDeque::new(),
            next_req: 1,
            started: now,
            last_rx: now,
            ping_sent: false,
            ended: false,
            config,
        })
    }

    /// Whether the handshake is done and the connection not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Handles bytes read from the server.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if data.is_empty() || self.is_closed() {
            return;
        }
        self.last_rx = now;
        self.ping_sent = false;
        if let State::ExpectServerHello(_) = self.state {
            // spec §2: a refusal is 10 or 12 clear bytes starting with the
            // magic; a handshake record starts with a length far below
            // 'T' << 8.
            if !self.sniff.is_empty() || (self.decoder.buffered() == 0 && data[0] == wire::MAGIC[0]) {
                let mut data = data;
                while !data.is_empty() {
                    let want = RefusalNotice::len_for(&self.sniff).unwrap_or(REFUSAL_LEN);
                    if self.sniff.len() >= want {
                        break;
                    }
                    let take = (want - self.sniff.len()).min(data.len());
                    self.sniff.extend_from_slice(&data[..take]);
                    data = &data[take..];
                }
                let want = RefusalNotice::len_for(&self.sniff).unwrap_or(REFUSAL_LEN);
                if self.sniff.len() < want {
                    return;
                }
                let closed = match RefusalNotice::parse(&self.sniff) {
                    Some(n) => Closed::Refused(n),
                    None => Closed::Handshake,
                };
                self.finish(closed);
                return;
            }
        }
        let cap = self.record_cap();
        let mut split = Split {
            state: &mut self.state,
            out: &mut self.out,
            plain: &mut self.plain,
            scratch: &mut self.scratch,
            events: &mut self.events,
        };
        let result = self.decoder.feed(data, cap, |body| split.on_record(body, now));
        match result {
            Ok(_) => {}
            Err(Fatal::Record) | Err(Fatal::Broken) => self.finish(Closed::Broken),
            Err(Fatal::Handshake) => self.finish(Closed::Handshake),
            Err(Fatal::ByServer(code, text)) => self.finish(Closed::ByServer { code, text }),
        }
    }

    /// Handles the end of the stream from the server.
    pub fn handle_eof(&mut self) {
        let closed = match self.state {
            // A busy refusal cut short still says the server was busy.
            State::ExpectServerHello(_) => match RefusalNotice::parse(&self.sniff) {
                Some(n) => Closed::Refused(n),
                None if self.sniff.len() >= REFUSAL_LEN => match self.sniff.get(8) {
                    Some(&r) if r >= 3 && self.sniff[..7] == wire::MAGIC => Closed::Refused(RefusalNotice {
                        reason: r,
                        version: self.sniff[9],
                        retry_after: None,
                    }),
                    _ => Closed::Handshake,
                },
                None => Closed::Handshake,
            },
            _ => Closed::EndOfStream,
        };
        self.finish(closed);
    }

    /// Handles the passing of time (calling early is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::ExpectServerHello(_) => {
                if now >= self.started + self.config.handshake_timeout {
                    self.finish(Closed::TimedOut);
                }
            }
            State::Open(_) => {
                if now >= self.last_rx + self.config.dead_after {
                    self.finish(Closed::TimedOut);
                } else if !self.ping_sent && now >= self.last_rx + self.config.ping_after {
                    self.ping_sent = true;
                    let _ = self.request(&ClientFrame::Ping, now);
                }
            }
            State::Closed => {}
        }
    }

    /// When [`Conn::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::ExpectServerHello(_) => Some(self.started + self.config.handshake_timeout),
            State::Open(_) if self.ping_sent => Some(self.last_rx + self.config.dead_after),
            State::Open(_) => Some(self.last_rx + self.config.ping_after),
            State::Closed => None,
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        self.events.pop_front()
    }

    /// Sends a request; returns its id (from 1, never 0), which the answer
    /// echoes.
    ///
    /// # Errors
    /// [`ConnError`]; nothing was queued.
    pub fn request(&mut self, frame: &ClientFrame, now: Instant) -> Result<u32, ConnError> {
        let req = self.next_req;
        self.seal(req, frame, now)?;
        self.next_req = self.next_req.checked_add(1).unwrap_or(1);
        Ok(req)
    }

    /// Sends a frame nobody answers (`Ack`, `Pong`, `Close`) with id 0.
    ///
    /// # Errors
    /// [`ConnError`]; nothing was queued.
    pub fn notify(&mut self, frame: &ClientFrame, now: Instant) -> Result<(), ConnError> {
        self.seal(0, frame, now)
    }

    /// Sends `Close` and ends the connection; [`Conn::transmit`] still holds
    /// the last bytes to write.
    pub fn close(&mut self, now: Instant) {
        let _ = self.notify(&ClientFrame::Close, now);
        self.finish(Closed::Local);
    }

    /// Bytes waiting to be written.
    pub fn transmit(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Reports that `n` bytes of [`Conn::transmit`] were written.
    pub fn advance(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 64 * 1024 {
                self.out = Vec::new();
            }
        }
    }

    fn seal(&mut self, req: u32, frame: &ClientFrame, now: Instant) -> Result<(), ConnError> {
        let State::Open(transport) = &mut self.state else {
            return Err(ConnError::NotOpen);
        };
        self.scratch.clear();
        wire::encode_client(req, frame, &mut self.scratch);
        transport
            .seal(&self.scratch, now, &mut self.out)
            .map_err(|_| ConnError::TooLarge)
    }

    fn record_cap(&self) -> usize {
        match self.state {
            State::ExpectServerHello(_) => HANDSHAKE_RECORD_CAP,
            _ => MAX_RECORD_LEN,
        }
    }

    fn finish(&mut self, closed: Closed) {
        if !self.ended {
            self.ended = true;
            self.state = State::Closed;
            self.decoder = RecordDecoder::new();
            self.events.push_back(ConnEvent::Closed(closed));
        }
    }
}

/// What ends the connection from inside the record callback.
enum Fatal {
    Record,
    Handshake,
    Broken,
    ByServer(ErrorCode, String),
}

impl From<RecordError> for Fatal {
    fn from(_: RecordError) -> Fatal {
        Fatal::Record
    }
}

/// The parts of a [`Conn`] the record callback needs, split from the decoder.
struct Split<'a> {
    state: &'a mut State,
    out: &'a mut Vec<u8>,
    plain: &'a mut Vec<u8>,
    scratch: &'a mut Vec<u8>,
    events: &'a mut VecDeque<ConnEvent>,
}

impl Split<'_> {
    fn on_record(&mut self, body: &[u8], now: Instant) -> Result<Flow, Fatal> {
        match std::mem::replace(self.state, State::Closed) {
            State::ExpectServerHello(hello) => {
                let transport = hello.handle(body, now, self.out).map_err(|_| Fatal::Handshake)?;
                *self.state = State::Open(Box::new(transport));
                self.events.push_back(ConnEvent::Ready);
                Ok(Flow::Continue(MAX_RECORD_LEN))
            }
            State::Open(mut transport) => {
                let opened = transport.open(body, self.plain).map_err(|_| Fatal::Broken)?;
                *self.state = State::Open(transport);
                if opened == Opened::Frame {
                    self.on_frame(now)?;
                }
                Ok(Flow::Continue(MAX_RECORD_LEN))
            }
            State::Closed => Ok(Flow::Stop),
        }
    }

    fn on_frame(&mut self, now: Instant) -> Result<(), Fatal> {
        let (req, frame) = match wire::decode_server(self.plain, self.scratch) {
            Ok(f) => f,
            // A newer server's frame kind: an answer we cannot read is an
            // error for that request; a push we cannot read is skipped.
            Err(FrameError::Unsupported { req, tag }) => {
                log::debug!("skipping server frame of unknown kind {tag} (req {req})");
                if req != 0 {
                    self.events.push_back(ConnEvent::Answer {
                        req,
                        frame: ServerFrame::error(ErrorCode::UNSUPPORTED, "answer of an unknown kind"),
                    });
                }
                return Ok(());
            }
            Err(_) => return Err(Fatal::Broken),
        };
        match frame {
            ServerFrame::Ping => {
                let State::Open(transport) = self.state else {
                    return Ok(());
                };
                self.scratch.clear();
                wire::encode_client(0, &ClientFrame::Pong, self.scratch);
                let _ = transport.seal(self.scratch, now, self.out);
            }
            ServerFrame::Close { code, text } => return Err(Fatal::ByServer(code, text)),
            ServerFrame::Deliver(d) if req == 0 => self.events.push_back(ConnEvent::Deliver(d)),
            ServerFrame::Receipt(r) if req == 0 => self.events.push_back(ConnEvent::Receipt(r)),
            ServerFrame::Gap(g) if req == 0 => self.events.push_back(ConnEvent::Gap(g)),
            ServerFrame::Expired(e) if req == 0 => self.events.push_back(ConnEvent::Expired(e)),
            ServerFrame::Ephemeral(e) if req == 0 => self.events.push_back(ConnEvent::Ephemeral(e)),
            ServerFrame::Presence(p) if req == 0 => self.events.push_back(ConnEvent::Presence(p)),
            ServerFrame::QueueDrained if req == 0 => self.events.push_back(ConnEvent::QueueDrained),
            ServerFrame::KeyCount { one_time } if req == 0 => self.events.push_back(ConnEvent::KeyCount(one_time)),
            ServerFrame::RetryAfter { after_ms } if req == 0 => self
                .events
                .push_back(ConnEvent::RetryAfter(std::time::Duration::from_millis(after_ms))),
            f @ (ServerFrame::GroupDeliver(_)
            | ServerFrame::GroupNotice(_)
            | ServerFrame::GroupReceipt(_)
            | ServerFrame::BlockNotice(_))
                if req == 0 =>
            {
                self.events.push_back(ConnEvent::Queued(f))
            }
            ServerFrame::Pong if req == 0 => {}
            frame if req != 0 => self.events.push_back(ConnEvent::Answer { req, frame }),
            other => log::debug!("ignoring unsolicited {}", other.kind()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
