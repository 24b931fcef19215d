//! Blobs as files under the data directory's `blobs/`:
//!
//! ```text
//! blobs/
//!   ab/                      one shard per first byte of the id
//!     ab12…ef.meta           the blob's record (postcard), written to
//!                            .meta.tmp, fsynced, renamed
//!     ab12…ef.part           an upload under way: bytes 0..received
//!     ab12…ef.blob           a finished blob: fsynced, then renamed from
//!                            .part, so that it exists only whole and
//!                            checked
//! ```
//!
//! A blob is never read whole into memory: uploads are written and
//! downloads read a range at a time. Each operation opens the file it
//! needs and closes it again, so the number of open files does not grow
//! with the number of blobs or transfers.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::book::{Files, Kind};
use crate::wire::BlobId;

/// The `blobs/` directory.
pub(crate) struct Dir {
    root: PathBuf,
}

const META: &str = "meta";
const PART: &str = "part";
const BLOB: &str = "blob";
const TMP: &str = "meta.tmp";

impl Dir {
    /// The directory at `root`, created if needed.
    ///
    /// # Errors
    /// If it cannot be created.
    pub fn open(root: &Path) -> io::Result<Dir> {
        if !root.is_dir() {
            fs::create_dir_all(root)?;
            sync_dir(root.parent().unwrap_or(root))?;
        }
        Ok(Dir {
            root: root.to_path_buf(),
        })
    }

    fn shard(&self, first: u8) -> PathBuf {
        self.root.join(format!("{first:02x}"))
    }

    fn path(&self, id: &BlobId, ext: &str) -> PathBuf {
        self.shard(id.0[0]).join(format!("{id}.{ext}"))
    }

    /// Creates the id's shard directory if it is not there, durably.
    fn make_shard(&self, id: &BlobId) -> io::Result<()> {
        let dir = self.shard(id.0[0]);
        if !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            sync_dir(&self.root)?;
        }
        Ok(())
    }
}

/// Makes a directory's entries (files created, renamed or removed in it)
/// durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_if_there(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Files for Dir {
    fn ids(&mut self, shard: u32) -> io::Result<Vec<BlobId>> {
        let dir = self.shard(shard as u8);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut ids = Vec::new();
        let mut leftovers = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((stem, ext)) = name.split_once('.') else {
                continue;
            };
            let Some(id) = BlobId::from_hex(stem) else { continue };
            match ext {
                META => ids.push(id),
                TMP => leftovers.push(entry.path()),
                PART | BLOB if !self.path(&id, META).exists() => leftovers.push(entry.path()),
                _ => {}
            }
        }
        for path in leftovers {
            // A record being replaced, or bytes whose record never made it
            // (or went first): a crash between two steps.
            log::debug!("removing leftover {}", path.display());
            remove_if_there(&path)?;
        }
        ids.sort();
        Ok(ids)
    }

    fn meta(&mut self, id: &BlobId) -> io::Result<Option<(Vec<u8>, Kind)>> {
        let bytes = match fs::read(self.path(id, META)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if self.path(id, BLOB).exists() {
            return Ok(Some((bytes, Kind::Complete)));
        }
        let received = match fs::metadata(self.path(id, PART)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(Some((bytes, Kind::Uploading { received })))
    }

    fn save_meta(&mut self, id: &BlobId, bytes: &[u8]) -> io::Result<()> {
        self.make_shard(id)?;
        let tmp = self.path(id, TMP);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.path(id, META))?;
        sync_dir(&self.shard(id.0[0]))
    }

    fn create_part(&mut self, id: &BlobId) -> io::Result<()> {
        self.make_shard(id)?;
        File::create(self.path(id, PART))?;
        Ok(())
    }

    fn write_part(&mut self, id: &BlobId, offset: u64, data: &[u8]) -> io::Result<()> {
        // Not synced: a crash loses at most what the finish would have
        // found missing or wrong (the hash check), and the client resumes
        // from what is there.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(id, PART))?;
        f.write_all_at(data, offset)
    }

    fn read_part(&mut self, id: &BlobId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        File::open(self.path(id, PART))?.read_at(buf, offset)
    }

    fn seal(&mut self, id: &BlobId) -> io::Result<()> {
        let part = self.path(id, PART);
        File::open(&part)?.sync_all()?;
        fs::rename(&part, self.path(id, BLOB))?;
        sync_dir(&self.shard(id.0[0]))
    }

    fn read(&mut self, id: &BlobId, offset: u64, len: usize) -> io::Result<Bytes> {
        let f = File::open(self.path(id, BLOB))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }

    fn remove(&mut self, id: &BlobId) -> io::Result<()> {
        // The bytes first: a record without them is a leftover the next
        // look at the shard removes; bytes without a record are too.
        let mut any = remove_if_there(&self.path(id, BLOB))?;
        any |= remove_if_there(&self.path(id, PART))?;
        any |= remove_if_there(&self.path(id, META))?;
        remove_if_there(&self.path(id, TMP))?;
        if any {
            sync_dir(&self.shard(id.0[0]))?;
        }
        Ok(())
    }
}
