//! The wire format: the preamble, record framing, and the postcard-encoded
//! frames that travel inside Noise transport records.
//!
//! What this module guarantees:
//! - a record's declared length is checked against the cap of the caller's
//!   current state *before* any of its body is buffered ([`RecordDecoder`]);
//! - a frame decodes only if it is canonical: no trailing bytes, and its
//!   re-encoding is byte for byte the input (postcard itself accepts
//!   overlong varints; we do not, so every frame has exactly one encoding);
//! - an unknown frame tag is reported as [`FrameError::Unsupported`] with the
//!   request id still recovered, so an old peer can answer `Unsupported`
//!   instead of hanging up (frame variants are append-only).
//!
//! What it does not do: cryptography (see [`crate::noise`]), sockets, or any
//! decision about what a frame means.
//!
//! The normative description of every byte is `protocol-spec/README.md`;
//! section numbers in comments (`spec §n`) refer to it.

mod blob;
mod frames;
mod groups;
mod record;

pub use blob::*;
pub use frames::*;
pub use groups::*;
pub use record::*;

/// The magic bytes a client sends first (spec §2).
pub const MAGIC: [u8; 7] = *b"TIDINGS";
/// The protocol version this build speaks (spec §2).
pub const PROTOCOL_VERSION: u8 = 1;
/// The 8-byte preamble: magic then version. Both sides also use it as the
/// Noise prologue (spec §4).
pub const PREAMBLE: [u8; 8] = [b'T', b'I', b'D', b'I', b'N', b'G', b'S', PROTOCOL_VERSION];
/// Length of the preamble and of the refusal.
pub const PREAMBLE_LEN: usize = 8;

/// Why the server refused a connection in the clear (spec §2). Sent
/// before any key exists: the refusal is `MAGIC`, a zero byte, the reason,
/// the highest version the server speaks and, for the reasons from 3 on
/// (the connection was fine, the server is busy), how many seconds to
/// wait before connecting again, as a big-endian `u16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// The first seven bytes were not `TIDINGS`.
    BadMagic = 1,
    /// The version byte names a version this server does not speak.
    UnsupportedVersion = 2,
    /// Too many open connections from this address.
    AddressConnections = 3,
    /// Too many new connections a second from this address.
    AddressRate = 4,
    /// The server has as many connections as it takes.
    ServerFull = 5,
    /// The server is shutting down.
    ShuttingDown = 6,
}

/// Length of a refusal of reason 1 or 2.
pub const REFUSAL_LEN: usize = 10;
/// Length of a refusal of reason 3 and up: with the retry-after.
pub const BUSY_REFUSAL_LEN: usize = 12;

/// A refusal as a client reads it (spec §2), reasons it does not know
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalNotice {
    /// The reason byte: a [`Refusal`], or a later one.
    pub reason: u8,
    /// The highest protocol version the server speaks.
    pub version: u8,
    /// Seconds to wait before connecting again (reasons 3 and up).
    pub retry_after: Option<u16>,
}

impl RefusalNotice {
    /// The reason, if this build knows it.
    pub fn known(&self) -> Option<Refusal> {
        Refusal::from_byte(self.reason)
    }

    /// Whether connecting again later may succeed (the server was busy,
    /// not unable to speak with this client): every reason from 3 on.
    pub fn is_busy(&self) -> bool {
        self.reason >= 3
    }
}

impl Refusal {
    fn from_byte(b: u8) -> Option<Refusal> {
        Some(match b {
            1 => Refusal::BadMagic,
            2 => Refusal::UnsupportedVersion,
            3 => Refusal::AddressConnections,
            4 => Refusal::AddressRate,
            5 => Refusal::ServerFull,
            6 => Refusal::ShuttingDown,
            _ => return None,
        })
    }

    /// The 10 bytes the server writes before closing, for reasons 1 and 2.
    pub fn to_bytes(self) -> [u8; REFUSAL_LEN] {
        let mut out = [0u8; REFUSAL_LEN];
        out[..7].copy_from_slice(&MAGIC);
        out[7] = 0;
        out[8] = self as u8;
        out[9] = PROTOCOL_VERSION;
        out
    }

    /// The 12 bytes of a refusal from reason 3 on: the 10 of
    /// [`Refusal::to_bytes`], then `retry_after` seconds, big-endian.
    pub fn busy_bytes(self, retry_after: u16) -> [u8; BUSY_REFUSAL_LEN] {
        let mut out = [0u8; BUSY_REFUSAL_LEN];
        out[..REFUSAL_LEN].copy_from_slice(&self.to_bytes());
        out[REFUSAL_LEN..].copy_from_slice(&retry_after.to_be_bytes());
        out
    }

    /// Parses a refusal of reason 1 or 2; `None` if the bytes are not one.
    pub fn parse(bytes: &[u8]) -> Option<(Refusal, u8)> {
        let n = RefusalNotice::parse(bytes)?;
        Some((n.known()?, n.version))
    }
}

impl RefusalNotice {
    /// How many bytes the refusal starting with `head` takes, once its
    /// reason byte (byte 8) is there: 10 for reasons 1 and 2, else 12.
    pub fn len_for(head: &[u8]) -> Option<usize> {
        head.get(8)
            .map(|&r| if r >= 3 { BUSY_REFUSAL_LEN } else { REFUSAL_LEN })
    }

    /// Parses a whole refusal; `None` if the bytes are not one or are
    /// short.
    pub fn parse(bytes: &[u8]) -> Option<RefusalNotice> {
        if bytes.len() < REFUSAL_LEN || bytes[..7] != MAGIC || bytes[7] != 0 || bytes[8] == 0 {
            return None;
        }
        let retry_after = if bytes[8] >= 3 {
            let b = bytes.get(REFUSAL_LEN..BUSY_REFUSAL_LEN)?;
            Some(u16::from_be_bytes([b[0], b[1]]))
        } else {
            None
        };
        Some(RefusalNotice {
            reason: bytes[8],
            version: bytes[9],
            retry_after,
        })
    }
}

/// Checks a complete preamble (spec §2).
///
/// # Errors
/// The [`Refusal`] the server sends back.
pub fn check_preamble(bytes: &[u8; PREAMBLE_LEN]) -> Result<(), Refusal> {
    if bytes[..7] != MAGIC {
        return Err(Refusal::BadMagic);
    }
    if bytes[7] != PROTOCOL_VERSION {
        return Err(Refusal::UnsupportedVersion);
    }
    Ok(())
}

/// Largest record body (spec §3): Noise's message limit.
pub const MAX_RECORD_LEN: usize = 65_535;
/// Length of the Poly1305 tag in every transport record.
pub const TAG_LEN: usize = 16;
/// Largest encoded frame: a record body less its tag (spec §3).
pub const MAX_FRAME_LEN: usize = MAX_RECORD_LEN - TAG_LEN;
/// Cap on a record while the handshake runs (spec §3). The XK messages with
/// empty payloads are 48, 48 and 64 bytes.
pub const HANDSHAKE_RECORD_CAP: usize = 128;

/// Longest user name (spec §6).
pub const MAX_NAME_LEN: usize = 32;
/// Shortest user name (spec §6).
pub const MIN_NAME_LEN: usize = 3;
/// Most devices one user may have at a time (spec §6).
pub const MAX_DEVICES_PER_USER: usize = 8;
/// Most bodies in one `Send`: every device of the recipient plus every other
/// device of the sender (spec §6).
pub const MAX_BODIES: usize = 2 * MAX_DEVICES_PER_USER - 1;
/// Largest single body in a `Send` (spec §6). With [`MAX_BODIES`] of them
/// the frame still fits in one record.
pub const MAX_BODY_LEN: usize = 4096;
/// Most message ids in one receipt (spec §6).
pub const MAX_RECEIPT_IDS: usize = 1024;
/// Largest body of an ephemeral send (spec §6): a typing indicator is a
/// few hundred bytes once encrypted.
pub const MAX_EPHEMERAL_LEN: usize = 1024;
/// Most users one connection watches the presence of (spec §6).
pub const MAX_WATCHED: usize = 256;
/// Longest error or close text the server sends (spec §6).
pub const MAX_TEXT_LEN: usize = 256;
/// Most bytes of a blob in one `UploadChunk` or `BlobData`, and the most
/// one `Download` asks for (spec §5.7, §6): 60 KiB, so that a chunk and
/// its frame fit one record.
pub const MAX_BLOB_DATA: usize = 61_440;
/// Most user names in an `UploadStart` or a `BlobGrant` (spec §6).
pub const MAX_BLOB_USERS: usize = 256;
/// Most users one `CreateGroup`, `AddMembers` or `RemoveMembers` names
/// (spec §6).
pub const MAX_GROUP_CHANGE: usize = 256;
/// Most members a server may let a group have (spec §6; the server's
/// setting is at most this, 256 by default).
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most groups a server may let a user be in (spec §6; the server's
/// setting is at most this, 100 by default).
pub const MAX_GROUPS_PER_USER: usize = 1000;
/// Most bodies in one `GroupKeys` (spec §6); the frame limit usually
/// binds first.
pub const MAX_KEY_BODIES: usize = 512;
/// Most users one user may block (spec §6).
pub const MAX_BLOCKED: usize = 1000;

/// Whether `name` is a valid user name: `[a-z0-9_.]{3,32}` (spec §6).
pub fn valid_user_name(name: &str) -> bool {
    (MIN_NAME_LEN..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_checks() {
        assert_eq!(check_preamble(&PREAMBLE), Ok(()));
        assert_eq!(check_preamble(b"GET / HT"), Err(Refusal::BadMagic));
        let mut v2 = PREAMBLE;
        v2[7] = 2;
        assert_eq!(check_preamble(&v2), Err(Refusal::UnsupportedVersion));
        let r = Refusal::UnsupportedVersion.to_bytes();
        assert_eq!(hex::encode(r), "544944494e4753000201");
        assert_eq!(Refusal::parse(&r), Some((Refusal::UnsupportedVersion, 1)));
        let busy = Refusal::AddressRate.busy_bytes(2);
        assert_eq!(hex::encode(busy), "544944494e47530004010002");
        assert_eq!(RefusalNotice::len_for(&busy[..9]), Some(BUSY_REFUSAL_LEN));
        assert_eq!(
            RefusalNotice::parse(&busy),
            Some(RefusalNotice {
                reason: 4,
                version: 1,
                retry_after: Some(2)
            })
        );
        assert_eq!(RefusalNotice::parse(&busy[..11]), None);
        // A later reason is still a refusal, with its retry-after.
        let mut later = busy;
        later[8] = 9;
        let n = RefusalNotice::parse(&later).unwrap();
        assert!(n.is_busy() && n.known().is_none() && n.retry_after == Some(2));
    }

    #[test]
    fn names() {
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("a.b_9"));
        assert!(!valid_user_name("al"));
        assert!(!valid_user_name("Alice"));
        assert!(!valid_user_name("al ice"));
        assert!(!valid_user_name(&"a".repeat(33)));
        assert!(valid_user_name(&"a".repeat(32)));
    }

    #[test]
    fn a_full_send_fits_in_one_record() {
        let body = Body {
            device: DeviceId(u32::MAX),
            data: bytes::Bytes::from(vec![0xAB; MAX_BODY_LEN]),
        };
        let frame = ClientFrame::Send(Send {
            id: MsgId([7; 16]),
            to: "z".repeat(MAX_NAME_LEN),
            bodies: vec![body.clone(); MAX_DEVICES_PER_USER],
            own: vec![body; MAX_DEVICES_PER_USER - 1],
        });
        let mut out = Vec::new();
        encode_client(u32::MAX, &frame, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN, "{} > {}", out.len(), MAX_FRAME_LEN);
    }

    #[test]
    fn a_full_blob_chunk_fits_in_one_record() {
        let data = bytes::Bytes::from(vec![0xAB; MAX_BLOB_DATA]);
        let mut out = Vec::new();
        let chunk = ClientFrame::UploadChunk(UploadChunk {
            id: BlobId([7; 32]),
            offset: u64::MAX,
            data: data.clone(),
        });
        encode_client(u32::MAX, &chunk, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN, "{} > {}", out.len(), MAX_FRAME_LEN);
        out.clear();
        let answer = ServerFrame::BlobData(BlobData {
            id: BlobId([7; 32]),
            offset: u64::MAX,
            data,
        });
        encode_server(u32::MAX, &answer, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN, "{} > {}", out.len(), MAX_FRAME_LEN);
        let names = vec!["z".repeat(MAX_NAME_LEN); MAX_BLOB_USERS];
        out.clear();
        let start = ClientFrame::UploadStart(UploadStart {
            id: BlobId([7; 32]),
            size: u64::MAX,
            to: names,
        });
        encode_client(u32::MAX, &start, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN, "{} > {}", out.len(), MAX_FRAME_LEN);
    }
}
