//! Durable state in one data directory: accounts, devices and their keys,
//! invites and link codes, per-device message queues and dedup records, all
//! in `sled` (0.34), plus the group-commit [`Flusher`].
//!
//! What it guarantees:
//! - a message is appended to every recipient device's queue, with its dedup
//!   record, in one atomic batch; a retry with the same (sender device,
//!   message id) finds the dedup record and appends nothing;
//! - sequence numbers per device queue are strictly increasing, never
//!   reused (the next number is stored with every append), and an append is
//!   visible to readers only with all lower numbers of that queue;
//! - every write that a peer will be told about returns an [`Epoch`]; once
//!   [`Flusher::durable`] reaches it, the write survives a crash.
//!
//! What it does not do: decide who may send to whom (the hub does), read
//! the clock (times come in as milliseconds since the Unix epoch), or flush
//! on its callers' threads (the flusher thread does).
//!
//! Layout (all integers big-endian so that keys sort numerically):
//! - `meta`: `server_key` → 32 bytes; `public_addr` → UTF-8;
//!   `next_user` → u32.
//! - `users`: name → [`UserRecord`].
//! - `devices`: user ‖ device → `DeviceRecord`.
//! - `keys`: Noise static key → user ‖ device.
//! - `invites`: token id → [`TokenRecord`]; `link_codes`: token id →
//!   [`LinkRecord`] (the account, and the device that asked for it).
//! - `queues`: `q` ‖ user ‖ device ‖ seq → [`Entry`];
//!   `n` ‖ user ‖ device → next seq, entries, bytes; `d` ‖ user ‖ device ‖
//!   message id → acceptance time and where it was queued (dedup,
//!   retraction); `r` ‖ … → fold index (see `queues.rs`).
//! - `e2e`: the key directory (see `keys.rs`).

mod accounts;
mod flusher;
mod keys;
mod queues;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use thiserror::Error;

pub use accounts::{
    Accounts, LINK_REQUEST_REFILL, LINK_REQUESTS_BURST, LinkError, LinkRecord, LinkRequestError, MAX_LINK_CODES,
    RegisterError, TokenRecord, UserRecord,
};
pub use flusher::{Epoch, Flusher};
pub use keys::{MAX_ONE_TIME_KEYS, PublishError};
pub use queues::{
    Appended, Entry, LostRecord, Op, Outcome, QueuedExpired, QueuedGap, QueuedMessage, QueuedReceipt, Quota, Swept,
    decode_entry,
};

use crate::noise::Keypair;

/// The data directory format this build writes.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_FILE: &str = "FORMAT";
const FORMAT_MAGIC: &str = "tidings-data";

/// A storage failure. Expected outcomes (name taken, duplicate message) are
/// not errors; they come back as inner results or enum variants.
#[derive(Debug, Error)]
pub enum StoreError {
    /// sled failed.
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    /// A transaction failed inside sled.
    #[error("database transaction: {0}")]
    Tx(String),
    /// The filesystem failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Something on disk does not decode.
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
    /// The data directory was written by a newer tidings.
    #[error("data directory format {found} is newer than this build's {FORMAT_VERSION}; upgrade tidings")]
    TooNew {
        /// The version found.
        found: u32,
    },
    /// The data directory is held by another process.
    #[error("the data directory is in use by another process (is tidingsd running?)")]
    Locked,
}

impl From<sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(e: sled::transaction::TransactionError<StoreError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

/// Limits that refuse new messages rather than drop accepted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Most entries in one device's queue.
    pub queue_messages: u64,
    /// Most bytes in one device's queue.
    pub queue_bytes: u64,
    /// Most bytes all queues together may hold (sled's files take more, up
    /// to a few times this).
    pub disk_budget: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            queue_messages: 100_000,
            queue_bytes: 256 << 20,
            disk_budget: 4 << 30,
        }
    }
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled's page cache in bytes (small, for a Raspberry Pi).
    pub cache_capacity: u64,
    /// Quotas.
    pub quotas: Quotas,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_capacity: 64 << 20,
            quotas: Quotas::default(),
        }
    }
}

/// The durable state.
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    pub(crate) queues: sled::Tree,
    e2e: sled::Tree,
    /// Serialises publishes, so the one-time key cap holds.
    key_lock: Mutex<()>,
    accounts: Accounts,
    /// Each queue's next sequence, entry count and bytes, loaded on first
    /// use. Held across every queue change so that sequence order is
    /// visibility order and the counts are exact.
    metas: Mutex<queues::Metas>,
    /// The newest entries of each queue, for delivery without a read.
    tail: Mutex<queues::Tail>,
    quotas: Quotas,
    /// Bytes held in all queues (exact; for the budget).
    queued_bytes: AtomicU64,
    flusher: Flusher,
    server_key: Keypair,
    public_addr: RwLock<Option<String>>,
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the format file: the directory's format version, or `None` for a
/// new directory.
fn read_format(dir: &Path) -> Result<Option<u32>, StoreError> {
    let path = dir.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = text
                .trim()
                .strip_prefix(FORMAT_MAGIC)
                .and_then(|v| v.trim().parse::<u32>().ok())
                .ok_or(StoreError::Corrupt("FORMAT"))?;
            if found > FORMAT_VERSION {
                return Err(StoreError::TooNew { found });
            }
            Ok(Some(found))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(FORMAT_FILE);
    let tmp = dir.join("FORMAT.tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    writeln!(f, "{FORMAT_MAGIC} {FORMAT_VERSION}").map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

/// Upgrades the database from format `from` to [`FORMAT_VERSION`], one
/// step at a time, flushed before the FORMAT file says so. Each step is
/// idempotent: a crash midway reruns it.
fn migrate(db: &sled::Db, from: u32) -> Result<(), StoreError> {
    for version in from..FORMAT_VERSION {
        log::info!("migrating the data directory from format {version} to {}", version + 1);
        match version {
            // 0 → 1: only the FORMAT file was added.
            0 => {}
            // 1 → 2: queue entries became an enum (messages, receipts,
            // notices); dedup records remember where a message was queued.
            1 => Store::migrate_entries_1_to_2(&db.open_tree("queues")?)?,
            _ => {}
        }
    }
    db.flush()?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the data directory at `dir`. The first
    /// open generates the server's static key.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process has it open,
    /// [`StoreError::TooNew`] for a newer format, or an I/O failure.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        set_private(dir);
        // A directory with a database but no FORMAT file predates format
        // files: format 0. Looked at before sled opens, which creates
        // `db/conf` in a new directory.
        let existed = dir.join("db").join("conf").exists();
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => StoreError::Locked,
                sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked,
                e => StoreError::Db(e),
            })?;
        let format = read_format(dir)?;
        let format = match format {
            Some(v) => v,
            None if existed => 0,
            None => FORMAT_VERSION,
        };
        if format < FORMAT_VERSION {
            migrate(&db, format)?;
        }
        if format != FORMAT_VERSION || !dir.join(FORMAT_FILE).exists() {
            write_format(dir)?;
        }
        // sled's data file, for the flusher's fdatasync; and the directory
        // entries sled and the format file created, made durable once.
        let db_file = dir.join("db").join("db");
        let file = fs::File::open(&db_file).map_err(io_err(&db_file))?;
        sync_dir(&dir.join("db"))?;
        sync_dir(dir)?;
        let flusher = Flusher::new(db.clone(), file, db_file);
        let meta = db.open_tree("meta")?;
        let server_key = match meta.get("server_key")? {
            Some(k) => Keypair::from_private(&k).ok_or(StoreError::Corrupt("meta/server_key"))?,
            None => {
                let kp = Keypair::generate().map_err(|_| StoreError::Corrupt("randomness"))?;
                meta.insert("server_key", &kp.private()[..])?;
                flusher.sync()?;
                kp
            }
        };
        let public_addr = match meta.get("public_addr")? {
            Some(a) => Some(String::from_utf8(a.to_vec()).map_err(|_| StoreError::Corrupt("meta/public_addr"))?),
            None => None,
        };
        let accounts = Accounts::load(&db)?;
        // Accounts::load may have made the token key; sync it for good.
        flusher.sync()?;
        let queues = db.open_tree("queues")?;
        let e2e = db.open_tree("e2e")?;
        let store = Store {
            db,
            meta,
            queues,
            e2e,
            key_lock: Mutex::new(()),
            accounts,
            metas: Mutex::new(Default::default()),
            tail: Mutex::new(Default::default()),
            quotas: config.quotas,
            queued_bytes: AtomicU64::new(0),
            flusher,
            server_key,
            public_addr: RwLock::new(public_addr),
            dir: dir.to_path_buf(),
        };
        let queued = store.count_queued_bytes()?;
        store.queued_bytes.store(queued, Ordering::Relaxed);
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's static key pair.
    pub fn server_key(&self) -> &Keypair {
        &self.server_key
    }

    /// The address invites carry, as last recorded.
    pub fn public_addr(&self) -> Option<String> {
        self.public_addr.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the address invites carry.
    ///
    /// # Errors
    /// On a database failure.
    pub fn set_public_addr(&self, addr: &str) -> Result<(), StoreError> {
        self.meta.insert("public_addr", addr.as_bytes())?;
        *self.public_addr.write().unwrap_or_else(|e| e.into_inner()) = Some(addr.to_string());
        Ok(())
    }

    /// Accounts, devices, invites and link codes.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// The group-commit flusher.
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// Flushes everything now, on the caller's thread (for operator
    /// commands and shutdown; the event loops use the flusher).
    ///
    /// # Errors
    /// On a database failure.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flusher.sync()
    }

    /// Bytes held in all queues: what the disk budget counts. (sled's files
    /// take more, up to a few times this, and do not shrink right away.)
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Bytes sled's files take on disk (for operators).
    ///
    /// # Errors
    /// On a database failure.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// Makes a directory's entries (files created or renamed in it) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Best effort: the data directory holds the server's private key.
fn set_private(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
}

pub(crate) fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

pub(crate) fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests;
