//! Blobs in memory, for tests: the [`Files`] of the hub's test store and
//! of the blob rules' unit tests. A map per kind of file, so that tests
//! can look at (and damage) what a directory would hold.

use std::collections::BTreeMap;
use std::io;

use bytes::Bytes;

use super::book::{Files, Kind};
use crate::wire::BlobId;

/// What a `blobs/` directory would hold.
#[derive(Default, Debug, Clone)]
pub(crate) struct MemFiles {
    pub metas: BTreeMap<BlobId, Vec<u8>>,
    pub parts: BTreeMap<BlobId, Vec<u8>>,
    pub blobs: BTreeMap<BlobId, Vec<u8>>,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such file")
}

impl Files for MemFiles {
    fn ids(&mut self, shard: u32) -> io::Result<Vec<BlobId>> {
        Ok(self
            .metas
            .keys()
            .filter(|id| u32::from(id.0[0]) == shard)
            .copied()
            .collect())
    }

    fn meta(&mut self, id: &BlobId) -> io::Result<Option<(Vec<u8>, Kind)>> {
        let Some(m) = self.metas.get(id) else { return Ok(None) };
        let kind = if self.blobs.contains_key(id) {
            Kind::Complete
        } else {
            Kind::Uploading {
                received: self.parts.get(id).map_or(0, |p| p.len() as u64),
            }
        };
        Ok(Some((m.clone(), kind)))
    }

    fn save_meta(&mut self, id: &BlobId, bytes: &[u8]) -> io::Result<()> {
        self.metas.insert(*id, bytes.to_vec());
        Ok(())
    }

    fn create_part(&mut self, id: &BlobId) -> io::Result<()> {
        self.parts.insert(*id, Vec::new());
        Ok(())
    }

    fn write_part(&mut self, id: &BlobId, offset: u64, data: &[u8]) -> io::Result<()> {
        let p = self.parts.entry(*id).or_default();
        let end = offset as usize + data.len();
        if p.len() < end {
            p.resize(end, 0);
        }
        p[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn read_part(&mut self, id: &BlobId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let p = self.parts.get(id).ok_or_else(gone)?;
        let from = (offset as usize).min(p.len());
        let n = buf.len().min(p.len() - from);
        buf[..n].copy_from_slice(&p[from..from + n]);
        Ok(n)
    }

    fn seal(&mut self, id: &BlobId) -> io::Result<()> {
        let p = self.parts.remove(id).ok_or_else(gone)?;
        self.blobs.insert(*id, p);
        Ok(())
    }

    fn read(&mut self, id: &BlobId, offset: u64, len: usize) -> io::Result<Bytes> {
        let b = self.blobs.get(id).ok_or_else(gone)?;
        let from = offset as usize;
        b.get(from..from + len)
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short blob"))
    }

    fn remove(&mut self, id: &BlobId) -> io::Result<()> {
        self.metas.remove(id);
        self.parts.remove(id);
        self.blobs.remove(id);
        Ok(())
    }
}
