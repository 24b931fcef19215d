//! The blob frames (spec §5.7): what the hub checks before a blob
//! operation goes to the blob thread, and the answer each outcome makes.
//!
//! The hub checks what the frame and the account directory show: lengths,
//! names, the free-space floor. It resolves the users a blob is for to
//! ids, and lists their current devices (less the sending one) as the
//! devices the blob waits for. The blob thread checks the rest (sizes,
//! budgets, who may read what, offsets) and does the I/O.
//!
//! Transfers are bounded twice, so that memory has a ceiling an operator
//! can compute: each connection has at most [`HubConfig::blob_window`]
//! blob requests in flight, and all connections together hold at most
//! [`HubConfig::blob_memory`] bytes of chunks and reads in flight; past
//! either a request is answered `RATE_LIMITED` at once. A client that
//! keeps its window (spec §5.7) never sees that, and a range it reads is
//! at most one frame, so a big download takes turns with everything else
//! on its loop.

use std::sync::atomic::Ordering;

use super::{ConnView, Hub, HubConfig, Refusal, Waiting};
use crate::ids::{ConnId, DeviceKey, UserId};
use crate::store::{BlobOp, BlobOutcome, StoreApi};
use crate::wire::{ClientFrame, MAX_BLOB_DATA, MAX_BLOB_USERS, ServerFrame};

use super::Now;

impl Hub {
    /// Handles a blob frame (`UploadStart` to `BlobDelete`).
    pub(super) fn blob_frame(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, frame: ClientFrame, now: Now) {
        let Some(me) = view.device else { return };
        let store = self.shared.store.clone();
        let op = match frame {
            ClientFrame::UploadStart(s) => {
                if s.size == 0 {
                    return self.refuse(conn, req, Refusal::BlobEmpty);
                }
                if store.storage_full() {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let (access, expect) = match self.readers(&*store, me, &s.to, true) {
                    Ok(r) => r,
                    Err(why) => return self.refuse(conn, req, why),
                };
                BlobOp::Start {
                    device: me,
                    id: s.id,
                    size: s.size,
                    access,
                    expect,
                    now_ms: now.unix_ms,
                }
            }
            ClientFrame::UploadChunk(c) => {
                if c.data.is_empty() || c.data.len() > MAX_BLOB_DATA {
                    return self.refuse(conn, req, Refusal::BlobChunkSize);
                }
                if store.storage_full() {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                BlobOp::Chunk {
                    device: me,
                    id: c.id,
                    offset: c.offset,
                    data: c.data,
                }
            }
            ClientFrame::UploadFinish { id } => BlobOp::Finish {
                device: me,
                id,
                now_ms: now.unix_ms,
            },
            ClientFrame::Download(d) => {
                if d.len == 0 || d.len as usize > MAX_BLOB_DATA {
                    return self.refuse(conn, req, Refusal::BlobChunkSize);
                }
                BlobOp::Read {
                    device: me,
                    id: d.id,
                    offset: d.offset,
                    len: d.len,
                }
            }
            ClientFrame::BlobFetched { id } => BlobOp::Fetched { device: me, id },
            ClientFrame::BlobGrant(g) => {
                if g.to.is_empty() {
                    return self.refuse(conn, req, Refusal::BlobUsers);
                }
                if store.storage_full() {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let (access, expect) = match self.readers(&*store, me, &g.to, false) {
                    Ok(r) => r,
                    Err(why) => return self.refuse(conn, req, why),
                };
                BlobOp::Grant {
                    device: me,
                    id: g.id,
                    access,
                    expect,
                    now_ms: now.unix_ms,
                }
            }
            ClientFrame::BlobDelete { id } => BlobOp::Delete { device: me, id },
            _ => return,
        };
        let held = match &op {
            BlobOp::Chunk { data, .. } => data.len() as u64,
            BlobOp::Read { len, .. } => u64::from(*len),
            _ => 0,
        };
        let config: &HubConfig = &self.shared.config;
        let in_flight = self.blob_flight.entry(conn.serial).or_insert(0);
        if *in_flight >= config.blob_window {
            return self.refuse(conn, req, Refusal::BlobWindow);
        }
        if !self.shared.take_blob_memory(held) {
            return self.refuse(conn, req, Refusal::BlobMemory);
        }
        *in_flight += 1;
        let w = self.waiter(Waiting::Blob { conn, req, held });
        store.blob(op, w);
    }

    /// The users named (resolved; with the caller's own when `own`) and
    /// the devices a blob is for: their current devices, less the
    /// caller's.
    fn readers(
        &mut self,
        store: &dyn StoreApi,
        me: DeviceKey,
        names: &[String],
        own: bool,
    ) -> Result<(Vec<UserId>, Vec<DeviceKey>), Refusal> {
        if names.len() > MAX_BLOB_USERS {
            return Err(Refusal::BlobUsers);
        }
        let mut users = Vec::with_capacity(names.len() + 1);
        if own {
            users.push(me.user);
        }
        for name in names {
            users.push(store.user_id(name).ok_or(Refusal::UnknownUser)?);
        }
        users.sort();
        users.dedup();
        let mut devices = std::mem::take(&mut self.devices);
        let mut expect = Vec::new();
        for &user in &users {
            devices.clear();
            store.current_devices(user, &mut devices);
            expect.extend(
                devices
                    .iter()
                    .map(|&device| DeviceKey { user, device })
                    .filter(|d| *d != me),
            );
        }
        self.devices = devices;
        Ok((users, expect))
    }

    /// The answer to a blob request.
    pub(super) fn blob_completed(&mut self, conn: ConnId, req: u32, held: u64, outcome: BlobOutcome) {
        self.shared.give_blob_memory(held);
        if let Some(n) = self.blob_flight.get_mut(&conn.serial) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.blob_flight.remove(&conn.serial);
            }
        }
        let frame = match outcome {
            BlobOutcome::Status(s) => ServerFrame::UploadStatus(s),
            BlobOutcome::Data(d) => ServerFrame::BlobData(d),
            BlobOutcome::Done => ServerFrame::Done,
            BlobOutcome::Refused(r) => Refusal::from(r).frame(),
            BlobOutcome::Failed | BlobOutcome::Swept { .. } => Refusal::Internal.frame(),
        };
        self.send(conn, req, frame);
    }
}

impl super::Shared {
    /// Takes `n` bytes of the transfer memory, if they fit.
    fn take_blob_memory(&self, n: u64) -> bool {
        let cap = self.config.blob_memory;
        let before = self.blob_memory.fetch_add(n, Ordering::SeqCst);
        if before.saturating_add(n) > cap && n > 0 {
            self.blob_memory.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn give_blob_memory(&self, n: u64) {
        self.blob_memory.fetch_sub(n, Ordering::SeqCst);
    }

    /// Bytes of blob chunks and reads in flight (for tests and metrics).
    pub fn blob_memory(&self) -> u64 {
        self.blob_memory.load(Ordering::SeqCst)
    }
}
