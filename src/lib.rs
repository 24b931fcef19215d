//! tidings: a self-hosted, real-time, end-to-end-encrypted messaging server
//! and its client library.
//!
//! The layers (see `DESIGN.md` in the steering repository and
//! `protocol-spec/`):
//! - [`wire`]: record framing and frame encoding;
//! - [`noise`]: the Noise XK handshake and transport;
//! - [`session`]: one server connection's state machine, sans-I/O.
//! - [`client`]: the device side and its profile.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod code;
pub mod config;
pub mod hub;
pub mod ids;
pub mod keys;
pub mod noise;
pub mod server;
pub mod session;
pub mod store;
pub mod wire;
