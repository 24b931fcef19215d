//! The spill log: every copy of a message written to disk, in append-only
//! segment files of its own under `spill/` in the data directory, with an
//! index in memory. `sled` never sees a message copy: its nodes are
//! rewritten whole on every tenth change, so a record per copy made its
//! file grow by about 100 bytes per insert or delete and never shrink,
//! and its page cache swelled far past its setting under a spill load
//! (measured: sled held 97 of 110 MB of heap, and its file 152 MB after
//! 290,000 spilled copies were all delivered). Here a delivered copy's
//! space goes back to the filesystem as soon as its segment holds nothing
//! else: the segment file is deleted.
//!
//! A segment is `spill/SEGMENT.log` (SEGMENT a zero-padded decimal
//! number, increasing). A record is its length (4 bytes, big-endian), its
//! CRC-32 (IEEE, 4 bytes, big-endian), then a [`Record`] (postcard): the
//! copies of one message written in one batch, with what they share (the
//! sender, the id, the addressee, the time) once and each device's
//! ciphertext. A segment is written by the store thread only, up to
//! [`SEGMENT_MAX`] bytes, then the next one starts; after a restart a new
//! segment starts.
//!
//! The index: for each device, its copies still queued, in sequence order,
//! as (sequence, the record's place, the copy's charge, the sending user, a
//! 16-bit tag of the message id): 24 bytes a copy. The sending user is what
//! the fair shares count a copy against (`shares.rs`) when it goes. A record stays while any of
//! its copies is indexed; a record of several copies is counted once
//! ([`Spill::held`]: what the disk budget counts). What removes a copy is
//! recorded in `sled`, not here: a device's **mark** (`w` ‖ device →
//! every copy of it up to this sequence is gone: acknowledged or expired)
//! and single **removals** (`x` ‖ device ‖ seq: retracted). At open, the
//! segments are read in order and every copy that no mark or removal
//! covers is indexed again.
//!
//! Durability: the flusher syncs every segment written since its last
//! flush before it flushes `sled`, so that a mark never covers a copy
//! whose record is not durable, and a copy that was acknowledged to its
//! sender is on disk. A record that does not check (a torn write at the
//! end of the last segment: never acknowledged) ends the scan of its
//! segment. A segment file is deleted once no indexed copy is in it and
//! the marks and removals that emptied it are durable.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::api::{Entry, QueuedMessage};
use super::disk::QueuedGroupMessage;
use super::disk::{dev, varint_len};
use super::shares::{Gone, Shares};
use crate::ids::{DeviceKey, UserId};
use crate::wire::MsgId;

/// Largest segment file before the next one starts.
pub(crate) const SEGMENT_MAX: u64 = 4 << 20;
/// Bytes of a record's header: length and CRC.
pub(crate) const HEADER: u64 = 8;
/// Largest record read back.
const MAX_RECORD: u32 = 1 << 20;
/// A batch's copies of one message go in records of at most this many
/// bytes of ciphertext (a copy's body is at most 4 KiB).
const RECORD_BODIES: usize = 64 << 10;
/// Most copies in one group record (16 bytes each).
const GROUP_RECORD_COPIES: usize = 16_384;
/// How often a device's mark is written while its acks keep coming (a
/// crash loses at most this much of them: those copies are delivered
/// again, and clients drop duplicates).
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Loc {
    pub segment: u32,
    pub offset: u32,
}

/// A record of the log. Append-only like the wire's enums: the variant's
/// tag is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Record {
    /// Copies of one message, each with its own ciphertext.
    Message(MessageRecord),
    /// Copies of one group message: one ciphertext for all (format 5).
    Group(GroupRecord),
}

/// What the copies of one group message share, the body included, once,
/// and where each copy is queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    /// Sending user.
    pub from_user: u32,
    /// Sending device.
    pub from_device: u32,
    /// Message id.
    pub id: MsgId,
    /// The group.
    pub group: [u8; 16],
    /// When it was accepted.
    pub time_ms: u64,
    /// How many devices the message went to (its copies' charges are
    /// shares of it, [`group_charge`]).
    pub fanout: u32,
    /// The ciphertext, the same for every copy.
    pub body: Bytes,
    /// Where each copy is queued (as [`Part::at`]).
    pub copies: Vec<[u8; 16]>,
}

impl Record {
    /// Where each copy is queued.
    fn ats(&self) -> Vec<[u8; 16]> {
        match self {
            Record::Message(r) => r.copies.iter().map(|p| p.at).collect(),
            Record::Group(g) => g.copies.clone(),
        }
    }

    /// The charge of copy `i`.
    fn charge_of(&self, i: usize) -> u64 {
        match self {
            Record::Message(r) => r.copies.get(i).map_or(0, |p| part_charge(r, p)),
            Record::Group(g) => group_charge_of(g.from_user, g.from_device, g.time_ms, g.fanout, g.body.len()),
        }
    }

    /// (time, sender, id).
    fn header(&self) -> (u64, DeviceKey, MsgId) {
        match self {
            Record::Message(r) => (r.time_ms, dev(r.from_user, r.from_device), r.id),
            Record::Group(g) => (g.time_ms, dev(g.from_user, g.from_device), g.id),
        }
    }

    /// Keeps the copies `keep` says.
    fn retain(&mut self, mut keep: impl FnMut(&[u8; 16]) -> bool) {
        match self {
            Record::Message(r) => r.copies.retain(|p| keep(&p.at)),
            Record::Group(g) => g.copies.retain(|a| keep(a)),
        }
    }

    /// The copy queued at `at`.
    fn copy(&self, at: &[u8; 16]) -> Option<CopyRecord> {
        match self {
            Record::Message(r) => r.copies.iter().find(|p| p.at == *at).map(|p| CopyRecord::of(r, p)),
            Record::Group(g) => g.copies.iter().find(|a| *a == at).map(|a| {
                let (device, seq) = parse_at(a);
                CopyRecord {
                    device,
                    seq,
                    from_user: g.from_user,
                    from_device: g.from_device,
                    id: g.id,
                    to_user: 0,
                    group: Some((g.group, g.fanout)),
                    time_ms: g.time_ms,
                    body: g.body.clone(),
                }
            }),
        }
    }
}

/// What the copies of one message share, once, and the copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MessageRecord {
    /// Sending user.
    pub from_user: u32,
    /// Sending device.
    pub from_device: u32,
    /// Message id.
    pub id: MsgId,
    /// The user it was addressed to.
    pub to_user: u32,
    /// When it was accepted.
    pub time_ms: u64,
    /// The copies.
    pub copies: Vec<Part>,
}

/// One copy in a [`MessageRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Part {
    /// The device's user, the device, the sequence: big-endian, so that a
    /// record's size does not depend on them.
    pub at: [u8; 16],
    /// The ciphertext for this device.
    pub body: Bytes,
}

fn at(d: DeviceKey, seq: u64) -> [u8; 16] {
    let mut at = [0u8; 16];
    at[..4].copy_from_slice(&d.user.0.to_be_bytes());
    at[4..8].copy_from_slice(&d.device.0.to_be_bytes());
    at[8..].copy_from_slice(&seq.to_be_bytes());
    at
}

fn parse_at(at: &[u8; 16]) -> (DeviceKey, u64) {
    let u = |i: usize| u32::from_be_bytes([at[i], at[i + 1], at[i + 2], at[i + 3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&at[8..]);
    (dev(u(0), u(4)), u64::from_be_bytes(s))
}

/// One spilled copy, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CopyRecord {
    /// The device it is queued for.
    pub device: DeviceKey,
    /// Its place in that device's queue.
    pub seq: u64,
    /// Sending user.
    pub from_user: u32,
    /// Sending device.
    pub from_device: u32,
    /// Message id.
    pub id: MsgId,
    /// The user it was addressed to (0 for a group message).
    pub to_user: u32,
    /// For a group message: the group, and how many devices it went to.
    pub group: Option<([u8; 16], u32)>,
    /// When it was accepted.
    pub time_ms: u64,
    /// The ciphertext for this device.
    pub body: Bytes,
}

impl CopyRecord {
    fn of(r: &MessageRecord, part: &Part) -> CopyRecord {
        let (device, seq) = parse_at(&part.at);
        CopyRecord {
            device,
            seq,
            from_user: r.from_user,
            from_device: r.from_device,
            id: r.id,
            to_user: r.to_user,
            group: None,
            time_ms: r.time_ms,
            body: part.body.clone(),
        }
    }

    pub fn device(&self) -> DeviceKey {
        self.device
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn sender(&self) -> DeviceKey {
        dev(self.from_user, self.from_device)
    }

    pub fn into_entry(self) -> Entry {
        if let Some((group, fanout)) = self.group {
            return Entry::Group(QueuedGroupMessage {
                id: self.id,
                from_user: self.from_user,
                from_device: self.from_device,
                group,
                time_ms: self.time_ms,
                fanout,
                body: self.body,
            });
        }
        Entry::Message(QueuedMessage {
            id: self.id,
            from_user: self.from_user,
            from_device: self.from_device,
            to_user: self.to_user,
            time_ms: self.time_ms,
            body: self.body,
        })
    }
}

/// The charge of a copy: the bytes of a record holding it alone, header
/// included. Quotas count a copy by it (so that a device's share does not
/// depend on who else a message went to); the disk budget counts records
/// ([`Spill::held`]), where copies written together share a record.
pub(crate) fn copy_len(m: &QueuedMessage) -> u64 {
    charge(m.from_user, m.from_device, m.to_user, m.time_ms, m.body.len())
}

fn charge(from_user: u32, from_device: u32, to_user: u32, time_ms: u64, body: usize) -> u64 {
    (1 + varint_len(u64::from(from_user))
        + varint_len(u64::from(from_device))
        + 16
        + varint_len(u64::from(to_user))
        + varint_len(time_ms)
        + 1
        + 16
        + varint_len(body as u64)
        + body) as u64
        + HEADER
}

fn part_charge(r: &MessageRecord, part: &Part) -> u64 {
    charge(r.from_user, r.from_device, r.to_user, r.time_ms, part.body.len())
}

/// The charge of a group message's copy: its share of a record holding
/// the message with one copy (header included), rounded up. The copies of
/// a message written together take about one record in all, so the queues'
/// counts (their charges) and the disk budget (records) stay close; the
/// disk budget counts records exactly ([`Spill::held`]).
pub(crate) fn group_charge(g: &QueuedGroupMessage) -> u64 {
    group_charge_of(g.from_user, g.from_device, g.time_ms, g.fanout, g.body.len())
}

fn group_charge_of(from_user: u32, from_device: u32, time_ms: u64, fanout: u32, body: usize) -> u64 {
    let alone = (1
        + varint_len(u64::from(from_user))
        + varint_len(u64::from(from_device))
        + 16
        + 16
        + varint_len(time_ms)
        + varint_len(u64::from(fanout))
        + varint_len(body as u64)
        + body
        + 1
        + 16) as u64
        + HEADER;
    alone.div_ceil(u64::from(fanout.max(1)))
}

/// The tag of a message in the index: a hash of its id, to find a user's
/// message for a retraction without reading every record of the user's.
fn tag(id: MsgId) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.0.iter() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) as u16
}

/// The most a copy's charge may be: its body is at most
/// [`crate::wire::MAX_BODY_LEN`] bytes, with a header of less than 100.
const MAX_CHARGE: u64 = u16::MAX as u64;
const _: () = assert!(crate::wire::MAX_BODY_LEN as u64 + 100 < MAX_CHARGE);

/// One indexed copy: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    seq: u64,
    loc: Loc,
    /// Its charge ([`copy_len`]).
    charge: u16,
    /// [`tag`] of its message id.
    tag: u16,
    /// Its sending user.
    from: u32,
}

impl Indexed {
    fn sender(&self) -> Option<UserId> {
        Some(UserId(self.from))
    }
}

/// A record that is not one copy alone (several copies, or copies of it
/// gone): how many of its copies are indexed, and its bytes.
#[derive(Debug, Clone, Copy)]
struct Shared {
    left: u32,
    bytes: u32,
}

/// A device's mark: everything up to `acked` is gone; `persisted` is what
/// `sled` says.
#[derive(Debug, Clone, Copy)]
struct Mark {
    acked: u64,
    persisted: u64,
    written_at: Option<Instant>,
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

/// What [`Spill::open`] found for one device.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Found {
    pub count: u64,
    /// The copies' charges.
    pub bytes: u64,
    pub max_seq: u64,
}

/// A message among the newest spilled at open: to recognise a retry
/// after a restart.
#[derive(Debug, Clone)]
pub(crate) struct Restored {
    pub sender: DeviceKey,
    pub id: MsgId,
    pub time_ms: u64,
    pub copies: Vec<(DeviceKey, u64)>,
}

/// The spill log of one data directory, and its index.
pub(crate) struct Spill {
    dir: PathBuf,
    current: Option<Current>,
    next_id: u32,
    /// Segment → records with an indexed copy in it.
    live: HashMap<u32, u64>,
    /// Segment → bytes of those records.
    live_bytes: HashMap<u32, u64>,
    /// Segment → bytes of its file.
    sizes: BTreeMap<u32, u64>,
    /// Open handles for reading.
    readers: HashMap<u32, File>,
    /// Segments no copy is in any more: deleted once what emptied them is
    /// durable.
    freed: Vec<u32>,
    /// Full segments written since the last [`Spill::take_unsynced`]:
    /// synced with the current one.
    unsynced: Vec<File>,
    queues: HashMap<DeviceKey, VecDeque<Indexed>>,
    /// Records that are not one copy alone.
    shared: HashMap<Loc, Shared>,
    /// Copies indexed, in all queues.
    total: usize,
    /// Their charges.
    charged: u64,
    /// Bytes of the records with an indexed copy, headers included.
    held: u64,
    marks: HashMap<DeviceKey, Mark>,
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

fn decode(payload: &[u8]) -> Result<Record, StoreError> {
    postcard::from_bytes(payload).map_err(|_| StoreError::Corrupt("spill/record"))
}

fn encode(r: &Record) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(r).map_err(|_| StoreError::Corrupt("spill/encode"))
}

/// Reads every record of a segment file in order, until its end or the
/// first record that does not check: `each` gets its place, its bytes
/// (header included) and the record.
fn scan(path: &Path, mut each: impl FnMut(Loc, u64, Record)) -> Result<u64, StoreError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let segment = segment_id(path).ok_or(StoreError::Corrupt("spill/name"))?;
    let mut at = 0usize;
    while at + HEADER as usize <= data.len() {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let start = at + HEADER as usize;
        let Some(payload) = data.get(start..start + len as usize) else {
            break;
        };
        if len > MAX_RECORD || crc32(payload) != crc {
            break;
        }
        let Ok(record) = decode(payload) else { break };
        each(
            Loc {
                segment,
                offset: at as u32,
            },
            u64::from(len) + HEADER,
            record,
        );
        at = start + len as usize;
    }
    Ok(data.len() as u64)
}

/// The highest sequence number of any copy in the segment file at `path`
/// (a restore moves every queue past it), 0 for none.
///
/// # Errors
/// If the file cannot be read or its name is not a segment's.
pub(crate) fn max_seq_in(path: &Path) -> Result<u64, StoreError> {
    let mut max = 0;
    scan(path, |_, _, r| {
        for at in r.ats() {
            max = max.max(parse_at(&at).1);
        }
    })?;
    Ok(max)
}

/// When the oldest of the records at `locs` in the log in `dir` was
/// accepted (for operators: read on their thread, without the log's
/// lock). A record whose segment is gone meanwhile (delivered) or that
/// does not check is passed over.
pub(crate) fn oldest_at(dir: &Path, mut locs: Vec<Loc>) -> Option<u64> {
    locs.sort_unstable_by_key(|l| (l.segment, l.offset));
    locs.dedup();
    let mut oldest: Option<u64> = None;
    let mut file: Option<(u32, File)> = None;
    for loc in locs {
        if file.as_ref().is_none_or(|(s, _)| *s != loc.segment) {
            file = File::open(segment_path(dir, loc.segment))
                .ok()
                .map(|f| (loc.segment, f));
        }
        let Some((_, f)) = &file else { continue };
        let mut header = [0u8; HEADER as usize];
        if f.read_exact_at(&mut header, u64::from(loc.offset)).is_err() {
            continue;
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            continue;
        }
        let mut payload = vec![0u8; len as usize];
        if f.read_exact_at(&mut payload, u64::from(loc.offset) + HEADER).is_err() || crc32(&payload) != crc {
            continue;
        }
        if let Ok(r) = decode(&payload) {
            let time_ms = r.header().0;
            oldest = Some(oldest.map_or(time_ms, |o| o.min(time_ms)));
        }
    }
    oldest
}

/// Puts `i` in its place in sequence order (copies are usually appended
/// in order, but a batch may write a device's copies out of order).
/// False if that sequence is indexed already.
fn insert_sorted(q: &mut VecDeque<Indexed>, i: Indexed) -> bool {
    if q.back().is_none_or(|b| b.seq < i.seq) {
        q.push_back(i);
        return true;
    }
    match q.binary_search_by_key(&i.seq, |x| x.seq) {
        Ok(_) => false,
        Err(pos) => {
            q.insert(pos, i);
            true
        }
    }
}

fn segment_id(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_suffix(".log")?.parse::<u32>().ok()
}

impl Spill {
    /// Opens the spill log in `dir` (creating it) and indexes every copy
    /// that no mark (`marks`) or removal (`removed`) covers. Segments with
    /// no such copy are deleted. Returns, too, what it found per device,
    /// and the `recent` newest messages.
    ///
    /// # Errors
    /// On a filesystem failure.
    #[allow(clippy::type_complexity)]
    pub fn open(
        dir: &Path,
        marks: HashMap<DeviceKey, u64>,
        removed: &HashSet<(DeviceKey, u64)>,
        recent: usize,
    ) -> Result<(Spill, HashMap<DeviceKey, Found>, Vec<Restored>), StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(id) = segment_id(&entry.path()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut s = Spill {
            dir: dir.to_path_buf(),
            current: None,
            next_id: ids.last().map_or(1, |l| l + 1),
            live: HashMap::new(),
            live_bytes: HashMap::new(),
            sizes: BTreeMap::new(),
            readers: HashMap::new(),
            freed: Vec::new(),
            unsynced: Vec::new(),
            queues: HashMap::new(),
            shared: HashMap::new(),
            total: 0,
            charged: 0,
            held: 0,
            marks: marks
                .into_iter()
                .map(|(d, w)| {
                    (
                        d,
                        Mark {
                            acked: w,
                            persisted: w,
                            written_at: None,
                        },
                    )
                })
                .collect(),
        };
        // A device with a removal has a mark to move past it some day (the
        // removal goes with it).
        for (d, _) in removed {
            s.marks.entry(*d).or_insert(Mark {
                acked: 0,
                persisted: 0,
                written_at: None,
            });
        }
        let mut found: HashMap<DeviceKey, Found> = HashMap::new();
        // The newest messages: (time, sender, id) → copies.
        let mut newest: BTreeMap<(u64, DeviceKey, MsgId), Vec<(DeviceKey, u64)>> = BTreeMap::new();
        for id in ids {
            let path = segment_path(dir, id);
            let mut here = 0;
            let size = scan(&path, |loc, bytes, r| {
                let mut left = 0u32;
                let mut alone = 0;
                let (time_ms, sender, msg_id) = r.header();
                for (i, at) in r.ats().iter().enumerate() {
                    let (d, seq) = parse_at(at);
                    let mark = s.marks.get(&d).map_or(0, |m| m.acked);
                    if seq <= mark || removed.contains(&(d, seq)) {
                        continue;
                    }
                    // Never more (a body is at most 4 KiB): see MAX_CHARGE.
                    let c = r.charge_of(i).min(MAX_CHARGE);
                    // A record written twice (a migration rerun) is one copy.
                    if !insert_sorted(
                        s.queues.entry(d).or_default(),
                        Indexed {
                            seq,
                            loc,
                            charge: c as u16,
                            tag: tag(msg_id),
                            from: sender.user.0,
                        },
                    ) {
                        continue;
                    }
                    left += 1;
                    alone = c;
                    s.total += 1;
                    s.charged += c;
                    let f = found.entry(d).or_default();
                    f.count += 1;
                    f.bytes += c;
                    f.max_seq = f.max_seq.max(seq);
                    let key = (time_ms, sender, msg_id);
                    // Another copy of a message kept so far joins it, also
                    // when that message is the oldest kept.
                    if newest.contains_key(&key)
                        || newest.len() < recent
                        || newest.keys().next().is_some_and(|k| *k < key)
                    {
                        newest.entry(key).or_default().push((d, seq));
                        if newest.len() > recent {
                            newest.pop_first();
                        }
                    }
                }
                if left == 0 {
                    return;
                }
                here += 1;
                *s.live_bytes.entry(id).or_insert(0) += bytes;
                s.held += bytes;
                if left > 1 || alone != bytes {
                    s.shared.insert(
                        loc,
                        Shared {
                            left,
                            bytes: bytes as u32,
                        },
                    );
                }
            })?;
            if here == 0 {
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            s.live.insert(id, here);
            s.sizes.insert(id, size);
        }
        let restored = newest
            .into_iter()
            .map(|((time_ms, sender, id), copies)| Restored {
                sender,
                id,
                time_ms,
                copies,
            })
            .collect();
        Ok((s, found, restored))
    }

    /// Appends copy `seq` of `d`'s queue and indexes it. Not durable until
    /// the flusher syncs the segment ([`Spill::take_unsynced`]).
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn append(&mut self, d: DeviceKey, seq: u64, m: &QueuedMessage) -> Result<(), StoreError> {
        self.append_message(&[(d, seq, m)])
    }

    /// Appends copies of one message (the same sender and id: the first
    /// copy's header counts for all) in as few records as fit, and indexes
    /// them. A copy whose sequence is indexed already is left out.
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn append_message(&mut self, copies: &[(DeviceKey, u64, &QueuedMessage)]) -> Result<(), StoreError> {
        let Some(&(_, _, first)) = copies.first() else {
            return Ok(());
        };
        let mut parts: Vec<Part> = Vec::new();
        let mut size = 0;
        for (i, &(d, seq, m)) in copies.iter().enumerate() {
            let indexed = self
                .queues
                .get(&d)
                .is_some_and(|q| q.binary_search_by_key(&seq, |x| x.seq).is_ok());
            if !indexed {
                size += m.body.len();
                parts.push(Part {
                    at: at(d, seq),
                    body: m.body.clone(),
                });
            }
            let last = i + 1 == copies.len();
            if !parts.is_empty() && (last || size >= RECORD_BODIES) {
                let record = MessageRecord {
                    from_user: first.from_user,
                    from_device: first.from_device,
                    id: first.id,
                    to_user: first.to_user,
                    time_ms: first.time_ms,
                    copies: std::mem::take(&mut parts),
                };
                self.append_record(Record::Message(record))?;
                size = 0;
            }
        }
        Ok(())
    }

    /// Appends copies of one group message (the same sender and id: the
    /// first copy's header and body count for all) in one record, or as
    /// few as fit, and indexes them. A copy whose sequence is indexed
    /// already is left out.
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn append_group(&mut self, copies: &[(DeviceKey, u64, &QueuedGroupMessage)]) -> Result<(), StoreError> {
        let Some(&(_, _, first)) = copies.first() else {
            return Ok(());
        };
        let ats: Vec<[u8; 16]> = copies
            .iter()
            .filter(|(d, seq, _)| {
                self.queues
                    .get(d)
                    .is_none_or(|q| q.binary_search_by_key(seq, |x| x.seq).is_err())
            })
            .map(|(d, seq, _)| at(*d, *seq))
            .collect();
        // 16 bytes a copy: a record of 1 MiB holds 60,000 of them.
        for chunk in ats.chunks(GROUP_RECORD_COPIES) {
            self.append_record(Record::Group(GroupRecord {
                from_user: first.from_user,
                from_device: first.from_device,
                id: first.id,
                group: first.group,
                time_ms: first.time_ms,
                fanout: first.fanout,
                body: first.body.clone(),
                copies: chunk.to_vec(),
            }))?;
        }
        Ok(())
    }

    /// Writes `r` and indexes its copies (none of them indexed yet).
    fn append_record(&mut self, r: Record) -> Result<Loc, StoreError> {
        let charges: Vec<(DeviceKey, u64, u64)> = r
            .ats()
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let (d, seq) = parse_at(a);
                (d, seq, r.charge_of(i))
            })
            .collect();
        if charges.iter().any(|&(_, _, c)| c > MAX_CHARGE) {
            return Err(StoreError::Corrupt("spill/a copy over the largest body"));
        }
        let (_, sender, msg_id) = r.header();
        let t = tag(msg_id);
        let from = sender.user.0;
        let payload = encode(&r)?;
        let (loc, bytes) = self.append_payload(&payload)?;
        let mut left = 0u32;
        for &(d, seq, c) in &charges {
            if insert_sorted(
                self.queues.entry(d).or_default(),
                Indexed {
                    seq,
                    loc,
                    charge: c as u16,
                    tag: t,
                    from,
                },
            ) {
                left += 1;
                self.total += 1;
                self.charged += c;
            }
        }
        if left > 1 || charges.first().is_none_or(|&(_, _, c)| c != bytes) {
            self.shared.insert(
                loc,
                Shared {
                    left,
                    bytes: bytes as u32,
                },
            );
        }
        if left == 0 {
            self.release_record(loc, bytes);
        }
        Ok(loc)
    }

    /// Appends one record to the current segment (starting a new one when
    /// it is full); counts it as held there. Returns where, and its bytes.
    fn append_payload(&mut self, payload: &[u8]) -> Result<(Loc, u64), StoreError> {
        if payload.len() > MAX_RECORD as usize {
            return Err(StoreError::Corrupt("spill/record too large"));
        }
        if self
            .current
            .as_ref()
            .is_none_or(|c| c.len + HEADER + payload.len() as u64 > SEGMENT_MAX)
        {
            self.rotate()?;
        }
        let dir = self.dir.clone();
        let Some(c) = self.current.as_mut() else {
            return Err(StoreError::Corrupt("spill"));
        };
        let mut bytes = Vec::with_capacity(HEADER as usize + payload.len());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&crc32(payload).to_be_bytes());
        bytes.extend_from_slice(payload);
        let offset = c.len;
        c.file.write_all(&bytes).map_err(io_err(&segment_path(&dir, c.id)))?;
        c.len += bytes.len() as u64;
        c.dirty = true;
        let n = bytes.len() as u64;
        *self.sizes.entry(c.id).or_insert(0) += n;
        *self.live.entry(c.id).or_insert(0) += 1;
        *self.live_bytes.entry(c.id).or_insert(0) += n;
        self.held += n;
        Ok((
            Loc {
                segment: c.id,
                offset: offset as u32,
            },
            n,
        ))
    }

    /// Moves the copies still indexed in the emptiest closed segment whose
    /// held bytes are under a quarter of its size to the current segment
    /// (each record rewritten with its indexed copies only), so that a few
    /// copies that wait long (a device away for weeks) do not keep whole
    /// segments of delivered ones on disk. Moves at most `budget` bytes a
    /// call; returns whether it moved anything. The old segment goes free
    /// once nothing is in it (and is deleted after the moved copies are
    /// durable: they are synced with the next flush, as every append is).
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn compact(&mut self, budget: u64) -> Result<bool, StoreError> {
        let current = self.current.as_ref().map(|c| c.id);
        let Some(victim) = self
            .sizes
            .iter()
            .filter(|(id, size)| {
                Some(**id) != current
                    && **size >= SEGMENT_MAX / 2
                    && self.live_bytes.get(id).copied().unwrap_or(0) * 4 < **size
            })
            .min_by_key(|(id, _)| self.live_bytes.get(id).copied().unwrap_or(0))
            .map(|(id, _)| *id)
        else {
            return Ok(false);
        };
        // Its records, in order, with their indexed copies.
        let mut records: BTreeMap<u32, HashSet<(DeviceKey, u64)>> = BTreeMap::new();
        for (d, q) in &self.queues {
            for i in q.iter().filter(|i| i.loc.segment == victim) {
                records.entry(i.loc.offset).or_default().insert((*d, i.seq));
            }
        }
        let mut moved = 0;
        for (offset, keep) in records {
            if moved >= budget {
                break;
            }
            let old = Loc {
                segment: victim,
                offset,
            };
            let (bytes, mut r) = self.read_record(old)?;
            r.retain(|a| keep.contains(&parse_at(a)));
            // Unindex them from the old record, then append anew.
            for a in r.ats() {
                let (d, seq) = parse_at(&a);
                self.unindex(d, seq);
            }
            self.forget_record(old, bytes);
            self.append_record(r)?;
            moved += bytes;
        }
        Ok(true)
    }

    /// Takes copy `seq` of `d` out of the index without releasing its
    /// record (the caller does).
    fn unindex(&mut self, d: DeviceKey, seq: u64) -> Option<Indexed> {
        let q = self.queues.get_mut(&d)?;
        let i = q.binary_search_by_key(&seq, |x| x.seq).ok()?;
        let gone = q.remove(i)?;
        if q.is_empty() {
            self.queues.remove(&d);
        }
        self.total -= 1;
        self.charged -= u64::from(gone.charge);
        Some(gone)
    }

    /// A record no copy is indexed in any more, whatever its count said.
    fn forget_record(&mut self, loc: Loc, bytes: u64) {
        self.shared.remove(&loc);
        self.release_record(loc, bytes);
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
        if let Some(old) = self.current.replace(Current {
            id,
            file,
            len: 0,
            dirty: true,
            fresh: true,
        }) {
            if self.live.get(&old.id).copied().unwrap_or(0) == 0 {
                self.live.remove(&old.id);
                self.live_bytes.remove(&old.id);
                self.freed.push(old.id);
            }
            // Its tail may be written in this batch: synced with it.
            if old.dirty {
                self.unsynced.push(old.file);
            }
        }
        self.sizes.entry(id).or_insert(0);
        Ok(())
    }

    /// Handles to sync before the next `sled` flush: segments filled since
    /// the last call, the current segment if it was written since, and the
    /// spill directory if that segment is new (its directory entry).
    ///
    /// # Errors
    /// If a handle cannot be had.
    pub fn take_unsynced(&mut self) -> Result<Vec<File>, StoreError> {
        let dir = self.dir.clone();
        let mut out = std::mem::take(&mut self.unsynced);
        let Some(c) = self.current.as_mut() else {
            return Ok(out);
        };
        if !c.dirty {
            return Ok(out);
        }
        c.dirty = false;
        let path = segment_path(&dir, c.id);
        out.push(c.file.try_clone().map_err(io_err(&path))?);
        if c.fresh {
            c.fresh = false;
            out.push(File::open(&dir).map_err(io_err(&dir))?);
        }
        Ok(out)
    }

    /// One indexed copy (unindexed already) is gone: its record goes with
    /// its last copy, and its segment may be free.
    fn release(&mut self, i: Indexed) {
        match self.shared.get_mut(&i.loc) {
            Some(s) => {
                s.left = s.left.saturating_sub(1);
                if s.left == 0 {
                    let bytes = u64::from(s.bytes);
                    self.shared.remove(&i.loc);
                    self.release_record(i.loc, bytes);
                }
            }
            None => self.release_record(i.loc, u64::from(i.charge)),
        }
    }

    fn release_record(&mut self, loc: Loc, bytes: u64) {
        self.held = self.held.saturating_sub(bytes);
        if let Some(b) = self.live_bytes.get_mut(&loc.segment) {
            *b = b.saturating_sub(bytes);
        }
        let n = self.live.entry(loc.segment).or_insert(1);
        *n = n.saturating_sub(1);
        if *n == 0 && self.current.as_ref().is_none_or(|c| c.id != loc.segment) {
            self.live.remove(&loc.segment);
            self.live_bytes.remove(&loc.segment);
            self.freed.push(loc.segment);
        }
    }

    /// Every copy of `d` up to `up_to` is gone (acknowledged, expired):
    /// its mark moves (a device never spilled to has none). Returns how
    /// many copies went, their charges, and whose they were.
    pub fn ack(&mut self, d: DeviceKey, up_to: u64) -> Gone {
        let mut gone = Vec::new();
        if let Some(q) = self.queues.get_mut(&d) {
            while q.front().is_some_and(|i| i.seq <= up_to) {
                gone.extend(q.pop_front());
            }
            if q.is_empty() {
                self.queues.remove(&d);
            }
        }
        let mut out = Gone::default();
        if gone.is_empty() && !self.marks.contains_key(&d) {
            return out;
        }
        self.move_mark(d, up_to);
        let bytes: u64 = gone.iter().map(|i| u64::from(i.charge)).sum();
        self.total -= gone.len();
        self.charged -= bytes;
        for i in gone {
            out.add(i.sender(), u64::from(i.charge));
            self.release(i);
        }
        out
    }

    fn move_mark(&mut self, d: DeviceKey, up_to: u64) {
        let mark = self.marks.entry(d).or_insert(Mark {
            acked: 0,
            persisted: 0,
            written_at: None,
        });
        mark.acked = mark.acked.max(up_to);
    }

    /// Removes one copy (retracted). Returns its charge if it was indexed;
    /// the caller records the removal.
    pub fn remove(&mut self, d: DeviceKey, seq: u64) -> Option<u64> {
        let gone = self.unindex(d, seq)?;
        // The mark must pass the removal some day, for it to go.
        self.marks.entry(d).or_insert(Mark {
            acked: 0,
            persisted: 0,
            written_at: None,
        });
        self.release(gone);
        Some(u64::from(gone.charge))
    }

    /// Forgets a device's whole queue (revoked): its mark moves past all of
    /// it, and at least to `given` (the last sequence the queue gave out,
    /// so that it covers every removal too). Returns how many copies went,
    /// their charges, and whose they were.
    pub fn clear(&mut self, d: DeviceKey, given: u64) -> Gone {
        let last = self.queues.get(&d).and_then(|q| q.back()).map_or(0, |i| i.seq);
        self.ack(d, last.max(given))
    }

    /// Marks to write now: those that moved, at most once per
    /// [`MARK_EVERY`] per device unless `all`. They count as written.
    pub fn marks_due(&mut self, now: Instant, all: bool) -> Vec<(DeviceKey, u64)> {
        let mut out = Vec::new();
        for (d, m) in &mut self.marks {
            if m.acked > m.persisted && (all || m.written_at.is_none_or(|t| now >= t + MARK_EVERY)) {
                m.persisted = m.acked;
                m.written_at = Some(now);
                out.push((*d, m.acked));
            }
        }
        out
    }

    /// Whether a mark moved and is not written yet.
    pub fn marks_pending(&self) -> bool {
        self.marks.values().any(|m| m.acked > m.persisted)
    }

    /// Segments that became free: the caller deletes them
    /// ([`Spill::remove_segment`]) once what emptied them is durable.
    pub fn take_freed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.freed)
    }

    /// Deletes a segment no copy is in (durably so).
    ///
    /// # Errors
    /// On a filesystem failure.
    pub fn remove_segment(&mut self, segment: u32) -> Result<(), StoreError> {
        if self.live.get(&segment).copied().unwrap_or(0) > 0 {
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

    /// The record at `loc`, and its bytes (header included).
    fn read_record(&mut self, loc: Loc) -> Result<(u64, Record), StoreError> {
        let path = segment_path(&self.dir, loc.segment);
        let file = match self.readers.entry(loc.segment) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(File::open(&path).map_err(io_err(&path))?),
        };
        let mut header = [0u8; HEADER as usize];
        file.read_exact_at(&mut header, u64::from(loc.offset))
            .map_err(io_err(&path))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            return Err(StoreError::Corrupt("spill/record"));
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, u64::from(loc.offset) + HEADER)
            .map_err(io_err(&path))?;
        if crc32(&payload) != crc {
            return Err(StoreError::Corrupt("spill/record"));
        }
        Ok((u64::from(len) + HEADER, decode(&payload)?))
    }

    /// Copy `seq` of `d` from the record at `loc`.
    fn read_copy(&mut self, d: DeviceKey, seq: u64, loc: Loc) -> Result<CopyRecord, StoreError> {
        let (_, r) = self.read_record(loc)?;
        r.copy(&at(d, seq))
            .ok_or(StoreError::Corrupt("spill/copy missing from its record"))
    }

    /// Reads up to `max` of `d`'s copies with sequence in `from..=hi`, in
    /// order, into `out`.
    ///
    /// # Errors
    /// On a filesystem failure or a record that does not check.
    pub fn read(
        &mut self,
        d: DeviceKey,
        from: u64,
        hi: u64,
        max: usize,
        out: &mut Vec<(u64, Entry)>,
    ) -> Result<(), StoreError> {
        let locs: Vec<(u64, Loc)> = match self.queues.get(&d) {
            Some(q) => {
                let start = q.partition_point(|i| i.seq < from);
                q.range(start..)
                    .take_while(|i| i.seq <= hi)
                    .take(max)
                    .map(|i| (i.seq, i.loc))
                    .collect()
            }
            None => return Ok(()),
        };
        for (seq, loc) in locs {
            out.push((seq, self.read_copy(d, seq, loc)?.into_entry()));
        }
        Ok(())
    }

    /// The copies of `user`'s message `id` and of its messages whose id
    /// has the same [`tag`], with their records, to be checked by the
    /// caller.
    ///
    /// # Errors
    /// As [`Spill::read`].
    pub fn find(&mut self, user: UserId, id: MsgId) -> Result<Vec<CopyRecord>, StoreError> {
        let t = tag(id);
        let locs: Vec<(DeviceKey, u64, Loc)> = self
            .queues
            .iter()
            .flat_map(|(d, q)| {
                q.iter()
                    .filter(|i| i.tag == t && i.from == user.0)
                    .map(|i| (*d, i.seq, i.loc))
            })
            .collect();
        locs.into_iter().map(|(d, seq, l)| self.read_copy(d, seq, l)).collect()
    }

    /// The first copies of `d`'s queue while `keep` says so (for expiry).
    ///
    /// # Errors
    /// As [`Spill::read`].
    pub fn front_while(
        &mut self,
        d: DeviceKey,
        mut keep: impl FnMut(&CopyRecord) -> bool,
    ) -> Result<Vec<CopyRecord>, StoreError> {
        let locs: Vec<(u64, Loc)> = self
            .queues
            .get(&d)
            .map(|q| q.iter().map(|i| (i.seq, i.loc)).collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for (seq, loc) in locs {
            let r = self.read_copy(d, seq, loc)?;
            if !keep(&r) {
                break;
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Counts every indexed copy against its sender (at open).
    pub fn count_shares(&self, shares: &mut Shares) {
        for (d, q) in &self.queues {
            for i in q {
                shares.add(*d, i.sender(), u64::from(i.charge));
            }
        }
    }

    /// Where the first copy of every queue is (its oldest: a queue is in
    /// acceptance order), for [`oldest_at`] to read outside the lock.
    pub fn fronts(&self) -> (PathBuf, Vec<Loc>) {
        let locs = self.queues.values().filter_map(|q| q.front().map(|i| i.loc)).collect();
        (self.dir.clone(), locs)
    }

    /// Devices with copies in the log.
    pub fn devices(&self) -> Vec<DeviceKey> {
        self.queues.keys().copied().collect()
    }

    /// Bytes the segment files take.
    pub fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    /// Bytes of the records that hold an indexed copy, headers included:
    /// what the disk budget counts for the log.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The indexed copies' charges (what the queues' counts hold for them).
    pub fn charged(&self) -> u64 {
        self.charged
    }

    /// Copies indexed.
    pub fn count(&self) -> usize {
        self.total
    }

    /// Copies indexed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Every indexed copy: its device, its sequence and its charge, in
    /// order.
    #[cfg(test)]
    pub fn indexed(&self) -> Vec<(DeviceKey, u64, u64)> {
        let mut out: Vec<(DeviceKey, u64, u64)> = self
            .queues
            .iter()
            .flat_map(|(d, q)| q.iter().map(|i| (*d, i.seq, u64::from(i.charge))))
            .collect();
        out.sort_unstable_by_key(|(d, s, _)| (*d, *s));
        out
    }

    /// Every indexed copy's device, sending user and charge.
    #[cfg(test)]
    pub fn indexed_senders(&self) -> Vec<(DeviceKey, UserId, u64)> {
        self.queues
            .iter()
            .flat_map(|(d, q)| q.iter().map(|i| (*d, UserId(i.from), u64::from(i.charge))))
            .collect()
    }

    /// The bytes of the records on disk that hold an indexed copy, read
    /// from the files (to check [`Spill::held`]).
    #[cfg(test)]
    pub fn held_on_disk(&self) -> u64 {
        let indexed: HashSet<(DeviceKey, u64, Loc)> = self
            .queues
            .iter()
            .flat_map(|(d, q)| q.iter().map(|i| (*d, i.seq, i.loc)))
            .collect();
        let mut held = 0;
        for id in self.segments() {
            scan(&segment_path(&self.dir, id), |loc, bytes, r| {
                if r.ats().iter().any(|a| {
                    let (d, seq) = parse_at(a);
                    indexed.contains(&(d, seq, loc))
                }) {
                    held += bytes;
                }
            })
            .unwrap();
        }
        held
    }

    /// The segment files on disk, by number.
    #[cfg(test)]
    pub fn segments(&self) -> Vec<u32> {
        let mut out: Vec<u32> = fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| segment_id(&e.ok()?.path())).collect())
            .unwrap_or_default();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32, len: usize) -> QueuedMessage {
        let mut body = vec![7u8; len];
        body[..4].copy_from_slice(&n.to_be_bytes());
        QueuedMessage {
            id: MsgId([n as u8; 16]),
            from_user: 1,
            from_device: 1,
            to_user: 2,
            time_ms: 1_795_000_000_000 + u64::from(n),
            body: Bytes::from(body),
        }
    }

    #[test]
    fn crc32_check_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_charge_of_a_copy_is_its_record_alone() {
        for len in [0, 1, 127, 128, 4096] {
            let m = msg(9, len.max(4));
            let r = MessageRecord {
                from_user: m.from_user,
                from_device: m.from_device,
                id: m.id,
                to_user: m.to_user,
                time_ms: m.time_ms,
                copies: vec![Part {
                    at: at(dev(300, 2), u64::MAX),
                    body: m.body.clone(),
                }],
            };
            assert_eq!(copy_len(&m), encode(&Record::Message(r)).unwrap().len() as u64 + HEADER);
        }
    }

    /// Copies of one message written together share a record: its header
    /// is held once, the record stays until its last copy goes, and the
    /// count holds after a reopen, with copies gone before it.
    #[test]
    fn copies_of_one_message_share_a_record_held_once() {
        let dir = tempfile::tempdir().unwrap();
        let devices: Vec<DeviceKey> = (1..=5).map(|n| dev(2, n)).collect();
        let m = msg(1, 200);
        let copies: Vec<(DeviceKey, u64, &QueuedMessage)> = devices.iter().map(|d| (*d, 1, &m)).collect();
        let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        s.append_message(&copies).unwrap();
        let alone = copy_len(&m);
        assert_eq!(s.charged(), 5 * alone);
        assert!(
            s.held() <= 5 * alone - 4 * 30,
            "shared header: {} of {}",
            s.held(),
            5 * alone
        );
        assert_eq!(s.held(), s.held_on_disk());
        let held = s.held();
        // Copies go; the record stays while one is left.
        for d in &devices[..3] {
            assert_eq!(s.ack(*d, 1).totals(), (1, alone));
            assert_eq!(s.held(), held);
        }
        drop(s);
        let marks: HashMap<DeviceKey, u64> = devices[..3].iter().map(|d| (*d, 1)).collect();
        let (mut s, found, _) = Spill::open(dir.path(), marks, &HashSet::new(), 0).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!((s.held(), s.charged()), (held, 2 * alone));
        assert_eq!(s.held(), s.held_on_disk());
        assert!(s.remove(devices[3], 1).is_some());
        assert_eq!(s.held(), held);
        s.ack(devices[4], 1);
        assert_eq!((s.held(), s.charged(), s.count()), (0, 0, 0));
        assert_eq!(s.take_freed(), vec![1], "written before the reopen: free");
        let mut out = Vec::new();
        s.read(devices[4], 0, u64::MAX, 10, &mut out).unwrap();
        assert!(out.is_empty());
    }

    /// Compaction rewrites a shared record with its waiting copies only.
    #[test]
    fn compaction_keeps_only_the_waiting_copies_of_a_shared_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        let (busy, away) = (dev(2, 1), dev(3, 1));
        for n in 1..=3000u32 {
            let m = msg(n, 3000);
            s.append_message(&[(busy, u64::from(n), &m), (away, u64::from(n), &m)])
                .unwrap();
        }
        s.ack(busy, 3000);
        for n in (1..=3000u64).filter(|n| n % 100 != 0) {
            s.remove(away, n).unwrap();
        }
        for seg in s.take_freed() {
            s.remove_segment(seg).unwrap();
        }
        let before = s.bytes();
        while s.compact(u64::MAX).unwrap() {
            for seg in s.take_freed() {
                s.remove_segment(seg).unwrap();
            }
        }
        assert!(s.bytes() < before, "{} of {before}", s.bytes());
        assert_eq!(s.held(), s.held_on_disk());
        let mut out = Vec::new();
        s.read(away, 0, u64::MAX, usize::MAX, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            (1..=30).map(|n| n * 100).collect::<Vec<_>>()
        );
    }

    #[test]
    fn copies_come_back_after_a_reopen_less_what_marks_and_removals_cover() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dev(2, 1), dev(3, 1));
        {
            let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 10).unwrap();
            for n in 1..=3000u32 {
                let d = if n % 2 == 0 { a } else { b };
                s.append(d, u64::from(n), &msg(n, 3000)).unwrap();
            }
            assert!(s.sizes.len() >= 3, "rotated");
        }
        let marks = HashMap::from([(a, 1000)]);
        let removed = HashSet::from([(b, 2001)]);
        let (mut s, found, restored) = Spill::open(dir.path(), marks, &removed, 10).unwrap();
        assert_eq!(found[&a].count, 1000, "a's copies above 1000");
        assert_eq!(found[&b].count, 1499);
        assert_eq!(restored.len(), 10);
        assert!(restored.iter().all(|r| r.time_ms > 1_795_000_000_000 + 2990));
        let mut out = Vec::new();
        s.read(b, 0, u64::MAX, 5, &mut out).unwrap();
        assert_eq!(out.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 3, 5, 7, 9]);
        match &out[1].1 {
            Entry::Message(m) => assert_eq!(&m.body[..4], &3u32.to_be_bytes()),
            other => panic!("{other:?}"),
        }
        // Acked and removed: segments go, the current one stays.
        s.ack(a, 3000);
        s.ack(b, 3000);
        let freed = s.take_freed();
        assert!(freed.len() >= 3, "{freed:?}");
        for seg in freed {
            s.remove_segment(seg).unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_torn_record_ends_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(2, 1);
        {
            let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
            for n in 1..=3u32 {
                s.append(d, u64::from(n), &msg(n, 100)).unwrap();
            }
        }
        let path = segment_path(dir.path(), 1);
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 5] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let (_, found, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        assert_eq!(found[&d].count, 2);
    }

    /// A batch that fills a segment and starts the next one wrote the
    /// tail of the full one too: the flusher must sync that before sled's
    /// flush makes the copies settle, or a power cut loses copies whose
    /// senders were told `Accepted`.
    #[test]
    fn the_tail_of_a_segment_filled_in_a_batch_is_synced_with_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dev(2, 1);
        let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        s.append(d, 1, &msg(1, 100)).unwrap();
        drop(s.take_unsynced().unwrap());
        // One batch: the rest of segment 1, and the start of segment 2.
        let mut n = 2u32;
        while s.current.as_ref().unwrap().id == 1 {
            s.append(d, u64::from(n), &msg(n, 3000)).unwrap();
            n += 1;
        }
        let synced: Vec<u64> = s
            .take_unsynced()
            .unwrap()
            .iter()
            .map(|f| f.metadata().unwrap().ino())
            .collect();
        for id in [1, 2] {
            let ino = fs::metadata(segment_path(dir.path(), id)).unwrap().ino();
            assert!(
                synced.contains(&ino),
                "segment {id} was written in the batch and is not synced"
            );
        }
        // Nothing written since: nothing to sync.
        assert!(s.take_unsynced().unwrap().is_empty());
    }

    /// The newest messages are restored with every copy still queued, also
    /// when copies of one message are not next to each other in the log
    /// (a copy for an online device is written after its write delay) and
    /// the message is the oldest of those kept.
    #[test]
    fn a_restored_message_has_all_its_copies_when_they_are_apart_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dev(2, 1), dev(3, 1));
        {
            let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 2).unwrap();
            s.append(a, 1, &msg(1, 10)).unwrap();
            s.append(a, 2, &msg(2, 10)).unwrap();
            s.append(b, 1, &msg(1, 10)).unwrap();
        }
        let (_, _, restored) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 2).unwrap();
        assert_eq!(restored.len(), 2);
        let first = restored
            .iter()
            .find(|r| r.id == msg(1, 10).id)
            .expect("the older message");
        assert_eq!(first.copies, vec![(a, 1), (b, 1)]);
    }

    #[test]
    fn a_few_copies_that_wait_long_do_not_keep_their_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        let (busy, away) = (dev(2, 1), dev(3, 1));
        // Mostly `busy`'s copies, one in a hundred for `away`.
        for n in 1..=10_000u32 {
            let d = if n % 100 == 0 { away } else { busy };
            s.append(d, u64::from(n), &msg(n, 4000)).unwrap();
        }
        s.ack(busy, 10_000);
        for seg in s.take_freed() {
            s.remove_segment(seg).unwrap();
        }
        let before = s.bytes();
        assert!(before > 8 * SEGMENT_MAX, "{before}");
        while s.compact(u64::MAX).unwrap() {
            for seg in s.take_freed() {
                s.remove_segment(seg).unwrap();
            }
        }
        assert!(s.bytes() < 2 * SEGMENT_MAX, "{} bytes left", s.bytes());
        let mut out = Vec::new();
        s.read(away, 0, u64::MAX, usize::MAX, &mut out).unwrap();
        assert_eq!(out.len(), 100);
        assert!(
            out.iter()
                .all(|(seq, e)| matches!(e, Entry::Message(m) if m.body[..4] == (*seq as u32).to_be_bytes()))
        );
        drop(s);
        let (_, found, _) = Spill::open(dir.path(), HashMap::from([(busy, 10_000)]), &HashSet::new(), 0).unwrap();
        assert_eq!(found[&away].count, 100);
    }

    #[test]
    fn an_indexed_copy_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<Indexed>(), 24);
    }

    #[test]
    fn a_retracted_copy_is_found_by_its_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _, _) = Spill::open(dir.path(), HashMap::new(), &HashSet::new(), 0).unwrap();
        for n in 1..=50u32 {
            s.append(dev(2, 1), u64::from(n), &msg(n, 10)).unwrap();
        }
        let m = msg(17, 10);
        let found = s.find(UserId(1), m.id).unwrap();
        assert!(found.iter().any(|r| r.id == m.id && r.seq() == 17));
        assert_eq!(s.remove(dev(2, 1), 17), Some(copy_len(&m)));
        assert_eq!(s.remove(dev(2, 1), 17), None);
        assert_eq!(s.len(), 49);
    }
}
