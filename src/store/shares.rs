//! Fair shares (spec §10, *Fair shares*): who holds how much of each queue, and
//! of the server's storage, so that no one sender, and no pair of accounts,
//! can make the server refuse anyone else.
//!
//! Every queue entry with a sender (a message copy, a receipt) is counted
//! twice more than its queue counts it: for its **sending user within its
//! queue** and for its **sending user in all queues**. The server's own
//! notices (gap, expiry) belong to nobody. Two rules use the counts:
//!
//! - **within a queue**, a sender may hold at most half of the room the
//!   other senders leave: adding `n` entries of `b` bytes needs
//!   `mine + 2n ≤ free` in entries and in bytes, where `free` is what the
//!   queue's quota has left. A lone sender gets half of an empty queue, and
//!   whatever the others hold, a new sender finds room while the queue has
//!   room for two of its entries;
//! - **in all queues**, a user's entries (and the records of the messages
//!   it retracted, which stay for the retention period) may take at most
//!   its fixed share
//!   (`Quotas::user_bytes`, `Quotas::user_messages`: an eighth of the disk
//!   budget and of the copies on disk, by default), and at most half of the
//!   room the others leave in the budget, by the same rule.
//!
//! What it costs: one map entry per (queue, sending user) pair with
//! something queued, and one per sending user: about 40 bytes each, and
//! nothing per entry (the spill log's index keeps each copy's sending user
//! in the 24 bytes it had). The counts are kept exact wherever an entry
//! comes or goes (append, ack, expiry, retraction, fold, revocation), and
//! recounted at open from the spill log and the `q` records.
//!
//! What it does not do: decide who may send to whom (the hub), or rate
//! (the hub's buckets).

use std::collections::HashMap;

use crate::ids::{DeviceKey, UserId};

/// Entries and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Use {
    /// How many.
    pub count: u64,
    /// Their bytes, as quotas count them.
    pub bytes: u64,
}

impl Use {
    /// One entry of `bytes`.
    pub fn one(bytes: u64) -> Use {
        Use { count: 1, bytes }
    }

    fn add(&mut self, u: Use) {
        self.count += u.count;
        self.bytes += u.bytes;
    }

    fn sub(&mut self, u: Use) {
        self.count = self.count.saturating_sub(u.count);
        self.bytes = self.bytes.saturating_sub(u.bytes);
    }

    fn is_zero(&self) -> bool {
        self.count == 0 && self.bytes == 0
    }
}

/// Whether a holder of `mine` may add `add` where the others leave `free`
/// (entries and bytes): at most half of the room the others leave,
/// `mine + 2·add ≤ free` in both.
pub(crate) fn fair(mine: Use, add: Use, free: Use) -> bool {
    mine.count.saturating_add(add.count.saturating_mul(2)) <= free.count
        && mine.bytes.saturating_add(add.bytes.saturating_mul(2)) <= free.bytes
}

/// The room a limit leaves above a use.
pub(crate) fn room(limit: Use, used: Use) -> Use {
    Use {
        count: limit.count.saturating_sub(used.count),
        bytes: limit.bytes.saturating_sub(used.bytes),
    }
}

/// Entries that went from one queue, by sender (for
/// [`super::live::Guard::deleted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Gone {
    /// All of them.
    pub all: Use,
    /// Per sending user; `None`: the server's notices.
    by: Vec<(Option<UserId>, Use)>,
}

impl Gone {
    /// One entry of `bytes` from `sender` went.
    pub fn add(&mut self, sender: Option<UserId>, bytes: u64) {
        self.all.add(Use::one(bytes));
        // Entries of one queue come mostly in runs from one sender.
        match self.by.iter_mut().rev().find(|(s, _)| *s == sender) {
            Some((_, u)) => u.add(Use::one(bytes)),
            None => self.by.push((sender, Use::one(bytes))),
        }
    }

    /// Adds everything `other` counted.
    pub fn merge(&mut self, other: Gone) {
        self.all.add(other.all);
        for (sender, u) in other.by {
            match self.by.iter_mut().find(|(s, _)| *s == sender) {
                Some((_, mine)) => mine.add(u),
                None => self.by.push((sender, u)),
            }
        }
    }

    /// How many entries and bytes.
    pub fn totals(&self) -> (u64, u64) {
        (self.all.count, self.all.bytes)
    }
}

/// The counts: per (queue, sending user) and per sending user.
#[derive(Debug, Default)]
pub(crate) struct Shares {
    queues: HashMap<(DeviceKey, UserId), Use>,
    users: HashMap<UserId, Use>,
}

impl Shares {
    /// An entry of `bytes` from `sender` joined `d`'s queue.
    pub fn add(&mut self, d: DeviceKey, sender: Option<UserId>, bytes: u64) {
        let Some(s) = sender else { return };
        self.queues.entry((d, s)).or_default().add(Use::one(bytes));
        self.users.entry(s).or_default().add(Use::one(bytes));
    }

    /// An entry of `bytes` from `sender` left `d`'s queue.
    pub fn sub(&mut self, d: DeviceKey, sender: Option<UserId>, bytes: u64) {
        self.sub_use(d, sender, Use::one(bytes));
    }

    fn sub_use(&mut self, d: DeviceKey, sender: Option<UserId>, u: Use) {
        let Some(s) = sender else { return };
        if let Some(q) = self.queues.get_mut(&(d, s)) {
            q.sub(u);
            if q.is_zero() {
                self.queues.remove(&(d, s));
            }
        }
        if let Some(t) = self.users.get_mut(&s) {
            t.sub(u);
            if t.is_zero() {
                self.users.remove(&s);
            }
        }
    }

    /// A record `user` keeps outside any queue (a retracted message's
    /// record, spec §5.5) joined its total.
    pub fn charge(&mut self, user: UserId, u: Use) {
        self.users.entry(user).or_default().add(u);
    }

    /// Such a record went.
    pub fn uncharge(&mut self, user: UserId, u: Use) {
        if let Some(t) = self.users.get_mut(&user) {
            t.sub(u);
            if t.is_zero() {
                self.users.remove(&user);
            }
        }
    }

    /// Entries that left `d`'s queue.
    pub fn gone(&mut self, d: DeviceKey, gone: &Gone) {
        for (sender, u) in &gone.by {
            self.sub_use(d, *sender, *u);
        }
    }

    /// What `sender` holds in `d`'s queue.
    pub fn of(&self, d: DeviceKey, sender: UserId) -> Use {
        self.queues.get(&(d, sender)).copied().unwrap_or_default()
    }

    /// What `sender` holds in all queues.
    pub fn user(&self, sender: UserId) -> Use {
        self.users.get(&sender).copied().unwrap_or_default()
    }

    /// (queue, sender) pairs and senders counted (for the memory they
    /// take).
    pub fn len(&self) -> (usize, usize) {
        (self.queues.len(), self.users.len())
    }

    /// Every count, sorted (for tests that check them).
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub fn snapshot(
        &self,
    ) -> (
        std::collections::BTreeMap<(DeviceKey, UserId), Use>,
        std::collections::BTreeMap<UserId, Use>,
    ) {
        (
            self.queues.iter().map(|(k, v)| (*k, *v)).collect(),
            self.users.iter().map(|(k, v)| (*k, *v)).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DeviceId;

    fn d(u: u32) -> DeviceKey {
        DeviceKey {
            user: UserId(u),
            device: DeviceId(1),
        }
    }

    #[test]
    fn a_lone_sender_gets_half_and_a_newcomer_always_finds_room() {
        let quota = Use {
            count: 100,
            bytes: 1 << 20,
        };
        let mut q = Use::default();
        let mut mine = Use::default();
        while fair(mine, Use::one(10), room(quota, q)) {
            mine.add(Use::one(10));
            q.add(Use::one(10));
        }
        assert_eq!(mine.count, 50);
        // A second sender gets half of what is left, a third half of that:
        // the room never goes to nothing while it holds two entries.
        let mut others = Vec::new();
        for _ in 0..4 {
            let mut theirs = Use::default();
            while fair(theirs, Use::one(10), room(quota, q)) {
                theirs.add(Use::one(10));
                q.add(Use::one(10));
            }
            others.push(theirs.count);
        }
        assert_eq!(others, [25, 12, 6, 3]);
        assert!(fair(Use::default(), Use::one(10), room(quota, q)), "{q:?}");
    }

    #[test]
    fn bytes_bind_like_entries() {
        let quota = Use {
            count: 1000,
            bytes: 1000,
        };
        assert!(fair(Use::default(), Use::one(500), room(quota, Use::default())));
        assert!(!fair(Use::default(), Use::one(501), room(quota, Use::default())));
    }

    #[test]
    fn counts_follow_entries_and_forget_what_is_empty() {
        let mut s = Shares::default();
        s.add(d(1), Some(UserId(7)), 100);
        s.add(d(1), Some(UserId(7)), 50);
        s.add(d(2), Some(UserId(7)), 10);
        s.add(d(1), None, 1000);
        assert_eq!(s.of(d(1), UserId(7)), Use { count: 2, bytes: 150 });
        assert_eq!(s.user(UserId(7)), Use { count: 3, bytes: 160 });
        let mut g = Gone::default();
        g.add(Some(UserId(7)), 100);
        g.add(None, 1000);
        g.add(Some(UserId(7)), 50);
        assert_eq!(g.totals(), (3, 1150));
        s.gone(d(1), &g);
        assert_eq!(s.of(d(1), UserId(7)), Use::default());
        assert_eq!(s.user(UserId(7)), Use::one(10));
        s.sub(d(2), Some(UserId(7)), 10);
        assert_eq!(s.len(), (0, 0));
    }
}
