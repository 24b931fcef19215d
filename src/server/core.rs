//! The sans-I/O heart of one event loop: its connections' sessions and
//! delivery cursors, its hub, its timers. The mio loop ([`super::Worker`])
//! wraps it with sockets; the simulation tests drive it with none.
//!
//! Each connection carries an `io: T` the driver owns (a socket, or `()`).
//! After any call, the driver writes out [`Core::take_dirty`]
//! connections, drops [`Core::take_dead`] ones, and forwards
//! [`Core::take_remote`] effects to the loops that own them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::hub::{Cursor, Effect, Hub, Now, Shared};
use crate::ids::ConnId;
use crate::noise::Keypair;
use crate::session::{Session, SessionConfig};
use crate::store::Epoch;
use crate::wire::ErrorCode;

/// One connection.
pub struct Conn<T> {
    /// The driver's handle (socket).
    pub io: T,
    /// The protocol state.
    pub session: Session,
    /// Delivery state once authenticated.
    pub cursor: Option<Cursor>,
    /// The deadline queued in the timer heap for this connection.
    scheduled: Option<Instant>,
    /// Listed in `dirty` already.
    is_dirty: bool,
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
}

impl<T> Core<T> {
    /// A core for loop number `worker`.
    pub fn new(worker: u16, shared: Arc<Shared>, session_config: SessionConfig) -> Core<T> {
        let server_key = Arc::new(shared.store().server_key().clone());
        Core {
            worker,
            hub: Hub::new(shared),
            conns: HashMap::new(),
            next_serial: 1,
            server_key,
            session_config: Arc::new(session_config),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            dead: Vec::new(),
            remote: Vec::new(),
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
                cursor: None,
                scheduled: None,
                is_dirty: false,
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
            self.hub.closed(self.id(serial), c.cursor.as_ref());
            self.dead.push((self.id(serial), c.io));
        }
    }

    /// Handles the session's events and the hub's effects, then files the
    /// connection as dirty, dead or rescheduled.
    fn drive(&mut self, serial: u64, now: Now) {
        let id = self.id(serial);
        if let Some(c) = self.conns.get_mut(&serial) {
            while let Some(event) = c.session.poll_event() {
                self.hub.handle(id, &mut c.session, &mut c.cursor, event, now);
            }
        }
        self.apply_effects(now);
        self.after(serial);
    }

    fn apply_effects(&mut self, now: Now) {
        loop {
            let effects: Vec<Effect> = self.hub.effects().collect();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                self.apply(effect, now);
            }
        }
    }

    /// Applies an effect to one of this loop's connections (or forwards it).
    pub fn apply(&mut self, effect: Effect, now: Now) {
        let conn = effect.conn();
        if conn.worker != self.worker {
            self.remote.push(effect);
            return;
        }
        let Some(c) = self.conns.get_mut(&conn.serial) else {
            return;
        };
        match effect {
            Effect::Wake(_) => {
                if let Some(cursor) = c.cursor.as_mut() {
                    self.hub.pump(&mut c.session, cursor, now);
                }
            }
            Effect::Send { req, frame, .. } => {
                c.session.send(req, &frame, now.mono);
            }
            Effect::Authenticate { device, .. } => {
                c.session.set_device(device);
                while let Some(event) = c.session.poll_event() {
                    self.hub.handle(conn, &mut c.session, &mut c.cursor, event, now);
                }
            }
            Effect::Close { code, text, .. } => c.session.close(code, text, now.mono),
        }
        self.after(conn.serial);
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
        let Some(c) = self.conns.get_mut(&serial) else { return };
        c.session.advance(n);
        if c.cursor.as_ref().is_some_and(|k| k.stalled())
            && c.session.wants_more()
            && let Some(cursor) = c.cursor.as_mut()
        {
            self.hub.pump(&mut c.session, cursor, now);
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

    /// Ends a turn: writes the queue changes of every event handled since
    /// the last call in one batch (see [`Hub::commit`]), and applies what
    /// follows from them. Drivers call it once per turn, after input and
    /// before writing output.
    pub fn end_turn(&mut self, now: Now) {
        self.hub.commit();
        self.apply_effects(now);
    }

    /// The flusher made `durable` durable: release what waited for it.
    pub fn flushed(&mut self, durable: Epoch, now: Now) {
        self.hub.release(durable);
        self.apply_effects(now);
    }

    /// Whether answers wait for a flush.
    pub fn has_pending(&self) -> bool {
        self.hub.has_pending()
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&mut self, code: ErrorCode, text: &'static str, now: Now) {
        for serial in self.serials() {
            if let Some(c) = self.conns.get_mut(&serial) {
                c.session.close(code, text, now.mono);
            }
            self.after(serial);
        }
    }
}
