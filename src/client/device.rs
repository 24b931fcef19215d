//! The operations of a device: register, link, send with retry, receive
//! (sync and listen), devices and revoke, on top of one [`Link`] at a time.
//!
//! Guarantees:
//! - a received message is decrypted, then stored together with the Olm
//!   state that decrypted it (one transaction) and flushed before it is
//!   acked, and a duplicate (same sender and id) is stored and reported
//!   once, without touching the Olm state again;
//! - a body that does not decrypt is stored and reported as an
//!   undecryptable message and acked like any other (the queue never
//!   stalls), and the sending device is sent a session reset: a
//!   [`Content::SessionReset`] on a new Olm session made from freshly
//!   claimed keys (at most one a minute per device);
//! - an outgoing message is in the history (as pending), and the ratchet
//!   state its bodies were made with is durable, before its `Send` leaves;
//!   it is marked sent only after `Accepted`; every retry, after a
//!   `Mismatch` or a dropped connection, reuses its id;
//! - a message is encrypted for every device the server lists for the
//!   recipient and for every other device of the sender: on `Mismatch` the
//!   new devices' keys are claimed (and their signatures checked) and the
//!   removed ones forgotten, and the send is retried;
//! - everything runs on the caller's thread: the only other threads read
//!   sockets into the one input channel.
//!
//! What it does not do: the Olm work itself ([`super::e2e`]), the body
//! format ([`super::content`]), or hold the profile lock (the [`Profile`]
//! does).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use super::Error;
use super::conn::{Closed, ConnConfig, ConnEvent};
use super::content::{BodyError, Content, Payload};
use super::e2e::{self, DecryptError, Notice};
use super::link::{Input, Link};
use super::local::{Job, Outcome, Request};
use super::profile::{Direction, Message, Profile, Registration, Status};
use crate::code::Code;
use crate::noise::PublicKey;
use crate::wire::{
    self, Body, ClientFrame, DeviceAddr, DeviceId, DeviceInfo, DeviceKeys, ErrorCode, MAX_BODY_LEN, MsgId, ServerFrame,
};

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
    /// News or a warning about a contact's devices, reported before the
    /// message it came with.
    Notice(Notice),
}

/// A safety number (see [`e2e::safety_number`]) and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    /// The other user.
    pub user: String,
    /// Sixty digits in groups of five.
    pub number: String,
    /// The Ed25519 identity keys it covers: user, device, key.
    pub devices: Vec<(String, DeviceId, [u8; 32])>,
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
    /// Devices a `Mismatch` said are missing: their keys are claimed
    /// before the next attempt.
    missing: HashSet<DeviceAddr>,
    /// The server's word that this device's one-time keys run low.
    keys_low: Option<u32>,
    /// Devices that sent something undecryptable: they get a session
    /// reset at the next quiet moment.
    resets: Vec<DeviceAddr>,
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
            missing: HashSet::new(),
            keys_low: None,
            resets: Vec::new(),
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

    /// The profile, to change (tests use it to stage what a damaged or
    /// attacked profile looks like).
    pub fn profile_mut(&mut self) -> &mut Profile {
        &mut self.profile
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
        // A registered device has an Olm account before anything arrives
        // (a profile from before end-to-end encryption gets one now; it is
        // published by [`Client::maintain`]).
        let crypto = self.profile.crypto_mut();
        if crypto.ensure_account()? {
            crypto.persist()?;
            self.profile.history().flush()?;
        }
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
                // Queue entries like messages: unacknowledged, they would
                // hold the delivery window shut (spec §10).
                ConnEvent::Receipt(wire::ReceiptDeliver { seq, .. })
                | ConnEvent::Gap(wire::GapNotice { seq, .. })
                | ConnEvent::Expired(wire::ExpiredNotice { seq, .. }) => {
                    if self.receive {
                        self.ack_up_to = Some(self.ack_up_to.map_or(seq, |a| a.max(seq)));
                    }
                }
                ConnEvent::QueueDrained => drained = true,
                ConnEvent::KeyCount(n) => {
                    if n < e2e::LOW_WATER {
                        self.keys_low = Some(n);
                    }
                }
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
        if self.profile.history().has(&d.from.user, &d.id)? {
            // Stored before a crash or a lost ack: the Olm state moved on
            // with it, so it is not decrypted again.
            log::debug!("duplicate message {} from {}", d.id, d.from.user);
            return Ok(());
        }
        let (history, crypto) = self.profile.parts();
        let mut notices = Vec::new();
        let opened = crypto.decrypt(&d.from, &d.body, &mut notices)?;
        let content = match opened {
            Ok(plaintext) => match Payload::decode(&plaintext) {
                Ok(p) if p.id == d.id && p.to == d.to => Ok(p.content),
                Ok(_) => {
                    log::warn!(
                        "message {} from {}/{} was delivered under another id or recipient than it was sent with",
                        d.id,
                        d.from.user,
                        d.from.device
                    );
                    Err(None)
                }
                Err(_) => {
                    log::warn!(
                        "message {} from {}/{} is of a kind this version cannot show",
                        d.id,
                        d.from.user,
                        d.from.device
                    );
                    Err(None)
                }
            },
            Err(e) => Err(Some(e)),
        };
        let out = d.from.user == me;
        let mut msg = Message {
            id: d.id,
            from: d.from.user.clone(),
            from_device: d.from.device,
            to: d.to.clone(),
            text: String::new(),
            ts_ms: d.time_ms,
            direction: if out { Direction::Out } else { Direction::In },
            status: if out { Status::Sent } else { Status::Received },
            undecryptable: false,
        };
        let shown = match content {
            Ok(Content::Text(text)) => {
                msg.text = text;
                true
            }
            Ok(Content::SessionReset) => {
                log::info!("{}/{} started a new session", d.from.user, d.from.device);
                false
            }
            Err(why) => {
                msg.undecryptable = true;
                if let Some(e) = why {
                    log::warn!(
                        "cannot decrypt message {} from {}/{}: {e}",
                        d.id,
                        d.from.user,
                        d.from.device
                    );
                    if e != DecryptError::Malformed && crypto.may_reset(&d.from, now_ms())? {
                        self.resets.push(d.from.clone());
                    }
                }
                true
            }
        };
        let writes = crypto.take_writes();
        let tree = crypto.tree().clone();
        let new = history.commit(&me, shown.then_some(&msg), (&d.from.user, &d.id), &tree, writes)?;
        self.events.extend(notices.into_iter().map(Event::Notice));
        if shown && new {
            self.fresh.push(msg);
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
                // The keys go up at once, so others can write to the new
                // device; if that fails, the next command publishes them.
                if let Err(e) = self.maintain() {
                    log::warn!("registered, but the end-to-end keys are not published yet: {e}");
                }
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
                let me = self.me()?;
                let crypto = self.profile.crypto_mut();
                crypto.forget_device(&DeviceAddr { user: me, device })?;
                crypto.persist()?;
                self.profile.history().flush()?;
                Ok(())
            }
            _ => Err(Error::Unexpected("expected Done")),
        }
    }

    /// A user's current devices, as the server lists them.
    fn list_devices(&mut self, user: &str) -> Result<Vec<DeviceId>, Error> {
        match self.call(&ClientFrame::ListDevices { user: user.to_owned() }, "a device list")? {
            ServerFrame::Devices { devices, .. } => Ok(devices),
            _ => Err(Error::Unexpected("expected Devices")),
        }
    }

    // ---- keys ----

    /// Creates the Olm account if there is none, and publishes what the
    /// server should hold: new one-time keys when it said the stock is
    /// low, a new fallback key when the old one is due, keys a failed
    /// attempt left unpublished. Makes no request when there is nothing
    /// to publish. The private halves are durable before the public ones
    /// leave.
    ///
    /// # Errors
    /// [`Error::KeysRefused`] if the server holds another identity for
    /// this device; connection failures.
    pub fn maintain(&mut self) -> Result<(), Error> {
        self.profile.registered()?;
        self.connect()?;
        let crypto = self.profile.crypto_mut();
        crypto.ensure_account()?;
        // Taken: if publishing fails, the server says so again at the next
        // authentication (and keys made meanwhile go up then).
        let Some(publish) = crypto.keys_to_publish(self.keys_low.take(), now_ms())? else {
            return Ok(());
        };
        crypto.persist()?;
        self.profile.history().flush()?;
        log::debug!(
            "publishing {} one-time keys{}",
            publish.one_time.len(),
            if publish.fallback.is_some() {
                " and a fallback key"
            } else {
                ""
            }
        );
        match self.call(
            &ClientFrame::PublishKeys(Box::new(publish)),
            "the server to take the keys",
        ) {
            Ok(ServerFrame::KeyCount { one_time }) => {
                log::debug!("the server holds {one_time} one-time keys");
                let crypto = self.profile.crypto_mut();
                crypto.mark_published();
                crypto.persist()?;
                self.profile.history().flush()?;
                Ok(())
            }
            Ok(_) => Err(Error::Unexpected("expected KeyCount")),
            Err(Error::Server {
                code: ErrorCode::NOT_ALLOWED,
                ..
            }) => Err(Error::KeysRefused),
            Err(e) => Err(e),
        }
    }

    /// Claims one key set for every device of `user` (for this account,
    /// its other devices) and returns those whose signatures verify.
    ///
    /// # Errors
    /// `UNKNOWN_USER`, `RATE_LIMITED`; connection failures.
    pub fn claim_keys(&mut self, user: &str) -> Result<Vec<DeviceKeys>, Error> {
        self.connect()?;
        let mut keys = self.claim(user)?;
        keys.retain(|k| {
            crate::keys::verify_identity(&k.identity)
                && k.one_time
                    .as_ref()
                    .is_none_or(|o| crate::keys::verify_signed_key(&k.identity, o))
        });
        Ok(keys)
    }

    fn claim(&mut self, user: &str) -> Result<Vec<DeviceKeys>, Error> {
        match self.call(&ClientFrame::ClaimKeys { user: user.to_owned() }, "keys")? {
            ServerFrame::Keys { user: u, devices } if u == user => Ok(devices),
            _ => Err(Error::Unexpected("expected Keys")),
        }
    }

    /// The devices of `user` to encrypt for (for this account, the other
    /// devices), each with an Olm session: claims keys when the user is
    /// new, a `Mismatch` named a device missing, a listed device has no
    /// session, or `fresh` asks for a new session with one device (then
    /// clears it).
    fn recipients(
        &mut self,
        user: &str,
        fresh: &mut Option<DeviceAddr>,
        notices: &mut Vec<Notice>,
    ) -> Result<Vec<DeviceId>, Error> {
        let me = self.profile.registered()?.clone();
        let mine = DeviceId(me.device);
        let crypto = self.profile.crypto_mut();
        let list = crypto.devices(user)?;
        let mut need = list.is_none()
            || self.missing.iter().any(|a| a.user == user)
            || fresh.as_ref().is_some_and(|f| f.user == user);
        for d in list.iter().flatten() {
            need = need
                || !crypto.has_session(&DeviceAddr {
                    user: user.to_owned(),
                    device: *d,
                })?;
        }
        if need {
            let keys = self.claim(user)?;
            self.missing.retain(|a| a.user != user);
            let crypto = self.profile.crypto_mut();
            let mut got = Vec::new();
            for k in &keys {
                if user == me.user && k.device == mine {
                    continue;
                }
                let addr = DeviceAddr {
                    user: user.to_owned(),
                    device: k.device,
                };
                let renew = fresh.as_ref() == Some(&addr);
                if crypto.accept_claimed(user, k, renew, notices)? {
                    got.push(k.device);
                }
            }
            if fresh.as_ref().is_some_and(|f| f.user == user) {
                *fresh = None;
            }
            if list.is_none() {
                crypto.set_devices(user, got);
            }
        }
        // A listed device that still has no session published no keys (or
        // is gone): it is left out, and a `Mismatch` says which.
        let crypto = self.profile.crypto_mut();
        let mut out = Vec::new();
        for d in crypto.devices(user)?.unwrap_or_default() {
            let addr = DeviceAddr {
                user: user.to_owned(),
                device: d,
            };
            if crypto.has_session(&addr)? {
                out.push(d);
            }
        }
        Ok(out)
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
    /// it. On `Mismatch` it claims keys for the new devices, forgets the
    /// removed ones and retries; on a dropped connection it reconnects and
    /// retries, for up to [`SEND_RETRY_FOR`]; always with the same id,
    /// which the server stores once. Sending again with an id the server
    /// already accepted is answered `Accepted` again and delivered once.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name, [`Error::Body`] for a text too
    /// long; [`Error::NoKeys`] for a device that never published keys; the
    /// server's refusal (`UNKNOWN_USER`...), after which the message is
    /// removed from the history; connection failures past the retry time,
    /// after which it stays pending.
    pub fn send_with_id(&mut self, id: MsgId, to: &str, text: &str) -> Result<Message, Error> {
        let me = self.profile.registered()?.clone();
        if !wire::valid_user_name(to) {
            return Err(Error::Usage(format!("invalid user name {to:?}")));
        }
        let payload = Payload {
            id,
            to: to.to_owned(),
            ts_ms: now_ms(),
            content: Content::Text(text.to_owned()),
        };
        // Fails early on a text too long, before anything is stored.
        let plaintext = payload.encode()?;
        let mut msg = Message {
            id,
            from: me.user.clone(),
            from_device: DeviceId(me.device),
            to: to.to_owned(),
            text: text.to_owned(),
            ts_ms: payload.ts_ms,
            direction: Direction::Out,
            status: Status::Pending,
            undecryptable: false,
        };
        let mut stored = false;
        match self.send_payload(to, id, &plaintext, Some(&msg), &mut stored, None) {
            Ok(time_ms) => {
                let h = self.profile.history();
                h.set_status(&me.user, &id, Status::Sent, Some(time_ms))?;
                h.flush()?;
                msg.status = Status::Sent;
                msg.ts_ms = time_ms;
                Ok(msg)
            }
            Err(e) => {
                if stored && matches!(e, Error::Server { .. } | Error::NoKeys { .. }) && !e.is_transient() {
                    // Refused for good: the server stored nothing.
                    let h = self.profile.history();
                    h.remove(&me.user, &me.user, &id)?;
                    h.flush()?;
                }
                Err(e)
            }
        }
    }

    /// Sends an encrypted payload with retries (see
    /// [`Client::send_with_id`]); returns the server's acceptance time.
    fn send_payload(
        &mut self,
        to: &str,
        id: MsgId,
        plaintext: &[u8],
        history: Option<&Message>,
        stored: &mut bool,
        mut fresh: Option<DeviceAddr>,
    ) -> Result<u64, Error> {
        let deadline = Instant::now() + SEND_RETRY_FOR;
        let mut backoff = Duration::from_millis(200);
        let mut mismatches = 0;
        loop {
            match self.try_send(to, id, plaintext, history, stored, &mut fresh) {
                Ok(Ok(time_ms)) => return Ok(time_ms),
                Ok(Err(missing)) => {
                    mismatches += 1;
                    if mismatches > MAX_MISMATCHES {
                        // A device the server lists that never published
                        // keys cannot be written to.
                        return Err(match missing.into_iter().next() {
                            Some(a) => Error::NoKeys {
                                user: a.user,
                                device: a.device,
                            },
                            None => Error::Unexpected("the device lists keep changing"),
                        });
                    }
                    if mismatches > 1 {
                        // Keys may be on their way (a device just linked).
                        std::thread::sleep(Duration::from_millis(150 * mismatches as u64));
                    }
                }
                Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                    log::info!("send {id}: {e}; retrying in {backoff:?}");
                    self.link = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: the acceptance time, or on `Mismatch` the devices that
    /// had no body.
    fn try_send(
        &mut self,
        to: &str,
        id: MsgId,
        plaintext: &[u8],
        history: Option<&Message>,
        stored: &mut bool,
        fresh: &mut Option<DeviceAddr>,
    ) -> Result<Result<u64, Vec<DeviceAddr>>, Error> {
        self.connect()?;
        self.maintain()?;
        let me = self.profile.registered()?.clone();
        let mut notices = Vec::new();
        let to_devices = self.recipients(to, fresh, &mut notices)?;
        let own_devices = if to == me.user {
            Vec::new()
        } else {
            self.recipients(&me.user, fresh, &mut notices)?
        };
        let crypto = self.profile.crypto_mut();
        let mut seal = |user: &str, devices: &[DeviceId]| -> Result<Vec<Body>, Error> {
            let mut bodies = Vec::with_capacity(devices.len());
            for d in devices {
                let addr = DeviceAddr {
                    user: user.to_owned(),
                    device: *d,
                };
                let data = crypto.encrypt(&addr, plaintext, &mut notices)?;
                if data.len() > MAX_BODY_LEN {
                    return Err(BodyError::TooLong {
                        len: data.len(),
                        max: MAX_BODY_LEN,
                    }
                    .into());
                }
                bodies.push(Body { device: *d, data });
            }
            Ok(bodies)
        };
        let send = wire::Send {
            id,
            to: to.to_owned(),
            bodies: seal(to, &to_devices)?,
            own: seal(&me.user, &own_devices)?,
        };
        // Durable before the Send leaves: the message (as pending: a crash
        // after this shows it, never loses it) and the ratchet state its
        // bodies were made with (never reused for other plaintext).
        let (h, crypto) = self.profile.parts();
        let writes = crypto.take_writes();
        match history {
            Some(m) => {
                h.commit(&me.user, Some(m), (&me.user, &id), crypto.tree(), writes)?;
                *stored = true;
            }
            None => {
                crypto
                    .tree()
                    .transaction(|t| {
                        for (k, v) in &writes {
                            match v {
                                Some(v) => t.insert(k.as_slice(), v.as_slice())?,
                                None => t.remove(k.as_slice())?,
                            };
                        }
                        Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| match e {
                        sled::transaction::TransactionError::Storage(e) => Error::Store(e),
                        sled::transaction::TransactionError::Abort(()) => Error::Damaged("transaction aborted".into()),
                    })?;
            }
        }
        h.flush()?;
        // Warnings about these devices come before the message goes.
        self.events.extend(notices.into_iter().map(Event::Notice));
        match self.call(&ClientFrame::Send(send), "the server to accept the message")? {
            ServerFrame::Accepted { id: got, time_ms } if got == id => Ok(Ok(time_ms)),
            ServerFrame::Mismatch {
                id: got,
                missing,
                extra,
            } if got == id => {
                log::debug!(
                    "send {id}: device lists changed ({} missing, {} extra)",
                    missing.len(),
                    extra.len()
                );
                let crypto = self.profile.crypto_mut();
                for addr in &extra {
                    crypto.forget_device(addr)?;
                    self.events.push_back(Event::Notice(Notice::DeviceRemoved {
                        user: addr.user.clone(),
                        device: addr.device,
                    }));
                }
                crypto.persist()?;
                self.missing.extend(missing.iter().cloned());
                Ok(Err(missing))
            }
            _ => Err(Error::Unexpected("expected Accepted or Mismatch for this message")),
        }
    }

    /// Sends a session reset to each device that sent something
    /// undecryptable: a [`Content::SessionReset`] to its user, on a new
    /// Olm session with that device from freshly claimed keys. Failures
    /// are logged (the device asks again on its next undecryptable body).
    fn send_resets(&mut self) {
        while let Some(addr) = self.resets.pop() {
            let result = self.new_id().and_then(|id| {
                let payload = Payload {
                    id,
                    to: addr.user.clone(),
                    ts_ms: now_ms(),
                    content: Content::SessionReset,
                };
                let plaintext = payload.encode()?;
                self.send_payload(&addr.user, id, &plaintext, None, &mut false, Some(addr.clone()))
            });
            match result {
                Ok(_) => log::info!("sent a session reset to {}/{}", addr.user, addr.device),
                Err(e) => log::warn!("could not send a session reset to {}/{}: {e}", addr.user, addr.device),
            }
        }
    }

    /// Key upkeep and session resets, at a moment when nothing else waits;
    /// failures are logged.
    fn housekeeping(&mut self) {
        if let Err(e) = self.maintain() {
            log::warn!("could not publish end-to-end keys: {e}");
        }
        self.send_resets();
    }

    /// The safety number of this account and `user` (see
    /// [`e2e::safety_number`]): both device lists are brought up to date
    /// with the server, keys are claimed (and checked) for devices whose
    /// identity is not known yet, and the number covers every current
    /// device's Ed25519 identity key.
    ///
    /// # Errors
    /// `UNKNOWN_USER`; [`Error::NoKeys`]; connection failures.
    pub fn verify(&mut self, user: &str) -> Result<SafetyNumber, Error> {
        if !wire::valid_user_name(user) {
            return Err(Error::Usage(format!("invalid user name {user:?}")));
        }
        self.connect()?;
        self.maintain()?;
        let me = self.profile.registered()?.clone();
        let mine = DeviceId(me.device);
        let mut notices = Vec::new();
        let mut keys_of = |this: &mut Client, u: &str| -> Result<Vec<(String, DeviceId, [u8; 32])>, Error> {
            let mut current = this.list_devices(u)?;
            if u == me.user {
                current.retain(|d| *d != mine);
            }
            let crypto = this.profile.crypto_mut();
            for d in crypto.devices(u)?.unwrap_or_default() {
                if !current.contains(&d) {
                    crypto.forget_device(&DeviceAddr {
                        user: u.to_owned(),
                        device: d,
                    })?;
                    notices.push(Notice::DeviceRemoved {
                        user: u.to_owned(),
                        device: d,
                    });
                }
            }
            let mut unknown = false;
            for d in &current {
                let known = crypto.known(&DeviceAddr {
                    user: u.to_owned(),
                    device: *d,
                })?;
                unknown = unknown || known.and_then(|k| k.ed25519).is_none();
            }
            if unknown || crypto.devices(u)?.is_none() {
                let keys = this.claim(u)?;
                let crypto = this.profile.crypto_mut();
                let had_list = crypto.devices(u)?.is_some();
                for k in keys.iter().filter(|k| current.contains(&k.device)) {
                    crypto.accept_claimed(u, k, false, &mut notices)?;
                }
                if !had_list {
                    crypto.set_devices(u, current.clone());
                }
            }
            let crypto = this.profile.crypto_mut();
            let mut out = Vec::new();
            for d in current {
                let addr = DeviceAddr {
                    user: u.to_owned(),
                    device: d,
                };
                match crypto.known(&addr)?.and_then(|k| k.ed25519) {
                    Some(ed) => out.push((u.to_owned(), d, ed)),
                    None => {
                        return Err(Error::NoKeys {
                            user: addr.user,
                            device: d,
                        });
                    }
                }
            }
            Ok(out)
        };
        let mut mine_keys = keys_of(self, &me.user)?;
        mine_keys.push((me.user.clone(), mine, self.profile.crypto().ed25519()?));
        mine_keys.sort_by_key(|(_, d, _)| *d);
        let theirs = if user == me.user {
            mine_keys.clone()
        } else {
            keys_of(self, user)?
        };
        self.profile.crypto_mut().persist()?;
        self.profile.history().flush()?;
        self.events.extend(notices.into_iter().map(Event::Notice));
        let ed = |v: &[(String, DeviceId, [u8; 32])]| v.iter().map(|(_, _, k)| *k).collect::<Vec<_>>();
        let number = e2e::safety_number((&me.user, &ed(&mine_keys)), (user, &ed(&theirs)));
        let mut devices = mine_keys;
        if user != me.user {
            devices.extend(theirs);
        }
        Ok(SafetyNumber {
            user: user.to_owned(),
            number,
            devices,
        })
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
        self.sync_events(&mut |e| {
            if let Event::Message(m) = e {
                on_message(m);
            }
        })
    }

    /// [`Client::sync`], reporting notices too (each before the message it
    /// came with); then tops up keys and sends session resets.
    ///
    /// # Errors
    /// See [`Client::sync`].
    pub fn sync_events(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<usize, Error> {
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
                                on_event(&Event::Message(m));
                            }
                            Event::Notice(n) => on_event(&Event::Notice(n)),
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
                Ok(()) => break,
                Err(e) if e.is_transient() && failures < 3 => {
                    failures += 1;
                    log::info!("sync: {e}; reconnecting");
                    std::thread::sleep(Duration::from_millis(200 << failures));
                }
                Err(e) => return Err(e),
            }
        }
        self.housekeeping();
        // What arrived meanwhile is stored and acked; report it too.
        while let Some(ev) = self.events.pop_front() {
            match ev {
                Event::Message(m) => {
                    count += 1;
                    on_event(&Event::Message(m));
                }
                Event::Notice(n) => on_event(&Event::Notice(n)),
                _ => {}
            }
        }
        Ok(count)
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
        match self.maintain() {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => log::warn!("could not publish end-to-end keys: {e}"),
        }
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
            if self.keys_low.is_some() || !self.resets.is_empty() {
                self.housekeeping();
                continue;
            }
            if !self.is_connected() {
                // A job's failure dropped the connection: reconnect.
                return Err(Error::Closed(Closed::EndOfStream));
            }
            self.pump(Instant::now() + Duration::from_secs(3600))?;
        }
    }

    /// Runs a request for another command and answers it, with the
    /// notices it raised.
    fn run_job(&mut self, job: Job) {
        let mut notices = Vec::new();
        let reply = self
            .execute(job.request, &mut |e| {
                if let Event::Notice(n) = e {
                    notices.push(n.clone());
                }
            })
            .map(|outcome| super::local::Reply { notices, outcome })
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
            Request::Send { to, text } => Ok(Outcome::Sent(self.send(&to, &text)?)),
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
            Request::History { user } => Ok(Outcome::Messages(self.history(&user)?)),
            Request::Devices => Ok(Outcome::Devices {
                this: DeviceId(self.profile.registered()?.device),
                devices: self.my_devices()?,
            }),
            Request::Revoke { device } => {
                self.revoke(DeviceId(device))?;
                Ok(Outcome::Revoked { device })
            }
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
