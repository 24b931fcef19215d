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

mod frames;
mod groups;
mod record;

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

/// Why the server refused a preamble (spec §2). Sent in clear, since no keys
/// exist yet: the refusal is `MAGIC`, a zero byte, the reason, and the
/// highest version the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// The first seven bytes were not `TIDINGS`.
    BadMagic = 1,
    /// The version byte names a version this server does not speak.
    UnsupportedVersion = 2,
}

/// Length of a refusal message.
pub const REFUSAL_LEN: usize = 10;

impl Refusal {
    /// The 10 bytes the server writes before closing.
    pub fn to_bytes(self) -> [u8; REFUSAL_LEN] {
        let mut out = [0u8; REFUSAL_LEN];
        out[..7].copy_from_slice(&MAGIC);
        out[7] = 0;
        out[8] = self as u8;
        out[9] = PROTOCOL_VERSION;
        out
    }

    /// Parses a refusal; `None` if the bytes are not one.
    pub fn parse(bytes: &[u8]) -> Option<(Refusal, u8)> {
        if bytes.len() < REFUSAL_LEN || bytes[..7] != MAGIC || bytes[7] != 0 {
            return None;
        }
        let reason = match bytes[8] {
            1 => Refusal::BadMagic,
            2 => Refusal::UnsupportedVersion,
            _ => return None,
        };
        Some((reason, bytes[9]))
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
}
