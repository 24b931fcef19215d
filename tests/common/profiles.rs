//! The product client on profile directories: users registered and
//! devices linked on a [`Daemon`], clients opened on a profile, syncs and
//! histories.
//!
//! Every helper opens the profile afresh and lets go of it before it
//! returns (a profile is locked while open), so that the next helper, or a
//! `tidings` process, can open it. Failures panic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tidings::client::{Client, Event, Message, Notice, Profile};
use tidings::wire::MsgId;

use super::Daemon;

/// How long opening a profile waits for another process to let go of it.
const PROFILE_WAIT: Duration = Duration::from_secs(10);

impl Daemon {
    /// The profile directory `name`, next to the daemon's data directory
    /// (the client creates it when it first opens it).
    pub fn profile(&self, name: &str) -> PathBuf {
        self.dir().join("profiles").join(name)
    }

    /// A profile registered as user `name`, named after its user.
    pub fn user(&self, name: &str) -> PathBuf {
        let dir = self.profile(name);
        open(&dir).register(&self.invite(1), name).unwrap();
        dir
    }

    /// A new device of the account of `existing`, in profile `name`.
    pub fn link(&self, existing: &Path, name: &str) -> PathBuf {
        let dir = self.profile(name);
        let (code, _) = open(existing).link_code().unwrap();
        open(&dir).link(&code).unwrap();
        dir
    }
}

/// A client that leaves deliveries queued (for anything but syncing).
pub fn open(dir: &Path) -> Client {
    Client::new(Profile::open(dir, PROFILE_WAIT).unwrap(), false)
}

/// A client that takes deliveries.
pub fn open_receiving(dir: &Path) -> Client {
    Client::new(Profile::open(dir, PROFILE_WAIT).unwrap(), true)
}

/// Syncs `dir` ([`Client::sync_events`]); returns the events (messages,
/// notices, receipts, updates) in order.
pub fn sync(dir: &Path) -> Vec<Event> {
    let mut got = Vec::new();
    open_receiving(dir).sync_events(&mut |e| got.push(e.clone())).unwrap();
    got
}

/// Syncs `dir` ([`Client::sync`]); returns the new messages in order.
pub fn sync_messages(dir: &Path) -> Vec<Message> {
    let mut got = Vec::new();
    open_receiving(dir).sync(&mut |m| got.push(m.clone())).unwrap();
    got
}

/// The messages among `events`.
pub fn messages(events: &[Event]) -> Vec<Message> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// The texts of `msgs`.
pub fn texts(msgs: &[Message]) -> Vec<&str> {
    msgs.iter().map(|m| m.text.as_str()).collect()
}

/// The notices `c` has gathered so far (other events are dropped).
pub fn notices(c: &mut Client) -> Vec<Notice> {
    let mut out = Vec::new();
    while let Some(e) = c.poll_event() {
        if let Event::Notice(n) = e {
            out.push(n);
        }
    }
    out
}

/// The local conversation of `dir` with `peer`.
pub fn history(dir: &Path, peer: &str) -> Vec<Message> {
    open(dir).history(peer).unwrap()
}

/// Message `id` of the local conversation of `dir` with `peer`.
pub fn one(dir: &Path, peer: &str, id: MsgId) -> Message {
    history(dir, peer)
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("no {id} in {}", dir.display()))
}
