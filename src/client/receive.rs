//! Receiving: what each queue entry (spec §10) does to the history, and the
//! two ways of taking them: `sync` (everything queued, then return) and
//! `listen` (stay connected, reconnecting with backoff).
//!
//! Guarantees:
//! - a received message is decrypted, then stored together with the Olm
//!   state that decrypted it (one transaction) and flushed before it is
//!   acked, and a duplicate (same sender and id) is stored and reported
//!   once, without touching the Olm state again;
//! - a body that does not decrypt is stored and reported as an
//!   undecryptable message and acked like any other (the queue never
//!   stalls), and the sending device is sent a session reset (see
//!   [`super::keys`]; at most one a minute per device);
//! - receipts, gap and expiry notices are queue entries: applied (see
//!   [`super::updates`]), flushed and acked like messages, so they never
//!   hold the delivery window shut;
//! - events are reported only once what they report is durable and acked.

use std::time::Duration;

use super::Error;
use super::backoff::Backoff;
use super::conn::Closed;
use super::content::{Content, Payload};
use super::core::{ANSWER_TIMEOUT, Client, Entry, Event};
use super::driver::Input;
use super::e2e::DecryptError;
use super::history::{Batch, Writes};
use super::message::{Direction, Message, Quote, Status};
use crate::wire;

/// How `sync` reconnects when its connection fails.
pub const SYNC_BACKOFF: Backoff = Backoff::new(Duration::from_millis(400), Duration::from_secs(2)).with_max_tries(3);
/// How `listen` reconnects: from 1 s, doubling, up to 30 s, for ever.
pub const LISTEN_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

impl Client {
    fn note_seq(&mut self, seq: u64) {
        self.ack_up_to = Some(self.ack_up_to.map_or(seq, |a| a.max(seq)));
    }

    /// Stores what a queue entry says; it is acked once flushed.
    pub(super) fn store_entry(&mut self, entry: Entry) -> Result<(), Error> {
        match entry {
            Entry::Deliver(d) => self.store_delivery(d),
            Entry::Receipt(r) => {
                self.note_seq(r.seq);
                let me = self.me()?;
                let h = self.profile.history();
                let (show_read, _) = h.read_receipts()?;
                let mut batch = Batch::default();
                let news = h.receive_receipt(&mut batch, &me, &r, show_read)?;
                h.apply(batch, Writes::new())?;
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
                let now_ms = self.unix_ms();
                let h = self.profile.history();
                let mut batch = Batch::default();
                h.receive_expired(&mut batch, &me, &n, now_ms)?;
                h.apply(batch, Writes::new())?;
                self.fresh.push(Event::Expired {
                    device: n.device,
                    ids: n.ids,
                });
                Ok(())
            }
            Entry::Group(f) => self.store_group_entry(f),
        }
    }

    fn store_delivery(&mut self, d: wire::Deliver) -> Result<(), Error> {
        let me = self.me()?;
        let now_ms = self.unix_ms();
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
                Content::LastSeen { everyone } => {
                    if own && history.set_last_seen(&mut batch, everyone, p.ts_ms)? {
                        events.push(Event::LastSeen { everyone });
                    }
                    false
                }
                Content::Typing { .. } => {
                    // Only ever ephemeral (spec §5.6): not from a queue.
                    log::debug!("a typing indicator came as a message from {}; ignored", d.from.user);
                    false
                }
                Content::Reaction {
                    target,
                    target_from,
                    emoji,
                } => {
                    let r = history.react(
                        &mut batch,
                        &d.from.user,
                        &d.to,
                        target,
                        &target_from,
                        emoji.as_deref(),
                        p.ts_ms,
                    )?;
                    events.extend(r.map(Event::Reaction));
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
                    msg.attachment = Some(super::attachment::Attachment::received(file));
                    true
                }
                Content::GroupKey { group, session_key } => {
                    crypto.add_inbound(group, &d.from, &session_key)?;
                    false
                }
                Content::GroupTitle { group, title } => {
                    events.extend(history.take_title(&mut batch, group, &d.from, title, p.ts_ms)?);
                    false
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
                    if e != DecryptError::Malformed && crypto.may_reset(&d.from, now_ms)? {
                        self.resets.push(d.from.clone());
                    }
                }
                true
            }
        };
        if shown {
            if let Some(m) = history.receive_message(&mut batch, &me, msg)? {
                events.insert(0, Event::Message(m));
                self.outbox.dirty = true;
            }
        } else {
            history.mark_seen(&mut batch, &d.from.user, &d.id);
        }
        let writes = crypto.take_writes();
        history.apply(batch, writes)?;
        self.events.extend(notices.into_iter().map(Event::Notice));
        self.fresh.extend(events);
        Ok(())
    }

    // ---- sync ----

    /// Connects (afresh), stores everything queued up to `QueueDrained`,
    /// acks it, and calls `on_message` for each new message once it is
    /// durable; returns once the server has answered the delivered
    /// receipts for them. Returns how many were new.
    ///
    /// # Errors
    /// Connection failures (after a few reconnects, [`SYNC_BACKOFF`]);
    /// what was stored before stays stored.
    pub fn sync(&mut self, on_message: &mut dyn FnMut(&Message)) -> Result<usize, Error> {
        self.sync_events(&mut |e| {
            if let Event::Message(m) = e {
                on_message(m);
            }
        })
    }

    /// [`Client::sync`], reporting every [`Event`] but the connection's
    /// own (notices each before the message it came with, receipts,
    /// updates, gap and expiry notices); then tops up keys, sends session
    /// resets, and sends the messages left pending.
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
        let mut backoff = SYNC_BACKOFF;
        self.retrying(&mut backoff, "sync", |c| {
            c.connect()?;
            let mut done = false;
            while !done {
                while let Some(ev) = c.events.pop_front() {
                    done = done || ev == Event::Drained;
                    report(ev, &mut count, &mut files);
                }
                if !done {
                    let deadline = c.now() + ANSWER_TIMEOUT;
                    c.pump(deadline)?;
                }
            }
            // Returns once the receipts for what came are `Done`.
            c.settle_receipts()
        })?;
        self.housekeeping();
        if let Err(e) = self.send_pending() {
            log::warn!("messages left pending still wait: {e}");
        }
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

    // ---- listen ----

    /// Stays connected: stores and reports deliveries as [`Event`]s through
    /// `on_event`, runs work handed over by other commands, pings when
    /// quiet, resends messages left pending, and reconnects with
    /// [`LISTEN_BACKOFF`]. Returns only on a failure that reconnecting
    /// cannot fix (revoked, connected elsewhere, wrong server key, local
    /// storage), or `Ok` when `on_event` returns `false`.
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
        let mut backoff = LISTEN_BACKOFF;
        loop {
            if self.stopping {
                return Ok(());
            }
            let outcome = self.connect().and_then(|()| {
                backoff.reset();
                if !on_event(&Event::Connected) {
                    return Ok(false);
                }
                self.serve(on_event)
            });
            match outcome {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() => {
                    log::debug!("listen: {e}");
                    let wait = backoff.peek();
                    let text = format!("{e}; reconnecting in {}s", wait.as_secs());
                    if !on_event(&Event::Disconnected(text)) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
            self.drop_conn();
            // Wait out the backoff, still serving local work.
            let until = backoff.next(self.now()).unwrap_or_else(|| self.now());
            while let Some(input) = self.driver.wait(until) {
                match input {
                    Input::Local(job) => {
                        self.run_job(job);
                        if !on_event(&Event::Served) {
                            return Ok(());
                        }
                    }
                    Input::Stop => return Ok(()),
                    _ => {}
                }
            }
        }
    }

    /// Serves one connection; `Ok(false)` when `on_event` says stop.
    fn serve(&mut self, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<bool, Error> {
        match self.maintain() {
            Ok(()) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => log::warn!("could not publish end-to-end keys: {e}"),
        }
        self.rewatch()?;
        self.send_pending()?;
        loop {
            if self.stopping {
                return Ok(false);
            }
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
                // Whoever shows the history reads it again.
                self.events.push_back(Event::Served);
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
            let deadline = self.now() + Duration::from_secs(3600);
            self.pump(deadline)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::request::{Job, Outcome, Request};
    use crate::client::testing::World;
    use crate::wire::{DeviceAddr, DeviceId, GapNotice, Lost, ServerFrame};

    #[test]
    fn a_redelivered_message_is_acked_and_not_shown_again() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "once").unwrap();
        // As if bob had stored it and crashed before his ack got out.
        let copy = Message {
            id: m.id,
            from: "alice".into(),
            from_device: DeviceId(1),
            to: "bob".into(),
            text: "once".into(),
            ..Message::default()
        };
        assert!(bob.profile().history().insert("bob", &copy).unwrap());
        assert!(World::texts(&World::sync(&mut bob)).is_empty());
        assert_eq!(w.server().queued("bob", 1), 0, "acked all the same");
        assert_eq!(bob.history("alice").unwrap().len(), 1);
    }

    #[test]
    fn an_undecryptable_message_is_shown_acked_and_the_session_reset() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        alice.send("bob", "one").unwrap();
        assert_eq!(World::texts(&World::sync(&mut bob)), ["one"]);
        // Bob answers, so alice's next messages are normal Olm messages...
        bob.send("alice", "two").unwrap();
        assert_eq!(World::texts(&World::sync(&mut alice)), ["two"]);
        // ...which bob, having lost his sessions with her, cannot open.
        let crypto = bob.profile_mut().crypto_mut();
        crypto
            .forget_device(&DeviceAddr {
                user: "alice".into(),
                device: DeviceId(1),
            })
            .unwrap();
        crypto.persist().unwrap();
        alice.send("bob", "lost").unwrap();
        let events = World::sync(&mut bob);
        let shown: Vec<&Message> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(matches!(&shown[..], [m] if m.undecryptable && m.text.is_empty()));
        assert_eq!(w.server().queued("bob", 1), 0, "acked: the queue never stalls");
        // The sync then sent alice's device a session reset, on which she
        // writes from now on.
        assert_eq!(w.server().sends().last().unwrap().to, "alice");
        assert!(
            World::texts(&World::sync(&mut alice)).is_empty(),
            "a reset is not shown"
        );
        alice.send("bob", "found").unwrap();
        assert_eq!(World::texts(&World::sync(&mut bob)), ["found"]);
    }

    #[test]
    fn a_flood_of_garbage_from_one_device_is_one_history_entry() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let _alice = w.user(&tmp.path().join("a"), "alice", false);
        for i in 0..200u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            w.server().enqueue("bob", DeviceId(1), |seq| {
                ServerFrame::Deliver(wire::Deliver {
                    seq,
                    id: crate::wire::MsgId(id),
                    from: DeviceAddr {
                        user: "alice".into(),
                        device: DeviceId(1),
                    },
                    to: "bob".into(),
                    time_ms: 5,
                    body: bytes::Bytes::from_static(b"not an olm message"),
                })
            });
        }
        let events = World::sync(&mut bob);
        let shown = events.iter().filter(|e| matches!(e, Event::Message(_))).count();
        assert_eq!(shown, 1, "one notice is reported");
        assert_eq!(w.server().queued("bob", 1), 0, "all acked");
        let h = bob.history("alice").unwrap();
        assert_eq!(h.len(), 1);
        assert!(h[0].undecryptable);
        assert_eq!(h[0].repeats, 199);
    }

    #[test]
    fn notices_are_acked_and_reported_once_stored() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let lost = Lost {
            from: DeviceAddr {
                user: "carol".into(),
                device: DeviceId(2),
            },
            count: 3,
            first_ms: 1,
            last_ms: 2,
        };
        let l = lost.clone();
        w.server().enqueue("bob", DeviceId(1), |seq| {
            ServerFrame::Gap(GapNotice { seq, lost: vec![l] })
        });
        assert_eq!(World::sync(&mut bob), vec![Event::Gap(lost)]);
        assert_eq!(w.server().queued("bob", 1), 0);
        assert!(World::sync(&mut bob).is_empty(), "once");
    }

    #[test]
    fn listen_reconnects_with_backoff_and_runs_handed_over_work_meanwhile() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        bob.disconnect();
        let t0 = bob.now();
        w.server().up = false;
        // Another command's request, waiting for the listener.
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let request = Request::Settings {
            read_receipts: None,
            last_seen: None,
            auto_download: None,
        };
        bob.input_sender()
            .send(Input::Local(Job {
                request,
                reply: reply_tx,
            }))
            .unwrap();
        let mut seen = Vec::new();
        let r = bob.listen(&mut |e| {
            seen.push(e.clone());
            // Stop after the fourth failure.
            seen.iter().filter(|e| matches!(e, Event::Disconnected(_))).count() < 4
        });
        r.unwrap();
        // 1 s, 2 s, 4 s between the four tries, by the virtual clock.
        assert_eq!(bob.now() - t0, Duration::from_secs(7));
        let texts: Vec<String> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Disconnected(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        assert!(texts[3].ends_with("reconnecting in 8s"), "{texts:?}");
        // The request was answered while the server was away.
        let reply = reply_rx.try_recv().unwrap().unwrap();
        assert_eq!(
            reply.outcome,
            Outcome::Settings {
                read_receipts: true,
                last_seen: true,
                auto_download: crate::client::files::AUTO_DOWNLOAD,
            }
        );
    }
}
