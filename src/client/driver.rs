//! The driver: what owns time and sockets for a [`super::Client`].
//!
//! The client's operations never read the clock, sleep or touch a socket:
//! they ask their [`Driver`] for the time, to open a connection, to write
//! bytes, and to wait (until a deadline) for the next [`Input`]. The
//! product uses [`super::socket::SocketDriver`] (TCP and threads); tests
//! use an in-memory driver with a virtual clock, so every operation runs
//! against the real sans-I/O [`super::conn::Conn`] without sockets or
//! sleeps.
//!
//! Everything a client waits for arrives as one stream of inputs (server
//! bytes, end of stream, and work handed over by another command), so one
//! thread owns all state and waits in one place. Inputs carry the epoch of
//! the connection they came from, so bytes of a dropped connection are
//! ignored after a reconnect.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::Error;
use super::request::Job;

/// What a client waits for.
pub enum Input {
    /// Bytes from connection `epoch`.
    Net {
        /// Which connection.
        epoch: u64,
        /// What was read.
        data: Vec<u8>,
    },
    /// Connection `epoch` reached its end (or failed to read).
    Eof {
        /// Which connection.
        epoch: u64,
    },
    /// Work from another command (or the chat screen).
    Local(Job),
    /// Stop listening (the chat screen is closing).
    Stop,
}

/// Time and sockets for one client.
pub trait Driver: Send {
    /// The monotonic clock.
    fn now(&self) -> Instant;

    /// The wall clock, in ms since the Unix epoch.
    fn unix_ms(&self) -> u64;

    /// Opens a connection to `addr` (`host:port`), giving up after
    /// `within`, in place of any connection open before; what it reads
    /// arrives as inputs tagged `epoch`.
    ///
    /// # Errors
    /// [`Error::Connect`] if no address answers.
    fn open(&mut self, addr: &str, epoch: u64, within: Duration) -> Result<(), Error>;

    /// Writes some of `bytes` to the open connection; returns how many.
    ///
    /// # Errors
    /// I/O errors (the connection is then unusable).
    fn write(&mut self, bytes: &[u8]) -> Result<usize, Error>;

    /// Drops the open connection, if any.
    fn close(&mut self);

    /// Waits for the next input until `deadline`; `None` once it passed.
    fn wait(&mut self, deadline: Instant) -> Option<Input>;

    /// Where other threads hand in inputs (work from other commands).
    fn inputs(&self) -> Sender<Input>;
}
