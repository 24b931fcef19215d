//! Edits and deletes for everyone, and reactions (spec §14.6): the checks a
//! sender makes before it sends one (its own message, within the window;
//! for a reaction, one emoji on a message of the conversation), and
//! `Retract` after a delete.
//!
//! What a received edit or delete does to the history is
//! [`super::updates`].

use std::time::Duration;

use super::Error;
use super::backoff::Backoff;
use super::content::{Content, MAX_EMOJI_LEN, valid_emoji};
use super::core::Client;
use super::history::{Batch, Writes};
use super::message::{Message, Status};
use super::updates::{DELETE_WINDOW_MS, EDIT_WINDOW_MS};
use crate::wire::{ClientFrame, ErrorCode, MsgId, ServerFrame};

/// How a `Retract` is retried over a dropped connection: twice, 200 ms
/// apart.
pub const RETRACT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_millis(200)).with_max_tries(2);

impl Client {
    /// Reacts to the message `id` (of any conversation, from either side)
    /// with `emoji`, replacing this user's earlier reaction to it, or takes
    /// the reaction back (`None`); every device of both users shows it.
    /// Returns the message as it is now.
    ///
    /// # Errors
    /// [`Error::Usage`] for something that is not one emoji (see
    /// [`valid_emoji`]), a message not here (or not one), deleted,
    /// undecryptable or not sent yet; see [`Client::send_with_id`].
    pub fn react(&mut self, id: MsgId, emoji: Option<&str>) -> Result<Message, Error> {
        if let Some(e) = emoji
            && !valid_emoji(e)
        {
            return Err(Error::Usage(format!(
                "{e:?} is not one emoji: a reaction is one emoji (one character as shown, at most {MAX_EMOJI_LEN} bytes)"
            )));
        }
        let me = self.me()?;
        let mut found = self.profile.history().find(&id)?;
        let m = match found.len() {
            0 => return Err(Error::Usage(format!("no message {id} on this device"))),
            1 => found.remove(0),
            n => {
                return Err(Error::Usage(format!(
                    "{n} messages on this device have id {id}; cannot tell which"
                )));
            }
        };
        if m.deleted {
            return Err(Error::Usage(format!("message {id} was deleted")));
        }
        if m.undecryptable {
            return Err(Error::Usage(format!("message {id} could not be decrypted")));
        }
        if m.status == Status::Pending {
            return Err(Error::Usage(format!(
                "message {id} has not reached the server yet; react once it is sent"
            )));
        }
        if m.group().is_some() {
            return Err(Error::Usage("reactions in groups are not supported yet".into()));
        }
        let peer = m.peer(&me).to_owned();
        let now = self.unix_ms();
        let content = Content::Reaction {
            target: id,
            target_from: m.from.clone(),
            emoji: emoji.map(str::to_owned),
        };
        self.send_content(&peer, content, now)?;
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.react(&mut batch, &me, &peer, id, &m.from, emoji, now)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        h.get(&m.from, &id)?
            .ok_or(Error::Unexpected("the message reacted to is gone"))
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
        super::send::check_text(text)?;
        let m = self.own_message(id, "edit")?;
        let now = self.unix_ms();
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
        h.apply(batch, Writes::new())?;
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
        let now = self.unix_ms();
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
        h.apply(batch, Writes::new())?;
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
        let mut backoff = RETRACT_BACKOFF;
        let r = self.retrying(&mut backoff, "retract", |c| {
            c.connect()?;
            c.call(&ClientFrame::Retract { id }, "the server to retract the message")
        });
        match r {
            Ok(ServerFrame::Done) => Ok(()),
            Ok(_) => Err(Error::Unexpected("expected Done")),
            Err(Error::Server {
                code: ErrorCode::UNSUPPORTED,
                ..
            }) => {
                log::info!("the server does not retract messages");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::core::Event;
    use crate::client::testing::World;
    use crate::client::updates::UpdateKind;

    #[test]
    fn an_edit_reaches_the_other_side_within_its_window_only() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "helo").unwrap();
        World::sync(&mut bob);
        let edited = alice.edit(m.id, "hello").unwrap();
        assert_eq!((edited.text.as_str(), edited.edited()), ("hello", true));
        let events = World::sync(&mut bob);
        assert!(
            events.iter().any(
                |e| matches!(e, Event::Update(u) if u.kind == UpdateKind::Edit && u.text.as_deref() == Some("hello"))
            ),
            "{events:?}"
        );
        assert_eq!(bob.history("alice").unwrap()[0].text, "hello");
        // Bob cannot edit alice's message.
        let e = bob.edit(m.id, "mine now").unwrap_err();
        assert!(matches!(&e, Error::Usage(t) if t.contains("not yours")), "{e}");
        // Past 15 minutes: refused, nothing sent.
        w.advance(Duration::from_secs(16 * 60));
        let sends = w.server().sends().len();
        assert!(matches!(alice.edit(m.id, "late"), Err(Error::Usage(_))));
        assert_eq!(w.server().sends().len(), sends);
    }

    #[test]
    fn a_delete_is_followed_by_a_retract_and_refused_after_two_days() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "oops").unwrap();
        let deleted = alice.delete(m.id).unwrap();
        assert!(deleted.deleted && deleted.text.is_empty());
        assert_eq!(w.server().got("Retract"), vec![ClientFrame::Retract { id: m.id }]);
        // The message never reached bob's queue-holding device as text.
        let events = World::sync(&mut bob);
        assert!(World::texts(&events).iter().all(|t| t.is_empty()), "{events:?}");
        assert!(bob.history("alice").unwrap()[0].deleted);
        let old = alice.send("bob", "old").unwrap();
        w.advance(Duration::from_millis(DELETE_WINDOW_MS + 1));
        assert!(matches!(alice.delete(old.id), Err(Error::Usage(_))));
        assert!(matches!(alice.delete(m.id), Err(Error::Usage(t)) if t.contains("deleted")));
    }

    #[test]
    fn reactions_reach_both_sides_change_and_go_and_only_parties_count() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let mut carol = w.user(&tmp.path().join("c"), "carol", true);
        let m = alice.send("bob", "lunch?").unwrap();
        World::sync(&mut bob);
        let shown = bob.react(m.id, Some("👍")).unwrap();
        assert_eq!(shown.reactions.get("bob").map(String::as_str), Some("👍"));
        let events = World::sync(&mut alice);
        assert!(
            events.iter().any(|e| matches!(e, Event::Reaction(r)
                if r.id == m.id && r.by == "bob" && r.emoji.as_deref() == Some("👍"))),
            "{events:?}"
        );
        // Alice reacts to her own message too; one each.
        alice.react(m.id, Some("❤️")).unwrap();
        bob.react(m.id, Some("😂")).unwrap();
        World::sync(&mut alice);
        World::sync(&mut bob);
        for c in [&alice, &bob] {
            let r = &c.profile().history().get("alice", &m.id).unwrap().unwrap().reactions;
            assert_eq!(
                r.iter().map(|(u, e)| (u.as_str(), e.as_str())).collect::<Vec<_>>(),
                [("alice", "❤️"), ("bob", "😂")]
            );
        }
        // Taken back.
        bob.react(m.id, None).unwrap();
        let events = World::sync(&mut alice);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Reaction(r) if r.emoji.is_none()))
        );
        assert_eq!(alice.history("bob").unwrap()[0].reactions.len(), 1);
        // Carol is no party to it: her forged reaction shows nowhere.
        let forged = Content::Reaction {
            target: m.id,
            target_from: "alice".into(),
            emoji: Some("💩".into()),
        };
        let now = carol.unix_ms();
        carol.send_content("alice", forged, now).unwrap();
        World::sync(&mut alice);
        assert!(!alice.history("bob").unwrap()[0].reactions.contains_key("carol"));
        // Not one emoji: refused before anything is sent.
        let sends = w.server().sends().len();
        for bad in ["", "👍👍", "ok"] {
            assert!(matches!(bob.react(m.id, Some(bad)), Err(Error::Usage(_))), "{bad}");
        }
        assert_eq!(w.server().sends().len(), sends);
        // A deleted message loses its reactions.
        alice.delete(m.id).unwrap();
        World::sync(&mut bob);
        assert!(bob.history("alice").unwrap()[0].reactions.is_empty());
        assert!(matches!(bob.react(m.id, Some("👍")), Err(Error::Usage(_))));
    }
}
