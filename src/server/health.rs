//! Whether the daemon is healthy, and telling systemd so.
//!
//! A watchdog thread wakes every event loop and the store thread once a
//! second and checks that each made a turn since the last time (their
//! heartbeats). While all do, it sends systemd `WATCHDOG=1` (when the unit
//! asks for it with `WatchdogSec=`); when one is stuck it stops, so that
//! systemd restarts the daemon. It also sends a `STATUS=` line every few
//! seconds (connections, devices online, queued entries, the oldest
//! undelivered one's age). [`Health::snapshot`] is what `tidingsd status`
//! shows.
//!
//! What it does not do: restart anything itself, or judge the machine
//! (that is `tidingsd doctor`).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Loops;
use super::metrics::{Gauges, Metrics};
use crate::hub::Shared;
use crate::store::Store;

/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);
/// Ticks a component may go without a turn, though woken, before it counts
/// as stalled.
const STALL_TICKS: u32 = 5;
/// How often the `STATUS=` line is sent.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The daemon's health, shared by the watchdog, the admin socket and the
/// metrics endpoint.
pub struct Health {
    started: Instant,
    store: Arc<Store>,
    shared: Arc<Shared>,
    loops: Loops,
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// What is stuck, if anything.
    stalled: Mutex<Option<String>>,
}

/// What `tidingsd status` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The daemon's version.
    pub version: &'static str,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Open connections.
    pub connections: u64,
    /// Devices connected.
    pub online_devices: u64,
    /// Entries in all queues.
    pub queued_messages: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Age of the oldest entry waiting in a queue, if any.
    pub oldest_undelivered_s: Option<u64>,
    /// Bytes the data directory takes.
    pub disk_used_bytes: u64,
    /// Free bytes on its filesystem.
    pub disk_free_bytes: u64,
    /// The free-space floor.
    pub min_free_bytes: u64,
    /// 99th percentile of flush times, if there was a flush.
    pub flush_p99_ms: Option<f64>,
    /// What is stuck, if anything.
    pub stalled: Option<String>,
    /// No stall, free space above the floor, the store working.
    pub healthy: bool,
    /// The daemon's process id (for `doctor`).
    pub pid: u32,
}

impl Health {
    /// Health of a daemon started now.
    pub fn new(
        store: Arc<Store>,
        shared: Arc<Shared>,
        loops: Loops,
        open: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    ) -> Arc<Health> {
        Arc::new(Health {
            started: Instant::now(),
            store,
            shared,
            loops,
            open,
            metrics,
            stalled: Mutex::new(None),
        })
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What the gauges show now.
    pub fn gauges(&self) -> Gauges {
        let (entries, bytes) = self.store.queue_totals();
        Gauges {
            connections: self.open.load(Ordering::Relaxed) as u64,
            online: self.shared.online_count() as u64,
            queued_entries: entries,
            queued_bytes: bytes,
            store_bytes: dir_size(self.store.dir()),
        }
    }

    /// What is stuck, if anything.
    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything `tidingsd status` shows.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.gauges();
        let free = fs2::available_space(self.store.dir()).unwrap_or_else(|_| self.store.free_space());
        let min_free = self.store.min_free();
        let now_ms = crate::hub::Now::read().unix_ms;
        let oldest = match self.store.oldest_queued_ms() {
            Ok(o) => o.map(|t| now_ms.saturating_sub(t) / 1000),
            Err(e) => {
                log::warn!("status: reading the queues: {e}");
                None
            }
        };
        let stalled = self.stalled();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            connections: g.connections,
            online_devices: g.online,
            queued_messages: g.queued_entries,
            queued_bytes: g.queued_bytes,
            oldest_undelivered_s: oldest,
            disk_used_bytes: g.store_bytes,
            disk_free_bytes: free,
            min_free_bytes: min_free,
            flush_p99_ms: self.metrics.flush_p99_ms(),
            healthy: stalled.is_none() && free >= min_free && !self.store.failed(),
            stalled,
            pid: std::process::id(),
        }
    }

    fn status_line(&self) -> String {
        let g = self.gauges();
        let now_ms = crate::hub::Now::read().unix_ms;
        let oldest = match self.store.oldest_queued_ms() {
            Ok(Some(t)) => format!(", oldest undelivered {} s old", now_ms.saturating_sub(t) / 1000),
            _ => String::new(),
        };
        let stalled = match self.stalled() {
            Some(what) => format!("; STALLED: {what}"),
            None => String::new(),
        };
        format!(
            "{} connections, {} devices online, {} queued{oldest}{stalled}",
            g.connections, g.online, g.queued_entries
        )
    }
}

/// Bytes the files under `dir` take (their lengths), best effort.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for e in entries.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => total += dir_size(&e.path()),
            Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
            _ => {}
        }
    }
    total
}

/// The running watchdog thread.
pub struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the watchdog: heartbeats checked every second; `WATCHDOG=1`
    /// sent at half of systemd's `WATCHDOG_USEC` while all is well, and a
    /// `STATUS=` line every 10 s, when systemd asked for them.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(health: Arc<Health>) -> std::io::Result<Watchdog> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let interval = sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(100)));
        let thread = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
            let mut last_loops = health.loops.beats();
            let mut last_store = health.store.store_beats();
            let mut quiet_loops = vec![0u32; last_loops.len()];
            let mut quiet_store = 0u32;
            let mut last_kick: Option<Instant> = None;
            let mut last_status: Option<Instant> = None;
            let tick = interval.map_or(TICK, |i| i.min(TICK));
            loop {
                // Wake everyone, so that a healthy component turns before
                // the next look.
                health.loops.wake_all();
                health.store.poke();
                {
                    let (lock, cond) = &*flag;
                    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (guard, _) = cond
                        .wait_timeout_while(guard, tick, |s| !*s)
                        .unwrap_or_else(|e| e.into_inner());
                    if *guard {
                        return;
                    }
                }
                let loops = health.loops.beats();
                let store = health.store.store_beats();
                let mut stuck = Vec::new();
                for (i, (now, before)) in loops.iter().zip(&last_loops).enumerate() {
                    quiet_loops[i] = if now == before { quiet_loops[i] + 1 } else { 0 };
                    if quiet_loops[i] >= STALL_TICKS {
                        stuck.push(format!("event loop {i}"));
                    }
                }
                quiet_store = if store == last_store { quiet_store + 1 } else { 0 };
                if quiet_store >= STALL_TICKS {
                    stuck.push("the store thread".to_string());
                }
                if health.store.failed() {
                    stuck.push("the store (it failed)".to_string());
                }
                last_loops = loops;
                last_store = store;
                let what = (!stuck.is_empty()).then(|| stuck.join(", "));
                {
                    let mut s = health.stalled.lock().unwrap_or_else(|e| e.into_inner());
                    if *s != what {
                        match &what {
                            Some(w) => log::error!("stalled: {w} made no progress for {STALL_TICKS} s"),
                            None => log::warn!("no longer stalled"),
                        }
                    }
                    *s = what.clone();
                }
                let now = Instant::now();
                if let Some(every) = interval
                    && what.is_none()
                    && last_kick.is_none_or(|t| now >= t + every)
                {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    last_kick = Some(now);
                }
                if std::env::var_os("NOTIFY_SOCKET").is_some() && last_status.is_none_or(|t| now >= t + STATUS_EVERY) {
                    let line = health.status_line();
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
                    last_status = Some(now);
                }
            }
        })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (lock, cond) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that does not turn, though woken, is reported stalled and
    /// makes the daemon unhealthy; the store thread, which turns, is not.
    #[test]
    fn a_loop_that_never_turns_is_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::server::ServerConfig::new(dir.path().join("data"));
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.store.min_free = 0;
        // Bound but not run: the loop never turns; the store thread does.
        let server = crate::server::Server::bind(&config).unwrap();
        let health = server.health().clone();
        assert!(health.snapshot().healthy);
        let watchdog = Watchdog::start(health.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while health.stalled().is_none() {
            assert!(Instant::now() < deadline, "never reported stalled");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(health.stalled().as_deref(), Some("event loop 0"));
        assert!(!health.snapshot().healthy);
        watchdog.stop();
    }
}
