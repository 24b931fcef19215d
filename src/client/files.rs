//! Files on a device: sending one (seal, upload in resumable chunks, then
//! the message that carries its key), downloading one (ranges, opened and
//! checked chunk by chunk into a temporary file that becomes the file only
//! once all of it is checked), forwarding, releasing, and downloading by
//! themselves the small ones that arrive (spec §5.7, §14.8).
//!
//! Guarantees:
//! - a file's message is in the history (pending, with its key) before
//!   its upload starts, so that a crash or a killed command resumes the
//!   same upload, with the same key and so the same blob id, when the
//!   same file is sent to the same user again (or when `listen` resends
//!   what is pending); the message goes only once the blob is complete;
//! - at most [`WINDOW`] chunk or range requests are in flight, so a
//!   transfer never has the server refuse it for its window and never
//!   piles up output on either side;
//! - a download saves nothing unless every chunk opened at its place and
//!   the whole matched its checksum: a damaged blob or a wrong key leaves
//!   no file behind;
//! - a dropped connection during a transfer is retried, resuming where it
//!   stopped, under [`TRANSFER_BACKOFF`];
//! - nothing here reads the clock or sleeps: the driver does (through
//!   [`Client::retrying`]).
//!
//! What it does not do: thumbnails (a message may carry one; this client
//! does not make them).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Error;
use super::attachment::{
    self, Attachment, Damaged, FileKey, FileRef, MAX_NAME, Opener, SEALED_CHUNK, Sealer, sealed_len,
};
use super::backoff::Backoff;
use super::conn::Closed;
use super::content::{Content, Payload};
use super::core::{ANSWER_TIMEOUT, Client, Event};
use super::group::{LocalGroup, parse_group};
use super::history::{Batch, Writes};
use super::message::{Direction, Message, Status};
use crate::wire::{
    self, BlobGrant, ClientFrame, Download, ErrorCode, MsgId, ServerFrame, UploadChunk, UploadStart, UploadStatus,
};

/// Chunk or range requests in flight per transfer (the server allows 8
/// per connection, spec §5.7).
pub const WINDOW: usize = 8;
/// What files up to this size do by default when they arrive: download
/// by themselves (`tidings settings auto-download`).
pub const AUTO_DOWNLOAD: u64 = 1 << 20;
/// The folder of a profile where downloads go.
pub const DOWNLOADS_DIR: &str = "downloads";
/// How a transfer resumes over dropped connections: from 200 ms,
/// doubling up to 5 s, for at most a minute after the first failure.
pub const TRANSFER_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).giving_up_after(Duration::from_secs(60));
/// The history's setting of the auto-download size.
const AUTO_DOWNLOAD_KEY: &[u8] = b"auto_download";

/// Progress of a transfer: bytes done of a total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

fn no_progress(_: u64, _: u64) {}

fn is_unknown_blob(e: &Error) -> bool {
    matches!(e, Error::Server { code, .. } if *code == ErrorCode::UNKNOWN_BLOB)
}

impl Client {
    // ---- settings ----

    /// Files up to this many bytes download by themselves when they
    /// arrive (0: none do).
    ///
    /// # Errors
    /// Store errors.
    pub fn auto_download(&self) -> Result<u64, Error> {
        let h = self.profile.history();
        Ok(match h.meta.get(AUTO_DOWNLOAD_KEY)? {
            Some(v) => v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(AUTO_DOWNLOAD),
            None => AUTO_DOWNLOAD,
        })
    }

    /// Sets the size up to which files download by themselves (this
    /// device only).
    ///
    /// # Errors
    /// Store errors.
    pub fn set_auto_download(&mut self, bytes: u64) -> Result<(), Error> {
        let h = self.profile.history();
        h.meta.insert(AUTO_DOWNLOAD_KEY, &bytes.to_be_bytes())?;
        h.flush()
    }

    // ---- sending ----

    /// Sends the file at `path` to `to` (and this user's other devices),
    /// with `caption`; returns once the server accepted the message. The
    /// file is sealed with a fresh key and uploaded first; if an earlier
    /// attempt to send this same file to `to` was cut off, it resumes that
    /// one (same message, same key, same blob). `to` may be a group
    /// (`#<id>`): the blob is then for its other members as this device
    /// knows them when the upload starts, and the message goes to the
    /// group.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name, a path that is not a readable
    /// file, a caption too long, a group this user is not in or one with
    /// more than [`wire::MAX_BLOB_USERS`] other members; the server's refusal
    /// (`BLOB_TOO_LARGE`, `BLOB_BUDGET`, `QUOTA_EXCEEDED`...), after which
    /// the message is removed from the history. If the server stays away
    /// past [`TRANSFER_BACKOFF`], the message is returned pending.
    pub fn send_file(
        &mut self,
        to: &str,
        path: &Path,
        caption: &str,
        progress: Progress<'_>,
    ) -> Result<Message, Error> {
        let me = self.profile.registered()?.clone();
        match parse_group(to) {
            // Refused early from what this device knows of the group; the
            // readers are taken afresh when the upload starts.
            Some(g) => {
                if let Some(l) = self.profile.history().group(g)? {
                    check_readers(&l, &me.user)?;
                }
            }
            None if !wire::valid_user_name(to) => {
                return Err(Error::Usage(format!("invalid user name {to:?}")));
            }
            None => {}
        }
        let unreadable = |e: std::io::Error| Error::Usage(format!("cannot read {}: {e}", path.display()));
        let full = path.canonicalize().map_err(unreadable)?;
        if !fs::metadata(&full).map_err(unreadable)?.is_file() {
            return Err(Error::Usage(format!("{} is not a file", path.display())));
        }
        // One read: the file's checksum, and its blob under a fresh key
        // (used unless an earlier attempt to send it is resumed).
        let key = FileKey::generate().map_err(|e| Error::Damaged(e.to_string()))?;
        let (size, sha256, blob) = attachment::scan_and_seal(&full, &key).map_err(unreadable)?;
        let source = full.to_string_lossy().into_owned();
        let resumed = self.profile.history().pending()?.into_iter().find(|m| {
            m.from == me.user
                && m.from_device.0 == me.device
                && m.to == to
                && m.attachment.as_ref().is_some_and(|a| {
                    a.path.as_deref() == Some(source.as_str()) && a.file.size == size && a.file.sha256 == sha256
                })
        });
        let msg = match resumed {
            Some(m) => {
                log::info!("resuming the upload of {} (message {})", full.display(), m.id);
                m
            }
            None => {
                let name = full
                    .file_name()
                    .map(|n| attachment::shorten(&n.to_string_lossy(), MAX_NAME))
                    .unwrap_or_else(|| "file".into());
                let media_type = attachment::media_type_of(&name).to_owned();
                let file = FileRef {
                    blob,
                    key,
                    size,
                    sha256,
                    media_type,
                    name,
                    thumbnail: None,
                };
                let msg = Message {
                    id: self.new_id()?,
                    from: me.user.clone(),
                    from_device: wire::DeviceId(me.device),
                    to: to.to_owned(),
                    text: caption.to_owned(),
                    ts_ms: self.unix_ms(),
                    direction: Direction::Out,
                    status: Status::Pending,
                    attachment: Some(Box::new(Attachment {
                        file,
                        path: Some(source),
                        expired: false,
                        uploaded: false,
                    })),
                    ..Message::default()
                };
                // A caption too long fails here, before anything is kept.
                Payload {
                    id: msg.id,
                    to: to.to_owned(),
                    ts_ms: msg.ts_ms,
                    content: Self::content_of(&msg),
                }
                .encode()?;
                // Kept (pending, with its key) before a byte goes up.
                let h = self.profile.history();
                h.commit(&me.user, Some(&msg), (&me.user, &msg.id), Writes::new())?;
                h.flush()?;
                msg
            }
        };
        let id = msg.id;
        let result = self.upload_for(msg, progress).and_then(|msg| self.send_message(msg));
        if let Err(e) = &result
            && !e.is_transient()
            && matches!(e, Error::Server { .. } | Error::Usage(_))
        {
            // Refused for good (or the file changed under us): nothing is
            // left half-sent.
            let h = self.profile.history();
            if h.get(&me.user, &id)?.is_some_and(|m| m.status == Status::Pending) {
                h.remove(&me.user, &me.user, &id)?;
                h.flush()?;
            }
        }
        match result {
            // The server stayed away: the message is pending (with its
            // key, and what went up of its file), and goes, its upload
            // resumed, with the next `listen`, `sync` or `chat`.
            Err(e) if e.is_transient() => {
                log::info!("message {id} is pending: {e}");
                match self.profile.history().get(&me.user, &id)? {
                    Some(m) => Ok(m),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// Uploads the file of a pending message of this device that is not
    /// uploaded yet (else does nothing), and records that it is.
    ///
    /// # Errors
    /// See [`Client::send_file`].
    pub(super) fn upload_for(&mut self, mut msg: Message, progress: Progress<'_>) -> Result<Message, Error> {
        let Some(a) = msg.attachment.as_ref() else {
            return Ok(msg);
        };
        if a.uploaded || msg.direction != Direction::Out {
            return Ok(msg);
        }
        let path = a
            .path
            .clone()
            .ok_or_else(|| Error::Usage(format!("the file of message {} is not on this device", msg.id)))?;
        let file = a.file.clone();
        self.upload(&file, Path::new(&path), &msg.to, progress)?;
        if let Some(a) = msg.attachment.as_mut() {
            a.uploaded = true;
        }
        let me = self.me()?;
        let h = self.profile.history();
        if let Some(mut stored) = h.get(&me, &msg.id)? {
            stored.attachment = msg.attachment.clone();
            stored.status = Status::Pending;
            let mut batch = Batch::default();
            h.put_msg(&mut batch, &me, &stored)?;
            h.apply(batch, Writes::new())?;
            h.flush()?;
        }
        Ok(msg)
    }

    /// The users besides this one who may fetch a file sent to `to`: that
    /// user, or every other member of the group as this device knows it
    /// now (a member added later is not among them, spec §5.8).
    fn blob_readers(&mut self, to: &str) -> Result<Vec<String>, Error> {
        let me = self.me()?;
        let Some(g) = parse_group(to) else {
            return Ok(if to == me { Vec::new() } else { vec![to.to_owned()] });
        };
        let l = self.group_to_send(g)?;
        check_readers(&l, &me)?;
        Ok(l.members.iter().map(|m| m.user.clone()).filter(|u| *u != me).collect())
    }

    /// Uploads `file`, sealed from `path`, readable by `to`'s user, or by
    /// the members of the group `to` names (and this user): resumes where
    /// the server stands, retries over dropped connections.
    fn upload(&mut self, file: &FileRef, path: &Path, to: &str, progress: Progress<'_>) -> Result<(), Error> {
        let mut backoff = TRANSFER_BACKOFF;
        let what = format!("upload of {}", file.blob);
        self.retrying(&mut backoff, &what, |c| c.try_upload(file, path, to, progress))
    }

    fn try_upload(&mut self, file: &FileRef, path: &Path, to: &str, progress: Progress<'_>) -> Result<(), Error> {
        self.connect()?;
        let total = sealed_len(file.size);
        let start = ClientFrame::UploadStart(UploadStart {
            id: file.blob,
            size: total,
            to: self.blob_readers(to)?,
        });
        let status = match self.call(&start, "the server to start the upload")? {
            ServerFrame::UploadStatus(s) if s.id == file.blob => s,
            _ => return Err(Error::Unexpected("expected UploadStatus")),
        };
        progress(status.received, total);
        if !status.complete {
            let unreadable = |e: std::io::Error| Error::Usage(format!("cannot read {}: {e}", path.display()));
            let mut sealer = Sealer::open(path, &file.key, file.size).map_err(unreadable)?;
            // A chunk the server holds only part of is sent whole again.
            sealer
                .skip_to(status.received - status.received % SEALED_CHUNK as u64)
                .map_err(unreadable)?;
            let mut in_flight: HashMap<u32, u64> = HashMap::new();
            let mut buf = Vec::with_capacity(SEALED_CHUNK);
            let mut more = true;
            while more || !in_flight.is_empty() {
                while more && in_flight.len() < WINDOW {
                    let offset = sealer.offset();
                    more = sealer.next_chunk(&mut buf).map_err(unreadable)?;
                    if !more {
                        break;
                    }
                    let frame = ClientFrame::UploadChunk(UploadChunk {
                        id: file.blob,
                        offset,
                        data: bytes::Bytes::copy_from_slice(&buf),
                    });
                    let req = self.request(&frame)?;
                    in_flight.insert(req, offset);
                }
                self.flush_link()?;
                if in_flight.is_empty() {
                    break;
                }
                let (req, answer) = self.next_answer(&in_flight)?;
                in_flight.remove(&req);
                match answer {
                    ServerFrame::UploadStatus(s) if s.id == file.blob => progress(s.received, total),
                    ServerFrame::Error { code, text } => return Err(Error::Server { code, text }),
                    _ => return Err(Error::Unexpected("expected UploadStatus")),
                }
            }
            match self.call(
                &ClientFrame::UploadFinish { id: file.blob },
                "the server to finish the upload",
            ) {
                Ok(ServerFrame::UploadStatus(UploadStatus { complete: true, .. })) => {}
                Ok(_) => return Err(Error::Unexpected("expected a complete UploadStatus")),
                Err(Error::Server {
                    code: ErrorCode::BLOB_MISMATCH,
                    ..
                }) => {
                    return Err(Error::Usage(format!(
                        "{} changed while it was being sent; send it again",
                        path.display()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        progress(total, total);
        Ok(())
    }

    /// Queues a request on the connection (written by the next flush).
    fn request(&mut self, frame: &ClientFrame) -> Result<u32, Error> {
        let now = self.now();
        let conn = self.conn.as_mut().ok_or(Error::Closed(Closed::EndOfStream))?;
        conn.request(frame, now).map_err(|_| Error::Closed(Closed::EndOfStream))
    }

    /// Writes what is queued; an error if the connection is gone.
    fn flush_link(&mut self) -> Result<(), Error> {
        if self.conn.is_none() {
            return Err(Error::Closed(Closed::EndOfStream));
        }
        self.flush()
    }

    /// Waits for the answer to one of `reqs`.
    fn next_answer<T>(&mut self, reqs: &HashMap<u32, T>) -> Result<(u32, ServerFrame), Error> {
        let deadline = self.now() + ANSWER_TIMEOUT;
        loop {
            let done = reqs.keys().find(|r| self.answers.contains_key(r)).copied();
            if let Some(req) = done
                && let Some(answer) = self.answers.remove(&req)
            {
                return Ok((req, answer));
            }
            if self.now() >= deadline {
                self.drop_conn();
                return Err(Error::Timeout("the server to answer a file request"));
            }
            self.pump(deadline)?;
        }
    }

    // ---- forwarding and deleting ----

    /// Forwards the file message `src` to `to`: lets `to` read its blob
    /// (no upload), then sends the message. If the server no longer has
    /// the blob but the file is on this device, it is sent afresh.
    ///
    /// # Errors
    /// [`Error::Usage`] if the file is gone from the server and not here;
    /// see [`Client::send_file`].
    pub(super) fn forward_file(&mut self, src: Message, to: &str) -> Result<Message, Error> {
        if !wire::valid_user_name(to) && parse_group(to).is_none() {
            return Err(Error::Usage(format!("invalid user name {to:?}")));
        }
        let Some(a) = src.attachment.clone() else {
            return Err(Error::Unexpected("a file message without its file"));
        };
        let granted = if a.expired {
            Err(Error::Server {
                code: ErrorCode::UNKNOWN_BLOB,
                text: String::new(),
            })
        } else {
            self.connect().and_then(|()| {
                // To a group: its members now, as for a file sent to it.
                let readers = self.blob_readers(to)?;
                if readers.is_empty() {
                    return Ok(ServerFrame::Done);
                }
                let grant = ClientFrame::BlobGrant(BlobGrant {
                    id: a.file.blob,
                    to: readers,
                });
                self.call(&grant, "the server to share the file")
            })
        };
        match granted {
            Ok(ServerFrame::Done) => {}
            Ok(_) => return Err(Error::Unexpected("expected Done")),
            Err(e) if is_unknown_blob(&e) => {
                self.mark_expired(&src)?;
                let here = a.path.as_deref().map(Path::new).filter(|p| {
                    attachment::scan(p).is_ok_and(|(size, sha)| size == a.file.size && sha == a.file.sha256)
                });
                let Some(here) = here else {
                    return Err(Error::Usage(format!(
                        "the file of message {} has expired on the server and is not on this device",
                        src.id
                    )));
                };
                log::info!("the file of {} expired on the server; sending it afresh", src.id);
                let sent = self.send_file(to, here, &src.text, &mut no_progress)?;
                return self.set_forwards(sent, src.forwards.saturating_add(1));
            }
            Err(e) => return Err(e),
        }
        let me = self.profile.registered()?.clone();
        self.send_message(Message {
            id: self.new_id()?,
            from: me.user,
            from_device: wire::DeviceId(me.device),
            to: to.to_owned(),
            text: src.text,
            forwards: src.forwards.saturating_add(1),
            direction: Direction::Out,
            attachment: Some(Box::new(Attachment {
                file: a.file,
                path: a.path,
                expired: false,
                uploaded: true,
            })),
            ..Message::default()
        })
    }

    /// A message sent afresh for a forward is stored as forwarded too.
    /// (It went out as the sender's own; the count only changes what this
    /// device shows.)
    fn set_forwards(&mut self, mut m: Message, forwards: u32) -> Result<Message, Error> {
        m.forwards = forwards;
        let me = self.me()?;
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.put_msg(&mut batch, &me, &m)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        Ok(m)
    }

    /// After a delete for everyone of this user's file message `m`: tells
    /// the server this user no longer needs its blob (spec §5.7,
    /// `BlobDelete`). Failures are logged.
    pub(super) fn release_file(&mut self, m: &Message) {
        let Some(a) = &m.attachment else { return };
        let r = self.connect().and_then(|()| {
            self.call(
                &ClientFrame::BlobDelete { id: a.file.blob },
                "the server to drop the file",
            )
        });
        if let Err(e) = r {
            log::warn!("deleted, but the server could not drop the file: {e}");
        }
    }

    // ---- downloading ----

    /// The file message `id` on this device.
    fn file_message(&self, id: MsgId) -> Result<Message, Error> {
        let mut found = self.profile.history().find(&id)?;
        found.retain(|m| m.attachment.is_some());
        match found.len() {
            0 => Err(Error::Usage(format!("no message {id} with a file on this device"))),
            1 => Ok(found.remove(0)),
            n => Err(Error::Usage(format!(
                "{n} messages with files on this device have id {id}; cannot tell which"
            ))),
        }
    }

    /// Downloads the file of message `id` to `output` (a file, or a
    /// folder to put it in), by default the profile's downloads folder
    /// under the sender's name for it made safe (never over an existing
    /// file). Returns where it is.
    ///
    /// # Errors
    /// [`Error::FileExpired`] if the server no longer has it (the history
    /// says so from then on); [`Error::FileDamaged`] if it does not open
    /// or check; in both cases nothing is saved. Connection failures past
    /// the retry time.
    pub fn download(&mut self, id: MsgId, output: Option<&Path>, progress: Progress<'_>) -> Result<PathBuf, Error> {
        let m = self.file_message(id)?;
        if m.deleted {
            return Err(Error::Usage(format!("message {id} was deleted")));
        }
        let Some(a) = m.attachment.clone() else {
            return Err(Error::Usage(format!("message {id} has no file")));
        };
        // Here already (downloaded before, or sent from here), unchanged.
        let local = a
            .path
            .as_deref()
            .map(Path::new)
            .filter(|p| attachment::scan(p).is_ok_and(|(size, sha)| size == a.file.size && sha == a.file.sha256));
        if let (Some(local), None) = (local, output) {
            return Ok(local.to_path_buf());
        }
        if a.expired && local.is_none() {
            return Err(Error::FileExpired);
        }
        let name = attachment::safe_name(&a.file.name);
        let dest = match output {
            Some(p) if p.is_dir() => free_name(p, &name),
            Some(p) => {
                if p.exists() {
                    return Err(Error::Usage(format!("{} exists already", p.display())));
                }
                p.to_path_buf()
            }
            None => {
                let dir = self.profile.dir().join(DOWNLOADS_DIR);
                fs::create_dir_all(&dir)?;
                free_name(&dir, &name)
            }
        };
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = parent.join(format!(
            ".{}.{}.part",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            hex::encode(&self.new_id()?.0[..4])
        ));
        let got = match local {
            Some(local) => copy_checked(local, &tmp, &a.file),
            None => self.fetch(&a.file, &tmp, progress),
        };
        let fetched = local.is_none();
        let result = got.and_then(|()| {
            // Never over a file that appeared meanwhile.
            let dest = if dest.exists() { free_name(&parent, &name) } else { dest };
            fs::rename(&tmp, &dest)?;
            File::open(&parent)?.sync_all()?;
            Ok(dest)
        });
        let dest = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if matches!(e, Error::FileExpired) {
                    self.mark_expired(&m)?;
                }
                return Err(e);
            }
        };
        let full = dest.canonicalize().unwrap_or(dest);
        if !fetched {
            return Ok(full);
        }
        self.set_path(&m, &full)?;
        // The server may let the blob go once every device has it.
        let done = ClientFrame::BlobFetched { id: a.file.blob };
        if let Err(e) = self.call(&done, "the server to note the download") {
            log::debug!("could not tell the server the file was fetched: {e}");
        }
        Ok(full)
    }

    /// Fetches, opens and checks `file` into a new file at `tmp`, synced.
    fn fetch(&mut self, file: &FileRef, tmp: &Path, progress: Progress<'_>) -> Result<(), Error> {
        let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
        let mut opener = Opener::new(file);
        let total = sealed_len(file.size);
        let mut next = 0u64;
        let mut backoff = TRANSFER_BACKOFF;
        let what = format!("download of {}", file.blob);
        self.retrying(&mut backoff, &what, |c| {
            c.try_fetch(file, &mut opener, &mut out, &mut next, total, progress)
        })?;
        opener.finish().map_err(Error::FileDamaged)?;
        out.sync_all()?;
        Ok(())
    }

    /// Fetches the chunks from `*next` on, opening and writing them in
    /// order.
    fn try_fetch(
        &mut self,
        file: &FileRef,
        opener: &mut Opener,
        out: &mut File,
        next: &mut u64,
        total: u64,
        progress: Progress<'_>,
    ) -> Result<(), Error> {
        self.connect()?;
        let mut asked = *next;
        let mut in_flight: HashMap<u32, u64> = HashMap::new();
        let mut arrived: BTreeMap<u64, bytes::Bytes> = BTreeMap::new();
        let mut buf = Vec::with_capacity(SEALED_CHUNK);
        while *next < total {
            while in_flight.len() + arrived.len() < WINDOW && asked < total {
                let len = (total - asked).min(SEALED_CHUNK as u64) as u32;
                let req = self.request(&ClientFrame::Download(Download {
                    id: file.blob,
                    offset: asked,
                    len,
                }))?;
                in_flight.insert(req, asked);
                asked += u64::from(len);
            }
            self.flush_link()?;
            let (req, answer) = self.next_answer(&in_flight)?;
            let Some(offset) = in_flight.remove(&req) else { continue };
            match answer {
                ServerFrame::BlobData(d) if d.id == file.blob && d.offset == offset => {
                    let want = (total - offset).min(SEALED_CHUNK as u64) as usize;
                    if d.data.len() != want {
                        return Err(Error::FileDamaged(Damaged::Length));
                    }
                    arrived.insert(offset, d.data);
                }
                ServerFrame::Error {
                    code: ErrorCode::UNKNOWN_BLOB,
                    ..
                } => return Err(Error::FileExpired),
                ServerFrame::Error { code, text } => return Err(Error::Server { code, text }),
                _ => return Err(Error::Unexpected("expected BlobData")),
            }
            while let Some(data) = arrived.remove(next) {
                buf.clear();
                buf.extend_from_slice(&data);
                opener.open(&mut buf).map_err(Error::FileDamaged)?;
                out.write_all(&buf)?;
                *next += data.len() as u64;
                progress(*next, total);
            }
        }
        Ok(())
    }

    fn update_attachment(&mut self, m: &Message, f: impl FnOnce(&mut Attachment)) -> Result<(), Error> {
        let me = self.me()?;
        let h = self.profile.history();
        let Some(mut stored) = h.get(&m.from, &m.id)? else {
            return Ok(());
        };
        let Some(a) = stored.attachment.as_mut() else {
            return Ok(());
        };
        f(a);
        // As stored: the status without what receipts merged in.
        stored.status = match (stored.direction, stored.status) {
            (Direction::Out, Status::Pending) => Status::Pending,
            (Direction::Out, _) => Status::Sent,
            (Direction::In, Status::Read) => Status::Read,
            (Direction::In, _) => Status::Received,
        };
        let mut batch = Batch::default();
        h.put_msg(&mut batch, &me, &stored)?;
        h.apply(batch, Writes::new())?;
        h.flush()
    }

    fn mark_expired(&mut self, m: &Message) -> Result<(), Error> {
        self.update_attachment(m, |a| a.expired = true)
    }

    fn set_path(&mut self, m: &Message, path: &Path) -> Result<(), Error> {
        let path = path.to_string_lossy().into_owned();
        self.update_attachment(m, |a| a.path = Some(path))
    }

    /// Downloads the file of a message that just arrived if it is no
    /// larger than the auto-download size; reports where it went, or logs
    /// why not.
    pub(super) fn auto_fetch(&mut self, m: &Message) -> Option<Event> {
        let a = m.attachment.as_ref()?;
        if a.path.is_some() || a.expired || m.deleted {
            return None;
        }
        let limit = self.auto_download().ok()?;
        if a.file.size > limit {
            return None;
        }
        match self.download(m.id, None, &mut no_progress) {
            Ok(path) => Some(Event::Downloaded {
                id: m.id,
                path: path.to_string_lossy().into_owned(),
            }),
            Err(e) => {
                log::warn!("could not download the file of message {}: {e}", m.id);
                None
            }
        }
    }
}

/// A file to group `l` is for its other members, at most
/// [`wire::MAX_BLOB_USERS`] of them, and only from a member.
fn check_readers(l: &LocalGroup, me: &str) -> Result<(), Error> {
    if !l.member {
        return Err(Error::Usage(format!("you are not a member of group {}", l.id.tag())));
    }
    let others = l.members.iter().filter(|m| m.user != me).count();
    if others > wire::MAX_BLOB_USERS {
        return Err(Error::Usage(format!(
            "group {} has {others} other members; a file can be sent to at most {} (send it to fewer people)",
            l.id.tag(),
            wire::MAX_BLOB_USERS
        )));
    }
    Ok(())
}

/// Copies the local copy `from` of `file` to a new file at `to`, checked
/// and synced.
fn copy_checked(from: &Path, to: &Path, file: &FileRef) -> Result<(), Error> {
    let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(to)?;
    std::io::copy(&mut File::open(from)?, &mut out)?;
    out.sync_all()?;
    match attachment::scan(to)? {
        (size, sha) if size == file.size && sha == file.sha256 => Ok(()),
        _ => Err(Error::FileDamaged(Damaged::Checksum)),
    }
}

/// `name` in `dir`, or `name (1)`, `name (2)`... whichever does not exist.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    (1..)
        .map(|n| dir.join(format!("{stem} ({n}){ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// The content of a message with a file.
pub(super) fn file_content(m: &Message) -> Option<Content> {
    let a = m.attachment.as_ref()?;
    Some(Content::File {
        file: a.file.clone(),
        caption: m.text.clone(),
        forwards: m.forwards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{GroupId, Member};

    fn group(users: usize, member: bool) -> LocalGroup {
        LocalGroup {
            id: GroupId([7; 16]),
            title: String::new(),
            title_ms: 0,
            version: 1,
            members: (0..users)
                .map(|i| Member {
                    user: if i == 0 { "me".into() } else { format!("u{i}") },
                    admin: i == 0,
                    devices: Vec::new(),
                })
                .collect(),
            member,
            stale: false,
        }
    }

    #[test]
    fn a_group_file_is_for_at_most_max_blob_users_others_and_only_from_a_member() {
        assert!(check_readers(&group(wire::MAX_BLOB_USERS + 1, true), "me").is_ok());
        let e = check_readers(&group(wire::MAX_BLOB_USERS + 2, true), "me").unwrap_err();
        assert!(e.to_string().contains("at most 256"), "{e}");
        let e = check_readers(&group(3, false), "me").unwrap_err();
        assert!(e.to_string().contains("not a member"), "{e}");
    }
}
