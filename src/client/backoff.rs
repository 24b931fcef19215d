//! The one retry schedule of the client: exponential backoff with a cap,
//! and optionally a limit on tries or on the time spent.
//!
//! Pure: it takes the time as an input and says when to try next, or that
//! it is time to give up; the caller (an operation, through its driver)
//! does the waiting. Every retry in the client goes through a [`Backoff`]:
//! reconnecting in `listen`, `sync` and `chat`, retrying a send, a
//! `Retract`, and pausing between `Mismatch` answers.

use std::time::{Duration, Instant};

/// A retry schedule: waits of `first`, `2 × first`, ... up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    tries: u32,
    max_tries: Option<u32>,
    give_up_after: Option<Duration>,
    deadline: Option<Instant>,
    started: Option<Instant>,
}

impl Backoff {
    /// Waits doubling from `first` up to `max`, for ever.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
            tries: 0,
            max_tries: None,
            give_up_after: None,
            deadline: None,
            started: None,
        }
    }

    /// Gives up once a retry would start after `deadline`.
    pub const fn until(mut self, deadline: Instant) -> Backoff {
        self.deadline = Some(deadline);
        self
    }

    /// Gives up after `n` retries.
    pub const fn with_max_tries(mut self, n: u32) -> Backoff {
        self.max_tries = Some(n);
        self
    }

    /// Gives up once a retry would start more than `limit` after the first
    /// failure.
    pub const fn giving_up_after(mut self, limit: Duration) -> Backoff {
        self.give_up_after = Some(limit);
        self
    }

    /// After a failure at `now`: when to try again, or `None` to give up.
    pub fn next(&mut self, now: Instant) -> Option<Instant> {
        let started = *self.started.get_or_insert(now);
        if self.max_tries.is_some_and(|m| self.tries >= m) {
            return None;
        }
        let at = now + self.next;
        if self.give_up_after.is_some_and(|limit| at > started + limit) || self.deadline.is_some_and(|d| at > d) {
            return None;
        }
        self.tries += 1;
        self.next = (self.next * 2).min(self.max);
        Some(at)
    }

    /// The wait the next failure will get.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// How many retries were granted since the last success.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// After a success: the next failure starts the schedule afresh.
    pub fn reset(&mut self) {
        self.next = self.first;
        self.tries = 0;
        self.started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_starts_again_after_a_success() {
        let t0 = Instant::now();
        let mut b = Backoff::new(100 * MS, 350 * MS);
        let waits: Vec<Duration> = (0..5).map(|_| b.next(t0).unwrap() - t0).collect();
        assert_eq!(waits, [100 * MS, 200 * MS, 350 * MS, 350 * MS, 350 * MS]);
        assert_eq!(b.tries(), 5);
        b.reset();
        assert_eq!(b.next(t0).unwrap() - t0, 100 * MS);
    }

    #[test]
    fn gives_up_after_its_tries_or_its_time() {
        let t0 = Instant::now();
        let mut b = Backoff::new(100 * MS, Duration::from_secs(1)).with_max_tries(2);
        assert!(b.next(t0).is_some());
        assert!(b.next(t0).is_some());
        assert_eq!(b.next(t0), None);
        // Time: the first failure starts the clock; a retry that would
        // start past the limit is not granted.
        let mut b = Backoff::new(100 * MS, 400 * MS).giving_up_after(Duration::from_secs(1));
        let mut now = t0;
        let mut retries = 0;
        while let Some(at) = b.next(now) {
            now = at + 10 * MS; // the attempt itself takes a moment
            retries += 1;
        }
        // 100, 200, 400 (at 0.73 s); the next would start at 1.14 s.
        assert_eq!(retries, 3);
        b.reset();
        assert!(b.next(now).is_some(), "a success restarts the clock");
    }
}
