//! The retention sweeper: a thread that, every `sweep_every`, walks the
//! queues in bounded turns ([`crate::store::Store::sweep`]), expiring what
//! is older than the retention period with notices to both sides, and waking
//! the loops of online devices that got a notice. Each pass also removes
//! expired link codes and invites
//! ([`crate::store::Accounts::sweep_codes`]), so that they cannot pile up,
//! and then walks the blobs a shard at a time (spec §5.7): blobs past the
//! retention period, uploads left unfinished, and blobs no device can
//! fetch any more go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Loops;
use crate::hub::{Effect, Now, Shared};
use crate::store::{BlobOp, BlobOutcome, Op, Outcome, Store};

/// Retention settings.
#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Queue entries and dedup records older than this expire.
    pub period: Duration,
    /// Pause between sweeps.
    pub sweep_every: Duration,
    /// Keys looked at per turn (the bound on work done under the queue
    /// lock, and between pauses).
    pub batch: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            period: Duration::from_secs(30 * 24 * 3600),
            sweep_every: Duration::from_secs(60),
            batch: 2_000,
        }
    }
}

/// The running sweeper.
pub struct Sweeper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the sweeper thread.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(
        store: Arc<Store>,
        shared: Arc<Shared>,
        loops: Loops,
        config: RetentionConfig,
    ) -> std::io::Result<Sweeper> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let stopping = stopped.clone();
        let thread = std::thread::Builder::new().name("sweeper".into()).spawn(move || {
            let stopped = stopping;
            loop {
                sweep_once(&store, &shared, &loops, &config, &stopped);
                let (lock, cond) = &*flag;
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, _) = cond
                    .wait_timeout_while(guard, config.sweep_every, |s| !*s)
                    .unwrap_or_else(|e| e.into_inner());
                if *guard {
                    return;
                }
            }
        })?;
        Ok(Sweeper {
            stop,
            stopped,
            thread: Some(thread),
        })
    }

    /// Stops the thread (after its current turn).
    pub fn stop(mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        let (lock, cond) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One full pass over the queues, in bounded turns.
pub fn sweep_once(store: &Store, shared: &Shared, loops: &Loops, config: &RetentionConfig, stopped: &AtomicBool) {
    let mut cursor = Vec::new();
    let (mut expired, mut forgotten) = (0, 0);
    loop {
        if stopped.load(Ordering::Relaxed) {
            return;
        }
        let now = Now::read();
        let cutoff_ms = now.unix_ms.saturating_sub(config.period.as_millis() as u64);
        match store.call(Op::Sweep {
            cursor: std::mem::take(&mut cursor),
            cutoff_ms,
            max_keys: config.batch,
            now_ms: now.unix_ms,
        }) {
            Outcome::Swept(swept, next) => {
                cursor = next;
                expired += swept.expired;
                forgotten += swept.forgotten;
                for d in swept.notified {
                    if let Some(conn) = shared.connection_of(d) {
                        loops.post(Effect::Wake(conn));
                    }
                }
                if swept.wrapped {
                    break;
                }
            }
            _ => {
                log::error!("retention sweep failed");
                return;
            }
        }
        // Let the store thread serve the loops between turns.
        std::thread::sleep(Duration::from_millis(1));
    }
    if expired > 0 {
        log::info!("retention: {expired} undelivered messages expired; their senders and devices were told");
    }
    if forgotten > 0 {
        log::debug!("retention: forgot {forgotten} message and retraction records");
    }
    sweep_blobs(store, config, stopped);
}

/// One pass over the blobs, a shard a turn (the blob thread serves
/// transfers between turns).
pub fn sweep_blobs(store: &Store, config: &RetentionConfig, stopped: &AtomicBool) {
    let mut shard = Some(0);
    let mut removed = 0;
    while let Some(s) = shard {
        if stopped.load(Ordering::Relaxed) {
            return;
        }
        let now = Now::read();
        let cutoff_ms = now.unix_ms.saturating_sub(config.period.as_millis() as u64);
        match store.call_blob(BlobOp::Sweep {
            shard: s,
            cutoff_ms,
            now_ms: now.unix_ms,
        }) {
            BlobOutcome::Swept { next, removed: n } => {
                shard = next;
                removed += n;
            }
            _ => {
                log::error!("blob sweep failed");
                return;
            }
        }
    }
    if removed > 0 {
        log::info!("retention: removed {removed} blobs and unfinished uploads");
    }
}
