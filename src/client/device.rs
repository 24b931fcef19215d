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
//! - receipts, gap and expiry notices are queue entries: applied (see
//!   [`super::updates`]), flushed and acked like messages, so they never
//!   hold the delivery window shut;
//! - a delivered receipt for a message from another user is queued in the
//!   outbox in the same transaction that stores the message and sent once
//!   that is flushed; read receipts when the user reads; a receipt leaves
//!   the outbox only when the server answered `Done` (so none is lost to a
//!   crash), and `sync` returns only once its receipts are answered;
//! - replies, forwards, edits, deletes and settings are end-to-end content
//!   ([`Content`]); an edit or delete is sent only for this user's own
//!   message within its window, and a delete is followed by `Retract`;
//! - everything runs on the caller's thread: the only other threads read
//!   sockets into the one input channel.
//!
//! What it does not do: the Olm work itself ([`super::e2e`]), the body
//! format ([`super::content`]), or hold the profile lock (the [`Profile`]
//! does). Files (upload, download, forward) are in [`files`].

pub mod files;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use super::Error;
use super::conn::{Closed, ConnConfig, ConnEvent};
use super::content::{BodyError, Content, Payload, QuoteText, quote_of};
use super::e2e::{self, DecryptError, Notice};
use super::link::{Input, Link};
use super::local::{Job, Outcome, Request};
use super::profile::{Batch, Direction, Message, Profile, Quote, Registration, Status};
use super::status::Receipts;
use super::updates::{DELETE_WINDOW_MS, EDIT_WINDOW_MS, ReceiptNews, Update};
use crate::code::Code;
use crate::noise::PublicKey;
use crate::wire::{
    self, Body, ClientFrame, DeviceAddr, DeviceId, DeviceInfo, DeviceKeys, ErrorCode, MAX_BODY_LEN, MsgId, ReceiptKind,
    ServerFrame,
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
    /// Another device of this user changed the read-receipt setting.
    Settings {
        /// Whether read receipts are on now.
        read_receipts: bool,
    },
    /// The file of a message was downloaded (by itself, or asked for).
    Downloaded {
        /// The message.
        id: MsgId,
        /// Where the file is.
        path: String,
    },
    /// A file transfer moved on: bytes done of a total.
    Progress {
        /// Done.
        done: u64,
        /// Of.
        total: u64,
    },
}

/// A queue entry (spec §10), in the order the connection got them.
enum Entry {
    Deliver(wire::Deliver),
    Receipt(wire::ReceiptDeliver),
    Gap(wire::GapNotice),
    Expired(wire::ExpiredNotice),
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
    /// What stored queue entries brought, reported once they are flushed
    /// and acked.
    fresh: Vec<Event>,
    ack_up_to: Option<u64>,
    /// `Receipt` requests waiting for their answer: their outbox keys.
    receipts_inflight: HashMap<u32, Vec<Vec<u8>>>,
    /// The outbox keys of those.
    inflight_keys: HashSet<Vec<u8>>,
    /// The outbox may hold receipts not sent on this connection.
    outbox_dirty: bool,
    /// The server refused receipts on this connection; the rest wait for
    /// the next.
    outbox_blocked: bool,
    drained: bool,
    events: VecDeque<Event>,
    jobs: VecDeque<Job>,
    config: ConnConfig,
    rng: SystemRandom,
    /// Inside [`Client::listen`].
    listening: bool,
}

/// A message id from the command line.
fn parse_id(text: &str) -> Result<MsgId, Error> {
    MsgId::from_hex(text).ok_or_else(|| Error::Usage(format!("{text:?} is not a message id (32 lowercase hex digits)")))
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
            receipts_inflight: HashMap::new(),
            inflight_keys: HashSet::new(),
            outbox_dirty: true,
            outbox_blocked: false,
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

    /// This device's address: its user and number.
    fn this_device(&self) -> Result<DeviceAddr, Error> {
        let reg = self.profile.registered()?;
        Ok(DeviceAddr {
            user: reg.user.clone(),
            device: DeviceId(reg.device),
        })
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
        self.receipts_inflight.clear();
        self.inflight_keys.clear();
        self.outbox_dirty = true;
        self.outbox_blocked = false;
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

    /// Handles the connection's events, stores and acks queue entries,
    /// sends the receipts they call for, and writes what is queued.
    fn process(&mut self) -> Result<(), Error> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let mut closed = None;
        let mut drained = false;
        let mut entries = Vec::new();
        let mut receipt_answers = Vec::new();
        while let Some(ev) = link.conn.poll_event() {
            match ev {
                ConnEvent::Ready => {}
                ConnEvent::Answer { req, frame } => {
                    if self.receipts_inflight.contains_key(&req) {
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
                ConnEvent::QueueDrained => drained = true,
                ConnEvent::KeyCount(n) => {
                    if n < e2e::LOW_WATER {
                        self.keys_low = Some(n);
                    }
                }
                ConnEvent::Closed(c) => closed = Some(c),
            }
        }
        if self.receive {
            for e in entries {
                self.store_entry(e)?;
            }
        }
        if let Some(up_to) = self.ack_up_to.take() {
            // Durable first, then ack (at-least-once).
            self.profile.history().flush()?;
            if let Some(link) = self.link.as_mut().filter(|l| l.conn.is_open()) {
                let _ = link.conn.notify(&ClientFrame::Ack { up_to }, Instant::now());
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
            self.link = None;
            return Err(Error::Closed(c));
        }
        self.send_outbox()?;
        if let Some(link) = self.link.as_mut()
            && let Err(e) = link.flush()
        {
            self.link = None;
            return Err(e);
        }
        Ok(())
    }

    fn note_seq(&mut self, seq: u64) {
        self.ack_up_to = Some(self.ack_up_to.map_or(seq, |a| a.max(seq)));
    }

    /// Stores what a queue entry says; it is acked once flushed.
    fn store_entry(&mut self, entry: Entry) -> Result<(), Error> {
        match entry {
            Entry::Deliver(d) => self.store_delivery(d),
            Entry::Receipt(r) => {
                self.note_seq(r.seq);
                let me = self.me()?;
                let h = self.profile.history();
                let (show_read, _) = h.read_receipts()?;
                let mut batch = Batch::default();
                let news = h.receive_receipt(&mut batch, &me, &r, show_read)?;
                h.apply(batch, None)?;
                self.fresh.extend(news.into_iter().map(Event::Receipt));
                Ok(())
            }
            Entry::Gap(g) => {
                self.note_seq(g.seq);
                self.fresh.extend(g.lost.into_iter().map(Event::Gap));
                Ok(())
            }
            Entry::Expired(n) => {
                self.note_seq(n.seq);
                let me = self.me()?;
                let h = self.profile.history();
                let mut batch = Batch::default();
                h.receive_expired(&mut batch, &me, &n, now_ms())?;
                h.apply(batch, None)?;
                self.fresh.push(Event::Expired {
                    device: n.device,
                    ids: n.ids,
                });
                Ok(())
            }
        }
    }

    fn store_delivery(&mut self, d: wire::Deliver) -> Result<(), Error> {
        let me = self.me()?;
        self.note_seq(d.seq);
        if self.profile.history().has(&d.from.user, &d.id)? {
            // Stored before a crash or a lost ack: the Olm state moved on
            // with it, so it is not decrypted again.
            log::debug!("duplicate message {} from {}", d.id, d.from.user);
            return Ok(());
        }
        let (history, crypto) = self.profile.parts();
        let mut notices = Vec::new();
        let opened = crypto.decrypt(&d.from, &d.body, &mut notices)?;
        let payload = match opened {
            Ok(plaintext) => match Payload::decode(&plaintext) {
                Ok(p) if p.id == d.id && p.to == d.to => Ok(p),
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
            ts_ms: d.time_ms,
            direction: if out { Direction::Out } else { Direction::In },
            status: if out { Status::Sent } else { Status::Received },
            ..Message::default()
        };
        let mut batch = Batch::default();
        let mut events = Vec::new();
        // To this user's own devices only.
        let own = out && d.to == me;
        let shown = match payload {
            Ok(p) => match p.content {
                Content::Text(text) => {
                    msg.text = text;
                    true
                }
                Content::Reply { text, reply_to, quote } => {
                    msg.text = text;
                    msg.reply_to = Some(reply_to);
                    msg.quote = Some(Quote {
                        from: quote.from,
                        text: Some(quote.text),
                    });
                    true
                }
                Content::Forward { text, forwards } => {
                    msg.text = text;
                    msg.forwards = forwards;
                    true
                }
                Content::SessionReset => {
                    log::info!("{}/{} started a new session", d.from.user, d.from.device);
                    false
                }
                Content::Edit { target, text } => {
                    let u = history.edit(&mut batch, &me, &d.from, target, &d.to, &text, p.ts_ms, true)?;
                    events.extend(u.map(Event::Update));
                    false
                }
                Content::Delete { target } => {
                    let u = history.delete(&mut batch, &me, &d.from, target, &d.to, p.ts_ms, d.time_ms, true)?;
                    events.extend(u.map(Event::Update));
                    false
                }
                Content::Settings { read_receipts } => {
                    if own && history.set_read_receipts(&mut batch, read_receipts, p.ts_ms)? {
                        events.push(Event::Settings { read_receipts });
                    }
                    false
                }
                Content::Read { peer, ids } => {
                    if own {
                        let news = history.read_elsewhere(&mut batch, &d.from, &peer, &ids, d.time_ms)?;
                        events.extend(news.into_iter().map(Event::Receipt));
                    }
                    false
                }
                Content::File {
                    file,
                    caption,
                    forwards,
                } => {
                    msg.text = caption;
                    msg.forwards = forwards;
                    msg.attachment = Some(Box::new(super::attachment::Attachment {
                        file,
                        path: None,
                        expired: false,
                        uploaded: false,
                    }));
                    true
                }
            },
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
        if shown {
            if let Some(m) = history.receive_message(&mut batch, &me, msg)? {
                events.insert(0, Event::Message(m));
                self.outbox_dirty = true;
            }
        } else {
            history.mark_seen(&mut batch, &d.from.user, &d.id);
        }
        let writes = crypto.take_writes();
        let tree = crypto.tree().clone();
        history.apply(batch, Some((&tree, writes)))?;
        self.events.extend(notices.into_iter().map(Event::Notice));
        self.fresh.extend(events);
        Ok(())
    }

    // ---- receipts ----

    /// Sends the receipts of the outbox not sent on this connection yet,
    /// one `Receipt` per conversation and kind (spec §5.5), once what they
    /// report is durable. Read receipts are dropped while the user has
    /// them off.
    fn send_outbox(&mut self) -> Result<(), Error> {
        if !self.outbox_dirty || self.outbox_blocked || !self.is_connected() {
            return Ok(());
        }
        self.outbox_dirty = false;
        let h = self.profile.history();
        let (read_on, _) = h.read_receipts()?;
        // (kind, peer) → (outbox key, id)
        type Groups = std::collections::BTreeMap<(u8, String), Vec<(Vec<u8>, MsgId)>>;
        let mut groups = Groups::new();
        let mut dropped = Vec::new();
        for e in h.outbox()? {
            if self.inflight_keys.contains(&e.key) {
                continue;
            }
            if e.kind == ReceiptKind::READ && !read_on {
                dropped.push(e.key);
                continue;
            }
            groups.entry((e.kind.0, e.peer)).or_default().push((e.key, e.id));
        }
        h.outbox_done(&dropped)?;
        if groups.is_empty() {
            return Ok(());
        }
        // What they report is durable before they leave.
        h.flush()?;
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        for ((kind, peer), items) in groups {
            for chunk in items.chunks(wire::MAX_RECEIPT_IDS) {
                let frame = ClientFrame::Receipt(wire::Receipt {
                    to: peer.clone(),
                    kind: ReceiptKind(kind),
                    ids: chunk.iter().map(|(_, id)| *id).collect(),
                });
                let Ok(req) = link.conn.request(&frame, Instant::now()) else {
                    self.outbox_dirty = true;
                    return Ok(());
                };
                let keys: Vec<Vec<u8>> = chunk.iter().map(|(k, _)| k.clone()).collect();
                self.inflight_keys.extend(keys.iter().cloned());
                self.receipts_inflight.insert(req, keys);
            }
        }
        Ok(())
    }

    fn receipt_answered(&mut self, req: u32, frame: ServerFrame) -> Result<(), Error> {
        let keys = self.receipts_inflight.remove(&req).unwrap_or_default();
        for k in &keys {
            self.inflight_keys.remove(k);
        }
        match frame {
            ServerFrame::Done => self.profile.history().outbox_done(&keys),
            ServerFrame::Error {
                code: ErrorCode::UNSUPPORTED,
                ..
            } => {
                log::info!("the server does not take receipts; dropping them");
                self.profile.history().outbox_done(&keys)
            }
            ServerFrame::Error { code, text } => {
                // QUOTA_EXCEEDED, most likely: they wait for a later
                // connection.
                log::warn!(
                    "the server refused {} receipt{}: {} ({}); they wait for the next connection",
                    keys.len(),
                    if keys.len() == 1 { "" } else { "s" },
                    text,
                    code.name()
                );
                self.outbox_blocked = true;
                Ok(())
            }
            other => {
                log::warn!("unexpected answer to a receipt: {}", other.kind());
                self.outbox_blocked = true;
                Ok(())
            }
        }
    }

    /// Sends what the outbox holds and waits until the server has answered
    /// every receipt.
    fn settle_receipts(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        self.outbox_dirty = true;
        self.send_outbox()?;
        if let Some(link) = self.link.as_mut()
            && let Err(e) = link.flush()
        {
            self.link = None;
            return Err(e);
        }
        while !self.receipts_inflight.is_empty() {
            if Instant::now() >= deadline {
                self.link = None;
                return Err(Error::Timeout("the server to take the receipts"));
            }
            self.pump(deadline)?;
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
    /// server's refusal (`UNKNOWN_USER`, `QUOTA_EXCEEDED`...), after which
    /// the message is removed from the history; connection failures past
    /// the retry time, after which it stays pending.
    pub fn send_with_id(&mut self, id: MsgId, to: &str, text: &str) -> Result<Message, Error> {
        self.send_message(Message {
            id,
            to: to.to_owned(),
            text: text.to_owned(),
            ..Message::default()
        })
    }

    /// Sends `text` to `to` as a reply to the message `reply_to` of that
    /// conversation, quoting it (see [`Client::send_with_id`]).
    ///
    /// # Errors
    /// [`Error::Usage`] if the message is not in the conversation on this
    /// device, or was deleted; see [`Client::send_with_id`].
    pub fn send_reply(&mut self, to: &str, text: &str, reply_to: MsgId) -> Result<Message, Error> {
        let me = self.me()?;
        let quoted = self
            .profile
            .history()
            .find(&reply_to)?
            .into_iter()
            .find(|m| m.peer(&me) == to)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "no message {reply_to} in your conversation with {to} on this device"
                ))
            })?;
        if quoted.deleted {
            return Err(Error::Usage(format!("message {reply_to} was deleted")));
        }
        if quoted.undecryptable {
            return Err(Error::Usage(format!(
                "message {reply_to} could not be decrypted; there is nothing to quote"
            )));
        }
        self.send_message(Message {
            id: self.new_id()?,
            to: to.to_owned(),
            text: text.to_owned(),
            reply_to: Some(reply_to),
            quote: Some(Quote {
                from: quoted.from,
                text: Some(quote_of(&quoted.text)),
            }),
            ..Message::default()
        })
    }

    /// Forwards the message `id` (from any conversation) to `to`, marked
    /// forwarded (see [`Client::send_with_id`]).
    ///
    /// # Errors
    /// [`Error::Usage`] if no single message has that id here, or it was
    /// deleted or cannot be read; see [`Client::send_with_id`].
    pub fn forward(&mut self, id: MsgId, to: &str) -> Result<Message, Error> {
        let mut found = self.profile.history().find(&id)?;
        let src = match found.len() {
            0 => return Err(Error::Usage(format!("no message {id} on this device"))),
            1 => found.remove(0),
            _ => {
                return Err(Error::Usage(format!(
                    "{} messages on this device have id {id}; cannot tell which to forward",
                    found.len()
                )));
            }
        };
        if src.deleted {
            return Err(Error::Usage(format!("message {id} was deleted")));
        }
        if src.undecryptable {
            return Err(Error::Usage(format!("message {id} could not be decrypted")));
        }
        if src.attachment.is_some() {
            return self.forward_file(src, to);
        }
        self.send_message(Message {
            id: self.new_id()?,
            to: to.to_owned(),
            text: src.text,
            forwards: src.forwards.saturating_add(1),
            ..Message::default()
        })
    }

    /// The content that says what `m` says.
    fn content_of(m: &Message) -> Content {
        if let Some(c) = files::file_content(m) {
            return c;
        }
        match (m.reply_to, &m.quote) {
            (Some(reply_to), Some(q)) => Content::Reply {
                text: m.text.clone(),
                reply_to,
                quote: QuoteText {
                    from: q.from.clone(),
                    text: q.text.clone().unwrap_or_default(),
                },
            },
            _ if m.forwards > 0 => Content::Forward {
                text: m.text.clone(),
                forwards: m.forwards,
            },
            _ => Content::Text(m.text.clone()),
        }
    }

    /// Sends the message `msg` says (its id, recipient, text, and what it
    /// replies to or how often it was forwarded); see
    /// [`Client::send_with_id`].
    fn send_message(&mut self, msg: Message) -> Result<Message, Error> {
        // A file goes up before its message.
        let mut msg = self.upload_for(msg, &mut |_, _| {})?;
        let me = self.profile.registered()?.clone();
        if !wire::valid_user_name(&msg.to) {
            return Err(Error::Usage(format!("invalid user name {:?}", msg.to)));
        }
        let (id, to) = (msg.id, msg.to.clone());
        let payload = Payload {
            id,
            to: to.clone(),
            ts_ms: now_ms(),
            content: Self::content_of(&msg),
        };
        // Fails early on a text too long, before anything is stored.
        let plaintext = payload.encode()?;
        msg.from = me.user.clone();
        msg.from_device = DeviceId(me.device);
        msg.ts_ms = payload.ts_ms;
        msg.direction = Direction::Out;
        msg.status = Status::Pending;
        msg.undecryptable = false;
        let mut stored = false;
        match self.send_payload(&to, id, &plaintext, Some(&msg), &mut stored, None) {
            Ok(time_ms) => {
                let h = self.profile.history();
                h.set_status(&me.user, &id, Status::Sent, Some(time_ms))?;
                h.flush()?;
                Ok(h.get(&me.user, &id)?.unwrap_or(Message {
                    status: Status::Sent,
                    ts_ms: time_ms,
                    ..msg
                }))
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

    /// Sends `content` to `to` (and this user's other devices) as a
    /// message that is not kept in the history, made at `ts_ms` by this
    /// device's clock; returns the server's acceptance time. It does no
    /// checks: [`Client::edit`], [`Client::delete`] and the others make
    /// theirs first (tests use it to play a misbehaving client).
    ///
    /// # Errors
    /// See [`Client::send_with_id`].
    pub fn send_content(&mut self, to: &str, content: Content, ts_ms: u64) -> Result<u64, Error> {
        if !wire::valid_user_name(to) {
            return Err(Error::Usage(format!("invalid user name {to:?}")));
        }
        let id = self.new_id()?;
        let payload = Payload {
            id,
            to: to.to_owned(),
            ts_ms,
            content,
        };
        let plaintext = payload.encode()?;
        self.send_payload(to, id, &plaintext, None, &mut false, None)
    }

    /// This user's message `id`, for `what` (edit, delete).
    fn own_message(&self, id: MsgId, what: &str) -> Result<Message, Error> {
        let me = self.me()?;
        let h = self.profile.history();
        match h.get(&me, &id)? {
            Some(m) if m.deleted => Err(Error::Usage(format!("message {id} was deleted"))),
            Some(m) if m.status == Status::Pending => Err(Error::Usage(format!(
                "message {id} has not reached the server yet; {what} it once it is sent"
            ))),
            Some(m) if m.undecryptable => Err(Error::Usage(format!(
                "message {id} could not be decrypted on this device; {what} it from the device that sent it"
            ))),
            Some(m) => Ok(m),
            None if !h.find(&id)?.is_empty() => Err(Error::Usage(format!(
                "message {id} is not yours: only its sender can {what} it"
            ))),
            None => Err(Error::Usage(format!("no message {id} of yours on this device"))),
        }
    }

    /// Replaces the text of this user's message `id`, sent less than
    /// [`super::updates::EDIT_WINDOW`] ago, on every device of both users;
    /// the message keeps its id and is marked edited. Returns it as it is
    /// now.
    ///
    /// # Errors
    /// [`Error::Usage`] for someone else's message, a deleted one, or one
    /// past the window; see [`Client::send_with_id`].
    pub fn edit(&mut self, id: MsgId, text: &str) -> Result<Message, Error> {
        let m = self.own_message(id, "edit")?;
        let now = now_ms();
        if now > m.ts_ms.saturating_add(EDIT_WINDOW_MS) {
            return Err(Error::Usage(format!(
                "message {id} was sent more than 15 minutes ago; it can no longer be edited"
            )));
        }
        let content = Content::Edit {
            target: id,
            text: text.to_owned(),
        };
        self.send_content(&m.to, content, now)?;
        let by = self.this_device()?;
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.edit(&mut batch, &by.user, &by, id, &m.to, text, now, false)?;
        h.apply(batch, None)?;
        h.flush()?;
        h.get(&by.user, &id)?
            .ok_or(Error::Unexpected("the edited message is gone"))
    }

    /// Deletes this user's message `id`, sent less than
    /// [`super::updates::DELETE_WINDOW`] ago, for everyone: every device
    /// of both users drops its text and shows it deleted, and the server
    /// removes the copies still waiting in queues (`Retract`, spec §5.5).
    /// Returns it as it is now.
    ///
    /// # Errors
    /// [`Error::Usage`] for someone else's message, a deleted one, or one
    /// past the window; see [`Client::send_with_id`]. A failed `Retract`
    /// is logged, not returned: the delete has been sent by then.
    pub fn delete(&mut self, id: MsgId) -> Result<Message, Error> {
        let m = self.own_message(id, "delete")?;
        let now = now_ms();
        if now > m.ts_ms.saturating_add(DELETE_WINDOW_MS) {
            return Err(Error::Usage(format!(
                "message {id} was sent more than 2 days ago; it can no longer be deleted for everyone"
            )));
        }
        let time_ms = self.send_content(&m.to, Content::Delete { target: id }, now)?;
        let by = self.this_device()?;
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.delete(&mut batch, &by.user, &by, id, &m.to, now, time_ms, false)?;
        h.apply(batch, None)?;
        h.flush()?;
        if let Err(e) = self.retract(id) {
            log::warn!("deleted, but the server could not remove the copies still queued: {e}");
        }
        self.release_file(&m);
        self.profile
            .history()
            .get(&by.user, &id)?
            .ok_or(Error::Unexpected("the deleted message is gone"))
    }

    /// Asks the server to drop the copies of this user's message `id` still
    /// waiting in queues (spec §5.5), reconnecting once if needed.
    fn retract(&mut self, id: MsgId) -> Result<(), Error> {
        let mut tries = 0;
        loop {
            let r = self
                .connect()
                .and_then(|()| self.call(&ClientFrame::Retract { id }, "the server to retract the message"));
            match r {
                Ok(ServerFrame::Done) => return Ok(()),
                Ok(_) => return Err(Error::Unexpected("expected Done")),
                Err(Error::Server {
                    code: ErrorCode::UNSUPPORTED,
                    ..
                }) => {
                    log::info!("the server does not retract messages");
                    return Ok(());
                }
                Err(e) if e.is_transient() && tries < 2 => {
                    tries += 1;
                    self.link = None;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks the conversation with `peer` read: every message from `peer`
    /// not read yet. With read receipts on, sends read receipts (they reach
    /// `peer`'s devices and this user's other devices) and returns once
    /// the server has them; with them off, tells only this user's other
    /// devices, end to end. Returns how many messages were unread.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name; connection failures (the messages
    /// stay read here, and the receipts wait for the next connection).
    pub fn read(&mut self, peer: &str) -> Result<usize, Error> {
        if !wire::valid_user_name(peer) {
            return Err(Error::Usage(format!("invalid user name {peer:?}")));
        }
        let me = self.me()?;
        let h = self.profile.history();
        let (on, _) = h.read_receipts()?;
        let mut batch = Batch::default();
        let ids = h.mark_read(&mut batch, peer, now_ms(), on && peer != me)?;
        h.apply(batch, None)?;
        h.flush()?;
        if on {
            if !h.outbox()?.is_empty() {
                self.connect()?;
                self.settle_receipts()?;
            }
        } else {
            for chunk in ids.chunks(wire::MAX_RECEIPT_IDS) {
                let content = Content::Read {
                    peer: peer.to_owned(),
                    ids: chunk.to_vec(),
                };
                self.send_content(&me, content, now_ms())?;
            }
        }
        Ok(ids.len())
    }

    /// Turns read receipts on or off for this user: off, no read receipt
    /// leaves its devices and none it gets is shown (as in WhatsApp). The
    /// setting goes to this user's other devices too (end to end; the
    /// latest setting wins).
    ///
    /// # Errors
    /// Connection failures (the setting holds here; the other devices
    /// learn it with the next change).
    pub fn set_read_receipts(&mut self, on: bool) -> Result<(), Error> {
        let me = self.me()?;
        let now = now_ms();
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.set_read_receipts(&mut batch, on, now)?;
        h.apply(batch, None)?;
        h.flush()?;
        self.send_content(&me, Content::Settings { read_receipts: on }, now)?;
        Ok(())
    }

    /// The messages with id `id` on this device (usually one), each with
    /// what every device reported about it.
    ///
    /// # Errors
    /// [`Error::Usage`] if there is none; store errors.
    pub fn info(&self, id: MsgId) -> Result<Vec<(Message, Receipts)>, Error> {
        let h = self.profile.history();
        let found = h.find(&id)?;
        if found.is_empty() {
            return Err(Error::Usage(format!("no message {id} on this device")));
        }
        found
            .into_iter()
            .map(|m| {
                let r = h.receipts(&m.from, &m.id)?;
                Ok((m, r))
            })
            .collect()
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
    /// durable; returns once the server has answered the delivered
    /// receipts for them. Returns how many were new.
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

    /// [`Client::sync`], reporting every [`Event`] but the connection's
    /// own (notices each before the message it came with, receipts,
    /// updates, gap and expiry notices); then tops up keys and sends
    /// session resets.
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
        // Messages with a file, to download by themselves afterwards.
        let mut files = Vec::new();
        let mut report = |ev: Event, count: &mut usize, files: &mut Vec<Message>| {
            match &ev {
                Event::Message(m) => {
                    *count += 1;
                    if m.attachment.is_some() {
                        files.push(m.clone());
                    }
                }
                Event::Drained | Event::Connected | Event::Disconnected(_) => return,
                _ => {}
            }
            on_event(&ev);
        };
        loop {
            let step = self.connect().and_then(|()| {
                let mut done = false;
                while !done {
                    while let Some(ev) = self.events.pop_front() {
                        done = done || ev == Event::Drained;
                        report(ev, &mut count, &mut files);
                    }
                    if !done {
                        self.pump(Instant::now() + ANSWER_TIMEOUT)?;
                    }
                }
                // Returns once the receipts for what came are `Done`.
                self.settle_receipts()
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
            report(ev, &mut count, &mut files);
        }
        for m in std::mem::take(&mut files) {
            if let Some(ev) = self.auto_fetch(&m) {
                report(ev, &mut count, &mut files);
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
                let id = m.id;
                match self.send_message(m) {
                    Ok(_) => {}
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => log::warn!("pending message {id} could not be sent: {e}"),
                }
            }
        }
        loop {
            while let Some(ev) = self.events.pop_front() {
                if !on_event(&ev) {
                    return Ok(false);
                }
                if let Event::Message(m) = &ev
                    && let Some(done) = self.auto_fetch(m)
                {
                    self.events.push_front(done);
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
            Request::Send { to, text, reply_to } => Ok(Outcome::Sent(match reply_to {
                Some(id) => self.send_reply(&to, &text, parse_id(&id)?)?,
                None => self.send(&to, &text)?,
            })),
            Request::Forward { id, to } => Ok(Outcome::Sent(self.forward(parse_id(&id)?, &to)?)),
            Request::Edit { id, text } => Ok(Outcome::Edited(self.edit(parse_id(&id)?, &text)?)),
            Request::Delete { id } => Ok(Outcome::Deleted(self.delete(parse_id(&id)?)?)),
            Request::Read { user } => Ok(Outcome::Read {
                count: self.read(&user)?,
                user,
            }),
            Request::Info { id } => Ok(Outcome::Info(self.info(parse_id(&id)?)?)),
            Request::Settings {
                read_receipts,
                auto_download,
            } => {
                if let Some(on) = read_receipts {
                    self.set_read_receipts(on)?;
                }
                if let Some(bytes) = auto_download {
                    self.set_auto_download(bytes)?;
                }
                Ok(Outcome::Settings {
                    read_receipts: self.profile.history().read_receipts()?.0,
                    auto_download: self.auto_download()?,
                })
            }
            Request::SendFile { to, path, caption } => {
                let mut progress = |done, total| on_event(&Event::Progress { done, total });
                Ok(Outcome::Sent(self.send_file(
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
