//! Backups of a data directory: [`write`] streams a consistent snapshot,
//! [`restore`] makes a new data directory from one.
//!
//! A backup is taken on the store thread ([`super::Op::Backup`]), the one
//! writer of the database and of the files beside it, after a flush: while
//! it runs nothing changes, so every tree and every file is from the same
//! moment, and everything acknowledged before it is in it. The loops go
//! on meanwhile (their copies wait in memory, their operations queue up).
//!
//! The format (integers big-endian) carries every tree of the database and
//! every file under the data directory's [`FILE_DIRS`], so that what is
//! kept outside sled travels with it: the spill log's segments (every
//! message copy waiting on disk: sled holds only their marks and
//! removals, so the two are copied at the same moment or not at all), and
//! `blobs/` when there is one (a directory the store adds to
//! [`FILE_DIRS`] is backed up and restored with no other change here).
//!
//! ```text
//! "TIDINGS-BACKUP\n"  magic, 15 bytes
//! u32                 container version (1)
//! u32                 data format of the directory it came from (FORMAT)
//! u64                 when it was taken, ms since the Unix epoch
//! sections, each starting with a kind byte:
//!   1 tree: u32 name length, name, then records
//!           (u32 key length, key, u32 value length, value),
//!           ended by a key length of 0xffffffff
//!   2 file: u32 path length, path relative to the data directory
//!           ('/'-separated, no '..'), u64 length, contents
//!   0 end
//! 32 bytes            SHA-256 of everything before
//! ```
//!
//! A restore checks the whole file's checksum before it writes anything,
//! refuses a target directory that is not empty, and makes the new
//! directory safe to run next to what the old server did after the backup
//! (spec §5.4, §10): it drops every one-time key (one handed out after
//! the backup would otherwise be handed out again), and moves every queue
//! past any sequence number the old server could have given out.
//!
//! What it does not do: back up the admin socket, the lock, or anything
//! the daemon does not own.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use ring::digest::{Context, SHA256};
use thiserror::Error;

use super::{FORMAT_VERSION, SEQ_CEILING, be_u64, disk, keys};

/// The magic a backup starts with.
pub const MAGIC: &[u8; 15] = b"TIDINGS-BACKUP\n";
/// The container version this build writes and reads.
const CONTAINER: u32 = 1;
/// Directories of the data directory whose files a backup carries, every
/// file under them, if they exist (the database itself travels as
/// trees): the spill log, and stored attachments. Their files must be
/// written by the store thread only (or be complete before the store
/// thread knows them), so that a backup taken on it sees whole files.
pub const FILE_DIRS: &[&str] = &["spill", "blobs"];
/// How far a restore moves the sequence ceiling past the backup's: more
/// numbers than a server gives out in months (at 100,000 a second, 127
/// days), so that a server restored from an old backup never reuses a
/// number the old one gave out after the backup (spec §10).
pub const RESTORE_JUMP: u64 = 1 << 40;

const TREE: u8 = 1;
const FILE: u8 = 2;
const END: u8 = 0;
const END_OF_TREE: u32 = u32::MAX;
/// Longest key or value a backup accepts (sled's own limit is far below).
const MAX_ITEM: u32 = 1 << 30;

/// A backup or restore failure.
#[derive(Debug, Error)]
pub enum BackupError {
    /// Reading the database failed.
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    /// Writing the backup (or reading a file to back up) failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file is not a backup this build can read.
    #[error("{0}")]
    Format(String),
    /// The target of a restore is in the way.
    #[error("{0}")]
    Target(String),
}

/// What a backup holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Trees.
    pub trees: usize,
    /// Records in all trees.
    pub records: u64,
    /// Files.
    pub files: usize,
    /// Bytes of the backup.
    pub bytes: u64,
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W: Write> {
    inner: W,
    hash: Context,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_bytes(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    let len = u32::try_from(b.len()).map_err(|_| io::Error::other("a record over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(b)
}

/// Writes a backup of `db` and of the files under `dir`'s [`FILE_DIRS`]
/// to `out`. `progress` is called every few thousand records (the store
/// thread's heartbeat: a long backup is progress, not a hang). The
/// caller makes sure nothing writes meanwhile and that what it copies is
/// flushed.
///
/// # Errors
/// A database failure, or a failure writing `out` or reading a file.
pub fn write(
    db: &sled::Db,
    dir: &Path,
    now_ms: u64,
    out: impl Write,
    progress: &dyn Fn(),
) -> Result<Written, BackupError> {
    let mut w = Hashing {
        inner: BufWriter::with_capacity(256 << 10, out),
        hash: Context::new(&SHA256),
        bytes: 0,
    };
    let mut written = Written::default();
    w.write_all(MAGIC)?;
    w.write_all(&CONTAINER.to_be_bytes())?;
    w.write_all(&FORMAT_VERSION.to_be_bytes())?;
    w.write_all(&now_ms.to_be_bytes())?;
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        w.write_all(&[TREE])?;
        put_bytes(&mut w, &name)?;
        for item in tree.iter() {
            let (k, v) = item?;
            put_bytes(&mut w, &k)?;
            put_bytes(&mut w, &v)?;
            written.records += 1;
            if written.records % 4096 == 0 {
                progress();
            }
        }
        w.write_all(&END_OF_TREE.to_be_bytes())?;
        written.trees += 1;
    }
    for sub in FILE_DIRS {
        let mut files = Vec::new();
        list_files(&dir.join(sub), Path::new(sub), &mut files)?;
        files.sort();
        for rel in files {
            let mut f = File::open(dir.join(&rel))?;
            let len = f.metadata()?.len();
            w.write_all(&[FILE])?;
            put_bytes(&mut w, rel_text(&rel)?.as_bytes())?;
            w.write_all(&len.to_be_bytes())?;
            let copied = io::copy(&mut (&mut f).take(len), &mut w)?;
            if copied != len {
                return Err(BackupError::Io(io::Error::other(format!(
                    "{} shrank while it was backed up",
                    rel.display()
                ))));
            }
            written.files += 1;
            progress();
        }
    }
    w.write_all(&[END])?;
    let sum = w.hash.clone().finish();
    w.inner.write_all(sum.as_ref())?;
    w.inner.flush()?;
    written.bytes = w.bytes + sum.as_ref().len() as u64;
    Ok(written)
}

fn rel_text(rel: &Path) -> Result<String, BackupError> {
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    parts
        .map(|p| p.join("/"))
        .ok_or_else(|| BackupError::Format(format!("{}: not a UTF-8 file name", rel.display())))
}

/// Regular files under `abs` (relative paths starting with `rel`).
fn list_files(abs: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(abs) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        let name = entry.file_name();
        if kind.is_dir() {
            list_files(&entry.path(), &rel.join(&name), out)?;
        } else if kind.is_file() {
            out.push(rel.join(&name));
        }
    }
    Ok(())
}

/// What a restore made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The data format of the backup (the daemon migrates an older one
    /// when it starts).
    pub format: u32,
    /// When the backup was taken.
    pub taken_ms: u64,
    /// Records restored.
    pub records: u64,
    /// Files restored.
    pub files: usize,
    /// One-time keys dropped.
    pub one_time_keys_dropped: u64,
    /// The sequence ceiling the restored directory starts from.
    pub ceiling: u64,
}

struct Reader<R: Read> {
    inner: R,
    hash: Option<Context>,
}

impl<R: Read> Reader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BackupError::Format("the backup is cut short or damaged (a length in it does not fit)".into())
            } else {
                BackupError::Io(e)
            }
        })?;
        if let Some(h) = &mut self.hash {
            h.update(buf);
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BackupError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn item(&mut self, len: u32) -> Result<Vec<u8>, BackupError> {
        if len > MAX_ITEM {
            return Err(BackupError::Format("a record is implausibly large".into()));
        }
        let mut v = vec![0u8; len as usize];
        self.exact(&mut v)?;
        Ok(v)
    }
}

/// The header: data format and when it was taken.
fn header<R: Read>(r: &mut Reader<R>) -> Result<(u32, u64), BackupError> {
    let mut magic = [0u8; 15];
    r.exact(&mut magic)
        .map_err(|_| BackupError::Format("not a tidings backup".into()))?;
    if &magic != MAGIC {
        return Err(BackupError::Format("not a tidings backup".into()));
    }
    let container = r.u32()?;
    if container != CONTAINER {
        return Err(BackupError::Format(format!(
            "backup container version {container}; this build reads {CONTAINER}"
        )));
    }
    let format = r.u32()?;
    if format > FORMAT_VERSION {
        return Err(BackupError::Format(format!(
            "the backup holds data format {format}, newer than this build's {FORMAT_VERSION}; restore it with a newer tidingsd"
        )));
    }
    Ok((format, r.u64()?))
}

/// Checks a backup's checksum and structure without writing anything.
/// Returns its data format and when it was taken.
///
/// # Errors
/// [`BackupError::Format`] for a file that is not a whole, intact backup.
pub fn verify(file: &Path) -> Result<(u32, u64), BackupError> {
    let f = File::open(file)?;
    let mut r = Reader {
        inner: BufReader::with_capacity(256 << 10, f),
        hash: Some(Context::new(&SHA256)),
    };
    let head = header(&mut r)?;
    walk(&mut r, &mut |_| Ok(()))?;
    let sum = r.hash.take().map(Context::finish);
    let mut stored = [0u8; 32];
    r.exact(&mut stored)?;
    if sum.as_ref().map(|s| s.as_ref()) != Some(&stored[..]) {
        return Err(BackupError::Format(
            "the backup's checksum does not match: it is damaged".into(),
        ));
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest)? != 0 {
        return Err(BackupError::Format("bytes after the end of the backup".into()));
    }
    Ok(head)
}

/// One piece of a backup, as [`walk`] reads it.
enum Section<'a> {
    /// A record of a tree.
    Record {
        tree: Vec<u8>,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// A tree's records are all read.
    TreeEnd,
    /// A file starts; its contents follow as [`Section::Data`].
    File { path: PathBuf },
    /// Some of the current file's contents.
    Data(&'a [u8]),
}

/// Reads the sections after the header, in order, handing each to `f`.
fn walk<R: Read>(
    r: &mut Reader<R>,
    f: &mut dyn FnMut(Section<'_>) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    loop {
        match r.u8()? {
            END => return Ok(()),
            TREE => {
                let len = r.u32()?;
                let tree = r.item(len)?;
                loop {
                    let klen = r.u32()?;
                    if klen == END_OF_TREE {
                        break;
                    }
                    let key = r.item(klen)?;
                    let vlen = r.u32()?;
                    let value = r.item(vlen)?;
                    f(Section::Record {
                        tree: tree.clone(),
                        key,
                        value,
                    })?;
                }
                f(Section::TreeEnd)?;
            }
            FILE => {
                let len = r.u32()?;
                let name = r.item(len)?;
                let path = safe_path(&name)?;
                let len = r.u64()?;
                let mut left = len;
                let mut buf = vec![0u8; 64 << 10];
                f(Section::File { path })?;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    r.exact(&mut buf[..n])?;
                    f(Section::Data(&buf[..n]))?;
                    left -= n as u64;
                }
            }
            other => return Err(BackupError::Format(format!("unknown section kind {other}"))),
        }
    }
}

/// A relative path from a backup, checked: no root, no `..`.
fn safe_path(name: &[u8]) -> Result<PathBuf, BackupError> {
    let text = std::str::from_utf8(name).map_err(|_| BackupError::Format("a file name is not UTF-8".into()))?;
    let path = PathBuf::from(text);
    let ok = !text.is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && FILE_DIRS.iter().any(|d| path.starts_with(d));
    if !ok {
        return Err(BackupError::Format(format!(
            "a file outside the data directory: {text:?}"
        )));
    }
    Ok(path)
}

/// Makes a new data directory `dir` from the backup `file`: checks the
/// backup first, refuses a `dir` that exists and is not empty, then
/// writes the database and files, drops one-time keys and moves the
/// sequence ceiling (see the module docs). The daemon started on `dir`
/// migrates an older data format.
///
/// # Errors
/// [`BackupError::Target`] if `dir` is in the way, [`BackupError::Format`]
/// for a damaged backup, or I/O and database failures.
pub fn restore(file: &Path, dir: &Path) -> Result<Restored, BackupError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::Target(format!(
                    "{} is not empty; restore makes a new data directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BackupError::Target(format!("{}: {e}", dir.display()))),
    }
    let (format, taken_ms) = verify(file)?;
    fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let db = sled::Config::new().path(dir.join("db")).flush_every_ms(None).open()?;
    let f = File::open(file)?;
    let mut r = Reader {
        inner: BufReader::with_capacity(256 << 10, f),
        hash: None,
    };
    header(&mut r)?;
    let mut restored = Restored {
        format,
        taken_ms,
        records: 0,
        files: 0,
        one_time_keys_dropped: 0,
        ceiling: 0,
    };
    let mut batch = sled::Batch::default();
    let mut batch_tree: Option<Vec<u8>> = None;
    let mut in_batch = 0usize;
    let mut max_seq = 0u64;
    let mut stored_ceiling = None;
    let mut sink: Option<BufWriter<File>> = None;
    let mut segments: Vec<PathBuf> = Vec::new();
    let result = walk(&mut r, &mut |section| {
        match section {
            Section::Record { tree, key, value } => {
                if tree.as_slice() == b"e2e" && keys::is_one_time(&key) {
                    // spec §5.4: a restored server never hands out a
                    // one-time key twice.
                    restored.one_time_keys_dropped += 1;
                    return Ok(());
                }
                if tree.as_slice() == b"meta" && key.as_slice() == SEQ_CEILING.as_bytes() {
                    stored_ceiling = be_u64(&value);
                }
                if tree.as_slice() == b"queues" && key.first() == Some(&disk::QUEUE) && key.len() == disk::QUEUE_KEY_LEN
                {
                    max_seq = max_seq.max(be_u64(&key[disk::QUEUE_KEY_LEN - 8..]).unwrap_or(0));
                }
                batch_tree = Some(tree);
                batch.insert(key, value);
                in_batch += 1;
                restored.records += 1;
                if in_batch >= 10_000 {
                    flush_batch(&db, &mut batch_tree, &mut batch, &mut in_batch)?;
                }
            }
            Section::TreeEnd => flush_batch(&db, &mut batch_tree, &mut batch, &mut in_batch)?,
            Section::File { path } => {
                let target = dir.join(&path);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                finish_file(sink.replace(BufWriter::new(File::create(&target)?)))?;
                restored.files += 1;
                if path.starts_with("spill") && path.extension().is_some_and(|e| e == "log") {
                    segments.push(target);
                }
            }
            Section::Data(bytes) => {
                if let Some(w) = sink.as_mut() {
                    w.write_all(bytes)?;
                }
            }
        }
        Ok(())
    });
    result?;
    finish_file(sink.take())?;
    // The copies in the spill log have sequence numbers too.
    for seg in &segments {
        let top = super::spill::max_seq_in(seg).map_err(|e| BackupError::Format(format!("{}: {e}", seg.display())))?;
        max_seq = max_seq.max(top);
    }
    for sub in FILE_DIRS {
        let d = dir.join(sub);
        if d.is_dir() {
            File::open(&d)?.sync_all()?;
        }
    }
    // spec §10: past any number the old server gave out, and far past.
    let base = stored_ceiling.unwrap_or(1).max(max_seq + 1);
    restored.ceiling = base.saturating_add(RESTORE_JUMP);
    db.open_tree("meta")?
        .insert(SEQ_CEILING, &restored.ceiling.to_be_bytes())?;
    db.flush()?;
    drop(db);
    let format_file = dir.join(super::FORMAT_FILE);
    let mut f = File::create(&format_file)?;
    writeln!(f, "{} {format}", super::FORMAT_MAGIC)?;
    f.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(restored)
}

fn flush_batch(
    db: &sled::Db,
    tree: &mut Option<Vec<u8>>,
    batch: &mut sled::Batch,
    n: &mut usize,
) -> Result<(), BackupError> {
    if let Some(name) = tree.take()
        && *n > 0
    {
        db.open_tree(name)?.apply_batch(std::mem::take(batch))?;
    }
    *batch = sled::Batch::default();
    *n = 0;
    Ok(())
}

fn finish_file(w: Option<BufWriter<File>>) -> Result<(), BackupError> {
    if let Some(w) = w {
        let f = w.into_inner().map_err(|e| BackupError::Io(e.into_error()))?;
        f.sync_all()?;
    }
    Ok(())
}
