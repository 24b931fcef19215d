//! The profile directory: one device's identity and local history.
//!
//! Layout:
//! - `lock`: held (advisory, `flock`) by the one process using the profile;
//! - `key`: the device's Noise private key, 32 bytes, mode 0600;
//! - `profile.json`: the server address and key, user name and device
//!   number, written once registration succeeds (atomically, by rename);
//! - `history/`: sled: the local messages and their states, and (tree
//!   `e2e`) the Olm account and sessions, encrypted with a key derived from
//!   `TIDINGS_PASSPHRASE` where one is set (see [`super::e2e`]);
//! - `sock`: the Unix socket of a running `listen` (see [`super::local`]).
//!
//! Guarantees: one writer at a time (a second [`Profile::open`] waits for
//! the lock or fails after its timeout); [`History::commit`] stores a
//! message and the end-to-end state changes that came with it in one
//! transaction; [`History::flush`] makes everything durable, and callers
//! ack only after it. What it does not do: talk to the server.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Error;
use super::attachment::Attachment;
use super::e2e::{Crypto, Writes};
use super::status::Receipts;
use crate::noise::{KEY_LEN, Keypair, PublicKey};
use crate::wire::{DeviceId, MsgId};

/// File names inside a profile.
pub const LOCK_FILE: &str = "lock";
/// The device key.
pub const KEY_FILE: &str = "key";
/// The registration.
pub const REGISTRATION_FILE: &str = "profile.json";
/// The history database.
pub const HISTORY_DIR: &str = "history";
/// The socket of a running `listen`.
pub const SOCKET_FILE: &str = "sock";
/// The environment variable holding the passphrase of the end-to-end keys.
pub const PASSPHRASE_VAR: &str = "TIDINGS_PASSPHRASE";

/// The per-user default profile directory (for example
/// `~/.local/share/tidings` on Linux).
pub fn default_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "tidings").map(|d| d.data_dir().to_path_buf())
}

/// Who this device is, and where its server is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// `host:port` of the server.
    pub server: String,
    /// The server's static key, hex.
    #[serde(with = "hex_key")]
    pub server_key: PublicKey,
    /// This account's user name.
    pub user: String,
    /// This device's number.
    pub device: u32,
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(&text, &mut key).map_err(serde::de::Error::custom)?;
        Ok(key)
    }
}

/// An open profile: holds the lock until dropped.
pub struct Profile {
    dir: PathBuf,
    key: Keypair,
    registration: Option<Registration>,
    crypto: Crypto,
    /// Declared before the lock so that it closes first.
    history: History,
    _lock: File,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("dir", &self.dir)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

impl Profile {
    /// Opens (creating if needed) the profile in `dir`, waiting up to
    /// `wait` for another process to let go of it, with the passphrase in
    /// `TIDINGS_PASSPHRASE` if that is set.
    ///
    /// # Errors
    /// See [`Profile::open_with`].
    pub fn open(dir: &Path, wait: Duration) -> Result<Profile, Error> {
        let passphrase = std::env::var(PASSPHRASE_VAR)
            .ok()
            .filter(|p| !p.is_empty())
            .map(Zeroizing::new);
        Profile::open_with(dir, wait, passphrase.as_deref().map(String::as_str))
    }

    /// Opens (creating if needed) the profile in `dir`, waiting up to
    /// `wait` for another process to let go of it; `passphrase` decrypts
    /// (or from now on encrypts) the end-to-end keys.
    ///
    /// # Errors
    /// [`Error::ProfileBusy`] after `wait`; [`Error::Passphrase`] if the
    /// keys need one, or another; I/O and store errors; a damaged key or
    /// registration file.
    pub fn open_with(dir: &Path, wait: Duration, passphrase: Option<&str>) -> Result<Profile, Error> {
        // The directory holds the key and the socket: owner only. An
        // existing directory is left as it is (it may be one the user
        // chose for other things too), with a warning if others can enter.
        if dir.is_dir() {
            let mode = fs::metadata(dir)?.permissions().mode();
            if mode & 0o077 != 0 {
                log::warn!(
                    "profile directory {} is accessible to other users (mode {:o}); consider chmod 700",
                    dir.display(),
                    mode & 0o777
                );
            }
        } else {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let lock = lock(dir, wait)?;
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        let registration = match fs::read(dir.join(REGISTRATION_FILE)) {
            Ok(bytes) => {
                Some(serde_json::from_slice(&bytes).map_err(|e| Error::Damaged(format!("{REGISTRATION_FILE}: {e}")))?)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let history = History::open(&dir.join(HISTORY_DIR))?;
        let crypto = Crypto::open(history.db.open_tree("e2e")?, passphrase)?;
        Ok(Profile {
            dir: dir.to_path_buf(),
            _lock: lock,
            key,
            registration,
            crypto,
            history,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device's Noise key.
    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The registration, once there is one.
    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// The registration.
    ///
    /// # Errors
    /// [`Error::NotRegistered`].
    pub fn registered(&self) -> Result<&Registration, Error> {
        self.registration.as_ref().ok_or(Error::NotRegistered)
    }

    /// Records the registration durably (write, fsync, rename, fsync dir).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_registration(&mut self, registration: Registration) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(&registration).map_err(|e| Error::Damaged(e.to_string()))?;
        let tmp = self.dir.join(format!("{REGISTRATION_FILE}.tmp"));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(REGISTRATION_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.registration = Some(registration);
        Ok(())
    }

    /// The local history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The end-to-end state.
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    /// The end-to-end state, to change.
    pub fn crypto_mut(&mut self) -> &mut Crypto {
        &mut self.crypto
    }

    /// Both at once.
    pub fn parts(&mut self) -> (&History, &mut Crypto) {
        (&self.history, &mut self.crypto)
    }

    /// Path of the `listen` socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }
}

fn lock(dir: &Path, wait: Duration) -> Result<File, Error> {
    use fs2::FileExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match file.try_lock_exclusive() {
            Ok(()) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(11) => {
                if Instant::now() >= deadline {
                    return Err(Error::ProfileBusy(dir.to_path_buf()));
                }
                if !told && !wait.is_zero() {
                    log::warn!(
                        "profile {} is in use by another tidings command; waiting",
                        dir.display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn load_or_create_key(path: &Path) -> Result<Keypair, Error> {
    match File::open(path) {
        Ok(mut f) => {
            let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN));
            f.read_to_end(&mut bytes)?;
            Keypair::from_private(&bytes).ok_or_else(|| Error::Damaged(format!("{}: not a key", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate().map_err(|_| Error::Damaged("no randomness for a key".into()))?;
            let tmp = path.with_extension("tmp");
            {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(key.private())?;
                f.sync_all()?;
            }
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(key)
        }
        Err(e) => Err(e.into()),
    }
}

/// Which way a message went, seen from this account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// From someone else.
    In,
    /// From this account (this device or another of its devices).
    Out,
}

/// Where a message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Written here, not yet accepted by the server.
    Pending,
    /// Accepted by the server (durable in every recipient device's queue).
    Sent,
    /// Received from the server, not read yet.
    Received,
    /// Sent, and stored on a device of the recipient (a delivered receipt).
    Delivered,
    /// Sent and read by the recipient (a read receipt), or received and
    /// read here.
    Read,
}

impl Direction {
    /// `"in"` or `"out"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

impl Status {
    /// `"pending"`, `"sent"`, `"received"`, `"delivered"` or `"read"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Received => "received",
            Status::Delivered => "delivered",
            Status::Read => "read",
        }
    }
}

/// One message in the local history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's id for it.
    pub id: MsgId,
    /// The sending user.
    pub from: String,
    /// The sending device.
    pub from_device: DeviceId,
    /// The user it was sent to.
    pub to: String,
    /// The text.
    pub text: String,
    /// When: the server's acceptance time once known, else the sender's
    /// clock (ms since the epoch).
    pub ts_ms: u64,
    /// In or out.
    pub direction: Direction,
    /// Where it stands. Stored: pending, sent or received (or read, for
    /// one received); as read back from the history, with what receipts
    /// said merged in (see [`super::status::Receipts::status`]).
    pub status: Status,
    /// The body could not be decrypted (`text` is then empty).
    pub undecryptable: bool,
    /// The message this one replies to (sent by `quote.from`).
    pub reply_to: Option<MsgId>,
    /// What a reply quotes. As read back from the history: the quoted
    /// message's current text if it is on this device, else the text the
    /// reply carried; `text` is `None` once the quoted message was deleted.
    pub quote: Option<Quote>,
    /// How many times it was forwarded before it got here (0: its sender
    /// wrote it).
    pub forwards: u32,
    /// When its sender last edited it (by the sender's clock), if ever.
    pub edited_ms: Option<u64>,
    /// Deleted for everyone: `text` is empty, and so is any earlier
    /// version.
    pub deleted: bool,
    /// The file it carries (`text` is then its caption), and what this
    /// device knows of it.
    pub attachment: Option<Box<Attachment>>,
}

/// What a reply quotes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// Who wrote the quoted message.
    pub from: String,
    /// Its text; `None` once it was deleted.
    pub text: Option<String>,
}

impl Default for Message {
    /// An empty incoming text message (for building messages with
    /// `..Default::default()`).
    fn default() -> Message {
        Message {
            id: MsgId([0; 16]),
            from: String::new(),
            from_device: DeviceId(0),
            to: String::new(),
            text: String::new(),
            ts_ms: 0,
            direction: Direction::In,
            status: Status::Received,
            undecryptable: false,
            reply_to: None,
            quote: None,
            forwards: 0,
            edited_ms: None,
            deleted: false,
            attachment: None,
        }
    }
}

/// From this many forwards on, a message is shown as "forwarded many
/// times" (as WhatsApp does).
pub const FORWARDED_MANY: u32 = 5;

impl Message {
    /// Whether it was forwarded.
    pub fn forwarded(&self) -> bool {
        self.forwards > 0
    }

    /// Whether it was forwarded [`FORWARDED_MANY`] times or more.
    pub fn forwarded_many_times(&self) -> bool {
        self.forwards >= FORWARDED_MANY
    }

    /// Whether it was edited.
    pub fn edited(&self) -> bool {
        self.edited_ms.is_some()
    }

    /// The other party of the conversation this message belongs to, seen
    /// from `me`.
    pub fn peer<'a>(&'a self, me: &str) -> &'a str {
        if self.from == me { &self.to } else { &self.from }
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

/// A message as stored before attachments.
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

/// Stored form; the tag is the version.
#[derive(Serialize, Deserialize)]
enum Stored {
    V1(MessageV1),
    V2(MessageV2),
    V3(MessageV3),
    V4(Message),
}

fn encode(m: &Message) -> Result<Vec<u8>, Error> {
    postcard::to_stdvec(&Stored::V4(m.clone())).map_err(|e| Error::Damaged(e.to_string()))
}

/// The local history: messages by (sender, id) for dedup and state, and
/// by conversation in arrival order.
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
        Ok(History {
            db,
            msgs,
            conv,
            seen,
            rcpt,
            outbox,
            pending,
            meta,
        })
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

    /// Applies `batch`, and the end-to-end state `writes` to the `e2e`
    /// tree, in one transaction. Not durable until [`History::flush`].
    ///
    /// # Errors
    /// Store errors.
    pub fn apply(&self, batch: Batch, e2e: Option<(&sled::Tree, Writes)>) -> Result<(), Error> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let mut trees = vec![
            &self.msgs,
            &self.conv,
            &self.seen,
            &self.rcpt,
            &self.outbox,
            &self.pending,
            &self.meta,
        ];
        let writes = match e2e {
            Some((tree, writes)) => {
                trees.push(tree);
                writes
            }
            None => Writes::new(),
        };
        let result = trees.as_slice().transaction(|t| {
            for (tree, k, v) in &batch.writes {
                let tree = &t[*tree as usize];
                match v {
                    Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                    None => tree.remove(k.as_slice())?,
                };
            }
            if let Some(e2e) = t.get(7) {
                for (k, v) in &writes {
                    match v {
                        Some(v) => e2e.insert(k.as_slice(), v.as_slice())?,
                        None => e2e.remove(k.as_slice())?,
                    };
                }
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(Error::Damaged("history transaction aborted".into())),
        }
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
    /// applies the end-to-end state `writes` to the `e2e` tree. Returns
    /// whether the message was new. Not durable until [`History::flush`].
    ///
    /// # Errors
    /// Store errors.
    pub fn commit(
        &self,
        me: &str,
        msg: Option<&Message>,
        handled: (&str, &MsgId),
        e2e: &sled::Tree,
        writes: Writes,
    ) -> Result<bool, Error> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let value = match msg {
            Some(m) => Some(encode(m)?),
            None => None,
        };
        let key = msg_key(handled.0, handled.1);
        let result = (&self.msgs, &self.conv, &self.seen, e2e).transaction(|(msgs, conv, seen, e2e)| {
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
        match result {
            Ok(new) => Ok(new),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(Error::Damaged("history transaction aborted".into())),
        }
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
        m.status = receipts.status(m.status, m.direction, &peer);
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
        Ok(Stored::V4(m)) => Ok(m),
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
            attachment: None,
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
    fn key_is_created_private_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let public = {
            let p = Profile::open(&dir, Duration::ZERO).unwrap();
            assert!(p.registration().is_none());
            assert!(matches!(p.registered(), Err(Error::NotRegistered)));
            p.key().public
        };
        let mode = fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let p = Profile::open(&dir, Duration::ZERO).unwrap();
        assert_eq!(p.key().public, public);
    }

    #[test]
    fn registration_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registration {
            server: "127.0.0.1:7070".into(),
            server_key: [7; 32],
            user: "alice".into(),
            device: 2,
        };
        {
            let mut p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
            p.save_registration(reg.clone()).unwrap();
        }
        let p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
        assert_eq!(p.registration(), Some(&reg));
        let text = fs::read_to_string(tmp.path().join(REGISTRATION_FILE)).unwrap();
        assert!(text.contains(&"07".repeat(32)), "{text}");
    }

    #[test]
    fn one_process_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
        let e = Profile::open(tmp.path(), Duration::from_millis(120)).unwrap_err();
        assert!(matches!(e, Error::ProfileBusy(_)), "{e:?}");
        // A waiter gets it once the holder lets go.
        let dir = tmp.path().to_path_buf();
        let waiter = std::thread::spawn(move || Profile::open(&dir, Duration::from_secs(10)).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        drop(p);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn damaged_files_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(KEY_FILE), b"short").unwrap();
        assert!(matches!(
            Profile::open(tmp.path(), Duration::ZERO),
            Err(Error::Damaged(_))
        ));
        fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
        fs::write(tmp.path().join(REGISTRATION_FILE), b"{").unwrap();
        assert!(matches!(
            Profile::open(tmp.path(), Duration::ZERO),
            Err(Error::Damaged(_))
        ));
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
        rich.attachment = Some(Box::new(crate::client::attachment::Attachment {
            file: crate::client::attachment::FileRef {
                blob: crate::wire::BlobId([5; 32]),
                key: crate::client::attachment::FileKey([6; 32]),
                size: 10,
                sha256: [7; 32],
                media_type: "text/plain".into(),
                name: "a.txt".into(),
                thumbnail: None,
            },
            path: Some("/tmp/a.txt".into()),
            expired: false,
            uploaded: true,
        }));
        let new = encode(&rich).unwrap();
        assert_eq!(new[0], 3, "V4 is tag 3");
        assert_eq!(decode(&new).unwrap(), rich);
    }

    #[test]
    fn a_message_and_its_olm_state_commit_together() {
        let tmp = tempfile::tempdir().unwrap();
        let h = History::open(tmp.path()).unwrap();
        let e2e = h.db.open_tree("e2e").unwrap();
        let m = msg(6, "bob", "alice", Direction::In, Status::Received);
        let mut writes = Writes::new();
        writes.insert(b"k".to_vec(), Some(b"v".to_vec()));
        writes.insert(b"gone".to_vec(), None);
        e2e.insert(b"gone", &b"x"[..]).unwrap();
        assert!(
            h.commit("alice", Some(&m), ("bob", &m.id), &e2e, writes.clone())
                .unwrap()
        );
        assert_eq!(e2e.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert!(e2e.get(b"gone").unwrap().is_none());
        assert!(h.has("bob", &m.id).unwrap());
        // Again: not new, still applied.
        assert!(!h.commit("alice", Some(&m), ("bob", &m.id), &e2e, writes).unwrap());
        assert_eq!(h.conversation("bob").unwrap(), vec![m.clone()]);
        // A delivery that is not shown is remembered, not listed.
        let id = MsgId([9; 16]);
        assert!(!h.has("bob", &id).unwrap());
        h.commit("alice", None, ("bob", &id), &e2e, Writes::new()).unwrap();
        assert!(h.has("bob", &id).unwrap());
        assert_eq!(h.conversation("bob").unwrap(), vec![m]);
    }

    #[test]
    fn peers() {
        let out = msg(1, "alice", "bob", Direction::Out, Status::Sent);
        assert_eq!(out.peer("alice"), "bob");
        let inc = msg(1, "bob", "alice", Direction::In, Status::Received);
        assert_eq!(inc.peer("alice"), "bob");
        let own = msg(1, "alice", "alice", Direction::Out, Status::Sent);
        assert_eq!(own.peer("alice"), "alice");
    }
}
