//! What arriving messages, status updates, receipts and notices, and the
//! user's own actions, do to the local history (spec §5.5, §10, §14.3).
//!
//! Every operation here reads the history and adds writes to a [`Batch`],
//! which the caller applies in one transaction (with the Olm state that
//! decrypted what caused it) and flushes before it acknowledges anything;
//! one process holds a profile, so reading first and writing after is
//! safe. Operations are idempotent: a redelivered update or receipt
//! changes nothing the second time.
//!
//! Rules it keeps:
//! - an edit or delete applies only to a message of the same user as the
//!   (end-to-end authenticated) sender of the edit, in the same
//!   conversation: messages are keyed by their sender, so a forged edit
//!   from someone else cannot name another user's message at all, and one
//!   for another conversation is ignored;
//! - an edit within [`EDIT_WINDOW`], a delete within [`DELETE_WINDOW`] of
//!   the message (with [`CLOCK_SLACK_MS`] for the sender's clock); the
//!   latest edit (by the sender's clock) wins;
//! - an edit of a message not (yet) here waits until it arrives; a delete
//!   of one not here leaves a deleted placeholder, so that the message
//!   shows as deleted and a late copy of it is dropped as a duplicate;
//! - a delete removes the text (earlier versions were overwritten by the
//!   edits), what the message quoted, that it was edited, and the quotes
//!   of it that replies carry;
//! - a receipt from user U counts only for messages sent to U (see
//!   [`super::status`]), one from another device of this user marks
//!   messages from its `to` read.
//!
//! What it does not do: talk to the server, or decide whether the user may
//! edit or delete (that is [`super::edit`], before it sends).

use serde::{Deserialize, Serialize};

use super::Error;
use super::history::{Batch, History, T, conv_prefix, decode, msg_key};
use super::message::{Direction, Message, Status};
use super::status::{Receipts, Report};
use crate::wire::{DeviceAddr, DeviceId, ExpiredNotice, MsgId, ReceiptDeliver, ReceiptKind};

/// How long after its sending a message may be edited: 15 minutes.
pub const EDIT_WINDOW_MS: u64 = 15 * 60 * 1000;
/// The same, as named in the docs.
pub const EDIT_WINDOW: std::time::Duration = std::time::Duration::from_millis(EDIT_WINDOW_MS);
/// How long after its sending a message may be deleted for everyone: 2
/// days.
pub const DELETE_WINDOW_MS: u64 = 2 * 24 * 3600 * 1000;
/// The same, as named in the docs.
pub const DELETE_WINDOW: std::time::Duration = std::time::Duration::from_millis(DELETE_WINDOW_MS);
/// What a receiving device allows for the sender's clock when it checks
/// those windows (the edit's time is the sender's clock; the message's is
/// the server's).
pub const CLOCK_SLACK_MS: u64 = 5 * 60 * 1000;

/// An edit waiting for the message it edits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEdit {
    /// The conversation's recipient user, as the edit said.
    pub to: String,
    /// The new text.
    pub text: String,
    /// When it was made (the sender's clock).
    pub ts_ms: u64,
}

/// What happened to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateKind {
    /// Its text changed.
    Edit,
    /// It was deleted for everyone.
    Delete,
}

impl UpdateKind {
    /// `"edit"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Edit => "edit",
            UpdateKind::Delete => "delete",
        }
    }
}

/// An edit or delete as it took effect here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Edit or delete.
    pub kind: UpdateKind,
    /// The message's id.
    pub id: MsgId,
    /// The message's sender (user), who made the change.
    pub from: String,
    /// The device that made the change.
    pub by_device: DeviceId,
    /// The message's recipient user.
    pub to: String,
    /// The new text (an edit); `None` for a delete.
    pub text: Option<String>,
    /// When the change was made (the server's time where known).
    pub ts_ms: u64,
}

/// What a receipt, notice or read on another device changed about one
/// message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptNews {
    /// The message's id.
    pub id: MsgId,
    /// Its sender (user).
    pub from: String,
    /// Its recipient user.
    pub to: String,
    /// Where the message stands now.
    pub status: Status,
    /// What was reported.
    pub report: Report,
    /// The reporting user.
    pub by: String,
    /// The reporting device.
    pub by_device: DeviceId,
    /// When (the server's time of the receipt, or this device's clock for
    /// an expiry notice).
    pub ts_ms: u64,
}

/// A reaction as it took effect here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The message's id.
    pub id: MsgId,
    /// The message's sender.
    pub from: String,
    /// Who reacted.
    pub by: String,
    /// The emoji, or `None` when the reaction was taken back.
    pub emoji: Option<String>,
    /// When (the reacting device's clock).
    pub ts_ms: u64,
}

/// The reactions to one message as stored: per user, the latest emoji (or
/// its removal) and when it was made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReactions {
    /// user → (emoji or removed, sender's clock).
    pub by: std::collections::BTreeMap<String, (Option<String>, u64)>,
}

/// The reaction records kept per message: at most this many users (a
/// conversation has two; the cap only bounds what a misbehaving device
/// can store).
pub const MAX_REACTING_USERS: usize = 16;

/// A receipt waiting to be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its key in the outbox.
    pub key: Vec<u8>,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// Who sent the message (the receipt's `to`).
    pub peer: String,
    /// The message.
    pub id: MsgId,
}

pub(super) fn outbox_key(kind: ReceiptKind, peer: &str, id: &MsgId) -> Vec<u8> {
    let mut k = vec![kind.0];
    k.extend_from_slice(&msg_key(peer, id));
    k
}

const READ_RECEIPTS: &[u8] = b"read_receipts";
const LAST_SEEN: &[u8] = b"last_seen";

fn damaged(what: &str, e: postcard::Error) -> Error {
    Error::Damaged(format!("{what}: {e}"))
}

impl History {
    /// Whether this user sends and shows read receipts (default: yes), and
    /// when that was set (ms, the setting device's clock; 0: never).
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn read_receipts(&self) -> Result<(bool, u64), Error> {
        match self.meta.get(READ_RECEIPTS)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| damaged("settings", e)),
            None => Ok((true, 0)),
        }
    }

    /// Sets the read-receipt setting as of `ts_ms` unless a later setting
    /// is stored (the latest wins across devices). Turning it off drops
    /// the read receipts not sent yet. Returns whether it changed.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn set_read_receipts(&self, batch: &mut Batch, on: bool, ts_ms: u64) -> Result<bool, Error> {
        let (was, at) = self.read_receipts()?;
        if ts_ms < at || (ts_ms == at && was == on) {
            return Ok(false);
        }
        let v = postcard::to_stdvec(&(on, ts_ms)).map_err(|e| damaged("settings", e))?;
        batch.put(T::Meta, READ_RECEIPTS.to_vec(), v);
        if !on {
            for e in self.outbox()? {
                if e.kind == ReceiptKind::READ {
                    batch.remove(T::Outbox, e.key);
                }
            }
        }
        Ok(was != on)
    }

    /// Whether everyone may see this user's presence (default: yes) or
    /// nobody, and when that was set (ms, the setting device's clock; 0:
    /// never).
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn last_seen(&self) -> Result<(bool, u64), Error> {
        match self.meta.get(LAST_SEEN)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| damaged("settings", e)),
            None => Ok((true, 0)),
        }
    }

    /// Sets who may see this user's presence as of `ts_ms`, unless a later
    /// setting is stored (the latest wins across devices). Returns whether
    /// it changed.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn set_last_seen(&self, batch: &mut Batch, everyone: bool, ts_ms: u64) -> Result<bool, Error> {
        let (was, at) = self.last_seen()?;
        if ts_ms < at || (ts_ms == at && was == everyone) {
            return Ok(false);
        }
        let v = postcard::to_stdvec(&(everyone, ts_ms)).map_err(|e| damaged("settings", e))?;
        batch.put(T::Meta, LAST_SEEN.to_vec(), v);
        Ok(was != everyone)
    }

    fn receipts_in(&self, batch: &Batch, key: &[u8]) -> Result<Receipts, Error> {
        match self.read(batch, T::Rcpt, key)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| damaged("receipt record", e)),
            None => Ok(Receipts::default()),
        }
    }

    fn put_receipts(&self, batch: &mut Batch, key: Vec<u8>, r: &Receipts) -> Result<(), Error> {
        let v = postcard::to_stdvec(r).map_err(|e| damaged("receipt record", e))?;
        batch.put(T::Rcpt, key, v);
        Ok(())
    }

    /// The status `m` (as stored) shows once `batch` is applied.
    fn status_in(&self, batch: &Batch, m: &Message) -> Result<Status, Error> {
        let r = self.receipts_in(batch, &msg_key(&m.from, &m.id))?;
        if m.to.starts_with('#') && m.direction == Direction::Out {
            return self.group_status(m, &r);
        }
        let peer = match m.direction {
            Direction::Out => &m.to,
            Direction::In => &m.from,
        };
        Ok(r.status(m.status, m.direction, peer))
    }

    /// Stores a message that arrived (text, reply, forward or
    /// undecryptable), unless this device has it; then an edit that
    /// waited for it applies, a quote of a deleted message loses its text,
    /// and a delivered receipt is queued for a message from another user.
    /// Returns the message as shown, if it is new.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn receive_message(
        &self,
        batch: &mut Batch,
        me: &str,
        mut m: Message,
    ) -> Result<Option<Message>, Error> {
        let key = msg_key(&m.from, &m.id);
        if self.read(batch, T::Msgs, &key)?.is_some() || self.read(batch, T::Seen, &key)?.is_some() {
            return Ok(None);
        }
        if let Some(v) = self.read(batch, T::Pending, &key)? {
            let edit: PendingEdit = postcard::from_bytes(&v).map_err(|e| damaged("pending edit", e))?;
            batch.remove(T::Pending, key.clone());
            if edit.to == m.to && edit.ts_ms <= m.ts_ms.saturating_add(EDIT_WINDOW_MS + CLOCK_SLACK_MS) {
                m.text = edit.text;
                m.undecryptable = false;
                m.edited_ms = Some(edit.ts_ms);
            }
        }
        if let (Some(id), Some(q)) = (m.reply_to, m.quote.as_mut())
            && let Some(quoted) = self.read_msg(batch, &q.from, &id)?
            && quoted.deleted
        {
            q.text = None;
        }
        if m.undecryptable
            && let Some(mut last) = self.last_in_conversation(batch, m.peer(me))?
            && last.undecryptable
            && !last.deleted
            && last.from == m.from
            && last.from_device == m.from_device
        {
            // More garbage from the same device, right after: one notice
            // with a count. (A redelivery of one of these, after a crash
            // before its ack, counts again: the count is at least what
            // came.)
            last.repeats = last.repeats.saturating_add(1);
            self.put_msg(batch, me, &last)?;
            return Ok(None);
        }
        self.put_msg(batch, me, &m)?;
        if m.direction == Direction::In && !m.undecryptable {
            batch.put(
                T::Outbox,
                outbox_key(ReceiptKind::DELIVERED, &super::group::receipt_peer(&m), &m.id),
                Vec::new(),
            );
        }
        m.status = self.status_in(batch, &m)?;
        m.reactions = self.reactions_shown(batch, &m)?;
        Ok(Some(m))
    }

    fn reactions_in(&self, batch: &Batch, key: &[u8]) -> Result<StoredReactions, Error> {
        match self.read(batch, T::React, key)? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| damaged("reactions", e)),
            None => Ok(StoredReactions::default()),
        }
    }

    /// The reactions shown on `m`: the latest of each party of its
    /// conversation that was not taken back (anyone else's are ignored).
    pub(super) fn reactions_of(&self, m: &Message) -> Result<std::collections::BTreeMap<String, String>, Error> {
        self.reactions_shown(&Batch::default(), m)
    }

    fn reactions_shown(&self, batch: &Batch, m: &Message) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let stored = self.reactions_in(batch, &msg_key(&m.from, &m.id))?;
        Ok(stored
            .by
            .into_iter()
            .filter(|(user, _)| *user == m.from || *user == m.to)
            .filter_map(|(user, (emoji, _))| emoji.map(|e| (user, e)))
            .collect())
    }

    /// Applies a reaction by `by` (the end-to-end sender's user) in its
    /// conversation with `to`, to the message `(target_from, target)`,
    /// made at `ts_ms` (the sender's clock). It counts only from a party
    /// of that message's conversation, and only if it is the latest from
    /// that user. Returns the change, or `None` if it was ignored or
    /// changed nothing.
    ///
    /// # Errors
    /// Store errors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn react(
        &self,
        batch: &mut Batch,
        by: &str,
        to: &str,
        target: MsgId,
        target_from: &str,
        emoji: Option<&str>,
        ts_ms: u64,
    ) -> Result<Option<Reaction>, Error> {
        if target_from != by && target_from != to {
            log::debug!("ignoring a reaction by {by} to a message of {target_from}, outside their conversation");
            return Ok(None);
        }
        if emoji.is_some_and(|e| !super::content::valid_emoji(e)) {
            log::info!("ignoring a reaction by {by} that is not one emoji");
            return Ok(None);
        }
        let key = msg_key(target_from, &target);
        if let Some(m) = self.read_msg(batch, target_from, &target)? {
            let parties = [m.from.as_str(), m.to.as_str()];
            if !parties.contains(&by) || !parties.contains(&to) || m.deleted {
                return Ok(None);
            }
        }
        let mut stored = self.reactions_in(batch, &key)?;
        if let Some((old, at)) = stored.by.get(by) {
            if *at > ts_ms || (*at == ts_ms && old.as_deref() == emoji) {
                return Ok(None);
            }
        } else if stored.by.len() >= MAX_REACTING_USERS {
            return Ok(None);
        }
        let before = stored.by.get(by).and_then(|(e, _)| e.clone());
        stored.by.insert(by.to_owned(), (emoji.map(str::to_owned), ts_ms));
        let v = postcard::to_stdvec(&stored).map_err(|e| damaged("reactions", e))?;
        batch.put(T::React, key, v);
        if before.as_deref() == emoji {
            return Ok(None);
        }
        Ok(Some(Reaction {
            id: target,
            from: target_from.to_owned(),
            by: by.to_owned(),
            emoji: emoji.map(str::to_owned),
            ts_ms,
        }))
    }

    /// The newest message of the conversation with `peer` (as stored), as
    /// it will be once `batch` is applied; `None` if the batch adds to the
    /// conversation (then it is not the newest any more) or it is empty.
    fn last_in_conversation(&self, batch: &Batch, peer: &str) -> Result<Option<Message>, Error> {
        if batch.touches(T::Conv) {
            return Ok(None);
        }
        match self.conv.scan_prefix(conv_prefix(peer)).next_back() {
            Some(entry) => {
                let (_, key) = entry?;
                self.read(batch, T::Msgs, &key)?.map(|v| decode(&v)).transpose()
            }
            None => Ok(None),
        }
    }

    /// Records that the delivery `(from, id)` was handled without a
    /// message to show.
    pub(super) fn mark_seen(&self, batch: &mut Batch, from: &str, id: &MsgId) {
        batch.put(T::Seen, msg_key(from, id), Vec::new());
    }

    /// Applies an edit by `from` (the end-to-end sender) of its user's
    /// message `target` to `to`, made at `ts_ms` by the sender's clock. A
    /// receiving device passes `check_window`: an edit made past the
    /// window is ignored. Returns the change, or `None` if it was
    /// ignored, stale, or waits for its message.
    ///
    /// # Errors
    /// Store errors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn edit(
        &self,
        batch: &mut Batch,
        me: &str,
        from: &DeviceAddr,
        target: MsgId,
        to: &str,
        text: &str,
        ts_ms: u64,
        check_window: bool,
    ) -> Result<Option<Update>, Error> {
        let key = msg_key(&from.user, &target);
        let Some(mut m) = self.read_msg(batch, &from.user, &target)? else {
            if self.read(batch, T::Seen, &key)?.is_some() {
                // A delivery that was not a message (an edit, a reset).
                return Ok(None);
            }
            let newer = match self.read(batch, T::Pending, &key)? {
                Some(v) => {
                    let p: PendingEdit = postcard::from_bytes(&v).map_err(|e| damaged("pending edit", e))?;
                    p.ts_ms > ts_ms
                }
                None => false,
            };
            if !newer {
                let p = PendingEdit {
                    to: to.to_owned(),
                    text: text.to_owned(),
                    ts_ms,
                };
                let v = postcard::to_stdvec(&p).map_err(|e| damaged("pending edit", e))?;
                batch.put(T::Pending, key, v);
            }
            return Ok(None);
        };
        if m.to != to || m.deleted {
            log::debug!(
                "ignoring an edit of {target} from {} for another conversation or a deleted message",
                from.user
            );
            return Ok(None);
        }
        if check_window && ts_ms > m.ts_ms.saturating_add(EDIT_WINDOW_MS + CLOCK_SLACK_MS) {
            log::info!("ignoring an edit of {target} from {}: past the edit window", from.user);
            return Ok(None);
        }
        if m.edited_ms.is_some_and(|t| t > ts_ms) {
            return Ok(None);
        }
        m.text = text.to_owned();
        m.undecryptable = false;
        m.edited_ms = Some(ts_ms);
        self.put_msg(batch, me, &m)?;
        Ok(Some(Update {
            kind: UpdateKind::Edit,
            id: target,
            from: from.user.clone(),
            by_device: from.device,
            to: to.to_owned(),
            text: Some(m.text),
            ts_ms,
        }))
    }

    /// Deletes for everyone `from`'s user's message `target` to `to`, on
    /// the word of `from` (the end-to-end sender) at `ts_ms` (the
    /// sender's clock) and `time_ms` (the server's). A receiving device
    /// passes `check_window`. Returns the change, or `None` if it was
    /// ignored or done already.
    ///
    /// # Errors
    /// Store errors.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn delete(
        &self,
        batch: &mut Batch,
        me: &str,
        from: &DeviceAddr,
        target: MsgId,
        to: &str,
        ts_ms: u64,
        time_ms: u64,
        check_window: bool,
    ) -> Result<Option<Update>, Error> {
        let key = msg_key(&from.user, &target);
        let m = match self.read_msg(batch, &from.user, &target)? {
            Some(mut m) => {
                if m.to != to || m.deleted {
                    return Ok(None);
                }
                if check_window && ts_ms > m.ts_ms.saturating_add(DELETE_WINDOW_MS + CLOCK_SLACK_MS) {
                    log::info!("ignoring a delete of {target} from {}: past the window", from.user);
                    return Ok(None);
                }
                m.text.clear();
                m.quote = None;
                m.reply_to = None;
                m.edited_ms = None;
                m.undecryptable = false;
                m.deleted = true;
                // Its file's key goes too: the file is not to be fetched.
                m.attachment = None;
                m
            }
            None => {
                if self.read(batch, T::Seen, &key)?.is_some() {
                    return Ok(None);
                }
                let out = from.user == me;
                Message {
                    id: target,
                    from: from.user.clone(),
                    from_device: from.device,
                    to: to.to_owned(),
                    ts_ms: time_ms,
                    direction: if out { Direction::Out } else { Direction::In },
                    status: if out { Status::Sent } else { Status::Received },
                    deleted: true,
                    ..Message::default()
                }
            }
        };
        self.put_msg(batch, me, &m)?;
        if self.read(batch, T::React, &key)?.is_some() {
            batch.remove(T::React, key.clone());
        }
        if self.read(batch, T::Pending, &key)?.is_some() {
            batch.remove(T::Pending, key);
        }
        // Replies keep no copy of what they quoted.
        for entry in self.conv.scan_prefix(conv_prefix(m.peer(me))) {
            let (_, k) = entry?;
            let Some(v) = self.read(batch, T::Msgs, &k)? else {
                continue;
            };
            let mut reply = decode(&v)?;
            if reply.reply_to == Some(target)
                && let Some(q) = reply.quote.as_mut()
                && q.from == from.user
                && q.text.is_some()
            {
                q.text = None;
                self.put_msg(batch, me, &reply)?;
            }
        }
        Ok(Some(Update {
            kind: UpdateKind::Delete,
            id: target,
            from: from.user.clone(),
            by_device: from.device,
            to: to.to_owned(),
            text: None,
            ts_ms: time_ms,
        }))
    }

    /// Marks the messages `ids` from `peer` read, on the word of this
    /// user's device `by` (a read receipt it sent, or a
    /// [`super::Content::Read`]).
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn read_elsewhere(
        &self,
        batch: &mut Batch,
        by: &DeviceAddr,
        peer: &str,
        ids: &[MsgId],
        at_ms: u64,
    ) -> Result<Vec<ReceiptNews>, Error> {
        let mut news = Vec::new();
        for id in ids {
            let key = msg_key(peer, id);
            let mut r = self.receipts_in(batch, &key)?;
            if !r.mark_read_here(at_ms) {
                continue;
            }
            self.put_receipts(batch, key.clone(), &r)?;
            // Read elsewhere: no need to say so from here too.
            let m = self.read_msg(batch, peer, id)?;
            let receipt_peer = m.as_ref().map_or_else(|| peer.to_owned(), super::group::receipt_peer);
            let ok = outbox_key(ReceiptKind::READ, &receipt_peer, id);
            if self.read(batch, T::Outbox, &ok)?.is_some() {
                batch.remove(T::Outbox, ok);
            }
            if let Some(m) = m {
                news.push(ReceiptNews {
                    id: *id,
                    from: m.from.clone(),
                    to: m.to.clone(),
                    status: self.status_in(batch, &m)?,
                    report: Report::Read,
                    by: by.user.clone(),
                    by_device: by.device,
                    ts_ms: at_ms,
                });
            }
        }
        Ok(news)
    }

    /// Applies a receipt from the queue (spec §5.5). From another user U:
    /// about this user's messages to U (a read receipt counts as delivered
    /// when `show_read` is off); from another device of this user: its
    /// read receipts mark messages from `to` read here. Other kinds are
    /// ignored. Returns what changed, for messages this device has.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn receive_receipt(
        &self,
        batch: &mut Batch,
        me: &str,
        r: &ReceiptDeliver,
        show_read: bool,
    ) -> Result<Vec<ReceiptNews>, Error> {
        if r.from.user == me {
            if r.kind == ReceiptKind::READ {
                return self.read_elsewhere(batch, &r.from, &r.to, &r.ids, r.time_ms);
            }
            return Ok(Vec::new());
        }
        if r.to != me {
            return Ok(Vec::new());
        }
        let report = match r.kind {
            ReceiptKind::DELIVERED => Report::Delivered,
            ReceiptKind::READ if show_read => Report::Read,
            ReceiptKind::READ => Report::Delivered,
            _ => return Ok(Vec::new()),
        };
        let mut news = Vec::new();
        for id in &r.ids {
            let m = self.read_msg(batch, me, id)?;
            if m.as_ref().is_some_and(|m| m.to != r.from.user) {
                // Not a message to the reporter: not its business.
                continue;
            }
            let key = msg_key(me, id);
            let mut receipts = self.receipts_in(batch, &key)?;
            if !receipts.merge(&r.from.user, r.from.device, report, r.time_ms) {
                continue;
            }
            self.put_receipts(batch, key, &receipts)?;
            if let Some(m) = m {
                news.push(ReceiptNews {
                    id: *id,
                    from: m.from.clone(),
                    to: m.to.clone(),
                    status: self.status_in(batch, &m)?,
                    report,
                    by: r.from.user.clone(),
                    by_device: r.from.device,
                    ts_ms: r.time_ms,
                });
            }
        }
        Ok(news)
    }

    /// Applies an expiry notice: this user's messages `ids` never reached
    /// `device` (spec §10), as of `now_ms`.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn receive_expired(
        &self,
        batch: &mut Batch,
        me: &str,
        n: &ExpiredNotice,
        now_ms: u64,
    ) -> Result<(), Error> {
        for id in &n.ids {
            let key = msg_key(me, id);
            let mut r = self.receipts_in(batch, &key)?;
            if r.merge(&n.device.user, n.device.device, Report::Expired, now_ms) {
                self.put_receipts(batch, key, &r)?;
            }
        }
        Ok(())
    }

    /// Marks every unread message from `peer` read as of `at_ms`, queueing
    /// read receipts for them if `receipts`. Returns their ids.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn mark_read(
        &self,
        batch: &mut Batch,
        peer: &str,
        at_ms: u64,
        receipts: bool,
    ) -> Result<Vec<MsgId>, Error> {
        let mut ids = Vec::new();
        for m in self.conversation(peer)? {
            if m.direction != Direction::In || m.status == Status::Read || m.from != peer {
                continue;
            }
            let key = msg_key(&m.from, &m.id);
            let mut r = self.receipts_in(batch, &key)?;
            r.mark_read_here(at_ms);
            self.put_receipts(batch, key, &r)?;
            if receipts && !m.undecryptable && !m.deleted {
                batch.put(T::Outbox, outbox_key(ReceiptKind::READ, peer, &m.id), Vec::new());
            }
            ids.push(m.id);
        }
        Ok(ids)
    }

    /// The receipts waiting to be sent.
    ///
    /// # Errors
    /// Store errors.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, Error> {
        let mut out = Vec::new();
        for entry in self.outbox.iter() {
            let (k, _) = entry?;
            // kind ‖ peer ‖ 0 ‖ id
            if k.len() < 1 + 1 + 16 || k[k.len() - 17] != 0 {
                continue;
            }
            let peer = String::from_utf8_lossy(&k[1..k.len() - 17]).into_owned();
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[k.len() - 16..]);
            out.push(OutboxEntry {
                key: k.to_vec(),
                kind: ReceiptKind(k[0]),
                peer,
                id: MsgId(id),
            });
        }
        Ok(out)
    }

    /// Removes sent receipts from the outbox.
    ///
    /// # Errors
    /// Store errors.
    pub fn outbox_done(&self, keys: &[Vec<u8>]) -> Result<(), Error> {
        for k in keys {
            self.outbox.remove(k)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::history::Writes;
    use crate::client::message::Quote;

    const T0: u64 = 1_800_000_000_000;

    fn addr(user: &str, device: u32) -> DeviceAddr {
        DeviceAddr {
            user: user.into(),
            device: DeviceId(device),
        }
    }

    fn text(id: u8, from: &str, to: &str, text: &str, me: &str) -> Message {
        let out = from == me;
        Message {
            id: MsgId([id; 16]),
            from: from.into(),
            from_device: DeviceId(1),
            to: to.into(),
            text: text.into(),
            ts_ms: T0,
            direction: if out { Direction::Out } else { Direction::In },
            status: if out { Status::Sent } else { Status::Received },
            ..Message::default()
        }
    }

    /// Runs `f` on a batch and applies it.
    fn with<R>(h: &History, f: impl FnOnce(&History, &mut Batch) -> R) -> R {
        let mut b = Batch::default();
        let r = f(h, &mut b);
        h.apply(b, Writes::new()).unwrap();
        r
    }

    fn receive(h: &History, m: Message) -> Option<Message> {
        with(h, |h, b| h.receive_message(b, "bob", m).unwrap())
    }

    #[test]
    fn edits_apply_to_the_senders_own_message_in_its_conversation_only() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let m = text(1, "alice", "bob", "hi", "bob");
        assert!(receive(&h, m.clone()).is_some());
        assert!(receive(&h, m.clone()).is_none(), "once");
        // A delivered receipt waits in the outbox.
        assert_eq!(h.outbox().unwrap().len(), 1);
        let edit = |h: &History, by: &DeviceAddr, to: &str, t: &str, ts: u64| {
            with(h, |h, b| h.edit(b, "bob", by, m.id, to, t, ts, true).unwrap())
        };
        // Someone else: their own (absent) message of that id, not alice's.
        assert_eq!(edit(&h, &addr("carol", 1), "bob", "forged", T0 + 1), None);
        // Alice, but for another conversation.
        assert_eq!(edit(&h, &addr("alice", 1), "carol", "elsewhere", T0 + 1), None);
        assert_eq!(h.get("alice", &m.id).unwrap().unwrap().text, "hi");
        // Alice from another device, in time: applies.
        let u = edit(&h, &addr("alice", 2), "bob", "hi!", T0 + 2).unwrap();
        assert_eq!(
            (u.kind, u.text.as_deref(), u.by_device),
            (UpdateKind::Edit, Some("hi!"), DeviceId(2))
        );
        // An older edit arriving late does not win.
        assert_eq!(edit(&h, &addr("alice", 1), "bob", "hi?", T0 + 1), None);
        // Past the window (and its slack): ignored.
        assert_eq!(
            edit(
                &h,
                &addr("alice", 1),
                "bob",
                "late",
                T0 + EDIT_WINDOW_MS + CLOCK_SLACK_MS + 1
            ),
            None
        );
        let got = h.get("alice", &m.id).unwrap().unwrap();
        assert_eq!((got.text.as_str(), got.edited_ms), ("hi!", Some(T0 + 2)));
        // Carol's forgery was kept as an edit waiting for a message of
        // carol's that never comes; it shows nowhere.
        assert!(h.conversation("carol").unwrap().is_empty());
    }

    #[test]
    fn an_edit_before_its_message_waits_for_it() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let m = text(2, "alice", "bob", "first", "bob");
        let u = with(&h, |h, b| {
            h.edit(b, "bob", &addr("alice", 1), m.id, "bob", "second", T0 + 5, true)
                .unwrap()
        });
        assert_eq!(u, None);
        assert!(h.conversation("alice").unwrap().is_empty());
        let shown = receive(&h, m.clone()).unwrap();
        assert_eq!((shown.text.as_str(), shown.edited()), ("second", true));
        assert!(h.pending.is_empty());
    }

    #[test]
    fn deletes_drop_the_text_and_quotes_and_leave_a_placeholder_for_late_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let m = text(3, "alice", "bob", "secret", "bob");
        receive(&h, m.clone());
        let mut reply = text(4, "bob", "alice", "what secret?", "bob");
        reply.reply_to = Some(m.id);
        reply.quote = Some(Quote {
            from: "alice".into(),
            text: Some("secret".into()),
        });
        with(&h, |h, b| h.put_msg(b, "bob", &reply).unwrap());
        let delete = |h: &History, by: &DeviceAddr, id: MsgId, ts: u64| {
            with(h, |h, b| h.delete(b, "bob", by, id, "bob", ts, ts, true).unwrap())
        };
        // Bob cannot delete alice's message (he names his own, absent one:
        // a deleted placeholder of his, which harms nothing).
        assert!(delete(&h, &addr("carol", 1), m.id, T0).is_some());
        assert_eq!(h.get("alice", &m.id).unwrap().unwrap().text, "secret");
        // Past the window: ignored.
        assert_eq!(
            delete(&h, &addr("alice", 1), m.id, T0 + DELETE_WINDOW_MS + CLOCK_SLACK_MS + 1),
            None
        );
        let u = delete(&h, &addr("alice", 1), m.id, T0 + 1).unwrap();
        assert_eq!((u.kind, u.text), (UpdateKind::Delete, None));
        assert_eq!(delete(&h, &addr("alice", 1), m.id, T0 + 2), None, "once");
        let got = h.get("alice", &m.id).unwrap().unwrap();
        assert!(got.deleted && got.text.is_empty() && !got.edited());
        // The reply's stored quote is gone too, not only hidden.
        let raw = decode(&h.msgs.get(msg_key("bob", &reply.id)).unwrap().unwrap()).unwrap();
        assert_eq!(raw.quote.unwrap().text, None);
        assert!(
            !h.conversation("alice")
                .unwrap()
                .iter()
                .any(|m| m.text == "secret" || m.quote.as_ref().is_some_and(|q| q.text.is_some()))
        );
        // A message deleted before it got here: a placeholder, and a late
        // copy of it is a duplicate.
        let late = text(5, "alice", "bob", "never seen", "bob");
        assert!(delete(&h, &addr("alice", 2), late.id, T0).is_some());
        assert!(h.get("alice", &late.id).unwrap().unwrap().deleted);
        assert!(receive(&h, late).is_none());
        // A reply that comes after the delete keeps no copy of the quote.
        let mut reply2 = text(6, "alice", "bob", "forget it", "bob");
        reply2.reply_to = Some(m.id);
        reply2.quote = Some(Quote {
            from: "alice".into(),
            text: Some("secret".into()),
        });
        let shown = receive(&h, reply2).unwrap();
        assert_eq!(shown.quote.unwrap().text, None);
    }

    #[test]
    fn receipts_touch_only_messages_to_the_reporter_and_sync_reads_across_devices() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        // Bob's view: a message he sent alice, and one alice sent him.
        let mine = text(7, "bob", "alice", "to alice", "bob");
        let theirs = text(8, "alice", "bob", "to bob", "bob");
        with(&h, |h, b| h.put_msg(b, "bob", &mine).unwrap());
        receive(&h, theirs.clone());
        let receipt = |from: DeviceAddr, to: &str, kind: ReceiptKind, ids: Vec<MsgId>| ReceiptDeliver {
            seq: 1,
            from,
            to: to.into(),
            kind,
            ids,
            time_ms: T0 + 10,
        };
        // Carol cannot mark bob's message to alice read.
        let r = receipt(addr("carol", 1), "bob", ReceiptKind::READ, vec![mine.id]);
        assert!(with(&h, |h, b| h.receive_receipt(b, "bob", &r, true).unwrap()).is_empty());
        assert_eq!(h.get("bob", &mine.id).unwrap().unwrap().status, Status::Sent);
        // Alice can; with read receipts off it counts as delivered.
        let r = receipt(addr("alice", 1), "bob", ReceiptKind::READ, vec![mine.id]);
        let news = with(&h, |h, b| h.receive_receipt(b, "bob", &r, false).unwrap());
        assert_eq!(news.len(), 1);
        assert_eq!((news[0].status, news[0].report), (Status::Delivered, Report::Delivered));
        let news = with(&h, |h, b| h.receive_receipt(b, "bob", &r, true).unwrap());
        assert_eq!(news[0].status, Status::Read);
        assert!(
            with(&h, |h, b| h.receive_receipt(b, "bob", &r, true).unwrap()).is_empty(),
            "once"
        );
        // Unknown kinds are ignored (and acked by the caller).
        let r = receipt(addr("alice", 1), "bob", ReceiptKind(9), vec![mine.id]);
        assert!(with(&h, |h, b| h.receive_receipt(b, "bob", &r, true).unwrap()).is_empty());
        // Bob's other device read alice's message.
        assert_eq!(h.get("alice", &theirs.id).unwrap().unwrap().status, Status::Received);
        let r = receipt(addr("bob", 2), "alice", ReceiptKind::READ, vec![theirs.id]);
        let news = with(&h, |h, b| h.receive_receipt(b, "bob", &r, true).unwrap());
        assert_eq!((news[0].status, news[0].by.as_str()), (Status::Read, "bob"));
        assert_eq!(h.get("alice", &theirs.id).unwrap().unwrap().status, Status::Read);
        // Nothing left to mark read here, then.
        assert!(with(&h, |h, b| h.mark_read(b, "alice", T0, true).unwrap()).is_empty());
        // Expiry: per device, the status unchanged.
        let n = ExpiredNotice {
            seq: 2,
            device: addr("alice", 2),
            ids: vec![mine.id],
        };
        with(&h, |h, b| h.receive_expired(b, "bob", &n, T0).unwrap());
        let r = h.receipts("bob", &mine.id).unwrap();
        assert_eq!(
            r.devices.iter().map(|d| (d.device.0, d.state())).collect::<Vec<_>>(),
            [
                (1, super::super::status::DeviceState::Read),
                (2, super::super::status::DeviceState::Expired)
            ]
        );
    }

    #[test]
    fn read_marks_and_queues_receipts_and_settings_take_the_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        for i in 10..13 {
            receive(&h, text(i, "alice", "bob", "x", "bob"));
        }
        let ids = with(&h, |h, b| h.mark_read(b, "alice", T0, true).unwrap());
        assert_eq!(ids.len(), 3);
        let kinds: Vec<u8> = h.outbox().unwrap().iter().map(|e| e.kind.0).collect();
        assert_eq!(kinds.iter().filter(|k| **k == 2).count(), 3);
        assert_eq!(h.read_receipts().unwrap(), (true, 0));
        // Off drops the read receipts not sent yet.
        assert!(with(&h, |h, b| h.set_read_receipts(b, false, 5).unwrap()));
        assert!(h.outbox().unwrap().iter().all(|e| e.kind == ReceiptKind::DELIVERED));
        // An older setting from another device loses.
        assert!(!with(&h, |h, b| h.set_read_receipts(b, true, 4).unwrap()));
        assert_eq!(h.read_receipts().unwrap(), (false, 5));
        assert!(with(&h, |h, b| h.set_read_receipts(b, true, 6).unwrap()));
        assert_eq!(h.read_receipts().unwrap(), (true, 6));
        let keys: Vec<Vec<u8>> = h.outbox().unwrap().into_iter().map(|e| e.key).collect();
        h.outbox_done(&keys).unwrap();
        assert!(h.outbox().unwrap().is_empty());
    }

    #[test]
    fn undecryptable_messages_in_a_row_from_one_device_are_one_notice_with_a_count() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let garbage = |id: u8, device: u32| Message {
            undecryptable: true,
            from_device: DeviceId(device),
            ..text(id, "alice", "bob", "", "bob")
        };
        assert!(receive(&h, garbage(20, 1)).is_some(), "the first is shown");
        for id in 21..30 {
            assert!(receive(&h, garbage(id, 1)).is_none(), "the rest count");
        }
        let conv = h.conversation("alice").unwrap();
        assert_eq!(conv.len(), 1);
        assert_eq!((conv[0].id, conv[0].repeats), (MsgId([20; 16]), 9));
        // Another device's garbage, or anything in between, starts anew.
        assert!(receive(&h, garbage(30, 2)).is_some());
        assert!(receive(&h, text(31, "alice", "bob", "real", "bob")).is_some());
        assert!(receive(&h, garbage(32, 1)).is_some());
        assert!(receive(&h, garbage(33, 1)).is_none());
        let counts: Vec<(bool, u32)> = h
            .conversation("alice")
            .unwrap()
            .iter()
            .map(|m| (m.undecryptable, m.repeats))
            .collect();
        assert_eq!(counts, [(true, 9), (true, 0), (false, 0), (true, 1)]);
        // No receipts for garbage.
        assert_eq!(h.outbox().unwrap().len(), 1);
    }

    #[test]
    fn the_latest_reaction_of_each_user_wins_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let m = text(40, "alice", "bob", "x", "bob");
        receive(&h, m.clone());
        let react = |h: &History, by: &str, to: &str, e: Option<&str>, ts: u64| {
            with(h, |h, b| h.react(b, by, to, m.id, "alice", e, ts).unwrap())
        };
        assert!(react(&h, "alice", "bob", Some("👍"), 10).is_some());
        assert!(react(&h, "alice", "bob", Some("😂"), 5).is_none(), "older");
        assert!(react(&h, "alice", "bob", Some("👍"), 10).is_none(), "again");
        assert!(react(&h, "bob", "alice", Some("❤️"), 7).is_some());
        let r = &h.get("alice", &m.id).unwrap().unwrap().reactions;
        assert_eq!((r["alice"].as_str(), r["bob"].as_str()), ("👍", "❤️"));
        assert!(react(&h, "bob", "alice", None, 8).is_some());
        assert!(
            react(&h, "bob", "alice", Some("❤️"), 7).is_none(),
            "the removal is newer"
        );
        assert_eq!(h.get("alice", &m.id).unwrap().unwrap().reactions.len(), 1);
        // From outside the conversation, or not an emoji: ignored.
        assert!(react(&h, "carol", "bob", Some("👍"), 20).is_none());
        assert!(react(&h, "alice", "bob", Some("no"), 30).is_none());
        // A reaction before its message counts once it arrives.
        let later = text(41, "alice", "bob", "y", "bob");
        with(&h, |h, b| {
            h.react(b, "bob", "alice", later.id, "alice", Some("🎉"), 1).unwrap()
        });
        let shown = receive(&h, later).unwrap();
        assert_eq!(shown.reactions["bob"], "🎉");
    }
}
