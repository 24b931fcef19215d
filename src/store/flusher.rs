//! Group commit: one thread makes everything written since its last flush
//! durable with one `sled::Db::flush`, then wakes whoever waits for acks.
//!
//! Epochs: writers tag each write with [`Flusher::note_write`], which reads
//! the write epoch *after* the write completed. The flusher increments the
//! write epoch and only then flushes, so a write tagged `e` happened before
//! the flush that started by moving the epoch from `e` to `e + 1`; when that
//! flush returns, [`Flusher::durable`] becomes `e`. Acks for writes tagged
//! `≤ durable` may go out; no others.
//!
//! If a flush fails, `durable` never moves again and [`Flusher::failed`]
//! turns true: the daemon must stop rather than acknowledge anything.
//!
//! A flush syncs the spill log's segments written since the last flush
//! (and the spill directory when a segment was created) first, so that a
//! `q` record on disk always finds its body; then sled's `flush` and an
//! `fdatasync` of sled's data file. On
//! Linux sled's flush ends in `sync_file_range`, which writes the pages
//! but neither flushes the drive's volatile write cache nor commits the
//! file's new size and block allocation (sled issue #1452): enough for a
//! killed process, not for a power cut. The `fdatasync` completes it, once
//! per group commit.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::StoreError;

/// A point in the sequence of flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

type Waker = Box<dyn Fn() + Send + Sync>;
type Timer = Box<dyn Fn(std::time::Duration) + Send + Sync>;

#[derive(Default)]
struct State {
    dirty: bool,
    stop: bool,
    wakers: Vec<Waker>,
    /// Told how long each flush took (metrics).
    timers: Vec<Timer>,
}

struct Inner {
    db: sled::Db,
    /// sled's data file, opened only to `fdatasync` it.
    file: File,
    path: PathBuf,
    write_epoch: AtomicU64,
    durable: AtomicU64,
    failed: AtomicBool,
    flushes: AtomicU64,
    state: Mutex<State>,
    cond: Condvar,
    /// Spill segments (and directories) to sync before the next flush.
    first: Mutex<Vec<File>>,
}

/// The group-commit flusher. Cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    inner: Arc<Inner>,
}

impl Flusher {
    /// A flusher for `db`, whose data file is `file` (at `path`).
    pub(super) fn new(db: sled::Db, file: File, path: PathBuf) -> Flusher {
        Flusher {
            inner: Arc::new(Inner {
                db,
                file,
                path,
                write_epoch: AtomicU64::new(1),
                durable: AtomicU64::new(0),
                failed: AtomicBool::new(false),
                flushes: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                cond: Condvar::new(),
                first: Mutex::new(Vec::new()),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tags a write that just completed and asks for a flush. The write is
    /// durable once [`Flusher::durable`] ≥ the returned epoch.
    pub fn note_write(&self) -> Epoch {
        let e = self.inner.write_epoch.load(Ordering::SeqCst);
        let mut st = self.lock();
        if !st.dirty {
            st.dirty = true;
            self.inner.cond.notify_one();
        }
        Epoch(e)
    }

    /// Syncs `file` before sled's next flush (a spill segment just
    /// written to, or a directory that got a new entry).
    pub fn sync_first(&self, file: File) {
        self.inner.first.lock().unwrap_or_else(|e| e.into_inner()).push(file);
    }

    /// The epoch a write made now would get (without asking for a flush).
    pub fn current(&self) -> Epoch {
        self.note_write()
    }

    /// Every write tagged with this epoch or lower is durable.
    pub fn durable(&self) -> Epoch {
        Epoch(self.inner.durable.load(Ordering::SeqCst))
    }

    /// Whether a flush failed (then nothing more becomes durable).
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::SeqCst)
    }

    /// How many flushes completed (for tests and metrics).
    pub fn flushes(&self) -> u64 {
        self.inner.flushes.load(Ordering::SeqCst)
    }

    /// Registers a callback run after every flush (and after a failure),
    /// on the flusher thread. It must be quick: typically a `mio::Waker`.
    pub fn on_flush(&self, waker: impl Fn() + Send + Sync + 'static) {
        self.lock().wakers.push(Box::new(waker));
    }

    /// Registers a callback told how long each successful flush took.
    pub fn on_flush_time(&self, timer: impl Fn(std::time::Duration) + Send + Sync + 'static) {
        self.lock().timers.push(Box::new(timer));
    }

    /// Flushes once on the caller's thread, making every write tagged so
    /// far durable. Returns whether that worked.
    ///
    /// It flushes even when nothing is dirty: the flusher thread may have
    /// just taken the flag and still be flushing, and then the writes it
    /// took are not durable yet.
    pub fn flush_now(&self) -> bool {
        self.lock().dirty = false;
        if self.failed() {
            return false;
        }
        self.flush_once()
    }

    /// Makes every write that completed before the call durable, on the
    /// caller's thread, without touching epochs.
    ///
    /// # Errors
    /// If sled's flush or the `fdatasync` fails.
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        let first = std::mem::take(&mut *self.inner.first.lock().unwrap_or_else(|e| e.into_inner()));
        for f in first {
            f.sync_all().map_err(|source| StoreError::Io {
                path: self.inner.path.clone(),
                source,
            })?;
        }
        self.inner.db.flush()?;
        self.inner.file.sync_data().map_err(|source| StoreError::Io {
            path: self.inner.path.clone(),
            source,
        })
    }

    fn flush_once(&self) -> bool {
        let e = self.inner.write_epoch.fetch_add(1, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let ok = match self.sync() {
            Ok(_) => {
                let took = started.elapsed();
                for t in &self.lock().timers {
                    t(took);
                }
                self.inner.durable.fetch_max(e, Ordering::SeqCst);
                self.inner.flushes.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(err) => {
                log::error!("flush failed, acknowledging nothing more: {err}");
                self.inner.failed.store(true, Ordering::SeqCst);
                false
            }
        };
        for w in &self.lock().wakers {
            w();
        }
        ok
    }

    /// Starts the flusher thread.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(&self) -> std::io::Result<JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new().name("flusher".into()).spawn(move || {
            loop {
                {
                    let mut st = this.lock();
                    while !st.dirty && !st.stop {
                        st = this.inner.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    if st.stop && !st.dirty {
                        return;
                    }
                    st.dirty = false;
                }
                if !this.flush_once() {
                    return;
                }
            }
        })
    }

    /// Asks the flusher thread to flush what is dirty and exit.
    pub fn stop(&self) {
        let mut st = self.lock();
        st.stop = true;
        self.inner.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreConfig};

    /// The daemon's shutdown and the simulation call `flush_now` to make
    /// every write so far durable. If the flusher thread has just taken
    /// the dirty flag and is still flushing, the writes are not durable
    /// yet although nothing is dirty: `flush_now` must flush anyway.
    #[test]
    fn flush_now_covers_writes_a_running_flush_took() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        store.set_public_addr("example.org:7420").unwrap();
        let epoch = store.flusher().note_write();
        // What the flusher thread does first: take the flag. Its flush is
        // still under way.
        store.flusher().lock().dirty = false;
        assert!(store.flusher().flush_now());
        assert!(
            store.flusher().durable() >= epoch,
            "durable {:?} behind the write's epoch {epoch:?}",
            store.flusher().durable()
        );
    }
}
