//! Sending: texts, replies and forwards (kept in the history), and content
//! that is not (edits, deletes, settings, session resets), with retries.
//!
//! Guarantees:
//! - an outgoing message is in the history (as pending), and the ratchet
//!   state its bodies were made with is durable, before its `Send` leaves;
//!   it is marked sent only after `Accepted`; every retry, after a
//!   `Mismatch` or a dropped connection, reuses its id (the server stores
//!   it once);
//! - a message is encrypted for every device the server lists for the
//!   recipient and for every other device of the sender: on `Mismatch` the
//!   new devices' keys are claimed (and their signatures checked) and the
//!   removed ones forgotten, and the send is retried;
//! - a message the server refused for good is removed from the history; one
//!   that could not reach the server within [`SEND_PATIENCE`] stays
//!   pending, and goes with the next `listen`, `sync` or `chat`
//!   ([`Client::send_pending`]), under the same id.

use std::time::Duration;

use super::Error;
use super::backoff::Backoff;
use super::content::{BodyError, Content, Payload, QuoteText, quote_of};
use super::core::{Client, Event};
use super::e2e::Notice;
use super::message::{Direction, Message, Quote, Status};
use crate::wire::{self, Body, ClientFrame, DeviceAddr, DeviceId, MAX_BODY_LEN, MsgId, ServerFrame};

/// How long a send tries to reach the server before it leaves the message
/// pending (so that `tidings send` answers within 3 s when the server is
/// away; the message then goes with the next `listen`, `sync` or `chat`).
pub const SEND_PATIENCE: Duration = Duration::from_millis(2500);
/// How a send retries over dropped connections within [`SEND_PATIENCE`]:
/// from 200 ms, doubling up to 500 ms.
pub const SEND_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(500));
/// The longest text a message may carry, in bytes of UTF-8. Any message
/// of this size fits in a body once encrypted, whatever its kind (a reply
/// carries a quote too) and whoever it goes to (spec §14.3, *Size*).
pub const MAX_TEXT_LEN: usize = 3500;
/// Most `Mismatch` answers one send accepts before giving up, and the
/// pauses between them (keys may be on their way: a device just linked).
pub const MISMATCH_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(150), Duration::from_millis(600)).with_max_tries(MAX_MISMATCHES);
/// Most `Mismatch` answers one send accepts.
pub const MAX_MISMATCHES: u32 = 5;

/// What one attempt at a `Send` got.
enum Attempt {
    /// `Accepted` at this server time.
    Accepted(u64),
    /// `Mismatch`: these devices had no body.
    Mismatch(Vec<DeviceAddr>),
}

/// Checks a text a user wrote: not empty, not longer than
/// [`MAX_TEXT_LEN`].
///
/// # Errors
/// [`Error::Usage`] for an empty text, [`Error::Body`] for one too long.
pub fn check_text(text: &str) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::Usage("the message is empty: write something to send".into()));
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(BodyError::TextTooLong {
            len: text.len(),
            max: MAX_TEXT_LEN,
        }
        .into());
    }
    Ok(())
}

impl Client {
    /// Sends `text` to `to` and returns once the server accepted it.
    ///
    /// # Errors
    /// See [`Client::send_with_id`].
    pub fn send(&mut self, to: &str, text: &str) -> Result<Message, Error> {
        let id = self.new_id()?;
        self.send_with_id(id, to, text)
    }

    /// Sends `text` to `to` under `id` and returns the message once the
    /// server accepted it (status sent), or, if the server could not be
    /// reached within [`SEND_PATIENCE`], once it is stored as pending
    /// (status pending: it goes with the next `listen`, `sync` or `chat`).
    /// On `Mismatch` it claims keys for the new devices, forgets the
    /// removed ones and retries; on a dropped connection it reconnects and
    /// retries ([`SEND_BACKOFF`]); always with the same id, which the
    /// server stores once. Sending again with an id the server already
    /// accepted is answered `Accepted` again and delivered once.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name or an empty text, [`Error::Body`]
    /// for a text longer than [`MAX_TEXT_LEN`]; [`Error::NoKeys`] for a
    /// device that never published keys; the server's refusal
    /// (`UNKNOWN_USER`, `QUOTA_EXCEEDED`...), after which the message is
    /// removed from the history.
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
    pub(super) fn content_of(m: &Message) -> Content {
        if let Some(c) = super::files::file_content(m) {
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

    /// Checks an outgoing message's text (a file's caption may be empty),
    /// makes its payload, and keeps it in the history as pending before
    /// anything else, so that whatever happens next it is not lost. For
    /// direct and group messages alike. Returns the payload's bytes.
    pub(super) fn stage_outgoing(&mut self, user: &str, device: u32, msg: &mut Message) -> Result<Vec<u8>, Error> {
        if msg.attachment.is_none() {
            check_text(&msg.text)?;
        } else if msg.text.len() > MAX_TEXT_LEN {
            return Err(BodyError::TextTooLong {
                len: msg.text.len(),
                max: MAX_TEXT_LEN,
            }
            .into());
        }
        let payload = Payload {
            id: msg.id,
            to: msg.to.clone(),
            ts_ms: self.unix_ms(),
            content: Self::content_of(msg),
        };
        // Fails early on a text too long, before anything is stored.
        let plaintext = payload.encode()?;
        msg.from = user.to_string();
        msg.from_device = DeviceId(device);
        msg.ts_ms = payload.ts_ms;
        msg.direction = Direction::Out;
        msg.status = Status::Pending;
        msg.undecryptable = false;
        let h = self.profile.history();
        h.commit(user, Some(msg), (user, &msg.id), Default::default())?;
        h.flush()?;
        Ok(plaintext)
    }

    /// Sends the message `msg` says (its id, recipient, text, and what it
    /// replies to or how often it was forwarded); see
    /// [`Client::send_with_id`].
    pub(super) fn send_message(&mut self, msg: Message) -> Result<Message, Error> {
        if msg.to.starts_with('#') {
            return self.send_group_message(msg);
        }
        // A file goes up before its message.
        let mut msg = self.upload_for(msg, &mut |_, _| {})?;
        let me = self.profile.registered()?.clone();
        if !wire::valid_user_name(&msg.to) {
            return Err(Error::Usage(format!("invalid user name {:?}", msg.to)));
        }
        self.check_not_blocked(&msg.to)?;
        let (id, to) = (msg.id, msg.to.clone());
        let plaintext = self.stage_outgoing(&me.user, me.device, &mut msg)?;
        let deadline = self.now() + SEND_PATIENCE;
        match self.send_payload(&to, id, &plaintext, Some(&msg), None, deadline) {
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
            Err(e) if e.is_transient() => {
                log::info!("message {id} is pending: {e}");
                Ok(self.profile.history().get(&me.user, &id)?.unwrap_or(msg))
            }
            Err(e) => {
                if matches!(e, Error::Server { .. } | Error::NoKeys { .. }) {
                    // Refused for good: the server stored nothing.
                    let h = self.profile.history();
                    h.remove(&me.user, &me.user, &id)?;
                    h.flush()?;
                }
                Err(e)
            }
        }
    }

    /// Sends again, with the same ids, this device's messages that a crash
    /// or a failure left pending.
    ///
    /// # Errors
    /// A transient failure (the rest stay pending for the next time);
    /// other failures are logged, and the message stays or goes as
    /// [`Client::send_with_id`] says.
    pub(super) fn send_pending(&mut self) -> Result<(), Error> {
        let me = self.profile.registered()?.clone();
        for m in self.profile.history().pending()? {
            if m.from == me.user && m.from_device.0 == me.device {
                log::info!("sending pending message {}", m.id);
                let id = m.id;
                match self.send_message(m) {
                    Ok(m) if m.status == Status::Pending => {
                        // The server went away again: the rest wait too.
                        return Err(Error::Timeout("the server to take the pending messages"));
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("pending message {id} could not be sent: {e}"),
                }
            }
        }
        Ok(())
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
        if let Some(g) = super::group::parse_group(to) {
            return self.send_group_content(g, content, ts_ms);
        }
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
        let deadline = self.now() + SEND_PATIENCE;
        self.send_payload(to, id, &plaintext, None, None, deadline)
    }

    /// Sends an encrypted payload with retries until `deadline` (see
    /// [`Client::send_with_id`]); returns the server's acceptance time.
    pub(super) fn send_payload(
        &mut self,
        to: &str,
        id: MsgId,
        plaintext: &[u8],
        history: Option<&Message>,
        mut fresh: Option<DeviceAddr>,
        deadline: std::time::Instant,
    ) -> Result<u64, Error> {
        let mut backoff = SEND_BACKOFF.until(deadline);
        let mut mismatches = MISMATCH_BACKOFF;
        loop {
            let attempt = self.retrying(&mut backoff, &format!("send {id}"), |c| {
                c.try_send(to, id, plaintext, history, &mut fresh, deadline)
            })?;
            match attempt {
                Attempt::Accepted(time_ms) => return Ok(time_ms),
                Attempt::Mismatch(missing) => {
                    let first = mismatches.tries() == 0;
                    let Some(at) = mismatches.next(self.now()) else {
                        // A device the server lists that never published
                        // keys cannot be written to.
                        return Err(match missing.into_iter().next() {
                            Some(a) => Error::NoKeys {
                                user: a.user,
                                device: a.device,
                            },
                            None => Error::Unexpected("the device lists keep changing"),
                        });
                    };
                    if !first {
                        // Keys may be on their way (a device just linked).
                        self.pause(at);
                    }
                }
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
        fresh: &mut Option<DeviceAddr>,
        deadline: std::time::Instant,
    ) -> Result<Attempt, Error> {
        // Never past the deadline, even for a server that does not answer
        // at all.
        let left = deadline.saturating_duration_since(self.now());
        if !self.is_connected() && left.is_zero() {
            return Err(Error::Timeout("the server"));
        }
        self.connect_within(left)?;
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
                h.commit(&me.user, Some(m), (&me.user, &id), writes)?;
            }
            None => h.apply(Default::default(), writes)?,
        }
        h.flush()?;
        // Warnings about these devices come before the message goes.
        self.events.extend(notices.into_iter().map(Event::Notice));
        match self.call(&ClientFrame::Send(send), "the server to accept the message")? {
            ServerFrame::Accepted { id: got, time_ms } if got == id => Ok(Attempt::Accepted(time_ms)),
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
                Ok(Attempt::Mismatch(missing))
            }
            _ => Err(Error::Unexpected("expected Accepted or Mismatch for this message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::{Fault, World};
    use crate::wire::ErrorCode;

    #[test]
    fn a_message_is_stored_pending_then_sent_and_arrives_once() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "hi").unwrap();
        assert_eq!((m.status, m.direction), (Status::Sent, Direction::Out));
        assert_eq!(alice.history("bob").unwrap(), vec![m.clone()]);
        // The server got one Send, with a body for bob's one device.
        let sends = w.server().sends();
        assert!(matches!(&sends[..], [s] if s.bodies.len() == 1 && s.own.is_empty()));
        let mut got = Vec::new();
        bob.sync(&mut |m| got.push(m.text.clone())).unwrap();
        assert_eq!(got, ["hi"]);
        assert_eq!(w.server().queued("bob", 1), 0, "acked");
    }

    #[test]
    fn a_mismatch_claims_the_new_device_and_the_retry_keeps_the_id() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", false);
        alice.send("bob", "one").unwrap();
        // Bob links a second device alice does not know of.
        let (code, _) = bob.link_code().unwrap();
        let mut tablet = w.client(&tmp.path().join("b2"), true);
        tablet.link(&code).unwrap();
        let m = alice.send("bob", "two").unwrap();
        let sends = w.server().sends();
        assert_eq!(sends.len(), 3, "one, then two twice");
        assert_eq!((sends[1].id, sends[2].id), (m.id, m.id));
        assert_eq!((sends[1].bodies.len(), sends[2].bodies.len()), (1, 2));
        let mut got = Vec::new();
        tablet.sync(&mut |m| got.push(m.text.clone())).unwrap();
        assert_eq!(got, ["two"]);
    }

    #[test]
    fn a_dropped_connection_is_retried_with_the_same_id_and_a_refusal_removes_the_message() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let _bob = w.user(&tmp.path().join("b"), "bob", false);
        w.server().fault("Send", Fault::Drop);
        w.server().fault("Send", Fault::Drop);
        let m = alice.send("bob", "through").unwrap();
        assert_eq!(m.status, Status::Sent);
        let ids: Vec<MsgId> = w.server().sends().iter().map(|s| s.id).collect();
        assert_eq!(ids, [m.id; 3]);
        // Refused for good: nothing is left in the history.
        w.server().fault("Send", Fault::Refuse(ErrorCode::QUOTA_EXCEEDED));
        let e = alice.send("bob", "refused").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Server {
                    code: ErrorCode::QUOTA_EXCEEDED,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(alice.history("bob").unwrap(), vec![m]);
    }

    /// Issue 14 (spec §6): `SLOW_DOWN` is waited out for as long as the
    /// `RetryAfter` before it says, on the same connection, and the same
    /// message goes again; a wait past the patience leaves it pending.
    #[test]
    fn a_send_refused_for_the_rate_waits_the_retry_after_and_goes_again() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let _bob = w.user(&tmp.path().join("b"), "bob", false);
        alice.send("bob", "warm").unwrap();
        let conns = w.server().connections();
        w.server().fault("Send", Fault::SlowDown(1500));
        let t0 = alice.now();
        let m = alice.send("bob", "slowly").unwrap();
        assert_eq!(m.status, Status::Sent);
        assert!(
            alice.now() - t0 >= Duration::from_millis(1500),
            "{:?}",
            alice.now() - t0
        );
        let ids: Vec<MsgId> = w.server().sends().iter().map(|s| s.id).collect();
        assert_eq!(&ids[1..], [m.id; 2]);
        assert_eq!(w.server().connections(), conns, "the connection was kept");
        // A wait longer than the patience: pending, not lost.
        w.server()
            .fault("Send", Fault::SlowDown(SEND_PATIENCE.as_millis() as u64 * 2));
        let m = alice.send("bob", "later").unwrap();
        assert_eq!(m.status, Status::Pending);
    }

    #[test]
    fn with_the_server_away_a_message_is_pending_within_the_patience_and_goes_with_the_next_sync() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        alice.send("bob", "first").unwrap();
        alice.disconnect();
        w.server().up = false;
        let t0 = alice.now();
        let m = alice.send("bob", "while away").unwrap();
        assert_eq!(m.status, Status::Pending);
        assert!(alice.now() - t0 <= SEND_PATIENCE, "{:?}", alice.now() - t0);
        assert_eq!(alice.history("bob").unwrap()[1].status, Status::Pending);
        // Still away: a sync fails, the message stays pending.
        assert!(alice.sync(&mut |_| {}).is_err());
        assert_eq!(alice.history("bob").unwrap()[1].status, Status::Pending);
        w.server().up = true;
        World::sync(&mut alice);
        let sent = &alice.history("bob").unwrap()[1];
        assert_eq!((sent.id, sent.status), (m.id, Status::Sent));
        assert_eq!(World::texts(&World::sync(&mut bob)), ["first", "while away"]);
    }

    #[test]
    fn empty_and_too_long_texts_are_refused_before_anything_is_stored() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let _bob = w.user(&tmp.path().join("b"), "bob", false);
        assert!(matches!(alice.send("bob", ""), Err(Error::Usage(_))));
        assert!(matches!(alice.send("bob", " \n\t"), Err(Error::Usage(_))));
        let e = alice.send("bob", &"é".repeat(MAX_TEXT_LEN / 2 + 1)).unwrap_err();
        assert!(matches!(e, Error::Body(BodyError::TextTooLong { .. })), "{e}");
        assert!(alice.history("bob").unwrap().is_empty());
        assert!(w.server().sends().is_empty());
        // The longest text fits, as a reply to the longest one too, and to
        // the longest user name.
        let long = "x".repeat(MAX_TEXT_LEN);
        let m = alice.send("bob", &long).unwrap();
        alice.send_reply("bob", &long, m.id).unwrap();
        let name = "a".repeat(32);
        let _c = w.user(&tmp.path().join("c"), &name, false);
        let mut fwd = alice.forward(m.id, &name).unwrap();
        fwd.text.clear();
    }
}
