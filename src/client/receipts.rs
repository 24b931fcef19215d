//! Receipts (spec §5.5): the outbox of receipts to send, marking a
//! conversation read, the read-receipt setting, and what became of a
//! message (`info`).
//!
//! Guarantees: a delivered receipt for a message from another user is
//! queued in the outbox in the same transaction that stores the message
//! (see [`super::receive`]) and sent once that is flushed; read receipts
//! when the user reads; a receipt leaves the outbox only when the server
//! answered `Done` (so none is lost to a crash), and `sync` returns only
//! once its receipts are answered. Read receipts are dropped while the
//! user has them off, and read state then reaches the user's other devices
//! end to end.

use super::Error;
use super::content::Content;
use super::core::{ANSWER_TIMEOUT, Client};
use super::history::{Batch, Writes};
use super::message::Message;
use super::status::Receipts;
use crate::wire::{self, ClientFrame, ErrorCode, MsgId, ReceiptKind, ServerFrame};

impl Client {
    /// Sends the receipts of the outbox not sent on this connection yet,
    /// one `Receipt` per conversation and kind (spec §5.5), once what they
    /// report is durable. Read receipts are dropped while the user has
    /// them off.
    pub(super) fn send_outbox(&mut self) -> Result<(), Error> {
        if !self.outbox.dirty || self.outbox.blocked || !self.is_connected() {
            return Ok(());
        }
        self.outbox.dirty = false;
        let h = self.profile.history();
        let (read_on, _) = h.read_receipts()?;
        // (kind, peer) → (outbox key, id)
        type Groups = std::collections::BTreeMap<(u8, String), Vec<(Vec<u8>, MsgId)>>;
        let mut groups = Groups::new();
        let mut dropped = Vec::new();
        for e in h.outbox()? {
            if self.outbox.inflight_keys.contains(&e.key) {
                continue;
            }
            if e.kind == ReceiptKind::READ && !read_on {
                dropped.push(e.key);
                continue;
            }
            groups.entry((e.kind.0, e.peer)).or_default().push((e.key, e.id));
        }
        h.outbox_done(&dropped)?;
        if groups.is_empty() {
            return Ok(());
        }
        // What they report is durable before they leave.
        h.flush()?;
        let now = self.now();
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        for ((kind, peer), items) in groups {
            for chunk in items.chunks(wire::MAX_RECEIPT_IDS) {
                let ids = chunk.iter().map(|(_, id)| *id).collect();
                let frame = match super::group::parse_receipt_peer(&peer) {
                    Some((group, from)) => ClientFrame::GroupReceipt(wire::GroupReceipt {
                        group,
                        to: from.to_owned(),
                        kind: ReceiptKind(kind),
                        ids,
                    }),
                    None => ClientFrame::Receipt(wire::Receipt {
                        to: peer.clone(),
                        kind: ReceiptKind(kind),
                        ids,
                    }),
                };
                let Ok(req) = conn.request(&frame, now) else {
                    self.outbox.dirty = true;
                    return Ok(());
                };
                let keys: Vec<Vec<u8>> = chunk.iter().map(|(k, _)| k.clone()).collect();
                self.outbox.inflight_keys.extend(keys.iter().cloned());
                self.outbox.inflight.insert(req, keys);
            }
        }
        Ok(())
    }

    pub(super) fn receipt_answered(&mut self, req: u32, frame: ServerFrame) -> Result<(), Error> {
        let keys = self.outbox.inflight.remove(&req).unwrap_or_default();
        for k in &keys {
            self.outbox.inflight_keys.remove(k);
        }
        match frame {
            ServerFrame::Done => self.profile.history().outbox_done(&keys),
            ServerFrame::Error {
                code: ErrorCode::UNSUPPORTED,
                ..
            } => {
                log::info!("the server does not take receipts; dropping them");
                self.profile.history().outbox_done(&keys)
            }
            ServerFrame::Error { code, text } => {
                // QUOTA_EXCEEDED, most likely: they wait for a later
                // connection.
                log::warn!(
                    "the server refused {} receipt{}: {} ({}); they wait for the next connection",
                    keys.len(),
                    if keys.len() == 1 { "" } else { "s" },
                    text,
                    code.name()
                );
                self.outbox.blocked = true;
                Ok(())
            }
            other => {
                log::warn!("unexpected answer to a receipt: {}", other.kind());
                self.outbox.blocked = true;
                Ok(())
            }
        }
    }

    /// Sends what the outbox holds and waits until the server has answered
    /// every receipt.
    pub(super) fn settle_receipts(&mut self) -> Result<(), Error> {
        let deadline = self.now() + ANSWER_TIMEOUT;
        self.outbox.dirty = true;
        self.send_outbox()?;
        self.flush()?;
        while !self.outbox.inflight.is_empty() {
            if self.now() >= deadline {
                self.drop_conn();
                return Err(Error::Timeout("the server to take the receipts"));
            }
            self.pump(deadline)?;
        }
        Ok(())
    }

    /// Marks the conversation with `peer` read: every message from `peer`
    /// not read yet. With read receipts on, sends read receipts (they reach
    /// `peer`'s devices and this user's other devices) and returns once
    /// the server has them; with them off, tells only this user's other
    /// devices, end to end. Returns how many messages were unread.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name; connection failures (the messages
    /// stay read here, and the receipts wait for the next connection).
    pub fn read(&mut self, peer: &str) -> Result<usize, Error> {
        if let Some(g) = super::group::parse_group(peer) {
            return self.read_group(g);
        }
        if !wire::valid_user_name(peer) {
            return Err(Error::Usage(format!("invalid user name {peer:?}")));
        }
        let me = self.me()?;
        let now_ms = self.unix_ms();
        let h = self.profile.history();
        let (on, _) = h.read_receipts()?;
        let mut batch = Batch::default();
        let ids = h.mark_read(&mut batch, peer, now_ms, on && peer != me)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        if on {
            if !h.outbox()?.is_empty() {
                self.connect()?;
                self.settle_receipts()?;
            }
        } else {
            for chunk in ids.chunks(wire::MAX_RECEIPT_IDS) {
                let content = Content::Read {
                    peer: peer.to_owned(),
                    ids: chunk.to_vec(),
                };
                self.send_content(&me, content, now_ms)?;
            }
        }
        Ok(ids.len())
    }

    /// Turns read receipts on or off for this user: off, no read receipt
    /// leaves its devices and none it gets is shown (as in WhatsApp). The
    /// setting goes to this user's other devices too (end to end; the
    /// latest setting wins).
    ///
    /// # Errors
    /// Connection failures (the setting holds here; the other devices
    /// learn it with the next change).
    pub fn set_read_receipts(&mut self, on: bool) -> Result<(), Error> {
        let me = self.me()?;
        let now = self.unix_ms();
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.set_read_receipts(&mut batch, on, now)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        self.send_content(&me, Content::Settings { read_receipts: on }, now)?;
        Ok(())
    }

    /// The messages with id `id` on this device (usually one), each with
    /// what every device reported about it.
    ///
    /// # Errors
    /// [`Error::Usage`] if there is none; store errors.
    pub fn info(&self, id: MsgId) -> Result<Vec<(Message, Receipts, Vec<super::group::MemberState>)>, Error> {
        let h = self.profile.history();
        let found = h.find(&id)?;
        if found.is_empty() {
            return Err(Error::Usage(format!("no message {id} on this device")));
        }
        found
            .into_iter()
            .map(|m| {
                let r = h.receipts(&m.from, &m.id)?;
                let members = h.member_states(&m, &r)?;
                Ok((m, r, members))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::core::Event;
    use crate::client::message::Status;
    use crate::client::testing::{Fault, World};

    #[test]
    fn delivered_receipts_leave_once_stored_and_leave_the_outbox_on_done() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "hi").unwrap();
        World::sync(&mut bob);
        let receipts = w.server().receipts();
        assert_eq!(receipts.len(), 1);
        assert_eq!(
            (receipts[0].kind, receipts[0].to.as_str(), receipts[0].ids.clone()),
            (ReceiptKind::DELIVERED, "alice", vec![m.id])
        );
        assert!(bob.profile().history().outbox().unwrap().is_empty());
        let events = World::sync(&mut alice);
        assert!(
            matches!(&events[..], [Event::Receipt(r)] if r.id == m.id && r.status == Status::Delivered),
            "{events:?}"
        );
        assert_eq!(alice.history("bob").unwrap()[0].status, Status::Delivered);
    }

    #[test]
    fn a_refused_receipt_waits_in_the_outbox_for_the_next_connection() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        alice.send("bob", "hi").unwrap();
        w.server().fault("Receipt", Fault::Refuse(ErrorCode::QUOTA_EXCEEDED));
        World::sync(&mut bob);
        assert_eq!(bob.profile().history().outbox().unwrap().len(), 1, "kept");
        World::sync(&mut bob);
        assert!(bob.profile().history().outbox().unwrap().is_empty());
        assert_eq!(w.server().receipts().len(), 2, "refused once, then taken");
    }

    #[test]
    fn reading_sends_read_receipts_or_with_them_off_tells_only_the_users_own_devices() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m1 = alice.send("bob", "one").unwrap();
        World::sync(&mut bob);
        assert_eq!(bob.read("alice").unwrap(), 1);
        let last = w.server().receipts().pop().unwrap();
        assert_eq!((last.kind, last.ids), (ReceiptKind::READ, vec![m1.id]));
        assert_eq!(bob.read("alice").unwrap(), 0, "nothing unread");
        World::sync(&mut alice);
        assert_eq!(alice.history("bob").unwrap()[0].status, Status::Read);
        // Off: the setting goes to bob's own devices, and so does what he
        // reads, never to alice.
        bob.set_read_receipts(false).unwrap();
        assert_eq!(w.server().sends().last().unwrap().to, "bob");
        alice.send("bob", "two").unwrap();
        World::sync(&mut bob);
        let receipts_before = w.server().receipts().len();
        assert_eq!(bob.read("alice").unwrap(), 1);
        assert_eq!(w.server().receipts().len(), receipts_before, "no read receipt");
        assert_eq!(w.server().sends().last().unwrap().to, "bob");
        assert_eq!(bob.history("alice").unwrap()[1].status, Status::Read);
    }

    #[test]
    fn info_says_what_each_device_reported() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        let mut bob = w.user(&tmp.path().join("b"), "bob", true);
        let m = alice.send("bob", "hi").unwrap();
        World::sync(&mut bob);
        World::sync(&mut alice);
        let info = alice.info(m.id).unwrap();
        assert_eq!(info.len(), 1);
        let (_, r, _) = &info[0];
        assert_eq!(r.devices.len(), 1);
        assert!(r.devices[0].delivered_ms.is_some() && r.devices[0].read_ms.is_none());
        assert!(matches!(alice.info(MsgId([9; 16])), Err(Error::Usage(_))));
    }
}
