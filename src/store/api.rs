//! The store's interface to the hub: [`StoreApi`].
//!
//! Two kinds of calls, so that an event loop never waits on the disk:
//!
//! - **Memory calls** answer at once from what the store keeps in memory:
//!   the account directory, each queue's bookkeeping and its newest
//!   entries, recently accepted message ids. A message is appended to its
//!   queues here ([`StoreApi::append`]), delivered from here
//!   ([`StoreApi::read`]) and acknowledged here ([`StoreApi::ack`]); a copy
//!   acknowledged before the store thread would write it is never written.
//! - **Operations** ([`Op`], through [`StoreApi::submit`]) run on the store
//!   thread, which owns the database: registrations, keys, receipts,
//!   retraction, reading a backlog from disk. Blob operations
//!   ([`BlobOp`], through [`StoreApi::blob`]) run the same way on the blob
//!   thread, which owns the blob files. Each answers later with a
//!   [`Completion`] pushed to the caller's [`Sink`] (which wakes its loop),
//!   once what it changed is durable.
//!
//! An append answers later too: [`Outcome::Settled`] once every copy is
//! durable or acknowledged by its device (spec §10), which is when the
//! sender may be told `Accepted`.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::ids::{DeviceKey, Identity, UserId};
use crate::noise::PublicKey;
use crate::wire::{DeviceId, DeviceInfo, DeviceKeys, GroupId, MsgId, PublishKeys, ReceiptKind, Token};

pub use super::accounts::{LinkError, LinkRequestError, RegisterError};
pub use super::blobs::{BlobOp, BlobOutcome, BlobRefused};
pub use super::disk::{
    Entry, LostRecord, QueuedBlock, QueuedExpired, QueuedGap, QueuedGroupMessage, QueuedGroupNotice,
    QueuedGroupReceipt, QueuedMessage, QueuedReceipt, Swept,
};
pub use super::groups::{AppliedChange, GroupChangeOp, GroupLimits, GroupRefused, GroupView};
pub use super::keys::PublishError;

/// Where completions for one event loop go: a list it drains each turn,
/// and a callback that wakes it (a `mio::Waker`).
pub struct Sink {
    items: Mutex<Vec<Completion>>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Sink {
    /// A sink that calls `wake` when it gets something.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Arc<Sink> {
        Arc::new(Sink {
            items: Mutex::new(Vec::new()),
            wake: Box::new(wake),
        })
    }

    /// Queues a completion and wakes the owner (once per batch: only when
    /// the list was empty).
    pub fn push(&self, c: Completion) {
        let was_empty = {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            let was_empty = items.is_empty();
            items.push(c);
            was_empty
        };
        if was_empty {
            (self.wake)();
        }
    }

    /// Moves every queued completion to `out`.
    pub fn take(&self, out: &mut Vec<Completion>) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        out.append(&mut items);
    }
}

/// Who waits for an answer: a sink and the caller's token.
#[derive(Clone)]
pub struct Waiter {
    /// Where the completion goes.
    pub sink: Arc<Sink>,
    /// The caller's number for it.
    pub token: u64,
}

impl Waiter {
    /// Sends `outcome` to the waiter.
    pub fn complete(&self, outcome: Outcome) {
        self.sink.push(Completion {
            token: self.token,
            outcome,
        });
    }
}

/// An answer to an operation or an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The caller's token.
    pub token: u64,
    /// What happened.
    pub outcome: Outcome,
}

/// Which quota refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// This device's queue is full (entries or bytes).
    Queue(DeviceKey),
    /// All queues together are at the disk budget.
    Disk,
    /// The sender holds its share of this device's queue: half of the room
    /// the other senders leave (spec §10, *Quotas*).
    Sender(DeviceKey),
    /// The sending user holds its share of the storage: its fixed share of
    /// the disk budget, or half of the room the others leave.
    User,
}

/// Why the store refuses to add data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A quota (spec §10, *Quotas*).
    Quota(Quota),
    /// The data directory's filesystem is below the free-space floor
    /// (spec §10, *Storage full*).
    StorageFull,
}

/// What [`StoreApi::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Queued; [`Outcome::Settled`] follows once every copy is safe.
    Queued {
        /// Acceptance time.
        time_ms: u64,
    },
    /// A retry of a message still being made safe: the waiter gets the
    /// original's [`Outcome::Settled`].
    Waiting,
    /// A retry of a message already accepted (or retracted): answer
    /// `Accepted` with this time now; nothing was queued.
    Duplicate {
        /// The original acceptance time.
        time_ms: u64,
    },
    /// Refused; nothing was queued or remembered.
    Refused(Refused),
}

/// What [`StoreApi::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Entries from memory; `more` if the queue has entries past them.
    Memory {
        /// Whether there is more after what was read.
        more: bool,
    },
    /// The entries from `from` on are on disk only: read them with
    /// [`Op::ReadBacklog`].
    OnDisk,
}

/// One message to append: its header and one body per device.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Sending device.
    pub sender: DeviceKey,
    /// The sender's message id.
    pub id: MsgId,
    /// The user it is addressed to.
    pub to: UserId,
    /// `(device, body, online)`: whether the device is online decides
    /// whether its copy may wait in memory for its ack.
    pub copies: Vec<(DeviceKey, Bytes, bool)>,
    /// Acceptance time.
    pub now_ms: u64,
    /// Now, for the copies' deadlines.
    pub mono: std::time::Instant,
}

/// One message to a group: one body for every member device but the
/// sender's (spec §5.8).
#[derive(Debug, Clone)]
pub struct NewGroupMessage {
    /// Sending device.
    pub sender: DeviceKey,
    /// The sender's message id.
    pub id: MsgId,
    /// The group.
    pub group: GroupId,
    /// The membership version it was encrypted for.
    pub version: u64,
    /// The digest of the member devices it was encrypted for.
    pub devices: [u8; 8],
    /// The ciphertext.
    pub body: Bytes,
    /// Acceptance time.
    pub now_ms: u64,
    /// Now, for the copies' deadlines.
    pub mono: std::time::Instant,
}

/// What [`StoreApi::append_group`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAppended {
    /// Queued (or known), as for a message to a user; `online` are the
    /// devices whose copy waits for them online (to wake), `skipped` those
    /// whose queue was full (to send a gap notice).
    Appended {
        /// What the append did.
        appended: Appended,
        /// Devices to wake.
        online: Vec<DeviceKey>,
        /// Devices that got no copy.
        skipped: Vec<DeviceKey>,
    },
    /// No such group, or the sender is not a member.
    NotMember,
    /// The membership version or the devices differ from the send's.
    Mismatch,
}

/// An operation for the store thread.
#[derive(Debug, Clone)]
pub enum Op {
    /// Create an account with an invite (spec §5.2, `Register`).
    Register {
        /// The invite.
        invite: Token,
        /// The name.
        name: String,
        /// The device's static key.
        key: PublicKey,
        /// Now.
        now_ms: u64,
    },
    /// Add a device with a link code (spec §5.2, `RedeemLink`).
    RedeemLink {
        /// The code.
        code: Token,
        /// The device's static key.
        key: PublicKey,
        /// Now.
        now_ms: u64,
    },
    /// Make a link code bound to the asking device (spec §5.2,
    /// `RequestLink`).
    RequestLink {
        /// The asking device.
        device: DeviceKey,
        /// Now.
        now_ms: u64,
        /// How long the code is valid.
        ttl: std::time::Duration,
    },
    /// Make an invite (operator).
    Invite {
        /// Registrations it allows.
        uses: u32,
        /// When it expires.
        expires_ms: Option<u64>,
    },
    /// Revoke a device: it is refused from now on, its queue and keys go.
    Revoke {
        /// Which.
        device: DeviceKey,
        /// Now.
        now_ms: u64,
    },
    /// Record when a device authenticated or went offline (no answer).
    /// Kept in memory; written with the next batch (not flushed for its
    /// own sake) when `persist`, that is when the device goes offline, and
    /// at a clean stop for the others.
    Touch {
        /// Which.
        device: DeviceKey,
        /// Now.
        now_ms: u64,
        /// Write it (the device went offline) rather than only keep it.
        persist: bool,
    },
    /// Store published keys (signatures already checked).
    Publish {
        /// Whose.
        device: DeviceKey,
        /// What.
        keys: Box<PublishKeys>,
    },
    /// Claim one key of each device (each one-time key once).
    Claim {
        /// The devices.
        devices: Vec<DeviceKey>,
        /// Those of them whose one-time keys went at their rate already
        /// (spec §5.4): they give their fallback key.
        over_rate: Vec<DeviceKey>,
    },
    /// Queue a receipt, folded (spec §5.5).
    Receipt {
        /// Reporting device.
        from: DeviceKey,
        /// The user whose messages it is about.
        to: UserId,
        /// Its kind.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MsgId>,
        /// Devices to queue it for.
        targets: Vec<DeviceKey>,
        /// Now.
        now_ms: u64,
    },
    /// Remove the queued copies of a user's message (spec §5.5).
    Retract {
        /// The user.
        user: UserId,
        /// Every device of the user, revoked ones included.
        senders: Vec<DeviceKey>,
        /// The message.
        id: MsgId,
        /// Now.
        now_ms: u64,
    },
    /// Read entries of a queue that are on disk only.
    ReadBacklog {
        /// Whose queue.
        device: DeviceKey,
        /// From this sequence on.
        from: u64,
        /// At most this many.
        max: usize,
    },
    /// One bounded turn of the retention sweep (spec §10, *Retention*).
    Sweep {
        /// Where the previous turn stopped (empty: the start).
        cursor: Vec<u8>,
        /// Entries accepted before this expire.
        cutoff_ms: u64,
        /// Keys to look at.
        max_keys: usize,
        /// Now.
        now_ms: u64,
    },
    /// Who may see a user's presence (spec §5.6, `SetLastSeen`).
    SetLastSeen {
        /// Whose.
        user: UserId,
        /// Everyone (`true`) or nobody.
        everyone: bool,
    },
    /// Change a group's membership (spec §5.8); every member device (and
    /// those of members taken out) gets a notice.
    Group {
        /// Who asks.
        by: UserId,
        /// Which group.
        group: GroupId,
        /// What.
        change: GroupChangeOp,
        /// The limits it is checked against.
        limits: GroupLimits,
        /// Now.
        now_ms: u64,
    },
    /// Queue a group receipt, folded (spec §5.8).
    GroupReceipt {
        /// Reporting device.
        from: DeviceKey,
        /// The group.
        group: GroupId,
        /// The user whose messages it is about.
        to: UserId,
        /// Its kind.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MsgId>,
        /// Devices to queue it for.
        targets: Vec<DeviceKey>,
        /// Now.
        now_ms: u64,
    },
    /// Block or unblock a user (spec §5.8, *Blocking*); the blocker's
    /// other devices get a notice.
    Block {
        /// The device that asks.
        by: DeviceKey,
        /// Whom.
        user: UserId,
        /// Block (`true`) or unblock.
        blocked: bool,
        /// Now.
        now_ms: u64,
    },
    /// A message from `sender` accepted at `time_ms` got no copy in these
    /// devices' full queues: each gets a gap notice (spec §10, *Quotas*).
    Skipped {
        /// The sending device.
        sender: DeviceKey,
        /// When the message was accepted.
        time_ms: u64,
        /// The devices.
        devices: Vec<DeviceKey>,
    },
    /// Take a user out of every group (its last device went): what
    /// `tidingsd delete-user` calls too.
    LeaveAllGroups {
        /// Whom.
        user: UserId,
        /// Now.
        now_ms: u64,
    },
    /// Answer once everything submitted before is durable.
    Sync,
    /// Delete an invite (operator).
    RevokeInvite {
        /// Its id.
        id: [u8; 8],
    },
    /// Delete an account (operator): every device revoked (queues and keys
    /// go), the name reserved for the retention period.
    DeleteUser {
        /// Whose.
        user: UserId,
        /// Now.
        now_ms: u64,
    },
    /// Write a backup of the data directory (operator), with nothing
    /// changing meanwhile (see `store::backup`).
    Backup {
        /// Where it goes.
        out: BackupSink,
    },
}

/// Where [`Op::Backup`] writes: taken once by the store thread.
#[derive(Clone)]
pub struct BackupSink(Arc<Mutex<Option<Box<dyn std::io::Write + Send>>>>);

impl BackupSink {
    /// A sink writing to `w`.
    pub fn new(w: impl std::io::Write + Send + 'static) -> BackupSink {
        BackupSink(Arc::new(Mutex::new(Some(Box::new(w)))))
    }

    /// The writer, the first time.
    pub fn take(&self) -> Option<Box<dyn std::io::Write + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for BackupSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupSink")
    }
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every copy of an appended message is durable or acknowledged.
    Settled {
        /// Its acceptance time (the original's, for a retry).
        time_ms: u64,
    },
    /// For [`Op::Register`] and [`Op::RedeemLink`].
    Registered(Result<DeviceKey, RegisterError>),
    /// For [`Op::RedeemLink`].
    Linked(Result<DeviceKey, LinkError>),
    /// For [`Op::Invite`]: the token and its expiry.
    Token(Token, Option<u64>),
    /// For [`Op::RequestLink`]: the code and its expiry, or why not.
    LinkCode(Result<(Token, u64), LinkRequestError>),
    /// For [`Op::Revoke`]: whether there was such a current device.
    Revoked(bool),
    /// For [`Op::Publish`]: the one-time key count.
    Published(Result<u32, PublishError>),
    /// For [`Op::Claim`]: the keys, and the devices now low on one-time
    /// keys with their counts.
    Claimed(Vec<DeviceKeys>, Vec<(DeviceKey, u32)>),
    /// For [`Op::Receipt`]: queued for these devices, or refused.
    Receipt(Result<Vec<DeviceKey>, Refused>),
    /// For [`Op::Retract`]: how many queued copies were removed.
    Retracted(usize),
    /// For [`Op::ReadBacklog`]: entries in order, and the highest sequence
    /// the read covered (read again from past it).
    Backlog {
        /// Whose queue.
        device: DeviceKey,
        /// What was asked for.
        from: u64,
        /// The entries.
        entries: Vec<(u64, Entry)>,
        /// Everything up to here was looked at.
        covered: u64,
    },
    /// For [`Op::Sweep`].
    Swept(Swept, Vec<u8>),
    /// For [`Op::SetLastSeen`], once durable.
    LastSeenSet,
    /// For [`Op::Group`]: the group after the change (no members: it was
    /// deleted) and the devices told, or why not.
    Group(Result<(GroupView, Vec<DeviceKey>), GroupRefused>),
    /// For [`Op::GroupReceipt`]: queued for these devices, or refused.
    GroupReceipt(Result<Vec<DeviceKey>, Refused>),
    /// For [`Op::Block`]: the devices told, or why not.
    Blocked(Result<Vec<DeviceKey>, GroupRefused>),
    /// For [`Op::Skipped`] and [`Op::LeaveAllGroups`]: the devices that
    /// got a notice.
    Notified(Vec<DeviceKey>),
    /// For [`Op::Sync`].
    Synced,
    /// For [`Op::RevokeInvite`]: whether there was such an invite.
    InviteRevoked(bool),
    /// For [`Op::DeleteUser`]: the devices revoked, or `None` if there is
    /// no such account.
    UserDeleted(Option<Vec<DeviceKey>>),
    /// For [`Op::Backup`]: what was written, or why not.
    BackedUp(Result<super::backup::Written, String>),
    /// The store failed (the request may be retried).
    Failed,
    /// For a [`BlobOp`] ([`StoreApi::blob`]).
    Blob(BlobOutcome),
}

/// The store as the hub sees it. The daemon's [`super::Store`] implements
/// it over `sled` and a store thread; the hub's unit tests use a
/// `BTreeMap`-backed one.
pub trait StoreApi: Send + Sync {
    /// Who a static key belongs to.
    fn identify(&self, key: &PublicKey) -> Identity;
    /// A user's id by name.
    fn user_id(&self, name: &str) -> Option<UserId>;
    /// A user's name.
    fn user_name(&self, user: UserId) -> Option<Arc<str>>;
    /// Appends a user's current devices, ascending; false if no such user.
    fn current_devices(&self, user: UserId, out: &mut Vec<DeviceId>) -> bool;
    /// Appends every device a user ever had, revoked ones too.
    fn all_devices(&self, user: UserId, out: &mut Vec<DeviceId>);
    /// A user's current devices with their details.
    fn device_infos(&self, user: UserId) -> Vec<DeviceInfo>;
    /// Whether a device exists and is not revoked.
    fn is_current(&self, d: DeviceKey) -> bool;
    /// How many one-time keys a device holds, if it published an identity.
    fn one_time_keys(&self, d: DeviceKey) -> Option<u32>;
    /// Whether a user shows its presence to nobody (spec §5.6).
    fn hides_presence(&self, user: UserId) -> bool;
    /// A group's membership (spec §5.8).
    fn group(&self, id: GroupId) -> Option<GroupView>;
    /// The groups a user is in, with their versions, by id.
    fn groups_of(&self, user: UserId) -> Vec<(GroupId, u64)>;
    /// Whether `blocker` blocks `blocked` (spec §5.8, *Blocking*).
    fn blocks(&self, blocker: UserId, blocked: UserId) -> bool;
    /// Whom `blocker` blocks.
    fn blocked_by(&self, blocker: UserId) -> Vec<UserId>;

    /// Appends a message to the queues of its copies (in memory; written
    /// by the store thread unless acknowledged first). `waiter` hears
    /// [`Outcome::Settled`] unless the answer is final at once.
    fn append(&self, m: NewMessage, waiter: &Waiter) -> Appended;
    /// A retry of message `id` from `sender` that the store still knows:
    /// [`Appended::Waiting`] (then `waiter` hears [`Outcome::Settled`]) or
    /// [`Appended::Duplicate`]; `None` if it does not know it, or knows it
    /// only in part (a message spilled before a restart: which devices
    /// miss a copy shows only against the retry's copies, in
    /// [`StoreApi::append`]).
    fn recall(&self, sender: DeviceKey, id: MsgId, waiter: &Waiter) -> Option<Appended>;
    /// Appends a message to a group to the queue of every current device
    /// of every member but the sending device, if the sender is a member
    /// and the version and device digest are the group's now (checked and
    /// appended under the membership's read lock, so that no change
    /// falls between). `online` says which devices are online. The waiter
    /// hears [`Outcome::Settled`] as for [`StoreApi::append`].
    fn append_group(&self, m: NewGroupMessage, online: &dyn Fn(DeviceKey) -> bool, waiter: &Waiter) -> GroupAppended;
    /// Appends key shares (spec §5.8, `GroupKeys`): direct messages with a
    /// body each, every copy addressed to its own device's user (`m.to`
    /// is not used); quotas as for a group message. Returns the answer and
    /// the devices skipped.
    fn append_shares(&self, m: NewMessage, waiter: &Waiter) -> (Appended, Vec<DeviceKey>);
    /// Appends up to `max` entries of `d`'s queue with sequence ≥ `from`
    /// to `out`, in order, from memory.
    fn read(&self, d: DeviceKey, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> Read;
    /// The device has stored every entry up to `up_to`: they go.
    fn ack(&self, d: DeviceKey, up_to: u64);
    /// The highest sequence number given out in `d`'s queue (0: none).
    fn last_seq(&self, d: DeviceKey) -> u64;
    /// Whether requests that add data are refused now (spec §10, *Storage
    /// full*).
    fn storage_full(&self) -> bool;

    /// Runs an operation on the store thread; `waiter` hears its outcome.
    fn submit(&self, op: Op, waiter: Option<Waiter>);
    /// Runs a blob operation on the blob thread (spec §5.7); `waiter`
    /// hears its outcome as [`Outcome::Blob`].
    fn blob(&self, op: BlobOp, waiter: Waiter);
}

/// A message's copies as [`Entry`] values, for tests and the model.
pub fn message_entry(m: &NewMessage, body: Bytes) -> Entry {
    Entry::Message(QueuedMessage {
        id: m.id,
        from_user: m.sender.user.0,
        from_device: m.sender.device.0,
        to_user: m.to.0,
        time_ms: m.now_ms,
        body,
    })
}
