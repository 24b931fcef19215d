//! Typing and presence (spec §5.6): what a client says and hears that is
//! never stored.
//!
//! - [`Client::typing`] sends a typing indicator ([`Content::Typing`]) as
//!   an `Ephemeral`: encrypted only for the other user's devices that the
//!   server says are online (for each device with an Olm session when the
//!   server will not say), never for a device it would have to claim keys
//!   for, and at most [`super::e2e::EPHEMERAL_RUN`] to a device between two
//!   messages. The advanced sessions are durable before it leaves, as for
//!   a message, so no message key is used twice.
//! - A received ephemeral is decrypted on a copy of the session
//!   ([`super::e2e::Crypto::decrypt_ephemeral`]), checked (sent to this
//!   user, made within [`EPHEMERAL_FRESH_MS`] by this device's clock, not
//!   seen before) and reported as [`Event::Typing`]; nothing of it is
//!   stored and it is not acknowledged.
//! - [`Client::watch_presence`] says whose presence to watch; the client
//!   watches them again on each connection, and reports what the server
//!   says as [`Event::Presence`].
//! - [`Client::set_last_seen`] tells the server who may see this user's
//!   presence (it enforces it), keeps the setting, and tells the user's
//!   other devices ([`Content::LastSeen`]).
//!
//! What it does not do: show or expire indicators (the chat screen does),
//! or retry: a typing indicator that cannot go now is not worth sending
//! later.

use super::Error;
use super::content::{Content, Payload};
use super::core::{Client, Event};
use super::history::{Batch, Writes};
use super::send::{SEND_BACKOFF, SEND_PATIENCE};
use crate::wire::{self, Body, ClientFrame, DeviceAddr, DeviceId, Ephemeral, EphemeralDeliver, Seen, ServerFrame};

/// A typing indicator made further than this from this device's clock
/// (either way) is dropped: the server can replay an ephemeral body it
/// passed on (it cannot forge one), and this bounds for how long.
pub const EPHEMERAL_FRESH_MS: u64 = 120_000;

/// How many ephemeral payload ids are remembered to drop replays.
const RECENT_EPHEMERAL: usize = 256;

impl Client {
    /// Tells `to` that this user is typing (`active`) or stopped, if
    /// connected: encrypted for the devices of `to` that are online (see
    /// the module). Returns whether it went to any device.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name; store errors; the server's
    /// refusal (`RATE_LIMITED` when sent too often); a dropped connection.
    pub fn typing(&mut self, to: &str, active: bool) -> Result<bool, Error> {
        if !wire::valid_user_name(to) {
            return Err(Error::Usage(format!("invalid user name {to:?}")));
        }
        let me = self.me()?;
        if to == me || !self.is_connected() {
            return Ok(false);
        }
        // Those without a session are passed over below.
        let devices: Vec<DeviceId> = match self.presence.get(to) {
            Some(Seen::Online { devices }) => devices.clone(),
            Some(Seen::Away { .. }) => return Ok(false),
            // The server will not say who is online: each device known
            // (the run cap keeps their sessions whole).
            Some(Seen::Hidden) | None => self.profile.crypto_mut().devices(to)?.unwrap_or_default(),
        };
        let payload = Payload {
            id: self.new_id()?,
            to: to.to_owned(),
            ts_ms: self.unix_ms(),
            content: Content::Typing { active },
        };
        let plaintext = payload.encode()?;
        let crypto = self.profile.crypto_mut();
        let mut bodies = Vec::with_capacity(devices.len());
        for device in devices {
            let addr = DeviceAddr {
                user: to.to_owned(),
                device,
            };
            if let Some(data) = crypto.encrypt_ephemeral(&addr, &plaintext)? {
                bodies.push(Body { device, data });
            }
        }
        if bodies.is_empty() {
            return Ok(false);
        }
        // Durable before it leaves: a message key is never used twice.
        let (h, crypto) = self.profile.parts();
        h.apply(Batch::default(), crypto.take_writes())?;
        h.flush()?;
        let frame = ClientFrame::Ephemeral(Ephemeral {
            to: to.to_owned(),
            bodies,
        });
        match self.call(&frame, "the server to take a typing indicator")? {
            ServerFrame::Done => Ok(true),
            _ => Err(Error::Unexpected("expected Done for an ephemeral send")),
        }
    }

    /// Handles an ephemeral body (see the module): a typing indicator
    /// becomes [`Event::Typing`]; anything else is dropped.
    pub(super) fn receive_ephemeral(&mut self, e: EphemeralDeliver) -> Result<(), Error> {
        let me = self.me()?;
        // Indicators are for the other user's devices only.
        if e.from.user == me || e.to != me {
            return Ok(());
        }
        let now_ms = self.unix_ms();
        let Some(plaintext) = self.profile.crypto_mut().decrypt_ephemeral(&e.from, &e.body)? else {
            log::debug!("an ephemeral body from {}/{} did not open", e.from.user, e.from.device);
            return Ok(());
        };
        let Ok(p) = Payload::decode(&plaintext) else {
            return Ok(());
        };
        if p.to != me || now_ms.abs_diff(p.ts_ms) > EPHEMERAL_FRESH_MS || self.recent_ephemeral.contains(&p.id) {
            log::debug!(
                "dropping a stale, replayed or misaddressed ephemeral from {}",
                e.from.user
            );
            return Ok(());
        }
        if self.recent_ephemeral.len() >= RECENT_EPHEMERAL {
            self.recent_ephemeral.pop_front();
        }
        self.recent_ephemeral.push_back(p.id);
        match p.content {
            Content::Typing { active } => self.events.push_back(Event::Typing {
                from: e.from.user,
                active,
            }),
            _ => log::debug!("an ephemeral of a kind that is never ephemeral; ignored"),
        }
        Ok(())
    }

    /// Watches the presence of `users` (valid names, at most
    /// [`wire::MAX_WATCHED`]) instead of those watched before, now if
    /// connected and again on each connection; what the server says comes
    /// as [`Event::Presence`].
    ///
    /// # Errors
    /// The server's refusal; a dropped connection (the watch holds for the
    /// next one).
    pub fn watch_presence(&mut self, users: Vec<String>) -> Result<(), Error> {
        let mut list: Vec<String> = Vec::new();
        for u in users {
            if wire::valid_user_name(&u) && !list.contains(&u) && list.len() < wire::MAX_WATCHED {
                list.push(u);
            }
        }
        self.presence.retain(|u, _| list.contains(u));
        self.watching = list;
        if self.is_connected() {
            self.send_watch()?;
        }
        Ok(())
    }

    /// What the server last said of a watched user's presence on this
    /// connection.
    pub fn presence_of(&self, user: &str) -> Option<&Seen> {
        self.presence.get(user)
    }

    fn send_watch(&mut self) -> Result<(), Error> {
        let frame = ClientFrame::WatchPresence {
            users: self.watching.clone(),
        };
        match self.call(&frame, "the server to take a presence watch") {
            Ok(ServerFrame::Done) => Ok(()),
            Ok(_) => Err(Error::Unexpected("expected Done for a presence watch")),
            Err(Error::Server { code, .. }) if code == wire::ErrorCode::UNSUPPORTED => {
                log::info!("this server does not tell presence");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Watches again, on a new connection, whom this client watched.
    ///
    /// # Errors
    /// A dropped connection; a refusal is only logged.
    pub(super) fn rewatch(&mut self) -> Result<(), Error> {
        if self.watching.is_empty() {
            return Ok(());
        }
        match self.send_watch() {
            Err(Error::Server { code, text }) => {
                log::warn!("the server refused to tell presence: {text} ({})", code.name());
                Ok(())
            }
            other => other,
        }
    }

    /// Lets everyone (`true`) or nobody see this user's presence: the
    /// server is told (it enforces it: who hides theirs sees no one's), the
    /// setting is kept here, and the user's other devices are told (end to
    /// end; the latest setting wins).
    ///
    /// # Errors
    /// The server cannot be reached within [`SEND_PATIENCE`] (nothing
    /// changed), or refuses.
    pub fn set_last_seen(&mut self, everyone: bool) -> Result<(), Error> {
        let me = self.me()?;
        let deadline = self.now() + SEND_PATIENCE;
        let mut backoff = SEND_BACKOFF.until(deadline);
        self.retrying(&mut backoff, "last-seen setting", |c| {
            let left = deadline.saturating_duration_since(c.now());
            c.connect_within(left)?;
            match c.call(&ClientFrame::SetLastSeen { everyone }, "the server to take the setting")? {
                ServerFrame::Done => Ok(()),
                _ => Err(Error::Unexpected("expected Done for SetLastSeen")),
            }
        })?;
        let now = self.unix_ms();
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.set_last_seen(&mut batch, everyone, now)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        if let Err(e) = self.send_content(&me, Content::LastSeen { everyone }, now) {
            log::warn!("your other devices will learn the last-seen setting with the next change: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::testing::World;

    /// Pumps `c` until nothing more comes; returns the events it reported.
    fn events(c: &mut Client) -> Vec<Event> {
        for _ in 0..20 {
            let deadline = c.now() + Duration::from_millis(50);
            if c.pump(deadline).is_err() {
                break;
            }
        }
        let mut out = Vec::new();
        while let Some(e) = c.poll_event() {
            out.push(e);
        }
        out
    }

    fn typing_of(events: &[Event]) -> Vec<(String, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Typing { from, active } => Some((from.clone(), *active)),
                _ => None,
            })
            .collect()
    }

    fn ephemerals(w: &World) -> Vec<Ephemeral> {
        w.server()
            .got("Ephemeral")
            .into_iter()
            .filter_map(|f| match f {
                ClientFrame::Ephemeral(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn typing_reaches_only_the_devices_online_and_is_never_queued() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        // Bob links a tablet, which stays offline.
        let (code, _) = bob.link_code().unwrap();
        let mut tablet = w.client(&tmp.path().join("b2"), true);
        tablet.link(&code).unwrap();
        tablet.disconnect();
        alice.send("bob", "hi").unwrap();
        World::sync(&mut bob);
        alice.watch_presence(vec!["bob".into(), "carol".into()]).unwrap();
        assert_eq!(
            alice.presence_of("bob"),
            Some(&Seen::Online {
                devices: vec![DeviceId(1)]
            })
        );
        let queued = |w: &World| {
            let s = w.server();
            (s.queued("bob", 1), s.queued("bob", 2))
        };
        let before = queued(&w);
        assert!(alice.typing("bob", true).unwrap());
        // One body, for bob's device 1: the tablet is not online.
        let sent = ephemerals(&w);
        assert!(matches!(&sent[..], [e] if e.bodies.len() == 1 && e.bodies[0].device == DeviceId(1)));
        assert_eq!(typing_of(&events(&mut bob)), vec![("alice".into(), true)]);
        assert_eq!(queued(&w), before, "nothing was queued");
        assert!(alice.typing("bob", false).unwrap());
        assert_eq!(typing_of(&events(&mut bob)), vec![("alice".into(), false)]);
        // Bob goes away: alice hears it, and types to no one.
        bob.disconnect();
        let got = events(&mut alice);
        assert!(
            got.iter()
                .any(|e| matches!(e, Event::Presence { user, seen: Seen::Away { .. } } if user == "bob")),
            "{got:?}"
        );
        assert!(!alice.typing("bob", true).unwrap());
        assert_eq!(ephemerals(&w).len(), 2);
        // Not to oneself, not without a connection, never a claim.
        assert!(!alice.typing("alice", true).unwrap());
        alice.disconnect();
        assert!(!alice.typing("bob", true).unwrap());
        assert!(w.server().got("ClaimKeys").len() <= 2, "claims only for the messages");
        // The ratchet state they were made with is on disk.
        assert!(alice.profile_mut().crypto_mut().take_writes().is_empty());
    }

    #[test]
    fn a_replayed_stale_or_queued_typing_indicator_is_dropped() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        alice.send("bob", "hi").unwrap();
        World::sync(&mut bob);
        // Bob is not watched: alice writes for his device with a session,
        // and the server passes it on.
        assert!(alice.typing("bob", true).unwrap());
        assert_eq!(typing_of(&events(&mut bob)).len(), 1);
        let frame = |e: &Ephemeral| {
            ServerFrame::Ephemeral(EphemeralDeliver {
                from: DeviceAddr {
                    user: "alice".into(),
                    device: DeviceId(1),
                },
                to: "bob".into(),
                body: e.bodies[0].data.clone(),
            })
        };
        let first = frame(&ephemerals(&w)[0]);
        // The server plays it again: dropped.
        w.server().push("bob", DeviceId(1), &first);
        assert!(typing_of(&events(&mut bob)).is_empty());
        // One made while bob was away, played to him three minutes later:
        // dropped as stale.
        bob.disconnect();
        assert!(alice.typing("bob", true).unwrap());
        let late = frame(&ephemerals(&w)[1]);
        bob.connect().unwrap();
        w.advance(Duration::from_secs(180));
        w.server().push("bob", DeviceId(1), &late);
        assert!(typing_of(&events(&mut bob)).is_empty());
        // Typing as a queued message is not shown either.
        let ts = alice.unix_ms();
        alice.send_content("bob", Content::Typing { active: true }, ts).unwrap();
        let got = World::sync(&mut bob);
        assert!(typing_of(&got).is_empty(), "{got:?}");
        assert!(World::texts(&got).is_empty());
        // Bob's sessions still open alice's messages.
        alice.send("bob", "still there").unwrap();
        assert_eq!(World::texts(&World::sync(&mut bob)), ["still there"]);
    }

    #[test]
    fn last_seen_goes_to_the_server_and_the_users_other_devices() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let (code, _) = alice.link_code().unwrap();
        let mut laptop = w.client(&tmp.path().join("a2"), true);
        laptop.link(&code).unwrap();
        World::sync(&mut alice);
        bob.watch_presence(vec!["alice".into()]).unwrap();
        assert!(matches!(bob.presence_of("alice"), Some(Seen::Online { .. })));
        alice.set_last_seen(false).unwrap();
        assert_eq!(
            w.server().got("SetLastSeen"),
            vec![ClientFrame::SetLastSeen { everyone: false }]
        );
        assert!(!alice.profile().history().last_seen().unwrap().0);
        let got = events(&mut bob);
        assert!(
            got.contains(&Event::Presence {
                user: "alice".into(),
                seen: Seen::Hidden
            }),
            "{got:?}"
        );
        let got = World::sync(&mut laptop);
        assert!(got.contains(&Event::LastSeen { everyone: false }), "{got:?}");
        assert!(!laptop.profile().history().last_seen().unwrap().0);
        // With the server away, nothing changes.
        w.server().up = false;
        alice.disconnect();
        assert!(alice.set_last_seen(true).is_err());
        assert!(!alice.profile().history().last_seen().unwrap().0);
    }

    #[test]
    fn listen_watches_again_on_each_connection() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        bob.disconnect();
        alice.disconnect();
        alice.watch_presence(vec!["bob".into(), "Not A Name".into()]).unwrap();
        assert!(w.server().got("WatchPresence").is_empty(), "not connected");
        for round in 1..=2 {
            let mut seen = Vec::new();
            alice
                .listen(&mut |e| {
                    if let Event::Presence { user, seen: s } = e {
                        seen.push((user.clone(), s.clone()));
                        return false;
                    }
                    true
                })
                .unwrap();
            assert_eq!(seen, vec![("bob".to_owned(), Seen::Away { last_seen_ms: 0 })]);
            assert_eq!(w.server().got("WatchPresence").len(), round);
            alice.disconnect();
        }
        assert_eq!(
            w.server().got("WatchPresence")[0],
            ClientFrame::WatchPresence {
                users: vec!["bob".into()]
            }
        );
    }
}
