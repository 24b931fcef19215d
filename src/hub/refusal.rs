//! Every refusal the hub makes, and the one place that maps each to its
//! wire code and its words (spec §7), as rustls maps its errors to alerts
//! in one `TryFrom`.

use crate::store::{BlobRefused, LinkError, PublishError, Quota, Refused, RegisterError};
use crate::wire::{ErrorCode, ServerFrame};

/// Why a request is refused, or a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Register` with an unknown, used-up or expired invite.
    InvalidInvite,
    /// A name that is not `[a-z0-9_.]{3,32}`.
    InvalidName,
    /// A name in use.
    NameTaken,
    /// A static key that already belongs to a device.
    KeyInUse,
    /// `RedeemLink` with an unknown, used or expired code.
    InvalidLinkCode,
    /// The account has the most devices allowed.
    DeviceLimit,
    /// The user has the most link codes outstanding.
    LinkCodesOutstanding,
    /// The user asked for too many link codes lately.
    LinkCodeRate,
    /// No such user.
    UnknownUser,
    /// No such device in the caller's account.
    UnknownDevice,
    /// Revoking the account's last device.
    LastDevice,
    /// More bodies than one `Send` may carry.
    TooManyBodies,
    /// A body over the limit.
    BodyTooLarge,
    /// Two bodies for one device.
    TwoBodies,
    /// A body for the sending device itself.
    BodyForSender,
    /// `own` not empty in a send to oneself.
    OwnToSelf,
    /// A queue it is for is full.
    QueueFull,
    /// All queues are at the disk budget.
    DiskBudget,
    /// The sender holds its share of a queue it sends to.
    SenderShare,
    /// The sending user holds its share of the server's storage.
    UserShare,
    /// The data directory's filesystem is below the free-space floor.
    StorageFull,
    /// An `Ack` beyond what was delivered on this connection.
    AckBeyondDelivered,
    /// A receipt with no ids, too many, or kind 0.
    BadReceipt,
    /// Keys published before an identity.
    IdentityFirst,
    /// A key whose signature does not verify.
    BadSignature,
    /// A different identity for a device that has one.
    IdentityChanged,
    /// More one-time keys than the server holds per device.
    TooManyKeys,
    /// Key claims over the device's rate.
    ClaimRate,
    /// `Send`s over the device's rate (spec §6).
    SendRate,
    /// Receipts, retractions and key uploads over the device's rate.
    WriteRate,
    /// Ephemeral sends, presence settings and watches over the device's
    /// rate (spec §5.6).
    EphemeralRate,
    /// An ephemeral body over its limit.
    EphemeralTooLarge,
    /// A `WatchPresence` naming too many users.
    TooManyWatched,
    /// The store failed; the request may be retried.
    Internal,
    /// Not a member of the group (or no such group), or a user named is
    /// not (spec §5.8).
    NotAMember,
    /// Only admins may change the membership.
    NotAdmin,
    /// The group has the most members allowed.
    GroupFull,
    /// The caller or a user to be added is in the most groups allowed.
    TooManyGroups,
    /// A group with that id exists.
    GroupExists,
    /// The caller blocks the most users allowed.
    TooManyBlocked,
    /// A group change naming more users than one frame may.
    TooManyUsers,
    /// Blocking oneself.
    BlockSelf,
    /// Group changes over the device's rate.
    GroupRate,
    /// Close: the device connected again elsewhere.
    ConnectedElsewhere,
    /// Close: the device was revoked.
    Revoked,
    /// Close: the server is shutting down.
    ShuttingDown,
    /// A blob over the largest the server takes.
    BlobTooLarge,
    /// The user's blobs at their budget.
    BlobBudget,
    /// The user has the most uploads under way.
    BlobUploads,
    /// No such blob, or not one the caller's user may read.
    UnknownBlob,
    /// The uploaded bytes do not hash to the blob's id.
    BlobMismatch,
    /// A chunk that does not start where the upload stands.
    BlobOffset,
    /// A chunk or range past the blob's end.
    BlobPastEnd,
    /// A finish before every byte came.
    BlobIncomplete,
    /// An upload started again with another size.
    BlobSizeMismatch,
    /// Another user holds a blob with this id.
    BlobTaken,
    /// A blob of 0 bytes.
    BlobEmpty,
    /// A chunk or range of 0 bytes or over the limit.
    BlobChunkSize,
    /// No users, or too many, in an `UploadStart` or `BlobGrant`.
    BlobUsers,
    /// Too many blob requests in flight on the connection.
    BlobWindow,
    /// Too many bytes of transfers in flight in the whole server.
    BlobMemory,
}

impl Refusal {
    /// Its code and its words for people.
    pub fn describe(self) -> (ErrorCode, &'static str) {
        use Refusal::*;
        match self {
            InvalidInvite => (ErrorCode::INVALID_INVITE, "invite unknown, used up or expired"),
            InvalidName => (ErrorCode::INVALID_NAME, "names are 3 to 32 of a-z 0-9 _ ."),
            NameTaken => (ErrorCode::NAME_TAKEN, "name taken"),
            KeyInUse => (ErrorCode::NOT_ALLOWED, "key already registered"),
            InvalidLinkCode => (ErrorCode::INVALID_LINK_CODE, "link code unknown, used or expired"),
            DeviceLimit => (ErrorCode::DEVICE_LIMIT, "too many devices"),
            LinkCodesOutstanding => (
                ErrorCode::RATE_LIMITED,
                "too many link codes outstanding; use one or wait until one expires",
            ),
            LinkCodeRate => (ErrorCode::RATE_LIMITED, "too many link codes asked for; try later"),
            UnknownUser => (ErrorCode::UNKNOWN_USER, "no such user"),
            UnknownDevice => (ErrorCode::UNKNOWN_DEVICE, "no such device"),
            LastDevice => (ErrorCode::BAD_REQUEST, "that is the account's last device"),
            TooManyBodies => (ErrorCode::TOO_MANY_BODIES, "too many bodies"),
            BodyTooLarge => (ErrorCode::BODY_TOO_LARGE, "body too large"),
            TwoBodies => (ErrorCode::BAD_REQUEST, "two bodies for one device"),
            BodyForSender => (ErrorCode::BAD_REQUEST, "a body for the sending device"),
            OwnToSelf => (ErrorCode::BAD_REQUEST, "to yourself, every body goes in bodies"),
            QueueFull => (ErrorCode::QUOTA_EXCEEDED, "a recipient device's queue is full"),
            DiskBudget => (ErrorCode::QUOTA_EXCEEDED, "the server is at its storage budget"),
            SenderShare => (
                ErrorCode::QUOTA_EXCEEDED,
                "you have your share of a recipient device's queue waiting; try when it has collected some",
            ),
            UserShare => (
                ErrorCode::QUOTA_EXCEEDED,
                "you have your share of the server's storage waiting undelivered; try when some is collected",
            ),
            StorageFull => (
                ErrorCode::STORAGE_FULL,
                "the server's disk is full; nothing new is accepted until space is freed",
            ),
            AckBeyondDelivered => (ErrorCode::BAD_REQUEST, "ack beyond what was delivered"),
            BadReceipt => (ErrorCode::BAD_REQUEST, "a receipt names 1 to 1024 messages"),
            IdentityFirst => (ErrorCode::BAD_REQUEST, "publish an identity first"),
            BadSignature => (ErrorCode::BAD_REQUEST, "bad signature"),
            IdentityChanged => (ErrorCode::NOT_ALLOWED, "this device already has a different identity"),
            TooManyKeys => (ErrorCode::BAD_REQUEST, "too many one-time keys"),
            ClaimRate => (ErrorCode::RATE_LIMITED, "too many key claims; try again in a minute"),
            SendRate => (
                ErrorCode::SLOW_DOWN,
                "this device sends too fast; nothing was stored: send again after the RetryAfter",
            ),
            WriteRate => (
                ErrorCode::SLOW_DOWN,
                "too many receipts, retractions or key uploads; nothing was stored: try again after the RetryAfter",
            ),
            EphemeralRate => (
                ErrorCode::RATE_LIMITED,
                "too many typing indicators or presence requests; slow down",
            ),
            EphemeralTooLarge => (ErrorCode::BODY_TOO_LARGE, "an ephemeral body is at most 1024 bytes"),
            TooManyWatched => (ErrorCode::BAD_REQUEST, "watch the presence of at most 256 users"),
            Internal => (ErrorCode::INTERNAL, "server storage failure"),
            NotAMember => (ErrorCode::NOT_A_MEMBER, "no such group, or not a member of it"),
            NotAdmin => (ErrorCode::NOT_ADMIN, "only an admin of the group may do that"),
            GroupFull => (
                ErrorCode::GROUP_FULL,
                "the group has the most members this server allows",
            ),
            TooManyGroups => (
                ErrorCode::TOO_MANY_GROUPS,
                "you, or a user to be added, are in the most groups this server allows",
            ),
            GroupExists => (ErrorCode::GROUP_EXISTS, "a group with that id exists"),
            TooManyBlocked => (ErrorCode::TOO_MANY_BLOCKED, "you block the most users allowed (1000)"),
            TooManyUsers => (ErrorCode::BAD_REQUEST, "a group change names at most 256 users"),
            BlockSelf => (ErrorCode::BAD_REQUEST, "you cannot block yourself"),
            GroupRate => (ErrorCode::RATE_LIMITED, "too many group changes; try again in a minute"),
            ConnectedElsewhere => (ErrorCode::CONNECTED_ELSEWHERE, "this device connected elsewhere"),
            Revoked => (ErrorCode::REVOKED, "this device was revoked"),
            ShuttingDown => (ErrorCode::SHUTTING_DOWN, "the server is shutting down"),
            BlobTooLarge => (ErrorCode::BLOB_TOO_LARGE, "the file is larger than this server takes"),
            BlobBudget => (
                ErrorCode::BLOB_BUDGET,
                "your files on the server are at your budget; try again once they are fetched or expire",
            ),
            BlobUploads => (ErrorCode::RATE_LIMITED, "too many uploads under way; finish one first"),
            UnknownBlob => (
                ErrorCode::UNKNOWN_BLOB,
                "no such file on the server: never finished, expired, deleted, or not for you",
            ),
            BlobMismatch => (
                ErrorCode::BLOB_MISMATCH,
                "the uploaded bytes do not hash to the file's id; the upload was dropped",
            ),
            BlobOffset => (ErrorCode::BAD_REQUEST, "a chunk starts where the upload stands"),
            BlobPastEnd => (ErrorCode::BAD_REQUEST, "past the end of the file"),
            BlobIncomplete => (ErrorCode::BAD_REQUEST, "not every byte of the file was uploaded"),
            BlobSizeMismatch => (ErrorCode::BAD_REQUEST, "this upload was started with another size"),
            BlobTaken => (ErrorCode::BAD_REQUEST, "another user holds a file with this id"),
            BlobEmpty => (ErrorCode::BAD_REQUEST, "a blob is at least one byte"),
            BlobChunkSize => (ErrorCode::BAD_REQUEST, "a chunk or range is 1 to 61440 bytes"),
            BlobUsers => (ErrorCode::BAD_REQUEST, "name 1 to 256 users"),
            BlobWindow => (
                ErrorCode::RATE_LIMITED,
                "too many file requests in flight on this connection",
            ),
            BlobMemory => (
                ErrorCode::RATE_LIMITED,
                "the server is busy with other transfers; try again shortly",
            ),
        }
    }

    /// The wire code.
    pub fn code(self) -> ErrorCode {
        self.describe().0
    }

    /// The words.
    pub fn text(self) -> &'static str {
        self.describe().1
    }

    /// The `Error` frame that answers a request with it.
    pub fn frame(self) -> ServerFrame {
        let (code, text) = self.describe();
        ServerFrame::error(code, text)
    }
}

impl From<RegisterError> for Refusal {
    fn from(e: RegisterError) -> Refusal {
        match e {
            RegisterError::InvalidInvite => Refusal::InvalidInvite,
            RegisterError::InvalidName => Refusal::InvalidName,
            RegisterError::NameTaken => Refusal::NameTaken,
            RegisterError::KeyInUse => Refusal::KeyInUse,
        }
    }
}

impl From<LinkError> for Refusal {
    fn from(e: LinkError) -> Refusal {
        match e {
            LinkError::InvalidCode => Refusal::InvalidLinkCode,
            LinkError::DeviceLimit => Refusal::DeviceLimit,
            LinkError::KeyInUse => Refusal::KeyInUse,
        }
    }
}

impl From<PublishError> for Refusal {
    fn from(e: PublishError) -> Refusal {
        match e {
            PublishError::IdentityChanged => Refusal::IdentityChanged,
            PublishError::NoIdentity => Refusal::IdentityFirst,
            PublishError::TooMany => Refusal::TooManyKeys,
            PublishError::BadSignature => Refusal::BadSignature,
        }
    }
}

impl From<BlobRefused> for Refusal {
    fn from(r: BlobRefused) -> Refusal {
        match r {
            BlobRefused::TooLarge { .. } => Refusal::BlobTooLarge,
            BlobRefused::Budget => Refusal::BlobBudget,
            BlobRefused::Uploads => Refusal::BlobUploads,
            BlobRefused::DiskBudget => Refusal::DiskBudget,
            BlobRefused::StorageFull => Refusal::StorageFull,
            BlobRefused::Unknown => Refusal::UnknownBlob,
            BlobRefused::Mismatch => Refusal::BlobMismatch,
            BlobRefused::Offset { .. } => Refusal::BlobOffset,
            BlobRefused::PastEnd { .. } => Refusal::BlobPastEnd,
            BlobRefused::Incomplete { .. } => Refusal::BlobIncomplete,
            BlobRefused::SizeMismatch { .. } => Refusal::BlobSizeMismatch,
            BlobRefused::Taken => Refusal::BlobTaken,
            BlobRefused::Empty => Refusal::BlobEmpty,
        }
    }
}

impl From<Refused> for Refusal {
    fn from(r: Refused) -> Refusal {
        match r {
            Refused::Quota(Quota::Queue(_)) => Refusal::QueueFull,
            Refused::Quota(Quota::Disk) => Refusal::DiskBudget,
            Refused::Quota(Quota::Sender(_)) => Refusal::SenderShare,
            Refused::Quota(Quota::User) => Refusal::UserShare,
            Refused::StorageFull => Refusal::StorageFull,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_text_fits_the_limit_and_every_code_is_known() {
        use Refusal::*;
        let all = [
            InvalidInvite,
            InvalidName,
            NameTaken,
            KeyInUse,
            InvalidLinkCode,
            DeviceLimit,
            LinkCodesOutstanding,
            LinkCodeRate,
            UnknownUser,
            UnknownDevice,
            LastDevice,
            TooManyBodies,
            BodyTooLarge,
            TwoBodies,
            BodyForSender,
            OwnToSelf,
            QueueFull,
            DiskBudget,
            SenderShare,
            UserShare,
            StorageFull,
            AckBeyondDelivered,
            BadReceipt,
            IdentityFirst,
            BadSignature,
            IdentityChanged,
            TooManyKeys,
            ClaimRate,
            SendRate,
            WriteRate,
            EphemeralRate,
            EphemeralTooLarge,
            TooManyWatched,
            Internal,
            NotAMember,
            NotAdmin,
            GroupFull,
            TooManyGroups,
            GroupExists,
            TooManyBlocked,
            TooManyUsers,
            BlockSelf,
            GroupRate,
            ConnectedElsewhere,
            Revoked,
            ShuttingDown,
            BlobTooLarge,
            BlobBudget,
            BlobUploads,
            UnknownBlob,
            BlobMismatch,
            BlobOffset,
            BlobPastEnd,
            BlobIncomplete,
            BlobSizeMismatch,
            BlobTaken,
            BlobEmpty,
            BlobChunkSize,
            BlobUsers,
            BlobWindow,
            BlobMemory,
        ];
        for r in all {
            let (code, text) = r.describe();
            assert!(text.len() <= crate::wire::MAX_TEXT_LEN, "{r:?}");
            assert_ne!(code.name(), "UNKNOWN", "{r:?}");
        }
    }
}
