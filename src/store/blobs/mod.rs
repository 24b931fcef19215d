//! Blobs: the ciphertext of attachments, uploaded in chunks and
//! downloaded in ranges (spec §5.7), kept as files under the data
//! directory's `blobs/` (see [`dir`] for the layout).
//!
//! One **blob thread** owns them, fed the way the store thread is: the
//! loops submit a [`BlobOp`] with a [`Waiter`] ([`super::StoreApi::blob`])
//! and get its [`BlobOutcome`] back through their sink, so no blob byte is
//! read or written on an event loop. It handles one operation at a time,
//! in the order they came, each bounded (a chunk of at most
//! [`crate::wire::MAX_BLOB_DATA`] bytes; the one long operation is hashing
//! an upload again after a restart), so a big transfer takes turns with
//! every other.
//!
//! The rules are in [`book`]; this module is the thread, the directory
//! and the ties to the rest of the store: blobs count in the disk budget
//! (through [`super::live`]'s count) and are refused below the
//! free-space floor.
//!
//! What it does not do: touch `sled` (a blob's record is a file beside
//! it, so the store thread never waits for a blob and a backup copies
//! `blobs/` as files), or know names and connections (the hub does).

pub(crate) mod book;
mod dir;
#[cfg(test)]
pub(crate) mod mem;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

pub use self::book::{BLOB_OVERHEAD, BlobStats, MAX_UPLOADS_PER_USER};
use self::book::{Blobs, Env};
use self::dir::Dir;
use super::accounts::Accounts;
use super::api::{Outcome, Waiter};
use super::live::Live;
use super::{Status, StoreError};
use crate::ids::{DeviceKey, UserId};
use crate::wire::{BlobData, BlobId, UploadStatus};

/// The directory under the data directory that holds the blobs.
pub const BLOBS_DIR: &str = "blobs";
/// Shards of `blobs/`: one per first byte of an id.
pub const SHARDS: u32 = 256;

/// Blob settings (the config file's `[blobs]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobConfig {
    /// The largest file taken (spec §6): blobs up to the length of a file
    /// this big sealed as spec §14.8 says ([`crate::wire::sealed_len`]).
    pub max_size: u64,
    /// Most bytes one user's blobs may take, uploads under way included,
    /// each counted with [`BLOB_OVERHEAD`] (spec §6).
    pub user_budget: u64,
    /// How long an upload may stay unfinished before it is removed.
    pub upload_ttl: Duration,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            max_size: 64 << 20,
            user_budget: 1 << 30,
            upload_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// An operation for the blob thread. The hub has checked what the frame
/// alone shows (lengths, names); the blob thread checks the rest.
#[derive(Debug, Clone)]
pub enum BlobOp {
    /// Start an upload, or say how far it got (spec §5.7, `UploadStart`).
    Start {
        /// The uploading device.
        device: DeviceKey,
        /// The blob.
        id: BlobId,
        /// Its size.
        size: u64,
        /// Users who may read it besides the uploader's.
        access: Vec<UserId>,
        /// The devices it is for (those of `access` and the uploader's
        /// other devices): it goes once they all fetched it.
        expect: Vec<DeviceKey>,
        /// Now.
        now_ms: u64,
    },
    /// Bytes of an upload.
    Chunk {
        /// Who.
        device: DeviceKey,
        /// Which upload.
        id: BlobId,
        /// Where.
        offset: u64,
        /// What.
        data: Bytes,
    },
    /// Finish an upload: check, make durable.
    Finish {
        /// Who.
        device: DeviceKey,
        /// Which upload.
        id: BlobId,
        /// Now.
        now_ms: u64,
    },
    /// Read a range.
    Read {
        /// Who.
        device: DeviceKey,
        /// Which blob.
        id: BlobId,
        /// From.
        offset: u64,
        /// At most.
        len: u32,
    },
    /// A device has the whole blob.
    Fetched {
        /// Which device.
        device: DeviceKey,
        /// Which blob.
        id: BlobId,
    },
    /// More users may read a blob.
    Grant {
        /// Who grants.
        device: DeviceKey,
        /// Which blob.
        id: BlobId,
        /// The users.
        access: Vec<UserId>,
        /// Their devices (and the granter's other devices).
        expect: Vec<DeviceKey>,
        /// Now.
        now_ms: u64,
    },
    /// A user lets go of a blob (or abandons its upload).
    Delete {
        /// Who.
        device: DeviceKey,
        /// Which blob.
        id: BlobId,
    },
    /// One turn of the retention sweep: shard `shard` (and, on shard 0,
    /// unfinished uploads).
    Sweep {
        /// Which shard.
        shard: u32,
        /// Blobs stored or last granted before this expire.
        cutoff_ms: u64,
        /// Now.
        now_ms: u64,
    },
}

impl BlobOp {
    /// The operation's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            BlobOp::Start { .. } => "start",
            BlobOp::Chunk { .. } => "chunk",
            BlobOp::Finish { .. } => "finish",
            BlobOp::Read { .. } => "read",
            BlobOp::Fetched { .. } => "fetched",
            BlobOp::Grant { .. } => "grant",
            BlobOp::Delete { .. } => "delete",
            BlobOp::Sweep { .. } => "sweep",
        }
    }
}

/// What a blob operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobOutcome {
    /// How far an upload is.
    Status(UploadStatus),
    /// A range of a blob.
    Data(BlobData),
    /// Done (fetched, grant, delete).
    Done,
    /// A sweep turn: the next shard to sweep, if any, and how many blobs
    /// and uploads went.
    Swept {
        /// The next turn's shard; `None` after the last.
        next: Option<u32>,
        /// Removed in this turn.
        removed: usize,
    },
    /// Refused; nothing changed.
    Refused(BlobRefused),
    /// The disk failed; the request may be retried.
    Failed,
}

/// Why a blob operation was refused (each maps to a wire code in the
/// hub's refusal map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRefused {
    /// Over the largest blob taken.
    TooLarge {
        /// The longest blob taken.
        max: u64,
    },
    /// Over the user's budget.
    Budget,
    /// The user has the most uploads under way already.
    Uploads,
    /// Over the disk budget.
    DiskBudget,
    /// Below the free-space floor.
    StorageFull,
    /// No such blob or upload for this user.
    Unknown,
    /// The bytes do not hash to the id (the upload was dropped).
    Mismatch,
    /// A chunk that does not start where the upload stands.
    Offset {
        /// Bytes held.
        received: u64,
    },
    /// Past the blob's end.
    PastEnd {
        /// Its size.
        size: u64,
    },
    /// Finished before every byte came.
    Incomplete {
        /// Bytes held.
        received: u64,
    },
    /// Started again with another size.
    SizeMismatch {
        /// The size it has.
        size: u64,
    },
    /// Another user holds (or uploads) a blob with this id.
    Taken,
    /// A blob of 0 bytes.
    Empty,
}

/// The disk budget, the free-space floor and the account directory, as
/// the blob rules see them.
struct StoreEnv {
    live: Arc<Live>,
    status: Arc<Status>,
    accounts: Arc<Accounts>,
}

impl Env for StoreEnv {
    fn reserve(&self, bytes: u64) -> bool {
        // Under the queues' lock, so that messages and blobs never take
        // the same room twice.
        let budget = self.live.config.quotas.disk_budget;
        let mut live = self.live.lock();
        if (live.disk_used() + live.unwritten()).saturating_add(bytes) > budget {
            return false;
        }
        live.disk_delta(bytes as i64);
        true
    }

    fn adjust(&self, delta: i64) {
        self.live.lock().disk_delta(delta);
    }

    fn storage_full(&self) -> bool {
        self.status.full.load(Ordering::Relaxed)
    }

    fn above_floor(&self) -> u64 {
        let free = self.status.free.load(Ordering::Relaxed);
        free.saturating_sub(self.status.min_free.load(Ordering::Relaxed))
    }

    fn set_to_come(&self, bytes: u64) {
        self.status.set_to_come(bytes);
    }

    fn is_current(&self, d: DeviceKey) -> bool {
        self.accounts.is_current(d)
    }
}

#[derive(Default)]
struct InboxState {
    ops: Vec<(BlobOp, Option<Waiter>)>,
    stop: bool,
}

#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    cond: Condvar,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The blob store: its inbox, and its state until [`BlobStore::start`]
/// moves that to the blob thread.
pub(crate) struct BlobStore {
    inbox: Arc<Inbox>,
    blobs: Mutex<Option<Blobs<Dir, StoreEnv>>>,
    /// Its `files` lock is held for each operation (a backup holds it
    /// while it copies `blobs/`).
    status: Arc<Status>,
}

impl BlobStore {
    /// Opens `data_dir/blobs`, counting what it holds in the disk budget.
    ///
    /// # Errors
    /// If the directory cannot be made or read.
    pub fn open(
        data_dir: &Path,
        config: BlobConfig,
        live: Arc<Live>,
        status: Arc<Status>,
        accounts: Arc<Accounts>,
    ) -> Result<BlobStore, StoreError> {
        let root = data_dir.join(BLOBS_DIR);
        let io = |source| StoreError::Io {
            path: root.clone(),
            source,
        };
        let dir = Dir::open(&root).map_err(io)?;
        let env = StoreEnv {
            live,
            status: status.clone(),
            accounts,
        };
        let blobs = Blobs::open(dir, env, config).map_err(io)?;
        // Uploads under way at the restart keep their room above the floor.
        status.set_to_come(blobs.to_come());
        let stats = blobs.stats();
        if stats.bytes > 0 {
            log::info!(
                "blobs: {} KiB kept, {} uploads under way",
                stats.bytes >> 10,
                stats.uploads
            );
        }
        Ok(BlobStore {
            inbox: Arc::new(Inbox::default()),
            blobs: Mutex::new(Some(blobs)),
            status,
        })
    }

    /// Queues an operation for the blob thread.
    pub fn submit(&self, op: BlobOp, waiter: Option<Waiter>) {
        let mut st = self.inbox.lock();
        st.ops.push((op, waiter));
        self.inbox.cond.notify_one();
    }

    /// Starts the blob thread.
    ///
    /// # Errors
    /// If it cannot be spawned, or was started before.
    pub fn start(&self) -> std::io::Result<JoinHandle<()>> {
        let mut blobs = self
            .blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| std::io::Error::other("the blob thread runs already"))?;
        let inbox = self.inbox.clone();
        let status = self.status.clone();
        std::thread::Builder::new().name("blobs".into()).spawn(move || {
            loop {
                let ops = {
                    let mut st = inbox.lock();
                    while st.ops.is_empty() && !st.stop {
                        st = inbox.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    if st.ops.is_empty() {
                        return;
                    }
                    std::mem::take(&mut st.ops)
                };
                for (op, waiter) in ops {
                    let outcome = {
                        let _files = status.files.lock().unwrap_or_else(|e| e.into_inner());
                        blobs.handle(op)
                    };
                    if let Some(w) = waiter {
                        w.complete(Outcome::Blob(outcome));
                    }
                }
            }
        })
    }

    /// Runs what was submitted on the caller's thread (for simulations,
    /// which start no threads).
    pub fn step(&self) {
        let ops = std::mem::take(&mut self.inbox.lock().ops);
        let mut guard = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(blobs) = guard.as_mut() else { return };
        for (op, waiter) in ops {
            let outcome = {
                let _files = self.status.files.lock().unwrap_or_else(|e| e.into_inner());
                blobs.handle(op)
            };
            if let Some(w) = waiter {
                w.complete(Outcome::Blob(outcome));
            }
        }
    }

    /// Bytes the blobs count in the disk budget (ciphertext and record of
    /// each blob and upload), while the blob thread is not started.
    #[cfg(test)]
    pub fn counted(&self) -> u64 {
        let guard = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map_or(0, |b| b.stats().bytes)
    }

    /// Asks the thread to finish what was submitted and stop.
    pub fn stop(&self) {
        self.inbox.lock().stop = true;
        self.inbox.cond.notify_all();
    }
}
