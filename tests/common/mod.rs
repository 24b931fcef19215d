//! Shared support for the integration tests:
//!
//! - [`daemon`]: the real `tidingsd` as a child process ([`Daemon`]);
//! - [`raw`]: a small blocking protocol client made of the library's own
//!   pieces ([`RawClient`]), for control of every frame and byte;
//! - [`profiles`]: the product client on profile directories (registered
//!   users, linked devices, syncs, histories);
//! - [`cli`]: the `tidings` command line (runs, their output, a running
//!   `tidings listen --json`).
//!
//! Each test binary compiles this module on its own and uses part of it,
//! so unused items are allowed here, in every submodule.
#![allow(dead_code)]

pub mod cli;
pub mod daemon;
pub mod profiles;
pub mod raw;

use std::time::Duration;

pub use daemon::Daemon;

/// How long a test waits for something that should happen soon (a line
/// from a listener, a frame, a file).
pub const WAIT: Duration = Duration::from_secs(20);
