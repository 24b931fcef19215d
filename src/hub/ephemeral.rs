//! What the hub never stores: ephemeral sends and presence (spec §5.6).
//!
//! - An `Ephemeral` goes, body by body, to the devices it names that are in
//!   the online directory at that moment, and is answered `Done` at once:
//!   no store operation, no queue, no acknowledgement, no waiting for a
//!   flush. A device that is not online simply does not get its body. Each
//!   device may make [`HubConfig::ephemeral_per_minute`] of these requests
//!   (ephemeral sends, presence settings and watches together) a minute.
//! - Presence is derived from the online directory ([`Shared`]) and the
//!   time each user's last device went offline. A connection watches up to
//!   [`MAX_WATCHED`] users; it is told each one's [`Seen`] when it starts
//!   watching and whenever that changes. Who hides their presence
//!   (`SetLastSeen { everyone: false }`, kept by the store) shows as
//!   [`Seen::Hidden`] to everyone, and sees everyone as hidden; a watcher
//!   is only ever told of a change in what it may see, so a hidden user's
//!   comings and goings leave no trace in the frames others get.
//!
//! What it does not do: keep anything across a restart but the setting
//! (the store's) and each device's last-seen time (written with the next
//! batch when a device goes offline, like the time it came online).
//!
//! [`HubConfig::ephemeral_per_minute`]: super::HubConfig::ephemeral_per_minute

use std::collections::{HashMap, HashSet};

use super::{ConnView, Effect, Hub, Now, Refusal, Waiting};
use crate::ids::{ConnId, DeviceKey, UserId};
use crate::store::Op;
use crate::wire::{
    DeviceAddr, DeviceId, Ephemeral, EphemeralDeliver, MAX_DEVICES_PER_USER, MAX_EPHEMERAL_LEN, MAX_WATCHED, Presence,
    Seen, ServerFrame,
};

/// Who watches whom, shared by every loop's hub.
#[derive(Default)]
pub(super) struct Watches {
    /// Per watching connection: its user, and each user it watches with
    /// what it was last told.
    by_conn: HashMap<ConnId, Watching>,
    /// Per watched user: the connections watching it.
    by_target: HashMap<UserId, HashSet<ConnId>>,
    /// When each user's last device went offline (since the daemon
    /// started; before that, the devices' stored last-seen times).
    last_seen: HashMap<UserId, u64>,
}

struct Watching {
    user: UserId,
    /// Each watched user, with what the connection was last told.
    targets: Vec<(UserId, Seen)>,
}

impl Watches {
    fn unwatch(&mut self, conn: ConnId) {
        if let Some(w) = self.by_conn.remove(&conn) {
            for (t, _) in w.targets {
                if let Some(set) = self.by_target.get_mut(&t) {
                    set.remove(&conn);
                    if set.is_empty() {
                        self.by_target.remove(&t);
                    }
                }
            }
        }
    }

    /// How many connections watch someone (for tests and stats).
    pub(super) fn watchers(&self) -> usize {
        self.by_conn.len()
    }
}

impl Hub {
    /// What `watcher`'s user may know of `target`'s presence now.
    fn seen(&self, watches: &Watches, watcher: UserId, target: UserId) -> Seen {
        let store = self.store();
        if store.hides_presence(target) || store.hides_presence(watcher) || store.blocks(target, watcher) {
            return Seen::Hidden;
        }
        let mut devices: Vec<DeviceId> = Vec::new();
        store.current_devices(target, &mut devices);
        {
            let online = self.shared.online();
            devices.retain(|d| {
                online.contains_key(&DeviceKey {
                    user: target,
                    device: *d,
                })
            });
        }
        if !devices.is_empty() {
            return Seen::Online { devices };
        }
        let stored = store.device_infos(target).iter().map(|i| i.last_seen_ms).max();
        let here = watches.last_seen.get(&target).copied();
        Seen::Away {
            last_seen_ms: stored.max(here).unwrap_or(0),
        }
    }

    /// `Ephemeral` (spec §5.6): to the named devices online now; `Done`.
    pub(super) fn ephemeral(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, e: Ephemeral, now: Now) {
        let Some(me) = view.device else { return };
        if let Err(wait) = self.shared.may_ephemeral(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::EphemeralRate, wait);
        }
        let store = self.shared.store.clone();
        let Some(to) = store.user_id(&e.to) else {
            return self.refuse(conn, req, Refusal::UnknownUser);
        };
        if store.blocks(to, me.user) {
            // spec §5.8, *Blocking*: nothing reaches the blocker.
            return self.send(conn, req, ServerFrame::Done);
        }
        if e.bodies.len() > MAX_DEVICES_PER_USER {
            return self.refuse(conn, req, Refusal::TooManyBodies);
        }
        if e.bodies.iter().any(|b| b.data.len() > MAX_EPHEMERAL_LEN) {
            return self.refuse(conn, req, Refusal::EphemeralTooLarge);
        }
        for (i, b) in e.bodies.iter().enumerate() {
            if e.bodies[..i].iter().any(|o| o.device == b.device) {
                return self.refuse(conn, req, Refusal::TwoBodies);
            }
            if (DeviceKey {
                user: to,
                device: b.device,
            }) == me
            {
                return self.refuse(conn, req, Refusal::BodyForSender);
            }
        }
        let Some(from_user) = store.user_name(me.user) else {
            return;
        };
        let from = DeviceAddr {
            user: from_user.to_string(),
            device: me.device,
        };
        // The answer first: it says nothing of who was online.
        self.send(conn, req, ServerFrame::Done);
        let mut targets: Vec<(ConnId, DeviceKey, bytes::Bytes)> = Vec::with_capacity(e.bodies.len());
        {
            let online = self.shared.online();
            for b in e.bodies {
                let key = DeviceKey {
                    user: to,
                    device: b.device,
                };
                if let Some(c) = online.get(&key) {
                    targets.push((*c, key, b.data));
                }
            }
        }
        for (target, key, body) in targets {
            // Not to a device revoked whose connection is still closing.
            if !store.is_current(key) {
                continue;
            }
            self.send(
                target,
                0,
                ServerFrame::Ephemeral(EphemeralDeliver {
                    from: from.clone(),
                    to: e.to.clone(),
                    body,
                }),
            );
        }
    }

    /// `SetLastSeen` (spec §5.6): stored, then `Done` and the news.
    pub(super) fn set_last_seen(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, everyone: bool, now: Now) {
        let Some(me) = view.device else { return };
        if let Err(wait) = self.shared.may_ephemeral(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::EphemeralRate, wait);
        }
        let w = self.waiter(Waiting::LastSeen {
            conn,
            req,
            user: me.user,
        });
        self.store().submit(
            Op::SetLastSeen {
                user: me.user,
                everyone,
            },
            Some(w),
        );
    }

    /// The setting of `user` is durable: tell the watchers what changed,
    /// for `user`'s presence and for what `user`'s connections may see.
    pub(super) fn last_seen_set(&mut self, user: UserId) {
        self.presence_changed(user);
        let watches = self.shared.watches();
        let conns: Vec<ConnId> = watches
            .by_conn
            .iter()
            .filter(|(_, w)| w.user == user)
            .map(|(c, _)| *c)
            .collect();
        drop(watches);
        for c in conns {
            self.retell(c);
        }
    }

    /// `WatchPresence` (spec §5.6): replaces what `conn` watches; `Done`,
    /// then each watched user's presence.
    pub(super) fn watch(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, users: Vec<String>, now: Now) {
        let Some(me) = view.device else { return };
        if let Err(wait) = self.shared.may_ephemeral(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::EphemeralRate, wait);
        }
        if users.len() > MAX_WATCHED {
            return self.refuse(conn, req, Refusal::TooManyWatched);
        }
        let store = self.shared.store.clone();
        let mut targets: Vec<UserId> = Vec::with_capacity(users.len());
        for name in users {
            // Names of no user are passed over.
            if let Some(id) = store.user_id(&name)
                && !targets.contains(&id)
            {
                targets.push(id);
            }
        }
        self.send(conn, req, ServerFrame::Done);
        let shared = self.shared.clone();
        let mut watches = shared.watches();
        watches.unwatch(conn);
        let mut told = Vec::with_capacity(targets.len());
        for t in targets {
            let seen = self.seen(&watches, me.user, t);
            watches.by_target.entry(t).or_default().insert(conn);
            told.push((t, seen));
        }
        for (t, seen) in &told {
            self.tell(conn, *t, seen.clone());
        }
        if !told.is_empty() {
            watches.by_conn.insert(
                conn,
                Watching {
                    user: me.user,
                    targets: told,
                },
            );
        }
    }

    /// `user`'s presence may have changed: tell each watcher whose view of
    /// it did.
    pub(super) fn presence_changed(&mut self, user: UserId) {
        let shared = self.shared.clone();
        let mut watches = shared.watches();
        let Some(conns) = watches.by_target.get(&user) else {
            return;
        };
        let conns: Vec<ConnId> = conns.iter().copied().collect();
        for c in conns {
            let Some(watcher) = watches.by_conn.get(&c).map(|w| w.user) else {
                continue;
            };
            let seen = self.seen(&watches, watcher, user);
            let Some(w) = watches.by_conn.get_mut(&c) else { continue };
            for (t, told) in &mut w.targets {
                if *t == user && *told != seen {
                    *told = seen.clone();
                    self.tell(c, user, seen.clone());
                }
            }
        }
    }

    /// Tells `conn` every watched user's presence that changed for it.
    fn retell(&mut self, conn: ConnId) {
        let shared = self.shared.clone();
        let mut watches = shared.watches();
        let Some(watcher) = watches.by_conn.get(&conn).map(|w| w.user) else {
            return;
        };
        let targets: Vec<UserId> = watches.by_conn[&conn].targets.iter().map(|(t, _)| *t).collect();
        let now: Vec<Seen> = targets.iter().map(|t| self.seen(&watches, watcher, *t)).collect();
        let Some(w) = watches.by_conn.get_mut(&conn) else {
            return;
        };
        for ((t, told), seen) in w.targets.iter_mut().zip(now) {
            if *told != seen {
                *told = seen.clone();
                self.tell(conn, *t, seen);
            }
        }
    }

    /// Sends `conn` what it may see of `user`'s presence.
    fn tell(&mut self, conn: ConnId, user: UserId, seen: Seen) {
        let Some(name) = self.store().user_name(user) else {
            return;
        };
        let frame = ServerFrame::Presence(Presence {
            user: name.to_string(),
            seen,
        });
        self.effects.push(Effect::Send { conn, req: 0, frame });
    }

    /// A device came online.
    pub(super) fn came_online(&mut self, device: DeviceKey) {
        self.presence_changed(device.user);
    }

    /// A connection is gone: it watches no one any more; if it was a
    /// device's, its user's presence changed (the last device gone: last
    /// seen now, and the device's time is stored with the next batch).
    pub(super) fn went_offline(&mut self, conn: ConnId, device: Option<DeviceKey>) {
        let now_ms = self.clock_ms;
        {
            let mut watches = self.shared.watches();
            watches.unwatch(conn);
            if let Some(d) = device {
                watches.last_seen.insert(d.user, now_ms);
            }
        }
        if let Some(d) = device {
            self.store().submit(
                Op::Touch {
                    device: d,
                    now_ms,
                    persist: true,
                },
                None,
            );
            self.presence_changed(d.user);
        }
    }
}
