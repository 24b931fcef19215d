//! Accounts, devices, device keys, invites and link codes.
//!
//! Every change runs in one sled transaction over the trees it touches and
//! then updates an in-memory index (names, devices per user, outstanding
//! link codes) under a write lock held across both, so readers never see
//! the index ahead of or behind the database. Invite and link secrets are
//! stored only as an HMAC under a key kept in `meta`, and checked with
//! `ring::hmac::verify` (constant time).
//!
//! Revocation holds (spec §5.2 `RevokeDevice`, §11): a link code belongs to
//! the device that asked for it. Asking for one ([`Accounts::request_link`])
//! and revoking a device ([`Accounts::revoke`]) both run under the index's
//! write lock, and a revoke deletes the device's codes in the same
//! transaction that marks it revoked, so no code asked for by a device
//! outlives its revocation, however the two interleave. A user has at most
//! [`MAX_LINK_CODES`] outstanding codes and asks for them at a bounded rate
//! ([`LINK_REQUESTS_BURST`], one more every [`LINK_REQUEST_REFILL`]).
//! Revoked devices keep their record and their static key, so that the key
//! is recognised and told it was revoked (spec §8, §12).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::{StoreError, be_u32};
use crate::ids::{DeviceKey, Identity, UserId};
use crate::noise::PublicKey;
use crate::wire::{DeviceId, DeviceInfo, MAX_DEVICES_PER_USER, Token, valid_user_name};

/// A user as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// The internal id.
    pub id: u32,
    /// When the account was created.
    pub created_ms: u64,
    /// The number the next device gets; numbers are never reused.
    pub next_device: u32,
}

/// A device as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its Noise static public key.
    pub key: PublicKey,
    /// When it registered or was linked.
    pub created_ms: u64,
    /// When it was last online: when it last authenticated, or went
    /// offline after that.
    pub last_seen_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

/// An invite as `tidingsd invites` lists it: id, uses left, expiry.
pub type InviteInfo = ([u8; 8], u32, Option<u64>);

/// Tree of deleted accounts whose names are reserved: name → (id, when).
const DELETED_USERS: &str = "deleted_users";
/// Prefix of the name a freed account's record is kept under: not a valid
/// user name, so nobody can register or look it up.
const FREED: &str = "#freed.";

/// Most link codes a user may have outstanding (asked for, not yet used,
/// not expired); one more is refused (spec §6).
pub const MAX_LINK_CODES: usize = 3;

/// Link codes a user may ask for in a burst (spec §6): enough to link a
/// whole account's devices at once.
pub const LINK_REQUESTS_BURST: u32 = 8;

/// After a burst, a user may ask for one more link code every this long
/// (spec §6).
pub const LINK_REQUEST_REFILL: Duration = Duration::from_secs(600);

/// An invite as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// HMAC-SHA256 of the secret under the server's token key.
    pub mac: [u8; 32],
    /// Registrations left.
    pub uses_left: u32,
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// Unused (it named a link code's account when invites and link codes
    /// shared this record).
    pub user: Option<u32>,
}

/// A link code as stored (tree `link_codes`): the account it joins and the
/// device that asked for it, which it dies with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRecord {
    /// HMAC-SHA256 of the secret under the server's token key.
    pub mac: [u8; 32],
    /// When it stops working.
    pub expires_ms: u64,
    /// The account it joins.
    pub user: u32,
    /// The device that asked for it.
    pub device: u32,
}

/// Why a registration was refused (an expected outcome, not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// Unknown, used up or expired invite.
    InvalidInvite,
    /// Name not `[a-z0-9_.]{3,32}`.
    InvalidName,
    /// Name in use.
    NameTaken,
    /// This static key already belongs to a device.
    KeyInUse,
}

/// Why a request for a link code was refused (an expected outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRequestError {
    /// The asking device is revoked (or unknown): it gets nothing.
    Revoked,
    /// The account has the most devices allowed.
    DeviceLimit,
    /// The user has [`MAX_LINK_CODES`] outstanding already.
    Outstanding,
    /// The user asked for too many codes lately.
    RateLimited,
}

/// Why a link code was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// Unknown, used or expired code.
    InvalidCode,
    /// The account has the most devices allowed.
    DeviceLimit,
    /// This static key already belongs to a device.
    KeyInUse,
}

struct CachedUser {
    name: Arc<str>,
    record: UserRecord,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    /// Link codes stored for this user, expired ones until swept.
    links: Vec<PendingLink>,
    /// Allowance for new link codes (in memory only).
    link_allowance: Allowance,
}

impl CachedUser {
    fn new(name: Arc<str>, record: UserRecord) -> CachedUser {
        CachedUser {
            name,
            record,
            devices: BTreeMap::new(),
            links: Vec::new(),
            link_allowance: Allowance::default(),
        }
    }

    fn is_current(&self, device: DeviceId) -> bool {
        self.devices.get(&device).is_some_and(|r| r.revoked_ms.is_none())
    }

    fn current_count(&self) -> usize {
        self.devices.values().filter(|r| r.revoked_ms.is_none()).count()
    }
}

/// A link code in the index.
#[derive(Debug, Clone, Copy)]
struct PendingLink {
    id: [u8; 8],
    device: DeviceId,
    expires_ms: u64,
}

/// A token bucket for link requests on the wall clock: `credit_ms` of
/// waiting banked, up to [`LINK_REQUESTS_BURST`] refills; a request spends
/// one [`LINK_REQUEST_REFILL`]. A clock that steps back refills nothing
/// until it passes `last_ms` again.
#[derive(Debug, Clone, Copy, Default)]
struct Allowance {
    /// `None`: untouched, full.
    state: Option<(u64, u64)>,
}

impl Allowance {
    fn take(&mut self, now_ms: u64) -> bool {
        let cost = LINK_REQUEST_REFILL.as_millis() as u64;
        let cap = cost * u64::from(LINK_REQUESTS_BURST);
        let (credit, last) = self.state.unwrap_or((cap, now_ms));
        let credit = credit.saturating_add(now_ms.saturating_sub(last)).min(cap);
        let last = last.max(now_ms);
        if credit < cost {
            self.state = Some((credit, last));
            return false;
        }
        self.state = Some((credit - cost, last));
        true
    }
}

#[derive(Default)]
struct Index {
    by_name: HashMap<Arc<str>, UserId>,
    /// Names of deleted accounts, reserved until the retention period
    /// passed: the account and when it was deleted.
    reserved: HashMap<Arc<str>, (UserId, u64)>,
    users: HashMap<UserId, CachedUser>,
    /// Every device's static key, revoked ones too.
    by_key: HashMap<PublicKey, DeviceKey>,
    /// One-time keys held, for each device that published an identity.
    one_time: HashMap<DeviceKey, u32>,
    /// Users who show their presence to nobody (spec §5.6, `SetLastSeen`).
    hidden: std::collections::HashSet<UserId>,
    /// Devices whose last-seen time in memory is not written yet.
    seen_unwritten: std::collections::HashSet<DeviceKey>,
}

/// Accounts and codes, with an in-memory index.
pub struct Accounts {
    meta: sled::Tree,
    users: sled::Tree,
    deleted: sled::Tree,
    devices: sled::Tree,
    keys: sled::Tree,
    invites: sled::Tree,
    links: sled::Tree,
    /// Users who hide their presence: user id (4 bytes BE) → empty. A tree
    /// of its own, so that no older record changes format; a database
    /// without it has no one hiding.
    hidden: sled::Tree,
    token_key: hmac::Key,
    index: RwLock<Index>,
    rng: SystemRandom,
}

fn device_key_bytes(d: DeviceKey) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&d.user.0.to_be_bytes());
    k[4..].copy_from_slice(&d.device.0.to_be_bytes());
    k
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes store records into a Vec")
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

impl Accounts {
    pub(super) fn load(db: &sled::Db) -> Result<Accounts, StoreError> {
        let meta = db.open_tree("meta")?;
        let users = db.open_tree("users")?;
        let devices = db.open_tree("devices")?;
        let rng = SystemRandom::new();
        let token_key = match meta.get("token_key")? {
            Some(k) => k.to_vec(),
            None => {
                let mut k = vec![0u8; 32];
                rng.fill(&mut k).map_err(|_| StoreError::Corrupt("randomness"))?;
                meta.insert("token_key", k.as_slice())?;
                db.flush()?;
                k
            }
        };
        let mut index = Index::default();
        for item in users.iter() {
            let (name, value) = item?;
            let record: UserRecord = decode(&value, "users")?;
            let name: Arc<str> = std::str::from_utf8(&name)
                .map_err(|_| StoreError::Corrupt("users"))?
                .into();
            // A freed account's record, kept under a name nobody can
            // register, so that its devices' keys stay known as revoked.
            if !name.starts_with(FREED) {
                index.by_name.insert(name.clone(), UserId(record.id));
            }
            index.users.insert(UserId(record.id), CachedUser::new(name, record));
        }
        let deleted = db.open_tree(DELETED_USERS)?;
        for item in deleted.iter() {
            let (name, value) = item?;
            let (id, when): (u32, u64) = decode(&value, DELETED_USERS)?;
            let name = std::str::from_utf8(&name).map_err(|_| StoreError::Corrupt(DELETED_USERS))?;
            if let Some((name, _)) = index.by_name.remove_entry(name) {
                index.reserved.insert(name, (UserId(id), when));
            }
        }
        for item in devices.iter() {
            let (key, value) = item?;
            let (Some(user), Some(device)) = (be_u32(&key), key.get(4..).and_then(be_u32)) else {
                return Err(StoreError::Corrupt("devices"));
            };
            let record: DeviceRecord = decode(&value, "devices")?;
            let u = index
                .users
                .get_mut(&UserId(user))
                .ok_or(StoreError::Corrupt("devices"))?;
            index.by_key.insert(
                record.key,
                DeviceKey {
                    user: UserId(user),
                    device: DeviceId(device),
                },
            );
            u.devices.insert(DeviceId(device), record);
        }
        // Link codes were once kept in `links`, bound to the account only:
        // such a code may have been asked for by a device revoked since, so
        // none is trusted (they lived 10 minutes anyway).
        if db.drop_tree("links")? {
            log::info!("dropped the link codes of an older version; ask for new ones");
        }
        let links = db.open_tree("link_codes")?;
        for item in links.iter() {
            let (id, value) = item?;
            let record: LinkRecord = decode(&value, "link_codes")?;
            let id: [u8; 8] = id.as_ref().try_into().map_err(|_| StoreError::Corrupt("link_codes"))?;
            let u = index
                .users
                .get_mut(&UserId(record.user))
                .ok_or(StoreError::Corrupt("link_codes"))?;
            u.links.push(PendingLink {
                id,
                device: DeviceId(record.device),
                expires_ms: record.expires_ms,
            });
        }
        let hidden = db.open_tree("hidden_presence")?;
        for item in hidden.iter() {
            let (key, _) = item?;
            let user = be_u32(&key).ok_or(StoreError::Corrupt("hidden_presence"))?;
            index.hidden.insert(UserId(user));
        }
        Ok(Accounts {
            meta,
            users,
            deleted,
            devices,
            keys: db.open_tree("keys")?,
            invites: db.open_tree("invites")?,
            links,
            hidden,
            token_key: hmac::Key::new(hmac::HMAC_SHA256, &token_key),
            index: RwLock::new(index),
            rng,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Who a Noise static key belongs to, from memory.
    pub fn identify(&self, key: &PublicKey) -> Identity {
        let index = self.read();
        let Some(&d) = index.by_key.get(key) else {
            return Identity::Unregistered;
        };
        let record = index.users.get(&d.user).and_then(|u| u.devices.get(&d.device));
        match record {
            Some(r) if r.revoked_ms.is_none() => Identity::Device(d),
            _ => Identity::Revoked,
        }
    }

    /// How many one-time keys a device holds, if it published an
    /// identity.
    pub fn one_time_keys(&self, d: DeviceKey) -> Option<u32> {
        self.read().one_time.get(&d).copied()
    }

    /// Records a device's one-time key count (`None`: no identity).
    pub(super) fn set_one_time_keys(&self, d: DeviceKey, count: Option<u32>) {
        let mut index = self.write();
        match count {
            Some(n) => index.one_time.insert(d, n),
            None => index.one_time.remove(&d),
        };
    }

    /// Whether a user shows its presence to nobody (spec §5.6).
    pub fn hides_presence(&self, user: UserId) -> bool {
        self.read().hidden.contains(&user)
    }

    /// Records who may see a user's presence: everyone, or nobody (spec
    /// §5.6, `SetLastSeen`). Flushed with the batch it runs in.
    ///
    /// # Errors
    /// On a database failure.
    pub fn set_last_seen(&self, user: UserId, everyone: bool) -> Result<(), StoreError> {
        let mut index = self.write();
        let key = user.0.to_be_bytes();
        if everyone {
            self.hidden.remove(key)?;
            index.hidden.remove(&user);
        } else {
            self.hidden.insert(key, &[][..])?;
            index.hidden.insert(user);
        }
        Ok(())
    }

    /// A user's id by name.
    pub fn user_id(&self, name: &str) -> Option<UserId> {
        self.read().by_name.get(name).copied()
    }

    /// A user's name by id.
    pub fn user_name(&self, user: UserId) -> Option<Arc<str>> {
        self.read().users.get(&user).map(|u| u.name.clone())
    }

    /// Appends a user's current (unrevoked) devices, ascending, to `out`.
    /// Returns false if there is no such user.
    pub fn current_devices(&self, user: UserId, out: &mut Vec<DeviceId>) -> bool {
        let index = self.read();
        let Some(u) = index.users.get(&user) else { return false };
        out.extend(
            u.devices
                .iter()
                .filter(|(_, r)| r.revoked_ms.is_none())
                .map(|(d, _)| *d),
        );
        true
    }

    /// Appends every device a user ever had, revoked ones included,
    /// ascending, to `out`.
    pub fn all_devices(&self, user: UserId, out: &mut Vec<DeviceId>) {
        if let Some(u) = self.read().users.get(&user) {
            out.extend(u.devices.keys().copied());
        }
    }

    /// Whether this device exists and is not revoked.
    pub fn is_current(&self, d: DeviceKey) -> bool {
        self.read().users.get(&d.user).is_some_and(|u| u.is_current(d.device))
    }

    /// A user's current devices with their details.
    pub fn device_infos(&self, user: UserId) -> Vec<DeviceInfo> {
        let index = self.read();
        let Some(u) = index.users.get(&user) else {
            return Vec::new();
        };
        u.devices
            .iter()
            .filter(|(_, r)| r.revoked_ms.is_none())
            .map(|(d, r)| DeviceInfo {
                device: *d,
                created_ms: r.created_ms,
                last_seen_ms: r.last_seen_ms,
            })
            .collect()
    }

    /// Every user: name, id, current device count; by name. Deleted
    /// accounts are not among them (see [`Accounts::reserved_names`]).
    pub fn users(&self) -> Vec<(Arc<str>, UserId, usize)> {
        let index = self.read();
        let mut all: Vec<_> = index
            .users
            .iter()
            .filter(|(_, u)| index.by_name.contains_key(&u.name))
            .map(|(id, u)| {
                (
                    u.name.clone(),
                    *id,
                    u.devices.values().filter(|r| r.revoked_ms.is_none()).count(),
                )
            })
            .collect();
        all.sort();
        all
    }

    fn new_token(&self) -> Result<Token, StoreError> {
        let mut t = Token {
            id: [0; 8],
            secret: [0; 16],
        };
        self.rng
            .fill(&mut t.id)
            .map_err(|_| StoreError::Corrupt("randomness"))?;
        self.rng
            .fill(&mut t.secret)
            .map_err(|_| StoreError::Corrupt("randomness"))?;
        Ok(t)
    }

    fn mac(&self, t: &Token) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.token_key);
        ctx.update(&t.id);
        ctx.update(&t.secret);
        let mut mac = [0u8; 32];
        mac.copy_from_slice(ctx.sign().as_ref());
        mac
    }

    fn mac_matches(&self, t: &Token, mac: &[u8; 32]) -> bool {
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&t.id);
        msg[8..].copy_from_slice(&t.secret);
        hmac::verify(&self.token_key, &msg, mac).is_ok()
    }

    fn verify(&self, t: &Token, record: &TokenRecord, now_ms: u64) -> bool {
        self.mac_matches(t, &record.mac) && record.uses_left > 0 && record.expires_ms.is_none_or(|e| now_ms < e)
    }

    /// Creates an invite for `uses` registrations. The caller flushes.
    ///
    /// # Errors
    /// On a database failure.
    pub fn create_invite(&self, uses: u32, expires_ms: Option<u64>) -> Result<Token, StoreError> {
        let t = self.new_token()?;
        let record = TokenRecord {
            mac: self.mac(&t),
            uses_left: uses.max(1),
            expires_ms,
            user: None,
        };
        self.invites.insert(t.id, encode(&record))?;
        Ok(t)
    }

    /// Makes a one-use link code for a new device of `by`'s account, valid
    /// for `ttl`, bound to `by`: it stops working when `by` is revoked
    /// (spec §5.2 `RequestLink`, §11). Refused when `by` is not a current
    /// device, when the account has [`MAX_DEVICES_PER_USER`] devices, when
    /// the user has [`MAX_LINK_CODES`] unexpired codes outstanding, or
    /// beyond the user's rate ([`LINK_REQUESTS_BURST`],
    /// [`LINK_REQUEST_REFILL`]); a refusal uses up nothing. The caller makes
    /// it durable before handing the code out. Returns the code and when it
    /// expires.
    ///
    /// # Errors
    /// On a database failure; refusals are the inner result.
    pub fn request_link(
        &self,
        by: DeviceKey,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Result<(Token, u64), LinkRequestError>, StoreError> {
        let mut index = self.write();
        let Some(u) = index.users.get_mut(&by.user).filter(|u| u.is_current(by.device)) else {
            return Ok(Err(LinkRequestError::Revoked));
        };
        if u.current_count() >= MAX_DEVICES_PER_USER {
            return Ok(Err(LinkRequestError::DeviceLimit));
        }
        // Expired codes do not count, and go with this write.
        let mut batch = sled::Batch::default();
        let mut outstanding = 0;
        for l in &u.links {
            if l.expires_ms <= now_ms {
                batch.remove(&l.id);
            } else {
                outstanding += 1;
            }
        }
        if outstanding >= MAX_LINK_CODES {
            return Ok(Err(LinkRequestError::Outstanding));
        }
        if !u.link_allowance.take(now_ms) {
            return Ok(Err(LinkRequestError::RateLimited));
        }
        let t = self.new_token()?;
        let expires_ms = now_ms.saturating_add(ttl.as_millis() as u64);
        let record = LinkRecord {
            mac: self.mac(&t),
            expires_ms,
            user: by.user.0,
            device: by.device.0,
        };
        batch.insert(&t.id, encode(&record));
        self.links.apply_batch(batch)?;
        u.links.retain(|l| l.expires_ms > now_ms);
        u.links.push(PendingLink {
            id: t.id,
            device: by.device,
            expires_ms,
        });
        Ok(Ok((t, expires_ms)))
    }

    /// The link codes a user has outstanding (not expired), for tests and
    /// operators.
    pub fn outstanding_links(&self, user: UserId, now_ms: u64) -> usize {
        self.read()
            .users
            .get(&user)
            .map_or(0, |u| u.links.iter().filter(|l| l.expires_ms > now_ms).count())
    }

    /// How many invites and link codes are stored, expired ones not yet
    /// swept included (for operators and tests).
    pub fn stored_codes(&self) -> (usize, usize) {
        (self.invites.len(), self.links.len())
    }

    /// Removes expired link codes and expired invites (the retention
    /// sweeper calls it), so that neither piles up. Returns how many of
    /// each it removed.
    ///
    /// # Errors
    /// On a database failure.
    pub fn sweep_codes(&self, now_ms: u64) -> Result<(usize, usize), StoreError> {
        let mut links = 0;
        {
            let mut index = self.write();
            let mut batch = sled::Batch::default();
            for u in index.users.values_mut() {
                u.links.retain(|l| {
                    let keep = l.expires_ms > now_ms;
                    if !keep {
                        batch.remove(&l.id);
                        links += 1;
                    }
                    keep
                });
            }
            if links > 0 {
                self.links.apply_batch(batch)?;
            }
        }
        // An expired invite can no longer be used, so a registration
        // running meanwhile cannot be disturbed by its removal.
        let mut invites = 0;
        for item in self.invites.iter() {
            let (id, value) = item?;
            let record: TokenRecord = decode(&value, "invites")?;
            if record.expires_ms.is_some_and(|e| e <= now_ms) {
                self.invites.remove(id)?;
                invites += 1;
            }
        }
        Ok((invites, links))
    }

    /// Takes one use of a token in `tree`; `None` if it is not valid.
    fn take_use(&self, tree: &TransactionalTree, t: &Token, now_ms: u64) -> TxResult<Option<TokenRecord>> {
        let Some(bytes) = tree.get(t.id)? else { return Ok(None) };
        let mut record: TokenRecord = match decode(&bytes, "tokens") {
            Ok(r) => r,
            Err(e) => return abort(e),
        };
        if !self.verify(t, &record, now_ms) {
            return Ok(None);
        }
        record.uses_left -= 1;
        if record.uses_left == 0 {
            tree.remove(&t.id)?;
        } else {
            tree.insert(&t.id, encode(&record))?;
        }
        Ok(Some(record))
    }

    /// Creates an account `name` whose first device has static key `key`,
    /// using one use of `invite`. The caller makes it durable before
    /// telling the device.
    ///
    /// # Errors
    /// On a database failure; refusals are the inner result.
    pub fn register(
        &self,
        invite: &Token,
        name: &str,
        key: &PublicKey,
        now_ms: u64,
    ) -> Result<Result<DeviceKey, RegisterError>, StoreError> {
        if !valid_user_name(name) {
            return Ok(Err(RegisterError::InvalidName));
        }
        let mut index = self.write();
        if index.by_name.contains_key(name) || index.reserved.contains_key(name) {
            // Check the invite first so that a bad invite cannot probe names.
            let t = &self.invites;
            let valid = match t.get(invite.id)? {
                Some(b) => self.verify(invite, &decode(&b, "invites")?, now_ms),
                None => false,
            };
            return Ok(Err(if valid {
                RegisterError::NameTaken
            } else {
                RegisterError::InvalidInvite
            }));
        }
        let device = DeviceRecord {
            key: *key,
            created_ms: now_ms,
            last_seen_ms: now_ms,
            revoked_ms: None,
        };
        let user_record = (&self.meta, &self.users, &self.devices, &self.keys, &self.invites).transaction(
            |(meta, users, devices, keys, invites)| {
                // spec §5.2 `Register`: a refused registration never uses
                // up its invite, so the key is checked before the use is
                // taken (and after the invite, so the order of the errors
                // stays the spec's).
                if keys.get(key)?.is_some() {
                    let valid = match invites.get(invite.id)? {
                        Some(b) => match decode(&b, "invites") {
                            Ok(r) => self.verify(invite, &r, now_ms),
                            Err(e) => return abort(e),
                        },
                        None => false,
                    };
                    return Ok(Err(if valid {
                        RegisterError::KeyInUse
                    } else {
                        RegisterError::InvalidInvite
                    }));
                }
                if self.take_use(invites, invite, now_ms)?.is_none() {
                    return Ok(Err(RegisterError::InvalidInvite));
                }
                let id = match meta.get("next_user")? {
                    Some(b) => be_u32(&b).unwrap_or(1),
                    None => 1,
                };
                meta.insert("next_user", &(id + 1).to_be_bytes())?;
                let record = UserRecord {
                    id,
                    created_ms: now_ms,
                    next_device: 2,
                };
                users.insert(name.as_bytes(), encode(&record))?;
                let d = DeviceKey {
                    user: UserId(id),
                    device: DeviceId(1),
                };
                devices.insert(&device_key_bytes(d), encode(&device))?;
                keys.insert(key, &device_key_bytes(d))?;
                Ok(Ok(record))
            },
        )?;
        let record = match user_record {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let id = UserId(record.id);
        let name: Arc<str> = name.into();
        index.by_name.insert(name.clone(), id);
        let mut cached = CachedUser::new(name, record);
        cached.devices.insert(DeviceId(1), device);
        index.users.insert(id, cached);
        index.by_key.insert(
            *key,
            DeviceKey {
                user: id,
                device: DeviceId(1),
            },
        );
        Ok(Ok(DeviceKey {
            user: id,
            device: DeviceId(1),
        }))
    }

    /// Adds a device with static key `key` to the account a link code was
    /// made for, if the device that asked for the code is still current.
    /// The caller makes it durable before telling the device.
    ///
    /// # Errors
    /// On a database failure; refusals are the inner result.
    pub fn redeem_link(
        &self,
        code: &Token,
        key: &PublicKey,
        now_ms: u64,
    ) -> Result<Result<DeviceKey, LinkError>, StoreError> {
        let mut index = self.write();
        let device = DeviceRecord {
            key: *key,
            created_ms: now_ms,
            last_seen_ms: now_ms,
            revoked_ms: None,
        };
        let outcome =
            (&self.users, &self.devices, &self.keys, &self.links).transaction(|(users, devices, keys, links)| {
                let Some(bytes) = links.get(code.id)? else {
                    return Ok(Err(LinkError::InvalidCode));
                };
                let link: LinkRecord = match decode(&bytes, "link_codes") {
                    Ok(r) => r,
                    Err(e) => return abort(e),
                };
                if !self.mac_matches(code, &link.mac) || now_ms >= link.expires_ms {
                    return Ok(Err(LinkError::InvalidCode));
                }
                let user = UserId(link.user);
                let Some(cached) = index.users.get(&user) else {
                    return Ok(Err(LinkError::InvalidCode));
                };
                // A revoke deletes its device's codes; this only restates
                // that a code dies with the device that asked for it.
                if !cached.is_current(DeviceId(link.device)) {
                    return Ok(Err(LinkError::InvalidCode));
                }
                if keys.get(key)?.is_some() {
                    return Ok(Err(LinkError::KeyInUse));
                }
                if cached.current_count() >= MAX_DEVICES_PER_USER {
                    return Ok(Err(LinkError::DeviceLimit));
                }
                links.remove(&code.id)?;
                let mut record = cached.record.clone();
                let d = DeviceKey {
                    user,
                    device: DeviceId(record.next_device),
                };
                record.next_device += 1;
                users.insert(cached.name.as_bytes(), encode(&record))?;
                devices.insert(&device_key_bytes(d), encode(&device))?;
                keys.insert(key, &device_key_bytes(d))?;
                Ok(Ok((d, record)))
            })?;
        let (d, record) = match outcome {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(u) = index.users.get_mut(&d.user) {
            u.record = record;
            u.devices.insert(d.device, device);
            u.links.retain(|l| l.id != code.id);
        }
        index.by_key.insert(*key, d);
        Ok(Ok(d))
    }

    /// Revokes a device: its key is refused from now on (and kept, so that
    /// it can be told), and every link code it asked for is deleted in the
    /// same transaction. Returns false if there is no such current device.
    /// The caller deletes its queue and closes its connection.
    ///
    /// # Errors
    /// On a database failure.
    pub fn revoke(&self, d: DeviceKey, now_ms: u64) -> Result<bool, StoreError> {
        let mut index = self.write();
        let Some(u) = index.users.get_mut(&d.user) else {
            return Ok(false);
        };
        let Some(record) = u.devices.get(&d.device).filter(|r| r.revoked_ms.is_none()) else {
            return Ok(false);
        };
        let mut updated = record.clone();
        updated.revoked_ms = Some(now_ms);
        let codes: Vec<[u8; 8]> = u.links.iter().filter(|l| l.device == d.device).map(|l| l.id).collect();
        let bytes = encode(&updated);
        (&self.devices, &self.links).transaction(|(devices, links)| {
            devices.insert(&device_key_bytes(d), bytes.as_slice())?;
            for id in &codes {
                links.remove(id)?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        if !codes.is_empty() {
            log::debug!("{d}: {} link codes deleted with the device", codes.len());
        }
        u.links.retain(|l| l.device != d.device);
        u.devices.insert(d.device, updated);
        Ok(true)
    }

    /// Every invite stored: its id, uses left, and expiry (`None`:
    /// never), expired ones not yet swept included; by id.
    ///
    /// # Errors
    /// On a database failure or a corrupt record.
    pub fn invites(&self) -> Result<Vec<InviteInfo>, StoreError> {
        let mut out = Vec::new();
        for item in self.invites.iter() {
            let (id, value) = item?;
            let record: TokenRecord = decode(&value, "invites")?;
            let id: [u8; 8] = id.as_ref().try_into().map_err(|_| StoreError::Corrupt("invites"))?;
            out.push((id, record.uses_left, record.expires_ms));
        }
        Ok(out)
    }

    /// Deletes an invite; false if there is no such invite. The caller
    /// flushes.
    ///
    /// # Errors
    /// On a database failure.
    pub fn revoke_invite(&self, id: [u8; 8]) -> Result<bool, StoreError> {
        Ok(self.invites.remove(id)?.is_some())
    }

    /// Marks account `user` deleted at `now_ms` (its devices must be
    /// revoked already): its name no longer finds it (`UNKNOWN_USER`),
    /// and nobody can register the name until [`Accounts::free_names`]
    /// frees it after the retention period, so nobody new gets messages
    /// meant for the old owner. Returns false if there is no such user.
    ///
    /// # Errors
    /// On a database failure.
    pub fn delete_user(&self, user: UserId, now_ms: u64) -> Result<bool, StoreError> {
        let mut index = self.write();
        let Some(name) = index.users.get(&user).map(|u| u.name.clone()) else {
            return Ok(false);
        };
        if index.by_name.get(&name) != Some(&user) {
            return Ok(false);
        }
        self.deleted.insert(name.as_bytes(), encode(&(user.0, now_ms)))?;
        index.by_name.remove(&name);
        index.reserved.insert(name, (user, now_ms));
        Ok(true)
    }

    /// Deleted accounts whose names are still reserved: name, when deleted.
    pub fn reserved_names(&self) -> Vec<(Arc<str>, u64)> {
        let mut all: Vec<_> = self.read().reserved.iter().map(|(n, (_, t))| (n.clone(), *t)).collect();
        all.sort();
        all
    }

    /// Frees the names of accounts deleted before `cutoff_ms` (the
    /// retention sweeper calls it): each account's record moves to a name
    /// nobody can register, its devices' keys stay known as revoked, and
    /// the name can be registered again. Returns how many were freed.
    ///
    /// # Errors
    /// On a database failure.
    pub fn free_names(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut index = self.write();
        let due: Vec<(Arc<str>, UserId)> = index
            .reserved
            .iter()
            .filter(|(_, (_, t))| *t < cutoff_ms)
            .map(|(n, (id, _))| (n.clone(), *id))
            .collect();
        for (name, id) in &due {
            let freed: Arc<str> = format!("{FREED}{}", id.0).into();
            (&self.users, &self.deleted).transaction(|(users, deleted)| {
                if let Some(v) = users.remove(name.as_bytes())? {
                    users.insert(freed.as_bytes(), v)?;
                }
                deleted.remove(name.as_bytes())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
            index.reserved.remove(name);
            if let Some(u) = index.users.get_mut(id) {
                u.name = freed;
            }
        }
        Ok(due.len())
    }

    /// Records that a device authenticated or went offline. Not flushed on
    /// its own: losing it in a crash only makes "last seen" older.
    ///
    /// # Errors
    /// On a database failure.
    pub fn touch(&self, d: DeviceKey, now_ms: u64, persist: bool) -> Result<bool, StoreError> {
        let mut index = self.write();
        let Some(record) = index.users.get_mut(&d.user).and_then(|u| u.devices.get_mut(&d.device)) else {
            return Ok(false);
        };
        record.last_seen_ms = now_ms;
        if !persist {
            // Kept in memory only: a write per connection made sled keep a
            // new version of a page per device (measured: 420 B of heap
            // per idle connection at 10,000 devices).
            index.seen_unwritten.insert(d);
            return Ok(false);
        }
        let value = encode(&*record);
        index.seen_unwritten.remove(&d);
        self.devices.insert(device_key_bytes(d), value)?;
        Ok(true)
    }

    /// Writes when every device seen since its last write was last seen,
    /// as of `now_ms` (at a clean stop: the devices still online).
    ///
    /// # Errors
    /// On a database failure.
    pub fn persist_seen(&self, now_ms: u64) -> Result<(), StoreError> {
        let mut index = self.write();
        let seen = std::mem::take(&mut index.seen_unwritten);
        let mut batch = sled::Batch::default();
        for d in seen {
            if let Some(record) = index.users.get_mut(&d.user).and_then(|u| u.devices.get_mut(&d.device)) {
                record.last_seen_ms = record.last_seen_ms.max(now_ms);
                batch.insert(&device_key_bytes(d)[..], encode(&*record));
            }
        }
        self.devices.apply_batch(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
