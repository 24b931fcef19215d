//! The device side: connect, handshake, register, send, receive, local
//! profile and history.
//!
//! Data and pure logic:
//! - invite and link codes as text are [`crate::code`], shared with the
//!   daemon;
//! - [`content`]: what a message says (the plaintext) and the body's
//!   envelope around the Olm message;
//! - [`attachment`]: files: their chunked encryption, the reference a
//!   message carries, safe names;
//! - [`message`]: a message as shown, and its states;
//! - [`status`]: how receipts move those states (pure);
//! - [`request`]: the work a command asks for, and what it produced;
//! - [`backoff`]: the one retry schedule.
//!
//! State on disk:
//! - [`profile`]: the profile directory (key, registration) and its
//!   one-writer lock;
//! - [`history`]: the history database, the only module that knows `sled`;
//! - [`updates`]: what messages, edits, deletes, receipts and notices do
//!   to the history;
//! - [`e2e`]: the device's Olm account and sessions, what it knows of
//!   other devices' identities, and safety numbers;
//! - [`secret`]: the passphrase, and the sealed device key.
//!
//! The network:
//! - [`conn`]: one connection's protocol state, sans-I/O;
//! - [`driver`]: what owns time and sockets ([`socket`] is the product's);
//! - [`core`]: the [`Client`]: its state and connection plumbing, with the
//!   operations in [`receive`], [`send`], [`keys`], [`receipts`], [`edit`],
//!   [`verify`], [`account`], [`ephemeral`] (typing and presence) and
//!   [`files`] (upload, download, forward);
//! - [`ipc`]: the Unix socket through which a second command hands its
//!   work to a running `listen`, and [`run`], which a command calls.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub mod account;
pub mod attachment;
pub mod backoff;
pub mod conn;
pub mod content;
pub mod core;
pub mod driver;
pub mod e2e;
pub mod edit;
pub mod ephemeral;
pub mod files;
pub mod group;
pub mod history;
pub mod ipc;
pub mod keys;
pub mod megolm;
pub mod message;
pub mod profile;
pub mod receipts;
pub mod receive;
pub mod request;
pub mod secret;
pub mod send;
pub mod socket;
pub mod status;
#[cfg(test)]
pub(crate) mod testing;
pub mod updates;
pub mod verify;

pub use crate::code::{Code, CodeError};
pub use content::{BodyError, Content};
pub use core::{Client, Event};
pub use e2e::Notice;
pub use group::{GroupNews, LocalGroup, MemberState};
pub use history::{Conversation, History, StoreError};
pub use ipc::{listen, listen_with, run, run_with};
pub use message::{Direction, Message, Quote, Status};
pub use profile::{Profile, Registration, Unlock};
pub use request::{Outcome, Request};
pub use status::{DeviceReport, DeviceState, Receipts, Report};
pub use updates::{Reaction, ReceiptNews, Update, UpdateKind};
pub use verify::SafetyNumber;

use crate::wire::ErrorCode;

/// A client failure. [`Error::is_transient`] says whether trying again
/// later may help.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A local I/O failure.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The local history database failed.
    #[error("local history: {0}")]
    Store(StoreError),
    /// A code that does not parse.
    #[error("{0}")]
    Code(#[from] CodeError),
    /// A message that cannot be made into a body.
    #[error("{0}")]
    Body(#[from] BodyError),
    /// Another process holds the profile.
    #[error("profile {} is in use by another tidings command; try again when it is done", .0.display())]
    ProfileBusy(PathBuf),
    /// The profile has no registration yet.
    #[error("this profile is not registered: run `tidings register INVITE NAME` or `tidings link CODE` first")]
    NotRegistered,
    /// The profile is registered already.
    #[error("this profile is already registered as {0}")]
    AlreadyRegistered(String),
    /// A profile file is damaged.
    #[error("damaged profile: {0}")]
    Damaged(String),
    /// The server cannot be reached.
    #[error("cannot reach the server at {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The connection ended.
    #[error("{0}")]
    Closed(conn::Closed),
    /// The server answered a request with an error.
    #[error("the server refused: {} ({})", describe(*code), code.name())]
    Server {
        /// The code.
        code: ErrorCode,
        /// The server's text.
        text: String,
    },
    /// The server answered something that makes no sense here.
    #[error("unexpected answer from the server: {0}")]
    Unexpected(&'static str),
    /// An answer did not come in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Bad input from the user.
    #[error("{0}")]
    Usage(String),
    /// A failure reported by the running `listen` that did the work.
    #[error("{0}")]
    Remote(String),
    /// The profile's keys need a passphrase, or not this one.
    #[error("{0}")]
    Passphrase(#[from] secret::PassphraseError),
    /// The profile has no end-to-end keys yet.
    #[error("this device has no end-to-end keys yet")]
    NoAccount,
    /// There is no Olm session with a device to encrypt for.
    #[error("no end-to-end session with {}'s device {}", .0.user, .0.device)]
    NoSession(crate::wire::DeviceAddr),
    /// A device has published no keys, so nothing can be encrypted for it.
    #[error("{user}'s device {device} has not published its end-to-end keys yet; try again later")]
    NoKeys {
        /// Whose.
        user: String,
        /// Which.
        device: crate::wire::DeviceId,
    },
    /// The server no longer has a file (expired, or deleted by its
    /// sender); nothing was saved.
    #[error("the file has expired on the server (or its sender deleted it); nothing was saved")]
    FileExpired,
    /// A file does not decrypt or check; nothing was saved.
    #[error("{0}; nothing was saved")]
    FileDamaged(attachment::Damaged),
    /// The server holds other end-to-end keys for this device than the
    /// profile has.
    #[error(
        "the server has other end-to-end keys for this device (was the profile copied, or its keys lost?); link this profile again as a new device"
    )]
    KeysRefused,
}

impl Error {
    /// Whether trying again (after reconnecting) may succeed.
    pub fn is_transient(&self) -> bool {
        use conn::Closed as C;
        match self {
            Error::Connect { .. } | Error::Timeout(_) => true,
            Error::Io(e) => !matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound),
            Error::Closed(c) => match c {
                C::EndOfStream | C::TimedOut | C::Broken => true,
                C::ByServer { code, .. } => matches!(
                    *code,
                    ErrorCode::IDLE_TIMEOUT | ErrorCode::SHUTTING_DOWN | ErrorCode::SLOW_CONSUMER
                ),
                C::Refused(n) => n.is_busy(),
                C::Handshake | C::Local => false,
            },
            Error::Server { code, .. } => {
                matches!(
                    *code,
                    ErrorCode::RATE_LIMITED | ErrorCode::INTERNAL | ErrorCode::SLOW_DOWN
                )
            }
            _ => false,
        }
    }

    /// Whether the server refused for a rate (`SLOW_DOWN`,
    /// `RATE_LIMITED`): try again after the `RetryAfter` it sent.
    pub fn is_rate(&self) -> bool {
        matches!(self, Error::Server { code, .. } if matches!(*code, ErrorCode::RATE_LIMITED | ErrorCode::SLOW_DOWN))
    }
}

/// A sentence for a server error code.
pub fn describe(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::INVALID_INVITE => "the invite is unknown, used up or expired",
        ErrorCode::INVALID_LINK_CODE => "the link code is unknown, used or expired",
        ErrorCode::NAME_TAKEN => "that user name is taken",
        ErrorCode::INVALID_NAME => "a user name is 3 to 32 of a-z, 0-9, _ and .",
        ErrorCode::UNKNOWN_USER => "no such user",
        ErrorCode::BODY_TOO_LARGE => "the message is too large",
        ErrorCode::TOO_MANY_BODIES => "too many devices in one send",
        ErrorCode::DEVICE_LIMIT => "the account has the most devices allowed",
        ErrorCode::UNKNOWN_DEVICE => "no such device in this account",
        ErrorCode::NOT_ALLOWED => "not allowed in this state",
        ErrorCode::RATE_LIMITED => "too many requests; try later",
        ErrorCode::SLOW_DOWN => "this device sends too fast; it waits and tries again",
        ErrorCode::QUOTA_EXCEEDED => {
            "a queue this would go to is full (a device of the recipient's, or one of yours, has not collected its messages), or the server is out of space; nothing was sent, try again later"
        }
        ErrorCode::STORAGE_FULL => {
            "the server is out of disk space and takes nothing new until its operator frees some; nothing was sent, try again later"
        }
        ErrorCode::INTERNAL => "the server failed; try again",
        ErrorCode::BAD_REQUEST => "inconsistent request",
        ErrorCode::MALFORMED => "the server could not read the request",
        ErrorCode::UNSUPPORTED => "the server does not know this request",
        ErrorCode::BLOB_TOO_LARGE => "the file is larger than the server takes",
        ErrorCode::BLOB_BUDGET => {
            "your files on the server take all the room you have there; try again once they have been fetched or expired"
        }
        ErrorCode::UNKNOWN_BLOB => "the server does not have that file (expired, deleted, or not for you)",
        ErrorCode::BLOB_MISMATCH => "the uploaded file did not match its id; send it again",
        _ => "error",
    }
}

impl std::fmt::Display for conn::Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use conn::Closed as C;
        match self {
            C::Refused(n) => {
                use crate::wire::Refusal as R;
                let why = match n.known() {
                    Some(R::BadMagic) => "it does not take this protocol",
                    Some(R::UnsupportedVersion) => "it does not speak this client's protocol version",
                    Some(R::AddressConnections) => "too many connections are open from this address",
                    Some(R::AddressRate) => "too many new connections came from this address in the last second",
                    Some(R::ServerFull) => "it has as many connections as it takes",
                    Some(R::ShuttingDown) => "it is shutting down",
                    None => "a reason this client does not know",
                };
                write!(f, "the server refused the connection: {why}")?;
                match n.retry_after {
                    Some(s) if n.is_busy() => write!(f, "; try again in {s} s"),
                    _ if n.is_busy() => f.write_str("; try again later"),
                    _ => write!(
                        f,
                        " (it speaks protocol version {}, this client {})",
                        n.version,
                        crate::wire::PROTOCOL_VERSION
                    ),
                }
            }
            // spec §4.2: a server that cannot decrypt message 1 (another
            // key) closes without a word; a busy one says so (§2), so this
            // is the pinned key, or something in between that drops
            // connections.
            C::Handshake => f.write_str(
                "the handshake failed: the server's key is not the one this profile pinned (or something between here and the server dropped the connection)",
            ),
            C::ByServer { code, .. } if *code == ErrorCode::REVOKED => f.write_str(
                "this device was revoked (by another device of the account or by the server's operator), so the server no longer accepts it; to use the account here again, link a new profile with a code from a current device",
            ),
            C::ByServer { code, .. } if *code == ErrorCode::CONNECTED_ELSEWHERE => {
                f.write_str("this device connected from elsewhere; this connection was closed")
            }
            C::ByServer { code, text } => write!(f, "the server closed the connection: {text} ({})", code.name()),
            C::Broken => f.write_str("the server sent something unreadable; connection dropped"),
            C::TimedOut => f.write_str("the server stopped answering"),
            C::EndOfStream => f.write_str("the server closed the connection"),
            C::Local => f.write_str("connection closed"),
        }
    }
}
