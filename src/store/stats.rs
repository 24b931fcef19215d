//! Figures about the queues for operators (`tidingsd status`, systemd's
//! `STATUS=` line), read on the caller's thread.

use super::disk::{self, QUEUE, dev_prefix, parse_dev};
use super::{Store, StoreError, spill};

impl Store {
    /// When the oldest entry still waiting in any queue on disk was
    /// accepted (ms since the Unix epoch), or `None` if the queues on
    /// disk are empty: the first receipt or notice of each queue in sled,
    /// and the first copy of each queue in the spill log (one read each,
    /// outside the spill log's lock). Copies waiting in memory for their
    /// ack are younger than the write delay and not looked at.
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
            // Format 4 keeps no message copies here (a migrated
            // directory's are in the spill log).
            if let Some(t) = disk::decode_disk(&v)?.into_entry(None).map(|e| e.time_ms()) {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
            // The first entry of a queue is its oldest: on to the next.
            from = dev_prefix(QUEUE, d).to_vec();
            from.extend_from_slice(&[0xff; 9]);
        }
        let (dir, fronts) = self.spill.lock().unwrap_or_else(|e| e.into_inner()).fronts();
        if let Some(t) = spill::oldest_at(&dir, fronts) {
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        Ok(oldest)
    }
}
