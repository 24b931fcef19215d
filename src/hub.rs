//! Routing and authorization: who is online where, what each frame does to
//! accounts and queues, when answers may go out, and delivery to devices.
//!
//! There is one [`Hub`] per event loop; they share a [`Shared`] (the store
//! and the directory of online devices), so a hub never assumes it owns
//! every connection. A hub acts on the session that produced an event and
//! returns everything else as [`Effect`]s naming a [`ConnId`]; the event
//! loop applies those on its own connections and forwards the rest to the
//! loop that owns them.
//!
//! Guarantees kept here (spec §10):
//! - an answer that reports a durable change (`Accepted`, `Registered`,
//!   `LinkCode`, `Done` after a revoke) is held until the flusher's durable
//!   epoch covers the write, a retried `Send`'s included;
//! - a device's messages are delivered from its queue in sequence order
//!   with at most [`HubConfig::window`] unacknowledged, so a backlog stays
//!   on disk; online or not, a device only ever reads its own queue, so
//!   the order is the queue's order;
//! - a `Send` whose bodies do not match the current devices is refused as
//!   a whole, with the missing and extra devices.
//!
//! What it does not do: sockets, byte formats, or reading the clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::ids::{ConnId, DeviceKey, UserId};
use crate::noise::PublicKey;
use crate::session::{Event, Identity, Session};
use crate::store::{
    Appended, Entry, Epoch, LinkError, LinkRequestError, Op, Outcome, PublishError, Quota, RegisterError, Store,
    StoreError,
};
use crate::wire::{
    self, ClientFrame, Deliver, DeviceAddr, DeviceId, ErrorCode, ExpiredNotice, GapNotice, Lost, MAX_BODIES,
    MAX_BODY_LEN, MAX_RECEIPT_IDS, ReceiptDeliver, ReceiptKind, ServerFrame,
};

/// The time, as the driver read it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For timers.
    pub mono: Instant,
    /// For timestamps: milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks (for drivers, never for the core).
    pub fn read() -> Now {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Now {
            mono: Instant::now(),
            unix_ms,
        }
    }
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most unacknowledged deliveries per connection (spec §10).
    pub window: u64,
    /// How long a link code stays valid.
    pub link_ttl: Duration,
    /// Key claims a device may make per minute (and in a burst).
    pub claims_per_minute: u32,
    /// Below this many one-time keys a device is told to publish more.
    pub low_keys: u32,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            window: 256,
            link_ttl: Duration::from_secs(600),
            claims_per_minute: 30,
            low_keys: 10,
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `capacity` a minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, capacity: u32, now: Instant) -> bool {
        let per_sec = f64::from(capacity) / 60.0;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(capacity));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// State shared by every loop's hub.
pub struct Shared {
    store: Arc<Store>,
    online: Mutex<HashMap<DeviceKey, ConnId>>,
    claims: Mutex<HashMap<DeviceKey, Bucket>>,
    config: HubConfig,
}

impl Shared {
    /// Shared state over `store`.
    pub fn new(store: Arc<Store>, config: HubConfig) -> Arc<Shared> {
        Arc::new(Shared {
            store,
            online: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn online(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceKey, ConnId>> {
        self.online.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection a device is online on.
    pub fn connection_of(&self, d: DeviceKey) -> Option<ConnId> {
        self.online().get(&d).copied()
    }

    /// How many devices are online.
    pub fn online_count(&self) -> usize {
        self.online().len()
    }

    /// Takes one key claim from a device's allowance.
    fn may_claim(&self, d: DeviceKey, now: Instant) -> bool {
        let capacity = self.config.claims_per_minute;
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if claims.len() > 100_000 {
            // Forget full buckets rather than grow without bound.
            let per_sec = f64::from(capacity) / 60.0;
            claims.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_sec < f64::from(capacity)
            });
        }
        claims
            .entry(d)
            .or_insert(Bucket {
                tokens: f64::from(capacity),
                last: now,
            })
            .take(capacity, now)
    }

    /// Who a static key belongs to. A storage failure refuses the
    /// connection.
    pub fn identify(&self, key: &PublicKey) -> Identity {
        match self.store.accounts().identify(key) {
            Ok(id) => id,
            Err(e) => {
                log::error!("identify failed: {e}");
                Identity::Refused
            }
        }
    }

    /// Revokes a device for the operator: durable when this returns. The
    /// caller closes the returned connection, if any.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn revoke(&self, d: DeviceKey, now_ms: u64) -> Result<Option<Option<ConnId>>, StoreError> {
        if !self.store.accounts().revoke(d, now_ms)? {
            return Ok(None);
        }
        self.store.delete_queue(d)?;
        self.store.delete_keys(d)?;
        self.store.flush()?;
        Ok(Some(self.connection_of(d)))
    }
}

/// Delivery state of one authenticated connection; kept by the driver
/// next to the session.
#[derive(Debug, Clone)]
pub struct Cursor {
    device: DeviceKey,
    /// Next sequence to read from the queue.
    next: u64,
    /// Highest sequence sent on this connection (0: none yet).
    delivered: u64,
    /// Highest sequence acknowledged (or before the first delivered).
    acked: u64,
    /// Highest sequence queued when the connection authenticated.
    drain_target: u64,
    drained: bool,
    /// Delivery stopped because the output was full.
    stalled: bool,
}

impl Cursor {
    /// The device.
    pub fn device(&self) -> DeviceKey {
        self.device
    }

    /// Whether delivery waits for the output to drain.
    pub fn stalled(&self) -> bool {
        self.stalled
    }
}

/// Something for the driver to do on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The device on this connection has new queue entries: pump it.
    Wake(ConnId),
    /// Send this frame.
    Send {
        /// Where.
        conn: ConnId,
        /// The request it answers.
        req: u32,
        /// What.
        frame: ServerFrame,
    },
    /// The connection is now this device ([`Session::set_device`]).
    Authenticate {
        /// Where.
        conn: ConnId,
        /// Who.
        device: DeviceKey,
    },
    /// Close the connection with this code.
    Close {
        /// Where.
        conn: ConnId,
        /// Why.
        code: ErrorCode,
        /// For people.
        text: &'static str,
    },
}

impl Effect {
    /// The connection it concerns.
    pub fn conn(&self) -> ConnId {
        match *self {
            Effect::Wake(c) => c,
            Effect::Send { conn, .. } | Effect::Authenticate { conn, .. } | Effect::Close { conn, .. } => conn,
        }
    }
}

/// One event loop's hub.
pub struct Hub {
    shared: Arc<Shared>,
    /// Effects waiting for a flush, in epoch order.
    pending: VecDeque<(Epoch, Effect)>,
    effects: Vec<Effect>,
    entries: Vec<(u64, Entry)>,
    devices: Vec<DeviceId>,
    /// Queue changes of this turn, written together by [`Hub::commit`].
    ops: Vec<Op>,
    /// What to do with each op's outcome.
    waiting: Vec<Waiting>,
}

/// What to do with a staged op's outcome.
enum Waiting {
    Send {
        conn: ConnId,
        req: u32,
        id: wire::MsgId,
        wake: Vec<DeviceKey>,
    },
    Receipt {
        conn: ConnId,
        req: u32,
        wake: Vec<DeviceKey>,
    },
    Ack,
}

impl Hub {
    /// A hub for one loop.
    pub fn new(shared: Arc<Shared>) -> Hub {
        Hub {
            shared,
            pending: VecDeque::new(),
            effects: Vec::new(),
            entries: Vec::new(),
            devices: Vec::new(),
            ops: Vec::new(),
            waiting: Vec::new(),
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Writes this turn's queue changes in one batch and turns their
    /// outcomes into effects: answers held for the flush that covers the
    /// batch, refusals at once, wakes for devices that got something. The
    /// driver calls it once per turn, after handling every event.
    pub fn commit(&mut self) {
        if self.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.ops);
        let waiting = std::mem::take(&mut self.waiting);
        let (outcomes, epoch) = match self.shared.store.apply(&ops) {
            Ok(r) => r,
            Err(e) => {
                log::error!("storage failure writing a batch: {e}");
                for w in waiting {
                    if let Waiting::Send { conn, req, .. } | Waiting::Receipt { conn, req, .. } = w {
                        let frame = ServerFrame::error(ErrorCode::INTERNAL, "server storage failure");
                        self.effects.push(Effect::Send { conn, req, frame });
                    }
                }
                return;
            }
        };
        for (outcome, w) in outcomes.into_iter().zip(waiting) {
            match (outcome, w) {
                (Outcome::Appended(a), Waiting::Send { conn, req, id, wake }) => match a {
                    Appended::New { time_ms } | Appended::Duplicate { time_ms } => {
                        let frame = ServerFrame::Accepted { id, time_ms };
                        self.after_flush(epoch, Effect::Send { conn, req, frame });
                        if matches!(a, Appended::New { .. }) {
                            // Online recipients read their queue now; the
                            // rest when they connect.
                            self.wake_online(&wake);
                        }
                    }
                    Appended::OverQuota(quota) => {
                        let text = match quota {
                            Quota::Queue(_) => "a recipient device's queue is full",
                            Quota::Disk => "the server is at its storage budget",
                        };
                        let frame = ServerFrame::error(ErrorCode::QUOTA_EXCEEDED, text);
                        self.effects.push(Effect::Send { conn, req, frame });
                    }
                },
                (Outcome::Receipt(Ok(())), Waiting::Receipt { conn, req, wake }) => {
                    self.after_flush(
                        epoch,
                        Effect::Send {
                            conn,
                            req,
                            frame: ServerFrame::Done,
                        },
                    );
                    self.wake_online(&wake);
                }
                (Outcome::Receipt(Err(_)), Waiting::Receipt { conn, req, .. }) => {
                    let frame = ServerFrame::error(ErrorCode::QUOTA_EXCEEDED, "a queue is full; try again later");
                    self.effects.push(Effect::Send { conn, req, frame });
                }
                (Outcome::Acked(_), Waiting::Ack) => {}
                _ => debug_assert!(false, "outcomes follow ops"),
            }
        }
    }

    /// Effects to apply now. Drain after every call.
    pub fn effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.drain(..)
    }

    /// Whether answers wait for a flush.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves every effect whose write is durable to [`Hub::effects`].
    pub fn release(&mut self, durable: Epoch) {
        while let Some((e, _)) = self.pending.front() {
            if *e > durable {
                break;
            }
            if let Some((_, effect)) = self.pending.pop_front() {
                self.effects.push(effect);
            }
        }
    }

    fn after_flush(&mut self, epoch: Epoch, effect: Effect) {
        debug_assert!(self.pending.back().is_none_or(|(e, _)| *e <= epoch));
        self.pending.push_back((epoch, effect));
    }

    fn after_next_flush(&mut self, effect: Effect) {
        let epoch = self.store().flusher().note_write();
        self.after_flush(epoch, effect);
    }

    /// Answers a `Register` or `RedeemLink` with `Registered` and makes the
    /// connection `device`. Registered first, then the queue
    /// (`QueueDrained`), after the same flush: were they given an epoch
    /// each, a flush in between could release `Registered` before the
    /// session is authenticated, and the client's next request would be
    /// refused with "register first".
    fn registered(&mut self, conn: ConnId, req: u32, user: String, device: DeviceKey) {
        let epoch = self.store().flusher().note_write();
        let frame = ServerFrame::Registered {
            user,
            device: device.device,
        };
        self.after_flush(epoch, Effect::Send { conn, req, frame });
        self.after_flush(epoch, Effect::Authenticate { conn, device });
    }

    /// Handles one session event. `cursor` is the connection's delivery
    /// state, created here when it authenticates.
    pub fn handle(&mut self, conn: ConnId, session: &mut Session, cursor: &mut Option<Cursor>, event: Event, now: Now) {
        match event {
            Event::Authenticated(device) => self.authenticated(conn, session, cursor, device, now),
            Event::Frame { req, frame } => {
                // spec §5.2 `RevokeDevice`: nothing a revoked device sends is
                // acted on, even before its connection's close arrives.
                if session.device().is_some_and(|d| !self.store().accounts().is_current(d)) {
                    return;
                }
                if let Err(e) = self.frame(conn, session, cursor, req, frame, now) {
                    log::error!("storage failure handling a frame: {e}");
                    session.send_error(req, ErrorCode::INTERNAL, "server storage failure", now.mono);
                }
            }
        }
    }

    fn authenticated(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        cursor: &mut Option<Cursor>,
        device: DeviceKey,
        now: Now,
    ) {
        let previous = self.shared.online().insert(device, conn);
        // Revocation is checked only now that this connection is in the
        // directory; a revoke marks the device first and looks it up after.
        // So whatever the interleaving across loops, either the revoke finds
        // this connection and closes it, or this check sees the revoke.
        let revoked = !self.store().accounts().is_current(device);
        if let Some(old) = previous.filter(|old| *old != conn) {
            self.effects.push(if revoked {
                Effect::Close {
                    conn: old,
                    code: ErrorCode::REVOKED,
                    text: "this device was revoked",
                }
            } else {
                Effect::Close {
                    conn: old,
                    code: ErrorCode::CONNECTED_ELSEWHERE,
                    text: "this device connected elsewhere",
                }
            });
        }
        if revoked {
            let mut online = self.shared.online();
            if online.get(&device) == Some(&conn) {
                online.remove(&device);
            }
            drop(online);
            session.close(ErrorCode::REVOKED, "this device was revoked", now.mono);
            return;
        }
        if let Err(e) = self.store().accounts().touch(device, now.unix_ms) {
            log::warn!("could not record last-seen time: {e}");
        }
        let drain_target = match self.store().last_seq(device) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot read queue of {device}: {e}");
                session.close(ErrorCode::INTERNAL, "server storage failure", now.mono);
                return;
            }
        };
        self.tell_if_low_on_keys(session, device, now);
        log::debug!("{device} online on {conn:?}");
        let c = cursor.insert(Cursor {
            device,
            next: 0,
            delivered: 0,
            acked: 0,
            drain_target,
            drained: false,
            stalled: false,
        });
        self.pump(session, c, now);
    }

    fn tell_if_low_on_keys(&mut self, session: &mut Session, device: DeviceKey, now: Now) {
        let store = self.store();
        if let (Ok(Some(_)), Ok(n)) = (store.identity(device), store.one_time_count(device))
            && n < self.shared.config.low_keys
        {
            session.send(0, &ServerFrame::KeyCount { one_time: n }, now.mono);
        }
    }

    /// The connection is gone: forget it in the directory (unless the
    /// device already reconnected elsewhere).
    pub fn closed(&mut self, conn: ConnId, cursor: Option<&Cursor>) {
        if let Some(c) = cursor {
            let mut online = self.shared.online();
            if online.get(&c.device) == Some(&conn) {
                online.remove(&c.device);
            }
        }
    }

    /// The frame that delivers a queue entry.
    fn frame_for(&self, seq: u64, entry: Entry) -> Option<ServerFrame> {
        let accounts = self.shared.store.accounts();
        let addr = |user: u32, device: u32| {
            accounts.user_name(UserId(user)).map(|n| DeviceAddr {
                user: n.to_string(),
                device: DeviceId(device),
            })
        };
        let name = |user: u32| accounts.user_name(UserId(user)).map(|n| n.to_string());
        Some(match entry {
            Entry::Message(m) => ServerFrame::Deliver(Deliver {
                seq,
                id: m.id,
                from: addr(m.from_user, m.from_device)?,
                to: name(m.to_user)?,
                time_ms: m.time_ms,
                body: m.body,
            }),
            Entry::Receipt(r) => ServerFrame::Receipt(ReceiptDeliver {
                seq,
                from: addr(r.from_user, r.from_device)?,
                to: name(r.to_user)?,
                kind: ReceiptKind(r.kind),
                ids: r.ids,
                time_ms: r.time_ms,
            }),
            Entry::Gap(g) => ServerFrame::Gap(GapNotice {
                seq,
                lost: g
                    .lost
                    .into_iter()
                    .filter_map(|l| {
                        Some(Lost {
                            from: addr(l.from_user, l.from_device)?,
                            count: l.count,
                            first_ms: l.first_ms,
                            last_ms: l.last_ms,
                        })
                    })
                    .collect(),
            }),
            Entry::Expired(e) => ServerFrame::Expired(ExpiredNotice {
                seq,
                device: addr(e.device_user, e.device)?,
                ids: e.ids,
            }),
        })
    }

    /// Sends queued entries while the window and the output allow.
    pub fn pump(&mut self, session: &mut Session, cursor: &mut Cursor, now: Now) {
        let window = self.shared.config.window;
        cursor.stalled = false;
        loop {
            if !session.wants_more() {
                cursor.stalled = session.device().is_some();
                return;
            }
            let room = window.saturating_sub(cursor.delivered.saturating_sub(cursor.acked));
            if room == 0 {
                return;
            }
            let mut entries = std::mem::take(&mut self.entries);
            entries.clear();
            let want = room.min(64) as usize;
            if let Err(e) = self.store().read_queue(cursor.device, cursor.next, want, &mut entries) {
                log::error!("cannot read queue of {}: {e}", cursor.device);
                session.close(ErrorCode::INTERNAL, "server storage failure", now.mono);
                self.entries = entries;
                return;
            }
            let exhausted = entries.len() < want;
            for (seq, entry) in entries.drain(..) {
                if cursor.delivered == 0 {
                    cursor.acked = cursor.acked.max(seq - 1);
                }
                // Accounts are never deleted, so every entry has a frame;
                // were one missing, the entry still counts as delivered so
                // that an ack of a later one removes it.
                if let Some(frame) = self.frame_for(seq, entry) {
                    session.send(0, &frame, now.mono);
                }
                cursor.delivered = seq;
                cursor.next = seq + 1;
                if !cursor.drained && seq >= cursor.drain_target {
                    cursor.drained = true;
                    session.send(0, &ServerFrame::QueueDrained, now.mono);
                }
            }
            self.entries = entries;
            if exhausted {
                if !cursor.drained {
                    cursor.drained = true;
                    session.send(0, &ServerFrame::QueueDrained, now.mono);
                }
                return;
            }
        }
    }

    fn frame(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        cursor: &mut Option<Cursor>,
        req: u32,
        frame: ClientFrame,
        now: Now,
    ) -> Result<(), StoreError> {
        let answer = |session: &mut Session, frame: ServerFrame| {
            session.send(req, &frame, now.mono);
        };
        let error = |session: &mut Session, code: ErrorCode, text: &str| {
            session.send_error(req, code, text, now.mono);
        };
        match frame {
            ClientFrame::Register { invite, name } => {
                let Some(key) = session.remote_static().copied() else {
                    return Ok(());
                };
                match self.store().accounts().register(&invite, &name, &key, now.unix_ms)? {
                    Ok(device) => {
                        log::info!("registered {name} as {device}");
                        self.registered(conn, req, name, device);
                    }
                    Err(RegisterError::InvalidInvite) => {
                        error(session, ErrorCode::INVALID_INVITE, "invite unknown, used up or expired")
                    }
                    Err(RegisterError::InvalidName) => {
                        error(session, ErrorCode::INVALID_NAME, "names are 3 to 32 of a-z 0-9 _ .")
                    }
                    Err(RegisterError::NameTaken) => error(session, ErrorCode::NAME_TAKEN, "name taken"),
                    Err(RegisterError::KeyInUse) => error(session, ErrorCode::NOT_ALLOWED, "key already registered"),
                }
            }
            ClientFrame::RedeemLink { code } => {
                let Some(key) = session.remote_static().copied() else {
                    return Ok(());
                };
                match self.store().accounts().redeem_link(&code, &key, now.unix_ms)? {
                    Ok(device) => {
                        let user = self.store().accounts().user_name(device.user).map(|n| n.to_string());
                        log::info!("linked {device}");
                        self.registered(conn, req, user.unwrap_or_default(), device);
                    }
                    Err(LinkError::InvalidCode) => error(
                        session,
                        ErrorCode::INVALID_LINK_CODE,
                        "link code unknown, used or expired",
                    ),
                    Err(LinkError::DeviceLimit) => error(session, ErrorCode::DEVICE_LIMIT, "too many devices"),
                    Err(LinkError::KeyInUse) => error(session, ErrorCode::NOT_ALLOWED, "key already registered"),
                }
            }
            ClientFrame::RequestLink => {
                let Some(me) = session.device() else { return Ok(()) };
                // spec §5.2: bound to `me`, bounded per user (store/accounts.rs).
                match self
                    .store()
                    .accounts()
                    .request_link(me, now.unix_ms, self.shared.config.link_ttl)?
                {
                    Ok((code, expires_ms)) => self.after_next_flush(Effect::Send {
                        conn,
                        req,
                        frame: ServerFrame::LinkCode { code, expires_ms },
                    }),
                    Err(LinkRequestError::DeviceLimit) => error(session, ErrorCode::DEVICE_LIMIT, "too many devices"),
                    Err(LinkRequestError::Outstanding) => error(
                        session,
                        ErrorCode::RATE_LIMITED,
                        "too many link codes outstanding; use one or wait until one expires",
                    ),
                    Err(LinkRequestError::RateLimited) => error(
                        session,
                        ErrorCode::RATE_LIMITED,
                        "too many link codes asked for; try later",
                    ),
                    // Revoked meanwhile: its connection is being closed.
                    Err(LinkRequestError::Revoked) => {}
                }
            }
            ClientFrame::ListDevices { user } => match self.store().accounts().user_id(&user) {
                Some(id) => {
                    let mut devices = Vec::new();
                    self.store().accounts().current_devices(id, &mut devices);
                    answer(session, ServerFrame::Devices { user, devices });
                }
                None => error(session, ErrorCode::UNKNOWN_USER, "no such user"),
            },
            ClientFrame::MyDevices => {
                let Some(me) = session.device() else { return Ok(()) };
                let devices = self.store().accounts().device_infos(me.user);
                answer(session, ServerFrame::MyDevices { devices });
            }
            ClientFrame::RevokeDevice { device } => {
                let Some(me) = session.device() else { return Ok(()) };
                // Its queue is deleted after this turn's appends, not before.
                self.commit();
                let target = DeviceKey { user: me.user, device };
                let mut current = Vec::new();
                self.store().accounts().current_devices(me.user, &mut current);
                if current == [device] {
                    error(session, ErrorCode::BAD_REQUEST, "that is the account's last device");
                    return Ok(());
                }
                if !self.store().accounts().revoke(target, now.unix_ms)? {
                    error(session, ErrorCode::UNKNOWN_DEVICE, "no such device");
                    return Ok(());
                }
                self.store().delete_queue(target)?;
                self.store().delete_keys(target)?;
                log::info!("{me} revoked {target}");
                self.after_next_flush(Effect::Send {
                    conn,
                    req,
                    frame: ServerFrame::Done,
                });
                // Looked up after the revoke (see `authenticated`). Another
                // connection is closed at once; the revoker's own after its
                // `Done`.
                if let Some(victim) = self.shared.connection_of(target) {
                    let close = Effect::Close {
                        conn: victim,
                        code: ErrorCode::REVOKED,
                        text: "this device was revoked",
                    };
                    if victim == conn {
                        self.after_next_flush(close);
                    } else {
                        self.effects.push(close);
                    }
                }
            }
            ClientFrame::Send(send) => self.send(conn, session, req, send, now)?,
            ClientFrame::PublishKeys(keys) => self.publish_keys(conn, session, req, *keys, now)?,
            ClientFrame::ClaimKeys { user } => self.claim_keys(conn, session, req, user, now)?,
            ClientFrame::Receipt(receipt) => self.receipt(conn, session, req, receipt, now)?,
            ClientFrame::Retract { id } => {
                let Some(me) = session.device() else { return Ok(()) };
                // It must see this turn's appends.
                self.commit();
                let mut devices = Vec::new();
                self.store().accounts().all_devices(me.user, &mut devices);
                let senders: Vec<DeviceKey> = devices
                    .into_iter()
                    .map(|device| DeviceKey { user: me.user, device })
                    .collect();
                let (removed, epoch) = self.store().retract(&senders, id)?;
                log::debug!("{me} retracted a message: {removed} queued copies removed");
                self.after_flush(
                    epoch,
                    Effect::Send {
                        conn,
                        req,
                        frame: ServerFrame::Done,
                    },
                );
            }
            ClientFrame::Ack { up_to } => {
                let Some(c) = cursor.as_mut() else { return Ok(()) };
                // spec §5.2: only what was delivered on this connection.
                if up_to > c.delivered {
                    let text = "ack beyond what was delivered";
                    session.send_error(req, ErrorCode::BAD_REQUEST, text, now.mono);
                    return Ok(());
                }
                if up_to > c.acked {
                    // Written with the turn's batch (a lost ack only means
                    // a redelivery, which the client drops).
                    self.ops.push(Op::Ack {
                        device: c.device,
                        up_to,
                    });
                    self.waiting.push(Waiting::Ack);
                    c.acked = up_to;
                    self.pump(session, c, now);
                }
            }
            // The session answers these itself.
            ClientFrame::Ping | ClientFrame::Pong | ClientFrame::Close => {}
        }
        Ok(())
    }

    fn receipt(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        req: u32,
        receipt: wire::Receipt,
        now: Now,
    ) -> Result<(), StoreError> {
        let Some(me) = session.device() else { return Ok(()) };
        let Some(to) = self.store().accounts().user_id(&receipt.to) else {
            session.send_error(req, ErrorCode::UNKNOWN_USER, "no such user", now.mono);
            return Ok(());
        };
        if receipt.ids.is_empty() || receipt.ids.len() > MAX_RECEIPT_IDS || receipt.kind.0 == 0 {
            session.send_error(
                req,
                ErrorCode::BAD_REQUEST,
                "a receipt names 1 to 1024 messages",
                now.mono,
            );
            return Ok(());
        }
        // spec §5.5: to every device of the messages' sender, and to the
        // reporting user's other devices.
        let mut devices = std::mem::take(&mut self.devices);
        let mut targets = Vec::new();
        for user in [to, me.user] {
            devices.clear();
            self.store().accounts().current_devices(user, &mut devices);
            targets.extend(
                devices
                    .iter()
                    .map(|&device| DeviceKey { user, device })
                    .filter(|d| *d != me),
            );
        }
        self.devices = devices;
        targets.sort();
        targets.dedup();
        self.ops.push(Op::Receipt {
            from: me,
            to,
            kind: receipt.kind,
            ids: receipt.ids,
            targets: targets.clone(),
            now_ms: now.unix_ms,
        });
        self.waiting.push(Waiting::Receipt {
            conn,
            req,
            wake: targets,
        });
        Ok(())
    }

    /// Asks the loops holding these devices to deliver their queues.
    fn wake_online(&mut self, devices: &[DeviceKey]) {
        let online = self.shared.online();
        for d in devices {
            if let Some(c) = online.get(d) {
                self.effects.push(Effect::Wake(*c));
            }
        }
    }

    fn publish_keys(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        req: u32,
        keys: wire::PublishKeys,
        now: Now,
    ) -> Result<(), StoreError> {
        let Some(me) = session.device() else { return Ok(()) };
        let error = |session: &mut Session, code: ErrorCode, text: &str| {
            session.send_error(req, code, text, now.mono);
        };
        // spec §5.4: every signature is checked before anything is stored.
        let identity = match keys.identity {
            Some(id) => Some(id),
            None => self.store().identity(me)?,
        };
        let has_keys = !keys.one_time.is_empty() || keys.fallback.is_some();
        if identity.is_none() && has_keys {
            // Checked here, not only in the store: keys are never stored
            // without a signature check against a known identity.
            error(session, ErrorCode::BAD_REQUEST, "publish an identity first");
            return Ok(());
        }
        if let Some(id) = &identity {
            let mut signed = keys.one_time.iter().chain(keys.fallback.as_ref());
            if !crate::keys::verify_identity(id) || !signed.all(|k| crate::keys::verify_signed_key(id, k)) {
                error(session, ErrorCode::BAD_REQUEST, "bad signature");
                return Ok(());
            }
        }
        match self
            .store()
            .publish_keys(me, keys.identity.as_ref(), &keys.one_time, keys.fallback.as_ref())?
        {
            Ok((one_time, epoch)) => {
                self.after_flush(
                    epoch,
                    Effect::Send {
                        conn,
                        req,
                        frame: ServerFrame::KeyCount { one_time },
                    },
                );
            }
            Err(PublishError::IdentityChanged) => error(
                session,
                ErrorCode::NOT_ALLOWED,
                "this device already has a different identity",
            ),
            Err(PublishError::NoIdentity) => error(session, ErrorCode::BAD_REQUEST, "publish an identity first"),
            Err(PublishError::TooMany) => error(session, ErrorCode::BAD_REQUEST, "too many one-time keys"),
        }
        Ok(())
    }

    fn claim_keys(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        req: u32,
        user: String,
        now: Now,
    ) -> Result<(), StoreError> {
        let Some(me) = session.device() else { return Ok(()) };
        let Some(id) = self.store().accounts().user_id(&user) else {
            session.send_error(req, ErrorCode::UNKNOWN_USER, "no such user", now.mono);
            return Ok(());
        };
        if !self.shared.may_claim(me, now.mono) {
            session.send_error(
                req,
                ErrorCode::RATE_LIMITED,
                "too many key claims; try again in a minute",
                now.mono,
            );
            return Ok(());
        }
        let mut devices = std::mem::take(&mut self.devices);
        devices.clear();
        self.store().accounts().current_devices(id, &mut devices);
        let mut claimed = Vec::with_capacity(devices.len());
        let mut result = Ok(());
        for d in devices
            .iter()
            .map(|&device| DeviceKey { user: id, device })
            .filter(|d| *d != me)
        {
            let keys = match self.store().claim_keys(d) {
                Ok(Some(keys)) => keys,
                Ok(None) => continue,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if keys.one_time.is_some() && !keys.fallback {
                let left = self.store().one_time_count(d).unwrap_or(0);
                if left < self.shared.config.low_keys
                    && let Some(c) = self.shared.connection_of(d)
                {
                    let frame = ServerFrame::KeyCount { one_time: left };
                    self.effects.push(Effect::Send { conn: c, req: 0, frame });
                }
            }
            claimed.push(keys);
        }
        self.devices = devices;
        result?;
        // A claimed key is gone for good only once that is durable; until
        // then nobody else gets it, and the claimer waits.
        self.after_next_flush(Effect::Send {
            conn,
            req,
            frame: ServerFrame::Keys { user, devices: claimed },
        });
        Ok(())
    }

    fn send(
        &mut self,
        conn: ConnId,
        session: &mut Session,
        req: u32,
        send: wire::Send,
        now: Now,
    ) -> Result<(), StoreError> {
        let Some(me) = session.device() else { return Ok(()) };
        let error = |session: &mut Session, code: ErrorCode, text: &str| {
            session.send_error(req, code, text, now.mono);
        };
        let accounts = self.shared.store.accounts();
        // spec §10: a retry after a device change is still answered from
        // the dedup record (checked below, where the devices disagree).
        let Some(to) = accounts.user_id(&send.to) else {
            error(session, ErrorCode::UNKNOWN_USER, "no such user");
            return Ok(());
        };
        if send.bodies.len() + send.own.len() > MAX_BODIES {
            error(session, ErrorCode::TOO_MANY_BODIES, "too many bodies");
            return Ok(());
        }
        if send.bodies.iter().chain(&send.own).any(|b| b.data.len() > MAX_BODY_LEN) {
            error(session, ErrorCode::BODY_TOO_LARGE, "body too large");
            return Ok(());
        }
        let to_self = to == me.user;
        if to_self && !send.own.is_empty() {
            error(
                session,
                ErrorCode::BAD_REQUEST,
                "to yourself, every body goes in bodies",
            );
            return Ok(());
        }
        // Expected devices: the recipient's, and the sender's other ones.
        let mut missing = Vec::new();
        let mut extra = Vec::new();
        let mut targets: Vec<(DeviceKey, Bytes)> = Vec::with_capacity(send.bodies.len() + send.own.len());
        let groups = [(to, &send.bodies), (me.user, &send.own)];
        for &(user, bodies) in if to_self { &groups[..1] } else { &groups[..] } {
            let mut devices = std::mem::take(&mut self.devices);
            devices.clear();
            accounts.current_devices(user, &mut devices);
            if user == me.user {
                devices.retain(|d| *d != me.device);
            }
            let user_name = || accounts.user_name(user).map(|n| n.to_string()).unwrap_or_default();
            for (i, b) in bodies.iter().enumerate() {
                let key = DeviceKey { user, device: b.device };
                let problem = if bodies[..i].iter().any(|o| o.device == b.device) {
                    Some("two bodies for one device")
                } else if key == me {
                    Some("a body for the sending device")
                } else {
                    None
                };
                if let Some(text) = problem {
                    error(session, ErrorCode::BAD_REQUEST, text);
                    self.devices = devices;
                    return Ok(());
                }
                if devices.contains(&b.device) {
                    targets.push((key, b.data.clone()));
                } else {
                    extra.push(DeviceAddr {
                        user: user_name(),
                        device: b.device,
                    });
                }
            }
            for d in &devices {
                if !bodies.iter().any(|b| b.device == *d) {
                    missing.push(DeviceAddr {
                        user: user_name(),
                        device: *d,
                    });
                }
            }
            self.devices = devices;
        }
        if !missing.is_empty() || !extra.is_empty() {
            // spec §10: a retry of an accepted message is answered Accepted
            // even if the devices changed since. (Without a mismatch the
            // batch recognises the retry itself, sparing a read per send.)
            if let Some(time_ms) = self.store().dedup_lookup(me, send.id)? {
                let frame = ServerFrame::Accepted { id: send.id, time_ms };
                self.after_next_flush(Effect::Send { conn, req, frame });
                return Ok(());
            }
            // spec §5.3: each list sorted by user, then device.
            missing.sort();
            extra.sort();
            session.send(
                req,
                &ServerFrame::Mismatch {
                    id: send.id,
                    missing,
                    extra,
                },
                now.mono,
            );
            return Ok(());
        }
        // Written with the turn's batch; answered once that is durable.
        let wake = targets.iter().map(|(d, _)| *d).collect();
        self.ops.push(Op::Append {
            sender: me,
            id: send.id,
            to,
            bodies: targets,
            now_ms: now.unix_ms,
        });
        self.waiting.push(Waiting::Send {
            conn,
            req,
            id: send.id,
            wake,
        });
        Ok(())
    }
}
