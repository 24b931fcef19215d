//! What a message says, and how it becomes one device's body and back.
//!
//! In this version a body is the postcard encoding of a versioned
//! [`Content`], in clear: the end-to-end layer replaces [`seal_body`] and
//! [`open_body`] with per-device encryption, and nothing else in the client
//! builds or reads a body.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::{DeviceAddr, MAX_BODY_LEN};

/// The content of one message, as its sender wrote it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Content {
    /// The text.
    pub text: String,
    /// When the sender wrote it, by the sender's clock (ms since the epoch).
    pub ts_ms: u64,
}

/// The encoded forms. Append-only: the postcard tag is the version.
#[derive(Serialize, Deserialize)]
enum Versioned {
    V1 { text: String, ts_ms: u64 },
}

/// A body that cannot be made or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BodyError {
    /// The encoded content is longer than a body may be.
    #[error("message too long: {len} bytes encoded, at most {max}")]
    TooLong {
        /// Encoded length.
        len: usize,
        /// [`MAX_BODY_LEN`].
        max: usize,
    },
    /// The body is not a content this build understands.
    #[error("unreadable message body")]
    Unreadable,
}

/// Makes the body of `content` for one recipient device.
///
/// # Errors
/// [`BodyError::TooLong`] if it would not fit in a body.
pub fn seal_body(content: &Content, _for_device: &DeviceAddr) -> Result<Bytes, BodyError> {
    let v = Versioned::V1 {
        text: content.text.clone(),
        ts_ms: content.ts_ms,
    };
    let bytes = postcard::to_stdvec(&v).map_err(|_| BodyError::Unreadable)?;
    if bytes.len() > MAX_BODY_LEN {
        return Err(BodyError::TooLong {
            len: bytes.len(),
            max: MAX_BODY_LEN,
        });
    }
    Ok(Bytes::from(bytes))
}

/// Reads a body received from `from`.
///
/// # Errors
/// [`BodyError::Unreadable`] for an unknown version, trailing bytes or
/// damaged content.
pub fn open_body(body: &[u8], _from: &DeviceAddr) -> Result<Content, BodyError> {
    let (v, rest) = postcard::take_from_bytes::<Versioned>(body).map_err(|_| BodyError::Unreadable)?;
    if !rest.is_empty() {
        return Err(BodyError::Unreadable);
    }
    match v {
        Versioned::V1 { text, ts_ms } => Ok(Content { text, ts_ms }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DeviceId;

    fn bob() -> DeviceAddr {
        DeviceAddr {
            user: "bob".into(),
            device: DeviceId(1),
        }
    }

    #[test]
    fn round_trip_and_bytes() {
        let c = Content {
            text: "hi".into(),
            ts_ms: 1,
        };
        let body = seal_body(&c, &bob()).unwrap();
        // tag 0 (V1), length 2, "hi", ts 1.
        assert_eq!(hex::encode(&body), "0002686901");
        assert_eq!(open_body(&body, &bob()), Ok(c));
    }

    #[test]
    fn rejects_unknown_versions_trailing_bytes_and_long_texts() {
        assert_eq!(open_body(&[1, 0], &bob()), Err(BodyError::Unreadable));
        assert_eq!(open_body(&[0, 0, 0, 0], &bob()), Err(BodyError::Unreadable));
        assert_eq!(open_body(&[], &bob()), Err(BodyError::Unreadable));
        let long = Content {
            text: "x".repeat(MAX_BODY_LEN),
            ts_ms: 0,
        };
        assert!(matches!(seal_body(&long, &bob()), Err(BodyError::TooLong { .. })));
    }
}
