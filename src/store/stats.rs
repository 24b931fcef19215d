//! Figures about the queues for operators (`tidingsd status`, systemd's
//! `STATUS=` line), read from the database on the caller's thread.

use super::disk::{self, DiskEntry, QUEUE, dev, dev_prefix, message_key, parse_dev};
use super::{Store, StoreError};

impl Store {
    /// When the oldest entry still waiting in any queue on disk was
    /// accepted (ms since the Unix epoch), or `None` if the queues on
    /// disk are empty. Copies waiting in memory for their ack are younger
    /// than the write delay and not looked at. One read per queue.
    ///
    /// # Errors
    /// On a database failure or a corrupt record.
    pub fn oldest_queued_ms(&self) -> Result<Option<u64>, StoreError> {
        let q = &self.queues;
        let mut oldest: Option<u64> = None;
        let mut from = vec![QUEUE];
        loop {
            let Some(item) = q.range(from.clone()..).next() else {
                break;
            };
            let (k, v) = item?;
            if k.first() != Some(&QUEUE) {
                break;
            }
            let d = parse_dev(&k).ok_or(StoreError::Corrupt("queues/key"))?;
            let time = match disk::decode_disk(&v)? {
                DiskEntry::Message {
                    from_user,
                    from_device,
                    id,
                    ..
                } => q
                    .get(message_key(dev(from_user, from_device), id))?
                    .map(|r| disk::decode_record(&r))
                    .transpose()?
                    .map(|r| r.time_ms),
                other => other.into_entry(None).map(|e| e.time_ms()),
            };
            if let Some(t) = time {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
            // The first entry of a queue is its oldest: on to the next.
            from = dev_prefix(QUEUE, d).to_vec();
            from.extend_from_slice(&[0xff; 9]);
        }
        Ok(oldest)
    }
}
