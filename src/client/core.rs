//! A device's client: its open profile, at most one connection (a sans-I/O
//! [`Conn`] whose socket and clock belong to a [`Driver`]), and what is
//! waiting: answers, queue entries to store, events to report, work handed
//! over by other commands.
//!
//! This file holds the state and the connection plumbing: connecting,
//! waiting for inputs ([`Client::pump`]), handling what the connection
//! reports ([`Client::process`]), requests and their answers
//! ([`Client::call`]), and running a [`Request`]. The operations live in
//! files of their own, each an `impl Client` block:
//! - [`super::receive`]: storing queue entries, acking them, `sync` and
//!   `listen`;
//! - [`super::send`]: sending messages (with retries over one
//!   [`Backoff`]), and what a send left pending;
//! - [`super::keys`]: publishing and claiming keys, the devices to encrypt
//!   for, session resets;
//! - [`super::receipts`]: the receipt outbox, marking read, settings,
//!   `info`;
//! - [`super::edit`]: edits and deletes for everyone;
//! - [`super::verify`]: safety numbers;
//! - [`super::account`]: register, link, link codes, devices, revoke.
//!
//! Guarantees kept across them:
//! - a received message is decrypted, then stored together with the Olm
//!   state that decrypted it (one transaction) and flushed before it is
//!   acked; queue entries are acked only once durable;
//! - an outgoing message is in the history (as pending), and the ratchet
//!   state its bodies were made with is durable, before its `Send` leaves;
//! - nothing here reads the clock or sleeps: the [`Driver`] does.
//!
//! What it does not do: the Olm work ([`super::e2e`]), the body format
//! ([`super::content`]), what an arriving message does to the history
//! ([`super::updates`]), or hold the profile lock (the [`Profile`] does).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

use super::Error;
use super::backoff::Backoff;
use super::conn::{Closed, Conn, ConnConfig, ConnEvent};
use super::driver::{Driver, Input};
use super::e2e::{self, Notice};
use super::message::{Message, Status};
use super::profile::Profile;
use super::request::{Job, Outcome, Reply, Request};
use super::socket::SocketDriver;
use super::updates::{Reaction, ReceiptNews, Update};
use crate::code::Code;
use crate::noise::PublicKey;
use crate::wire::{self, ClientFrame, DeviceAddr, DeviceId, MsgId, ServerFrame};

/// How a connection refused as busy (spec §2) is tried again: at least
/// the server's retry-after, growing, for up to two minutes.
const BUSY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(8)).giving_up_after(Duration::from_secs(120));

/// How long a request may wait for its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// News or a warning about a contact's devices, reported before the
    /// message it came with.
    Notice(Notice),
    /// A receipt (or a read on another device of this user) changed a
    /// message's state.
    Receipt(ReceiptNews),
    /// A message was edited, or deleted for everyone.
    Update(Update),
    /// Messages for this device expired on the server before it collected
    /// them (spec §10): from which device, how many, sent when.
    Gap(wire::Lost),
    /// Messages this user sent expired undelivered in a device's queue
    /// (spec §10).
    Expired {
        /// The device that never got them.
        device: DeviceAddr,
        /// The messages.
        ids: Vec<MsgId>,
    },
    /// Someone reacted to a message, or took a reaction back.
    Reaction(Reaction),
    /// Another device of this user changed the read-receipt setting.
    Settings {
        /// Whether read receipts are on now.
        read_receipts: bool,
    },
    /// Another device of this user changed who may see its presence.
    LastSeen {
        /// Everyone (`true`) or nobody.
        everyone: bool,
    },
    /// A user is typing in the conversation with this user, or stopped
    /// (spec §5.6): shown for [`super::content::TYPING_SHOWN`] at most,
    /// never stored.
    Typing {
        /// Who.
        from: String,
        /// Typing (`true`), or stopped.
        active: bool,
    },
    /// What this device may know of a watched user's presence, now or
    /// after a change (spec §5.6).
    Presence {
        /// Whose.
        user: String,
        /// Online, away since, or hidden.
        seen: wire::Seen,
    },
    /// The file of a message was downloaded (by itself, or asked for).
    Downloaded {
        /// The message.
        id: MsgId,
        /// Where the file is.
        path: String,
    },
    /// `listen` carried out work handed over by another command (or the
    /// chat screen): the history may have changed (a message sent from
    /// the command line, say), so whoever shows it reads it again.
    Served,
    /// A file transfer moved on: bytes done of a total.
    Progress {
        /// Done.
        done: u64,
        /// Of.
        total: u64,
    },
    /// A group's membership changed (spec §5.8).
    Group(super::group::GroupNews),
    /// A group got a title (end to end).
    GroupTitle {
        /// The group.
        group: wire::GroupId,
        /// Its title.
        title: String,
        /// Who set it.
        by: String,
    },
    /// This user blocked or unblocked someone on another device.
    Blocked {
        /// Whom.
        user: String,
        /// Blocked now, or unblocked.
        blocked: bool,
    },
}

/// A queue entry (spec §10), in the order the connection got them.
pub(super) enum Entry {
    Deliver(wire::Deliver),
    Receipt(wire::ReceiptDeliver),
    Gap(wire::GapNotice),
    Expired(wire::ExpiredNotice),
    /// A group message, group notice, group receipt or block notice.
    Group(ServerFrame),
}

/// Receipts sent on this connection and not answered yet.
#[derive(Default)]
pub(super) struct Outbox {
    /// `Receipt` requests waiting for their answer: their outbox keys.
    pub(super) inflight: HashMap<u32, Vec<Vec<u8>>>,
    /// The outbox keys of those.
    pub(super) inflight_keys: HashSet<Vec<u8>>,
    /// The outbox may hold receipts not sent on this connection.
    pub(super) dirty: bool,
    /// The server refused receipts on this connection; the rest wait for
    /// the next.
    pub(super) blocked: bool,
}

/// A device's client: its profile and at most one connection.
pub struct Client {
    pub(super) profile: Profile,
    /// Whether deliveries are stored, acked and reported; when false they
    /// are left for a later `sync` or `listen`.
    pub(super) receive: bool,
    pub(super) driver: Box<dyn Driver>,
    /// The connection, while there is one.
    pub(super) conn: Option<Conn>,
    /// The current connection's epoch (inputs of older ones are dropped).
    pub(super) epoch: u64,
    pub(super) answers: HashMap<u32, ServerFrame>,
    /// Devices a `Mismatch` said are missing: their keys are claimed
    /// before the next attempt.
    pub(super) missing: HashSet<DeviceAddr>,
    /// The server's word that this device's one-time keys run low.
    pub(super) keys_low: Option<u32>,
    /// When the server said a request refused for a rate may be tried
    /// again (`RetryAfter`).
    pub(super) retry_after: Option<Instant>,
    /// Devices that sent something undecryptable: they get a session
    /// reset at the next quiet moment.
    pub(super) resets: Vec<DeviceAddr>,
    /// What stored queue entries brought, reported once they are flushed
    /// and acked.
    pub(super) fresh: Vec<Event>,
    pub(super) ack_up_to: Option<u64>,
    pub(super) outbox: Outbox,
    pub(super) drained: bool,
    pub(super) events: VecDeque<Event>,
    pub(super) jobs: VecDeque<Job>,
    pub(super) config: ConnConfig,
    rng: SystemRandom,
    /// Inside [`Client::listen`].
    pub(super) listening: bool,
    /// [`Input::Stop`] came: `listen` returns.
    pub(super) stopping: bool,
    /// The users whose presence this client watches (watched again on
    /// each connection).
    pub(super) watching: Vec<String>,
    /// What the server said of each watched user on this connection.
    pub(super) presence: HashMap<String, wire::Seen>,
    /// Ids of the latest ephemeral payloads, to drop a replay.
    pub(super) recent_ephemeral: VecDeque<MsgId>,
}

/// What a send produced: sent, or pending.
fn sent(m: Message) -> Outcome {
    if m.status == Status::Pending {
        Outcome::Pending(m)
    } else {
        Outcome::Sent(m)
    }
}

/// A group from the command line: `#` and 32 lowercase hex digits.
pub(super) fn group_arg(text: &str) -> Result<wire::GroupId, Error> {
    super::group::parse_group(text).ok_or_else(|| {
        Error::Usage(format!(
            "{text:?} is not a group: write # and its 32-digit id, as `tidings group create` printed it (quote it in a shell: '#...')"
        ))
    })
}

/// A message id from the command line.
pub(super) fn parse_id(text: &str) -> Result<MsgId, Error> {
    MsgId::from_hex(text).ok_or_else(|| Error::Usage(format!("{text:?} is not a message id (32 lowercase hex digits)")))
}

impl Client {
    /// A client on an open profile, on TCP sockets. With `receive`,
    /// deliveries are stored, acked and reported as [`Event`]s; without,
    /// they stay queued on the server.
    pub fn new(profile: Profile, receive: bool) -> Client {
        Client::with_driver(profile, receive, Box::new(SocketDriver::new()))
    }

    /// A client on an open profile whose time and sockets are `driver`'s.
    pub fn with_driver(profile: Profile, receive: bool, driver: Box<dyn Driver>) -> Client {
        Client {
            profile,
            receive,
            driver,
            conn: None,
            epoch: 0,
            answers: HashMap::new(),
            missing: HashSet::new(),
            keys_low: None,
            retry_after: None,
            resets: Vec::new(),
            fresh: Vec::new(),
            ack_up_to: None,
            outbox: Outbox {
                dirty: true,
                ..Outbox::default()
            },
            drained: false,
            events: VecDeque::new(),
            jobs: VecDeque::new(),
            config: ConnConfig::default(),
            rng: SystemRandom::new(),
            listening: false,
            stopping: false,
            watching: Vec::new(),
            presence: HashMap::new(),
            recent_ephemeral: VecDeque::new(),
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

    /// The profile, to change (tests use it to stage what a damaged or
    /// attacked profile looks like).
    pub fn profile_mut(&mut self) -> &mut Profile {
        &mut self.profile
    }

    /// Where work handed over by another command goes.
    pub fn input_sender(&self) -> Sender<Input> {
        self.driver.inputs()
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
        self.conn.as_ref().is_some_and(Conn::is_open)
    }

    /// Closes the connection, saying goodbye.
    pub fn disconnect(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close(self.driver.now());
            let mut out = conn.transmit();
            while !out.is_empty() {
                match self.driver.write(out) {
                    Ok(n) => out = &out[n..],
                    Err(_) => break,
                }
            }
        }
        self.driver.close();
    }

    /// Drops the connection without a word (it failed).
    pub(super) fn drop_conn(&mut self) {
        self.conn = None;
        self.driver.close();
    }

    /// The driver's monotonic clock.
    pub(super) fn now(&self) -> Instant {
        self.driver.now()
    }

    /// The driver's wall clock (ms since the epoch).
    pub(super) fn unix_ms(&self) -> u64 {
        self.driver.unix_ms()
    }

    pub(super) fn me(&self) -> Result<String, Error> {
        Ok(self.profile.registered()?.user.clone())
    }

    /// This device's address: its user and number.
    pub(super) fn this_device(&self) -> Result<DeviceAddr, Error> {
        let reg = self.profile.registered()?;
        Ok(DeviceAddr {
            user: reg.user.clone(),
            device: DeviceId(reg.device),
        })
    }

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

    // ---- connection ----

    /// Connects to the registered server, if not connected.
    ///
    /// # Errors
    /// [`Error::NotRegistered`]; connection and handshake failures.
    pub fn connect(&mut self) -> Result<(), Error> {
        self.connect_within(self.config.handshake_timeout)
    }

    /// [`Client::connect`], giving up after `within` (at most the
    /// handshake timeout).
    pub(super) fn connect_within(&mut self, within: Duration) -> Result<(), Error> {
        let reg = self.profile.registered()?;
        let (addr, key) = (reg.server.clone(), reg.server_key);
        // A registered device has an Olm account before anything arrives
        // (a profile from before end-to-end encryption gets one now; it is
        // published by [`Client::maintain`]).
        let crypto = self.profile.crypto_mut();
        if crypto.ensure_account()? {
            crypto.persist()?;
            self.profile.history().flush()?;
        }
        self.connect_to(&addr, &key, within)
    }

    pub(super) fn connect_to(&mut self, addr: &str, server_key: &PublicKey, within: Duration) -> Result<(), Error> {
        // spec §2: a busy server refuses in the clear and says when to
        // come back. It is there and will take us: wait as told (longer
        // each time, with some randomness so that many clients do not
        // come back at once), whatever `within` says, and try again.
        let mut backoff = BUSY_BACKOFF;
        loop {
            match self.connect_once(addr, server_key, within) {
                Err(Error::Closed(Closed::Refused(n))) if n.is_busy() => {
                    let now = self.now();
                    let Some(next) = backoff.next(now) else {
                        return Err(Error::Closed(Closed::Refused(n)));
                    };
                    let asked = Duration::from_secs(n.retry_after.map_or(1, u64::from).max(1));
                    let at = next.max(now + asked) + self.jitter(asked);
                    log::warn!(
                        "{}; trying again in {:.1} s",
                        Error::Closed(Closed::Refused(n)),
                        at.saturating_duration_since(now).as_secs_f64()
                    );
                    self.drop_conn();
                    self.pause(at);
                }
                r => return r,
            }
        }
    }

    /// Up to `max` more, at random.
    fn jitter(&self, max: Duration) -> Duration {
        let mut b = [0u8; 4];
        let _ = self.rng.fill(&mut b);
        max.mul_f64(f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX))
    }

    fn connect_once(&mut self, addr: &str, server_key: &PublicKey, within: Duration) -> Result<(), Error> {
        if self.is_connected() {
            return Ok(());
        }
        self.drop_conn();
        self.epoch += 1;
        self.answers.clear();
        self.drained = false;
        // `Drained` of an older connection says nothing about this one.
        self.events.retain(|e| *e != Event::Drained);
        self.ack_up_to = None;
        self.presence.clear();
        self.outbox = Outbox {
            dirty: true,
            ..Outbox::default()
        };
        let within = within.min(self.config.handshake_timeout);
        let started = self.now();
        self.driver.open(addr, self.epoch, within)?;
        let config = ConnConfig {
            handshake_timeout: within,
            ..self.config.clone()
        };
        let conn = Conn::new(self.profile.key(), server_key, config, started)
            .map_err(|_| Error::Damaged("the pinned server key is not a valid key".into()))?;
        self.conn = Some(conn);
        self.flush()?;
        let deadline = started + within;
        while !self.is_connected() {
            self.pump(deadline)?;
        }
        log::debug!("connected to {addr}");
        Ok(())
    }

    /// Writes what the connection has queued.
    pub(super) fn flush(&mut self) -> Result<(), Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        while !conn.transmit().is_empty() {
            match self.driver.write(conn.transmit()) {
                Ok(n) => conn.advance(n),
                Err(e) => {
                    self.drop_conn();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Waits for one input (or `deadline`, or the connection's own timer)
    /// and handles it.
    pub(super) fn pump(&mut self, deadline: Instant) -> Result<(), Error> {
        let wake = match self.conn.as_ref().and_then(Conn::poll_timeout) {
            Some(t) => t.min(deadline),
            None => deadline,
        };
        let input = self.driver.wait(wake);
        let now = self.now();
        match input {
            Some(Input::Local(job)) => self.jobs.push_back(job),
            Some(Input::Stop) => self.stopping = true,
            Some(Input::Net { epoch, data }) => {
                if let Some(conn) = self.conn.as_mut().filter(|_| self.epoch == epoch) {
                    conn.handle_input(&data, now);
                }
            }
            Some(Input::Eof { epoch }) => {
                if let Some(conn) = self.conn.as_mut().filter(|_| self.epoch == epoch) {
                    conn.handle_eof();
                }
            }
            None => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.handle_timeout(now);
                }
            }
        }
        self.process()
    }

    /// Waits until `until` without a connection to serve (a backoff),
    /// keeping work handed over meanwhile for later.
    pub(super) fn pause(&mut self, until: Instant) {
        while let Some(input) = self.driver.wait(until) {
            match input {
                Input::Local(job) => self.jobs.push_back(job),
                Input::Stop => self.stopping = true,
                _ => {}
            }
        }
    }

    /// Handles the connection's events, stores and acks queue entries,
    /// sends the receipts they call for, and writes what is queued.
    pub(super) fn process(&mut self) -> Result<(), Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut closed = None;
        let mut drained = false;
        let mut entries = Vec::new();
        let mut ephemerals = Vec::new();
        let mut receipt_answers = Vec::new();
        while let Some(ev) = conn.poll_event() {
            match ev {
                ConnEvent::Ready => {}
                ConnEvent::Answer { req, frame } => {
                    if self.outbox.inflight.contains_key(&req) {
                        receipt_answers.push((req, frame));
                    } else {
                        self.answers.insert(req, frame);
                    }
                }
                // Left queued when not receiving; else stored and acked.
                ConnEvent::Deliver(d) => entries.push(Entry::Deliver(d)),
                ConnEvent::Receipt(r) => entries.push(Entry::Receipt(r)),
                ConnEvent::Gap(g) => entries.push(Entry::Gap(g)),
                ConnEvent::Expired(e) => entries.push(Entry::Expired(e)),
                ConnEvent::Queued(f) => entries.push(Entry::Group(f)),
                // Not queue entries: nothing to store or ack.
                ConnEvent::Ephemeral(e) => ephemerals.push(e),
                ConnEvent::Presence(p) => {
                    self.presence.insert(p.user.clone(), p.seen.clone());
                    self.events.push_back(Event::Presence {
                        user: p.user,
                        seen: p.seen,
                    });
                }
                ConnEvent::QueueDrained => drained = true,
                ConnEvent::KeyCount(n) => {
                    if n < e2e::LOW_WATER {
                        self.keys_low = Some(n);
                    }
                }
                ConnEvent::RetryAfter(wait) => self.retry_after = Some(self.driver.now() + wait),
                ConnEvent::Closed(c) => closed = Some(c),
            }
        }
        if self.receive {
            for e in entries {
                self.store_entry(e)?;
            }
            for e in ephemerals {
                self.receive_ephemeral(e)?;
            }
        }
        if let Some(up_to) = self.ack_up_to.take() {
            // Durable first, then ack (at-least-once).
            self.profile.history().flush()?;
            let now = self.now();
            if let Some(conn) = self.conn.as_mut().filter(|c| c.is_open()) {
                let _ = conn.notify(&ClientFrame::Ack { up_to }, now);
            }
            self.events.extend(self.fresh.drain(..));
        }
        for (req, frame) in receipt_answers {
            self.receipt_answered(req, frame)?;
        }
        if drained && self.receive {
            self.drained = true;
            self.events.push_back(Event::Drained);
        }
        if let Some(c) = closed {
            self.drop_conn();
            return Err(Error::Closed(c));
        }
        self.send_outbox()?;
        self.flush()
    }

    /// Sends a request and waits for its answer; an `Error` answer becomes
    /// [`Error::Server`].
    pub(super) fn call(&mut self, frame: &ClientFrame, what: &'static str) -> Result<ServerFrame, Error> {
        let now = self.now();
        let conn = self.conn.as_mut().ok_or(Error::Closed(Closed::EndOfStream))?;
        let req = conn
            .request(frame, now)
            .map_err(|_| Error::Closed(Closed::EndOfStream))?;
        log::debug!("request {req}: {}", frame.kind());
        self.flush()?;
        let deadline = now + ANSWER_TIMEOUT;
        loop {
            if let Some(answer) = self.answers.remove(&req) {
                return match answer {
                    ServerFrame::Error { code, text } => Err(Error::Server { code, text }),
                    other => Ok(other),
                };
            }
            if self.now() >= deadline {
                self.drop_conn();
                return Err(Error::Timeout(what));
            }
            self.pump(deadline)?;
        }
    }

    /// Retries `attempt` while it fails transiently and `backoff` grants
    /// retries, dropping the connection and pausing between tries.
    pub(super) fn retrying<T>(
        &mut self,
        backoff: &mut Backoff,
        what: &str,
        mut attempt: impl FnMut(&mut Client) -> Result<T, Error>,
    ) -> Result<T, Error> {
        loop {
            match attempt(self) {
                Err(e) if e.is_transient() => {
                    let Some(mut at) = backoff.next(self.now()) else {
                        return Err(e);
                    };
                    if e.is_rate() {
                        // The connection is fine; the wait is the one the
                        // server asked for, if it is within the patience.
                        if let Some(t) = self.retry_after.take() {
                            if !backoff.allows(t) {
                                return Err(e);
                            }
                            at = at.max(t);
                        }
                    } else {
                        self.drop_conn();
                    }
                    log::info!(
                        "{what}: {e}; trying again in {:?}",
                        at.saturating_duration_since(self.now())
                    );
                    self.pause(at);
                }
                other => return other,
            }
        }
    }

    // ---- work handed over ----

    /// Runs a request for another command and answers it, with the
    /// notices it raised.
    pub(super) fn run_job(&mut self, job: Job) {
        let mut notices = Vec::new();
        let reply = self
            .execute(job.request, &mut |e| {
                if let Event::Notice(n) = e {
                    notices.push(n.clone());
                }
            })
            .map(|outcome| Reply { notices, outcome })
            .map_err(|e| e.to_string());
        let _ = job.reply.send(reply);
    }

    /// Notices raised so far that nobody was told about.
    fn take_notices(&mut self) -> Vec<Notice> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Notice(n) => {
                out.push(n.clone());
                false
            }
            _ => true,
        });
        out
    }

    /// Runs a request on this client; new messages (of a `Sync`) and
    /// notices go to `on_event`. `Sync` on a receiving client that is
    /// connected reports nothing: whoever listens has the messages already.
    ///
    /// # Errors
    /// The request's failure.
    pub fn execute(&mut self, request: Request, on_event: &mut dyn FnMut(&Event)) -> Result<Outcome, Error> {
        let outcome = self.execute_inner(request, on_event);
        for n in self.take_notices() {
            on_event(&Event::Notice(n));
        }
        outcome
    }

    fn execute_inner(&mut self, request: Request, on_event: &mut dyn FnMut(&Event)) -> Result<Outcome, Error> {
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
            Request::Send { to, text, reply_to } => Ok(sent(match reply_to {
                Some(id) => self.send_reply(&to, &text, parse_id(&id)?)?,
                None => self.send(&to, &text)?,
            })),
            Request::Forward { id, to } => Ok(sent(self.forward(parse_id(&id)?, &to)?)),
            Request::Edit { id, text } => Ok(Outcome::Edited(self.edit(parse_id(&id)?, &text)?)),
            Request::Delete { id } => Ok(Outcome::Deleted(self.delete(parse_id(&id)?)?)),
            Request::React { id, emoji } => Ok(Outcome::Reacted(self.react(parse_id(&id)?, emoji.as_deref())?)),
            Request::Read { user } => Ok(Outcome::Read {
                count: self.read(&user)?,
                user,
            }),
            Request::Info { id } => Ok(Outcome::Info(self.info(parse_id(&id)?)?)),
            Request::Settings {
                read_receipts,
                last_seen,
                auto_download,
            } => {
                if let Some(on) = read_receipts {
                    self.set_read_receipts(on)?;
                }
                if let Some(everyone) = last_seen {
                    self.set_last_seen(everyone)?;
                }
                if let Some(bytes) = auto_download {
                    self.set_auto_download(bytes)?;
                }
                let h = self.profile.history();
                Ok(Outcome::Settings {
                    read_receipts: h.read_receipts()?.0,
                    last_seen: h.last_seen()?.0,
                    auto_download: self.auto_download()?,
                })
            }
            Request::SendFile { to, path, caption } => {
                let mut progress = |done, total| on_event(&Event::Progress { done, total });
                Ok(sent(self.send_file(
                    &to,
                    std::path::Path::new(&path),
                    &caption,
                    &mut progress,
                )?))
            }
            Request::Download { id, output } => {
                let id = parse_id(&id)?;
                let mut progress = |done, total| on_event(&Event::Progress { done, total });
                let path = self.download(id, output.as_deref().map(std::path::Path::new), &mut progress)?;
                Ok(Outcome::Downloaded {
                    id: id.to_string(),
                    path: path.to_string_lossy().into_owned(),
                })
            }
            Request::Typing { to, active } => Ok(Outcome::Typing {
                sent: self.typing(&to, active)?,
            }),
            Request::Watch { users } => {
                self.watch_presence(users)?;
                Ok(Outcome::Watching {
                    users: self.watching.len(),
                })
            }
            Request::Sync => {
                if self.listening {
                    // The listener has printed (and stored) everything.
                    Ok(Outcome::Synced { count: 0 })
                } else {
                    Ok(Outcome::Synced {
                        count: self.sync_events(on_event)?,
                    })
                }
            }
            Request::History { user } => {
                if !wire::valid_user_name(&user) && super::group::parse_group(&user).is_none() {
                    return Err(Error::Usage(format!("invalid user name {user:?}")));
                }
                let messages = self.history(&user)?;
                if messages.is_empty() {
                    let what = if user.starts_with('#') {
                        format!("no messages in group {user} on this device")
                    } else {
                        format!("no conversation with {user} on this device (send them a message first)")
                    };
                    return Err(Error::Usage(what));
                }
                Ok(Outcome::Messages(messages))
            }
            Request::Devices => Ok(Outcome::Devices {
                this: DeviceId(self.profile.registered()?.device),
                devices: self.my_devices()?,
            }),
            Request::Revoke { device } => {
                self.revoke(DeviceId(device))?;
                Ok(Outcome::Revoked { device })
            }
            Request::GroupCreate { title, users } => Ok(Outcome::Group(self.group_create(&title, &users)?)),
            Request::GroupAdd { group, users } => Ok(Outcome::Group(self.group_add(group_arg(&group)?, &users)?)),
            Request::GroupRemove { group, users } => Ok(Outcome::Group(self.group_remove(group_arg(&group)?, &users)?)),
            Request::GroupLeave { group } => {
                self.group_leave(group_arg(&group)?)?;
                Ok(Outcome::Left { group })
            }
            Request::GroupAdmin { group, user } => Ok(Outcome::Group(self.group_admin(group_arg(&group)?, &user)?)),
            Request::GroupRename { group, title } => Ok(Outcome::Group(self.group_rename(group_arg(&group)?, &title)?)),
            Request::GroupInfo { group } => Ok(Outcome::Group(self.group_info(group_arg(&group)?)?)),
            Request::GroupList => Ok(Outcome::Groups(self.group_list()?)),
            Request::Block { user, blocked } => {
                self.set_blocked(&user, blocked)?;
                Ok(Outcome::BlockChanged { user, blocked })
            }
            Request::Blocked => Ok(Outcome::BlockList(self.blocked()?)),
            Request::Verify { user } => {
                let n = self.verify(&user)?;
                Ok(Outcome::SafetyNumber {
                    user: n.user,
                    number: n.number,
                    devices: n
                        .devices
                        .into_iter()
                        .map(|(u, d, k)| (u, d.0, hex::encode(k)))
                        .collect(),
                })
            }
        }
    }
}
