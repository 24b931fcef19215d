//! Limits before authentication (spec §9): per source address, a cap on
//! open connections and a token bucket on new connections (each of which
//! costs a handshake: two Curve25519 operations and more). A refused
//! connection gets a refusal in the clear (spec §2: the reason and a
//! retry-after) before a byte is read, and is closed, so one address
//! cannot take the daemon's memory or CPU from everyone else, and its
//! client knows to wait rather than suspect the server's key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Per-address limits.
#[derive(Debug, Clone, Copy)]
pub struct IpLimitConfig {
    /// Most open connections from one address.
    pub connections: u32,
    /// New connections (handshakes) per second from one address; bursts
    /// of up to this many at once are allowed.
    pub handshakes_per_second: u32,
}

impl Default for IpLimitConfig {
    fn default() -> Self {
        IpLimitConfig {
            connections: 256,
            handshakes_per_second: 32,
        }
    }
}

#[derive(Debug)]
struct Entry {
    open: u32,
    tokens: f64,
    last: Instant,
}

/// The shared per-address table.
#[derive(Debug)]
pub struct IpLimits {
    config: IpLimitConfig,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many open connections from this address.
    Connections,
    /// Too many new connections per second from this address.
    Rate,
}

impl IpLimits {
    /// An empty table.
    pub fn new(config: IpLimitConfig) -> IpLimits {
        IpLimits {
            config,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a new connection from `ip`, or says why not. An admitted
    /// connection must be [`IpLimits::release`]d when it closes.
    ///
    /// # Errors
    /// The reason for a refusal.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        let rate = f64::from(self.config.handshakes_per_second.max(1));
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > 65_536 {
            // Forget idle addresses rather than grow without bound.
            table.retain(|_, e| {
                e.open > 0 || e.tokens + now.saturating_duration_since(e.last).as_secs_f64() * rate < rate
            });
        }
        let e = table.entry(ip).or_insert(Entry {
            open: 0,
            tokens: rate,
            last: now,
        });
        e.tokens = (e.tokens + now.saturating_duration_since(e.last).as_secs_f64() * rate).min(rate);
        e.last = now;
        if e.open >= self.config.connections {
            return Err(Refused::Connections);
        }
        if e.tokens < 1.0 {
            return Err(Refused::Rate);
        }
        e.tokens -= 1.0;
        e.open += 1;
        Ok(())
    }

    /// A connection admitted from `ip` closed.
    pub fn release(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.get_mut(&ip) {
            e.open = e.open.saturating_sub(1);
        }
    }

    /// Open connections from `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .map_or(0, |e| e.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn caps_open_connections_and_rate() {
        let l = IpLimits::new(IpLimitConfig {
            connections: 3,
            handshakes_per_second: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t = Instant::now();
        assert_eq!(l.admit(a, t), Ok(()));
        assert_eq!(l.admit(a, t), Ok(()));
        assert_eq!(l.admit(a, t), Err(Refused::Rate));
        // Another address is not affected.
        assert_eq!(l.admit(b, t), Ok(()));
        let t = t + Duration::from_secs(1);
        assert_eq!(l.admit(a, t), Ok(()));
        let t = t + Duration::from_secs(1);
        assert_eq!(l.admit(a, t), Err(Refused::Connections));
        l.release(a);
        assert_eq!(l.admit(a, t), Ok(()));
        assert_eq!(l.open(a), 3);
    }
}
