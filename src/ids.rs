//! Identifier newtypes shared by the layers, so that a user id, a device
//! and a connection cannot be mixed up.

use std::fmt;

pub use crate::wire::{DeviceId, MsgId};

/// A user's internal number, assigned at registration and never reused.
/// The wire names users by name; the store and the hub use this.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct UserId(pub u32);

/// One device of one user: the unit of queues, delivery and authentication.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceKey {
    /// The account.
    pub user: UserId,
    /// The device number within the account.
    pub device: DeviceId,
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "u{}/d{}", self.user.0, self.device.0)
    }
}

/// A connection, unique for the daemon's lifetime: the event loop that owns
/// it and a number within that loop.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ConnId {
    /// Which event loop.
    pub worker: u16,
    /// Unique within that loop; never reused.
    pub serial: u64,
}

/// Who a client's static key is, as the account directory says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A registered device.
    Device(DeviceKey),
    /// A key nobody registered: it may register or redeem a link code.
    Unregistered,
    /// A revoked device: told so, then closed.
    Revoked,
    /// The directory could not say: closed without a word, as for a failed
    /// handshake.
    Refused,
}

/// The time, as a driver read it: the protocol core never reads the clock
/// itself.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For timers.
    pub mono: std::time::Instant,
    /// For timestamps: milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks (for drivers: the event loops, the sweeper, the
    /// admin thread; never for the core).
    pub fn read() -> Now {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Now {
            mono: std::time::Instant::now(),
            unix_ms,
        }
    }
}
