//! The device side: connect, handshake, register, send, receive, local
//! profile and history.
//!
//! - [`code`]: invite and link codes as text;
//! - [`content`]: what a message says and how it becomes a body (the one
//!   place the end-to-end layer will change);
//! - [`conn`]: one connection's protocol state, sans-I/O;
//! - [`link`]: the thin blocking socket driver around it;
//! - [`profile`]: the profile directory (key, registration, history) and
//!   its one-writer lock;
//! - [`device`]: the operations (register, link, send with retry, sync,
//!   listen);
//! - [`local`]: the Unix socket through which a second command hands its
//!   work to a running `listen`.

pub mod code;
pub mod conn;
pub mod content;

pub use code::{Code, CodeError};
