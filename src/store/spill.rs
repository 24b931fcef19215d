//! The spill log: the bodies of copies written to disk, in append-only
//! segment files of their own under `spill/` in the data directory, so
//! that `sled` holds only small records (a copy's `q` record names where
//! its body is) and the space of delivered bodies goes back to the
//! filesystem: a segment file is deleted as soon as no queued copy refers
//! to it any more.
//!
//! A segment is `spill/SEGMENT.log` (SEGMENT a zero-padded decimal
//! number, increasing); a body is appended as a record: its length (4
//! bytes, big-endian), its CRC-32 (IEEE, 4 bytes, big-endian), then its
//! bytes. A segment is written by the store thread only, up to
//! [`SEGMENT_MAX`] bytes, then the next one starts; after a restart a new
//! segment starts (older ones are never appended to again).
//!
//! Durability: the flusher syncs every segment written since its last
//! flush *before* it flushes `sled` (see [`super::flusher`]), so a `q`
//! record on disk always finds its body. A record that does not check
//! (a torn write no `q` record refers to) is never read.
//!
//! Deleting: the store thread counts, in memory, the `q` records that
//! refer to each segment (recounted at open). When a segment other than
//! the current one drops to none, it is deleted once the batch that
//! deleted its last `q` record is durable, so that a crash can never leave
//! a `q` record without its body.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Largest segment file before the next one starts.
pub(crate) const SEGMENT_MAX: u64 = 4 << 20;
/// Bytes of a record's header: length and CRC.
const HEADER: u64 = 8;
/// Largest body a record holds (a `Send`'s body is at most 4 KiB; a group
/// body the same).
const MAX_BODY: u32 = 1 << 20;

/// Where a body is: segment, offset of its record, body length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Loc {
    pub segment: u32,
    pub offset: u32,
    pub len: u32,
}

/// An open segment being appended to.
struct Current {
    id: u32,
    file: File,
    len: u64,
    /// Written since the last [`Spill::take_unsynced`].
    dirty: bool,
    /// Its directory entry is not synced yet.
    fresh: bool,
}

/// The spill log of one data directory.
pub(crate) struct Spill {
    dir: PathBuf,
    current: Option<Current>,
    next_id: u32,
    /// Segment → `q` records referring to it.
    refs: HashMap<u32, u64>,
    /// Segment → bytes (for the disk count).
    sizes: BTreeMap<u32, u64>,
    /// Open handles for reading.
    readers: HashMap<u32, File>,
    /// Segments nobody refers to, found when the current one was closed:
    /// the caller deletes them once what deleted their records is durable.
    freed: Vec<u32>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.log"))
}

/// CRC-32 (IEEE 802.3, reflected, the one of zip and PNG).
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in bytes {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

impl Spill {
    /// Opens the spill log in `dir` (creating it). `refs` are the `q`
    /// records referring to each segment, as counted at open; segments
    /// nobody refers to are deleted now.
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn open(dir: &Path, refs: HashMap<u32, u64>) -> Result<Spill, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut sizes = BTreeMap::new();
        let mut next_id = 1;
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            next_id = next_id.max(id + 1);
            if refs.get(&id).copied().unwrap_or(0) == 0 {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let len = entry.metadata().map_err(io_err(dir))?.len();
            sizes.insert(id, len);
        }
        Ok(Spill {
            dir: dir.to_path_buf(),
            current: None,
            next_id,
            refs,
            sizes,
            readers: HashMap::new(),
            freed: Vec::new(),
        })
    }

    /// Appends a body; returns where it is. Not durable until the flusher
    /// syncs the segment ([`Spill::take_unsynced`]).
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn append(&mut self, body: &[u8]) -> Result<Loc, StoreError> {
        if self.current.as_ref().is_none_or(|c| c.len + HEADER + body.len() as u64 > SEGMENT_MAX) {
            self.rotate()?;
        }
        let dir = self.dir.clone();
        let Some(c) = self.current.as_mut() else {
            return Err(StoreError::Corrupt("spill"));
        };
        let mut record = Vec::with_capacity(HEADER as usize + body.len());
        record.extend_from_slice(&(body.len() as u32).to_be_bytes());
        record.extend_from_slice(&crc32(body).to_be_bytes());
        record.extend_from_slice(body);
        let offset = c.len;
        c.file
            .write_all(&record)
            .map_err(io_err(&segment_path(&dir, c.id)))?;
        c.len += record.len() as u64;
        c.dirty = true;
        *self.sizes.entry(c.id).or_insert(0) += record.len() as u64;
        *self.refs.entry(c.id).or_insert(0) += 1;
        Ok(Loc {
            segment: c.id,
            offset: offset as u32,
            len: body.len() as u32,
        })
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        let id = self.next_id;
        self.next_id += 1;
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // The directory entry, durable with the next flush's directory
        // sync: a new segment is synced with its first batch.
        if let Some(old) = self.current.replace(Current {
            id,
            file,
            len: 0,
            dirty: true,
            fresh: true,
        }) && self.refs.get(&old.id).copied().unwrap_or(0) == 0
        {
            self.freed.push(old.id);
        }
        self.sizes.entry(id).or_insert(0);
        Ok(())
    }

    /// Handles to sync before the next `sled` flush: the current segment if
    /// it was written since the last call, and the spill directory if that
    /// segment is new (its directory entry).
    ///
    /// # Errors
    /// If a handle cannot be had.
    pub fn take_unsynced(&mut self) -> Result<Vec<File>, StoreError> {
        let dir = self.dir.clone();
        let Some(c) = self.current.as_mut() else {
            return Ok(Vec::new());
        };
        if !c.dirty {
            return Ok(Vec::new());
        }
        c.dirty = false;
        let path = segment_path(&dir, c.id);
        let mut out = vec![c.file.try_clone().map_err(io_err(&path))?];
        if c.fresh {
            c.fresh = false;
            out.push(File::open(&dir).map_err(io_err(&dir))?);
        }
        Ok(out)
    }

    /// Reads a body.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the record does not check; a filesystem
    /// failure.
    pub fn read(&mut self, loc: Loc) -> Result<Bytes, StoreError> {
        if loc.len > MAX_BODY {
            return Err(StoreError::Corrupt("spill/record"));
        }
        let path = segment_path(&self.dir, loc.segment);
        let file = match self.readers.entry(loc.segment) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(File::open(&path).map_err(io_err(&path))?),
        };
        let mut buf = vec![0u8; HEADER as usize + loc.len as usize];
        file.read_exact_at(&mut buf, u64::from(loc.offset))
            .map_err(io_err(&path))?;
        let len = u32::from_be_bytes(buf[..4].try_into().map_err(|_| StoreError::Corrupt("spill/record"))?);
        let crc = u32::from_be_bytes(buf[4..8].try_into().map_err(|_| StoreError::Corrupt("spill/record"))?);
        let body = &buf[HEADER as usize..];
        if len != loc.len || crc32(body) != crc {
            return Err(StoreError::Corrupt("spill/record"));
        }
        Ok(Bytes::copy_from_slice(body))
    }

    /// A `q` record referring to `loc` was deleted. Returns the segment if
    /// nothing refers to it any more and it is not being appended to: the
    /// caller deletes it ([`Spill::remove`]) once that deletion is durable.
    pub fn release(&mut self, loc: Loc) -> Option<u32> {
        let n = self.refs.entry(loc.segment).or_insert(1);
        *n = n.saturating_sub(1);
        if *n == 0 && self.current.as_ref().is_none_or(|c| c.id != loc.segment) {
            self.refs.remove(&loc.segment);
            return Some(loc.segment);
        }
        None
    }

    /// Segments that became free when the current one was closed (see
    /// [`Spill::release`] for what the caller does with them).
    pub fn take_freed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.freed)
    }

    /// Deletes a segment nobody refers to (durably so).
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn remove(&mut self, segment: u32) -> Result<(), StoreError> {
        if self.refs.get(&segment).copied().unwrap_or(0) > 0 {
            return Ok(());
        }
        self.readers.remove(&segment);
        self.sizes.remove(&segment);
        let path = segment_path(&self.dir, segment);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Bytes the segment files take.
    pub fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn bodies_come_back_and_segments_go_when_nothing_refers_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::open(dir.path(), HashMap::new()).unwrap();
        let big = vec![7u8; 3000];
        let mut locs = Vec::new();
        for i in 0..3000u32 {
            let mut b = big.clone();
            b[..4].copy_from_slice(&i.to_be_bytes());
            locs.push(s.append(&b).unwrap());
        }
        assert!(locs.last().unwrap().segment > locs[0].segment, "rotated");
        for (i, loc) in locs.iter().enumerate() {
            assert_eq!(&s.read(*loc).unwrap()[..4], &(i as u32).to_be_bytes());
        }
        let first = locs[0].segment;
        let mut freed = Vec::new();
        for loc in locs.iter().filter(|l| l.segment == first) {
            freed.extend(s.release(*loc));
        }
        assert_eq!(freed, vec![first]);
        s.remove(first).unwrap();
        assert!(!segment_path(dir.path(), first).exists());
        // A corrupt record is refused.
        let loc = locs[locs.len() - 1];
        let path = segment_path(dir.path(), loc.segment);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"x", u64::from(loc.offset) + HEADER + 10).unwrap();
        assert!(matches!(s.read(loc), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn at_open_segments_nobody_refers_to_are_deleted_and_a_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let mut s = Spill::open(dir.path(), HashMap::new()).unwrap();
            (s.append(b"kept").unwrap(), s.append(b"also").unwrap())
        };
        assert_eq!(a.segment, b.segment);
        // Only `a`'s segment is referred to.
        let mut s = Spill::open(dir.path(), HashMap::from([(a.segment, 1)])).unwrap();
        assert_eq!(&s.read(a).unwrap()[..], b"kept");
        let c = s.append(b"new").unwrap();
        assert!(c.segment > a.segment);
        drop(s);
        let s = Spill::open(dir.path(), HashMap::from([(c.segment, 1)])).unwrap();
        assert!(!segment_path(dir.path(), a.segment).exists());
        assert!(s.bytes() > 0);
    }
}
