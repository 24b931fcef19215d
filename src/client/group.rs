//! Groups and blocking on the device side (spec §5.8, §14.9): the local
//! record of each group (its title, which travels end to end, and its
//! membership as last told), membership changes, sending to a group (one
//! Megolm ciphertext, after the session key went over Olm to every member
//! device that lacks it), what group entries in the queue do to the
//! history, group message states, and the block list.
//!
//! Guarantees:
//! - a group message is in the history (as pending), and the Megolm and
//!   Olm state its bodies were made with are durable, before anything
//!   leaves; every retry reuses its id (the server stores it once);
//! - before a message goes, every member device (the server's list,
//!   checked by the digest it names) that lacks this device's session
//!   gets its key, and a session that went to a device no longer in the
//!   group is replaced first ([`super::megolm::Outbound::stale`]): a
//!   removed member cannot read what comes after, one added later cannot
//!   read what came before;
//! - a group message shows delivered once a device of every other member
//!   reported it, read once every other member read it;
//! - a user blocked here is refused as a recipient ("unblock first").
//!
//! Local records live in the history's `meta` tree: `g/` ‖ group id →
//! [`LocalGroup`]; `b/` ‖ user → a blocked user; `x/` ‖ sender ‖ 0 ‖ id →
//! the other members a group message was sent to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Error;
use super::content::{Content, MAX_TITLE_LEN, Payload};
use super::core::{Client, Event};
use super::e2e::DecryptError;
use super::history::{Batch, History, T, Writes, msg_key};
use super::message::{Direction, Message, Status};
use super::send::{MISMATCH_BACKOFF, SEND_BACKOFF, SEND_PATIENCE};
use super::status::{DeviceState, Receipts, Report};
use super::updates::ReceiptNews;
use crate::wire::{
    self, BlockNotice, ChangeKind, ClientFrame, DeviceAddr, DeviceId, ErrorCode, GroupChange, GroupDeliver, GroupId,
    GroupInfo, GroupKeys, GroupNotice, GroupReceiptDeliver, GroupSend, KeyBody, MAX_BODY_LEN, MAX_FRAME_LEN,
    MAX_KEY_BODIES, Member, MsgId, ReceiptKind, ServerFrame,
};

/// A group as this device knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalGroup {
    /// Its id.
    pub id: GroupId,
    /// Its title (end to end; empty until one came).
    pub title: String,
    /// When the title was set (the setter's clock).
    pub title_ms: u64,
    /// The membership version last seen.
    pub version: u64,
    /// The members as last told by the server, longest-standing first
    /// (devices as of then; empty for members only named in a notice).
    pub members: Vec<Member>,
    /// This user is a member.
    pub member: bool,
    /// A notice came since the membership was read: read it again before
    /// sending.
    pub stale: bool,
}

impl LocalGroup {
    fn empty(id: GroupId) -> LocalGroup {
        LocalGroup {
            id,
            title: String::new(),
            title_ms: 0,
            version: 0,
            members: Vec::new(),
            member: true,
            stale: true,
        }
    }

    /// Whether `user` is an admin, as last told.
    pub fn is_admin(&self, user: &str) -> bool {
        self.members.iter().any(|m| m.user == user && m.admin)
    }

    /// Whether `user` is a member, as last told.
    pub fn has(&self, user: &str) -> bool {
        self.members.iter().any(|m| m.user == user)
    }

    /// Takes the server's word for the membership.
    fn update(&mut self, info: &GroupInfo) {
        self.version = info.version;
        self.members = info.members.clone();
        self.stale = false;
    }
}

/// The stored form; the tag is the version.
#[derive(Serialize, Deserialize)]
enum StoredGroup {
    V1(LocalGroup),
}

/// What changed in a group, as an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupNews {
    /// The group.
    pub group: GroupId,
    /// Its membership version now.
    pub version: u64,
    /// The changes (empty: "changed", several folded).
    pub changes: Vec<GroupChange>,
    /// When the server applied them.
    pub ts_ms: u64,
}

/// What a member's devices reported about a group message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The member.
    pub user: String,
    /// `"read"`, `"delivered"`, `"expired"` or `"sent"` (nothing yet).
    pub status: String,
}

fn group_key(g: GroupId) -> Vec<u8> {
    [&b"g/"[..], &g.0[..]].concat()
}

fn blocked_key(user: &str) -> Vec<u8> {
    [&b"b/"[..], user.as_bytes()].concat()
}

fn expected_key(from: &str, id: &MsgId) -> Vec<u8> {
    [&b"x/"[..], &msg_key(from, id)[..]].concat()
}

fn damaged(what: &str) -> Error {
    Error::Damaged(format!("group record: {what}"))
}

/// The group a conversation name (`#` and 32 hex digits) stands for.
pub fn parse_group(name: &str) -> Option<GroupId> {
    GroupId::parse_tag(name)
}

/// The peer under which receipts about message `m` wait in the outbox:
/// its sender, or for a group message `#group:sender`.
pub(super) fn receipt_peer(m: &Message) -> String {
    if m.to.starts_with('#') {
        format!("{}:{}", m.to, m.from)
    } else {
        m.from.clone()
    }
}

/// The group and sender of an outbox peer written by [`receipt_peer`].
pub(super) fn parse_receipt_peer(peer: &str) -> Option<(GroupId, &str)> {
    let (g, from) = peer.split_once(':')?;
    Some((parse_group(g)?, from))
}

/// The devices of a group's members but `me`'s own device.
fn member_devices(info: &LocalGroup, me: &DeviceAddr) -> BTreeSet<(String, DeviceId)> {
    info.members
        .iter()
        .flat_map(|m| m.devices.iter().map(move |d| (m.user.clone(), *d)))
        .filter(|(u, d)| !(*u == me.user && *d == me.device))
        .collect()
}

/// The digest of a group's member devices (spec §5.8).
fn digest(info: &LocalGroup) -> [u8; 8] {
    crate::keys::devices_digest(
        info.members
            .iter()
            .map(|m| (m.user.as_str(), m.devices.iter().copied())),
    )
}

impl History {
    /// This device's record of a group.
    ///
    /// # Errors
    /// Store errors; damage.
    pub fn group(&self, g: GroupId) -> Result<Option<LocalGroup>, Error> {
        self.group_in(&Batch::default(), g)
    }

    fn group_in(&self, batch: &Batch, g: GroupId) -> Result<Option<LocalGroup>, Error> {
        match self.read(batch, T::Meta, &group_key(g))? {
            Some(v) => match postcard::from_bytes(&v).map_err(|_| damaged("group"))? {
                StoredGroup::V1(l) => Ok(Some(l)),
            },
            None => Ok(None),
        }
    }

    fn put_group(&self, batch: &mut Batch, l: &LocalGroup) -> Result<(), Error> {
        let v = postcard::to_stdvec(&StoredGroup::V1(l.clone())).map_err(|_| damaged("group"))?;
        batch.put(T::Meta, group_key(l.id), v);
        Ok(())
    }

    /// Every group this device knows of, by id.
    ///
    /// # Errors
    /// Store errors; damage.
    pub fn groups(&self) -> Result<Vec<LocalGroup>, Error> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(b"g/") {
            let (_, v) = item?;
            let StoredGroup::V1(l) = postcard::from_bytes(&v).map_err(|_| damaged("group"))?;
            out.push(l);
        }
        Ok(out)
    }

    /// Whether this user blocked `user` (as this device knows).
    ///
    /// # Errors
    /// Store errors.
    pub fn is_blocked(&self, user: &str) -> Result<bool, Error> {
        Ok(self.meta.contains_key(blocked_key(user))?)
    }

    fn set_blocked(batch: &mut Batch, user: &str, on: bool) {
        if on {
            batch.put(T::Meta, blocked_key(user), Vec::new());
        } else {
            batch.remove(T::Meta, blocked_key(user));
        }
    }

    /// The users this user blocked (as this device knows), by name.
    ///
    /// # Errors
    /// Store errors.
    pub fn blocked(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(b"b/") {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[2..]).into_owned());
        }
        Ok(out)
    }

    /// The other members a group message was sent to, if recorded.
    fn expected(&self, m: &Message) -> Result<Option<Vec<String>>, Error> {
        match self.meta.get(expected_key(&m.from, &m.id))? {
            Some(v) => Ok(Some(postcard::from_bytes(&v).map_err(|_| damaged("members"))?)),
            None => Ok(None),
        }
    }

    /// The members whose reports count for a group message: those it was
    /// sent to, or (sent from another device of this user) the other
    /// members now.
    fn others(&self, m: &Message) -> Result<Vec<String>, Error> {
        if let Some(e) = self.expected(m)? {
            return Ok(e);
        }
        let Some(g) = parse_group(&m.to) else {
            return Ok(Vec::new());
        };
        Ok(self
            .group(g)?
            .map(|l| {
                l.members
                    .into_iter()
                    .map(|mm| mm.user)
                    .filter(|u| *u != m.from)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The status of a group message this user sent: delivered once a
    /// device of every other member reported it, read once every other
    /// member read it; never below `base`.
    pub(super) fn group_status(&self, m: &Message, r: &Receipts) -> Result<Status, Error> {
        let others = self.others(m)?;
        let best = |u: &str| r.of(u).map(|d| d.state()).max().unwrap_or(DeviceState::Unknown);
        let from = if others.is_empty() {
            Status::Pending
        } else if others.iter().all(|u| best(u) == DeviceState::Read) {
            Status::Read
        } else if others.iter().all(|u| best(u) >= DeviceState::Delivered) {
            Status::Delivered
        } else {
            Status::Pending
        };
        Ok(if from.rank() > m.status.rank() { from } else { m.status })
    }

    /// Each other member's state for a group message this user sent.
    ///
    /// # Errors
    /// Store errors.
    pub fn member_states(&self, m: &Message, r: &Receipts) -> Result<Vec<MemberState>, Error> {
        if !m.to.starts_with('#') || m.direction != Direction::Out {
            return Ok(Vec::new());
        }
        Ok(self
            .others(m)?
            .into_iter()
            .map(|u| {
                let best = r.of(&u).map(|d| d.state()).max().unwrap_or(DeviceState::Unknown);
                let status = match best {
                    DeviceState::Read => "read",
                    DeviceState::Delivered => "delivered",
                    DeviceState::Expired => "expired",
                    DeviceState::Unknown => "sent",
                };
                MemberState {
                    user: u,
                    status: status.into(),
                }
            })
            .collect())
    }

    /// A title from `from`: taken if it is the first this device gets, or
    /// from an admin (as last told) and not older than the one it has.
    pub(super) fn take_title(
        &self,
        batch: &mut Batch,
        g: GroupId,
        from: &DeviceAddr,
        title: String,
        ts_ms: u64,
    ) -> Result<Vec<Event>, Error> {
        if title.len() > MAX_TITLE_LEN || title.trim().is_empty() || title.chars().any(char::is_control) {
            return Ok(Vec::new());
        }
        let mut l = self.group_in(batch, g)?.unwrap_or_else(|| LocalGroup::empty(g));
        let first = l.title.is_empty();
        if !first && (!l.is_admin(&from.user) || ts_ms < l.title_ms) {
            log::info!("ignoring a title for {} from {}, not an admin here", g.tag(), from.user);
            return Ok(Vec::new());
        }
        if l.title == title {
            return Ok(Vec::new());
        }
        l.title = title.clone();
        l.title_ms = ts_ms;
        self.put_group(batch, &l)?;
        Ok(vec![Event::GroupTitle {
            group: g,
            title,
            by: from.user.clone(),
        }])
    }

    /// Marks every unread message of the group conversation `tag` read as
    /// of `at_ms`, queueing read receipts (to each sender) if `receipts`.
    /// Returns their senders and ids.
    fn mark_read_in(
        &self,
        batch: &mut Batch,
        tag: &str,
        at_ms: u64,
        receipts: bool,
    ) -> Result<Vec<(String, MsgId)>, Error> {
        let mut out = Vec::new();
        for m in self.conversation(tag)? {
            if m.direction != Direction::In || m.status == Status::Read {
                continue;
            }
            let key = msg_key(&m.from, &m.id);
            let mut r = match self.read(batch, T::Rcpt, &key)? {
                Some(v) => postcard::from_bytes::<Receipts>(&v).map_err(|_| damaged("receipts"))?,
                None => Receipts::default(),
            };
            r.mark_read_here(at_ms);
            batch.put(T::Rcpt, key, postcard::to_stdvec(&r).map_err(|_| damaged("receipts"))?);
            if receipts && !m.undecryptable && !m.deleted {
                batch.put(
                    T::Outbox,
                    super::updates::outbox_key(ReceiptKind::READ, &receipt_peer(&m), &m.id),
                    Vec::new(),
                );
            }
            out.push((m.from, m.id));
        }
        Ok(out)
    }

    /// Applies a group receipt from the queue: from another device of
    /// this user, its reads mark the messages read here; from another
    /// member, reports on this user's messages to that group.
    fn receive_group_receipt(
        &self,
        batch: &mut Batch,
        me: &str,
        r: &GroupReceiptDeliver,
        show_read: bool,
    ) -> Result<Vec<ReceiptNews>, Error> {
        if r.from.user == me {
            if r.kind == ReceiptKind::READ {
                return self.read_elsewhere(batch, &r.from, &r.to, &r.ids, r.time_ms);
            }
            return Ok(Vec::new());
        }
        if r.to != me {
            return Ok(Vec::new());
        }
        let report = match r.kind {
            ReceiptKind::DELIVERED => Report::Delivered,
            ReceiptKind::READ if show_read => Report::Read,
            ReceiptKind::READ => Report::Delivered,
            _ => return Ok(Vec::new()),
        };
        let tag = r.group.tag();
        let mut news = Vec::new();
        for id in &r.ids {
            let Some(m) = self.read_msg(batch, me, id)? else {
                continue;
            };
            if m.to != tag {
                // Not a message to this group: not the reporter's business.
                continue;
            }
            let key = msg_key(me, id);
            let mut receipts = self.receipts(me, id)?;
            if let Some(v) = self.read(batch, T::Rcpt, &key)? {
                receipts = postcard::from_bytes(&v).map_err(|_| damaged("receipts"))?;
            }
            if !receipts.merge(&r.from.user, r.from.device, report, r.time_ms) {
                continue;
            }
            let v = postcard::to_stdvec(&receipts).map_err(|_| damaged("receipts"))?;
            batch.put(T::Rcpt, key, v);
            news.push(ReceiptNews {
                id: *id,
                from: m.from.clone(),
                to: m.to.clone(),
                status: self.group_status(&m, &receipts)?,
                report,
                by: r.from.user.clone(),
                by_device: r.from.device,
                ts_ms: r.time_ms,
            });
        }
        Ok(news)
    }
}

impl Client {
    // ---- membership ----

    /// Saves what the server said of a group's membership.
    fn save_group(&mut self, info: &GroupInfo) -> Result<LocalGroup, Error> {
        let me = self.me()?;
        let h = self.profile.history();
        let mut l = h.group(info.group)?.unwrap_or_else(|| LocalGroup::empty(info.group));
        l.update(info);
        l.member = info.members.iter().any(|m| m.user == me);
        let mut batch = Batch::default();
        h.put_group(&mut batch, &l)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        Ok(l)
    }

    /// What this user's membership ending does here: not a member, and no
    /// session to write with.
    fn left(&mut self, g: GroupId) -> Result<(), Error> {
        let (h, crypto) = self.profile.parts();
        let mut l = h.group(g)?.unwrap_or_else(|| LocalGroup::empty(g));
        l.member = false;
        l.stale = false;
        crypto.forget_outbound(g);
        let mut batch = Batch::default();
        h.put_group(&mut batch, &l)?;
        h.apply(batch, crypto.take_writes())?;
        h.flush()
    }

    /// Asks the server for a group's membership and saves it.
    ///
    /// # Errors
    /// [`Error::Usage`] if this user is not a member; connection failures.
    pub fn fetch_group(&mut self, g: GroupId) -> Result<LocalGroup, Error> {
        self.connect()?;
        match self.call(&ClientFrame::GetGroup { group: g }, "the group's members") {
            Ok(ServerFrame::Group(info)) if info.group == g => self.save_group(&info),
            Ok(_) => Err(Error::Unexpected("expected Group")),
            Err(Error::Server {
                code: ErrorCode::NOT_A_MEMBER,
                ..
            }) => {
                self.left(g)?;
                Err(not_a_member(g))
            }
            Err(e) => Err(e),
        }
    }

    /// A change that the server answers with the group.
    fn change(&mut self, frame: ClientFrame, what: &'static str) -> Result<LocalGroup, Error> {
        self.connect()?;
        match self.call(&frame, what)? {
            ServerFrame::Group(info) => self.save_group(&info),
            _ => Err(Error::Unexpected("expected Group")),
        }
    }

    fn check_users(users: &[String]) -> Result<(), Error> {
        for u in users {
            if !wire::valid_user_name(u) {
                return Err(Error::Usage(format!("invalid user name {u:?}")));
            }
        }
        if users.len() > wire::MAX_GROUP_CHANGE {
            return Err(Error::Usage(format!(
                "at most {} users at a time",
                wire::MAX_GROUP_CHANGE
            )));
        }
        Ok(())
    }

    fn check_title(title: &str) -> Result<(), Error> {
        if title.trim().is_empty() {
            return Err(Error::Usage("a group's title cannot be empty".into()));
        }
        if title.len() > MAX_TITLE_LEN || title.chars().any(char::is_control) {
            return Err(Error::Usage(format!(
                "a group's title is one line of at most {MAX_TITLE_LEN} bytes"
            )));
        }
        Ok(())
    }

    /// Creates a group titled `title` with `users` (this user is its
    /// first admin) and tells every member device the title, end to end.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad title or name; the server's refusal
    /// (`UNKNOWN_USER`, `GROUP_FULL`, `TOO_MANY_GROUPS`...).
    pub fn group_create(&mut self, title: &str, users: &[String]) -> Result<LocalGroup, Error> {
        Self::check_title(title)?;
        Self::check_users(users)?;
        let g = GroupId(self.new_id()?.0);
        let frame = ClientFrame::CreateGroup {
            group: g,
            members: users.to_vec(),
        };
        let mut l = self.change(frame, "the server to create the group")?;
        l.title = title.to_owned();
        l.title_ms = self.unix_ms();
        self.put_local(&l)?;
        let me = self.this_device()?;
        let targets: Vec<(String, DeviceId)> = member_devices(&l, &me).into_iter().collect();
        self.send_title(&l, &targets)?;
        Ok(l)
    }

    fn put_local(&mut self, l: &LocalGroup) -> Result<(), Error> {
        let h = self.profile.history();
        let mut batch = Batch::default();
        h.put_group(&mut batch, l)?;
        h.apply(batch, Writes::new())?;
        h.flush()
    }

    /// Sends the group's title to `targets`, end to end (best effort: a
    /// device that cannot be reached now learns it with the group key of
    /// the next message to it).
    fn send_title(&mut self, l: &LocalGroup, targets: &[(String, DeviceId)]) -> Result<(), Error> {
        if targets.is_empty() || l.title.is_empty() {
            return Ok(());
        }
        let content = Content::GroupTitle {
            group: l.id,
            title: l.title.clone(),
        };
        match self.send_in_group(l, targets, &content, Some(l.title_ms)) {
            Ok(_) => Ok(()),
            Err(e) if e.is_transient() => {
                log::warn!("the title of {} waits for the next message: {e}", l.id.tag());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Adds `users` to group `g` (admins) and sends them its title.
    ///
    /// # Errors
    /// As [`Client::group_create`]; `NOT_ADMIN`, `NOT_A_MEMBER`.
    pub fn group_add(&mut self, g: GroupId, users: &[String]) -> Result<LocalGroup, Error> {
        Self::check_users(users)?;
        let before = self.profile.history().group(g)?;
        let l = self.change(
            ClientFrame::AddMembers {
                group: g,
                users: users.to_vec(),
            },
            "the server to add the members",
        )?;
        let l = match before {
            Some(b) if !b.title.is_empty() => LocalGroup {
                title: b.title,
                title_ms: b.title_ms,
                ..l
            },
            _ => l,
        };
        let targets: Vec<(String, DeviceId)> = l
            .members
            .iter()
            .filter(|m| users.contains(&m.user))
            .flat_map(|m| m.devices.iter().map(move |d| (m.user.clone(), *d)))
            .collect();
        self.send_title(&l, &targets)?;
        Ok(l)
    }

    /// Removes `users` from group `g` (admins). The next message goes on a
    /// new session they do not have.
    ///
    /// # Errors
    /// As [`Client::group_add`].
    pub fn group_remove(&mut self, g: GroupId, users: &[String]) -> Result<LocalGroup, Error> {
        Self::check_users(users)?;
        self.change(
            ClientFrame::RemoveMembers {
                group: g,
                users: users.to_vec(),
            },
            "the server to remove the members",
        )
    }

    /// Leaves group `g`.
    ///
    /// # Errors
    /// `NOT_A_MEMBER`; connection failures.
    pub fn group_leave(&mut self, g: GroupId) -> Result<(), Error> {
        self.connect()?;
        match self.call(&ClientFrame::LeaveGroup { group: g }, "the server to let you leave") {
            Ok(ServerFrame::Done) => self.left(g),
            Ok(_) => Err(Error::Unexpected("expected Done")),
            Err(Error::Server {
                code: ErrorCode::NOT_A_MEMBER,
                ..
            }) => {
                self.left(g)?;
                Err(not_a_member(g))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `user` an admin of group `g` (admins).
    ///
    /// # Errors
    /// As [`Client::group_add`].
    pub fn group_admin(&mut self, g: GroupId, user: &str) -> Result<LocalGroup, Error> {
        Self::check_users(&[user.to_owned()])?;
        self.change(
            ClientFrame::MakeAdmin {
                group: g,
                user: user.to_owned(),
            },
            "the server to make the admin",
        )
    }

    /// Renames group `g` (admins): the new title goes to every member
    /// device end to end, like a message.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad title or if this user is not an admin;
    /// as a group send.
    pub fn group_rename(&mut self, g: GroupId, title: &str) -> Result<LocalGroup, Error> {
        Self::check_title(title)?;
        let me = self.me()?;
        let l = self.fetch_group(g)?;
        if !l.is_admin(&me) {
            return Err(Error::Usage(format!("only an admin of {} may rename it", g.tag())));
        }
        let now = self.unix_ms();
        let content = Content::GroupTitle {
            group: g,
            title: title.to_owned(),
        };
        self.send_content(&g.tag(), content, now)?;
        let mut l = self.profile.history().group(g)?.unwrap_or(l);
        l.title = title.to_owned();
        l.title_ms = now;
        self.put_local(&l)?;
        Ok(l)
    }

    /// Group `g` as the server has it now, with its title.
    ///
    /// # Errors
    /// [`Error::Usage`] if this user is not a member.
    pub fn group_info(&mut self, g: GroupId) -> Result<LocalGroup, Error> {
        self.fetch_group(g)
    }

    /// The groups this user is in, each read afresh where its version
    /// moved.
    ///
    /// # Errors
    /// Connection failures.
    pub fn group_list(&mut self) -> Result<Vec<LocalGroup>, Error> {
        self.connect()?;
        let ServerFrame::Groups { groups } = self.call(&ClientFrame::ListGroups, "the list of groups")? else {
            return Err(Error::Unexpected("expected Groups"));
        };
        let mut out = Vec::with_capacity(groups.len());
        for gv in &groups {
            let known = self.profile.history().group(gv.group)?;
            match known {
                Some(l) if l.version == gv.version && !l.stale && l.member => out.push(l),
                _ => out.push(self.fetch_group(gv.group)?),
            }
        }
        // Groups this device thought it was in and is not any more.
        for l in self.profile.history().groups()? {
            if l.member && !groups.iter().any(|gv| gv.group == l.id) {
                self.left(l.id)?;
            }
        }
        Ok(out)
    }

    // ---- blocking ----

    /// Blocks `user` (or unblocks): its direct messages, receipts and
    /// typing stop reaching this user's devices; it is not told.
    ///
    /// # Errors
    /// [`Error::Usage`] for a bad name; `UNKNOWN_USER`; connection
    /// failures.
    pub fn set_blocked(&mut self, user: &str, blocked: bool) -> Result<(), Error> {
        if !wire::valid_user_name(user) {
            return Err(Error::Usage(format!("invalid user name {user:?}")));
        }
        self.connect()?;
        let frame = ClientFrame::Block {
            user: user.to_owned(),
            blocked,
        };
        match self.call(&frame, "the server to block")? {
            ServerFrame::Done => {}
            _ => return Err(Error::Unexpected("expected Done")),
        }
        let h = self.profile.history();
        let mut batch = Batch::default();
        History::set_blocked(&mut batch, user, blocked);
        h.apply(batch, Writes::new())?;
        h.flush()
    }

    /// The users this user blocks, as the server says (and kept here).
    ///
    /// # Errors
    /// Connection failures.
    pub fn blocked(&mut self) -> Result<Vec<String>, Error> {
        self.connect()?;
        let ServerFrame::Blocked { users } = self.call(&ClientFrame::ListBlocked, "the block list")? else {
            return Err(Error::Unexpected("expected Blocked"));
        };
        let h = self.profile.history();
        let mut batch = Batch::default();
        for old in h.blocked()? {
            if !users.contains(&old) {
                History::set_blocked(&mut batch, &old, false);
            }
        }
        for u in &users {
            History::set_blocked(&mut batch, u, true);
        }
        h.apply(batch, Writes::new())?;
        h.flush()?;
        Ok(users)
    }

    /// Refuses to send to a user this user blocked.
    pub(super) fn check_not_blocked(&self, to: &str) -> Result<(), Error> {
        if self.profile.history().is_blocked(to)? {
            return Err(Error::Usage(format!(
                "you blocked {to}; unblock them first (tidings unblock {to})"
            )));
        }
        Ok(())
    }

    // ---- sending ----

    /// Sends Olm bodies of `content` to `targets` (member devices of
    /// group `l`), in `GroupKeys` frames under the frame limit, claiming
    /// keys for devices without a session. Returns the devices reached.
    fn send_in_group(
        &mut self,
        l: &LocalGroup,
        targets: &[(String, DeviceId)],
        content: &Content,
        ts_ms: Option<u64>,
    ) -> Result<Vec<(String, DeviceId)>, Error> {
        let me = self.this_device()?;
        let mut notices = Vec::new();
        // The server's device lists are the ones to encrypt for.
        let users: BTreeSet<&str> = targets.iter().map(|(u, _)| u.as_str()).collect();
        for user in &users {
            let Some(m) = l.members.iter().find(|m| m.user == *user) else {
                continue;
            };
            let devices: Vec<DeviceId> = m
                .devices
                .iter()
                .copied()
                .filter(|d| !(*user == me.user && *d == me.device))
                .collect();
            self.profile.crypto_mut().set_devices(user, devices);
            self.recipients(user, &mut None, &mut notices)?;
        }
        self.events.extend(notices.drain(..).map(Event::Notice));
        let mut reached = Vec::new();
        let mut batch: Vec<KeyBody> = Vec::new();
        let mut batch_devices: Vec<(String, DeviceId)> = Vec::new();
        let mut size = 64;
        let mut id = self.new_id()?;
        let ts_ms = ts_ms.unwrap_or_else(|| self.unix_ms());
        for (i, (user, device)) in targets.iter().enumerate() {
            let addr = DeviceAddr {
                user: user.clone(),
                device: *device,
            };
            let crypto = self.profile.crypto_mut();
            if !crypto.has_session(&addr)? {
                log::info!("{user}/{device} has no end-to-end keys: it cannot get the group's key");
                continue;
            }
            let payload = Payload {
                id,
                to: user.clone(),
                ts_ms,
                content: content.clone(),
            };
            let data = crypto.encrypt(&addr, &payload.encode()?, &mut notices)?;
            if data.len() > MAX_BODY_LEN {
                return Err(Error::Unexpected("a group key did not fit in a body"));
            }
            size += data.len() + user.len() + 12;
            batch.push(KeyBody {
                user: user.clone(),
                device: *device,
                data,
            });
            batch_devices.push((user.clone(), *device));
            let last = i + 1 == targets.len();
            if last || batch.len() >= MAX_KEY_BODIES || size > MAX_FRAME_LEN - 8 * 1024 {
                let frame = ClientFrame::GroupKeys(GroupKeys {
                    id,
                    group: l.id,
                    bodies: std::mem::take(&mut batch),
                });
                // Durable first: the ratchets these bodies were made with.
                let (h, crypto) = self.profile.parts();
                h.apply(Batch::default(), crypto.take_writes())?;
                h.flush()?;
                self.call_retrying(&frame, id)?;
                reached.append(&mut batch_devices);
                size = 64;
                id = self.new_id()?;
            }
        }
        if !batch.is_empty() {
            let frame = ClientFrame::GroupKeys(GroupKeys {
                id,
                group: l.id,
                bodies: batch,
            });
            let (h, crypto) = self.profile.parts();
            h.apply(Batch::default(), crypto.take_writes())?;
            h.flush()?;
            self.call_retrying(&frame, id)?;
            reached.append(&mut batch_devices);
        }
        self.events.extend(notices.into_iter().map(Event::Notice));
        Ok(reached)
    }

    /// Sends `frame` (answered `Accepted`), retrying over dropped
    /// connections with the same id for [`SEND_PATIENCE`].
    fn call_retrying(&mut self, frame: &ClientFrame, id: MsgId) -> Result<u64, Error> {
        let deadline = self.now() + SEND_PATIENCE;
        let mut backoff = SEND_BACKOFF.until(deadline);
        self.retrying(&mut backoff, &format!("group keys {id}"), |c| {
            c.connect()?;
            match c.call(frame, "the server to take the group keys")? {
                ServerFrame::Accepted { id: got, time_ms } if got == id => Ok(time_ms),
                _ => Err(Error::Unexpected("expected Accepted")),
            }
        })
    }

    /// The group record to send with: read afresh when a notice made it
    /// stale, or it was never read.
    pub(super) fn group_to_send(&mut self, g: GroupId) -> Result<LocalGroup, Error> {
        match self.profile.history().group(g)? {
            Some(l) if !l.member => Err(not_a_member(g)),
            Some(l) if !l.stale && l.version > 0 => Ok(l),
            _ => self.fetch_group(g),
        }
    }

    /// Sends an encrypted group payload: shares the session key with every
    /// member device that lacks it (a new session first if the old one
    /// went to a device no longer in the group), then one Megolm body;
    /// retries on `GroupMismatch` with the membership the server gave.
    /// Returns the server's time and the other members it went to.
    pub(super) fn send_group_payload(
        &mut self,
        g: GroupId,
        id: MsgId,
        plaintext: &[u8],
        pending: Option<&Message>,
    ) -> Result<(u64, Vec<String>), Error> {
        let mut mismatches = MISMATCH_BACKOFF;
        let mut l = self.group_to_send(g)?;
        loop {
            let me = self.this_device()?;
            let devices = member_devices(&l, &me);
            let now_ms = self.unix_ms();
            let crypto = self.profile.crypto_mut();
            let out = match crypto.outbound(g)? {
                Some(o) if !o.stale(&devices, now_ms) => o,
                _ => crypto.new_outbound(g, now_ms)?,
            };
            let lacking: Vec<(String, DeviceId)> = devices.difference(&out.shared).cloned().collect();
            if !lacking.is_empty() {
                let key = self.profile.crypto_mut().outbound_key(g)?;
                let content = Content::GroupKey {
                    group: g,
                    session_key: key,
                };
                // The new session is durable before its key leaves.
                let (h, crypto) = self.profile.parts();
                h.apply(Batch::default(), crypto.take_writes())?;
                let reached = self.send_in_group(&l, &lacking, &content, None)?;
                let crypto = self.profile.crypto_mut();
                crypto.mark_shared(g, &reached)?;
                let (h, crypto) = self.profile.parts();
                h.apply(Batch::default(), crypto.take_writes())?;
                h.flush()?;
                // This user's own devices that lack the session include any
                // linked since: they get the title too, end to end (with
                // the time it was set, so a newer one still wins).
                let own: Vec<(String, DeviceId)> = lacking.iter().filter(|(u, _)| *u == me.user).cloned().collect();
                self.send_title(&l, &own)?;
            }
            let body = self.profile.crypto_mut().group_encrypt(g, plaintext)?;
            if body.len() > MAX_BODY_LEN {
                return Err(Error::Body(super::BodyError::TooLong {
                    len: body.len(),
                    max: MAX_BODY_LEN,
                }));
            }
            let others: Vec<String> = l
                .members
                .iter()
                .map(|m| m.user.clone())
                .filter(|u| *u != me.user)
                .collect();
            // Durable before it leaves: the message (pending) and the
            // ratchet it was made with.
            let (h, crypto) = self.profile.parts();
            let writes = crypto.take_writes();
            match pending {
                Some(m) => {
                    h.commit(&me.user, Some(m), (&me.user, &id), writes)?;
                }
                None => h.apply(Batch::default(), writes)?,
            }
            h.flush()?;
            let frame = ClientFrame::GroupSend(GroupSend {
                id,
                group: g,
                version: l.version,
                devices: digest(&l),
                body,
            });
            match self.call(&frame, "the server to accept the group message")? {
                ServerFrame::Accepted { id: got, time_ms } if got == id => return Ok((time_ms, others)),
                ServerFrame::GroupMismatch { id: got, group } if got == id => {
                    log::debug!("send {id}: the group changed (version {})", group.version);
                    l = self.save_group(&group)?;
                    if !l.member {
                        return Err(not_a_member(g));
                    }
                    let first = mismatches.tries() == 0;
                    let Some(at) = mismatches.next(self.now()) else {
                        return Err(Error::Unexpected("the group keeps changing"));
                    };
                    if !first {
                        self.pause(at);
                    }
                }
                _ => return Err(Error::Unexpected("expected Accepted or GroupMismatch")),
            }
        }
    }

    /// Sends the message `msg` says to its group (`msg.to` is `#` and the
    /// group id), as [`Client::send_with_id`] does to a user.
    pub(super) fn send_group_message(&mut self, msg: Message) -> Result<Message, Error> {
        let me = self.profile.registered()?.clone();
        let g = parse_group(&msg.to).ok_or_else(|| Error::Usage(format!("{:?} is not a group", msg.to)))?;
        // A file goes up before its message, readable by the members as
        // this device knows them (spec §5.8).
        let id = msg.id;
        let mut msg = match self.upload_for(msg, &mut |_, _| {}) {
            Ok(m) => m,
            Err(e) => {
                if !e.is_transient() && matches!(e, Error::Server { .. } | Error::Usage(_)) {
                    // Refused for good (this user left, the group grew too
                    // large): not left pending to fail again.
                    let h = self.profile.history();
                    if h.get(&me.user, &id)?.is_some_and(|m| m.status == Status::Pending) {
                        h.remove(&me.user, &me.user, &id)?;
                        h.flush()?;
                    }
                }
                return Err(e);
            }
        };
        let plaintext = self.stage_outgoing(&me.user, me.device, &mut msg)?;
        let deadline = self.now() + SEND_PATIENCE;
        let mut backoff = SEND_BACKOFF.until(deadline);
        let sent = self.retrying(&mut backoff, &format!("send {id}"), |c| {
            let left = deadline.saturating_duration_since(c.now());
            if !c.is_connected() && left.is_zero() {
                return Err(Error::Timeout("the server"));
            }
            c.connect_within(left)?;
            c.maintain()?;
            c.send_group_payload(g, id, &plaintext, Some(&msg))
        });
        match sent {
            Ok((time_ms, others)) => {
                let h = self.profile.history();
                let v = postcard::to_stdvec(&others).map_err(|_| damaged("members"))?;
                let mut batch = Batch::default();
                batch.put(T::Meta, expected_key(&me.user, &id), v);
                h.apply(batch, Writes::new())?;
                h.set_status(&me.user, &id, Status::Sent, Some(time_ms))?;
                h.flush()?;
                Ok(h.get(&me.user, &id)?.unwrap_or(Message {
                    status: Status::Sent,
                    ts_ms: time_ms,
                    ..msg
                }))
            }
            Err(e) if e.is_transient() => {
                log::info!("message {id} is pending: {e}");
                Ok(self.profile.history().get(&me.user, &id)?.unwrap_or(msg))
            }
            Err(e) => {
                if matches!(e, Error::Server { .. } | Error::Usage(_)) {
                    let h = self.profile.history();
                    h.remove(&me.user, &me.user, &id)?;
                    h.flush()?;
                }
                Err(e)
            }
        }
    }

    /// Sends `content` to group `g` as a message not kept in the history
    /// (edits, deletes, renames); returns the server's time.
    pub(super) fn send_group_content(&mut self, g: GroupId, content: Content, ts_ms: u64) -> Result<u64, Error> {
        let id = self.new_id()?;
        let payload = Payload {
            id,
            to: g.tag(),
            ts_ms,
            content,
        };
        let plaintext = payload.encode()?;
        let deadline = self.now() + SEND_PATIENCE;
        let mut backoff = SEND_BACKOFF.until(deadline);
        self.retrying(&mut backoff, &format!("send {id}"), |c| {
            c.connect()?;
            c.send_group_payload(g, id, &plaintext, None).map(|(t, _)| t)
        })
    }

    /// Marks group `g`'s messages read here and tells their senders (read
    /// receipts on) or this user's other devices (off). Returns how many
    /// were unread.
    pub(super) fn read_group(&mut self, g: GroupId) -> Result<usize, Error> {
        let me = self.me()?;
        let now_ms = self.unix_ms();
        let h = self.profile.history();
        let (on, _) = h.read_receipts()?;
        let mut batch = Batch::default();
        let read = h.mark_read_in(&mut batch, &g.tag(), now_ms, on)?;
        h.apply(batch, Writes::new())?;
        h.flush()?;
        if on {
            if !h.outbox()?.is_empty() {
                self.connect()?;
                self.settle_receipts()?;
            }
        } else {
            let mut by_sender: BTreeMap<String, Vec<MsgId>> = BTreeMap::new();
            for (from, id) in &read {
                by_sender.entry(from.clone()).or_default().push(*id);
            }
            for (peer, ids) in by_sender {
                for chunk in ids.chunks(wire::MAX_RECEIPT_IDS) {
                    let content = Content::Read {
                        peer: peer.clone(),
                        ids: chunk.to_vec(),
                    };
                    self.send_content(&me, content, now_ms)?;
                }
            }
        }
        Ok(read.len())
    }

    // ---- receiving ----

    /// Stores what a group queue entry (a group message, a membership
    /// notice, a group receipt, a block notice) says; it is acked once
    /// flushed.
    pub(super) fn store_group_entry(&mut self, frame: ServerFrame) -> Result<(), Error> {
        match frame {
            ServerFrame::GroupDeliver(d) => self.store_group_delivery(d),
            ServerFrame::GroupNotice(n) => self.store_group_notice(n),
            ServerFrame::GroupReceipt(r) => {
                self.note(r.seq);
                let me = self.me()?;
                let h = self.profile.history();
                let (show_read, _) = h.read_receipts()?;
                let mut batch = Batch::default();
                let news = h.receive_group_receipt(&mut batch, &me, &r, show_read)?;
                h.apply(batch, Writes::new())?;
                self.fresh.extend(news.into_iter().map(Event::Receipt));
                Ok(())
            }
            ServerFrame::BlockNotice(BlockNotice { seq, user, blocked, .. }) => {
                self.note(seq);
                let h = self.profile.history();
                let mut batch = Batch::default();
                History::set_blocked(&mut batch, &user, blocked);
                h.apply(batch, Writes::new())?;
                self.fresh.push(Event::Blocked { user, blocked });
                Ok(())
            }
            other => {
                log::debug!("ignoring a queue entry of kind {}", other.kind());
                Ok(())
            }
        }
    }

    fn note(&mut self, seq: u64) {
        self.ack_up_to = Some(self.ack_up_to.map_or(seq, |a| a.max(seq)));
    }

    fn store_group_notice(&mut self, n: GroupNotice) -> Result<(), Error> {
        self.note(n.seq);
        let me = self.me()?;
        let (h, crypto) = self.profile.parts();
        let mut l = h.group(n.group)?.unwrap_or_else(|| LocalGroup::empty(n.group));
        if n.version >= l.version {
            l.version = n.version;
            l.stale = true;
        }
        for c in &n.changes {
            match c.kind {
                ChangeKind::Created | ChangeKind::Added => {
                    for u in &c.users {
                        if !l.has(u) {
                            l.members.push(Member {
                                user: u.clone(),
                                admin: false,
                                devices: Vec::new(),
                            });
                        }
                    }
                    if c.kind == ChangeKind::Created && !l.has(&c.by) {
                        l.members.insert(
                            0,
                            Member {
                                user: c.by.clone(),
                                admin: true,
                                devices: Vec::new(),
                            },
                        );
                    }
                    if c.users.contains(&me) || c.by == me {
                        l.member = true;
                    }
                }
                ChangeKind::Removed | ChangeKind::Left => {
                    l.members.retain(|m| !c.users.contains(&m.user));
                    if c.users.contains(&me) {
                        l.member = false;
                        crypto.forget_outbound(n.group);
                    }
                }
                ChangeKind::Promoted => {
                    for m in &mut l.members {
                        if c.users.contains(&m.user) {
                            m.admin = true;
                        }
                    }
                }
            }
        }
        let mut batch = Batch::default();
        h.put_group(&mut batch, &l)?;
        h.apply(batch, crypto.take_writes())?;
        self.fresh.push(Event::Group(GroupNews {
            group: n.group,
            version: n.version,
            changes: n.changes,
            ts_ms: n.time_ms,
        }));
        Ok(())
    }

    fn store_group_delivery(&mut self, d: GroupDeliver) -> Result<(), Error> {
        let me = self.me()?;
        self.note(d.seq);
        if self.profile.history().has(&d.from.user, &d.id)? {
            log::debug!("duplicate group message {} from {}", d.id, d.from.user);
            return Ok(());
        }
        let tag = d.group.tag();
        let (history, crypto) = self.profile.parts();
        let opened = crypto.group_decrypt(d.group, &d.from, &d.body)?;
        let payload = match opened {
            Ok(plain) => match Payload::decode(&plain) {
                Ok(p) if p.id == d.id && p.to == tag => Some(p),
                _ => {
                    log::warn!(
                        "group message {} from {}/{} does not read as sent to {tag}",
                        d.id,
                        d.from.user,
                        d.from.device
                    );
                    None
                }
            },
            Err(e) => {
                if e != DecryptError::Malformed {
                    log::warn!(
                        "cannot decrypt group message {} from {}/{}: {e} (its key never came)",
                        d.id,
                        d.from.user,
                        d.from.device
                    );
                }
                None
            }
        };
        let out = d.from.user == me;
        let mut msg = Message {
            id: d.id,
            from: d.from.user.clone(),
            from_device: d.from.device,
            to: tag.clone(),
            ts_ms: d.time_ms,
            direction: if out { Direction::Out } else { Direction::In },
            status: if out { Status::Sent } else { Status::Received },
            ..Message::default()
        };
        let mut batch = Batch::default();
        let mut events = Vec::new();
        let shown = match payload {
            Some(p) => match p.content {
                Content::Text(text) => {
                    msg.text = text;
                    true
                }
                Content::Reply { text, reply_to, quote } => {
                    msg.text = text;
                    msg.reply_to = Some(reply_to);
                    msg.quote = Some(super::message::Quote {
                        from: quote.from,
                        text: Some(quote.text),
                    });
                    true
                }
                Content::Forward { text, forwards } => {
                    msg.text = text;
                    msg.forwards = forwards;
                    true
                }
                Content::File {
                    file,
                    caption,
                    forwards,
                } => {
                    msg.text = caption;
                    msg.forwards = forwards;
                    msg.attachment = Some(super::attachment::Attachment::received(file));
                    true
                }
                Content::Edit { target, text } => {
                    let u = history.edit(&mut batch, &me, &d.from, target, &tag, &text, p.ts_ms, true)?;
                    events.extend(u.map(Event::Update));
                    false
                }
                Content::Delete { target } => {
                    let u = history.delete(&mut batch, &me, &d.from, target, &tag, p.ts_ms, d.time_ms, true)?;
                    events.extend(u.map(Event::Update));
                    false
                }
                Content::GroupTitle { group, title } if group == d.group => {
                    events.extend(history.take_title(&mut batch, group, &d.from, title, p.ts_ms)?);
                    false
                }
                _ => {
                    log::debug!("a group message from {} of a kind not shown in groups", d.from.user);
                    false
                }
            },
            None => {
                msg.undecryptable = true;
                true
            }
        };
        if shown {
            if let Some(m) = history.receive_message(&mut batch, &me, msg)? {
                events.insert(0, Event::Message(m));
                self.outbox.dirty = true;
            }
        } else {
            history.mark_seen(&mut batch, &d.from.user, &d.id);
        }
        history.apply(batch, crypto.take_writes())?;
        self.fresh.extend(events);
        Ok(())
    }
}

fn not_a_member(g: GroupId) -> Error {
    Error::Usage(format!("you are not a member of group {}", g.tag()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_peers_name_the_group_and_the_sender() {
        let m = Message {
            from: "alice".into(),
            to: GroupId([0xab; 16]).tag(),
            ..Message::default()
        };
        let p = receipt_peer(&m);
        assert_eq!(parse_receipt_peer(&p), Some((GroupId([0xab; 16]), "alice")));
        let direct = Message {
            from: "alice".into(),
            to: "bob".into(),
            ..Message::default()
        };
        assert_eq!(receipt_peer(&direct), "alice");
        assert_eq!(parse_receipt_peer("alice"), None);
    }
}
