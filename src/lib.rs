//! tidings: a self-hosted, real-time, end-to-end-encrypted messaging server
//! and its client library.
//!
//! The layers (see `DESIGN.md` in the steering repository, and
//! `protocol-spec/` for every byte on the wire):
//! - [`wire`]: the preamble, record framing and postcard frames;
//! - [`noise`]: the Noise XK handshake and transport;
//! - [`session`]: one server connection's state machine, sans-I/O;
//! - [`hub`]: routing, authorization, delivery windows, acks held for the
//!   flush, receipts, the key directory's rules;
//! - [`store`]: sled trees for accounts, keys, queues and dedup records; the
//!   group-commit flusher; retention and quotas;
//! - [`server`]: the mio event loops around a sans-I/O core, the admin
//!   socket, the retention sweeper, per-address limits;
//! - [`chat`]: `tidings chat`, the terminal messenger;
//! - [`client`]: the device side: connection core, end-to-end encryption
//!   (vodozemac), profile and history, message states;
//! - [`code`], [`config`], [`keys`], [`ids`]: invite codes as text, the
//!   daemon's configuration file, the signed-key formats, identifier
//!   newtypes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chat;
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
