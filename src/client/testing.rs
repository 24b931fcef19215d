//! A test world for the client's operations: clients on the real sans-I/O
//! [`super::conn::Conn`], each with an in-memory [`Driver`] on one virtual
//! clock, against a small scripted server that speaks through the server's
//! real [`Session`] (Noise and framing included). No sockets, no threads,
//! no sleeps: a driver's `wait` moves bytes and, when nothing is left to
//! move, jumps the clock to the deadline.
//!
//! The server here is a model of the hub's rules that the client relies
//! on (accounts, key directory, device lists and `Mismatch`, queues with
//! acks, receipts routing, `Retract`), small enough to read, with knobs to
//! script faults: being down, refusing a kind of request, dropping the
//! connection on one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Error;
use super::core::Client;
use super::driver::{Driver, Input};
use super::profile::Profile;
use crate::code::Code;
use crate::ids::{DeviceKey, UserId};
use crate::noise::{Keypair, PublicKey};
use crate::session::{Event, Identity, Session, SessionConfig};
use crate::wire::{
    ClientFrame, Deliver, DeviceAddr, DeviceId, DeviceInfo, DeviceKeys, ErrorCode, IdentityKeys, MsgId, ReceiptDeliver,
    ServerFrame, SignedKey, Token,
};

/// The address every code of the test world names.
pub const ADDR: &str = "test.invalid:7070";

/// What the server does to the next request of a kind.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answers it with this error.
    Refuse(ErrorCode),
    /// Drops the connection instead of answering.
    Drop,
    /// Takes it and never answers.
    Ignore,
}

#[derive(Default)]
struct Dev {
    key: PublicKey,
    identity: Option<IdentityKeys>,
    one_time: Vec<SignedKey>,
    fallback: Option<SignedKey>,
    created_ms: u64,
    /// Queue entries: (seq, frame).
    queue: VecDeque<(u64, ServerFrame)>,
}

struct ServerConn {
    session: Session,
    device: Option<(String, DeviceId)>,
    /// Whose presence it watches.
    watching: Vec<String>,
}

/// The server's state.
pub struct Server {
    key: Arc<Keypair>,
    /// The virtual clock: monotonic and wall.
    pub now: Instant,
    /// Wall clock, ms since the epoch.
    pub unix_ms: u64,
    /// Whether connections are accepted.
    pub up: bool,
    users: BTreeMap<String, BTreeMap<DeviceId, Dev>>,
    user_ids: Vec<String>,
    conns: HashMap<u64, ServerConn>,
    next_conn: u64,
    next_seq: u64,
    link_codes: HashMap<[u8; 8], String>,
    accepted: HashMap<(String, MsgId), u64>,
    /// Users who hide their presence.
    hidden: std::collections::BTreeSet<String>,
    /// Frames to send on the current connection after its answer.
    after: Vec<ServerFrame>,
    /// Every frame the server got, with its sender (for assertions).
    pub log: Vec<(Option<(String, DeviceId)>, ClientFrame)>,
    /// Faults to apply, by frame kind (`"Send"`, `"Receipt"`, ...), first
    /// in first out.
    pub faults: HashMap<&'static str, VecDeque<Fault>>,
}

impl Server {
    fn user_id(&mut self, name: &str) -> UserId {
        match self.user_ids.iter().position(|u| u == name) {
            Some(i) => UserId(i as u32 + 1),
            None => {
                self.user_ids.push(name.to_owned());
                UserId(self.user_ids.len() as u32)
            }
        }
    }

    fn identify(&mut self, key: &PublicKey) -> Identity {
        let found = self
            .users
            .iter()
            .find_map(|(u, devs)| devs.iter().find(|(_, d)| &d.key == key).map(|(id, _)| (u.clone(), *id)));
        match found {
            Some((user, device)) => Identity::Device(DeviceKey {
                user: self.user_id(&user),
                device,
            }),
            None => Identity::Unregistered,
        }
    }

    /// The frames the server got of a kind.
    pub fn got(&self, kind: &str) -> Vec<ClientFrame> {
        self.log
            .iter()
            .filter(|(_, f)| f.kind() == kind)
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// The `Send`s the server got, in order.
    pub fn sends(&self) -> Vec<crate::wire::Send> {
        self.log
            .iter()
            .filter_map(|(_, f)| match f {
                ClientFrame::Send(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// The `Receipt`s the server got, in order.
    pub fn receipts(&self) -> Vec<crate::wire::Receipt> {
        self.log
            .iter()
            .filter_map(|(_, f)| match f {
                ClientFrame::Receipt(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many one-time keys of a device the server holds.
    pub fn one_time_keys(&self, user: &str, device: u32) -> usize {
        self.users[user][&DeviceId(device)].one_time.len()
    }

    /// How many entries wait in a device's queue.
    pub fn queued(&self, user: &str, device: u32) -> usize {
        self.users[user][&DeviceId(device)].queue.len()
    }

    /// Sends a frame to the connections of a device now (not queued).
    pub fn push(&mut self, user: &str, device: DeviceId, frame: &ServerFrame) {
        let now = self.now;
        for c in self.conns.values_mut() {
            if c.device.as_ref().is_some_and(|(u, d)| u == user && *d == device) {
                c.session.send(0, frame, now);
            }
        }
    }

    /// What a watcher of `user` may see, by the hub's rules (spec §5.6),
    /// the connection `also` (taken out of the map) counted as online.
    fn seen(&self, watcher: &str, user: &str, also: Option<&(String, DeviceId)>) -> crate::wire::Seen {
        use crate::wire::Seen;
        if self.hidden.contains(user) || self.hidden.contains(watcher) {
            return Seen::Hidden;
        }
        let mut devices: Vec<DeviceId> = self
            .conns
            .values()
            .filter_map(|c| c.device.as_ref())
            .chain(also)
            .filter(|(u, _)| u == user)
            .map(|(_, d)| *d)
            .collect();
        devices.sort();
        devices.dedup();
        if devices.is_empty() {
            Seen::Away { last_seen_ms: 0 }
        } else {
            Seen::Online { devices }
        }
    }

    /// Tells the connections watching `user` its presence.
    fn presence_changed(&mut self, user: &str) {
        let now = self.now;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let (watches, watcher) = {
                let c = &self.conns[&id];
                (c.watching.iter().any(|u| u == user), c.device.clone())
            };
            let Some((watcher, _)) = watcher.filter(|_| watches) else {
                continue;
            };
            let seen = self.seen(&watcher, user, None);
            let frame = ServerFrame::Presence(crate::wire::Presence {
                user: user.to_owned(),
                seen,
            });
            if let Some(c) = self.conns.get_mut(&id) {
                c.session.send(0, &frame, now);
            }
        }
    }

    /// A connection went away.
    fn gone(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id)
            && let Some((user, _)) = c.device
        {
            self.presence_changed(&user);
        }
    }

    /// Adds a fault for the next request of `kind`.
    pub fn fault(&mut self, kind: &'static str, fault: Fault) {
        self.faults.entry(kind).or_default().push_back(fault);
    }

    /// Queues an entry for a device, pushing it at once if it is online.
    pub fn enqueue(&mut self, user: &str, device: DeviceId, make: impl FnOnce(u64) -> ServerFrame) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let frame = make(seq);
        if let Some(d) = self.users.get_mut(user).and_then(|u| u.get_mut(&device)) {
            d.queue.push_back((seq, frame.clone()));
        }
        let now = self.now;
        for c in self.conns.values_mut() {
            if c.device.as_ref().is_some_and(|(u, d)| u == user && *d == device) {
                c.session.send(0, &frame, now);
            }
        }
    }

    fn input(&mut self, conn: u64, data: &[u8]) {
        let now = self.now;
        let Some(mut c) = self.conns.remove(&conn) else {
            return;
        };
        let mut identify = |key: &PublicKey| self.identify(key);
        c.session.handle_input(data, now, &mut identify);
        while let Some(ev) = c.session.poll_event() {
            match ev {
                Event::Authenticated(key) => {
                    let user = self.user_ids[key.user.0 as usize - 1].clone();
                    c.device = Some((user.clone(), key.device));
                    let queued: Vec<ServerFrame> = self.users[&user][&key.device]
                        .queue
                        .iter()
                        .map(|(_, f)| f.clone())
                        .collect();
                    for f in queued {
                        c.session.send(0, &f, now);
                    }
                    c.session.send(0, &ServerFrame::QueueDrained, now);
                    self.presence_changed(&user);
                    // spec §5.4: a low stock is said unasked.
                    let d = &self.users[&user][&key.device];
                    if d.identity.is_some() && d.one_time.len() < crate::client::e2e::LOW_WATER as usize {
                        let one_time = d.one_time.len() as u32;
                        c.session.send(0, &ServerFrame::KeyCount { one_time }, now);
                    }
                }
                Event::Frame { req, frame } => {
                    self.log.push((c.device.clone(), frame.clone()));
                    match self.faults.get_mut(frame.kind()).and_then(VecDeque::pop_front) {
                        Some(Fault::Refuse(code)) => {
                            c.session.send_error(req, code, "scripted refusal", now);
                        }
                        Some(Fault::Drop) => {
                            // The connection goes without an answer.
                            return;
                        }
                        Some(Fault::Ignore) => {}
                        None => {
                            if let Some(answer) = self.handle(&mut c, frame) {
                                c.session.send(req, &answer, now);
                            }
                            for f in std::mem::take(&mut self.after) {
                                c.session.send(0, &f, now);
                            }
                        }
                    }
                }
            }
        }
        self.conns.insert(conn, c);
    }

    fn handle(&mut self, c: &mut ServerConn, frame: ClientFrame) -> Option<ServerFrame> {
        let now_ms = self.unix_ms;
        let err = |code: ErrorCode| {
            Some(ServerFrame::Error {
                code,
                text: "refused".into(),
            })
        };
        let key = *c.session.remote_static()?;
        match frame {
            ClientFrame::Register { name, .. } => {
                if self.users.contains_key(&name) {
                    return err(ErrorCode::NAME_TAKEN);
                }
                let mut devs = BTreeMap::new();
                devs.insert(
                    DeviceId(1),
                    Dev {
                        key,
                        created_ms: now_ms,
                        ..Dev::default()
                    },
                );
                self.users.insert(name.clone(), devs);
                self.join(c, &name, DeviceId(1))
            }
            ClientFrame::RedeemLink { code } => {
                let Some(user) = self.link_codes.remove(&code.id) else {
                    return err(ErrorCode::INVALID_LINK_CODE);
                };
                let devs = self.users.get_mut(&user)?;
                let device = DeviceId(devs.keys().last().map_or(1, |d| d.0 + 1));
                devs.insert(
                    device,
                    Dev {
                        key,
                        created_ms: now_ms,
                        ..Dev::default()
                    },
                );
                self.join(c, &user, device)
            }
            ClientFrame::RequestLink => {
                let (user, _) = c.device.clone()?;
                let id = (self.link_codes.len() as u64 + 1).to_be_bytes();
                self.link_codes.insert(id, user);
                Some(ServerFrame::LinkCode {
                    code: Token { id, secret: [7; 16] },
                    expires_ms: now_ms + 600_000,
                })
            }
            ClientFrame::ListDevices { user } => match self.users.get(&user) {
                Some(devs) => Some(ServerFrame::Devices {
                    user,
                    devices: devs.keys().copied().collect(),
                }),
                None => err(ErrorCode::UNKNOWN_USER),
            },
            ClientFrame::MyDevices => {
                let (user, _) = c.device.clone()?;
                Some(ServerFrame::MyDevices {
                    devices: self.users[&user]
                        .iter()
                        .map(|(id, d)| DeviceInfo {
                            device: *id,
                            created_ms: d.created_ms,
                            last_seen_ms: now_ms,
                        })
                        .collect(),
                })
            }
            ClientFrame::RevokeDevice { device } => {
                let (user, _) = c.device.clone()?;
                match self.users.get_mut(&user).and_then(|u| u.remove(&device)) {
                    Some(_) => Some(ServerFrame::Done),
                    None => err(ErrorCode::UNKNOWN_DEVICE),
                }
            }
            ClientFrame::PublishKeys(p) => {
                let (user, device) = c.device.clone()?;
                let d = self.users.get_mut(&user)?.get_mut(&device)?;
                if let (Some(had), Some(new)) = (d.identity, p.identity)
                    && had != new
                {
                    return err(ErrorCode::NOT_ALLOWED);
                }
                d.identity = p.identity.or(d.identity);
                d.one_time.extend(p.one_time);
                d.fallback = p.fallback.or(d.fallback);
                Some(ServerFrame::KeyCount {
                    one_time: d.one_time.len() as u32,
                })
            }
            ClientFrame::ClaimKeys { user } => {
                let (me, mine) = c.device.clone()?;
                let Some(devs) = self.users.get_mut(&user) else {
                    return err(ErrorCode::UNKNOWN_USER);
                };
                let mut out = Vec::new();
                for (id, d) in devs.iter_mut() {
                    if user == me && *id == mine {
                        continue;
                    }
                    let Some(identity) = d.identity else { continue };
                    let one_time = d.one_time.pop();
                    out.push(DeviceKeys {
                        device: *id,
                        identity,
                        fallback: one_time.is_none(),
                        one_time: one_time.or(d.fallback),
                    });
                }
                Some(ServerFrame::Keys { user, devices: out })
            }
            ClientFrame::Send(s) => {
                let (me, mine) = c.device.clone()?;
                let Some(to_devs) = self.users.get(&s.to) else {
                    return err(ErrorCode::UNKNOWN_USER);
                };
                let want_to: Vec<DeviceId> = to_devs.keys().copied().collect();
                let want_own: Vec<DeviceId> = if s.to == me {
                    Vec::new()
                } else {
                    self.users[&me].keys().copied().filter(|d| *d != mine).collect()
                };
                let mut missing = Vec::new();
                let mut extra = Vec::new();
                for (user, want, got) in [(&s.to, &want_to, &s.bodies), (&me, &want_own, &s.own)] {
                    for d in want {
                        if !(got.iter().any(|b| b.device == *d) || (user == &me && *d == mine)) {
                            missing.push(DeviceAddr {
                                user: user.clone(),
                                device: *d,
                            });
                        }
                    }
                    for b in got {
                        if !want.contains(&b.device) {
                            extra.push(DeviceAddr {
                                user: user.clone(),
                                device: b.device,
                            });
                        }
                    }
                }
                if !missing.is_empty() || !extra.is_empty() {
                    return Some(ServerFrame::Mismatch {
                        id: s.id,
                        missing,
                        extra,
                    });
                }
                if let Some(time_ms) = self.accepted.get(&(me.clone(), s.id)) {
                    return Some(ServerFrame::Accepted {
                        id: s.id,
                        time_ms: *time_ms,
                    });
                }
                self.accepted.insert((me.clone(), s.id), now_ms);
                let from = DeviceAddr {
                    user: me.clone(),
                    device: mine,
                };
                for (user, bodies) in [(&s.to, &s.bodies), (&me, &s.own)] {
                    for b in bodies {
                        let deliver = |seq| {
                            ServerFrame::Deliver(Deliver {
                                seq,
                                id: s.id,
                                from: from.clone(),
                                to: s.to.clone(),
                                time_ms: now_ms,
                                body: b.data.clone(),
                            })
                        };
                        self.enqueue(user, b.device, deliver);
                    }
                }
                Some(ServerFrame::Accepted {
                    id: s.id,
                    time_ms: now_ms,
                })
            }
            ClientFrame::Ack { up_to } => {
                let (user, device) = c.device.clone()?;
                let d = self.users.get_mut(&user)?.get_mut(&device)?;
                d.queue.retain(|(seq, _)| *seq > up_to);
                None
            }
            ClientFrame::Receipt(r) => {
                let (me, mine) = c.device.clone()?;
                let from = DeviceAddr {
                    user: me.clone(),
                    device: mine,
                };
                let mut targets: Vec<(String, DeviceId)> = Vec::new();
                for user in [&r.to, &me] {
                    for d in self
                        .users
                        .get(user)
                        .map(|u| u.keys().copied().collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        if !(user == &me && d == mine) {
                            targets.push((user.clone(), d));
                        }
                    }
                }
                for (user, d) in targets {
                    let receipt = |seq| {
                        ServerFrame::Receipt(ReceiptDeliver {
                            seq,
                            from: from.clone(),
                            to: r.to.clone(),
                            kind: r.kind,
                            ids: r.ids.clone(),
                            time_ms: now_ms,
                        })
                    };
                    self.enqueue(&user, d, receipt);
                }
                Some(ServerFrame::Done)
            }
            ClientFrame::Retract { id } => {
                let (me, mine) = c.device.clone()?;
                for devs in self.users.values_mut() {
                    for d in devs.values_mut() {
                        d.queue.retain(|(_, f)| {
                            !matches!(f, ServerFrame::Deliver(x) if x.id == id && x.from.user == me && x.from.device == mine)
                        });
                    }
                }
                Some(ServerFrame::Done)
            }
            ClientFrame::Ephemeral(e) => {
                let (me, mine) = c.device.clone()?;
                let from = DeviceAddr { user: me, device: mine };
                for b in e.bodies {
                    let frame = ServerFrame::Ephemeral(crate::wire::EphemeralDeliver {
                        from: from.clone(),
                        to: e.to.clone(),
                        body: b.data,
                    });
                    self.push(&e.to, b.device, &frame);
                }
                Some(ServerFrame::Done)
            }
            ClientFrame::WatchPresence { users } => {
                let (me, _) = c.device.clone()?;
                c.watching = users.clone();
                for u in users.iter().filter(|u| self.users.contains_key(*u)) {
                    let seen = self.seen(&me, u, c.device.as_ref());
                    self.after
                        .push(ServerFrame::Presence(crate::wire::Presence { user: u.clone(), seen }));
                }
                Some(ServerFrame::Done)
            }
            ClientFrame::SetLastSeen { everyone } => {
                let (me, _) = c.device.clone()?;
                if everyone {
                    self.hidden.remove(&me);
                } else {
                    self.hidden.insert(me.clone());
                }
                self.presence_changed(&me);
                Some(ServerFrame::Done)
            }
            ClientFrame::Ping => Some(ServerFrame::Pong),
            _ => err(ErrorCode::UNSUPPORTED),
        }
    }

    fn join(&mut self, c: &mut ServerConn, user: &str, device: DeviceId) -> Option<ServerFrame> {
        let id = self.user_id(user);
        c.session.set_device(DeviceKey { user: id, device });
        c.device = Some((user.to_owned(), device));
        Some(ServerFrame::Registered {
            user: user.to_owned(),
            device,
        })
    }
}

/// A world: one server and a virtual clock, shared by its drivers.
#[derive(Clone)]
pub struct World {
    server: Arc<Mutex<Server>>,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    /// A world with a server that is up, at a fixed time.
    pub fn new() -> World {
        World {
            server: Arc::new(Mutex::new(Server {
                key: Arc::new(Keypair::generate().expect("a key")),
                now: Instant::now(),
                unix_ms: 1_800_000_000_000,
                up: true,
                users: BTreeMap::new(),
                user_ids: Vec::new(),
                conns: HashMap::new(),
                next_conn: 0,
                next_seq: 0,
                link_codes: HashMap::new(),
                accepted: HashMap::new(),
                hidden: Default::default(),
                after: Vec::new(),
                log: Vec::new(),
                faults: HashMap::new(),
            })),
        }
    }

    /// The server, to look at or script.
    pub fn server(&self) -> MutexGuard<'_, Server> {
        self.server.lock().expect("not poisoned")
    }

    /// An invite code for this world's server.
    pub fn invite(&self) -> Code {
        Code {
            addr: ADDR.into(),
            server_key: self.server().key.public,
            token: Token {
                id: [1; 8],
                secret: [2; 16],
            },
        }
    }

    /// A driver on this world.
    pub fn driver(&self) -> MemoryDriver {
        let (tx, rx) = mpsc::channel();
        MemoryDriver {
            server: self.server.clone(),
            conn: None,
            epoch: 0,
            inputs: VecDeque::new(),
            tx,
            rx,
        }
    }

    /// A client on a new profile in `dir`, registered as `name`.
    pub fn user(&self, dir: &Path, name: &str, receive: bool) -> Client {
        let mut c = self.client(dir, receive);
        c.register(&self.invite(), name).expect("registers");
        c
    }

    /// The events `c` reports in a sync.
    pub fn sync(c: &mut Client) -> Vec<super::core::Event> {
        let mut got = Vec::new();
        c.sync_events(&mut |e| got.push(e.clone())).expect("syncs");
        got
    }

    /// The texts of the messages among `events`.
    pub fn texts(events: &[super::core::Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                super::core::Event::Message(m) => Some(m.text.clone()),
                _ => None,
            })
            .collect()
    }

    /// A client on the profile in `dir` (created if new).
    pub fn client(&self, dir: &Path, receive: bool) -> Client {
        let profile = Profile::open(dir, Duration::from_secs(5)).expect("opens");
        Client::with_driver(profile, receive, Box::new(self.driver()))
    }

    /// Moves the clock on.
    pub fn advance(&self, by: Duration) {
        let mut s = self.server();
        s.now += by;
        s.unix_ms += by.as_millis() as u64;
    }
}

/// A driver whose connections are sessions of the world's server and
/// whose clock is the world's.
pub struct MemoryDriver {
    server: Arc<Mutex<Server>>,
    /// The open connection: the server's id for it, and its epoch.
    conn: Option<u64>,
    epoch: u64,
    inputs: VecDeque<Input>,
    tx: Sender<Input>,
    rx: Receiver<Input>,
}

impl MemoryDriver {
    fn server(&self) -> MutexGuard<'_, Server> {
        self.server.lock().expect("not poisoned")
    }

    /// Takes what the server has for this connection.
    fn collect(&mut self) {
        let Some(id) = self.conn else { return };
        let mut s = self.server();
        let Some(c) = s.conns.get_mut(&id) else {
            drop(s);
            self.inputs.push_back(Input::Eof { epoch: self.epoch });
            self.conn = None;
            return;
        };
        let data = c.session.transmit().to_vec();
        c.session.advance(data.len());
        let closed = c.session.is_closed();
        if closed {
            s.gone(id);
        }
        drop(s);
        if !data.is_empty() {
            self.inputs.push_back(Input::Net {
                epoch: self.epoch,
                data,
            });
        }
        if closed {
            self.inputs.push_back(Input::Eof { epoch: self.epoch });
            self.conn = None;
        }
    }
}

impl Driver for MemoryDriver {
    fn now(&self) -> Instant {
        self.server().now
    }

    fn unix_ms(&self) -> u64 {
        self.server().unix_ms
    }

    fn open(&mut self, addr: &str, epoch: u64, _within: Duration) -> Result<(), Error> {
        self.close();
        let mut s = self.server();
        if addr != ADDR || !s.up {
            return Err(Error::Connect {
                addr: addr.into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        s.next_conn += 1;
        let id = s.next_conn;
        let session = Session::new(s.key.clone(), SessionConfig::default(), s.now);
        s.conns.insert(
            id,
            ServerConn {
                session,
                device: None,
                watching: Vec::new(),
            },
        );
        drop(s);
        self.conn = Some(id);
        self.epoch = epoch;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        let id = self.conn.ok_or(Error::Closed(super::conn::Closed::EndOfStream))?;
        self.server().input(id, bytes);
        Ok(bytes.len())
    }

    fn close(&mut self) {
        if let Some(id) = self.conn.take() {
            self.server().gone(id);
        }
        self.inputs.clear();
    }

    fn wait(&mut self, deadline: Instant) -> Option<Input> {
        if let Ok(job) = self.rx.try_recv() {
            return Some(job);
        }
        if self.inputs.is_empty() {
            self.collect();
        }
        if let Some(input) = self.inputs.pop_front() {
            return Some(input);
        }
        // Nothing to move: time passes.
        let mut s = self.server();
        if deadline > s.now {
            let by = deadline - s.now;
            s.now = deadline;
            s.unix_ms += by.as_millis() as u64;
        }
        None
    }

    fn inputs(&self) -> Sender<Input> {
        self.tx.clone()
    }
}
