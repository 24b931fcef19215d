//! Upgrades of the data directory's format, one step at a time. Each step
//! is idempotent (a marker written in the same atomic batch as the step),
//! so a crash midway reruns it.
//!
//! - 0 → 1: only the FORMAT file was added.
//! - 1 → 2: queue entries became an enum (messages, receipts, notices);
//!   dedup records remember where a message was queued.
//! - 2 → 3: a message's header is stored once (`m` records) and its copies
//!   hold only their bodies; dedup records (`d`) and queue meta records
//!   (`n`) are gone: queue counts are recounted at open and sequence
//!   numbers are bounded by a durable ceiling in `meta`.
//! - 3 → 4: message copies moved to the spill log (`copies_3_to_4`).
//! - 4 → 5: groups and blocks (trees `groups` and `blocks`, new kinds of
//!   queue entries and spill records); nothing is rewritten: the version
//!   only keeps a build of format 4, which would not read the new kinds,
//!   from opening the directory.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::disk::{
    self, DiskEntry, MsgRecord, OLD_DEDUP, OLD_NEXT, QUEUE, QueuedExpired, QueuedGap, QueuedMessage, QueuedReceipt,
    message_key, parse_dev, queue_seq,
};
use super::{SEQ_CEILING, StoreError, be_u64};
use crate::ids::DeviceKey;
use crate::wire::MsgId;

/// Format 2's queue entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum OldEntry {
    Message(QueuedMessage),
    Receipt(QueuedReceipt),
    Gap(QueuedGap),
    Expired(QueuedExpired),
}

/// Format 2's dedup record.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct DedupRecord {
    pub time_ms: u64,
    pub queued: Vec<(u32, u32, u64)>,
}

const MIGRATED_2: &[u8] = b"v2";
const MIGRATED_3: &[u8] = b"v3";

/// Runs the steps from format `from` to `to`, then flushes.
pub(crate) fn migrate(db: &sled::Db, from: u32, to: u32) -> Result<(), StoreError> {
    for version in from..to {
        log::info!("migrating the data directory from format {version} to {}", version + 1);
        match version {
            0 => {}
            1 => entries_1_to_2(&db.open_tree("queues")?)?,
            2 => messages_2_to_3(&db.open_tree("queues")?, &db.open_tree("meta")?)?,
            _ => {}
        }
    }
    db.flush()?;
    Ok(())
}

/// Rewrites format-1 queue entries (a bare message) as format-2 entries,
/// and format-1 dedup values (a bare time) as dedup records.
fn entries_1_to_2(queues: &sled::Tree) -> Result<(), StoreError> {
    // Done, or done and followed by 2 → 3 (which drops this marker; a
    // crash before the FORMAT file was written reruns both).
    if queues.get(MIGRATED_2)?.as_deref() == Some(&2u32.to_be_bytes()[..]) || queues.contains_key(MIGRATED_3)? {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for item in queues.scan_prefix([QUEUE]) {
        let (k, v) = item?;
        let old: QueuedMessage = postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt("queues/entry"))?;
        batch.insert(k, disk::encode(&OldEntry::Message(old)));
        n += 1;
    }
    for item in queues.scan_prefix([OLD_DEDUP]) {
        let (k, v) = item?;
        let record = DedupRecord {
            time_ms: be_u64(&v).ok_or(StoreError::Corrupt("queues/dedup"))?,
            queued: Vec::new(),
        };
        batch.insert(k, disk::encode(&record));
    }
    batch.insert(MIGRATED_2, &2u32.to_be_bytes()[..]);
    queues.apply_batch(batch)?;
    log::info!("migrated {n} queue entries to format 2");
    Ok(())
}

/// Splits each queued message into its copy (sender, id, body) and one
/// shared record per message; drops dedup and queue meta records, keeping
/// the highest sequence ever given out as the ceiling.
fn messages_2_to_3(queues: &sled::Tree, meta: &sled::Tree) -> Result<(), StoreError> {
    if queues.contains_key(MIGRATED_3)? {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut records: HashMap<(DeviceKey, MsgId), MsgRecord> = HashMap::new();
    let mut ceiling = 1u64;
    let mut n = 0;
    for item in queues.scan_prefix([QUEUE]) {
        let (k, v) = item?;
        let d = parse_dev(&k).ok_or(StoreError::Corrupt("queues/key"))?;
        let seq = queue_seq(&k)?;
        ceiling = ceiling.max(seq + 1);
        let old: OldEntry = postcard::from_bytes(&v).map_err(|_| StoreError::Corrupt("queues/entry"))?;
        let new = match old {
            OldEntry::Message(m) => {
                let r = records.entry((m.from(), m.id)).or_insert(MsgRecord {
                    to_user: m.to_user,
                    time_ms: m.time_ms,
                    copies: Vec::new(),
                });
                r.copies.push((d.user.0, d.device.0, seq));
                n += 1;
                DiskEntry::Message {
                    from_user: m.from_user,
                    from_device: m.from_device,
                    id: m.id,
                    body: m.body,
                }
            }
            OldEntry::Receipt(r) => DiskEntry::Receipt(r),
            OldEntry::Gap(g) => DiskEntry::Gap(g),
            OldEntry::Expired(e) => DiskEntry::Expired(e),
        };
        batch.insert(k, disk::encode(&new));
    }
    for item in queues.scan_prefix([OLD_NEXT]) {
        let (k, v) = item?;
        ceiling = ceiling.max(be_u64(&v).ok_or(StoreError::Corrupt("queues/next"))?);
        batch.remove(k);
    }
    for item in queues.scan_prefix([OLD_DEDUP]) {
        batch.remove(item?.0);
    }
    for ((sender, id), r) in &records {
        batch.insert(&message_key(*sender, *id)[..], disk::encode(r));
    }
    batch.remove(MIGRATED_2);
    batch.insert(MIGRATED_3, &3u32.to_be_bytes()[..]);
    // The ceiling first: were the batch applied and the ceiling lost, the
    // numbers in `n` records would be gone.
    let stored = meta.get(SEQ_CEILING)?.as_deref().and_then(be_u64).unwrap_or(1);
    meta.insert(SEQ_CEILING, &stored.max(ceiling).to_be_bytes())?;
    meta.flush()?;
    queues.apply_batch(batch)?;
    log::info!("migrated {n} queued copies of {} messages to format 3", records.len());
    Ok(())
}

/// Moves format 3's message copies (`q` records with the body inline, and
/// their `m` records for the header) to the spill log.
pub(crate) fn copies_3_to_4(
    queues: &sled::Tree,
    spill: &mut super::spill::Spill,
    flusher: &super::Flusher,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for item in queues.scan_prefix([QUEUE]) {
        let (k, v) = item?;
        let DiskEntry::Message {
            from_user,
            from_device,
            id,
            body,
        } = disk::decode_disk(&v)?
        else {
            continue;
        };
        let d = parse_dev(&k).ok_or(StoreError::Corrupt("queues/key"))?;
        let seq = queue_seq(&k)?;
        let sender = super::disk::dev(from_user, from_device);
        let header = queues
            .get(message_key(sender, id))?
            .map(|r| disk::decode_record(&r))
            .transpose()?;
        let Some(r) = header else {
            log::warn!("{d}: a queued copy {seq} had no message record; dropped in the migration");
            batch.remove(k);
            continue;
        };
        spill.append(
            d,
            seq,
            &QueuedMessage {
                id,
                from_user,
                from_device,
                to_user: r.to_user,
                time_ms: r.time_ms,
                body,
            },
        )?;
        batch.remove(k);
        n += 1;
    }
    for item in queues.scan_prefix([super::disk::MESSAGE]) {
        batch.remove(item?.0);
    }
    batch.remove(MIGRATED_3);
    for f in spill.take_unsynced()? {
        f.sync_all().map_err(|source| StoreError::Io {
            path: std::path::PathBuf::from("spill"),
            source,
        })?;
    }
    queues.apply_batch(batch)?;
    flusher.sync()?;
    log::info!("migrated {n} queued copies to the spill log (format 4)");
    Ok(())
}
