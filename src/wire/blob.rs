//! The types of the blob frames (spec §5.7): attachments travel as
//! ciphertext blobs that a device uploads in chunks and that the devices
//! it names download in ranges, beside the messages that carry their keys.
//!
//! The server never sees a key: a blob is opaque bytes named by the
//! SHA-256 of those bytes ([`BlobId`]). What the bytes are (the `tidings`
//! client's chunked encryption) is spec §14.8.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Bytes a sealed chunk of a file adds to its plaintext: the
/// ChaCha20-Poly1305 tag (spec §14.8).
pub const CHUNK_TAG_LEN: usize = 16;
/// Plaintext bytes per sealed chunk (spec §14.8): a sealed chunk is
/// [`super::MAX_BLOB_DATA`] bytes, one frame's worth.
pub const PLAIN_CHUNK: usize = super::MAX_BLOB_DATA - CHUNK_TAG_LEN;

/// The length of the blob that holds a file of `size` bytes sealed as
/// spec §14.8 says: a tag per chunk, and an empty file is one chunk.
pub fn sealed_len(size: u64) -> u64 {
    let chunks = size.div_ceil(PLAIN_CHUNK as u64).max(1);
    size.saturating_add(chunks * CHUNK_TAG_LEN as u64)
}

/// A blob's id: the SHA-256 of its bytes (the ciphertext), 32 bytes on
/// the wire. The server checks it when the upload finishes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<BlobId> {
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(BlobId(id))
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", hex::encode(&self.0[..8]))
    }
}

/// Starts an upload, or asks how far one got (spec §5.7, `UploadStart`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct UploadStart {
    /// The SHA-256 of the whole blob.
    pub id: BlobId,
    /// Its length in bytes.
    pub size: u64,
    /// The users who may download it besides the uploader's own user, at
    /// most [`super::MAX_BLOB_USERS`].
    pub to: Vec<String>,
}

/// Bytes of an upload at an offset (spec §5.7, `UploadChunk`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct UploadChunk {
    /// Which upload.
    pub id: BlobId,
    /// Where `data` goes: the bytes the server holds so far.
    pub offset: u64,
    /// 1 to [`super::MAX_BLOB_DATA`] bytes.
    pub data: Bytes,
}

/// Asks for a range of a blob (spec §5.7, `Download`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Download {
    /// Which blob.
    pub id: BlobId,
    /// From this byte.
    pub offset: u64,
    /// At most this many bytes, 1 to [`super::MAX_BLOB_DATA`].
    pub len: u32,
}

/// Lets more users download a blob (spec §5.7, `BlobGrant`): what a
/// device does when it forwards the message that carries it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BlobGrant {
    /// Which blob.
    pub id: BlobId,
    /// The users to add, at most [`super::MAX_BLOB_USERS`].
    pub to: Vec<String>,
}

/// How far an upload is (spec §5.7, server `UploadStatus`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct UploadStatus {
    /// Which blob.
    pub id: BlobId,
    /// How many bytes, from the start, the server holds.
    pub received: u64,
    /// Whether the upload is finished: checked against its id and durable.
    pub complete: bool,
}

/// A range of a blob (spec §5.7, server `BlobData`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BlobData {
    /// Which blob.
    pub id: BlobId,
    /// Where `data` starts.
    pub offset: u64,
    /// The bytes: as many as asked for, fewer only at the blob's end.
    pub data: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_hex() {
        let id = BlobId([0xab; 32]);
        assert_eq!(id.to_string(), "ab".repeat(32));
        assert_eq!(BlobId::from_hex(&id.to_string()), Some(id));
        assert_eq!(BlobId::from_hex(&"AB".repeat(32)), None);
        assert_eq!(BlobId::from_hex("ab"), None);
    }
}
