//! Rates per device (spec §6): token buckets with a burst, on the time the
//! driver passes in, so that the hub stays sans-I/O and its tests run on
//! a virtual clock.
//!
//! A bucket holds up to `burst` tokens and gains `per_minute` a minute;
//! each request takes one, and a request that finds less than one is
//! refused with the time until there is one (what the client is told to
//! wait: `RetryAfter`, spec §5.3). One table per kind of request, shared
//! by every loop, keyed by device: a device's allowance does not grow
//! with its connections or with the loops they land on.
//!
//! What it guarantees: over any interval of `t` seconds a device makes at
//! most `burst + per_minute · t / 60` requests of a kind. What it does not
//! do: remember anything across restarts (a restart refills every bucket),
//! or limit devices together (a user's allowance is that of its devices).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::DeviceKey;

/// A rate: `per_minute` a minute, in bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many a minute, sustained.
    pub per_minute: u32,
    /// How many at once, after a quiet while.
    pub burst: u32,
}

impl Rate {
    /// `n` a minute, in bursts of up to `n`.
    pub const fn per_minute(n: u32) -> Rate {
        Rate {
            per_minute: n,
            burst: n,
        }
    }

    fn per_sec(self) -> f64 {
        f64::from(self.per_minute.max(1)) / 60.0
    }
}

/// One device's tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec()).min(f64::from(rate.burst));
        self.last = self.last.max(now);
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate.per_sec();
            // Rounded up to the millisecond, so that trying again after
            // it finds a token.
            Err(Duration::from_millis((wait * 1000.0).ceil() as u64))
        }
    }

    /// Whether it would be full at `now` (then it can be forgotten).
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= f64::from(rate.burst)
    }
}

/// Past this many devices in one table, the buckets that have refilled are
/// forgotten (a forgotten bucket and a full one are the same).
const FORGET_PAST: usize = 10_000;

/// The buckets of one kind of request, per device.
#[derive(Debug)]
pub struct Buckets {
    rate: Rate,
    table: Mutex<HashMap<DeviceKey, Bucket>>,
}

impl Buckets {
    /// An empty table for `rate`.
    pub fn new(rate: Rate) -> Buckets {
        Buckets {
            rate,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one token from `d`'s bucket, or says how long until it has
    /// one.
    ///
    /// # Errors
    /// The time to wait, when the bucket is empty.
    pub fn take(&self, d: DeviceKey, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= FORGET_PAST && !table.contains_key(&d) {
            table.retain(|_, b| !b.is_full(rate, now));
        }
        table
            .entry(d)
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Devices with a bucket kept (those that used some of it lately).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;
    use crate::wire::DeviceId;

    fn dev(u: u32) -> DeviceKey {
        DeviceKey {
            user: UserId(u),
            device: DeviceId(1),
        }
    }

    #[test]
    fn a_burst_then_the_rate_with_the_time_to_wait() {
        let b = Buckets::new(Rate {
            per_minute: 60,
            burst: 5,
        });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.take(dev(1), t0), Ok(()));
        }
        assert_eq!(b.take(dev(1), t0), Err(Duration::from_secs(1)));
        // Another device has its own.
        assert_eq!(b.take(dev(2), t0), Ok(()));
        // Half a token later: half a second to wait.
        assert_eq!(
            b.take(dev(1), t0 + Duration::from_millis(500)),
            Err(Duration::from_millis(500))
        );
        assert_eq!(b.take(dev(1), t0 + Duration::from_secs(1)), Ok(()));
        // Never more than the burst, however long the quiet.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(b.take(dev(1), later), Ok(()));
        }
        assert!(b.take(dev(1), later).is_err());
    }

    #[test]
    fn over_any_interval_at_most_the_burst_and_the_rate() {
        let rate = Rate {
            per_minute: 30,
            burst: 7,
        };
        let b = Buckets::new(rate);
        let t0 = Instant::now();
        let mut granted = 0u64;
        // A request every 100 ms for ten minutes.
        for i in 0..6000u64 {
            if b.take(dev(1), t0 + Duration::from_millis(100 * i)).is_ok() {
                granted += 1;
            }
        }
        // 600 s at 0.5 a second, and the first burst.
        assert!(granted <= 7 + 300, "{granted}");
        assert!(granted >= 300, "{granted}");
    }

    #[test]
    fn full_buckets_are_forgotten_when_the_table_is_large() {
        let b = Buckets::new(Rate::per_minute(60));
        let t0 = Instant::now();
        for u in 0..FORGET_PAST as u32 {
            b.take(dev(u), t0).unwrap();
        }
        assert_eq!(b.len(), FORGET_PAST);
        // A minute later every one has refilled: the next new device
        // clears them.
        b.take(dev(u32::MAX), t0 + Duration::from_secs(61)).unwrap();
        assert_eq!(b.len(), 1);
    }
}
