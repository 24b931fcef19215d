//! Routing and authorization: who is online where, what each frame does to
//! accounts and queues, when answers may go out, and delivery to devices.
//!
//! There is one [`Hub`] per event loop; they share a [`Shared`] (the store
//! and the directory of online devices), so a hub never assumes it owns
//! every connection. A hub writes everything it has to say to one output,
//! its [`Effect`]s, each naming a [`ConnId`]: the driver applies those on
//! its own connections and forwards the rest to the loop that owns them.
//! It reaches the store only through [`StoreApi`]: memory calls that
//! answer at once, and operations whose outcomes come back later through
//! this loop's [`Sink`] ([`Hub::poll_store`]).
//!
//! Guarantees kept here (spec §10):
//! - an answer that reports a durable change (`Accepted`, `Registered`,
//!   `LinkCode`, `Done` after a revoke, a receipt or a retraction) goes out
//!   only when the store says so: `Accepted` once every copy is durable or
//!   acknowledged by its device;
//! - a device's entries are delivered in sequence order with at most
//!   [`HubConfig::window`] unacknowledged; online or not, a device only
//!   ever reads its own queue, so the order is the queue's order;
//! - a `Send` whose bodies do not match the current devices is refused as
//!   a whole, with the missing and extra devices.
//!
//! Ephemeral sends and presence (spec §5.6) never reach the store but for
//! the presence setting: see [`ephemeral`].
//!
//! What it does not do: sockets, byte formats, the disk, or reading the
//! clock (the driver passes [`Now`]).

mod blobs;
mod ephemeral;
mod group;
mod rate;
mod refusal;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use self::rate::{Buckets, Rate};
pub use self::refusal::Refusal;
pub use crate::ids::Now;
use crate::ids::{ConnId, DeviceKey, Identity, UserId};
use crate::noise::PublicKey;
use crate::session::Event;
use crate::store::{
    Appended, Completion, Entry, LinkRequestError, NewMessage, Op, Outcome, Read, Sink, StoreApi, Waiter,
};
use crate::wire::{
    self, BlockNotice, ClientFrame, Deliver, DeviceAddr, DeviceId, ExpiredNotice, GapNotice, GroupChange, GroupDeliver,
    GroupId, GroupNotice, GroupReceiptDeliver, Lost, MAX_BODIES, MAX_BODY_LEN, MAX_RECEIPT_IDS, ReceiptDeliver,
    ReceiptKind, ServerFrame,
};

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
    /// Most blob requests in flight per connection (spec §5.7).
    pub blob_window: u32,
    /// Most bytes of blob chunks and reads in flight, all connections
    /// together.
    pub blob_memory: u64,
    /// Ephemeral sends, presence settings and watches a device may make
    /// per minute (and in a burst) (spec §5.6).
    pub ephemeral_per_minute: u32,
    /// `Send`s a device may make (spec §6): past it, `SLOW_DOWN`.
    pub send_rate: Rate,
    /// `Receipt`s, `Retract`s and `PublishKeys` a device may make (spec
    /// §6): past it, `SLOW_DOWN`.
    pub write_rate: Rate,
    /// One-time keys of one device handed out to claimers, whoever they
    /// are (spec §5.4): past it, claimers get its fallback key.
    pub key_handouts: Rate,
    /// Most members of one group (spec §6; at most
    /// [`wire::MAX_GROUP_MEMBERS`]).
    pub group_members: usize,
    /// Most groups one user is in (spec §6; at most
    /// [`wire::MAX_GROUPS_PER_USER`]).
    pub groups_per_user: usize,
    /// Group membership changes a device may make per minute (and in a
    /// burst) (spec §5.8).
    pub group_changes_per_minute: u32,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            window: 256,
            link_ttl: Duration::from_secs(600),
            claims_per_minute: 30,
            low_keys: 10,
            blob_window: 8,
            blob_memory: 64 << 20,
            ephemeral_per_minute: 60,
            send_rate: Rate {
                per_minute: 300,
                burst: 300,
            },
            write_rate: Rate {
                per_minute: 600,
                burst: 600,
            },
            key_handouts: Rate {
                per_minute: 1,
                burst: 10,
            },
            group_members: 256,
            groups_per_user: 100,
            group_changes_per_minute: 60,
        }
    }
}

/// State shared by every loop's hub.
pub struct Shared {
    store: Arc<dyn StoreApi>,
    online: Mutex<HashMap<DeviceKey, ConnId>>,
    claims: Buckets,
    ephemeral: Buckets,
    sends: Buckets,
    writes: Buckets,
    /// Per target device: its one-time keys handed out.
    handouts: Buckets,
    /// Bytes of blob chunks and reads in flight.
    blob_memory: AtomicU64,
    group_changes: Buckets,
    watches: Mutex<ephemeral::Watches>,
    config: HubConfig,
}

impl Shared {
    /// Shared state over `store`.
    pub fn new(store: Arc<dyn StoreApi>, config: HubConfig) -> Arc<Shared> {
        Arc::new(Shared {
            store,
            online: Mutex::new(HashMap::new()),
            claims: Buckets::new(Rate::per_minute(config.claims_per_minute)),
            ephemeral: Buckets::new(Rate::per_minute(config.ephemeral_per_minute)),
            sends: Buckets::new(config.send_rate),
            writes: Buckets::new(config.write_rate),
            handouts: Buckets::new(config.key_handouts),
            blob_memory: AtomicU64::new(0),
            group_changes: Buckets::new(Rate::per_minute(config.group_changes_per_minute)),
            watches: Mutex::new(ephemeral::Watches::default()),
            config,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn StoreApi> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
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

    /// Who watches whose presence. Taken before `online` when both are.
    fn watches(&self) -> std::sync::MutexGuard<'_, ephemeral::Watches> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections watch someone's presence.
    pub fn watching_count(&self) -> usize {
        self.watches().watchers()
    }

    /// Takes one key claim from a device's allowance.
    fn may_claim(&self, d: DeviceKey, now: Instant) -> Result<(), Duration> {
        self.claims.take(d, now)
    }

    /// Takes one ephemeral request from a device's allowance.
    fn may_ephemeral(&self, d: DeviceKey, now: Instant) -> Result<(), Duration> {
        self.ephemeral.take(d, now)
    }

    /// How many devices have a rate bucket kept, of each kind (for the
    /// memory they take: about 40 bytes each).
    pub fn buckets_kept(&self) -> usize {
        [
            &self.claims,
            &self.ephemeral,
            &self.sends,
            &self.writes,
            &self.handouts,
            &self.group_changes,
        ]
        .iter()
        .map(|b| b.len())
        .sum()
    }

    /// Takes one group membership change from a device's allowance.
    fn may_change_group(&self, d: DeviceKey, now: Instant) -> bool {
        self.group_changes.take(d, now).is_ok()
    }

    /// Who a static key belongs to.
    pub fn identify(&self, key: &PublicKey) -> Identity {
        self.store.identify(key)
    }
}

/// Something for the driver to do on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The device on this connection has something to deliver: call
    /// [`Hub::pump`].
    Wake(ConnId),
    /// Send this frame.
    Send {
        /// Where.
        conn: ConnId,
        /// The request it answers (0: none).
        req: u32,
        /// What.
        frame: ServerFrame,
    },
    /// The connection is now this device (`Session::set_device`).
    Authenticate {
        /// Where.
        conn: ConnId,
        /// Who.
        device: DeviceKey,
    },
    /// Close the connection.
    Close {
        /// Where.
        conn: ConnId,
        /// Why.
        why: Refusal,
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

/// What the hub needs to know of a connection when it handles an event.
#[derive(Debug, Clone, Copy)]
pub struct ConnView<'a> {
    /// The device, once authenticated.
    pub device: Option<DeviceKey>,
    /// The client's static key, once the handshake is done.
    pub remote: Option<&'a PublicKey>,
    /// Output bytes the connection may still take before delivery pauses.
    pub room: usize,
}

/// Delivery state of one authenticated connection.
#[derive(Debug)]
struct Cursor {
    device: DeviceKey,
    /// Next sequence to read.
    next: u64,
    /// Highest sequence sent on this connection (0: none yet).
    delivered: u64,
    /// Highest sequence acknowledged (or before the first delivered).
    acked: u64,
    /// Highest sequence queued when the connection authenticated.
    drain_target: u64,
    drained: bool,
    /// Entries read from disk, not yet sent.
    backlog: VecDeque<(u64, Entry)>,
    /// A read from disk is under way.
    reading: bool,
}

/// What to do with an outcome when it comes.
#[derive(Debug)]
enum Waiting {
    Send {
        conn: ConnId,
        req: u32,
        id: wire::MsgId,
    },
    Register {
        conn: ConnId,
        req: u32,
        name: String,
    },
    Link {
        conn: ConnId,
        req: u32,
    },
    LinkCode {
        conn: ConnId,
        req: u32,
    },
    Revoke {
        conn: ConnId,
        req: u32,
        target: DeviceKey,
    },
    Publish {
        conn: ConnId,
        req: u32,
    },
    Claim {
        conn: ConnId,
        req: u32,
        user: String,
    },
    Receipt {
        conn: ConnId,
        req: u32,
    },
    Retract {
        conn: ConnId,
        req: u32,
    },
    LastSeen {
        conn: ConnId,
        req: u32,
        user: UserId,
    },
    /// A blob operation holding `held` bytes of transfer memory.
    Blob {
        conn: ConnId,
        req: u32,
        held: u64,
    },
    Backlog {
        serial: u64,
    },
    Group {
        conn: ConnId,
        req: u32,
        leave: bool,
    },
    Block {
        conn: ConnId,
        req: u32,
    },
    /// Wake the online devices an operation notified.
    Wake,
}

/// Entries read from memory per step of a pump.
const PUMP_BATCH: usize = 64;
/// Entries read from disk at once.
const BACKLOG_BATCH: usize = 256;

/// One event loop's hub.
pub struct Hub {
    shared: Arc<Shared>,
    worker: u16,
    sink: Arc<Sink>,
    next_token: u64,
    waiting: HashMap<u64, Waiting>,
    cursors: HashMap<u64, Cursor>,
    effects: Vec<Effect>,
    /// Connections a `Wake` is already among `effects` for.
    woken: std::collections::HashSet<ConnId>,
    entries: Vec<(u64, Entry)>,
    devices: Vec<DeviceId>,
    completions: Vec<Completion>,
    /// Blob requests in flight, per connection.
    blob_flight: HashMap<u64, u32>,
    /// The wall clock as of the latest call that brought the time (for
    /// what happens in calls that bring none: a connection closing).
    clock_ms: u64,
}

impl Hub {
    /// The hub of loop `worker`, whose store outcomes arrive in `sink`.
    pub fn new(shared: Arc<Shared>, worker: u16, sink: Arc<Sink>) -> Hub {
        Hub {
            shared,
            worker,
            sink,
            next_token: 1,
            waiting: HashMap::new(),
            cursors: HashMap::new(),
            effects: Vec::new(),
            woken: std::collections::HashSet::new(),
            entries: Vec::new(),
            devices: Vec::new(),
            completions: Vec::new(),
            blob_flight: HashMap::new(),
            clock_ms: 0,
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn store(&self) -> &dyn StoreApi {
        &*self.shared.store
    }

    /// Effects to apply now. Drain after every call.
    pub fn effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.woken.clear();
        self.effects.drain(..)
    }

    /// Whether answers wait for the store.
    pub fn has_pending(&self) -> bool {
        self.waiting.values().any(|w| !matches!(w, Waiting::Backlog { .. }))
    }

    /// The device delivering on connection `serial`, if authenticated.
    pub fn device_of(&self, serial: u64) -> Option<DeviceKey> {
        self.cursors.get(&serial).map(|c| c.device)
    }

    fn waiter(&mut self, w: Waiting) -> Waiter {
        let token = self.next_token;
        self.next_token += 1;
        self.waiting.insert(token, w);
        Waiter {
            sink: self.sink.clone(),
            token,
        }
    }

    fn send(&mut self, conn: ConnId, req: u32, frame: ServerFrame) {
        self.effects.push(Effect::Send { conn, req, frame });
    }

    fn refuse(&mut self, conn: ConnId, req: u32, why: Refusal) {
        self.send(conn, req, why.frame());
    }

    /// Refuses for a rate: `RetryAfter` (request id 0) with the time to
    /// wait, then the `Error` (spec §5.3, `RetryAfter`).
    fn refuse_for(&mut self, conn: ConnId, req: u32, why: Refusal, wait: Duration) {
        let after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.send(conn, 0, ServerFrame::RetryAfter { after_ms });
        self.refuse(conn, req, why);
    }

    /// Asks the loops holding these devices to deliver their queues (once
    /// per connection until the effects are taken: one pump delivers all
    /// there is).
    fn wake_online(&mut self, devices: impl IntoIterator<Item = DeviceKey>) {
        let online = self.shared.online();
        for d in devices {
            if let Some(c) = online.get(&d)
                && self.woken.insert(*c)
            {
                self.effects.push(Effect::Wake(*c));
            }
        }
    }

    /// Takes the store's outcomes for this loop and turns them into
    /// effects. The driver calls it every turn.
    pub fn poll_store(&mut self, now: Now) {
        self.clock_ms = now.unix_ms;
        let mut done = std::mem::take(&mut self.completions);
        self.sink.take(&mut done);
        for c in done.drain(..) {
            if let Some(w) = self.waiting.remove(&c.token) {
                self.completed(w, c.outcome, now);
            }
        }
        self.completions = done;
    }

    fn completed(&mut self, w: Waiting, outcome: Outcome, now: Now) {
        let _ = now;
        match (w, outcome) {
            (Waiting::Blob { conn, req, held }, outcome) => {
                let outcome = match outcome {
                    Outcome::Blob(o) => o,
                    _ => crate::store::BlobOutcome::Failed,
                };
                self.blob_completed(conn, req, held, outcome);
            }
            (Waiting::Send { conn, req, id }, Outcome::Settled { time_ms }) => {
                self.send(conn, req, ServerFrame::Accepted { id, time_ms });
            }
            (Waiting::Register { conn, req, name }, Outcome::Registered(r)) => match r {
                Ok(device) => {
                    log::info!("registered {name} as {device}");
                    self.registered(conn, req, name, device);
                }
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::Link { conn, req }, Outcome::Linked(r)) => match r {
                Ok(device) => {
                    let name = self.store().user_name(device.user).map(|n| n.to_string());
                    log::info!("linked {device}");
                    self.registered(conn, req, name.unwrap_or_default(), device);
                }
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::LinkCode { conn, req }, Outcome::LinkCode(r)) => match r {
                Ok((code, expires_ms)) => self.send(conn, req, ServerFrame::LinkCode { code, expires_ms }),
                Err(LinkRequestError::DeviceLimit) => self.refuse(conn, req, Refusal::DeviceLimit),
                Err(LinkRequestError::Outstanding) => self.refuse(conn, req, Refusal::LinkCodesOutstanding),
                Err(LinkRequestError::RateLimited) => self.refuse(conn, req, Refusal::LinkCodeRate),
                // Revoked meanwhile: its connection is being closed.
                Err(LinkRequestError::Revoked) => {}
            },
            (Waiting::Revoke { conn, req, target }, Outcome::Revoked(done)) => {
                if !done {
                    return self.refuse(conn, req, Refusal::UnknownDevice);
                }
                log::info!("{target} revoked");
                self.send(conn, req, ServerFrame::Done);
                if let Some(victim) = self.shared.connection_of(target) {
                    self.effects.push(Effect::Close {
                        conn: victim,
                        why: Refusal::Revoked,
                    });
                }
            }
            (Waiting::Publish { conn, req }, Outcome::Published(r)) => match r {
                Ok(one_time) => self.send(conn, req, ServerFrame::KeyCount { one_time }),
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::Claim { conn, req, user }, Outcome::Claimed(devices, counts)) => {
                for (d, left) in counts {
                    if left < self.shared.config.low_keys
                        && let Some(c) = self.shared.connection_of(d)
                    {
                        self.send(c, 0, ServerFrame::KeyCount { one_time: left });
                    }
                }
                self.send(conn, req, ServerFrame::Keys { user, devices });
            }
            (Waiting::Receipt { conn, req }, Outcome::Receipt(r) | Outcome::GroupReceipt(r)) => match r {
                Ok(targets) => {
                    self.send(conn, req, ServerFrame::Done);
                    self.wake_online(targets);
                }
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::Retract { conn, req }, Outcome::Retracted(n)) => {
                log::debug!("a retraction removed {n} queued copies");
                self.send(conn, req, ServerFrame::Done);
            }
            (Waiting::LastSeen { conn, req, user }, Outcome::LastSeenSet) => {
                self.send(conn, req, ServerFrame::Done);
                self.last_seen_set(user);
            }
            (
                Waiting::Backlog { serial },
                Outcome::Backlog {
                    device,
                    from,
                    entries,
                    covered,
                },
            ) => {
                let Some(c) = self.cursors.get_mut(&serial) else { return };
                if c.device != device || c.next != from || !c.reading {
                    return;
                }
                c.reading = false;
                c.backlog.extend(entries);
                c.next = c.next.max(covered + 1);
                let conn = ConnId {
                    worker: self.worker,
                    serial,
                };
                if self.woken.insert(conn) {
                    self.effects.push(Effect::Wake(conn));
                }
            }
            (w @ (Waiting::Group { .. } | Waiting::Block { .. } | Waiting::Wake), outcome)
                if outcome != Outcome::Failed =>
            {
                self.group_completed(w, outcome)
            }
            (w, Outcome::Failed) => {
                if let Some((conn, req)) = w.answer_to() {
                    self.refuse(conn, req, Refusal::Internal);
                } else if let Waiting::Backlog { serial } = w
                    && let Some(c) = self.cursors.get_mut(&serial)
                {
                    // Try again on the next wake.
                    c.reading = false;
                }
            }
            (w, other) => {
                debug_assert!(false, "unexpected outcome {other:?} for {w:?}");
                if let Some((conn, req)) = w.answer_to() {
                    self.refuse(conn, req, Refusal::Internal);
                }
            }
        }
    }

    /// Answers a `Register` or `RedeemLink` with `Registered` and makes the
    /// connection `device`: the frame first, so that it goes out before
    /// the deliveries that authenticating starts.
    fn registered(&mut self, conn: ConnId, req: u32, user: String, device: DeviceKey) {
        let frame = ServerFrame::Registered {
            user,
            device: device.device,
        };
        self.send(conn, req, frame);
        self.effects.push(Effect::Authenticate { conn, device });
    }

    /// Handles one session event.
    pub fn handle(&mut self, conn: ConnId, view: ConnView<'_>, event: Event, now: Now) {
        self.clock_ms = now.unix_ms;
        match event {
            Event::Authenticated(device) => self.authenticated(conn, view, device, now),
            Event::Frame { req, frame } => {
                // spec §5.2 `RevokeDevice`: nothing a revoked device sends is
                // acted on, even before its connection's close arrives.
                if view.device.is_some_and(|d| !self.store().is_current(d)) {
                    return;
                }
                self.frame(conn, view, req, frame, now)
            }
        }
    }

    fn authenticated(&mut self, conn: ConnId, view: ConnView<'_>, device: DeviceKey, now: Now) {
        let previous = self.shared.online().insert(device, conn);
        // Revocation is checked only now that this connection is in the
        // directory; a revoke marks the device first and looks it up after
        // (its answer comes once the revoke is durable). So whatever the
        // interleaving across loops, either the revoke finds this
        // connection and closes it, or this check sees the revoke.
        let revoked = !self.store().is_current(device);
        if let Some(old) = previous.filter(|old| *old != conn) {
            let why = if revoked {
                Refusal::Revoked
            } else {
                Refusal::ConnectedElsewhere
            };
            self.effects.push(Effect::Close { conn: old, why });
        }
        if revoked {
            {
                let mut online = self.shared.online();
                if online.get(&device) == Some(&conn) {
                    online.remove(&device);
                }
            }
            self.effects.push(Effect::Close {
                conn,
                why: Refusal::Revoked,
            });
            return;
        }
        self.store().submit(
            Op::Touch {
                device,
                now_ms: now.unix_ms,
                persist: false,
            },
            None,
        );
        let drain_target = self.store().last_seq(device);
        if let Some(n) = self.store().one_time_keys(device)
            && n < self.shared.config.low_keys
        {
            self.send(conn, 0, ServerFrame::KeyCount { one_time: n });
        }
        log::debug!("{device} online on {conn:?}");
        self.came_online(device);
        self.cursors.insert(
            conn.serial,
            Cursor {
                device,
                next: 0,
                delivered: 0,
                acked: 0,
                drain_target,
                drained: false,
                backlog: VecDeque::new(),
                reading: false,
            },
        );
        self.pump(conn, view.room, now);
    }

    /// The connection is gone: forget it in the directory (unless the
    /// device already reconnected elsewhere).
    pub fn closed(&mut self, conn: ConnId) {
        let mut gone = None;
        if let Some(c) = self.cursors.remove(&conn.serial) {
            let mut online = self.shared.online();
            if online.get(&c.device) == Some(&conn) {
                online.remove(&c.device);
                gone = Some(c.device);
            }
        }
        self.went_offline(conn, gone);
    }

    /// The frame that delivers a queue entry.
    fn frame_for(&self, seq: u64, entry: Entry) -> Option<ServerFrame> {
        let store = self.store();
        let addr = |user: u32, device: u32| {
            store.user_name(UserId(user)).map(|n| DeviceAddr {
                user: n.to_string(),
                device: DeviceId(device),
            })
        };
        let name = |user: u32| store.user_name(UserId(user)).map(|n| n.to_string());
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
            Entry::Group(g) => ServerFrame::GroupDeliver(GroupDeliver {
                seq,
                id: g.id,
                from: addr(g.from_user, g.from_device)?,
                group: GroupId(g.group),
                time_ms: g.time_ms,
                body: g.body,
            }),
            Entry::GroupNotice(n) => ServerFrame::GroupNotice(GroupNotice {
                seq,
                group: GroupId(n.group),
                version: n.version,
                // A user gone since is left out of what is said.
                changes: n
                    .changes
                    .into_iter()
                    .filter_map(|c| {
                        Some(GroupChange {
                            by: name(c.by)?,
                            kind: c.kind,
                            users: c.users.into_iter().filter_map(name).collect(),
                        })
                    })
                    .collect(),
                time_ms: n.time_ms,
            }),
            Entry::GroupReceipt(r) => ServerFrame::GroupReceipt(GroupReceiptDeliver {
                seq,
                group: GroupId(r.group),
                from: addr(r.from_user, r.from_device)?,
                to: name(r.to_user)?,
                kind: ReceiptKind(r.kind),
                ids: r.ids,
                time_ms: r.time_ms,
            }),
            Entry::Block(b) => ServerFrame::BlockNotice(BlockNotice {
                seq,
                user: name(b.user)?,
                blocked: b.blocked,
                time_ms: b.time_ms,
            }),
        })
    }

    /// Sends queued entries on `conn` while the window and `room` (output
    /// bytes the connection may still take) allow.
    pub fn pump(&mut self, conn: ConnId, mut room: usize, now: Now) {
        self.clock_ms = now.unix_ms;
        let window = self.shared.config.window;
        let Some(mut c) = self.cursors.remove(&conn.serial) else {
            return;
        };
        loop {
            let in_flight = c.delivered.saturating_sub(c.acked);
            let free = window.saturating_sub(in_flight) as usize;
            if free == 0 || room == 0 {
                break;
            }
            let mut entries = std::mem::take(&mut self.entries);
            entries.clear();
            let mut exhausted = false;
            if !c.backlog.is_empty() {
                let n = free.min(c.backlog.len());
                entries.extend(c.backlog.drain(..n));
            } else if c.reading {
                self.entries = entries;
                break;
            } else {
                match self.store().read(c.device, c.next, free.min(PUMP_BATCH), &mut entries) {
                    Read::OnDisk => {
                        c.reading = true;
                        let w = self.waiter(Waiting::Backlog { serial: conn.serial });
                        self.store().submit(
                            Op::ReadBacklog {
                                device: c.device,
                                from: c.next,
                                max: BACKLOG_BATCH,
                            },
                            Some(w),
                        );
                        self.entries = entries;
                        break;
                    }
                    Read::Memory { more } => exhausted = !more,
                }
            }
            for (seq, entry) in entries.drain(..) {
                if c.delivered == 0 {
                    c.acked = c.acked.max(seq - 1);
                }
                // Every entry's sender is a known account; were one
                // missing, the entry still counts as delivered so that an
                // ack of a later one removes it.
                if let Some(frame) = self.frame_for(seq, entry) {
                    room = room.saturating_sub(frame_size(&frame));
                    self.effects.push(Effect::Send { conn, req: 0, frame });
                }
                c.delivered = c.delivered.max(seq);
                c.next = c.next.max(seq + 1);
                if !c.drained && seq >= c.drain_target {
                    c.drained = true;
                    self.effects.push(Effect::Send {
                        conn,
                        req: 0,
                        frame: ServerFrame::QueueDrained,
                    });
                }
            }
            self.entries = entries;
            if exhausted && c.backlog.is_empty() {
                if !c.drained {
                    c.drained = true;
                    self.effects.push(Effect::Send {
                        conn,
                        req: 0,
                        frame: ServerFrame::QueueDrained,
                    });
                }
                break;
            }
        }
        self.cursors.insert(conn.serial, c);
    }

    fn frame(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, frame: ClientFrame, now: Now) {
        let store = self.shared.store.clone();
        let full = store.storage_full();
        match frame {
            ClientFrame::Register { invite, name } => {
                let Some(key) = view.remote.copied() else { return };
                if full {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let w = self.waiter(Waiting::Register {
                    conn,
                    req,
                    name: name.clone(),
                });
                store.submit(
                    Op::Register {
                        invite,
                        name,
                        key,
                        now_ms: now.unix_ms,
                    },
                    Some(w),
                );
            }
            ClientFrame::RedeemLink { code } => {
                let Some(key) = view.remote.copied() else { return };
                if full {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let w = self.waiter(Waiting::Link { conn, req });
                store.submit(
                    Op::RedeemLink {
                        code,
                        key,
                        now_ms: now.unix_ms,
                    },
                    Some(w),
                );
            }
            ClientFrame::RequestLink => {
                let Some(me) = view.device else { return };
                if full {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                // spec §5.2: bound to `me`, bounded per user.
                let w = self.waiter(Waiting::LinkCode { conn, req });
                store.submit(
                    Op::RequestLink {
                        device: me,
                        now_ms: now.unix_ms,
                        ttl: self.shared.config.link_ttl,
                    },
                    Some(w),
                );
            }
            ClientFrame::ListDevices { user } => match store.user_id(&user) {
                Some(id) => {
                    let mut devices = Vec::new();
                    store.current_devices(id, &mut devices);
                    self.send(conn, req, ServerFrame::Devices { user, devices });
                }
                None => self.refuse(conn, req, Refusal::UnknownUser),
            },
            ClientFrame::MyDevices => {
                let Some(me) = view.device else { return };
                let devices = store.device_infos(me.user);
                self.send(conn, req, ServerFrame::MyDevices { devices });
            }
            ClientFrame::RevokeDevice { device } => {
                let Some(me) = view.device else { return };
                let target = DeviceKey { user: me.user, device };
                let mut current = Vec::new();
                store.current_devices(me.user, &mut current);
                if current == [device] {
                    return self.refuse(conn, req, Refusal::LastDevice);
                }
                if !current.contains(&device) {
                    return self.refuse(conn, req, Refusal::UnknownDevice);
                }
                let w = self.waiter(Waiting::Revoke { conn, req, target });
                store.submit(
                    Op::Revoke {
                        device: target,
                        now_ms: now.unix_ms,
                    },
                    Some(w),
                );
            }
            ClientFrame::Send(send) => self.send_message(conn, view, req, send, now),
            ClientFrame::PublishKeys(keys) => {
                let Some(me) = view.device else { return };
                if let Err(wait) = self.shared.writes.take(me, now.mono) {
                    return self.refuse_for(conn, req, Refusal::WriteRate, wait);
                }
                if full {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let w = self.waiter(Waiting::Publish { conn, req });
                store.submit(Op::Publish { device: me, keys }, Some(w));
            }
            ClientFrame::ClaimKeys { user } => {
                let Some(me) = view.device else { return };
                let Some(id) = store.user_id(&user) else {
                    return self.refuse(conn, req, Refusal::UnknownUser);
                };
                if let Err(wait) = self.shared.may_claim(me, now.mono) {
                    return self.refuse_for(conn, req, Refusal::ClaimRate, wait);
                }
                let mut devices = std::mem::take(&mut self.devices);
                devices.clear();
                store.current_devices(id, &mut devices);
                let targets: Vec<DeviceKey> = devices
                    .iter()
                    .map(|&device| DeviceKey { user: id, device })
                    .filter(|d| *d != me)
                    .collect();
                self.devices = devices;
                // spec §5.4: each device's one-time keys go at most at
                // their rate, whoever claims; past it, its fallback key.
                // (A device with none left takes no token.)
                let over_rate = targets
                    .iter()
                    .copied()
                    .filter(|d| store.one_time_keys(*d).is_some_and(|n| n > 0))
                    .filter(|d| self.shared.handouts.take(*d, now.mono).is_err())
                    .collect();
                // A claimed key is gone for good only once that is
                // durable; until then nobody else gets it, and the claimer
                // waits.
                let w = self.waiter(Waiting::Claim { conn, req, user });
                store.submit(
                    Op::Claim {
                        devices: targets,
                        over_rate,
                    },
                    Some(w),
                );
            }
            ClientFrame::Receipt(receipt) => self.receipt(conn, view, req, receipt, now),
            ClientFrame::Ephemeral(e) => self.ephemeral(conn, view, req, e, now),
            ClientFrame::SetLastSeen { everyone } => self.set_last_seen(conn, view, req, everyone, now),
            ClientFrame::WatchPresence { users } => self.watch(conn, view, req, users, now),
            ClientFrame::Retract { id } => {
                let Some(me) = view.device else { return };
                if let Err(wait) = self.shared.writes.take(me, now.mono) {
                    return self.refuse_for(conn, req, Refusal::WriteRate, wait);
                }
                let mut devices = Vec::new();
                store.all_devices(me.user, &mut devices);
                let senders = devices
                    .into_iter()
                    .map(|device| DeviceKey { user: me.user, device })
                    .collect();
                let w = self.waiter(Waiting::Retract { conn, req });
                store.submit(
                    Op::Retract {
                        user: me.user,
                        senders,
                        id,
                        now_ms: now.unix_ms,
                    },
                    Some(w),
                );
            }
            ClientFrame::Ack { up_to } => {
                let Some(c) = self.cursors.get_mut(&conn.serial) else {
                    return;
                };
                // spec §5.2: only what was delivered on this connection.
                if up_to > c.delivered {
                    return self.refuse(conn, req, Refusal::AckBeyondDelivered);
                }
                if up_to > c.acked {
                    c.acked = up_to;
                    let device = c.device;
                    store.ack(device, up_to);
                    self.pump(conn, view.room, now);
                }
            }
            f @ (ClientFrame::UploadStart(_)
            | ClientFrame::UploadChunk(_)
            | ClientFrame::UploadFinish { .. }
            | ClientFrame::Download(_)
            | ClientFrame::BlobFetched { .. }
            | ClientFrame::BlobGrant(_)
            | ClientFrame::BlobDelete { .. }) => self.blob_frame(conn, view, req, f, now),
            // The session answers these itself.
            ClientFrame::Ping | ClientFrame::Pong | ClientFrame::Close => {}
            f if group::is_group_frame(&f) => self.group_frame(conn, view, req, f, now),
            // Every kind is handled above.
            _ => {}
        }
    }

    fn receipt(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, receipt: wire::Receipt, now: Now) {
        let Some(me) = view.device else { return };
        if let Err(wait) = self.shared.writes.take(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::WriteRate, wait);
        }
        let store = self.shared.store.clone();
        let Some(to) = store.user_id(&receipt.to) else {
            return self.refuse(conn, req, Refusal::UnknownUser);
        };
        if receipt.ids.is_empty() || receipt.ids.len() > MAX_RECEIPT_IDS || receipt.kind.0 == 0 {
            return self.refuse(conn, req, Refusal::BadReceipt);
        }
        if store.storage_full() {
            return self.refuse(conn, req, Refusal::StorageFull);
        }
        // spec §5.5: to every device of the messages' sender, and to the
        // reporting user's other devices; not to a sender who blocks the
        // reporter (spec §5.8, *Blocking*).
        let mut devices = std::mem::take(&mut self.devices);
        let mut targets = Vec::new();
        let users: &[UserId] = if store.blocks(to, me.user) {
            &[me.user]
        } else {
            &[to, me.user]
        };
        for &user in users {
            devices.clear();
            store.current_devices(user, &mut devices);
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
        let w = self.waiter(Waiting::Receipt { conn, req });
        store.submit(
            Op::Receipt {
                from: me,
                to,
                kind: receipt.kind,
                ids: receipt.ids,
                targets,
                now_ms: now.unix_ms,
            },
            Some(w),
        );
    }

    fn send_message(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, send: wire::Send, now: Now) {
        let Some(me) = view.device else { return };
        // spec §6: the device's send rate, before anything else.
        if let Err(wait) = self.shared.sends.take(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::SendRate, wait);
        }
        let store = self.shared.store.clone();
        let Some(to) = store.user_id(&send.to) else {
            return self.refuse(conn, req, Refusal::UnknownUser);
        };
        if send.bodies.len() + send.own.len() > MAX_BODIES {
            return self.refuse(conn, req, Refusal::TooManyBodies);
        }
        if send.bodies.iter().chain(&send.own).any(|b| b.data.len() > MAX_BODY_LEN) {
            return self.refuse(conn, req, Refusal::BodyTooLarge);
        }
        let to_self = to == me.user;
        if to_self && !send.own.is_empty() {
            return self.refuse(conn, req, Refusal::OwnToSelf);
        }
        // Expected devices: the recipient's, and the sender's other ones.
        let mut missing = Vec::new();
        let mut extra = Vec::new();
        let mut copies: Vec<(DeviceKey, Bytes, bool)> = Vec::with_capacity(send.bodies.len() + send.own.len());
        let groups = [(to, &send.bodies), (me.user, &send.own)];
        for &(user, bodies) in if to_self { &groups[..1] } else { &groups[..] } {
            let mut devices = std::mem::take(&mut self.devices);
            devices.clear();
            store.current_devices(user, &mut devices);
            if user == me.user {
                devices.retain(|d| *d != me.device);
            }
            let user_name = || store.user_name(user).map(|n| n.to_string()).unwrap_or_default();
            for (i, b) in bodies.iter().enumerate() {
                let key = DeviceKey { user, device: b.device };
                let problem = if bodies[..i].iter().any(|o| o.device == b.device) {
                    Some(Refusal::TwoBodies)
                } else if key == me {
                    Some(Refusal::BodyForSender)
                } else {
                    None
                };
                if let Some(why) = problem {
                    self.devices = devices;
                    return self.refuse(conn, req, why);
                }
                if devices.contains(&b.device) {
                    copies.push((key, b.data.clone(), false));
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
            // even if the devices changed since.
            let w = self.waiter(Waiting::Send { conn, req, id: send.id });
            match store.recall(me, send.id, &w) {
                Some(Appended::Waiting) => return,
                Some(Appended::Duplicate { time_ms }) => {
                    self.waiting.remove(&w.token);
                    return self.send(conn, req, ServerFrame::Accepted { id: send.id, time_ms });
                }
                _ => {
                    self.waiting.remove(&w.token);
                }
            }
            // spec §5.3: each list sorted by user, then device.
            missing.sort();
            extra.sort();
            return self.send(
                conn,
                req,
                ServerFrame::Mismatch {
                    id: send.id,
                    missing,
                    extra,
                },
            );
        }
        if store.blocks(to, me.user) {
            // spec §5.8, *Blocking*: the blocker's devices get nothing, and
            // the sender is not told; its own devices keep their copies.
            copies.retain(|c| c.0.user == me.user);
            if copies.is_empty() {
                return self.send(
                    conn,
                    req,
                    ServerFrame::Accepted {
                        id: send.id,
                        time_ms: now.unix_ms,
                    },
                );
            }
        }
        {
            let online = self.shared.online();
            for c in &mut copies {
                c.2 = online.contains_key(&c.0);
            }
        }
        let targets: Vec<DeviceKey> = copies.iter().filter(|c| c.2).map(|c| c.0).collect();
        let w = self.waiter(Waiting::Send { conn, req, id: send.id });
        let m = NewMessage {
            sender: me,
            id: send.id,
            to,
            copies,
            now_ms: now.unix_ms,
            mono: now.mono,
        };
        match store.append(m, &w) {
            Appended::Queued { .. } => self.wake_online(targets),
            Appended::Waiting => {}
            Appended::Duplicate { time_ms } => {
                self.waiting.remove(&w.token);
                self.send(conn, req, ServerFrame::Accepted { id: send.id, time_ms });
            }
            Appended::Refused(r) => {
                self.waiting.remove(&w.token);
                self.refuse(conn, req, r.into());
            }
        }
    }
}

impl Waiting {
    /// The request it answers.
    fn answer_to(&self) -> Option<(ConnId, u32)> {
        match *self {
            Waiting::Send { conn, req, .. }
            | Waiting::Register { conn, req, .. }
            | Waiting::Link { conn, req }
            | Waiting::LinkCode { conn, req }
            | Waiting::Revoke { conn, req, .. }
            | Waiting::Publish { conn, req }
            | Waiting::Claim { conn, req, .. }
            | Waiting::Receipt { conn, req }
            | Waiting::Retract { conn, req }
            | Waiting::LastSeen { conn, req, .. }
            | Waiting::Blob { conn, req, .. }
            | Waiting::Group { conn, req, .. }
            | Waiting::Block { conn, req } => Some((conn, req)),
            Waiting::Backlog { .. } | Waiting::Wake => None,
        }
    }
}

/// About how many bytes a frame takes on the wire (for pacing delivery).
fn frame_size(frame: &ServerFrame) -> usize {
    const OVERHEAD: usize = 96;
    OVERHEAD
        + match frame {
            ServerFrame::Deliver(d) => d.body.len(),
            ServerFrame::GroupDeliver(d) => d.body.len(),
            ServerFrame::GroupNotice(n) => n.changes.iter().map(|c| 40 + c.users.len() * 33).sum(),
            ServerFrame::Receipt(r) => r.ids.len() * 16,
            ServerFrame::GroupReceipt(r) => r.ids.len() * 16,
            ServerFrame::Expired(e) => e.ids.len() * 16,
            ServerFrame::Gap(g) => g.lost.len() * 64,
            ServerFrame::BlobData(d) => d.data.len(),
            _ => 0,
        }
}
