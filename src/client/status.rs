//! Message states, and how receipts and expiry notices move them (spec
//! §5.5, §10), as pure functions.
//!
//! What one device knows of a message's fate is a [`Receipts`]: for each
//! device that reported (by receipt or, for expiry, through the server's
//! notice), the earliest time it was reported delivered, read or expired,
//! and for a message this user received, when one of this user's devices
//! read it. Merging a report only ever adds information (a time appears,
//! or an earlier one replaces a later one), so the result is the same
//! whatever order reports arrive in, applying one twice changes nothing,
//! and the state a message shows never moves backwards: pending → sent →
//! delivered → read for a message this user sent, received → read for one
//! it got. Receipts are folded and reordered by the server, and delivered
//! at least once, so all three properties are needed (spec §5.5,
//! *Folding*).
//!
//! What it does not do: decide which receipts to believe (a receipt from
//! user U touches only messages sent to U: [`Receipts::status`] counts
//! only U's devices) or store anything.

use serde::{Deserialize, Serialize};

use super::message::{Direction, Status};
use crate::wire::DeviceId;

/// What a device reported about a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Report {
    /// Stored on the device (a delivered receipt).
    Delivered,
    /// Read by its user (a read receipt); implies delivered.
    Read,
    /// Expired in the device's queue before it collected it (the
    /// server's expiry notice, spec §10).
    Expired,
}

/// Where a message stands on one device, as far as this device knows;
/// ordered: a later state never gives way to an earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeviceState {
    /// Nothing reported.
    Unknown,
    /// The server dropped it from the device's queue, undelivered.
    Expired,
    /// Stored on the device.
    Delivered,
    /// Read.
    Read,
}

impl DeviceState {
    /// `"unknown"`, `"expired"`, `"delivered"` or `"read"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Unknown => "unknown",
            DeviceState::Expired => "expired",
            DeviceState::Delivered => "delivered",
            DeviceState::Read => "read",
        }
    }
}

/// What one device reported about a message, and when (the earliest time
/// heard for each; for folded receipts, the server's time is an upper
/// bound).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The device's user.
    pub user: String,
    /// The device.
    pub device: DeviceId,
    /// When it reported the message delivered (a read implies it).
    pub delivered_ms: Option<u64>,
    /// When it reported it read.
    pub read_ms: Option<u64>,
    /// When the server said it expired in the device's queue.
    pub expired_ms: Option<u64>,
}

impl DeviceReport {
    /// The state this report shows.
    pub fn state(&self) -> DeviceState {
        if self.read_ms.is_some() {
            DeviceState::Read
        } else if self.delivered_ms.is_some() {
            DeviceState::Delivered
        } else if self.expired_ms.is_some() {
            DeviceState::Expired
        } else {
            DeviceState::Unknown
        }
    }
}

/// Everything known of one message's fate beyond its stored status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipts {
    /// Per reporting device, sorted by user and device.
    pub devices: Vec<DeviceReport>,
    /// For a message this user received: when one of its devices read it.
    pub read_here_ms: Option<u64>,
}

fn earliest(slot: &mut Option<u64>, at: u64) {
    *slot = Some(slot.map_or(at, |t| t.min(at)));
}

impl Receipts {
    /// Merges one report of `user`'s `device`, made at `at_ms`. Returns
    /// whether that device's state changed (so a redelivered or folded
    /// receipt is news only once).
    pub fn merge(&mut self, user: &str, device: DeviceId, report: Report, at_ms: u64) -> bool {
        let i = match self
            .devices
            .binary_search_by(|d| (d.user.as_str(), d.device).cmp(&(user, device)))
        {
            Ok(i) => i,
            Err(i) => {
                self.devices.insert(
                    i,
                    DeviceReport {
                        user: user.to_owned(),
                        device,
                        delivered_ms: None,
                        read_ms: None,
                        expired_ms: None,
                    },
                );
                i
            }
        };
        let d = &mut self.devices[i];
        let before = d.state();
        match report {
            Report::Delivered => earliest(&mut d.delivered_ms, at_ms),
            Report::Read => {
                earliest(&mut d.read_ms, at_ms);
                earliest(&mut d.delivered_ms, at_ms);
            }
            Report::Expired => earliest(&mut d.expired_ms, at_ms),
        }
        d.state() != before
    }

    /// Records that this user read the message (on this device or another
    /// of its devices) at `at_ms`. Returns whether it was unread.
    pub fn mark_read_here(&mut self, at_ms: u64) -> bool {
        let was = self.read_here_ms.is_none();
        earliest(&mut self.read_here_ms, at_ms);
        was
    }

    /// Merges everything `other` knows into this.
    pub fn union(&mut self, other: &Receipts) {
        for d in &other.devices {
            for (t, r) in [
                (d.delivered_ms, Report::Delivered),
                (d.read_ms, Report::Read),
                (d.expired_ms, Report::Expired),
            ] {
                if let Some(t) = t {
                    self.merge(&d.user, d.device, r, t);
                }
            }
        }
        if let Some(t) = other.read_here_ms {
            self.mark_read_here(t);
        }
    }

    /// The reports of `user`'s devices.
    pub fn of<'a>(&'a self, user: &'a str) -> impl Iterator<Item = &'a DeviceReport> + 'a {
        self.devices.iter().filter(move |d| d.user == user)
    }

    /// The status a message with stored status `base` shows: for one
    /// this user sent to `peer`, the best that any of `peer`'s devices
    /// reported (delivered by one is delivered; read by one is read), never
    /// below `base`; for one it received, read once read here.
    pub fn status(&self, base: Status, direction: Direction, peer: &str) -> Status {
        match direction {
            Direction::Out => {
                let best = self.of(peer).map(DeviceReport::state).max();
                let from_receipts = match best {
                    Some(DeviceState::Read) => Status::Read,
                    Some(DeviceState::Delivered) => Status::Delivered,
                    _ => Status::Pending,
                };
                if from_receipts.rank() > base.rank() {
                    from_receipts
                } else {
                    base
                }
            }
            Direction::In => {
                if self.read_here_ms.is_some() || base == Status::Read {
                    Status::Read
                } else {
                    base
                }
            }
        }
    }
}

impl Status {
    /// The order of states: pending < sent < delivered < read, and
    /// received < read.
    pub fn rank(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Sent | Status::Received => 1,
            Status::Delivered => 2,
            Status::Read => 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report() -> impl Strategy<Value = (u8, u32, Report, u64)> {
        (
            0u8..3,
            1u32..4,
            prop_oneof![Just(Report::Delivered), Just(Report::Read), Just(Report::Expired)],
            0u64..1000,
        )
    }

    const USERS: [&str; 3] = ["bob", "alice", "carol"];

    proptest! {
        /// Whatever order reports come in, and however often: the same
        /// result, and the status never goes back.
        #[test]
        fn reports_commute_repeat_and_never_go_back(
            reports in proptest::collection::vec(report(), 0..24),
            seed: u64,
            sent: bool,
            read_here in proptest::option::of(0u64..1000),
        ) {
            let apply = |order: &[(u8, u32, Report, u64)]| {
                let mut r = Receipts::default();
                let base = if sent { Status::Sent } else { Status::Pending };
                let mut last = r.status(base, Direction::Out, "bob");
                let mut device_states = std::collections::HashMap::new();
                for &(u, d, rep, t) in order {
                    let user = USERS[u as usize];
                    let before = r.of(user).find(|x| x.device.0 == d).map(DeviceReport::state);
                    let changed = r.merge(user, DeviceId(d), rep, t);
                    let after = r.of(user).find(|x| x.device.0 == d).map(DeviceReport::state).unwrap();
                    assert_eq!(changed, before != Some(after));
                    assert!(before.is_none_or(|b| b <= after), "{before:?} -> {after:?}");
                    let prev = device_states.insert((u, d), after);
                    assert!(prev.is_none_or(|p| p <= after));
                    let now = r.status(base, Direction::Out, "bob");
                    assert!(now.rank() >= last.rank(), "{last:?} -> {now:?}");
                    last = now;
                }
                r
            };
            let forward = apply(&reports);
            // A shuffle of the same reports, each given twice.
            let mut shuffled: Vec<_> = reports.iter().chain(reports.iter()).copied().collect();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let back = apply(&shuffled);
            prop_assert_eq!(&forward, &back);
            // Union of two halves is the whole, either way round.
            let (a, b) = reports.split_at(reports.len() / 2);
            let (mut ra, mut rb) = (apply(a), apply(b));
            let rb2 = rb.clone();
            ra.union(&rb2);
            rb.union(&apply(a));
            prop_assert_eq!(&ra, &forward);
            prop_assert_eq!(&rb, &forward);
            // Incoming messages: received, then read for good.
            let mut r = forward.clone();
            let before = r.status(Status::Received, Direction::In, "bob");
            if let Some(t) = read_here {
                r.mark_read_here(t);
                prop_assert_eq!(r.status(Status::Received, Direction::In, "bob"), Status::Read);
            } else {
                prop_assert_eq!(before, Status::Received);
            }
        }
    }

    #[test]
    fn only_the_peers_devices_count_and_read_implies_delivered() {
        let mut r = Receipts::default();
        assert_eq!(r.status(Status::Sent, Direction::Out, "bob"), Status::Sent);
        assert!(r.merge("carol", DeviceId(1), Report::Read, 5));
        assert_eq!(r.status(Status::Sent, Direction::Out, "bob"), Status::Sent);
        assert!(r.merge("bob", DeviceId(2), Report::Expired, 6));
        assert_eq!(r.status(Status::Sent, Direction::Out, "bob"), Status::Sent);
        assert!(r.merge("bob", DeviceId(1), Report::Read, 9));
        assert_eq!(r.status(Status::Sent, Direction::Out, "bob"), Status::Read);
        // The delivered receipt arriving late changes nothing but the time.
        assert!(!r.merge("bob", DeviceId(1), Report::Delivered, 7));
        let d = r.of("bob").find(|d| d.device == DeviceId(1)).unwrap();
        assert_eq!((d.delivered_ms, d.read_ms), (Some(7), Some(9)));
        // A receipt means the server had it, even if this device never
        // heard its Accepted.
        assert_eq!(r.status(Status::Pending, Direction::Out, "bob"), Status::Read);
        assert_eq!(
            r.of("bob").map(|d| d.state()).collect::<Vec<_>>(),
            [DeviceState::Read, DeviceState::Expired]
        );
    }
}
