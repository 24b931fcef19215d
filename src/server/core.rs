//! The sans-I/O heart of one event loop: its connections' sessions, its
//! hub, its timers. The mio loop ([`super::Worker`]) wraps it with sockets;
//! the simulation tests drive it with none.
//!
//! Each connection carries an `io: T` the driver owns (a socket, or `()`).
//! After any call, the driver writes out [`Core::take_dirty`]
//! connections, drops [`Core::take_dead`] ones, and forwards
//! [`Core::take_remote`] effects to the loops that own them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::hub::{ConnView, Effect, Hub, Now, Refusal, Shared};
use crate::ids::ConnId;
use crate::noise::Keypair;
use crate::session::{Session, SessionConfig};
use crate::store::Sink;

/// One connection.
pub struct Conn<T> {
    /// The driver's handle (socket).
    pub io: T,
    /// The protocol state.
    pub session: Session,
    /// The deadline queued in the timer heap for this connection.
    scheduled: Option<Instant>,
    /// Listed in `dirty` already.
    is_dirty: bool,
    /// Delivery paused because the output was full.
    stalled: bool,
    /// A `Wake` for it waits for the end of the turn.
    wake_pending: bool,
}

impl<T> Conn<T> {
    fn view(&self) -> ConnView<'_> {
        ConnView {
            device: self.session.device(),
            remote: self.session.remote_static(),
            room: self.session.room(),
        }
    }
}

/// One loop's connections and hub.
pub struct Core<T> {
    worker: u16,
    hub: Hub,
    /// Boxed, so that the table's empty slots (up to half of them after
    /// it grows) cost a pointer each rather than a connection's size.
    conns: HashMap<u64, Box<Conn<T>>>,
    next_serial: u64,
    server_key: Arc<Keypair>,
    session_config: Arc<SessionConfig>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    dirty: Vec<u64>,
    dead: Vec<(ConnId, T)>,
    remote: Vec<Effect>,
    /// Remote connections a `Wake` is among `remote` for.
    remote_woken: std::collections::HashSet<ConnId>,
    /// Local connections to pump at the end of the turn, once each.
    wakes: Vec<u64>,
}

impl<T> Core<T> {
    /// A core for loop number `worker`, whose store outcomes arrive in
    /// `sink`.
    pub fn new(
        worker: u16,
        shared: Arc<Shared>,
        server_key: Arc<Keypair>,
        session_config: SessionConfig,
        sink: Arc<Sink>,
    ) -> Core<T> {
        Core {
            worker,
            hub: Hub::new(shared, worker, sink),
            conns: HashMap::new(),
            next_serial: 1,
            server_key,
            session_config: Arc::new(session_config),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            dead: Vec::new(),
            remote: Vec::new(),
            remote_woken: std::collections::HashSet::new(),
            wakes: Vec::new(),
        }
    }

    /// This loop's number.
    pub fn worker(&self) -> u16 {
        self.worker
    }

    /// The shared hub state.
    pub fn shared(&self) -> &Arc<Shared> {
        self.hub.shared()
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// A connection, by serial.
    pub fn conn_mut(&mut self, serial: u64) -> Option<&mut Conn<T>> {
        self.conns.get_mut(&serial).map(|c| &mut **c)
    }

    /// The device delivering on connection `serial`, if authenticated.
    pub fn device_of(&self, serial: u64) -> Option<crate::ids::DeviceKey> {
        self.hub.device_of(serial)
    }

    /// Every connection's serial.
    pub fn serials(&self) -> Vec<u64> {
        self.conns.keys().copied().collect()
    }

    fn id(&self, serial: u64) -> ConnId {
        ConnId {
            worker: self.worker,
            serial,
        }
    }

    /// Adds a connection accepted at `now`; returns its serial.
    pub fn accept(&mut self, io: T, now: Now) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        let session = Session::new(self.server_key.clone(), self.session_config.clone(), now.mono);
        self.conns.insert(
            serial,
            Box::new(Conn {
                io,
                session,
                scheduled: None,
                is_dirty: false,
                stalled: false,
                wake_pending: false,
            }),
        );
        self.after(serial);
        serial
    }

    /// Handles bytes read from a connection.
    pub fn input(&mut self, serial: u64, data: &[u8], now: Now) {
        let shared = self.hub.shared().clone();
        let Some(c) = self.conns.get_mut(&serial) else { return };
        c.session.handle_input(data, now.mono, &mut |key| shared.identify(key));
        self.drive(serial, now);
    }

    /// The peer closed its side or the socket failed: drop the connection.
    pub fn hang_up(&mut self, serial: u64) {
        if let Some(c) = self.conns.remove(&serial) {
            let id = self.id(serial);
            self.hub.closed(id);
            self.dead.push((id, c.io));
        }
    }

    /// Hands the session's events to the hub and applies what follows,
    /// then files the connection as dirty, dead or rescheduled.
    fn drive(&mut self, serial: u64, now: Now) {
        self.events(serial, now);
        self.apply_effects(now);
        self.after(serial);
    }

    fn events(&mut self, serial: u64, now: Now) {
        let id = self.id(serial);
        loop {
            let Some(c) = self.conns.get_mut(&serial) else { return };
            let Some(event) = c.session.poll_event() else { return };
            self.hub.handle(id, c.view(), event, now);
            // Applied before the next event, so that its view of the
            // connection (the room for deliveries) is current.
            self.apply_effects(now);
        }
    }

    fn apply_effects(&mut self, now: Now) {
        loop {
            let effects: Vec<Effect> = self.hub.effects().collect();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                let serial = effect.conn().serial;
                let local = effect.conn().worker == self.worker;
                self.apply_one(effect, now);
                if local {
                    self.after(serial);
                }
            }
        }
    }

    fn apply_one(&mut self, effect: Effect, now: Now) {
        Self::apply_to(
            &mut self.hub,
            &mut self.conns,
            &mut self.remote,
            &mut self.remote_woken,
            &mut self.wakes,
            self.worker,
            effect,
            now,
        );
    }

    /// Pumps every connection woken during the turn, once each, until no
    /// more are woken.
    fn run_wakes(&mut self, now: Now) {
        loop {
            let wakes = std::mem::take(&mut self.wakes);
            if wakes.is_empty() {
                return;
            }
            for serial in wakes {
                let id = self.id(serial);
                if let Some(c) = self.conns.get_mut(&serial) {
                    c.wake_pending = false;
                    c.stalled = false;
                    self.hub.pump(id, c.session.room(), now);
                    if c.session.room() == 0 {
                        c.stalled = true;
                    }
                }
                self.apply_effects(now);
                self.after(serial);
            }
        }
    }

    /// Applies an effect to one of this loop's connections (or forwards
    /// it).
    pub fn apply(&mut self, effect: Effect, now: Now) {
        let serial = effect.conn().serial;
        let local = effect.conn().worker == self.worker;
        self.apply_one(effect, now);
        self.apply_effects(now);
        if local {
            self.after(serial);
        }
        self.run_wakes(now);
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_to(
        hub: &mut Hub,
        conns: &mut HashMap<u64, Box<Conn<T>>>,
        remote: &mut Vec<Effect>,
        remote_woken: &mut std::collections::HashSet<ConnId>,
        wakes: &mut Vec<u64>,
        worker: u16,
        effect: Effect,
        now: Now,
    ) {
        let conn = effect.conn();
        if conn.worker != worker {
            if matches!(effect, Effect::Wake(_)) && !remote_woken.insert(conn) {
                return;
            }
            remote.push(effect);
            return;
        }
        let Some(c) = conns.get_mut(&conn.serial) else {
            return;
        };
        match effect {
            Effect::Wake(_) => {
                // Once per turn, at its end: one pump delivers all there is.
                if !c.wake_pending {
                    c.wake_pending = true;
                    wakes.push(conn.serial);
                }
            }
            Effect::Send { req, frame, .. } => {
                c.session.send(req, &frame, now.mono);
                if c.session.room() == 0 && hub.device_of(conn.serial).is_some() {
                    c.stalled = true;
                }
            }
            Effect::Authenticate { device, .. } => {
                c.session.set_device(device);
                while let Some(event) = c.session.poll_event() {
                    hub.handle(conn, c.view(), event, now);
                }
            }
            Effect::Close { why, .. } => c.session.close(why.code(), why.text(), now.mono),
        }
    }

    /// Files a connection after a change: dead, dirty, timer.
    fn after(&mut self, serial: u64) {
        let Some(c) = self.conns.get_mut(&serial) else { return };
        if c.session.is_closed() {
            self.hang_up(serial);
            return;
        }
        if !c.is_dirty && !c.session.transmit().is_empty() {
            c.is_dirty = true;
            self.dirty.push(serial);
        }
        if let Some(deadline) = c.session.poll_timeout()
            && c.scheduled.is_none_or(|s| deadline < s)
        {
            c.scheduled = Some(deadline);
            self.timers.push(Reverse((deadline, serial)));
        }
    }

    /// Reports what the driver wrote; resumes stalled delivery.
    pub fn wrote(&mut self, serial: u64, n: usize, now: Now) {
        let id = self.id(serial);
        let Some(c) = self.conns.get_mut(&serial) else { return };
        c.session.advance(n);
        if c.stalled && c.session.wants_more() {
            c.stalled = false;
            self.hub.pump(id, c.session.room(), now);
            self.apply_effects(now);
        }
        self.after(serial);
    }

    /// Connections with bytes to write, each once. The driver writes them
    /// and reports with [`Core::wrote`].
    pub fn take_dirty(&mut self) -> Vec<u64> {
        let dirty = std::mem::take(&mut self.dirty);
        for s in &dirty {
            if let Some(c) = self.conns.get_mut(s) {
                c.is_dirty = false;
            }
        }
        dirty
    }

    /// Connections finished since the last call, with their handles.
    pub fn take_dead(&mut self) -> Vec<(ConnId, T)> {
        std::mem::take(&mut self.dead)
    }

    /// Effects for connections of other loops.
    pub fn take_remote(&mut self) -> Vec<Effect> {
        self.remote_woken.clear();
        std::mem::take(&mut self.remote)
    }

    /// When [`Core::timeout`] should next run.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Runs every timer due at `now`.
    pub fn timeout(&mut self, now: Now) {
        while let Some(Reverse((t, serial))) = self.timers.peek().copied() {
            if t > now.mono {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(&serial) else { continue };
            if c.scheduled != Some(t) {
                // A stale entry; a newer one is queued.
                continue;
            }
            c.scheduled = None;
            c.session.handle_timeout(now.mono);
            self.after(serial);
        }
    }

    /// Ends a turn: takes the store's outcomes for this loop and applies
    /// what follows from them. Drivers call it once per turn, after input
    /// and before writing output.
    pub fn end_turn(&mut self, now: Now) {
        self.hub.poll_store(now);
        self.apply_effects(now);
        self.run_wakes(now);
    }

    /// Whether answers wait for the store.
    pub fn has_pending(&self) -> bool {
        self.hub.has_pending()
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&mut self, why: Refusal, now: Now) {
        for serial in self.serials() {
            if let Some(c) = self.conns.get_mut(&serial) {
                c.session.close(why.code(), why.text(), now.mono);
            }
            self.after(serial);
        }
    }
}
