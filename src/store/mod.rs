//! Durable state in one data directory, behind [`StoreApi`]: accounts,
//! devices and their keys, invites and link codes, per-device queues, the
//! records that recognise retries and retractions.
//!
//! The shape (see [`api`] for the interface):
//! - the **loops** append, deliver and acknowledge in memory
//!   ([`live`]); account lookups come from an in-memory index;
//! - the **store thread** ([`engine`]) is the one writer of `sled`: it
//!   writes copies that were not acknowledged in time, deletes what was,
//!   and runs every operation that changes accounts, keys, receipts;
//! - the **flusher** ([`Flusher`]) makes each batch durable, after which
//!   the store thread releases what waited for it.
//!
//! What it guarantees:
//! - a message is settled (the sender may be told `Accepted`) only when
//!   each copy is durable or was acknowledged by its device (spec §10);
//! - sequence numbers per queue strictly increase and are never reused,
//!   even for copies never written and across crashes (a durable ceiling
//!   runs ahead of them);
//! - the disk budget counts every record kept, exactly; below the
//!   free-space floor requests that add data are refused
//!   ([`StoreApi::storage_full`]), and accepting resumes by itself.
//!
//! What it does not do: decide who may send to whom (the hub does), know
//! connections, or read the clock for the loops (times come in).
//!
//! Layout: `meta` (server key, public address, token key, `next_user`,
//! sequence ceiling), `users`, `devices`, `keys`, `invites`, `link_codes`
//! (see [`accounts`]), `queues` (see [`disk`]), `e2e` (the key directory,
//! see `keys.rs`), `spill/`, the segment files of spilled bodies (see
//! `spill.rs`); and `blobs/`, the files people send (see [`blobs`]).

mod accounts;
pub mod api;
pub mod backup;
pub mod blobs;
mod disk;
mod engine;
mod flusher;
mod groups;
mod keys;
mod live;
mod migrate;
mod shares;
mod spill;
mod stats;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use accounts::{
    Accounts, LINK_REQUEST_REFILL, LINK_REQUESTS_BURST, LinkError, LinkRecord, LinkRequestError, MAX_LINK_CODES,
    RegisterError, TokenRecord, UserRecord,
};
pub use api::{
    Appended, BackupSink, Completion, Entry, GroupAppended, GroupChangeOp, GroupLimits, GroupRefused, GroupView,
    NewGroupMessage, NewMessage, Op, Outcome, QueuedMessage, Quota, Read, Refused, Sink, StoreApi, Waiter,
};
pub use blobs::{BlobConfig, BlobOp, BlobOutcome, BlobRefused};
pub use flusher::{Epoch, Flusher};
pub use groups::Groups;
pub use keys::{MAX_ONE_TIME_KEYS, PublishError};

use self::blobs::BlobStore;
use self::engine::{CEILING_STEP, Engine, Inbox, Trees};
use self::live::{Live, LiveConfig, Loaded};
use crate::ids::{DeviceKey, Identity, UserId};
use crate::noise::{Keypair, PublicKey};
use crate::wire::{DeviceId, DeviceInfo, GroupId};

/// The data directory format this build writes. Format 5 added groups and
/// blocks (trees of their own) and new kinds of queue entries and spill
/// records, which a build of format 4 would not read.
pub const FORMAT_VERSION: u32 = 5;
pub(crate) const FORMAT_FILE: &str = "FORMAT";
pub(crate) const FORMAT_MAGIC: &str = "tidings-data";
/// `meta` key of the sequence ceiling.
pub(crate) const SEQ_CEILING: &str = "seq_ceiling";

/// What is at a data directory's path, before anything opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Nothing.
    Missing,
    /// An empty directory.
    Empty,
    /// A tidings data directory (a `FORMAT` file, or a database of the
    /// format before format files).
    Data,
    /// Something else: a file, or a directory with other things in it.
    Foreign,
    /// It cannot be looked at.
    Unreadable(String),
}

impl DataDir {
    /// Looks at `dir` without changing anything.
    pub fn check(dir: &Path) -> DataDir {
        match fs::read_dir(dir) {
            Ok(mut entries) => {
                if dir.join(FORMAT_FILE).is_file() || dir.join("db").join("conf").is_file() {
                    DataDir::Data
                } else if entries.next().is_none() {
                    DataDir::Empty
                } else {
                    DataDir::Foreign
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DataDir::Missing,
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => DataDir::Foreign,
            Err(e) => DataDir::Unreadable(e.to_string()),
        }
    }
}

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
    /// A flush failed: nothing more can be made durable.
    #[error("a flush failed")]
    FlushFailed,
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
    /// Most message copies waiting on disk in all queues together: each
    /// costs 24 bytes of memory in the spill log's index, so this bounds
    /// that memory.
    pub total_messages: u64,
    /// Most bytes all queue records together may take (counted exactly,
    /// as stored; sled's files take more).
    pub disk_budget: u64,
    /// Most bytes one user's messages and receipts may take in all queues
    /// together: its share of `disk_budget` (an eighth by default,
    /// [`USER_SHARE`]). A user also never takes more than half of the
    /// room the others leave (see `shares.rs`).
    pub user_bytes: u64,
    /// Most entries one user's messages and receipts may make in all
    /// queues together: its share of `total_messages` (an eighth by
    /// default).
    pub user_messages: u64,
}

/// A user's share of the disk budget and of the copies on disk, by
/// default: one part in this many (spec §10, *Fair shares*).
pub const USER_SHARE: u64 = 8;

impl Quotas {
    /// The per-user shares set to their defaults for this budget: one
    /// [`USER_SHARE`]th of `disk_budget` and of `total_messages`.
    pub fn with_default_shares(mut self) -> Quotas {
        self.user_bytes = self.disk_budget / USER_SHARE;
        self.user_messages = self.total_messages / USER_SHARE;
        self
    }

    /// One queue's quota.
    pub(crate) fn queue(&self) -> shares::Use {
        shares::Use {
            count: self.queue_messages,
            bytes: self.queue_bytes,
        }
    }
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            queue_messages: 100_000,
            queue_bytes: 256 << 20,
            total_messages: 1_000_000,
            disk_budget: 4 << 30,
            user_bytes: 0,
            user_messages: 0,
        }
        .with_default_shares()
    }
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// sled's page cache in bytes (small, for a Raspberry Pi).
    pub cache_capacity: u64,
    /// Quotas.
    pub quotas: Quotas,
    /// How long a copy for an online device may wait in memory for its
    /// ack before it is written (spec §10).
    pub write_delay: Duration,
    /// Most bytes of copies waiting in memory; past it the oldest are
    /// written at once (spec §10).
    pub write_memory: u64,
    /// Below this much free space on the data directory's filesystem,
    /// requests that add data are refused (spec §10, *Storage full*).
    pub min_free: u64,
    /// Blobs (spec §5.7).
    pub blobs: BlobConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_capacity: 16 << 20,
            quotas: Quotas::default(),
            write_delay: Duration::from_millis(50),
            write_memory: 16 << 20,
            min_free: 128 << 20,
            blobs: BlobConfig::default(),
        }
    }
}

/// Durable entries kept in memory for delivery, per queue and in all.
const CACHE_PER_QUEUE: usize = 64;
const CACHE_BYTES: u64 = 4 << 20;
/// Settled messages remembered in memory to recognise retries (spec §6,
/// §10).
pub const RECENT_MESSAGES: usize = 16_384;

/// Logs a repeated failure once per period, with how many there were.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            count: 0,
        }
    }

    /// Counts one occurrence; calls `log` with the count since the last
    /// line when a line is due.
    pub fn log(&mut self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        self.count += 1;
        if self.last.is_none_or(|t| now >= t + self.every) {
            log(self.count);
            self.last = Some(now);
            self.count = 0;
        }
    }
}

type Callback = Box<dyn Fn() + Send + Sync>;

/// Health shared by the loops and the store thread.
pub(crate) struct Status {
    pub full: AtomicBool,
    pub failed: AtomicBool,
    min_free: AtomicU64,
    free: AtomicU64,
    /// Bytes the uploads under way will still write: room below which
    /// free space already counts as taken (spec §10, *Storage full*).
    to_come: AtomicU64,
    /// Held by the blob thread while an operation changes `blobs/`, and
    /// by a backup while it copies the files beside the database, so that
    /// a backup never sees a blob half renamed or half removed.
    pub files: Mutex<()>,
    pub dir: PathBuf,
    on_failure: Mutex<Vec<Callback>>,
    /// Turns of the store thread (and progress of a long operation): the
    /// watchdog's sign that it is not stuck.
    beats: AtomicU64,
}

impl Status {
    /// The store thread made progress.
    pub fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// Measures free space and updates `full`.
    pub fn measure_space(&self) {
        let free = match fs2::available_space(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("cannot measure free space of {}: {e}", self.dir.display());
                return;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        self.judge();
    }

    /// What the uploads under way will still write changed; `full` is
    /// judged again at once against the last measure.
    pub fn set_to_come(&self, bytes: u64) {
        if self.to_come.swap(bytes, Ordering::Relaxed) != bytes {
            self.judge();
        }
    }

    /// Sets `full`: below the floor once what uploads under way will
    /// still write is taken from the free space, so that messages (the
    /// spill log) and files share the room above the floor.
    fn judge(&self) {
        let free = self
            .free
            .load(Ordering::Relaxed)
            .saturating_sub(self.to_come.load(Ordering::Relaxed));
        let floor = self.min_free.load(Ordering::Relaxed);
        let full = free < floor;
        if self.full.swap(full, Ordering::SeqCst) != full {
            if full {
                log::error!(
                    "{}: {} MiB free, below the floor of {} MiB: refusing new messages until space returns \
                     (deliveries and acks go on)",
                    self.dir.display(),
                    free >> 20,
                    floor >> 20
                );
            } else {
                log::warn!(
                    "{}: {} MiB free again: accepting new messages",
                    self.dir.display(),
                    free >> 20
                );
            }
        }
    }

    pub fn notify_failure(&self) {
        for f in self.on_failure.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            f();
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The data format of the directory `dir` (its `FORMAT` file), or `None`
/// if it has none: for operator commands that must not migrate it.
///
/// # Errors
/// An unreadable or foreign `FORMAT` file, or one newer than this build.
pub fn data_format(dir: &Path) -> Result<Option<u32>, StoreError> {
    read_format(dir)
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

/// The durable state, shared by the loops; see the module docs.
pub struct Store {
    /// Spilled bodies (the store thread writes; [`Store::read_queue`]
    /// reads).
    spill: Arc<Mutex<spill::Spill>>,
    db: sled::Db,
    meta: sled::Tree,
    queues: sled::Tree,
    accounts: Arc<Accounts>,
    groups: Arc<Groups>,
    live: Arc<Live>,
    inbox: Arc<Inbox>,
    status: Arc<Status>,
    flusher: Flusher,
    /// Until [`Store::start`] moves it to its thread.
    engine: Mutex<Option<Engine>>,
    /// The blob thread's inbox (and its state until it starts).
    blobs: BlobStore,
    server_key: Keypair,
    public_addr: RwLock<Option<String>>,
    dir: PathBuf,
}

/// The store's threads, for [`Store::stop`].
pub struct StoreThreads {
    engine: JoinHandle<()>,
    flusher: JoinHandle<()>,
    blobs: JoinHandle<()>,
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
        let format = match read_format(dir)? {
            Some(v) => v,
            None if existed => 0,
            None => FORMAT_VERSION,
        };
        // The steps within sled; the last one (3 → 4: message copies to
        // the spill log) below, once the spill log is open. FORMAT says 4
        // only when all are done.
        if format < 3 {
            migrate::migrate(&db, format, 3)?;
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
        let accounts = Arc::new(Accounts::load(&db)?);
        let groups = Arc::new(Groups::load(&db)?);
        let queues = db.open_tree("queues")?;
        let e2e = db.open_tree("e2e")?;
        for (d, n) in keys::load_counts(&e2e)? {
            accounts.set_one_time_keys(d, Some(n));
        }
        // The spill log, indexed again: every copy no mark or removal
        // covers.
        let mut marks = HashMap::new();
        let mut removed = std::collections::HashSet::new();
        for item in queues.scan_prefix([disk::MARK]) {
            let (k, v) = item?;
            let d = disk::parse_dev(&k).ok_or(StoreError::Corrupt("queues/mark"))?;
            marks.insert(d, be_u64(&v).ok_or(StoreError::Corrupt("queues/mark"))?);
        }
        for item in queues.scan_prefix([disk::REMOVED]) {
            let (k, _) = item?;
            let d = disk::parse_dev(&k).ok_or(StoreError::Corrupt("queues/removed"))?;
            removed.insert((d, disk::queue_seq(&k)?));
        }
        let spill_dir = dir.join("spill");
        if format < 4 {
            // The copies the migration appends are indexed by the open
            // below, with the rest (a rerun's duplicates are dropped there,
            // with their segment).
            let (mut spill, _, _) = spill::Spill::open(&spill_dir, marks.clone(), &removed, 0)?;
            migrate::copies_3_to_4(&queues, &mut spill, &flusher)?;
        }
        let (spill, found, restored) = spill::Spill::open(&spill_dir, marks, &removed, RECENT_MESSAGES)?;
        if format != FORMAT_VERSION || !dir.join(FORMAT_FILE).exists() {
            write_format(dir)?;
        }
        // Every queue's bookkeeping, recounted; every record's bytes; who
        // holds what (the fair shares).
        let mut loaded: HashMap<DeviceKey, Loaded> = HashMap::new();
        let mut held = shares::Shares::default();
        spill.count_shares(&mut held);
        let mut tombstones = HashMap::new();
        let mut disk_bytes = 0u64;
        let mut max_seq = 0u64;
        for (d, f) in &found {
            let l = loaded.entry(*d).or_default();
            l.count += f.count;
            l.bytes += f.bytes;
            l.max_seq = l.max_seq.max(f.max_seq);
            max_seq = max_seq.max(f.max_seq);
            disk_bytes += f.bytes;
        }
        for item in queues.iter() {
            let (k, v) = item?;
            let len = (k.len() + v.len()) as u64;
            match k.first() {
                Some(&disk::QUEUE) => {
                    let d = disk::parse_dev(&k).ok_or(StoreError::Corrupt("queues/key"))?;
                    let seq = disk::queue_seq(&k)?;
                    held.add(d, disk::record_sender(&v), len);
                    let l = loaded.entry(d).or_default();
                    l.count += 1;
                    l.bytes += len;
                    l.max_seq = l.max_seq.max(seq);
                    max_seq = max_seq.max(seq);
                    disk_bytes += len;
                }
                Some(&disk::TOMBSTONE) => {
                    if let (Some(key), Some(t)) = (disk::parse_tombstone(&k), be_u64(&v)) {
                        tombstones.insert(key, t);
                    }
                    disk_bytes += len;
                }
                Some(&disk::FOLD) | Some(&disk::MARK) | Some(&disk::REMOVED) => disk_bytes += len,
                _ => {}
            }
        }
        // Every queue starts past any number it could have given out.
        let stored = meta.get(SEQ_CEILING)?.as_deref().and_then(be_u64).unwrap_or(1);
        let base = stored.max(max_seq + 1).max(1);
        let ceiling = base + CEILING_STEP;
        meta.insert(SEQ_CEILING, &ceiling.to_be_bytes())?;
        // Accounts::load may have made the token key; both durable now.
        flusher.sync()?;
        let live = Arc::new(Live::new(
            LiveConfig {
                quotas: config.quotas,
                write_delay: config.write_delay,
                write_memory: config.write_memory,
                cache_bytes: CACHE_BYTES,
                cache_per_queue: CACHE_PER_QUEUE,
                recent: RECENT_MESSAGES,
            },
            loaded,
            tombstones,
            disk_bytes,
            base,
            ceiling,
            restored,
            held,
        ));
        {
            let mut l = live.lock();
            l.spilled = spill.count() as u64;
            l.spill_adjust = spill.held() as i64 - spill.charged() as i64;
        }
        let inbox = Arc::new(Inbox::default());
        let status = Arc::new(Status {
            full: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            min_free: AtomicU64::new(config.min_free),
            free: AtomicU64::new(u64::MAX),
            to_come: AtomicU64::new(0),
            files: Mutex::new(()),
            dir: dir.to_path_buf(),
            on_failure: Mutex::new(Vec::new()),
            beats: AtomicU64::new(0),
        });
        status.measure_space();
        let spill = Arc::new(Mutex::new(spill));
        sync_dir(dir)?;
        let blobs = BlobStore::open(dir, config.blobs, live.clone(), status.clone(), accounts.clone())?;
        let engine = Engine::new(
            Trees {
                db: db.clone(),
                meta: meta.clone(),
                queues: queues.clone(),
                e2e,
            },
            spill.clone(),
            accounts.clone(),
            groups.clone(),
            live.clone(),
            flusher.clone(),
            inbox.clone(),
            status.clone(),
        );
        let kick = inbox.clone();
        flusher.on_flush(move || kick.kick());
        Ok(Store {
            spill,
            db,
            meta,
            queues,
            accounts,
            groups,
            live,
            inbox,
            status,
            flusher,
            engine: Mutex::new(Some(engine)),
            blobs,
            server_key,
            public_addr: RwLock::new(public_addr),
            dir: dir.to_path_buf(),
        })
    }

    /// Starts the store thread and the flusher.
    ///
    /// # Errors
    /// If a thread cannot be spawned, or the store was started before.
    pub fn start(&self) -> std::io::Result<StoreThreads> {
        let engine = self
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| std::io::Error::other("the store thread runs already"))?;
        let flusher = self.flusher.start()?;
        let engine = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || engine.run())?;
        let blobs = self.blobs.start()?;
        Ok(StoreThreads { engine, flusher, blobs })
    }

    /// Stops the blob thread after what was submitted to it, then the
    /// store thread after it wrote and flushed everything submitted, then
    /// the flusher.
    pub fn stop(&self, threads: StoreThreads) {
        self.blobs.stop();
        let _ = threads.blobs.join();
        self.inbox.stop();
        let _ = threads.engine.join();
        self.flusher.stop();
        let _ = threads.flusher.join();
    }

    /// Runs one store-thread turn on the caller's thread, then, if
    /// `flush` and something waits for durability, flushes and runs the
    /// turn that releases it (for simulations, which start no threads).
    /// Returns false on a failure.
    pub fn step(&self, now: Instant, now_ms: u64, flush: bool) -> bool {
        self.blobs.step();
        let mut guard = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let Some(engine) = guard.as_mut() else { return false };
        if engine.turn(now, now_ms).is_err() {
            return false;
        }
        if flush && engine.awaits_flush() {
            if !self.flusher.flush_now() {
                return false;
            }
            return engine.turn(now, now_ms).is_ok();
        }
        true
    }

    /// Runs `op` and waits for its outcome (for operator commands and
    /// tests; never on an event loop). The store thread must run.
    pub fn call(&self, op: Op) -> Outcome {
        self.call_with(|waiter| self.submit(op, Some(waiter)))
    }

    /// Runs a blob operation and waits for its outcome (for the sweeper,
    /// operator commands and tests; never on an event loop).
    pub fn call_blob(&self, op: BlobOp) -> BlobOutcome {
        match self.call_with(|waiter| self.blobs.submit(op, Some(waiter))) {
            Outcome::Blob(o) => o,
            _ => BlobOutcome::Failed,
        }
    }

    fn call_with(&self, submit: impl FnOnce(Waiter)) -> Outcome {
        let bell = Arc::new((Mutex::new(false), Condvar::new()));
        let ring = bell.clone();
        let sink = Sink::new(move || {
            *ring.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            ring.1.notify_all();
        });
        submit(Waiter {
            sink: sink.clone(),
            token: 0,
        });
        let mut got = Vec::new();
        loop {
            sink.take(&mut got);
            if let Some(c) = got.pop() {
                return c.outcome;
            }
            if self.failed() {
                return Outcome::Failed;
            }
            let guard = bell.0.lock().unwrap_or_else(|e| e.into_inner());
            let (mut rung, _) = bell
                .1
                .wait_timeout_while(guard, Duration::from_millis(100), |r| !*r)
                .unwrap_or_else(|e| e.into_inner());
            *rung = false;
        }
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

    /// Records the address invites carry (at startup, before the loops
    /// run).
    ///
    /// # Errors
    /// On a database failure.
    pub fn set_public_addr(&self, addr: &str) -> Result<(), StoreError> {
        self.meta.insert("public_addr", addr.as_bytes())?;
        *self.public_addr.write().unwrap_or_else(|e| e.into_inner()) = Some(addr.to_string());
        Ok(())
    }

    /// Accounts, devices, invites and link codes (reads).
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// Groups and blocks (reads).
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// The group-commit flusher.
    pub fn flusher(&self) -> &Flusher {
        &self.flusher
    }

    /// Flushes everything written so far, on the caller's thread.
    ///
    /// # Errors
    /// On a database failure.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flusher.sync()
    }

    /// Whether the store failed (the daemon must stop).
    pub fn failed(&self) -> bool {
        self.status.failed.load(Ordering::SeqCst) || self.flusher.failed()
    }

    /// Runs `f` (quick: a waker) when the store fails.
    pub fn on_failure(&self, f: impl Fn() + Send + Sync + 'static) {
        self.status
            .on_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(f));
    }

    /// Writes every copy waiting in memory now rather than at its
    /// deadline (shutting down).
    pub fn write_all(&self) {
        self.live.lock().write_all = true;
        self.inbox.kick();
    }

    /// Sets the free-space floor (on SIGHUP) and measures at once.
    pub fn set_min_free(&self, bytes: u64) {
        self.status.min_free.store(bytes, Ordering::Relaxed);
        self.status.measure_space();
    }

    /// The free-space floor.
    pub fn min_free(&self) -> u64 {
        self.status.min_free.load(Ordering::Relaxed)
    }

    /// Free bytes on the data directory's filesystem, as last measured.
    pub fn free_space(&self) -> u64 {
        self.status.free.load(Ordering::Relaxed)
    }

    /// Bytes of every queue record and every blob kept: what the disk
    /// budget counts (exact; sled's files take more).
    pub fn queued_bytes(&self) -> u64 {
        self.live.lock().disk_used()
    }

    /// Entries and bytes one queue holds.
    pub fn queue_usage(&self, d: DeviceKey) -> (u64, u64) {
        self.live.lock().usage(d)
    }

    /// Entries and bytes `sender`'s messages and receipts hold in `d`'s
    /// queue, and in all queues (what the fair shares count, spec §10,
    /// *Quotas*).
    pub fn held_by(&self, d: DeviceKey, sender: UserId) -> ((u64, u64), (u64, u64)) {
        let (q, u) = self.live.lock().share_of(d, sender);
        ((q.count, q.bytes), (u.count, u.bytes))
    }

    /// How many (queue, sending user) pairs and sending users the fair
    /// shares count: about 40 bytes of memory each.
    pub fn shares_counted(&self) -> (usize, usize) {
        self.live.lock().shares_len()
    }

    /// Entries and bytes all queues hold.
    pub fn queue_totals(&self) -> (u64, u64) {
        self.live.lock().totals()
    }

    /// Bytes of copies waiting in memory to be written, and of durable
    /// entries cached for delivery.
    pub fn memory_held(&self) -> (u64, u64) {
        self.live.lock().held()
    }

    /// Messages remembered in memory (in flight and recently settled).
    pub fn remembered(&self) -> usize {
        self.live.lock().remembered()
    }

    /// Every entry of `d`'s queue with sequence ≥ `from`, up to `max`, in
    /// order: from disk, then from memory (for operators, tests and
    /// tools; it reads the disk on the caller's thread).
    ///
    /// # Errors
    /// On a database failure or a corrupt record.
    pub fn read_queue(
        &self,
        d: DeviceKey,
        from: u64,
        max: usize,
        out: &mut Vec<(u64, Entry)>,
    ) -> Result<(), StoreError> {
        let (hi, acked) = {
            let live = self.live.lock();
            (live.disk_hi(d), live.acked(d))
        };
        let start = out.len();
        // Records acknowledged but not yet deleted by the store thread are
        // gone already.
        let disk_from = from.max(acked.map_or(0, |a| a.saturating_add(1)));
        let covered = engine::read_disk(&self.queues, &self.spill, d, disk_from, hi, max, out)?;
        let got = out.len() - start;
        if got < max {
            let from = from.max(covered.saturating_add(1));
            let _ = self.live.lock().read(d, from, max - got, out);
        }
        Ok(())
    }

    /// The highest sequence given out in `d`'s queue (0: none).
    pub fn last_seq(&self, d: DeviceKey) -> u64 {
        self.live.lock().last_seq(d)
    }

    /// Turns the store thread has made (see the watchdog).
    pub fn store_beats(&self) -> u64 {
        self.status.beats.load(Ordering::Relaxed)
    }

    /// Wakes the store thread for a turn (the watchdog's probe).
    pub fn poke(&self) {
        self.inbox.kick();
    }

    /// Bytes the spill log's segment files take (for operators).
    pub fn spill_bytes(&self) -> u64 {
        self.spill.lock().unwrap_or_else(|e| e.into_inner()).bytes()
    }

    /// Bytes sled's files take on disk (for operators).
    ///
    /// # Errors
    /// On a database failure.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

impl StoreApi for Store {
    fn identify(&self, key: &PublicKey) -> Identity {
        self.accounts.identify(key)
    }

    fn user_id(&self, name: &str) -> Option<UserId> {
        self.accounts.user_id(name)
    }

    fn user_name(&self, user: UserId) -> Option<Arc<str>> {
        self.accounts.user_name(user)
    }

    fn current_devices(&self, user: UserId, out: &mut Vec<DeviceId>) -> bool {
        self.accounts.current_devices(user, out)
    }

    fn all_devices(&self, user: UserId, out: &mut Vec<DeviceId>) {
        self.accounts.all_devices(user, out)
    }

    fn device_infos(&self, user: UserId) -> Vec<DeviceInfo> {
        self.accounts.device_infos(user)
    }

    fn is_current(&self, d: DeviceKey) -> bool {
        self.accounts.is_current(d)
    }

    fn one_time_keys(&self, d: DeviceKey) -> Option<u32> {
        self.accounts.one_time_keys(d)
    }

    fn hides_presence(&self, user: UserId) -> bool {
        self.accounts.hides_presence(user)
    }

    fn group(&self, id: GroupId) -> Option<GroupView> {
        self.groups.read().view(id)
    }

    fn groups_of(&self, user: UserId) -> Vec<(GroupId, u64)> {
        self.groups.read().groups_of(user)
    }

    fn blocks(&self, blocker: UserId, blocked: UserId) -> bool {
        self.groups.read().blocks(blocker, blocked)
    }

    fn blocked_by(&self, blocker: UserId) -> Vec<UserId> {
        self.groups.read().blocked_by(blocker)
    }

    fn append_group(&self, m: NewGroupMessage, online: &dyn Fn(DeviceKey) -> bool, waiter: &Waiter) -> GroupAppended {
        // Lock order: the membership, then the live queues (see
        // `groups`): no change falls between the check and the append.
        let index = self.groups.read();
        let Some(g) = index.view(m.group).filter(|g| g.is_member(m.sender.user)) else {
            return GroupAppended::NotMember;
        };
        // A retry of a message accepted already is answered so, whatever
        // changed since (spec §10).
        if let Some(appended) = self.live.lock().recall(m.sender, m.id, waiter) {
            return GroupAppended::Appended {
                appended,
                online: Vec::new(),
                skipped: Vec::new(),
            };
        }
        let mut devices: Vec<(UserId, Vec<DeviceId>)> = Vec::with_capacity(g.members.len());
        let mut names: Vec<Arc<str>> = Vec::with_capacity(g.members.len());
        for (u, _) in &g.members {
            let mut ds = Vec::new();
            self.accounts.current_devices(*u, &mut ds);
            names.push(self.accounts.user_name(*u).unwrap_or_else(|| Arc::from("")));
            devices.push((*u, ds));
        }
        let digest = crate::keys::devices_digest(
            names
                .iter()
                .zip(&devices)
                .map(|(n, (_, ds))| (&**n, ds.iter().copied())),
        );
        if g.version != m.version || digest != m.devices {
            return GroupAppended::Mismatch;
        }
        let mut targets = Vec::new();
        let mut awake = Vec::new();
        for (user, ds) in &devices {
            for device in ds {
                let d = DeviceKey {
                    user: *user,
                    device: *device,
                };
                if d == m.sender {
                    continue;
                }
                let on = online(d);
                if on {
                    awake.push(d);
                }
                targets.push((d, on));
            }
        }
        let entry = Entry::Group(api::QueuedGroupMessage {
            id: m.id,
            from_user: m.sender.user.0,
            from_device: m.sender.device.0,
            group: m.group.0,
            time_ms: m.now_ms,
            fanout: targets.len().max(1) as u32,
            body: m.body,
        });
        let copies: Vec<(DeviceKey, Entry, bool)> = targets.into_iter().map(|(d, on)| (d, entry.clone(), on)).collect();
        let full = self.status.full.load(Ordering::Relaxed);
        let (appended, skipped, urgent) = {
            let mut live = self.live.lock();
            let (a, skipped) = live.append_fanout((m.sender, m.id), m.now_ms, copies, m.mono, waiter, full);
            (a, skipped, live.urgent)
        };
        drop(index);
        if urgent {
            self.inbox.kick();
        }
        awake.retain(|d| !skipped.contains(d));
        GroupAppended::Appended {
            appended,
            online: awake,
            skipped,
        }
    }

    fn append_shares(&self, m: NewMessage, waiter: &Waiter) -> (Appended, Vec<DeviceKey>) {
        let copies = m
            .copies
            .into_iter()
            .map(|(d, body, online)| {
                let e = Entry::Message(QueuedMessage {
                    id: m.id,
                    from_user: m.sender.user.0,
                    from_device: m.sender.device.0,
                    to_user: d.user.0,
                    time_ms: m.now_ms,
                    body,
                });
                (d, e, online)
            })
            .collect();
        let full = self.status.full.load(Ordering::Relaxed);
        let (r, urgent) = {
            let mut live = self.live.lock();
            let r = live.append_fanout((m.sender, m.id), m.now_ms, copies, m.mono, waiter, full);
            (r, live.urgent)
        };
        if urgent {
            self.inbox.kick();
        }
        r
    }

    fn append(&self, m: NewMessage, waiter: &Waiter) -> Appended {
        let now = m.mono;
        let (r, urgent) = {
            let mut live = self.live.lock();
            let r = live.append(m, now, waiter, self.status.full.load(Ordering::Relaxed));
            (r, live.urgent)
        };
        if urgent {
            self.inbox.kick();
        }
        r
    }

    fn recall(&self, sender: DeviceKey, id: crate::wire::MsgId, waiter: &Waiter) -> Option<Appended> {
        self.live.lock().recall(sender, id, waiter)
    }

    fn read(&self, d: DeviceKey, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> Read {
        self.live.lock().read(d, from, max, out)
    }

    fn ack(&self, d: DeviceKey, up_to: u64) {
        let kick = {
            let mut live = self.live.lock();
            live.ack(d, up_to);
            live.has_deletes()
        };
        if kick {
            self.inbox.kick();
        }
    }

    fn last_seq(&self, d: DeviceKey) -> u64 {
        self.live.lock().last_seq(d)
    }

    fn storage_full(&self) -> bool {
        self.status.full.load(Ordering::Relaxed)
    }

    fn submit(&self, op: Op, waiter: Option<Waiter>) {
        self.inbox.push(op, waiter);
    }

    fn blob(&self, op: BlobOp, waiter: Waiter) {
        self.blobs.submit(op, Some(waiter));
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
pub mod testing;
#[cfg(test)]
mod tests;
