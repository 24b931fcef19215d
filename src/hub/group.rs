//! Groups and blocking in the hub (spec §5.8): membership changes, group
//! sends fanned out by the store to every member device, key shares,
//! group receipts, and blocks.
//!
//! Who may do what:
//! - only a member reads a group, sends to it, shares keys in it or sends
//!   receipts in it; a non-member gets `NOT_A_MEMBER` whether the group
//!   exists or not, so it learns nothing of it;
//! - membership changes are checked by the store thread at the moment
//!   they apply (an admin removed a moment before cannot add anyone), and
//!   each device may make [`super::HubConfig::group_changes_per_minute`]
//!   of them a minute (every change queues a notice for every member
//!   device);
//! - a group send names the membership version and the digest of the
//!   member devices it was encrypted for; the store checks both and
//!   appends under the membership's read lock, so no change falls between;
//! - a blocked user's direct messages, receipts and typing stop reaching
//!   the blocker (the sender is not told: `Accepted` and `Done` as ever);
//!   messages in a group both are in still arrive.
//!
//! What it does not do: know a group's title or anything else about it
//! (that travels end to end), or decide who is in a group (the store
//! does, when a change applies).

use std::collections::HashSet;

use bytes::Bytes;

use super::{ConnView, Hub, Now, Refusal, Waiting};
use crate::ids::{ConnId, DeviceKey, UserId};
use crate::store::{
    Appended, GroupAppended, GroupChangeOp, GroupLimits, GroupRefused, GroupView, NewGroupMessage, NewMessage, Op,
};
use crate::wire::{
    self, ClientFrame, DeviceId, GroupInfo, GroupVersion, MAX_BODY_LEN, MAX_GROUP_CHANGE, MAX_KEY_BODIES,
    MAX_RECEIPT_IDS, Member, ServerFrame,
};

impl Hub {
    /// The limits group changes are checked against.
    fn group_limits(&self) -> GroupLimits {
        let c = &self.shared.config;
        GroupLimits {
            members: c.group_members.clamp(1, wire::MAX_GROUP_MEMBERS),
            per_user: c.groups_per_user.clamp(1, wire::MAX_GROUPS_PER_USER),
        }
    }

    /// A group's membership as the wire tells it: names and current
    /// devices.
    pub(super) fn group_info(&self, g: &GroupView) -> GroupInfo {
        let store = self.store();
        let members = g
            .members
            .iter()
            .filter_map(|(u, admin)| {
                let name = store.user_name(*u)?;
                let mut devices = Vec::new();
                store.current_devices(*u, &mut devices);
                Some(Member {
                    user: name.to_string(),
                    admin: *admin,
                    devices,
                })
            })
            .collect();
        GroupInfo {
            group: g.id,
            version: g.version,
            members,
        }
    }

    /// Resolves user names; `None` (after refusing) if one is unknown or
    /// there are too many.
    fn user_ids(&mut self, conn: ConnId, req: u32, names: &[String]) -> Option<Vec<UserId>> {
        if names.len() > MAX_GROUP_CHANGE {
            self.refuse(conn, req, Refusal::TooManyUsers);
            return None;
        }
        let store = self.shared.store.clone();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            match store.user_id(n) {
                Some(u) => out.push(u),
                None => {
                    self.refuse(conn, req, Refusal::UnknownUser);
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Handles a group or blocking frame.
    pub(super) fn group_frame(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, frame: ClientFrame, now: Now) {
        let Some(me) = view.device else { return };
        let store = self.shared.store.clone();
        let change = match frame {
            ClientFrame::GetGroup { group } => {
                return match store.group(group).filter(|g| g.is_member(me.user)) {
                    Some(g) => {
                        let info = self.group_info(&g);
                        self.send(conn, req, ServerFrame::Group(info))
                    }
                    None => self.refuse(conn, req, Refusal::NotAMember),
                };
            }
            ClientFrame::ListGroups => {
                let groups = store
                    .groups_of(me.user)
                    .into_iter()
                    .map(|(group, version)| GroupVersion { group, version })
                    .collect();
                return self.send(conn, req, ServerFrame::Groups { groups });
            }
            ClientFrame::ListBlocked => {
                let mut users: Vec<String> = store
                    .blocked_by(me.user)
                    .into_iter()
                    .filter_map(|u| store.user_name(u).map(|n| n.to_string()))
                    .collect();
                users.sort();
                return self.send(conn, req, ServerFrame::Blocked { users });
            }
            ClientFrame::GroupSend(s) => return self.group_send(conn, view, req, s, now),
            ClientFrame::GroupKeys(k) => return self.group_keys(conn, view, req, k, now),
            ClientFrame::GroupReceipt(r) => return self.group_receipt(conn, view, req, r, now),
            ClientFrame::Block { user, blocked } => {
                let Some(target) = store.user_id(&user) else {
                    return self.refuse(conn, req, Refusal::UnknownUser);
                };
                if target == me.user {
                    return self.refuse(conn, req, Refusal::BlockSelf);
                }
                if blocked && store.storage_full() {
                    return self.refuse(conn, req, Refusal::StorageFull);
                }
                let w = self.waiter(Waiting::Block { conn, req });
                return store.submit(
                    Op::Block {
                        by: me,
                        user: target,
                        blocked,
                        now_ms: now.unix_ms,
                    },
                    Some(w),
                );
            }
            ClientFrame::CreateGroup { group, members } => {
                let Some(members) = self.user_ids(conn, req, &members) else {
                    return;
                };
                (group, GroupChangeOp::Create { members })
            }
            ClientFrame::AddMembers { group, users } => {
                let Some(users) = self.user_ids(conn, req, &users) else {
                    return;
                };
                (group, GroupChangeOp::Add { users })
            }
            ClientFrame::RemoveMembers { group, users } => {
                let Some(users) = self.user_ids(conn, req, &users) else {
                    return;
                };
                (group, GroupChangeOp::Remove { users })
            }
            ClientFrame::MakeAdmin { group, user } => {
                let Some(users) = self.user_ids(conn, req, std::slice::from_ref(&user)) else {
                    return;
                };
                (group, GroupChangeOp::Promote { user: users[0] })
            }
            ClientFrame::LeaveGroup { group } => (group, GroupChangeOp::Leave),
            _ => return,
        };
        let (group, change) = change;
        if !self.shared.may_change_group(me, now.mono) {
            return self.refuse(conn, req, Refusal::GroupRate);
        }
        let leave = matches!(change, GroupChangeOp::Leave);
        let w = self.waiter(Waiting::Group { conn, req, leave });
        store.submit(
            Op::Group {
                by: me.user,
                group,
                change,
                limits: self.group_limits(),
                now_ms: now.unix_ms,
            },
            Some(w),
        );
    }

    /// `GroupSend` (spec §5.8): one body, every member device.
    fn group_send(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, s: wire::GroupSend, now: Now) {
        let Some(me) = view.device else { return };
        // spec §6: the device's send rate, before anything else.
        if let Err(wait) = self.shared.sends.take(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::SendRate, wait);
        }
        if s.body.len() > MAX_BODY_LEN {
            return self.refuse(conn, req, Refusal::BodyTooLarge);
        }
        let store = self.shared.store.clone();
        let shared = self.shared.clone();
        let online = |d: DeviceKey| shared.connection_of(d).is_some();
        let w = self.waiter(Waiting::Send { conn, req, id: s.id });
        let m = NewGroupMessage {
            sender: me,
            id: s.id,
            group: s.group,
            version: s.version,
            devices: s.devices,
            body: s.body,
            now_ms: now.unix_ms,
            mono: now.mono,
        };
        match store.append_group(m, &online, &w) {
            GroupAppended::NotMember => {
                self.waiting.remove(&w.token);
                self.refuse(conn, req, Refusal::NotAMember);
            }
            GroupAppended::Mismatch => {
                self.waiting.remove(&w.token);
                match store.group(s.group) {
                    Some(g) => {
                        let group = self.group_info(&g);
                        self.send(conn, req, ServerFrame::GroupMismatch { id: s.id, group });
                    }
                    None => self.refuse(conn, req, Refusal::NotAMember),
                }
            }
            GroupAppended::Appended {
                appended,
                online,
                skipped,
            } => {
                self.appended(conn, req, s.id, &w, appended, online);
                self.skipped(me, now, skipped);
            }
        }
    }

    /// What an append of a group message or key shares answers.
    fn appended(
        &mut self,
        conn: ConnId,
        req: u32,
        id: wire::MsgId,
        w: &crate::store::Waiter,
        appended: Appended,
        online: Vec<DeviceKey>,
    ) {
        match appended {
            Appended::Queued { .. } => self.wake_online(online),
            Appended::Waiting => {}
            Appended::Duplicate { time_ms } => {
                self.waiting.remove(&w.token);
                self.send(conn, req, ServerFrame::Accepted { id, time_ms });
            }
            Appended::Refused(r) => {
                self.waiting.remove(&w.token);
                self.refuse(conn, req, r.into());
            }
        }
    }

    /// Devices whose full queue got no copy get a gap notice (spec §10,
    /// *Quotas*).
    fn skipped(&mut self, sender: DeviceKey, now: Now, devices: Vec<DeviceKey>) {
        if devices.is_empty() {
            return;
        }
        log::info!(
            "{} device queues were full: they get a gap notice instead of a copy",
            devices.len()
        );
        let w = self.waiter(Waiting::Wake);
        self.store().submit(
            Op::Skipped {
                sender,
                time_ms: now.unix_ms,
                devices,
            },
            Some(w),
        );
    }

    /// `GroupKeys` (spec §5.8): a body each for member devices, as direct
    /// messages.
    fn group_keys(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, k: wire::GroupKeys, now: Now) {
        let Some(me) = view.device else { return };
        // Key shares are sends (spec §6).
        if let Err(wait) = self.shared.sends.take(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::SendRate, wait);
        }
        let store = self.shared.store.clone();
        let Some(g) = store.group(k.group).filter(|g| g.is_member(me.user)) else {
            return self.refuse(conn, req, Refusal::NotAMember);
        };
        if k.bodies.len() > MAX_KEY_BODIES {
            return self.refuse(conn, req, Refusal::TooManyBodies);
        }
        if k.bodies.iter().any(|b| b.data.len() > MAX_BODY_LEN) {
            return self.refuse(conn, req, Refusal::BodyTooLarge);
        }
        let mut seen = HashSet::with_capacity(k.bodies.len());
        let mut copies: Vec<(DeviceKey, Bytes, bool)> = Vec::with_capacity(k.bodies.len());
        let mut devices: Vec<DeviceId> = Vec::new();
        for b in k.bodies {
            let Some(user) = store.user_id(&b.user).filter(|u| g.is_member(*u)) else {
                return self.refuse(conn, req, Refusal::NotAMember);
            };
            let d = DeviceKey { user, device: b.device };
            if d == me {
                return self.refuse(conn, req, Refusal::BodyForSender);
            }
            if !seen.insert(d) {
                return self.refuse(conn, req, Refusal::TwoBodies);
            }
            // A share for a device that is gone has nobody to go to.
            devices.clear();
            store.current_devices(user, &mut devices);
            if devices.contains(&b.device) {
                copies.push((d, b.data, self.shared.connection_of(d).is_some()));
            }
        }
        let online: Vec<DeviceKey> = copies.iter().filter(|c| c.2).map(|c| c.0).collect();
        let w = self.waiter(Waiting::Send { conn, req, id: k.id });
        let m = NewMessage {
            sender: me,
            id: k.id,
            to: me.user,
            copies,
            now_ms: now.unix_ms,
            mono: now.mono,
        };
        let (appended, skipped) = store.append_shares(m, &w);
        let online = online.into_iter().filter(|d| !skipped.contains(d)).collect();
        self.appended(conn, req, k.id, &w, appended, online);
        self.skipped(me, now, skipped);
    }

    /// `GroupReceipt` (spec §5.8): to the sender's devices (if still a
    /// member) and the reporter's other devices.
    fn group_receipt(&mut self, conn: ConnId, view: ConnView<'_>, req: u32, r: wire::GroupReceipt, now: Now) {
        let Some(me) = view.device else { return };
        if let Err(wait) = self.shared.writes.take(me, now.mono) {
            return self.refuse_for(conn, req, Refusal::WriteRate, wait);
        }
        let store = self.shared.store.clone();
        let Some(g) = store.group(r.group).filter(|g| g.is_member(me.user)) else {
            return self.refuse(conn, req, Refusal::NotAMember);
        };
        let Some(to) = store.user_id(&r.to) else {
            return self.refuse(conn, req, Refusal::UnknownUser);
        };
        if r.ids.is_empty() || r.ids.len() > MAX_RECEIPT_IDS || r.kind.0 == 0 {
            return self.refuse(conn, req, Refusal::BadReceipt);
        }
        if store.storage_full() {
            return self.refuse(conn, req, Refusal::StorageFull);
        }
        let mut targets = Vec::new();
        let mut devices = Vec::new();
        // A sender who left since hears nothing more from the group.
        let users: &[UserId] = if g.is_member(to) { &[to, me.user] } else { &[me.user] };
        for &user in users {
            devices.clear();
            store.current_devices(user, &mut devices);
            targets.extend(
                devices
                    .iter()
                    .map(|&device| DeviceKey { user, device })
                    .filter(|d| *d != me),
            );
        }
        targets.sort();
        targets.dedup();
        let w = self.waiter(Waiting::Receipt { conn, req });
        store.submit(
            Op::GroupReceipt {
                from: me,
                group: r.group,
                to,
                kind: r.kind,
                ids: r.ids,
                targets,
                now_ms: now.unix_ms,
            },
            Some(w),
        );
    }

    /// The outcome of a membership change, a block, or a gap notice.
    pub(super) fn group_completed(&mut self, w: Waiting, outcome: crate::store::Outcome) {
        use crate::store::Outcome;
        match (w, outcome) {
            (Waiting::Group { conn, req, leave }, Outcome::Group(r)) => match r {
                Ok((view, told)) => {
                    if leave {
                        self.send(conn, req, ServerFrame::Done);
                    } else {
                        let info = self.group_info(&view);
                        self.send(conn, req, ServerFrame::Group(info));
                    }
                    self.wake_online(told);
                }
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::Block { conn, req }, Outcome::Blocked(r)) => match r {
                Ok(told) => {
                    self.send(conn, req, ServerFrame::Done);
                    self.wake_online(told);
                }
                Err(e) => self.refuse(conn, req, e.into()),
            },
            (Waiting::Wake, Outcome::Notified(told)) => self.wake_online(told),
            (w, other) => {
                debug_assert!(false, "unexpected outcome {other:?} for {w:?}");
                if let Some((conn, req)) = w.answer_to() {
                    self.refuse(conn, req, Refusal::Internal);
                }
            }
        }
    }
}

impl From<GroupRefused> for Refusal {
    fn from(e: GroupRefused) -> Refusal {
        match e {
            GroupRefused::NotMember => Refusal::NotAMember,
            GroupRefused::NotAdmin => Refusal::NotAdmin,
            GroupRefused::Full => Refusal::GroupFull,
            GroupRefused::TooManyGroups => Refusal::TooManyGroups,
            GroupRefused::Exists => Refusal::GroupExists,
            GroupRefused::TooManyBlocked => Refusal::TooManyBlocked,
            GroupRefused::StorageFull => Refusal::StorageFull,
        }
    }
}

/// Whether `frame` is handled by [`Hub::group_frame`].
pub(super) fn is_group_frame(frame: &ClientFrame) -> bool {
    matches!(
        frame,
        ClientFrame::CreateGroup { .. }
            | ClientFrame::AddMembers { .. }
            | ClientFrame::RemoveMembers { .. }
            | ClientFrame::LeaveGroup { .. }
            | ClientFrame::MakeAdmin { .. }
            | ClientFrame::GetGroup { .. }
            | ClientFrame::ListGroups
            | ClientFrame::GroupSend(_)
            | ClientFrame::GroupKeys(_)
            | ClientFrame::GroupReceipt(_)
            | ClientFrame::Block { .. }
            | ClientFrame::ListBlocked
    )
}
