//! Per-device message queues and dedup records, in the `queues` tree.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::flusher::Epoch;
use super::{Store, StoreError, be_u64};
use crate::ids::{DeviceKey, UserId};
use crate::wire::{DeviceId, MsgId};

/// One queued message for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// The sender's message id.
    pub id: MsgId,
    /// The sending user.
    pub from_user: u32,
    /// The sending device.
    pub from_device: u32,
    /// The user the message was addressed to.
    pub to_user: u32,
    /// When the server accepted it.
    pub time_ms: u64,
    /// The ciphertext for this device.
    pub body: Bytes,
}

impl QueuedMessage {
    /// The sending device.
    pub fn from(&self) -> DeviceKey {
        DeviceKey {
            user: UserId(self.from_user),
            device: DeviceId(self.from_device),
        }
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored now.
    New {
        /// Acceptance time.
        time_ms: u64,
        /// Durable once the flusher reaches this.
        epoch: Epoch,
    },
    /// Already stored by an earlier attempt; nothing written.
    Duplicate {
        /// The first acceptance time.
        time_ms: u64,
        /// Durable once the flusher reaches this (the first attempt may
        /// not be flushed yet, so a retry waits for the next flush too).
        epoch: Epoch,
    },
}

const QUEUE: u8 = b'q';
const NEXT: u8 = b'n';
const DEDUP: u8 = b'd';

fn dev_prefix(tag: u8, d: DeviceKey) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..5].copy_from_slice(&d.user.0.to_be_bytes());
    k[5..9].copy_from_slice(&d.device.0.to_be_bytes());
    k
}

fn queue_key(d: DeviceKey, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&dev_prefix(QUEUE, d));
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn dedup_key(sender: DeviceKey, id: MsgId) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..9].copy_from_slice(&dev_prefix(DEDUP, sender));
    k[9..].copy_from_slice(&id.0);
    k
}

impl Store {
    /// The acceptance time of an earlier message with this id from this
    /// device, if there was one.
    ///
    /// # Errors
    /// On a database failure.
    pub fn dedup_lookup(&self, sender: DeviceKey, id: MsgId) -> Result<Option<u64>, StoreError> {
        match self.queues.get(dedup_key(sender, id))? {
            Some(v) => Ok(Some(be_u64(&v).ok_or(StoreError::Corrupt("queues/dedup"))?)),
            None => Ok(None),
        }
    }

    fn next_seq(&self, seqs: &mut std::collections::HashMap<DeviceKey, u64>, d: DeviceKey) -> Result<u64, StoreError> {
        if let Some(n) = seqs.get(&d) {
            return Ok(*n);
        }
        let n = match self.queues.get(dev_prefix(NEXT, d))? {
            Some(v) => be_u64(&v).ok_or(StoreError::Corrupt("queues/next"))?,
            None => 1,
        };
        seqs.insert(d, n);
        Ok(n)
    }

    /// Appends message `id` from `sender` to each `(device, body)` queue in
    /// one atomic batch with its dedup record, unless that dedup record
    /// exists. `to` is the user the message was addressed to.
    ///
    /// # Errors
    /// On a database failure (nothing was appended).
    pub fn append(
        &self,
        sender: DeviceKey,
        id: MsgId,
        to: UserId,
        bodies: &[(DeviceKey, Bytes)],
        now_ms: u64,
    ) -> Result<Appended, StoreError> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(time_ms) = self.dedup_lookup(sender, id)? {
            return Ok(Appended::Duplicate {
                time_ms,
                epoch: self.flusher.current(),
            });
        }
        let mut batch = sled::Batch::default();
        let mut advanced = Vec::with_capacity(bodies.len());
        for (d, body) in bodies {
            let seq = self.next_seq(&mut seqs, *d)?;
            let entry = QueuedMessage {
                id,
                from_user: sender.user.0,
                from_device: sender.device.0,
                to_user: to.0,
                time_ms: now_ms,
                body: body.clone(),
            };
            let value = postcard::to_stdvec(&entry).expect("postcard encodes queue entries into a Vec");
            batch.insert(&queue_key(*d, seq)[..], value);
            batch.insert(&dev_prefix(NEXT, *d)[..], &(seq + 1).to_be_bytes()[..]);
            advanced.push((*d, seq + 1));
        }
        batch.insert(&dedup_key(sender, id)[..], &now_ms.to_be_bytes()[..]);
        self.queues.apply_batch(batch)?;
        for (d, next) in advanced {
            seqs.insert(d, next);
        }
        // Tag after the write, inside the lock: see Flusher.
        let epoch = self.flusher.note_write();
        Ok(Appended::New { time_ms: now_ms, epoch })
    }

    /// Appends up to `max` entries of `d`'s queue with sequence ≥ `from` to
    /// `out`, in order.
    ///
    /// # Errors
    /// On a database failure or a corrupt entry.
    pub fn read_queue(
        &self,
        d: DeviceKey,
        from: u64,
        max: usize,
        out: &mut Vec<(u64, QueuedMessage)>,
    ) -> Result<(), StoreError> {
        let start = queue_key(d, from);
        let end = queue_key(d, u64::MAX);
        for item in self.queues.range(start..=end).take(max) {
            let (k, v) = item?;
            let seq = k.get(9..).and_then(be_u64).ok_or(StoreError::Corrupt("queues/key"))?;
            let entry = postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt("queues/entry"))?;
            out.push((seq, entry));
        }
        Ok(())
    }

    /// The highest sequence number ever given out in `d`'s queue (0 if
    /// none).
    ///
    /// # Errors
    /// On a database failure.
    pub fn last_seq(&self, d: DeviceKey) -> Result<u64, StoreError> {
        let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.next_seq(&mut seqs, d)? - 1)
    }

    /// Deletes every entry of `d`'s queue with sequence ≤ `up_to`. Returns
    /// how many. Not flushed on its own: an ack lost in a crash means a
    /// redelivery, which the client drops as a duplicate.
    ///
    /// # Errors
    /// On a database failure.
    pub fn ack(&self, d: DeviceKey, up_to: u64) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.queues.range(queue_key(d, 0)..=queue_key(d, up_to)) {
            let (k, _) = item?;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.queues.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// Number of entries in `d`'s queue.
    ///
    /// # Errors
    /// On a database failure.
    pub fn queue_len(&self, d: DeviceKey) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.queues.range(queue_key(d, 0)..=queue_key(d, u64::MAX)) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes a device's whole queue (after revocation).
    ///
    /// # Errors
    /// On a database failure.
    pub fn delete_queue(&self, d: DeviceKey) -> Result<usize, StoreError> {
        self.ack(d, u64::MAX)
    }
}
