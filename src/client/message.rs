//! A message as the client shows it, and the states it goes through.
//!
//! Pure data: how messages are stored is [`super::history`], how receipts
//! move their states is [`super::status`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::attachment::Attachment;
use crate::wire::{DeviceId, MsgId};

/// Which way a message went, seen from this account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// From someone else.
    In,
    /// From this account (this device or another of its devices).
    Out,
}

/// Where a message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Written here, not yet accepted by the server.
    Pending,
    /// Accepted by the server (durable in every recipient device's queue).
    Sent,
    /// Received from the server, not read yet.
    Received,
    /// Sent, and stored on a device of the recipient (a delivered receipt).
    Delivered,
    /// Sent and read by the recipient (a read receipt), or received and
    /// read here.
    Read,
}

impl Direction {
    /// `"in"` or `"out"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

impl Status {
    /// `"pending"`, `"sent"`, `"received"`, `"delivered"` or `"read"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Received => "received",
            Status::Delivered => "delivered",
            Status::Read => "read",
        }
    }
}

/// One message in the local history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's id for it.
    pub id: MsgId,
    /// The sending user.
    pub from: String,
    /// The sending device.
    pub from_device: DeviceId,
    /// The user it was sent to.
    pub to: String,
    /// The text.
    pub text: String,
    /// When: the server's acceptance time once known, else the sender's
    /// clock (ms since the epoch).
    pub ts_ms: u64,
    /// In or out.
    pub direction: Direction,
    /// Where it stands. Stored: pending, sent or received (or read, for
    /// one received); as read back from the history, with what receipts
    /// said merged in (see [`super::status::Receipts::status`]).
    pub status: Status,
    /// The body could not be decrypted (`text` is then empty).
    pub undecryptable: bool,
    /// For an undecryptable message: how many more undecryptable messages
    /// from the same device, arriving right after it with nothing in
    /// between, it stands for (0: just itself). Garbage from a contact is
    /// one notice with a count, not one entry per body.
    pub repeats: u32,
    /// The message this one replies to (sent by `quote.from`).
    pub reply_to: Option<MsgId>,
    /// What a reply quotes. As read back from the history: the quoted
    /// message's current text if it is on this device, else the text the
    /// reply carried; `text` is `None` once the quoted message was deleted.
    pub quote: Option<Quote>,
    /// How many times it was forwarded before it got here (0: its sender
    /// wrote it).
    pub forwards: u32,
    /// When its sender last edited it (by the sender's clock), if ever.
    pub edited_ms: Option<u64>,
    /// Deleted for everyone: `text` is empty, and so is any earlier
    /// version.
    pub deleted: bool,
    /// Reactions: user → emoji, one per user (as read back from the
    /// history; stored apart from the message).
    #[serde(default)]
    pub reactions: BTreeMap<String, String>,
    /// The file it carries (`text` is then its caption), and what this
    /// device knows of it.
    #[serde(default)]
    pub attachment: Option<Box<Attachment>>,
}

/// What a reply quotes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// Who wrote the quoted message.
    pub from: String,
    /// Its text; `None` once it was deleted.
    pub text: Option<String>,
}

impl Default for Message {
    /// An empty incoming text message (for building messages with
    /// `..Default::default()`).
    fn default() -> Message {
        Message {
            id: MsgId([0; 16]),
            from: String::new(),
            from_device: DeviceId(0),
            to: String::new(),
            text: String::new(),
            ts_ms: 0,
            direction: Direction::In,
            status: Status::Received,
            undecryptable: false,
            repeats: 0,
            reply_to: None,
            quote: None,
            forwards: 0,
            edited_ms: None,
            deleted: false,
            reactions: BTreeMap::new(),
            attachment: None,
        }
    }
}

/// From this many forwards on, a message is shown as "forwarded many
/// times" (as WhatsApp does).
pub const FORWARDED_MANY: u32 = 5;

impl Message {
    /// Whether it was forwarded.
    pub fn forwarded(&self) -> bool {
        self.forwards > 0
    }

    /// Whether it was forwarded [`FORWARDED_MANY`] times or more.
    pub fn forwarded_many_times(&self) -> bool {
        self.forwards >= FORWARDED_MANY
    }

    /// Whether it was edited.
    pub fn edited(&self) -> bool {
        self.edited_ms.is_some()
    }

    /// The other party of the conversation this message belongs to, seen
    /// from `me`: for a group message, the group (`#` and its id).
    pub fn peer<'a>(&'a self, me: &str) -> &'a str {
        if self.from == me || self.to.starts_with('#') {
            &self.to
        } else {
            &self.from
        }
    }

    /// The group it was sent to, if it is a group message.
    pub fn group(&self) -> Option<crate::wire::GroupId> {
        crate::wire::GroupId::parse_tag(&self.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: &str, to: &str) -> Message {
        Message {
            from: from.into(),
            to: to.into(),
            ..Message::default()
        }
    }

    #[test]
    fn peers() {
        assert_eq!(msg("alice", "bob").peer("alice"), "bob");
        assert_eq!(msg("bob", "alice").peer("alice"), "bob");
        assert_eq!(msg("alice", "alice").peer("alice"), "alice");
    }
}
