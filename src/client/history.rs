//! The local history store: every message, its state, and the device's
//! end-to-end state, in one `sled` database (the profile's `history/`).
//!
//! This is the only module that knows `sled`: the rest of the client sees
//! [`History`], [`Batch`] (writes that go to disk together), [`E2eStore`]
//! (the end-to-end state's records, see [`super::e2e`]) and
//! [`StoreError`].
//!
//! Trees: `msgs` (messages by sender and id), `conv` (each conversation in
//! arrival order), `seen` (deliveries handled without a message to show),
//! `rcpt` (what receipts said), `outbox` (receipts to send), `pending`
//! (edits waiting for their message), `meta` (settings) and `e2e` (the Olm
//! account and sessions, written only through [`E2eStore`] or with a
//! [`Batch`]).
//!
//! Guarantees: [`History::apply`] and [`History::commit`] write a batch of
//! history changes and the end-to-end state changes that came with them in
//! one transaction; [`History::flush`] makes everything durable, and
//! callers ack only after it. Stored messages are versioned ([`Stored`]):
//! every older record still reads. What it does not do: decide what an
//! arriving message does to the history ([`super::updates`]), or hold the
//! profile's lock ([`super::profile`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Error;
use super::attachment::Attachment;
use super::message::{Direction, Message, Quote, Status};
use super::status::Receipts;
use crate::wire::{DeviceId, MsgId};

/// The local database failed (I/O, or damage `sled` detected).
#[derive(Debug)]
pub struct StoreError(sled::Error);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[doc(hidden)]
impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Store(StoreError(e))
    }
}

fn transaction_error(e: sled::transaction::TransactionError<()>) -> Error {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(()) => Error::Damaged("history transaction aborted".into()),
    }
}

/// Pending record writes (`None` deletes), by key in the end-to-end tree.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Records as (key, value) pairs, in key order.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// The end-to-end state's records (the `e2e` tree): what [`super::e2e`]
/// reads and writes, without knowing how it is stored.
#[derive(Clone)]
pub struct E2eStore {
    tree: sled::Tree,
}

impl E2eStore {
    /// A record.
    ///
    /// # Errors
    /// Store errors.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.tree.get(key.as_ref())?.map(|v| v.to_vec()))
    }

    /// The records whose keys start with `prefix`, in key order.
    ///
    /// # Errors
    /// Store errors.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Records, Error> {
        self.tree
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Error::from))
            .collect()
    }

    /// Applies `writes` at once (atomically), without flushing.
    ///
    /// # Errors
    /// Store errors.
    pub fn apply(&self, writes: Writes) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes every write so far durable.
    ///
    /// # Errors
    /// Store errors.
    pub fn flush(&self) -> Result<(), Error> {
        self.tree.flush()?;
        Ok(())
    }

    /// Removes every record (tests: a device that lost its state).
    ///
    /// # Errors
    /// Store errors.
    #[doc(hidden)]
    pub fn clear_for_test(&self) -> Result<(), Error> {
        self.tree.clear()?;
        Ok(())
    }
}

/// A message as stored before end-to-end encryption.
#[derive(Serialize, Deserialize)]
struct MessageV1 {
    id: MsgId,
    from: String,
    from_device: DeviceId,
    to: String,
    text: String,
    ts_ms: u64,
    direction: Direction,
    status: Status,
}

/// A message as stored before replies, forwards, edits and deletes.
#[derive(Serialize, Deserialize)]
struct MessageV2 {
    id: MsgId,
    from: String,
    from_device: DeviceId,
    to: String,
    text: String,
    ts_ms: u64,
    direction: Direction,
    status: Status,
    undecryptable: bool,
}

/// A message as stored since replies, forwards, edits and deletes.
#[derive(Serialize, Deserialize)]
struct MessageV3 {
    id: MsgId,
    from: String,
    from_device: DeviceId,
    to: String,
    text: String,
    ts_ms: u64,
    direction: Direction,
    status: Status,
    undecryptable: bool,
    reply_to: Option<MsgId>,
    quote: Option<Quote>,
    forwards: u32,
    edited_ms: Option<u64>,
    deleted: bool,
}

/// A message as stored since undecryptable messages collapse into one
/// notice with a count.
#[derive(Serialize, Deserialize)]
struct MessageV4 {
    id: MsgId,
    from: String,
    from_device: DeviceId,
    to: String,
    text: String,
    ts_ms: u64,
    direction: Direction,
    status: Status,
    undecryptable: bool,
    repeats: u32,
    reply_to: Option<MsgId>,
    quote: Option<Quote>,
    forwards: u32,
    edited_ms: Option<u64>,
    deleted: bool,
}

/// A message as stored since files: [`MessageV4`] and its attachment.
#[derive(Serialize, Deserialize)]
struct MessageV5 {
    id: MsgId,
    from: String,
    from_device: DeviceId,
    to: String,
    text: String,
    ts_ms: u64,
    direction: Direction,
    status: Status,
    undecryptable: bool,
    repeats: u32,
    reply_to: Option<MsgId>,
    quote: Option<Quote>,
    forwards: u32,
    edited_ms: Option<u64>,
    deleted: bool,
    attachment: Option<Box<Attachment>>,
}

/// Stored form of a message; the tag is the version. Append-only: a new
/// version is a new variant, and every older one still decodes (records
/// are rewritten in the newest form only when they change).
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(MessageV1),
    V2(MessageV2),
    V3(MessageV3),
    V4(MessageV4),
    V5(MessageV5),
}

fn encode(m: &Message) -> Result<Vec<u8>, Error> {
    let v = MessageV5 {
        id: m.id,
        from: m.from.clone(),
        from_device: m.from_device,
        to: m.to.clone(),
        text: m.text.clone(),
        ts_ms: m.ts_ms,
        direction: m.direction,
        status: m.status,
        undecryptable: m.undecryptable,
        repeats: m.repeats,
        reply_to: m.reply_to,
        quote: m.quote.clone(),
        forwards: m.forwards,
        edited_ms: m.edited_ms,
        deleted: m.deleted,
        attachment: m.attachment.clone(),
    };
    postcard::to_stdvec(&Stored::V5(v)).map_err(|e| Error::Damaged(e.to_string()))
}

/// One conversation, as a list of chats shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// The other user.
    pub peer: String,
    /// Its newest message.
    pub last: Message,
    /// How many of the peer's messages are not read yet.
    pub unread: usize,
}

/// The local history: messages by (sender, id) for dedup and state, and
/// by conversation in arrival order.
#[derive(Clone)]
pub struct History {
    pub(super) db: sled::Db,
    /// `from ‖ 0 ‖ id` → [`Stored`].
    pub(super) msgs: sled::Tree,
    /// `peer ‖ 0 ‖ local seq (u64 BE)` → key in `msgs`.
    pub(super) conv: sled::Tree,
    /// `from ‖ 0 ‖ id` → empty: deliveries that are not shown (session
    /// resets, edits, deletes, settings), kept so that a redelivery is
    /// recognised.
    pub(super) seen: sled::Tree,
    /// `from ‖ 0 ‖ id` → postcard [`super::status::Receipts`]: what
    /// receipts and expiry notices said about a message (kept apart from
    /// it, so that one arriving before the message counts too).
    pub(super) rcpt: sled::Tree,
    /// `kind ‖ peer ‖ 0 ‖ id` → empty: receipts to send (written with
    /// what they report, removed once the server answered `Done`).
    pub(super) outbox: sled::Tree,
    /// `from ‖ 0 ‖ id` → postcard [`super::updates::PendingEdit`]: edits
    /// of messages this device does not have (yet).
    pub(super) pending: sled::Tree,
    /// Settings: `read_receipts` → postcard `(bool, ms)`.
    pub(super) meta: sled::Tree,
    /// The end-to-end state (see [`E2eStore`]).
    e2e: sled::Tree,
    /// `from ‖ 0 ‖ id` → postcard [`super::updates::StoredReactions`]:
    /// reactions to a message, by user (kept apart from it, so that one
    /// arriving before the message counts too).
    pub(super) react: sled::Tree,
}

/// The trees of a [`History`], for a [`Batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum T {
    Msgs = 0,
    Conv = 1,
    Seen = 2,
    Rcpt = 3,
    Outbox = 4,
    Pending = 5,
    Meta = 6,
    E2e = 7,
    React = 8,
}

/// Writes to the history that go to disk together (see
/// [`History::apply`]); reads through `History::read` see them.
#[derive(Default, Debug)]
pub struct Batch {
    writes: Vec<(T, Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub(super) fn put(&mut self, tree: T, key: Vec<u8>, value: Vec<u8>) {
        self.writes.push((tree, key, Some(value)));
    }

    pub(super) fn remove(&mut self, tree: T, key: Vec<u8>) {
        self.writes.push((tree, key, None));
    }

    /// Whether it writes to `tree`.
    pub(super) fn touches(&self, tree: T) -> bool {
        self.writes.iter().any(|(t, _, _)| *t == tree)
    }

    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

pub(super) fn msg_key(from: &str, id: &MsgId) -> Vec<u8> {
    let mut k = Vec::with_capacity(from.len() + 17);
    k.extend_from_slice(from.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

pub(super) fn conv_prefix(peer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(peer.len() + 9);
    k.extend_from_slice(peer.as_bytes());
    k.push(0);
    k
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

impl History {
    /// Opens the history database in `path`.
    ///
    /// # Errors
    /// Store errors.
    pub fn open(path: &Path) -> Result<History, Error> {
        // sled takes its own file lock, which a process that just let go
        // of the profile may hold for a moment longer while it shuts down.
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            match sled::Config::new().path(path).cache_capacity(8 << 20).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let msgs = db.open_tree("msgs")?;
        let conv = db.open_tree("conv")?;
        let seen = db.open_tree("seen")?;
        let rcpt = db.open_tree("rcpt")?;
        let outbox = db.open_tree("outbox")?;
        let pending = db.open_tree("pending")?;
        let meta = db.open_tree("meta")?;
        let e2e = db.open_tree("e2e")?;
        let react = db.open_tree("react")?;
        Ok(History {
            db,
            msgs,
            conv,
            seen,
            rcpt,
            outbox,
            pending,
            meta,
            e2e,
            react,
        })
    }

    /// The end-to-end state's records.
    pub fn e2e(&self) -> E2eStore {
        E2eStore { tree: self.e2e.clone() }
    }

    fn tree(&self, t: T) -> &sled::Tree {
        match t {
            T::Msgs => &self.msgs,
            T::Conv => &self.conv,
            T::Seen => &self.seen,
            T::Rcpt => &self.rcpt,
            T::Outbox => &self.outbox,
            T::Pending => &self.pending,
            T::Meta => &self.meta,
            T::E2e => &self.e2e,
            T::React => &self.react,
        }
    }

    /// A value as it will be once `batch` is applied.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn read(&self, batch: &Batch, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        if let Some((_, _, v)) = batch.writes.iter().rev().find(|(tt, k, _)| *tt == t && k == key) {
            return Ok(v.clone());
        }
        Ok(self.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    /// A stored message as it will be once `batch` is applied (as
    /// stored: no receipts merged in).
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub(super) fn read_msg(&self, batch: &Batch, from: &str, id: &MsgId) -> Result<Option<Message>, Error> {
        self.read(batch, T::Msgs, &msg_key(from, id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Adds the writes that store `m` (an existing record is replaced;
    /// a new one joins the end of its conversation).
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn put_msg(&self, batch: &mut Batch, me: &str, m: &Message) -> Result<(), Error> {
        let key = msg_key(&m.from, &m.id);
        if self.read(batch, T::Msgs, &key)?.is_none() {
            let mut ck = conv_prefix(m.peer(me));
            ck.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
            batch.put(T::Conv, ck, key.clone());
        }
        batch.put(T::Msgs, key, encode(m)?);
        Ok(())
    }

    /// Applies `batch`, and the end-to-end state `writes`, in one
    /// transaction. Not durable until [`History::flush`].
    ///
    /// # Errors
    /// Store errors.
    pub fn apply(&self, batch: Batch, writes: Writes) -> Result<(), Error> {
        use sled::Transactional;
        use sled::transaction::ConflictableTransactionError;
        let trees = [
            &self.msgs,
            &self.conv,
            &self.seen,
            &self.rcpt,
            &self.outbox,
            &self.pending,
            &self.meta,
            &self.e2e,
            &self.react,
        ];
        trees
            .as_slice()
            .transaction(|t| {
                for (tree, k, v) in &batch.writes {
                    let tree = &t[*tree as usize];
                    match v {
                        Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                        None => tree.remove(k.as_slice())?,
                    };
                }
                let e2e = &t[T::E2e as usize];
                for (k, v) in &writes {
                    match v {
                        Some(v) => e2e.insert(k.as_slice(), v.as_slice())?,
                        None => e2e.remove(k.as_slice())?,
                    };
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)
    }

    /// Whether a delivery from `from` with `id` was stored already (shown
    /// or not).
    ///
    /// # Errors
    /// Store errors.
    pub fn has(&self, from: &str, id: &MsgId) -> Result<bool, Error> {
        let key = msg_key(from, id);
        Ok(self.msgs.contains_key(&key)? || self.seen.contains_key(&key)?)
    }

    /// In one transaction: adds `msg` (unless one from the same sender
    /// with the same id is there; see [`History::insert`]), or with
    /// `msg: None` records that the delivery `(from, id)` was handled; and
    /// applies the end-to-end state `writes`. Returns
    /// whether the message was new. Not durable until [`History::flush`].
    ///
    /// # Errors
    /// Store errors.
    pub fn commit(
        &self,
        me: &str,
        msg: Option<&Message>,
        handled: (&str, &MsgId),
        writes: Writes,
    ) -> Result<bool, Error> {
        use sled::Transactional;
        use sled::transaction::ConflictableTransactionError;
        let value = match msg {
            Some(m) => Some(encode(m)?),
            None => None,
        };
        let key = msg_key(handled.0, handled.1);
        let result = (&self.msgs, &self.conv, &self.seen, &self.e2e).transaction(|(msgs, conv, seen, e2e)| {
            for (k, v) in &writes {
                match v {
                    Some(v) => e2e.insert(k.as_slice(), v.as_slice())?,
                    None => e2e.remove(k.as_slice())?,
                };
            }
            let (Some(m), Some(value)) = (msg, &value) else {
                seen.insert(key.as_slice(), &[][..])?;
                return Ok(true);
            };
            if msgs.get(&key)?.is_some() {
                return Ok(false);
            }
            msgs.insert(key.as_slice(), value.as_slice())?;
            let mut ck = conv_prefix(m.peer(me));
            ck.extend_from_slice(&conv.generate_id()?.to_be_bytes());
            conv.insert(ck, key.as_slice())?;
            Ok::<_, ConflictableTransactionError<()>>(true)
        });
        result.map_err(transaction_error)
    }

    /// Adds a message to the conversation with its peer unless one from
    /// the same sender with the same id is there. Returns whether it was
    /// new. Not durable until [`History::flush`].
    ///
    /// # Errors
    /// Store errors.
    pub fn insert(&self, me: &str, msg: &Message) -> Result<bool, Error> {
        let key = msg_key(&msg.from, &msg.id);
        let value = encode(msg)?;
        if self
            .msgs
            .compare_and_swap(&key, None as Option<&[u8]>, Some(value))?
            .is_err()
        {
            return Ok(false);
        }
        let mut ck = conv_prefix(msg.peer(me));
        ck.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.conv.insert(ck, key)?;
        Ok(true)
    }

    /// A stored message.
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn get(&self, from: &str, id: &MsgId) -> Result<Option<Message>, Error> {
        match self.msgs.get(msg_key(from, id))? {
            Some(v) => Ok(Some(self.view(decode(&v)?)?)),
            None => Ok(None),
        }
    }

    /// The stored messages with id `id`, whoever sent them (ids are chosen
    /// by senders, so two senders may have picked the same one).
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn find(&self, id: &MsgId) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        for entry in self.msgs.iter() {
            let (k, v) = entry?;
            if k.ends_with(&id.0) && k.len() > 16 && k[k.len() - 17] == 0 {
                out.push(self.view(decode(&v)?)?);
            }
        }
        Ok(out)
    }

    /// What receipts and expiry notices said about the message `(from, id)`.
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn receipts(&self, from: &str, id: &MsgId) -> Result<Receipts, Error> {
        match self.rcpt.get(msg_key(from, id))? {
            Some(v) => postcard::from_bytes(&v).map_err(|e| Error::Damaged(format!("receipt record: {e}"))),
            None => Ok(Receipts::default()),
        }
    }

    /// A stored message as it is shown: with what receipts said merged
    /// into its status, and the quoted message's current text.
    fn view(&self, mut m: Message) -> Result<Message, Error> {
        let receipts = self.receipts(&m.from, &m.id)?;
        let peer = match m.direction {
            Direction::Out => m.to.clone(),
            Direction::In => m.from.clone(),
        };
        m.status = if m.to.starts_with('#') && m.direction == Direction::Out {
            self.group_status(&m, &receipts)?
        } else {
            receipts.status(m.status, m.direction, &peer)
        };
        m.reactions = self.reactions_of(&m)?;
        if let (Some(id), Some(q)) = (m.reply_to, m.quote.as_mut())
            && let Some(v) = self.msgs.get(msg_key(&q.from, &id))?
        {
            let quoted = decode(&v)?;
            if quoted.deleted {
                q.text = None;
            } else if !quoted.undecryptable {
                q.text = Some(quoted.text);
            }
        }
        Ok(m)
    }

    /// Sets the status (and the server's time) of a stored message.
    ///
    /// # Errors
    /// Store errors.
    pub fn set_status(&self, from: &str, id: &MsgId, status: Status, ts_ms: Option<u64>) -> Result<(), Error> {
        let key = msg_key(from, id);
        if let Some(v) = self.msgs.get(&key)? {
            let mut m = decode(&v)?;
            m.status = status;
            if let Some(ts) = ts_ms {
                m.ts_ms = ts;
            }
            let value = encode(&m)?;
            self.msgs.insert(key, value)?;
        }
        Ok(())
    }

    /// Removes a message that the server refused for good.
    ///
    /// # Errors
    /// Store errors.
    pub fn remove(&self, me: &str, from: &str, id: &MsgId) -> Result<(), Error> {
        let key = msg_key(from, id);
        if let Some(v) = self.msgs.remove(&key)? {
            let m = decode(&v)?;
            for entry in self.conv.scan_prefix(conv_prefix(m.peer(me))) {
                let (k, v) = entry?;
                if v == key.as_slice() {
                    self.conv.remove(k)?;
                }
            }
        }
        Ok(())
    }

    /// The conversation with `peer`, oldest first.
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn conversation(&self, peer: &str) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        for entry in self.conv.scan_prefix(conv_prefix(peer)) {
            let (_, key) = entry?;
            if let Some(v) = self.msgs.get(key)? {
                out.push(self.view(decode(&v)?)?);
            }
        }
        Ok(out)
    }

    /// Every conversation: its peer, newest message and how many of the
    /// peer's messages are unread, the most recent conversation first.
    ///
    /// # Errors
    /// Store errors; a damaged record.
    pub fn conversations(&self) -> Result<Vec<Conversation>, Error> {
        let mut out: Vec<Conversation> = Vec::new();
        for entry in self.conv.iter() {
            let (ck, key) = entry?;
            let Some(end) = ck.iter().position(|b| *b == 0) else {
                continue;
            };
            let peer = String::from_utf8_lossy(&ck[..end]).into_owned();
            let Some(v) = self.msgs.get(&key)? else { continue };
            let m = self.view(decode(&v)?)?;
            let unread = usize::from(m.direction == Direction::In && m.status != Status::Read && !m.deleted);
            match out.last_mut() {
                Some(c) if c.peer == peer => {
                    c.unread += unread;
                    c.last = m;
                }
                _ => out.push(Conversation { peer, last: m, unread }),
            }
        }
        out.sort_by(|a, b| b.last.ts_ms.cmp(&a.last.ts_ms).then_with(|| a.peer.cmp(&b.peer)));
        Ok(out)
    }

    /// Outgoing messages still pending, oldest first.
    ///
    /// # Errors
    /// Store errors.
    pub fn pending(&self) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        for entry in self.msgs.iter() {
            let (_, v) = entry?;
            let m = decode(&v)?;
            if m.status == Status::Pending && !m.deleted {
                out.push(m);
            }
        }
        out.sort_by_key(|m| m.ts_ms);
        Ok(out)
    }

    /// Makes everything written so far durable.
    ///
    /// # Errors
    /// Store errors.
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush()?;
        Ok(())
    }
}

pub(super) fn decode(bytes: &[u8]) -> Result<Message, Error> {
    match postcard::from_bytes::<Stored>(bytes) {
        Ok(Stored::V5(m)) => Ok(Message {
            id: m.id,
            from: m.from,
            from_device: m.from_device,
            to: m.to,
            text: m.text,
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            undecryptable: m.undecryptable,
            repeats: m.repeats,
            reply_to: m.reply_to,
            quote: m.quote,
            forwards: m.forwards,
            edited_ms: m.edited_ms,
            deleted: m.deleted,
            attachment: m.attachment,
            ..Message::default()
        }),
        Ok(Stored::V4(m)) => Ok(Message {
            id: m.id,
            from: m.from,
            from_device: m.from_device,
            to: m.to,
            text: m.text,
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            undecryptable: m.undecryptable,
            repeats: m.repeats,
            reply_to: m.reply_to,
            quote: m.quote,
            forwards: m.forwards,
            edited_ms: m.edited_ms,
            deleted: m.deleted,
            ..Message::default()
        }),
        Ok(Stored::V3(m)) => Ok(Message {
            id: m.id,
            from: m.from,
            from_device: m.from_device,
            to: m.to,
            text: m.text,
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            undecryptable: m.undecryptable,
            reply_to: m.reply_to,
            quote: m.quote,
            forwards: m.forwards,
            edited_ms: m.edited_ms,
            deleted: m.deleted,
            repeats: 0,
            ..Message::default()
        }),
        Ok(Stored::V2(m)) => Ok(Message {
            id: m.id,
            from: m.from,
            from_device: m.from_device,
            to: m.to,
            text: m.text,
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            undecryptable: m.undecryptable,
            ..Message::default()
        }),
        Ok(Stored::V1(m)) => Ok(Message {
            id: m.id,
            from: m.from,
            from_device: m.from_device,
            to: m.to,
            text: m.text,
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            ..Message::default()
        }),
        Err(e) => Err(Error::Damaged(format!("history record: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u8, from: &str, to: &str, direction: Direction, status: Status) -> Message {
        Message {
            id: MsgId([id; 16]),
            from: from.into(),
            from_device: DeviceId(1),
            to: to.into(),
            text: format!("m{id}"),
            ts_ms: id as u64,
            direction,
            status,
            ..Message::default()
        }
    }

    #[test]
    fn history_dedups_orders_and_updates() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let a = msg(1, "bob", "alice", Direction::In, Status::Received);
        assert!(h.insert("alice", &a).unwrap());
        assert!(!h.insert("alice", &a).unwrap());
        // Same id from someone else is a different message.
        let c = msg(1, "carol", "alice", Direction::In, Status::Received);
        assert!(h.insert("alice", &c).unwrap());
        let mine = msg(2, "alice", "bob", Direction::Out, Status::Pending);
        assert!(h.insert("alice", &mine).unwrap());
        let b = msg(3, "bob", "alice", Direction::In, Status::Received);
        assert!(h.insert("alice", &b).unwrap());
        let conv = h.conversation("bob").unwrap();
        assert_eq!(conv, vec![a.clone(), mine.clone(), b.clone()]);
        assert_eq!(h.conversation("carol").unwrap(), vec![c]);
        assert_eq!(h.pending().unwrap(), vec![mine.clone()]);
        h.set_status("alice", &mine.id, Status::Sent, Some(99)).unwrap();
        let got = h.get("alice", &mine.id).unwrap().unwrap();
        assert_eq!((got.status, got.ts_ms), (Status::Sent, 99));
        assert!(h.pending().unwrap().is_empty());
        h.remove("alice", "alice", &mine.id).unwrap();
        assert_eq!(h.conversation("bob").unwrap(), vec![a, b]);
        h.flush().unwrap();
    }

    #[test]
    fn conversations_are_listed_newest_first_with_unread_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        assert!(h.conversations().unwrap().is_empty());
        h.insert("alice", &msg(1, "bob", "alice", Direction::In, Status::Received))
            .unwrap();
        h.insert("alice", &msg(2, "bob", "alice", Direction::In, Status::Received))
            .unwrap();
        h.insert("alice", &msg(3, "alice", "carol", Direction::Out, Status::Sent))
            .unwrap();
        h.insert("alice", &msg(4, "bob", "alice", Direction::In, Status::Read))
            .unwrap();
        let c = h.conversations().unwrap();
        let got: Vec<(&str, u8, usize)> = c.iter().map(|c| (c.peer.as_str(), c.last.id.0[0], c.unread)).collect();
        assert_eq!(got, [("bob", 4, 2), ("carol", 3, 0)]);
    }

    #[test]
    fn history_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let m = msg(5, "bob", "alice", Direction::In, Status::Received);
        {
            let h = History::open(tmp.path()).unwrap();
            h.insert("alice", &m).unwrap();
            h.flush().unwrap();
        }
        let h = History::open(tmp.path()).unwrap();
        assert_eq!(h.conversation("bob").unwrap(), vec![m.clone()]);
        assert!(!h.insert("alice", &m).unwrap());
    }

    #[test]
    fn records_from_before_end_to_end_encryption_still_read() {
        let m = msg(4, "bob", "alice", Direction::In, Status::Received);
        let old = MessageV1 {
            id: m.id,
            from: m.from.clone(),
            from_device: m.from_device,
            to: m.to.clone(),
            text: m.text.clone(),
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
        };
        let bytes = postcard::to_stdvec(&Stored::V1(old)).unwrap();
        assert_eq!(bytes[0], 0, "V1 is tag 0");
        assert_eq!(decode(&bytes).unwrap(), m);
        let v2 = MessageV2 {
            id: m.id,
            from: m.from.clone(),
            from_device: m.from_device,
            to: m.to.clone(),
            text: m.text.clone(),
            ts_ms: m.ts_ms,
            direction: m.direction,
            status: m.status,
            undecryptable: true,
        };
        let bytes = postcard::to_stdvec(&Stored::V2(v2)).unwrap();
        assert_eq!(bytes[0], 1, "V2 is tag 1");
        let undecryptable = Message {
            undecryptable: true,
            ..m.clone()
        };
        assert_eq!(decode(&bytes).unwrap(), undecryptable);
        let mut rich = m.clone();
        rich.reply_to = Some(MsgId([3; 16]));
        rich.quote = Some(Quote {
            from: "alice".into(),
            text: Some("q".into()),
        });
        rich.forwards = 2;
        rich.edited_ms = Some(9);
        let v3 = MessageV3 {
            id: rich.id,
            from: rich.from.clone(),
            from_device: rich.from_device,
            to: rich.to.clone(),
            text: rich.text.clone(),
            ts_ms: rich.ts_ms,
            direction: rich.direction,
            status: rich.status,
            undecryptable: false,
            reply_to: rich.reply_to,
            quote: rich.quote.clone(),
            forwards: rich.forwards,
            edited_ms: rich.edited_ms,
            deleted: false,
        };
        let bytes = postcard::to_stdvec(&Stored::V3(v3)).unwrap();
        assert_eq!(bytes[0], 2, "V3 is tag 2");
        assert_eq!(decode(&bytes).unwrap(), rich);
        let mut garbage = m.clone();
        garbage.undecryptable = true;
        garbage.text.clear();
        garbage.repeats = 41;
        let v4 = MessageV4 {
            id: garbage.id,
            from: garbage.from.clone(),
            from_device: garbage.from_device,
            to: garbage.to.clone(),
            text: String::new(),
            ts_ms: garbage.ts_ms,
            direction: garbage.direction,
            status: garbage.status,
            undecryptable: true,
            repeats: 41,
            reply_to: garbage.reply_to,
            quote: garbage.quote.clone(),
            forwards: garbage.forwards,
            edited_ms: garbage.edited_ms,
            deleted: garbage.deleted,
        };
        let bytes = postcard::to_stdvec(&Stored::V4(v4)).unwrap();
        assert_eq!(bytes[0], 3, "V4 is tag 3");
        assert_eq!(decode(&bytes).unwrap(), garbage);
        let mut file = rich.clone();
        file.attachment = Some(Box::new(crate::client::attachment::Attachment {
            file: crate::client::attachment::FileRef {
                blob: crate::wire::BlobId([5; 32]),
                key: crate::client::attachment::FileKey([6; 32]),
                size: 10,
                sha256: [7; 32],
                media_type: "text/plain".into(),
                name: "a.txt".into(),
                thumbnail: None,
            },
            path: Some("/home/a/a.txt".into()),
            expired: false,
            uploaded: true,
        }));
        let new = encode(&file).unwrap();
        assert_eq!(new[0], 4, "V5 is tag 4");
        assert_eq!(decode(&new).unwrap(), file);
    }

    #[test]
    fn a_message_and_its_olm_state_commit_together() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let e2e = h.e2e();
        let m = msg(6, "bob", "alice", Direction::In, Status::Received);
        let mut writes = Writes::new();
        writes.insert(b"k".to_vec(), Some(b"v".to_vec()));
        writes.insert(b"gone".to_vec(), None);
        e2e.apply(Writes::from([(b"gone".to_vec(), Some(b"x".to_vec()))]))
            .unwrap();
        assert!(h.commit("alice", Some(&m), ("bob", &m.id), writes.clone()).unwrap());
        assert_eq!(e2e.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(e2e.get(b"gone").unwrap().is_none());
        assert!(h.has("bob", &m.id).unwrap());
        // Again: not new, still applied.
        assert!(!h.commit("alice", Some(&m), ("bob", &m.id), writes).unwrap());
        assert_eq!(h.conversation("bob").unwrap(), vec![m.clone()]);
        // A delivery that is not shown is remembered, not listed.
        let id = MsgId([9; 16]);
        assert!(!h.has("bob", &id).unwrap());
        h.commit("alice", None, ("bob", &id), Writes::new()).unwrap();
        assert!(h.has("bob", &id).unwrap());
        assert_eq!(h.conversation("bob").unwrap(), vec![m]);
    }
}
