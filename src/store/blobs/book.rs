//! The rules of the blob store, over a [`Files`] backend and an [`Env`]:
//! who may upload, append, finish, download, grant and delete; what each
//! blob and upload counts against its owner's budget and the disk budget;
//! when a blob goes.
//!
//! It is sans-I/O in the sense that matters for tests: every byte goes
//! through [`Files`] (a directory for the daemon, a map for the hub's
//! tests) and every number it counts against the rest of the store through
//! [`Env`]. It reads no clock: times come with the operations.
//!
//! What it guarantees (spec §5.7):
//! - a blob is served only once it is complete: every byte received, their
//!   SHA-256 equal to its id, and durable; a half-finished upload is never
//!   read from;
//! - only users on a blob's access list read it, and a user who may not
//!   gets the same answer as for a blob that does not exist;
//! - everything kept is counted: an upload reserves its whole size (and
//!   its record) in the disk budget when it starts, and against its
//!   owner's budget; both are given back when the blob goes;
//! - a blob goes once every device it was for has fetched it, when its
//!   last holder deletes it, or at the sweep after its retention ends; an
//!   upload left unfinished goes at the first sweep a day (by default)
//!   after it started.
//!
//! What it does not do: know names or connections (the hub resolves
//! users and lists the devices a blob is for), or decide retention (the
//! sweep says what is too old).

use std::collections::{HashMap, VecDeque};
use std::io;

use bytes::Bytes;
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use super::{BlobConfig, BlobOp, BlobOutcome, BlobRefused, SHARDS};
use crate::ids::{DeviceKey, UserId};
use crate::wire::{BlobData, BlobId, DeviceId, UploadStatus};

/// What a blob counts against its owner's budget beyond its bytes: about
/// what a file and its record take on a filesystem at least, so that a
/// budget also bounds how many blobs a user keeps.
pub const BLOB_OVERHEAD: u64 = 4096;
/// Most uploads one user may have under way at once (spec §6).
pub const MAX_UPLOADS_PER_USER: u32 = 8;
/// Complete blobs whose records are kept in memory for the next requests
/// (a download reads the same record for every range).
const CACHE: usize = 64;
/// Bytes read at once when an upload's hash is computed from its file
/// (after a restart lost the running hash).
const REHASH_CHUNK: usize = 1 << 20;

/// Where a blob's bytes and record live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Being uploaded; this many bytes from the start are stored.
    Uploading {
        /// Bytes held.
        received: u64,
    },
    /// Finished: checked, durable, readable.
    Complete,
}

/// Storage for blobs: their bytes and their records, by id.
pub(crate) trait Files {
    /// The ids of shard `shard` (0 to [`SHARDS`] − 1) that have a record;
    /// leftovers without one (a crash between steps) are cleaned up on
    /// the way.
    fn ids(&mut self, shard: u32) -> io::Result<Vec<BlobId>>;
    /// A blob's record and where its bytes are, if it has a record.
    fn meta(&mut self, id: &BlobId) -> io::Result<Option<(Vec<u8>, Kind)>>;
    /// Replaces a blob's record, durably.
    fn save_meta(&mut self, id: &BlobId, bytes: &[u8]) -> io::Result<()>;
    /// Creates the empty file of a new upload.
    fn create_part(&mut self, id: &BlobId) -> io::Result<()>;
    /// Writes bytes of an upload at `offset`.
    fn write_part(&mut self, id: &BlobId, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Reads bytes of an upload at `offset` into `buf`; how many.
    fn read_part(&mut self, id: &BlobId, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Makes an upload the complete blob, durably.
    fn seal(&mut self, id: &BlobId) -> io::Result<()>;
    /// Reads `len` bytes of a complete blob at `offset`.
    fn read(&mut self, id: &BlobId, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Removes a blob or upload: bytes and record.
    fn remove(&mut self, id: &BlobId) -> io::Result<()>;
}

/// What the blob store needs from the rest of the store.
pub(crate) trait Env {
    /// Takes `bytes` in the disk budget if they fit; false if not.
    fn reserve(&self, bytes: u64) -> bool;
    /// Changes what the disk budget counts, unconditionally.
    fn adjust(&self, delta: i64);
    /// Whether the data directory is below its free-space floor.
    fn storage_full(&self) -> bool;
    /// Free bytes of the data directory's filesystem above the floor, as
    /// last measured.
    fn above_floor(&self) -> u64;
    /// What the uploads under way will still write (so that the
    /// free-space floor keeps that room from messages too); called after
    /// every operation that may change it.
    fn set_to_come(&self, _bytes: u64) {}
    /// Whether a device exists and is not revoked.
    fn is_current(&self, d: DeviceKey) -> bool;
}

/// A blob's record, as stored (user and device numbers, which are never
/// reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// The uploading device.
    pub owner: (u32, u32),
    /// Bytes.
    pub size: u64,
    /// When the upload started.
    pub started_ms: u64,
    /// When it was finished or last granted: its retention counts from
    /// here (0 while uploading).
    pub stored_ms: u64,
    /// Users who may read it, ascending.
    pub access: Vec<u32>,
    /// Users who hold it (its uploader's, and each user who granted it to
    /// others); it goes when the last lets go.
    pub owners: Vec<u32>,
    /// Devices it was for that have not fetched it yet.
    pub waiting: Vec<(u32, u32)>,
}

#[derive(Serialize, Deserialize)]
enum StoredMeta {
    V1(Meta),
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&StoredMeta::V1(self.clone())).expect("a record always encodes")
    }

    fn decode(bytes: &[u8]) -> Option<Meta> {
        match postcard::take_from_bytes::<StoredMeta>(bytes) {
            Ok((StoredMeta::V1(m), [])) => Some(m),
            _ => None,
        }
    }

    fn owner_user(&self) -> UserId {
        UserId(self.owner.0)
    }

    fn may_read(&self, user: UserId) -> bool {
        self.access.binary_search(&user.0).is_ok()
    }

    /// Adds users who may read it, and the devices it is for of the users
    /// new to it (the devices of a user who could read it already were
    /// counted then, and may have fetched it since).
    fn widen(&mut self, access: &[UserId], expect: &[DeviceKey]) {
        let mut added = Vec::new();
        for u in access {
            if let Err(i) = self.access.binary_search(&u.0) {
                self.access.insert(i, u.0);
                added.push(*u);
            }
        }
        for d in expect.iter().filter(|d| added.contains(&d.user)) {
            let d = (d.user.0, d.device.0);
            if !self.waiting.contains(&d) {
                self.waiting.push(d);
            }
        }
    }
}

fn dev((user, device): (u32, u32)) -> DeviceKey {
    DeviceKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

/// An upload under way.
struct Upload {
    meta: Meta,
    meta_len: u64,
    received: u64,
    /// The SHA-256 of the bytes `0..received`, while it is known (a
    /// restart loses it; then the finish reads the file again).
    hash: Option<Context>,
}

/// A complete blob's record, cached.
struct Cached {
    id: BlobId,
    meta: Meta,
    meta_len: u64,
}

/// What one user's blobs count against the user's budget.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    bytes: u64,
    uploads: u32,
}

/// The blob store's state and rules.
pub(crate) struct Blobs<F: Files, E: Env> {
    files: F,
    env: E,
    config: BlobConfig,
    uploads: HashMap<BlobId, Upload>,
    usage: HashMap<UserId, Usage>,
    cache: VecDeque<Cached>,
    /// Bytes counted in the disk budget for blobs: their bytes and their
    /// records.
    counted: u64,
}

/// Counts for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobStats {
    /// Bytes counted in the disk budget (blobs, uploads and records).
    pub bytes: u64,
    /// Uploads under way.
    pub uploads: usize,
}

type Answer = Result<BlobOutcome, BlobRefused>;

impl<F: Files, E: Env> Blobs<F, E> {
    /// Loads what `files` holds: every upload under way (its running hash
    /// is lost: the finish reads it again) and what every blob counts.
    ///
    /// # Errors
    /// If `files` cannot be read.
    pub fn open(mut files: F, env: E, config: BlobConfig) -> io::Result<Blobs<F, E>> {
        let mut uploads = HashMap::new();
        let mut usage: HashMap<UserId, Usage> = HashMap::new();
        let mut counted = 0u64;
        for shard in 0..SHARDS {
            for id in files.ids(shard)? {
                let Some((bytes, kind)) = files.meta(&id)? else {
                    continue;
                };
                let Some(meta) = Meta::decode(&bytes) else {
                    log::warn!("blob {id}: unreadable record; removed");
                    files.remove(&id)?;
                    continue;
                };
                let meta_len = bytes.len() as u64;
                counted += meta.size + meta_len;
                let u = usage.entry(meta.owner_user()).or_default();
                u.bytes += meta.size + BLOB_OVERHEAD;
                if let Kind::Uploading { received } = kind {
                    u.uploads += 1;
                    let received = received.min(meta.size);
                    let hash = (received == 0).then(|| Context::new(&SHA256));
                    uploads.insert(
                        id,
                        Upload {
                            meta,
                            meta_len,
                            received,
                            hash,
                        },
                    );
                }
            }
        }
        env.adjust(counted as i64);
        Ok(Blobs {
            files,
            env,
            config,
            uploads,
            usage,
            cache: VecDeque::new(),
            counted,
        })
    }

    /// The counts.
    pub fn stats(&self) -> BlobStats {
        BlobStats {
            bytes: self.counted,
            uploads: self.uploads.len(),
        }
    }

    /// The backend (tests look at it).
    #[cfg(test)]
    pub fn files(&mut self) -> &mut F {
        &mut self.files
    }

    /// Runs one operation. An I/O failure is logged and answered
    /// [`BlobOutcome::Failed`]: the request may be retried.
    pub fn handle(&mut self, op: BlobOp) -> BlobOutcome {
        let what = op.kind();
        let r = match op {
            BlobOp::Start {
                device,
                id,
                size,
                access,
                expect,
                now_ms,
            } => self.start(device, id, size, &access, &expect, now_ms),
            BlobOp::Chunk {
                device,
                id,
                offset,
                data,
            } => self.chunk(device, id, offset, &data),
            BlobOp::Finish { device, id, now_ms } => self.finish(device, id, now_ms),
            BlobOp::Read {
                device,
                id,
                offset,
                len,
            } => self.read(device, id, offset, len),
            BlobOp::Fetched { device, id } => self.fetched(device, id),
            BlobOp::Grant {
                device,
                id,
                access,
                expect,
                now_ms,
            } => self.grant(device, id, &access, &expect, now_ms),
            BlobOp::Delete { device, id } => self.delete_by(device, id),
            BlobOp::Sweep {
                shard,
                cutoff_ms,
                now_ms,
            } => self.sweep(shard, cutoff_ms, now_ms),
        };
        self.env.set_to_come(self.to_come());
        match r {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(refused)) => BlobOutcome::Refused(refused),
            Err(e) => {
                log::error!("blob store: {what} failed: {e}");
                BlobOutcome::Failed
            }
        }
    }

    /// Bytes the uploads under way will still write.
    pub fn to_come(&self) -> u64 {
        self.uploads
            .values()
            .map(|u| u.meta.size.saturating_sub(u.received))
            .sum()
    }

    fn status(id: BlobId, received: u64, complete: bool) -> Answer {
        Ok(BlobOutcome::Status(UploadStatus { id, received, complete }))
    }

    /// A complete blob's record, from the cache or the files.
    fn complete(&mut self, id: &BlobId) -> io::Result<Option<&mut Cached>> {
        if let Some(i) = self.cache.iter().position(|c| c.id == *id) {
            // Most recent at the back.
            if let Some(c) = self.cache.remove(i) {
                self.cache.push_back(c);
            }
            return Ok(self.cache.back_mut());
        }
        if self.uploads.contains_key(id) {
            return Ok(None);
        }
        let Some((bytes, Kind::Complete)) = self.files.meta(id)? else {
            return Ok(None);
        };
        let Some(meta) = Meta::decode(&bytes) else {
            return Ok(None);
        };
        if self.cache.len() >= CACHE {
            self.cache.pop_front();
        }
        self.cache.push_back(Cached {
            id: *id,
            meta,
            meta_len: bytes.len() as u64,
        });
        Ok(self.cache.back_mut())
    }

    /// Writes a complete blob's changed record (cached), counting the
    /// change in its size.
    fn save_cached(&mut self, id: &BlobId) -> io::Result<()> {
        let Some(c) = self.cache.iter_mut().find(|c| c.id == *id) else {
            return Ok(());
        };
        let bytes = c.meta.encode();
        if let Err(e) = self.files.save_meta(id, &bytes) {
            // What is on disk is what holds: read it again next time.
            self.cache.retain(|c| c.id != *id);
            return Err(e);
        }
        let Some(c) = self.cache.iter_mut().find(|c| c.id == *id) else {
            return Ok(());
        };
        let delta = bytes.len() as i64 - c.meta_len as i64;
        c.meta_len = bytes.len() as u64;
        self.counted = self.counted.saturating_add_signed(delta);
        self.env.adjust(delta);
        Ok(())
    }

    /// Removes a blob or an upload and gives back what it counted.
    fn remove(&mut self, id: &BlobId, meta: &Meta, meta_len: u64, uploading: bool) -> io::Result<()> {
        self.files.remove(id)?;
        self.cache.retain(|c| c.id != *id);
        let charge = meta.size + meta_len;
        self.counted = self.counted.saturating_sub(charge);
        self.env.adjust(-(charge as i64));
        if let Some(u) = self.usage.get_mut(&meta.owner_user()) {
            u.bytes = u.bytes.saturating_sub(meta.size + BLOB_OVERHEAD);
            if uploading {
                u.uploads = u.uploads.saturating_sub(1);
            }
            if u.bytes == 0 && u.uploads == 0 {
                self.usage.remove(&meta.owner_user());
            }
        }
        Ok(())
    }

    fn start(
        &mut self,
        device: DeviceKey,
        id: BlobId,
        size: u64,
        access: &[UserId],
        expect: &[DeviceKey],
        now_ms: u64,
    ) -> io::Result<Answer> {
        if let Some(u) = self.uploads.get(&id) {
            // A resumed upload: how far it got.
            if u.meta.owner_user() != device.user {
                return Ok(Err(BlobRefused::Taken));
            }
            if u.meta.size != size {
                return Ok(Err(BlobRefused::SizeMismatch { size: u.meta.size }));
            }
            return Ok(Self::status(id, u.received, false));
        }
        if let Some(c) = self.complete(&id)? {
            // Uploaded already (by this user, or bytes someone with access
            // has): done, and the users named may read it too.
            if !c.meta.may_read(device.user) {
                return Ok(Err(BlobRefused::Taken));
            }
            if c.meta.size != size {
                return Ok(Err(BlobRefused::SizeMismatch { size: c.meta.size }));
            }
            let before = c.meta.clone();
            c.meta.widen(access, expect);
            if c.meta != before {
                self.save_cached(&id)?;
            }
            return Ok(Self::status(id, size, true));
        }
        if size == 0 {
            return Ok(Err(BlobRefused::Empty));
        }
        let max = crate::wire::sealed_len(self.config.max_size);
        if size > max {
            return Ok(Err(BlobRefused::TooLarge { max }));
        }
        // The free-space floor counts what the uploads under way will
        // still write, this one included.
        let to_come = self.to_come();
        if self.env.storage_full() || to_come.saturating_add(size) > self.env.above_floor() {
            return Ok(Err(BlobRefused::StorageFull));
        }
        let usage = self.usage.get(&device.user).copied().unwrap_or_default();
        if usage.uploads >= MAX_UPLOADS_PER_USER {
            return Ok(Err(BlobRefused::Uploads));
        }
        if usage.bytes.saturating_add(size + BLOB_OVERHEAD) > self.config.user_budget {
            return Ok(Err(BlobRefused::Budget));
        }
        let mut meta = Meta {
            owner: (device.user.0, device.device.0),
            size,
            started_ms: now_ms,
            stored_ms: 0,
            access: Vec::new(),
            owners: vec![device.user.0],
            waiting: Vec::new(),
        };
        meta.widen(access, expect);
        if let Err(i) = meta.access.binary_search(&device.user.0) {
            meta.access.insert(i, device.user.0);
        }
        let bytes = meta.encode();
        let charge = size + bytes.len() as u64;
        if !self.env.reserve(charge) {
            return Ok(Err(BlobRefused::DiskBudget));
        }
        let made = self
            .files
            .create_part(&id)
            .and_then(|()| self.files.save_meta(&id, &bytes));
        if let Err(e) = made {
            let _ = self.files.remove(&id);
            self.env.adjust(-(charge as i64));
            return Err(e);
        }
        self.counted += charge;
        let u = self.usage.entry(device.user).or_default();
        u.bytes += size + BLOB_OVERHEAD;
        u.uploads += 1;
        self.uploads.insert(
            id,
            Upload {
                meta,
                meta_len: bytes.len() as u64,
                received: 0,
                hash: Some(Context::new(&SHA256)),
            },
        );
        Ok(Self::status(id, 0, false))
    }

    fn chunk(&mut self, device: DeviceKey, id: BlobId, offset: u64, data: &[u8]) -> io::Result<Answer> {
        let Some(u) = self.uploads.get_mut(&id) else {
            // A late copy of a chunk of a finished upload.
            if let Some(c) = self.complete(&id)?
                && c.meta.owner_user() == device.user
            {
                let size = c.meta.size;
                return Ok(Self::status(id, size, true));
            }
            return Ok(Err(BlobRefused::Unknown));
        };
        if u.meta.owner_user() != device.user {
            return Ok(Err(BlobRefused::Unknown));
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > u.meta.size {
            return Ok(Err(BlobRefused::PastEnd { size: u.meta.size }));
        }
        if offset > u.received {
            return Ok(Err(BlobRefused::Offset { received: u.received }));
        }
        if end <= u.received {
            // Had it already (a resend).
            return Ok(Self::status(id, u.received, false));
        }
        if self.env.storage_full() {
            return Ok(Err(BlobRefused::StorageFull));
        }
        let new = &data[(u.received - offset) as usize..];
        self.files.write_part(&id, u.received, new)?;
        if let Some(h) = u.hash.as_mut() {
            h.update(new);
        }
        u.received = end;
        Ok(Self::status(id, end, false))
    }

    fn finish(&mut self, device: DeviceKey, id: BlobId, now_ms: u64) -> io::Result<Answer> {
        let Some(u) = self.uploads.get_mut(&id) else {
            if let Some(c) = self.complete(&id)?
                && c.meta.may_read(device.user)
            {
                let size = c.meta.size;
                return Ok(Self::status(id, size, true));
            }
            return Ok(Err(BlobRefused::Unknown));
        };
        if u.meta.owner_user() != device.user {
            return Ok(Err(BlobRefused::Unknown));
        }
        if u.received < u.meta.size {
            return Ok(Err(BlobRefused::Incomplete { received: u.received }));
        }
        let digest = match u.hash.take() {
            Some(h) => h.finish(),
            None => {
                let mut h = Context::new(&SHA256);
                let mut buf = vec![0u8; REHASH_CHUNK];
                let mut at = 0u64;
                while at < u.meta.size {
                    let want = ((u.meta.size - at) as usize).min(buf.len());
                    let n = self.files.read_part(&id, at, &mut buf[..want])?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                h.finish()
            }
        };
        let Some(mut u) = self.uploads.remove(&id) else {
            return Ok(Err(BlobRefused::Unknown));
        };
        if digest.as_ref() != id.0 {
            // spec §5.7: the upload is dropped; the client starts again.
            log::info!("upload {id}: the bytes do not hash to the id; dropped");
            self.remove(&id, &u.meta, u.meta_len, true)?;
            return Ok(Err(BlobRefused::Mismatch));
        }
        if let Err(e) = self.files.seal(&id) {
            // Not durable: nothing of it is kept, and the client starts
            // again.
            let _ = self.remove(&id, &u.meta, u.meta_len, true);
            return Err(e);
        }
        if let Some(usage) = self.usage.get_mut(&u.meta.owner_user()) {
            usage.uploads = usage.uploads.saturating_sub(1);
        }
        u.meta.stored_ms = now_ms;
        let size = u.meta.size;
        if self.cache.len() >= CACHE {
            self.cache.pop_front();
        }
        self.cache.push_back(Cached {
            id,
            meta: u.meta,
            meta_len: u.meta_len,
        });
        // Its retention counts from now (a crash before this record is
        // written counts it from the start of the upload).
        self.save_cached(&id)?;
        Ok(Self::status(id, size, true))
    }

    fn read(&mut self, device: DeviceKey, id: BlobId, offset: u64, len: u32) -> io::Result<Answer> {
        let Some(c) = self.complete(&id)? else {
            return Ok(Err(BlobRefused::Unknown));
        };
        if !c.meta.may_read(device.user) {
            return Ok(Err(BlobRefused::Unknown));
        }
        let size = c.meta.size;
        if offset > size {
            return Ok(Err(BlobRefused::PastEnd { size }));
        }
        let n = (size - offset).min(u64::from(len)) as usize;
        let data = self.files.read(&id, offset, n)?;
        Ok(Ok(BlobOutcome::Data(BlobData { id, offset, data })))
    }

    fn fetched(&mut self, device: DeviceKey, id: BlobId) -> io::Result<Answer> {
        let Some(c) = self.complete(&id)? else {
            return Ok(Ok(BlobOutcome::Done));
        };
        if !c.meta.may_read(device.user) {
            return Ok(Ok(BlobOutcome::Done));
        }
        let before = c.meta.waiting.len();
        let me = (device.user.0, device.device.0);
        c.meta.waiting.retain(|d| *d != me);
        if c.meta.waiting.len() == before {
            return Ok(Ok(BlobOutcome::Done));
        }
        // Devices revoked meanwhile will never fetch it. (`complete` left
        // it at the back of the cache.)
        let env = &self.env;
        let Some(c) = self.cache.back_mut() else {
            return Ok(Ok(BlobOutcome::Done));
        };
        c.meta.waiting.retain(|d| env.is_current(dev(*d)));
        if c.meta.waiting.is_empty() {
            // Every device it was for has it (spec §5.7).
            let (meta, meta_len) = (c.meta.clone(), c.meta_len);
            log::debug!("blob {id}: fetched by every device it was for; removed");
            self.remove(&id, &meta, meta_len, false)?;
        } else {
            self.save_cached(&id)?;
        }
        Ok(Ok(BlobOutcome::Done))
    }

    fn grant(
        &mut self,
        device: DeviceKey,
        id: BlobId,
        access: &[UserId],
        expect: &[DeviceKey],
        now_ms: u64,
    ) -> io::Result<Answer> {
        if self.env.storage_full() {
            return Ok(Err(BlobRefused::StorageFull));
        }
        let Some(c) = self.complete(&id)? else {
            return Ok(Err(BlobRefused::Unknown));
        };
        if !c.meta.may_read(device.user) {
            return Ok(Err(BlobRefused::Unknown));
        }
        c.meta.widen(access, expect);
        if let Err(i) = c.meta.owners.binary_search(&device.user.0) {
            c.meta.owners.insert(i, device.user.0);
        }
        // Its retention counts from the latest grant: the new readers get
        // the whole period.
        c.meta.stored_ms = c.meta.stored_ms.max(now_ms);
        self.save_cached(&id)?;
        Ok(Ok(BlobOutcome::Done))
    }

    fn delete_by(&mut self, device: DeviceKey, id: BlobId) -> io::Result<Answer> {
        if let Some(u) = self.uploads.get(&id) {
            if u.meta.owner_user() == device.user
                && let Some(u) = self.uploads.remove(&id)
            {
                self.remove(&id, &u.meta, u.meta_len, true)?;
            }
            return Ok(Ok(BlobOutcome::Done));
        }
        let Some(c) = self.complete(&id)? else {
            return Ok(Ok(BlobOutcome::Done));
        };
        let Ok(i) = c.meta.owners.binary_search(&device.user.0) else {
            return Ok(Ok(BlobOutcome::Done));
        };
        c.meta.owners.remove(i);
        if c.meta.owners.is_empty() {
            let (meta, meta_len) = (c.meta.clone(), c.meta_len);
            log::debug!("blob {id}: deleted by its last holder");
            self.remove(&id, &meta, meta_len, false)?;
        } else {
            self.save_cached(&id)?;
        }
        Ok(Ok(BlobOutcome::Done))
    }

    /// One turn of the sweep: the uploads left unfinished past their time
    /// (on shard 0, the first turn of a pass), then the blobs of one shard
    /// whose retention ended before `cutoff_ms` or whose remaining devices
    /// were all revoked.
    fn sweep(&mut self, shard: u32, cutoff_ms: u64, now_ms: u64) -> io::Result<Answer> {
        let mut removed = 0;
        if shard == 0 {
            let ttl = self.config.upload_ttl.as_millis() as u64;
            let stale: Vec<BlobId> = self
                .uploads
                .iter()
                .filter(|(_, u)| u.meta.started_ms.saturating_add(ttl) < now_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                if let Some(u) = self.uploads.remove(&id) {
                    log::info!("upload {id}: unfinished for longer than allowed; removed");
                    self.remove(&id, &u.meta, u.meta_len, true)?;
                    removed += 1;
                }
            }
        }
        if shard < SHARDS {
            for id in self.files.ids(shard)? {
                if self.uploads.contains_key(&id) {
                    continue;
                }
                let Some((bytes, kind)) = self.files.meta(&id)? else {
                    continue;
                };
                let Some(meta) = Meta::decode(&bytes) else { continue };
                let retention_from = if meta.stored_ms == 0 {
                    meta.started_ms
                } else {
                    meta.stored_ms
                };
                let env = &self.env;
                let abandoned = !meta.waiting.is_empty() && meta.waiting.iter().all(|d| !env.is_current(dev(*d)));
                let expired = retention_from < cutoff_ms;
                if kind != Kind::Complete || expired || abandoned {
                    log::debug!("blob {id}: retention ended or nobody left to fetch it; removed");
                    self.remove(&id, &meta, bytes.len() as u64, false)?;
                    removed += 1;
                }
            }
        }
        let next = (shard + 1 < SHARDS).then_some(shard + 1);
        Ok(Ok(BlobOutcome::Swept { next, removed }))
    }
}
