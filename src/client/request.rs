//! The work one `tidings` command asks of a profile ([`Request`]), what it
//! produced ([`Outcome`]), and a request handed to the process that holds
//! the profile ([`Job`]).
//!
//! Pure data: [`super::Client::execute`] runs a request; [`super::ipc`]
//! carries requests and replies between processes as JSON lines.

use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use super::e2e::Notice;
use super::group::{LocalGroup, MemberState};
use super::message::Message;
use super::profile::Registration;
use super::status::Receipts;
use crate::wire::{DeviceId, DeviceInfo};

/// Work a command asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Create an account with an invite code.
    Register {
        /// The invite code text.
        code: String,
        /// The user name.
        name: String,
    },
    /// Join an account with a link code.
    Link {
        /// The link code text.
        code: String,
    },
    /// Ask for a link code.
    LinkCode,
    /// Send a text.
    Send {
        /// The recipient.
        to: String,
        /// The text.
        text: String,
        /// The id of the message it replies to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
    },
    /// Forward a message.
    Forward {
        /// The message's id.
        id: String,
        /// The recipient.
        to: String,
    },
    /// Edit one of this user's messages.
    Edit {
        /// The message's id.
        id: String,
        /// The new text.
        text: String,
    },
    /// Delete one of this user's messages for everyone.
    Delete {
        /// The message's id.
        id: String,
    },
    /// React to a message, or take the reaction back.
    React {
        /// The message's id.
        id: String,
        /// The emoji; `None` removes this user's reaction.
        emoji: Option<String>,
    },
    /// Mark the conversation with a user read.
    Read {
        /// The other party.
        user: String,
    },
    /// What became of a message, per device.
    Info {
        /// The message's id.
        id: String,
    },
    /// Show or change settings.
    Settings {
        /// Turn read receipts on or off; `None` leaves it.
        read_receipts: Option<bool>,
        /// Let everyone (`true`) or nobody see this user's presence;
        /// `None` leaves it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<bool>,
        /// Files up to this size download by themselves (0: none), on
        /// this device; `None` leaves it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auto_download: Option<u64>,
    },
    /// Send a file.
    SendFile {
        /// The recipient.
        to: String,
        /// The file (an absolute path: a listener runs elsewhere).
        path: String,
        /// A text shown with it.
        caption: String,
    },
    /// Download the file of a message.
    Download {
        /// The message's id.
        id: String,
        /// Where to (absolute), or the profile's downloads folder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
    },
    /// Say that this user is typing to a user, or stopped (spec §5.6):
    /// best effort, only while connected.
    Typing {
        /// The other party.
        to: String,
        /// Typing (`true`), or stopped.
        active: bool,
    },
    /// Watch these users' presence (instead of those watched before).
    Watch {
        /// Their names.
        users: Vec<String>,
    },
    /// Take everything queued.
    Sync,
    /// The local conversation with a user.
    History {
        /// The other party.
        user: String,
    },
    /// This account's devices.
    Devices,
    /// Revoke one of this account's devices.
    Revoke {
        /// Its number.
        device: u32,
    },
    /// The safety number with a user.
    Verify {
        /// The other party.
        user: String,
    },
    /// Create a group.
    GroupCreate {
        /// Its title.
        title: String,
        /// The other members.
        users: Vec<String>,
    },
    /// Add members to a group.
    GroupAdd {
        /// `#` and the group's id.
        group: String,
        /// Whom.
        users: Vec<String>,
    },
    /// Remove members from a group.
    GroupRemove {
        /// `#` and the group's id.
        group: String,
        /// Whom.
        users: Vec<String>,
    },
    /// Leave a group.
    GroupLeave {
        /// `#` and the group's id.
        group: String,
    },
    /// Make a member an admin.
    GroupAdmin {
        /// `#` and the group's id.
        group: String,
        /// Whom.
        user: String,
    },
    /// Rename a group.
    GroupRename {
        /// `#` and the group's id.
        group: String,
        /// The new title.
        title: String,
    },
    /// A group's members and title.
    GroupInfo {
        /// `#` and the group's id.
        group: String,
    },
    /// The groups this user is in.
    GroupList,
    /// Block or unblock a user.
    Block {
        /// Whom.
        user: String,
        /// Block (`true`) or unblock.
        blocked: bool,
    },
    /// The users this user blocks.
    Blocked,
}

/// What a request produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Registered or linked.
    Registered(Registration),
    /// A link code.
    LinkCode {
        /// The code text.
        code: String,
        /// When it expires (ms since the epoch).
        expires_ms: u64,
    },
    /// A message the server accepted.
    Sent(Message),
    /// A message stored as pending: the server could not be reached, and
    /// it goes with the next `listen`, `sync` or `chat`.
    Pending(Message),
    /// A message after its edit.
    Edited(Message),
    /// A message after its deletion.
    Deleted(Message),
    /// A message after a reaction to it.
    Reacted(Message),
    /// A conversation was marked read.
    Read {
        /// The other party.
        user: String,
        /// How many messages were unread.
        count: usize,
    },
    /// The messages with an id, each with what the devices reported (and
    /// for a group message this user sent, each other member's state).
    Info(Vec<(Message, Receipts, Vec<MemberState>)>),
    /// The settings.
    Settings {
        /// Whether read receipts are on.
        read_receipts: bool,
        /// Whether everyone may see this user's presence.
        #[serde(default = "yes")]
        last_seen: bool,
        /// Files up to this size download by themselves.
        #[serde(default)]
        auto_download: u64,
    },
    /// A file was downloaded.
    Downloaded {
        /// The message.
        id: String,
        /// Where the file is.
        path: String,
    },
    /// A typing indicator went to some device (or to none: no device
    /// online, not connected, or none may get one now).
    Typing {
        /// Whether it went to any device.
        sent: bool,
    },
    /// The users whose presence is watched now.
    Watching {
        /// How many.
        users: usize,
    },
    /// A sync finished; the messages were reported as they came.
    Synced {
        /// How many were new.
        count: usize,
    },
    /// A conversation.
    Messages(Vec<Message>),
    /// This account's devices.
    Devices {
        /// Which one is this device.
        this: DeviceId,
        /// All of them.
        devices: Vec<DeviceInfo>,
    },
    /// A device was revoked.
    Revoked {
        /// Its number.
        device: u32,
    },
    /// A group, after a change or as read.
    Group(LocalGroup),
    /// The groups this user is in.
    Groups(Vec<LocalGroup>),
    /// This user left a group.
    Left {
        /// `#` and the group's id.
        group: String,
    },
    /// A user was blocked or unblocked.
    BlockChanged {
        /// Whom.
        user: String,
        /// Blocked now, or unblocked.
        blocked: bool,
    },
    /// The users this user blocks.
    BlockList(Vec<String>),
    /// A safety number.
    SafetyNumber {
        /// The other party.
        user: String,
        /// Sixty digits in groups of five.
        number: String,
        /// The identity keys it covers: user, device, Ed25519 key (hex).
        devices: Vec<(String, u32, String)>,
    },
}

fn yes() -> bool {
    true
}

/// A listener's answer to a request handed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Notices raised while doing it.
    pub notices: Vec<Notice>,
    /// The result.
    pub outcome: Outcome,
}

/// A request from another command, with where to send the answer.
pub struct Job {
    /// The work.
    pub request: Request,
    /// Where the outcome goes.
    pub reply: Sender<Result<Reply, String>>,
}
