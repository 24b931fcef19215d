//! Accounts, devices, device keys, invites and link codes.
//!
//! Every change runs in one sled transaction over the trees it touches and
//! then updates an in-memory index (names, devices per user) under a write
//! lock held across both, so readers never see the index ahead of or behind
//! the database. Invite and link secrets are stored only as an HMAC under a
//! key kept in `meta`, and checked with `ring::hmac::verify` (constant
//! time).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

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
    /// When it last authenticated.
    pub last_seen_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

/// An invite or a link code as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// HMAC-SHA256 of the secret under the server's token key.
    pub mac: [u8; 32],
    /// Registrations left.
    pub uses_left: u32,
    /// When it stops working, if ever.
    pub expires_ms: Option<u64>,
    /// For a link code: the account it joins.
    pub user: Option<u32>,
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
}

#[derive(Default)]
struct Index {
    by_name: HashMap<Arc<str>, UserId>,
    users: HashMap<UserId, CachedUser>,
    /// Every device's static key, revoked ones too.
    by_key: HashMap<PublicKey, DeviceKey>,
    /// One-time keys held, for each device that published an identity.
    one_time: HashMap<DeviceKey, u32>,
}

/// Accounts and codes, with an in-memory index.
pub struct Accounts {
    meta: sled::Tree,
    users: sled::Tree,
    devices: sled::Tree,
    keys: sled::Tree,
    invites: sled::Tree,
    links: sled::Tree,
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
            index.by_name.insert(name.clone(), UserId(record.id));
            index.users.insert(
                UserId(record.id),
                CachedUser {
                    name,
                    record,
                    devices: BTreeMap::new(),
                },
            );
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
        Ok(Accounts {
            meta,
            users,
            devices,
            keys: db.open_tree("keys")?,
            invites: db.open_tree("invites")?,
            links: db.open_tree("links")?,
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
        let index = self.read();
        index
            .users
            .get(&d.user)
            .and_then(|u| u.devices.get(&d.device))
            .is_some_and(|r| r.revoked_ms.is_none())
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

    /// Every user: name, id, current device count; by name.
    pub fn users(&self) -> Vec<(Arc<str>, UserId, usize)> {
        let index = self.read();
        let mut all: Vec<_> = index
            .users
            .iter()
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

    fn verify(&self, t: &Token, record: &TokenRecord, now_ms: u64) -> bool {
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&t.id);
        msg[8..].copy_from_slice(&t.secret);
        hmac::verify(&self.token_key, &msg, &record.mac).is_ok()
            && record.uses_left > 0
            && record.expires_ms.is_none_or(|e| now_ms < e)
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

    /// Creates a one-use link code for `user`, valid until `expires_ms`.
    ///
    /// # Errors
    /// On a database failure.
    pub fn create_link(&self, user: UserId, expires_ms: u64) -> Result<Token, StoreError> {
        let t = self.new_token()?;
        let record = TokenRecord {
            mac: self.mac(&t),
            uses_left: 1,
            expires_ms: Some(expires_ms),
            user: Some(user.0),
        };
        self.links.insert(t.id, encode(&record))?;
        Ok(t)
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
        if index.by_name.contains_key(name) {
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
                if self.take_use(invites, invite, now_ms)?.is_none() {
                    return Ok(Err(RegisterError::InvalidInvite));
                }
                if keys.get(key)?.is_some() {
                    return Ok(Err(RegisterError::KeyInUse));
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
        let mut devices = BTreeMap::new();
        devices.insert(DeviceId(1), device);
        index.users.insert(id, CachedUser { name, record, devices });
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
    /// made for. The caller makes it durable before telling the device.
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
                let Some(link) = self.take_use(links, code, now_ms)? else {
                    return Ok(Err(LinkError::InvalidCode));
                };
                if keys.get(key)?.is_some() {
                    return Ok(Err(LinkError::KeyInUse));
                }
                let Some(user) = link.user.map(UserId) else {
                    return abort(StoreError::Corrupt("links"));
                };
                let Some(cached) = index.users.get(&user) else {
                    return Ok(Err(LinkError::InvalidCode));
                };
                if cached.devices.values().filter(|r| r.revoked_ms.is_none()).count() >= MAX_DEVICES_PER_USER {
                    return Ok(Err(LinkError::DeviceLimit));
                }
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
        }
        index.by_key.insert(*key, d);
        Ok(Ok(d))
    }

    /// Revokes a device: its key is refused from now on. Returns false if
    /// there is no such current device. The caller deletes its queue.
    ///
    /// # Errors
    /// On a database failure.
    pub fn revoke(&self, d: DeviceKey, now_ms: u64) -> Result<bool, StoreError> {
        let mut index = self.write();
        let Some(record) = index.users.get_mut(&d.user).and_then(|u| u.devices.get_mut(&d.device)) else {
            return Ok(false);
        };
        if record.revoked_ms.is_some() {
            return Ok(false);
        }
        let mut updated = record.clone();
        updated.revoked_ms = Some(now_ms);
        self.devices.insert(device_key_bytes(d), encode(&updated))?;
        *record = updated;
        Ok(true)
    }

    /// Records that a device authenticated. Not flushed on its own: losing
    /// it in a crash only makes "last seen" older.
    ///
    /// # Errors
    /// On a database failure.
    pub fn touch(&self, d: DeviceKey, now_ms: u64) -> Result<(), StoreError> {
        let mut index = self.write();
        let Some(record) = index.users.get_mut(&d.user).and_then(|u| u.devices.get_mut(&d.device)) else {
            return Ok(());
        };
        record.last_seen_ms = now_ms;
        self.devices.insert(device_key_bytes(d), encode(&*record))?;
        Ok(())
    }
}
