//! The operations of a device: register, link, send with retry, receive
//! (sync and listen), devices and revoke, on top of one [`Link`] at a time.
//!
//! Guarantees:
//! - a received message is stored and flushed before it is acked, and a
//!   duplicate (same sender and id) is stored and reported once;
//! - an outgoing message is in the history (as pending) before its `Send`
//!   leaves, and is marked sent only after `Accepted`; every retry, after a
//!   `Mismatch` or a dropped connection, reuses its id;
//! - everything runs on the caller's thread: the only other threads read
//!   sockets into the one input channel.
//!
//! What it does not do: encrypt (see [`super::content`]), or hold the
//! profile lock (the [`Profile`] does).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use super::Error;
use super::conn::{Closed, ConnConfig, ConnEvent};
use super::content::{self, Content};
use super::link::{Input, Link};
use super::local::{Job, Outcome, Request};
use super::profile::{Direction, Message, Profile, Registration, Status};
use crate::code::Code;
use crate::noise::PublicKey;
use crate::wire::{self, Body, ClientFrame, DeviceAddr, DeviceId, DeviceInfo, MsgId, ServerFrame};

/// How long a request may wait for its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `send` keeps retrying over dropped connections.
pub const SEND_RETRY_FOR: Duration = Duration::from_secs(60);
/// Most `Mismatch` answers one send accepts before giving up.
pub const MAX_MISMATCHES: u32 = 5;
/// Longest pause between reconnects in `listen`.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a receiving client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new message, stored durably.
    Message(Message),
    /// Everything queued when the connection authenticated has arrived.
    Drained,
    /// Connected (and authenticated) to the server.
    Connected,
    /// The connection dropped; the text says why.
    Disconnected(String),
}

/// A device's client: its profile and at most one connection.
pub struct Client {
    profile: Profile,
    /// Whether deliveries are stored, acked and reported; when false they
    /// are left for a later `sync` or `listen`.
    receive: bool,
    tx: Sender<Input>,
    rx: Receiver<Input>,
    link: Option<Link>,
    epoch: u64,
    answers: HashMap<u32, ServerFrame>,
    /// Current devices by user, as last listed.
    devices: HashMap<String, Vec<DeviceId>>,
    /// Stored, not yet flushed and acked.
    fresh: Vec<Message>,
    ack_up_to: Option<u64>,
    drained: bool,
    events: VecDeque<Event>,
    jobs: VecDeque<Job>,
    config: ConnConfig,
    rng: SystemRandom,
    /// Inside [`Client::listen`].
    listening: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Client {
    /// A client on an open profile. With `receive`, deliveries are stored,
    /// acked and reported as [`Event`]s; without, they stay queued on the
    /// server.
    pub fn new(profile: Profile, receive: bool) -> Client {
        let (tx, rx) = mpsc::channel();
        Client {
            profile,
            receive,
            tx,
            rx,
            link: None,
            epoch: 0,
            answers: HashMap::new(),
            devices: HashMap::new(),
            fresh: Vec::new(),
            ack_up_to: None,
            drained: false,
            events: VecDeque::new(),
            jobs: VecDeque::new(),
            config: ConnConfig::default(),
            rng: SystemRandom::new(),
            listening: false,
        }
    }

    /// Sets the connection timeouts (tests shorten them).
    pub fn set_conn_config(&mut self, config: ConnConfig) {
        self.config = config;
    }

    /// The profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// A sender for work handed over by a second command.
    pub(crate) fn input_sender(&self) -> Sender<Input> {
        self.tx.clone()
    }

    /// The next reported event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the current connection has seen `QueueDrained`.
    pub fn is_drained(&self) -> bool {
        self.drained && self.is_connected()
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.conn.is_open())
    }

    /// Closes the connection, saying goodbye.
    pub fn disconnect(&mut self) {
        if let Some(link) = self.link.take() {
            link.close();
        }
    }

    fn me(&self) -> Result<String, Error> {
        Ok(self.profile.registered()?.user.clone())
    }

    // ---- connection ----

    /// Connects to the registered server, if not connected.
    ///
    /// # Errors
    /// [`Error::NotRegistered`]; connection and handshake failures.
    pub fn connect(&mut self) -> Result<(), Error> {
        let reg = self.profile.registered()?;
        let (addr, key) = (reg.server.clone(), reg.server_key);
        self.connect_to(&addr, &key)
    }

    fn connect_to(&mut self, addr: &str, server_key: &PublicKey) -> Result<(), Error> {
        if self.is_connected() {
            return Ok(());
        }
        self.link = None;
        self.epoch += 1;
        self.answers.clear();
        self.drained = false;
        self.ack_up_to = None;
        let link = Link::connect(
            addr,
            self.profile.key(),
            server_key,
            self.config.clone(),
            self.epoch,
            self.tx.clone(),
        )?;
        self.link = Some(link);
        let deadline = Instant::now() + self.config.handshake_timeout;
        while !self.is_connected() {
            self.pump(deadline)?;
        }
        log::debug!("connected to {addr}");
        Ok(())
    }

    /// Waits for one input (or `deadline`, or the connection's own timer)
    /// and handles it.
    fn pump(&mut self, deadline: Instant) -> Result<(), Error> {
        let now = Instant::now();
        let wake = match self.link.as_ref().and_then(|l| l.conn.poll_timeout()) {
            Some(t) => t.min(deadline),
            None => deadline,
        };
        let input = self.rx.recv_timeout(wake.saturating_duration_since(now));
        let now = Instant::now();
        match input {
            Ok(Input::Local(job)) => self.jobs.push_back(job),
            Ok(Input::Net { epoch, data }) => {
                if let Some(link) = self.link.as_mut().filter(|l| l.epoch == epoch) {
                    link.conn.handle_input(&data, now);
                }
            }
            Ok(Input::Eof { epoch }) => {
                if let Some(link) = self.link.as_mut().filter(|l| l.epoch == epoch) {
                    link.conn.handle_eof();
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(link) = self.link.as_mut() {
                    link.conn.handle_timeout(now);
                }
            }
            Err(RecvTimeoutError::Disconnected) => unreachable!("the client holds a sender"),
        }
        self.process()
    }

    /// Handles the connection's events, stores and acks deliveries, and
    /// writes what is queued.
    fn process(&mut self) -> Result<(), Error> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let mut closed = None;
        let mut drained = false;
        let mut delivered = Vec::new();
        while let Some(ev) = link.conn.poll_event() {
            match ev {
                ConnEvent::Ready => {}
                ConnEvent::Answer { req, frame } => {
                    self.answers.insert(req, frame);
                }
                ConnEvent::Deliver(d) => {
                    if self.receive {
                        delivered.push(d);
                    }
                }
                ConnEvent::QueueDrained => drained = true,
                ConnEvent::Closed(c) => closed = Some(c),
            }
        }
        for d in delivered {
            self.store_delivery(d)?;
        }
        if let Some(up_to) = self.ack_up_to.take() {
            // Durable first, then ack (at-least-once).
            self.profile.history().flush()?;
            if let Some(link) = self.link.as_mut().filter(|l| l.conn.is_open()) {
                let _ = link.conn.notify(&ClientFrame::Ack { up_to }, Instant::now());
            }
            self.events.extend(self.fresh.drain(..).map(Event::Message));
        }
        if drained && self.receive {
            self.drained = true;
            self.events.push_back(Event::Drained);
        }
        if let Some(c) = closed {
            self.link = None;
            return Err(Error::Closed(c));
        }
        if let Some(link) = self.link.as_mut()
            && let Err(e) = link.flush()
        {
            self.link = None;
            return Err(e);
        }
        Ok(())
    }

    fn store_delivery(&mut self, d: wire::Deliver) -> Result<(), Error> {
        let me = self.me()?;
        self.ack_up_to = Some(d.seq);
        let content = match content::open_body(&d.body, &d.from) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("dropping message {} from {}/{}: {e}", d.id, d.from.user, d.from.device);
                return Ok(());
            }
        };
        let out = d.from.user == me;
        let msg = Message {
            id: d.id,
            from: d.from.user,
            from_device: d.from.device,
            to: d.to,
            text: content.text,
            ts_ms: d.time_ms,
            direction: if out { Direction::Out } else { Direction::In },
            status: if out { Status::Sent } else { Status::Received },
        };
        if self.profile.history().insert(&me, &msg)? {
            self.fresh.push(msg);
        } else {
            log::debug!("duplicate message {} from {}", msg.id, msg.from);
        }
        Ok(())
    }

    /// Sends a request and waits for its answer; an `Error` answer becomes
    /// [`Error::Server`].
    fn call(&mut self, frame: &ClientFrame, what: &'static str) -> Result<ServerFrame, Error> {
        let link = self.link.as_mut().ok_or(Error::Closed(Closed::EndOfStream))?;
        let req = link
            .conn
            .request(frame, Instant::now())
            .map_err(|_| Error::Closed(Closed::EndOfStream))?;
        log::debug!("request {req}: {}", frame.kind());
        if let Err(e) = link.flush() {
            self.link = None;
            return Err(e);
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if let Some(answer) = self.answers.remove(&req) {
                return match answer {
                    ServerFrame::Error { code, text } => Err(Error::Server { code, text }),
                    other => Ok(other),
                };
            }
            if Instant::now() >= deadline {
                self.link = None;
                return Err(Error::Timeout(what));
            }
            self.pump(deadline)?;
        }
    }

    // ---- accounts ----

    /// Creates an account with an invite and makes this profile its first
    /// device.
    ///
    /// # Errors
    /// [`Error::AlreadyRegistered`], [`Error::Usage`] for an invalid name,
    /// the server's refusal (`INVALID_INVITE`, `NAME_TAKEN`...), connection
    /// failures.
    pub fn register(&mut self, invite: &Code, name: &str) -> Result<Registration, Error> {
        if let Some(r) = self.profile.registration() {
            return Err(Error::AlreadyRegistered(r.user.clone()));
        }
        if !wire::valid_user_name(name) {
            return Err(Error::Usage(format!(
                "invalid user name {name:?}: use 3 to 32 of a-z, 0-9, _ and ."
            )));
        }
        let frame = ClientFrame::Register {
            invite: invite.token.clone(),
            name: name.to_owned(),
        };
        self.join(invite, &frame)
    }

    /// Makes this (empty) profile a new device of the account that asked
    /// for the link code.
    ///
    /// # Errors
    /// [`Error::AlreadyRegistered`]; `INVALID_LINK_CODE`, `DEVICE_LIMIT`;
    /// connection failures.
    pub fn link(&mut self, code: &Code) -> Result<Registration, Error> {
        if let Some(r) = self.profile.registration() {
            return Err(Error::AlreadyRegistered(r.user.clone()));
        }
        let frame = ClientFrame::RedeemLink {
            code: code.token.clone(),
        };
        self.join(code, &frame)
    }

    fn join(&mut self, code: &Code, frame: &ClientFrame) -> Result<Registration, Error> {
        self.connect_to(&code.addr, &code.server_key)?;
        match self.call(frame, "registration")? {
            ServerFrame::Registered { user, device } => {
                let reg = Registration {
                    server: code.addr.clone(),
                    server_key: code.server_key,
                    user,
                    device: device.0,
                };
                self.profile.save_registration(reg.clone())?;
                Ok(reg)
            }
            _ => Err(Error::Unexpected("expected Registered")),
        }
    }

    /// Asks for a one-time code that links a new device to this account.
    /// Returns the code and when it expires (ms since the epoch).
    ///
    /// # Errors
    /// Connection failures and server refusals.
    pub fn link_code(&mut self) -> Result<(Code, u64), Error> {
        self.connect()?;
        let reg = self.profile.registered()?.clone();
        match self.call(&ClientFrame::RequestLink, "a link code")? {
            ServerFrame::LinkCode { code, expires_ms } => Ok((
                Code {
                    addr: reg.server,
                    server_key: reg.server_key,
                    token: code,
                },
                expires_ms,
            )),
            _ => Err(Error::Unexpected("expected LinkCode")),
        }
    }

    /// This account's devices.
    ///
    /// # Errors
    /// Connection failures.
    pub fn my_devices(&mut self) -> Result<Vec<DeviceInfo>, Error> {
        self.connect()?;
        match self.call(&ClientFrame::MyDevices, "the device list")? {
            ServerFrame::MyDevices { devices } => Ok(devices),
            _ => Err(Error::Unexpected("expected MyDevices")),
        }
    }

    /// Revokes one of this account's devices.
    ///
    /// # Errors
    /// `UNKNOWN_DEVICE`; connection failures.
    pub fn revoke(&mut self, device: DeviceId) -> Result<(), Error> {
        self.connect()?;
        match self.call(&ClientFrame::RevokeDevice { device }, "revocation")? {
            ServerFrame::Done => {
                self.devices.clear();
                Ok(())
            }
            _ => Err(Error::Unexpected("expected Done")),
        }
    }

    /// A user's current devices (cached until a `Mismatch`).
    fn devices_of(&mut self, user: &str) -> Result<Vec<DeviceId>, Error> {
        if let Some(d) = self.devices.get(user) {
            return Ok(d.clone());
        }
        match self.call(&ClientFrame::ListDevices { user: user.to_owned() }, "a device list")? {
            ServerFrame::Devices { devices, .. } => {
                self.devices.insert(user.to_owned(), devices.clone());
                Ok(devices)
            }
            _ => Err(Error::Unexpected("expected Devices")),
        }
    }

    // ---- sending ----

    /// A fresh random message id.
    ///
    /// # Errors
    /// If the system's randomness fails.
    pub fn new_id(&self) -> Result<MsgId, Error> {
        let mut id = [0u8; 16];
        self.rng
            .fill(&mut id)
            .map_err(|_| Error::Damaged("no randomness for a message id".into()))?;
        Ok(MsgId(id))
    }

    /// Sends `text` to `to` and returns once the server accepted it.
    ///
    /// # Errors
    /// See [`Client::send_with_id`].
    pub fn send(&mut self, to: &str, text: &str) -> Result<Message, Error> {
        let id = self.new_id()?;
        self.send_with_id(id, to, text)
    }

    /// Sends `text` to `to` under `id` and returns once the server accepted
    /// it. On `Mismatch` it re-lists devices and retries; on a dropped
    /// connection it reconnects and retries, for up to
    /// [`SEND_RETRY_FOR`]; always with the same id, which the server
    /// stores once. Sending again with an id the server already accepted
    /// is answered `Accepted` again and delivered once.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name, [`Error::Body`] for a text too
    /// long; the server's refusal (`UNKNOWN_USER`...), after which the
    /// message is removed from the history; connection failures past the
    /// retry time, after which it stays pending.
    pub fn send_with_id(&mut self, id: MsgId, to: &str, text: &str) -> Result<Message, Error> {
        let me = self.profile.registered()?.clone();
        if !wire::valid_user_name(to) {
            return Err(Error::Usage(format!("invalid user name {to:?}")));
        }
        let content = Content {
            text: text.to_owned(),
            ts_ms: now_ms(),
        };
        // Fail early on a text too long, before anything is stored.
        content::seal_body(
            &content,
            &DeviceAddr {
                user: to.to_owned(),
                device: DeviceId(1),
            },
        )?;
        let mut msg = Message {
            id,
            from: me.user.clone(),
            from_device: DeviceId(me.device),
            to: to.to_owned(),
            text: text.to_owned(),
            ts_ms: content.ts_ms,
            direction: Direction::Out,
            status: Status::Pending,
        };
        let deadline = Instant::now() + SEND_RETRY_FOR;
        let mut backoff = Duration::from_millis(200);
        let mut mismatches = 0;
        let mut stored = false;
        loop {
            match self.try_send(&msg, &content, &mut stored) {
                Ok(Some(time_ms)) => {
                    let h = self.profile.history();
                    h.set_status(&me.user, &id, Status::Sent, Some(time_ms))?;
                    h.flush()?;
                    msg.status = Status::Sent;
                    msg.ts_ms = time_ms;
                    return Ok(msg);
                }
                Ok(None) => {
                    mismatches += 1;
                    if mismatches > MAX_MISMATCHES {
                        return Err(Error::Unexpected("the device lists keep changing"));
                    }
                }
                Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                    log::info!("send {id}: {e}; retrying in {backoff:?}");
                    self.link = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    if stored && matches!(e, Error::Server { .. }) && !e.is_transient() {
                        // Refused for good: the server stored nothing.
                        let h = self.profile.history();
                        h.remove(&me.user, &me.user, &id)?;
                        h.flush()?;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// One attempt: `Some(time)` when accepted, `None` on `Mismatch`.
    fn try_send(&mut self, msg: &Message, content: &Content, stored: &mut bool) -> Result<Option<u64>, Error> {
        self.connect()?;
        let me = self.profile.registered()?.clone();
        let mine = DeviceId(me.device);
        let to_devices = self.devices_of(&msg.to)?;
        let own_devices = if msg.to == me.user {
            Vec::new()
        } else {
            self.devices_of(&me.user)?
        };
        if !*stored {
            // In the history before the Send leaves: a crash after it shows
            // the message as pending, never loses it.
            let h = self.profile.history();
            h.insert(&me.user, msg)?;
            h.flush()?;
            *stored = true;
        }
        let bodies = |user: &str, devices: &[DeviceId]| -> Result<Vec<Body>, Error> {
            devices
                .iter()
                .filter(|d| !(user == me.user && **d == mine))
                .map(|d| {
                    let addr = DeviceAddr {
                        user: user.to_owned(),
                        device: *d,
                    };
                    Ok(Body {
                        device: *d,
                        data: content::seal_body(content, &addr)?,
                    })
                })
                .collect()
        };
        let send = wire::Send {
            id: msg.id,
            to: msg.to.clone(),
            bodies: bodies(&msg.to, &to_devices)?,
            own: bodies(&me.user, &own_devices)?,
        };
        match self.call(&ClientFrame::Send(send), "the server to accept the message")? {
            ServerFrame::Accepted { id, time_ms } if id == msg.id => Ok(Some(time_ms)),
            ServerFrame::Mismatch { id, missing, extra } if id == msg.id => {
                log::debug!(
                    "send {id}: device lists changed ({} missing, {} extra)",
                    missing.len(),
                    extra.len()
                );
                self.devices.remove(&msg.to);
                self.devices.remove(&me.user);
                Ok(None)
            }
            _ => Err(Error::Unexpected("expected Accepted or Mismatch for this message")),
        }
    }

    // ---- receiving ----

    /// Connects (afresh), stores everything queued up to `QueueDrained`,
    /// acks it, and calls `on_message` for each new message once it is
    /// durable. Returns how many were new.
    ///
    /// # Errors
    /// Connection failures (after a few reconnects); what was stored before
    /// stays stored.
    pub fn sync(&mut self, on_message: &mut dyn FnMut(&Message)) -> Result<usize, Error> {
        self.profile.registered()?;
        if !self.receive {
            return Err(Error::Usage("this client was opened without receiving".into()));
        }
        // A fresh connection, so that QueueDrained refers to now.
        self.disconnect();
        let mut count = 0;
        let mut failures = 0;
        loop {
            let step = self.connect().and_then(|()| {
                let mut done = false;
                while !done {
                    while let Some(ev) = self.events.pop_front() {
                        match ev {
                            Event::Message(m) => {
                                count += 1;
                                on_message(&m);
                            }
                            Event::Drained => done = true,
                            _ => {}
                        }
                    }
                    if !done {
                        self.pump(Instant::now() + ANSWER_TIMEOUT)?;
                    }
                }
                Ok(())
            });
            match step {
                Ok(()) => return Ok(count),
                Err(e) if e.is_transient() && failures < 3 => {
                    failures += 1;
                    log::info!("sync: {e}; reconnecting");
                    std::thread::sleep(Duration::from_millis(200 << failures));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The local conversation with `peer`, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn history(&self, peer: &str) -> Result<Vec<Message>, Error> {
        self.profile.history().conversation(peer)
    }

    /// Stays connected: stores and reports deliveries as [`Event`]s through
    /// `on_event`, runs work handed over by other commands, pings when
    /// quiet, resends messages left pending, and reconnects with backoff.
    /// Returns only on a failure that reconnecting cannot fix (revoked,
    /// connected elsewhere, wrong server key, local storage), or `Ok` when
    /// `on_event` returns `false`.
    ///
    /// # Errors
    /// That failure.
    pub fn listen(&mut self, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<(), Error> {
        self.profile.registered()?;
        if !self.receive {
            return Err(Error::Usage("this client was opened without receiving".into()));
        }
        self.listening = true;
        let result = self.listen_loop(on_event);
        self.listening = false;
        result
    }

    fn listen_loop(&mut self, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<(), Error> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let outcome = self.connect().and_then(|()| {
                backoff = Duration::from_secs(1);
                if !on_event(&Event::Connected) {
                    return Ok(false);
                }
                self.serve(on_event)
            });
            match outcome {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() => {
                    log::debug!("listen: {e}");
                    let text = format!("{e}; reconnecting in {}s", backoff.as_secs());
                    if !on_event(&Event::Disconnected(text)) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
            // Wait out the backoff, still serving local work.
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                match self.rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Input::Local(job)) => self.run_job(job),
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => unreachable!("the client holds a sender"),
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Serves one connection; `Ok(false)` when `on_event` says stop.
    fn serve(&mut self, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<bool, Error> {
        let me = self.profile.registered()?.clone();
        // Resend what a crash or a timeout left pending (same ids).
        for m in self.profile.history().pending()? {
            if m.from == me.user && m.from_device.0 == me.device {
                log::info!("resending pending message {}", m.id);
                match self.send_with_id(m.id, &m.to, &m.text) {
                    Ok(_) => {}
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => log::warn!("pending message {} could not be sent: {e}", m.id),
                }
            }
        }
        loop {
            while let Some(ev) = self.events.pop_front() {
                if !on_event(&ev) {
                    return Ok(false);
                }
            }
            if let Some(job) = self.jobs.pop_front() {
                self.run_job(job);
                continue;
            }
            if !self.is_connected() {
                // A job's failure dropped the connection: reconnect.
                return Err(Error::Closed(Closed::EndOfStream));
            }
            self.pump(Instant::now() + Duration::from_secs(3600))?;
        }
    }

    /// Runs a request for another command and answers it.
    fn run_job(&mut self, job: Job) {
        let reply = self.execute(job.request, &mut |_| {}).map_err(|e| e.to_string());
        let _ = job.reply.send(reply);
    }

    /// Runs a request on this client. `Sync` on a receiving client that is
    /// connected reports nothing: whoever listens has the messages already.
    ///
    /// # Errors
    /// The request's failure.
    pub fn execute(&mut self, request: Request, on_message: &mut dyn FnMut(&Message)) -> Result<Outcome, Error> {
        match request {
            Request::Register { code, name } => Ok(Outcome::Registered(self.register(&Code::parse(&code)?, &name)?)),
            Request::Link { code } => Ok(Outcome::Registered(self.link(&Code::parse(&code)?)?)),
            Request::LinkCode => {
                let (code, expires_ms) = self.link_code()?;
                Ok(Outcome::LinkCode {
                    code: code.to_string(),
                    expires_ms,
                })
            }
            Request::Send { to, text } => Ok(Outcome::Sent(self.send(&to, &text)?)),
            Request::Sync => {
                if self.listening {
                    // The listener has printed (and stored) everything.
                    Ok(Outcome::Synced { count: 0 })
                } else {
                    Ok(Outcome::Synced {
                        count: self.sync(on_message)?,
                    })
                }
            }
            Request::History { user } => Ok(Outcome::Messages(self.history(&user)?)),
            Request::Devices => Ok(Outcome::Devices {
                this: DeviceId(self.profile.registered()?.device),
                devices: self.my_devices()?,
            }),
            Request::Revoke { device } => {
                self.revoke(DeviceId(device))?;
                Ok(Outcome::Revoked { device })
            }
        }
    }
}
