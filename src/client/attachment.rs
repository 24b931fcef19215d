//! Attachments on the device: a file encrypted in chunks with a fresh
//! key, the reference a message carries to it, and what a device keeps
//! about it (spec §14.8).
//!
//! The encryption is the STREAM construction over ChaCha20-Poly1305
//! (ring): the file is cut into chunks of [`PLAIN_CHUNK`] bytes (the last
//! shorter, and an empty file is one empty chunk), and chunk `i` is sealed
//! with the file's key under the nonce `00 00 00 ‖ i (8 bytes, big-endian)
//! ‖ last`, where `last` is `01` for the final chunk and `00` for the
//! others, and no associated data. So a chunk opens only at its own place,
//! and a file cut short or made longer is caught: its last chunk does not
//! open as a last one. Each sealed chunk is [`SEALED_CHUNK`] bytes (16
//! more than its plaintext), one `UploadChunk` or `BlobData` frame. The
//! blob's id is the SHA-256 of all sealed chunks in order.
//!
//! A key is used for one file only (fresh from the system's randomness),
//! so the nonces never repeat under a key; encrypting the same file with
//! the same key again gives the same bytes, which is how an upload resumes
//! after a crash with the same id.
//!
//! What it does not do: the network (see [`super::files`]),
//! or the history.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use bytes::Bytes;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroize;

use crate::wire::{BlobId, CHUNK_TAG_LEN, MAX_BLOB_DATA};
pub use crate::wire::{PLAIN_CHUNK, sealed_len};

/// Bytes of a sealed chunk: one frame's worth of blob.
pub const SEALED_CHUNK: usize = MAX_BLOB_DATA;
/// The tag each chunk gains.
pub const TAG_LEN: usize = CHUNK_TAG_LEN;
/// The largest thumbnail a message carries (spec §14.8).
pub const MAX_THUMBNAIL: usize = 2048;
/// The longest file name a message carries, in bytes.
pub const MAX_NAME: usize = 255;
/// The longest media type a message carries, in bytes.
pub const MAX_MEDIA_TYPE: usize = 127;

/// A file's key: 32 random bytes, wiped when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileKey(pub [u8; 32]);

impl FileKey {
    /// A fresh key from the system's randomness.
    ///
    /// # Errors
    /// If the system has no randomness to give.
    pub fn generate() -> Result<FileKey, Unavailable> {
        let mut k = [0u8; 32];
        SystemRandom::new().fill(&mut k).map_err(|_| Unavailable)?;
        Ok(FileKey(k))
    }
}

impl Drop for FileKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(<secret>)")
    }
}

/// The system gave no randomness.
#[derive(Debug, Clone, Copy, Error)]
#[error("no randomness for a file key")]
pub struct Unavailable;

/// What a message carries about a file (spec §14.8): enough to fetch it,
/// decrypt it, check it and show it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FileRef {
    /// The blob on the server: the SHA-256 of the sealed chunks.
    pub blob: BlobId,
    /// The key it is sealed with.
    pub key: FileKey,
    /// The plaintext's length in bytes.
    pub size: u64,
    /// The plaintext's SHA-256.
    pub sha256: [u8; 32],
    /// Its media type, such as `image/jpeg` (at most [`MAX_MEDIA_TYPE`]
    /// bytes).
    pub media_type: String,
    /// Its file name as the sender had it, without a directory (at most
    /// [`MAX_NAME`] bytes); a receiver makes it safe before using it.
    pub name: String,
    /// For an image, a small preview (at most [`MAX_THUMBNAIL`] bytes).
    pub thumbnail: Option<Bytes>,
}

impl FileRef {
    /// The blob's length: the plaintext plus a tag per chunk.
    pub fn sealed_len(&self) -> u64 {
        sealed_len(self.size)
    }

    /// What a receiver keeps of a reference from a peer (spec §14.8): a
    /// thumbnail over [`MAX_THUMBNAIL`] bytes is dropped, a name or media
    /// type over its limit is cut at a character boundary. The file
    /// itself is checked when it is downloaded.
    pub fn received(mut self) -> FileRef {
        if self.thumbnail.as_ref().is_some_and(|t| t.len() > MAX_THUMBNAIL) {
            self.thumbnail = None;
        }
        self.name = shorten(&self.name, MAX_NAME);
        self.media_type = shorten(&self.media_type, MAX_MEDIA_TYPE);
        self
    }
}

/// How many chunks a file of `size` bytes is sealed in (an empty file is
/// one empty chunk).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(PLAIN_CHUNK as u64).max(1)
}

/// Why a chunk or a file does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Damaged {
    /// Chunk `index` does not open with this key at its place.
    #[error("chunk {0} of the file does not decrypt: the file was altered, or the key is wrong")]
    Chunk(u64),
    /// The plaintext does not hash to what the message said.
    #[error("the decrypted file does not match its checksum")]
    Checksum,
    /// The blob is not as long as the message said.
    #[error("the file on the server has the wrong length")]
    Length,
}

fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

fn aead(key: &FileKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key.0).expect("a 32-byte key"))
}

/// Seals and opens the chunks of one file.
pub struct ChunkCipher {
    key: LessSafeKey,
    chunks: u64,
}

impl ChunkCipher {
    /// The cipher of a file of `size` bytes under `key`.
    pub fn new(key: &FileKey, size: u64) -> ChunkCipher {
        ChunkCipher {
            key: aead(key),
            chunks: chunk_count(size),
        }
    }

    /// How many chunks the file has.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Seals chunk `index` in place: `buf` holds its plaintext and gets
    /// the tag appended.
    pub fn seal(&self, index: u64, buf: &mut Vec<u8>) {
        let last = index + 1 == self.chunks;
        // Sealing cannot fail for a chunk this size.
        let _ = self.key.seal_in_place_append_tag(nonce(index, last), Aad::empty(), buf);
    }

    /// Opens chunk `index` in place: `buf` holds it sealed and is left
    /// with its plaintext.
    ///
    /// # Errors
    /// [`Damaged::Chunk`] if it does not open here.
    pub fn open(&self, index: u64, buf: &mut Vec<u8>) -> Result<(), Damaged> {
        let last = index + 1 == self.chunks;
        let n = self
            .key
            .open_in_place(nonce(index, last), Aad::empty(), buf)
            .map_err(|_| Damaged::Chunk(index))?
            .len();
        buf.truncate(n);
        Ok(())
    }
}

/// Reads `reader` a chunk at a time: each call fills `buf` with the next
/// chunk's plaintext (up to [`PLAIN_CHUNK`] bytes; fewer only at the end).
///
/// # Errors
/// Read errors.
pub fn read_chunk(reader: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    buf.resize(PLAIN_CHUNK, 0);
    let mut n = 0;
    while n < PLAIN_CHUNK {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(n)
}

/// A file's plaintext length and SHA-256, read through once.
///
/// # Errors
/// Read errors.
pub fn scan(path: &Path) -> io::Result<(u64, [u8; 32])> {
    let mut f = File::open(path)?;
    let mut h = Context::new(&SHA256);
    let mut buf = Vec::with_capacity(SEALED_CHUNK);
    let mut size = 0u64;
    loop {
        let n = read_chunk(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf);
        size += n as u64;
    }
    Ok((size, digest(h)))
}

fn digest(h: Context) -> [u8; 32] {
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The sealed chunks of a file, in order, from its start.
pub struct Sealer {
    file: File,
    cipher: ChunkCipher,
    next: u64,
    size: u64,
    read: u64,
}

impl Sealer {
    /// Seals the file at `path`, which must still be `size` bytes long,
    /// with `key`.
    ///
    /// # Errors
    /// If it cannot be opened.
    pub fn open(path: &Path, key: &FileKey, size: u64) -> io::Result<Sealer> {
        Ok(Sealer {
            file: File::open(path)?,
            cipher: ChunkCipher::new(key, size),
            next: 0,
            size,
            read: 0,
        })
    }

    /// Where the next chunk starts in the blob.
    pub fn offset(&self) -> u64 {
        self.next * SEALED_CHUNK as u64
    }

    /// Skips to the chunk at blob offset `offset` (a chunk boundary, or
    /// the blob's end), to resume an upload.
    ///
    /// # Errors
    /// If the file cannot seek, or `offset` is not a chunk boundary.
    pub fn skip_to(&mut self, offset: u64) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if !offset.is_multiple_of(SEALED_CHUNK as u64) && offset != sealed_len(self.size) {
            return Err(io::Error::other("the server holds part of a chunk"));
        }
        self.next = offset.div_ceil(SEALED_CHUNK as u64);
        self.read = (self.next * PLAIN_CHUNK as u64).min(self.size);
        self.file.seek(SeekFrom::Start(self.read))?;
        Ok(())
    }

    /// The next sealed chunk into `buf`; false after the last.
    ///
    /// # Errors
    /// Read errors; a file that changed length since it was scanned.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        if self.next >= self.cipher.chunks() {
            return Ok(false);
        }
        let n = read_chunk(&mut self.file, buf)?;
        self.read += n as u64;
        let last = self.next + 1 == self.cipher.chunks();
        if (last && self.read != self.size) || (!last && n != PLAIN_CHUNK) {
            return Err(io::Error::other("the file changed while it was being sent"));
        }
        self.cipher.seal(self.next, buf);
        self.next += 1;
        Ok(true)
    }
}

/// A file's length, its SHA-256 and the id of its blob sealed with `key`,
/// from one read through it.
///
/// # Errors
/// Read errors.
pub fn scan_and_seal(path: &Path, key: &FileKey) -> io::Result<(u64, [u8; 32], BlobId)> {
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    let cipher = ChunkCipher::new(key, size);
    let (mut plain, mut sealed) = (Context::new(&SHA256), Context::new(&SHA256));
    let mut buf = Vec::with_capacity(SEALED_CHUNK);
    let mut read = 0u64;
    for i in 0..cipher.chunks() {
        let n = read_chunk(&mut f, &mut buf)?;
        read += n as u64;
        plain.update(&buf);
        cipher.seal(i, &mut buf);
        sealed.update(&buf);
    }
    // Nothing more, and nothing less, than its length said.
    if read != size || read_chunk(&mut f, &mut buf)? != 0 {
        return Err(io::Error::other("the file changed while it was being read"));
    }
    Ok((size, digest(plain), BlobId(digest(sealed))))
}

/// The blob id of the file at `path` sealed with `key`: seals it through
/// once and hashes what comes out.
///
/// # Errors
/// Read errors; a file that changed length.
pub fn blob_id(path: &Path, key: &FileKey, size: u64) -> io::Result<BlobId> {
    let mut s = Sealer::open(path, key, size)?;
    let mut h = Context::new(&SHA256);
    let mut buf = Vec::with_capacity(SEALED_CHUNK);
    while s.next_chunk(&mut buf)? {
        h.update(&buf);
    }
    Ok(BlobId(digest(h)))
}

/// Opens a blob's chunks in order and checks the whole: the chunk count,
/// each chunk's place, and the plaintext's SHA-256 at the end.
pub struct Opener {
    cipher: ChunkCipher,
    next: u64,
    plain: Context,
    expect: [u8; 32],
    size: u64,
    got: u64,
}

impl Opener {
    /// For the file `file` describes.
    pub fn new(file: &FileRef) -> Opener {
        Opener {
            cipher: ChunkCipher::new(&file.key, file.size),
            next: 0,
            plain: Context::new(&SHA256),
            expect: file.sha256,
            size: file.size,
            got: 0,
        }
    }

    /// Opens the next sealed chunk in place.
    ///
    /// # Errors
    /// [`Damaged`].
    pub fn open(&mut self, buf: &mut Vec<u8>) -> Result<(), Damaged> {
        if self.next >= self.cipher.chunks() {
            return Err(Damaged::Length);
        }
        self.cipher.open(self.next, buf)?;
        self.next += 1;
        self.got += buf.len() as u64;
        self.plain.update(buf);
        Ok(())
    }

    /// Checks that every chunk came and the plaintext is the one meant.
    ///
    /// # Errors
    /// [`Damaged`].
    pub fn finish(self) -> Result<(), Damaged> {
        if self.next != self.cipher.chunks() || self.got != self.size {
            return Err(Damaged::Length);
        }
        if digest(self.plain) != self.expect {
            return Err(Damaged::Checksum);
        }
        Ok(())
    }
}

/// What a device keeps about a message's file.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Attachment {
    /// What the message said.
    pub file: FileRef,
    /// Where the file is on this device: downloaded here, or (on the
    /// sending device) where it was sent from.
    pub path: Option<String>,
    /// The server said it no longer has the blob.
    pub expired: bool,
    /// On the sending device: the upload finished.
    pub uploaded: bool,
}

impl Attachment {
    /// A file a message brought in (direct or group): not downloaded yet.
    pub fn received(file: FileRef) -> Box<Attachment> {
        Box::new(Attachment {
            file: file.received(),
            path: None,
            expired: false,
            uploaded: false,
        })
    }
}

/// A media type for a file name, from its extension (what a receiver is
/// told; it never decides how the file is opened here).
pub fn media_type_of(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "txt" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// A name from a sender that is safe to create a file with in a folder:
/// no directories, no control characters, no leading dot, not empty, at
/// most [`MAX_NAME`] bytes (the extension kept when it is cut).
pub fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out: String = base
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    let trimmed = out
        .trim_start_matches(['.', ' '])
        .trim_end_matches([' ', '.'])
        .to_string();
    out = trimmed;
    if out.is_empty() {
        out = "file".into();
    }
    shorten(&out, MAX_NAME)
}

/// `name` cut to at most `max` bytes at a character boundary, keeping a
/// short extension.
pub fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && e.len() <= 16 => (s, Some(e)),
        _ => (name, None),
    };
    let room = max - ext.map_or(0, |e| e.len() + 1);
    let mut end = room.min(stem.len());
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    match ext {
        Some(e) => format!("{}.{e}", &stem[..end]),
        None => stem[..end].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_reference_keeps_to_the_limits() {
        let r = FileRef {
            blob: BlobId([1; 32]),
            key: FileKey([2; 32]),
            size: 3,
            sha256: [3; 32],
            media_type: "image/".to_owned() + &"x".repeat(300),
            name: "é".repeat(400),
            thumbnail: Some(Bytes::from(vec![0u8; MAX_THUMBNAIL + 1])),
        };
        let got = r.clone().received();
        assert_eq!(got.thumbnail, None);
        assert!(got.name.len() <= MAX_NAME && got.name.starts_with('é'));
        assert!(got.media_type.len() <= MAX_MEDIA_TYPE);
        let small = FileRef {
            thumbnail: Some(Bytes::from(vec![0u8; MAX_THUMBNAIL])),
            name: "a.jpg".into(),
            media_type: "image/jpeg".into(),
            ..r
        };
        assert_eq!(small.clone().received(), small);
    }

    fn key(b: u8) -> FileKey {
        FileKey([b; 32])
    }

    #[test]
    fn chunks_and_lengths() {
        assert_eq!(chunk_count(0), 1);
        assert_eq!(sealed_len(0), 16);
        assert_eq!(chunk_count(PLAIN_CHUNK as u64), 1);
        assert_eq!(chunk_count(PLAIN_CHUNK as u64 + 1), 2);
        assert_eq!(sealed_len(PLAIN_CHUNK as u64), SEALED_CHUNK as u64);
        assert_eq!(sealed_len(2 * PLAIN_CHUNK as u64 + 5), 2 * SEALED_CHUNK as u64 + 5 + 16);
    }

    /// Seals `data` as chunks (the file is `data`).
    fn seal_all(k: &FileKey, data: &[u8]) -> Vec<Vec<u8>> {
        let c = ChunkCipher::new(k, data.len() as u64);
        let mut out = Vec::new();
        let mut parts: Vec<&[u8]> = data.chunks(PLAIN_CHUNK).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        for (i, p) in parts.into_iter().enumerate() {
            let mut buf = p.to_vec();
            c.seal(i as u64, &mut buf);
            out.push(buf);
        }
        out
    }

    fn file_ref(k: &FileKey, data: &[u8]) -> FileRef {
        FileRef {
            blob: BlobId([0; 32]),
            key: k.clone(),
            size: data.len() as u64,
            sha256: ring::digest::digest(&SHA256, data).as_ref().try_into().unwrap(),
            media_type: "application/octet-stream".into(),
            name: "x".into(),
            thumbnail: None,
        }
    }

    fn open_all(f: &FileRef, chunks: &[Vec<u8>]) -> Result<Vec<u8>, Damaged> {
        let mut o = Opener::new(f);
        let mut out = Vec::new();
        for c in chunks {
            let mut buf = c.clone();
            o.open(&mut buf)?;
            out.extend_from_slice(&buf);
        }
        o.finish()?;
        Ok(out)
    }

    #[test]
    fn a_file_round_trips_and_any_change_is_caught() {
        let k = key(1);
        let data: Vec<u8> = (0..2 * PLAIN_CHUNK + 100).map(|i| i as u8).collect();
        let f = file_ref(&k, &data);
        let chunks = seal_all(&k, &data);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[..2].iter().all(|c| c.len() == SEALED_CHUNK));
        assert_eq!(open_all(&f, &chunks).unwrap(), data);
        // Another key.
        assert_eq!(open_all(&file_ref(&key(2), &data), &chunks), Err(Damaged::Chunk(0)));
        // A flipped bit.
        let mut bad = chunks.clone();
        bad[1][7] ^= 1;
        assert_eq!(open_all(&f, &bad), Err(Damaged::Chunk(1)));
        // Reordered.
        let swapped = vec![chunks[1].clone(), chunks[0].clone(), chunks[2].clone()];
        assert_eq!(open_all(&f, &swapped), Err(Damaged::Chunk(0)));
        // Cut short: the chunk before the end is not a last chunk.
        let short_ref = FileRef {
            size: 2 * PLAIN_CHUNK as u64,
            ..f.clone()
        };
        assert_eq!(open_all(&short_ref, &chunks[..2]), Err(Damaged::Chunk(1)));
        // A chunk dropped from the middle.
        assert_eq!(
            open_all(&f, &[chunks[0].clone(), chunks[2].clone()]),
            Err(Damaged::Chunk(1))
        );
        // The right chunks, the wrong checksum.
        let mut wrong = f.clone();
        wrong.sha256[0] ^= 1;
        assert_eq!(open_all(&wrong, &chunks), Err(Damaged::Checksum));
    }

    #[test]
    fn an_empty_file_is_one_chunk() {
        let k = key(3);
        let f = file_ref(&k, &[]);
        let chunks = seal_all(&k, &[]);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].len(), TAG_LEN);
        assert_eq!(open_all(&f, &chunks).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn sealing_a_file_again_gives_the_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..PLAIN_CHUNK * 3 / 2).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (size, sha) = scan(&path).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(&sha[..], ring::digest::digest(&SHA256, &data).as_ref());
        let k = key(4);
        let id = blob_id(&path, &k, size).unwrap();
        assert_eq!(blob_id(&path, &k, size).unwrap(), id);
        assert_eq!(scan_and_seal(&path, &k).unwrap(), (size, sha, id));
        let mut s = Sealer::open(&path, &k, size).unwrap();
        let mut all = Vec::new();
        let mut buf = Vec::new();
        while s.next_chunk(&mut buf).unwrap() {
            all.extend_from_slice(&buf);
        }
        assert_eq!(all.len() as u64, sealed_len(size));
        assert_eq!(ring::digest::digest(&SHA256, &all).as_ref(), &id.0[..]);
        // Resuming from the second chunk gives the rest of the same bytes.
        let mut s = Sealer::open(&path, &k, size).unwrap();
        s.skip_to(SEALED_CHUNK as u64).unwrap();
        assert!(s.next_chunk(&mut buf).unwrap());
        assert_eq!(&buf[..], &all[SEALED_CHUNK..]);
        assert!(!s.next_chunk(&mut buf).unwrap());
        // A file that changed is noticed.
        std::fs::write(&path, &data[..100]).unwrap();
        assert!(blob_id(&path, &k, size).is_err());
    }

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name("photo.jpg"), "photo.jpg");
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("C:\\Users\\x\\a.txt"), "a.txt");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name("a\nb\u{7}.txt"), "a_b_.txt");
        let long = format!("{}.jpeg", "é".repeat(200));
        let s = safe_name(&long);
        assert!(s.len() <= MAX_NAME && s.ends_with(".jpeg"), "{s}");
        assert_eq!(media_type_of("X.JPG"), "image/jpeg");
        assert_eq!(media_type_of("noext"), "application/octet-stream");
    }
}
