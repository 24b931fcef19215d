//! A `BTreeMap`-backed [`StoreApi`] for the hub's unit tests: everything
//! in memory, nothing on a thread. Operations wait in a list until the test
//! calls [`TestStore::run`]; copies are safe once acknowledged or once the
//! test calls [`TestStore::flush`] (which stands for the store thread
//! writing and flushing them). Blob operations run on the blob rules
//! over files in memory ([`super::blobs::mem`]), also at
//! [`TestStore::run`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::api::{
    Appended, BlobOp, Entry, GroupAppended, GroupView, NewGroupMessage, NewMessage, Op, Outcome, QueuedBlock,
    QueuedGroupMessage, QueuedGroupNotice, QueuedGroupReceipt, QueuedMessage, QueuedReceipt, Read, Refused, StoreApi,
    Waiter,
};
use super::blobs::BlobConfig;
use super::blobs::book::{Blobs, Env};
use super::blobs::mem::MemFiles;
use super::groups::Index as Groups;
use crate::ids::{DeviceKey, Identity, UserId};
use crate::noise::PublicKey;
use crate::wire::{DeviceId, DeviceInfo, GroupId, MsgId, Token};

#[derive(Default)]
struct Msg {
    time_ms: u64,
    copies: Vec<(DeviceKey, u64)>,
    waiters: Vec<Waiter>,
    settled: bool,
}

#[derive(Default)]
struct Inner {
    names: BTreeMap<String, UserId>,
    users: BTreeMap<UserId, Arc<str>>,
    devices: BTreeMap<DeviceKey, (PublicKey, bool)>,
    /// Per queue: seq → (entry, safe).
    queues: BTreeMap<DeviceKey, BTreeMap<u64, (Entry, bool)>>,
    next: BTreeMap<DeviceKey, u64>,
    msgs: HashMap<(DeviceKey, MsgId), Msg>,
    ops: Vec<(Op, Option<Waiter>)>,
    blob_ops: Vec<(BlobOp, Waiter)>,
    full: bool,
    invites: Vec<Token>,
    /// Users who hide their presence.
    hidden: std::collections::BTreeSet<UserId>,
    /// When each device was last seen (`Op::Touch`).
    seen: BTreeMap<DeviceKey, u64>,
    /// One-time keys each device holds (its keys are zeros: the hub does
    /// not look at them).
    one_time: BTreeMap<DeviceKey, u32>,
    /// Groups and blocks.
    groups: Groups,
}

/// What the blob rules see of the test store: a disk budget, the floor,
/// revoked devices (copied in before each run).
#[derive(Default)]
pub struct TestEnv {
    /// Bytes counted.
    pub used: AtomicU64,
    /// The budget.
    pub budget: AtomicU64,
    /// Below the floor.
    pub full: AtomicBool,
    /// Free bytes above the floor (`u64::MAX` at first).
    pub above_floor: AtomicU64,
    /// Revoked devices.
    pub revoked: Mutex<HashSet<DeviceKey>>,
}

impl Env for Arc<TestEnv> {
    fn reserve(&self, bytes: u64) -> bool {
        let used = self.used.load(Ordering::SeqCst);
        if used.saturating_add(bytes) > self.budget.load(Ordering::SeqCst) {
            return false;
        }
        self.used.fetch_add(bytes, Ordering::SeqCst);
        true
    }

    fn adjust(&self, delta: i64) {
        let used = self.used.load(Ordering::SeqCst);
        self.used.store(used.saturating_add_signed(delta), Ordering::SeqCst);
    }

    fn storage_full(&self) -> bool {
        self.full.load(Ordering::SeqCst)
    }

    fn above_floor(&self) -> u64 {
        self.above_floor.load(Ordering::SeqCst)
    }

    fn is_current(&self, d: DeviceKey) -> bool {
        !self.revoked.lock().unwrap_or_else(|e| e.into_inner()).contains(&d)
    }
}

/// The test store.
pub struct TestStore {
    inner: Mutex<Inner>,
    blobs: Mutex<Blobs<MemFiles, Arc<TestEnv>>>,
    env: Arc<TestEnv>,
}

impl Default for TestStore {
    fn default() -> Self {
        TestStore::with_blobs(BlobConfig::default())
    }
}

impl TestStore {
    /// An empty store.
    pub fn new() -> Arc<TestStore> {
        Arc::new(TestStore::default())
    }

    /// An empty store with these blob settings and a disk budget of 1 GiB.
    pub fn with_blobs(config: BlobConfig) -> TestStore {
        let env = Arc::new(TestEnv::default());
        env.budget.store(1 << 30, Ordering::SeqCst);
        env.above_floor.store(u64::MAX, Ordering::SeqCst);
        let blobs = Blobs::open(MemFiles::default(), env.clone(), config).expect("memory does not fail");
        TestStore {
            inner: Mutex::new(Inner::default()),
            blobs: Mutex::new(blobs),
            env,
        }
    }

    /// The blob rules' view of the store (budget, floor).
    pub fn blob_env(&self) -> &Arc<TestEnv> {
        &self.env
    }

    /// The blob files, to look at or damage.
    pub(crate) fn with_blob_files<R>(&self, f: impl FnOnce(&mut MemFiles) -> R) -> R {
        f(self.blobs.lock().unwrap_or_else(|e| e.into_inner()).files())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a user with devices keyed `keys` (numbered from 1).
    pub fn add_user(&self, name: &str, keys: &[PublicKey]) -> UserId {
        let mut i = self.lock();
        let id = UserId(i.users.len() as u32 + 1);
        i.names.insert(name.into(), id);
        i.users.insert(id, name.into());
        for (n, k) in keys.iter().enumerate() {
            i.devices.insert(
                DeviceKey {
                    user: id,
                    device: DeviceId(n as u32 + 1),
                },
                (*k, false),
            );
        }
        id
    }

    /// Gives `d` an identity, `n` one-time keys and a fallback key.
    pub fn set_keys(&self, d: DeviceKey, n: u32) {
        self.lock().one_time.insert(d, n);
    }

    /// An invite `Register` accepts.
    pub fn add_invite(&self, t: Token) {
        self.lock().invites.push(t);
    }

    /// Sets the free-space floor as crossed (or not).
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// Entries in a queue, in order.
    pub fn queue(&self, d: DeviceKey) -> Vec<(u64, Entry)> {
        self.lock()
            .queues
            .get(&d)
            .map(|q| q.iter().map(|(s, (e, _))| (*s, e.clone())).collect())
            .unwrap_or_default()
    }

    /// Everything queued becomes durable: settles what waits for it.
    pub fn flush(&self) {
        let mut i = self.lock();
        let keys: Vec<_> = i.queues.keys().copied().collect();
        for d in keys {
            if let Some(q) = i.queues.get_mut(&d) {
                for (_, (_, safe)) in q.iter_mut() {
                    *safe = true;
                }
            }
        }
        Self::settle(&mut i);
    }

    fn settle(i: &mut Inner) {
        let queues = &i.queues;
        for m in i.msgs.values_mut() {
            if m.settled {
                continue;
            }
            let safe = m
                .copies
                .iter()
                .all(|(d, s)| queues.get(d).and_then(|q| q.get(s)).is_none_or(|(_, safe)| *safe));
            if safe {
                m.settled = true;
                for w in m.waiters.drain(..) {
                    w.complete(Outcome::Settled { time_ms: m.time_ms });
                }
            }
        }
    }

    fn current(i: &Inner, user: UserId) -> Vec<DeviceId> {
        i.devices
            .iter()
            .filter(|(d, (_, revoked))| d.user == user && !revoked)
            .map(|(d, _)| d.device)
            .collect()
    }

    fn push(i: &mut Inner, d: DeviceKey, e: Entry, safe: bool) -> u64 {
        let next = i.next.entry(d).or_insert(1);
        let seq = *next;
        *next += 1;
        i.queues.entry(d).or_default().insert(seq, (e, safe));
        seq
    }

    /// How many operations wait for [`TestStore::run`].
    pub fn ops_waiting(&self) -> usize {
        self.lock().ops.len()
    }

    /// Runs every operation submitted so far, as if durable at once.
    pub fn run(&self) {
        let ops = std::mem::take(&mut self.lock().ops);
        for (op, w) in ops {
            let outcome = self.op(op);
            if let (Some(w), Some(o)) = (w, outcome) {
                w.complete(o);
            }
        }
        let (blob_ops, full, revoked) = {
            let mut i = self.lock();
            let revoked: HashSet<DeviceKey> = i.devices.iter().filter(|(_, (_, r))| *r).map(|(d, _)| *d).collect();
            (std::mem::take(&mut i.blob_ops), i.full, revoked)
        };
        self.env.full.store(full, Ordering::SeqCst);
        *self.env.revoked.lock().unwrap_or_else(|e| e.into_inner()) = revoked;
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        for (op, w) in blob_ops {
            w.complete(Outcome::Blob(blobs.handle(op)));
        }
    }

    fn op(&self, op: Op) -> Option<Outcome> {
        let mut i = self.lock();
        Some(match op {
            Op::Register { invite, name, key, .. } => {
                if !i.invites.contains(&invite) {
                    return Some(Outcome::Registered(Err(super::RegisterError::InvalidInvite)));
                }
                if i.names.contains_key(&name) {
                    return Some(Outcome::Registered(Err(super::RegisterError::NameTaken)));
                }
                drop(i);
                let id = self.add_user(&name, &[key]);
                Outcome::Registered(Ok(DeviceKey {
                    user: id,
                    device: DeviceId(1),
                }))
            }
            Op::Touch { device, now_ms, .. } => {
                i.seen.insert(device, now_ms);
                return None;
            }
            Op::SetLastSeen { user, everyone } => {
                if everyone {
                    i.hidden.remove(&user);
                } else {
                    i.hidden.insert(user);
                }
                Outcome::LastSeenSet
            }
            Op::Revoke { device, .. } => match i.devices.get_mut(&device) {
                Some((_, revoked)) if !*revoked => {
                    *revoked = true;
                    i.queues.remove(&device);
                    Self::settle(&mut i);
                    Outcome::Revoked(true)
                }
                _ => Outcome::Revoked(false),
            },
            Op::Receipt {
                from,
                to,
                kind,
                ids,
                targets,
                now_ms,
            } => {
                if i.full {
                    return Some(Outcome::Receipt(Err(Refused::StorageFull)));
                }
                let e = Entry::Receipt(QueuedReceipt {
                    from_user: from.user.0,
                    from_device: from.device.0,
                    to_user: to.0,
                    kind: kind.0,
                    ids,
                    time_ms: now_ms,
                });
                for t in &targets {
                    Self::push(&mut i, *t, e.clone(), true);
                }
                Outcome::Receipt(Ok(targets))
            }
            Op::Retract { senders, id, .. } => {
                let mut n = 0;
                for s in senders {
                    let copies = i.msgs.get(&(s, id)).map(|m| m.copies.clone()).unwrap_or_default();
                    for (d, seq) in copies {
                        if i.queues.get_mut(&d).and_then(|q| q.remove(&seq)).is_some() {
                            n += 1;
                        }
                    }
                }
                Self::settle(&mut i);
                Outcome::Retracted(n)
            }
            Op::Claim { devices, over_rate } => {
                use crate::wire::{DeviceKeys, IdentityKeys, Signature, SignedKey};
                let mut keys = Vec::new();
                let mut counts = Vec::new();
                for d in devices {
                    let Some(n) = i.one_time.get_mut(&d) else { continue };
                    let fallback = *n == 0 || over_rate.contains(&d);
                    if !fallback {
                        *n -= 1;
                        counts.push((d, *n));
                    }
                    keys.push(DeviceKeys {
                        device: d.device,
                        identity: IdentityKeys {
                            curve25519: [0; 32],
                            ed25519: [0; 32],
                            signature: Signature([0; 64]),
                        },
                        one_time: Some(SignedKey {
                            key: [u8::from(fallback); 32],
                            signature: Signature([0; 64]),
                        }),
                        fallback,
                    });
                }
                Outcome::Claimed(keys, counts)
            }
            Op::Group {
                by,
                group,
                change,
                limits,
                now_ms,
            } => {
                let a = match i.groups.apply(by, group, change, limits, now_ms) {
                    Ok(a) => a,
                    Err(e) => return Some(Outcome::Group(Err(e))),
                };
                let mut told = Vec::new();
                if !a.changes.is_empty() {
                    let notice = Entry::GroupNotice(QueuedGroupNotice {
                        group: group.0,
                        version: a.view.version,
                        changes: a.changes.clone(),
                        time_ms: now_ms,
                    });
                    let users: Vec<UserId> = a.view.members.iter().map(|(u, _)| *u).chain(a.gone.clone()).collect();
                    for u in users {
                        for device in Self::current(&i, u) {
                            let d = DeviceKey { user: u, device };
                            Self::push(&mut i, d, notice.clone(), true);
                            told.push(d);
                        }
                    }
                }
                Outcome::Group(Ok((a.view, told)))
            }
            Op::GroupReceipt {
                from,
                group,
                to,
                kind,
                ids,
                targets,
                now_ms,
            } => {
                if i.full {
                    return Some(Outcome::GroupReceipt(Err(Refused::StorageFull)));
                }
                let e = Entry::GroupReceipt(QueuedGroupReceipt {
                    group: group.0,
                    from_user: from.user.0,
                    from_device: from.device.0,
                    to_user: to.0,
                    kind: kind.0,
                    ids,
                    time_ms: now_ms,
                });
                for t in &targets {
                    Self::push(&mut i, *t, e.clone(), true);
                }
                Outcome::GroupReceipt(Ok(targets))
            }
            Op::Block {
                by,
                user,
                blocked,
                now_ms,
            } => match i.groups.block(by.user, user, blocked) {
                Err(e) => Outcome::Blocked(Err(e)),
                Ok(false) => Outcome::Blocked(Ok(Vec::new())),
                Ok(true) => {
                    let mut told = Vec::new();
                    for device in Self::current(&i, by.user) {
                        let d = DeviceKey { user: by.user, device };
                        if d != by {
                            let e = Entry::Block(QueuedBlock {
                                user: user.0,
                                blocked,
                                time_ms: now_ms,
                            });
                            Self::push(&mut i, d, e, true);
                            told.push(d);
                        }
                    }
                    Outcome::Blocked(Ok(told))
                }
            },
            Op::Skipped { devices, .. } => Outcome::Notified(devices),
            Op::Sync => Outcome::Synced,
            _ => Outcome::Failed,
        })
    }
}

impl StoreApi for TestStore {
    fn identify(&self, key: &PublicKey) -> Identity {
        let i = self.lock();
        match i.devices.iter().find(|(_, (k, _))| k == key) {
            Some((d, (_, false))) => Identity::Device(*d),
            Some(_) => Identity::Revoked,
            None => Identity::Unregistered,
        }
    }

    fn user_id(&self, name: &str) -> Option<UserId> {
        self.lock().names.get(name).copied()
    }

    fn user_name(&self, user: UserId) -> Option<Arc<str>> {
        self.lock().users.get(&user).cloned()
    }

    fn current_devices(&self, user: UserId, out: &mut Vec<DeviceId>) -> bool {
        let i = self.lock();
        out.extend(
            i.devices
                .iter()
                .filter(|(d, (_, revoked))| d.user == user && !revoked)
                .map(|(d, _)| d.device),
        );
        i.users.contains_key(&user)
    }

    fn all_devices(&self, user: UserId, out: &mut Vec<DeviceId>) {
        let i = self.lock();
        out.extend(i.devices.keys().filter(|d| d.user == user).map(|d| d.device));
    }

    fn device_infos(&self, user: UserId) -> Vec<DeviceInfo> {
        let mut out = Vec::new();
        self.current_devices(user, &mut out);
        let i = self.lock();
        out.into_iter()
            .map(|device| DeviceInfo {
                device,
                created_ms: 0,
                last_seen_ms: i.seen.get(&DeviceKey { user, device }).copied().unwrap_or(0),
            })
            .collect()
    }

    fn is_current(&self, d: DeviceKey) -> bool {
        self.lock().devices.get(&d).is_some_and(|(_, revoked)| !revoked)
    }

    fn one_time_keys(&self, d: DeviceKey) -> Option<u32> {
        self.lock().one_time.get(&d).copied()
    }

    fn hides_presence(&self, user: UserId) -> bool {
        self.lock().hidden.contains(&user)
    }

    fn group(&self, id: GroupId) -> Option<GroupView> {
        self.lock().groups.view(id)
    }

    fn groups_of(&self, user: UserId) -> Vec<(GroupId, u64)> {
        self.lock().groups.groups_of(user)
    }

    fn blocks(&self, blocker: UserId, blocked: UserId) -> bool {
        self.lock().groups.blocks(blocker, blocked)
    }

    fn blocked_by(&self, blocker: UserId) -> Vec<UserId> {
        self.lock().groups.blocked_by(blocker)
    }

    fn append_group(&self, m: NewGroupMessage, online: &dyn Fn(DeviceKey) -> bool, waiter: &Waiter) -> GroupAppended {
        let Some(g) = self.group(m.group).filter(|g| g.is_member(m.sender.user)) else {
            return GroupAppended::NotMember;
        };
        if let Some(appended) = self.recall(m.sender, m.id, waiter) {
            return GroupAppended::Appended {
                appended,
                online: Vec::new(),
                skipped: Vec::new(),
            };
        }
        let mut i = self.lock();
        let members: Vec<(Arc<str>, Vec<DeviceId>, UserId)> = g
            .members
            .iter()
            .map(|(u, _)| (i.users[u].clone(), Self::current(&i, *u), *u))
            .collect();
        let digest = crate::keys::devices_digest(members.iter().map(|(n, ds, _)| (&**n, ds.iter().copied())));
        if digest != m.devices || g.version != m.version {
            return GroupAppended::Mismatch;
        }
        if i.full {
            return GroupAppended::Appended {
                appended: Appended::Refused(Refused::StorageFull),
                online: Vec::new(),
                skipped: Vec::new(),
            };
        }
        let targets: Vec<DeviceKey> = members
            .iter()
            .flat_map(|(_, ds, u)| ds.iter().map(|d| DeviceKey { user: *u, device: *d }))
            .filter(|d| *d != m.sender)
            .collect();
        let e = Entry::Group(QueuedGroupMessage {
            id: m.id,
            from_user: m.sender.user.0,
            from_device: m.sender.device.0,
            group: m.group.0,
            time_ms: m.now_ms,
            fanout: targets.len() as u32,
            body: m.body,
        });
        let mut copies = Vec::new();
        for d in &targets {
            copies.push((*d, Self::push(&mut i, *d, e.clone(), false)));
        }
        i.msgs.insert(
            (m.sender, m.id),
            Msg {
                time_ms: m.now_ms,
                copies,
                waiters: vec![waiter.clone()],
                settled: false,
            },
        );
        GroupAppended::Appended {
            appended: Appended::Queued { time_ms: m.now_ms },
            online: targets.into_iter().filter(|d| online(*d)).collect(),
            skipped: Vec::new(),
        }
    }

    fn append_shares(&self, m: NewMessage, waiter: &Waiter) -> (Appended, Vec<DeviceKey>) {
        if let Some(a) = self.recall(m.sender, m.id, waiter) {
            return (a, Vec::new());
        }
        let mut i = self.lock();
        let mut copies = Vec::new();
        for (d, body, _) in m.copies {
            let e = Entry::Message(QueuedMessage {
                id: m.id,
                from_user: m.sender.user.0,
                from_device: m.sender.device.0,
                to_user: d.user.0,
                time_ms: m.now_ms,
                body,
            });
            copies.push((d, Self::push(&mut i, d, e, false)));
        }
        i.msgs.insert(
            (m.sender, m.id),
            Msg {
                time_ms: m.now_ms,
                copies,
                waiters: vec![waiter.clone()],
                settled: false,
            },
        );
        (Appended::Queued { time_ms: m.now_ms }, Vec::new())
    }

    fn append(&self, m: NewMessage, waiter: &Waiter) -> Appended {
        if let Some(a) = self.recall(m.sender, m.id, waiter) {
            return a;
        }
        let mut i = self.lock();
        if i.full {
            return Appended::Refused(Refused::StorageFull);
        }
        let mut copies = Vec::new();
        for (d, body, _) in m.copies {
            let e = Entry::Message(QueuedMessage {
                id: m.id,
                from_user: m.sender.user.0,
                from_device: m.sender.device.0,
                to_user: m.to.0,
                time_ms: m.now_ms,
                body,
            });
            copies.push((d, Self::push(&mut i, d, e, false)));
        }
        i.msgs.insert(
            (m.sender, m.id),
            Msg {
                time_ms: m.now_ms,
                copies,
                waiters: vec![waiter.clone()],
                settled: false,
            },
        );
        Appended::Queued { time_ms: m.now_ms }
    }

    fn recall(&self, sender: DeviceKey, id: MsgId, waiter: &Waiter) -> Option<Appended> {
        let mut i = self.lock();
        let m = i.msgs.get_mut(&(sender, id))?;
        if m.settled {
            return Some(Appended::Duplicate { time_ms: m.time_ms });
        }
        m.waiters.push(waiter.clone());
        Some(Appended::Waiting)
    }

    fn read(&self, d: DeviceKey, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> Read {
        let i = self.lock();
        let Some(q) = i.queues.get(&d) else {
            return Read::Memory { more: false };
        };
        let mut it = q.range(from..);
        for (s, (e, _)) in it.by_ref().take(max) {
            out.push((*s, e.clone()));
        }
        Read::Memory {
            more: it.next().is_some(),
        }
    }

    fn ack(&self, d: DeviceKey, up_to: u64) {
        let mut i = self.lock();
        if let Some(q) = i.queues.get_mut(&d) {
            q.retain(|s, _| *s > up_to);
        }
        Self::settle(&mut i);
    }

    fn last_seq(&self, d: DeviceKey) -> u64 {
        self.lock().next.get(&d).map_or(0, |n| n - 1)
    }

    fn storage_full(&self) -> bool {
        self.lock().full
    }

    fn submit(&self, op: Op, waiter: Option<Waiter>) {
        self.lock().ops.push((op, waiter));
    }

    fn blob(&self, op: BlobOp, waiter: Waiter) {
        self.lock().blob_ops.push((op, waiter));
    }
}
