//! The device's end-to-end state: its Olm account (vodozemac), its Olm
//! sessions with other devices, what it knows of other devices'
//! identities, and the device lists it encrypts for.
//!
//! Everything lives in the end-to-end records of the profile's database
//! ([`E2eStore`]), so that one transaction can store a received message
//! together with the session state that decrypted it (see
//! [`super::history::History::commit`]).
//! Changes are not written at once: they collect in [`Crypto::take_writes`]
//! and the caller commits them, then flushes, before anything leaves that
//! depends on them (a `Send` made with an advanced ratchet, an `Ack`).
//!
//! Secrets at rest: the account and the sessions are stored as vodozemac
//! pickles, encrypted (AES-256-CBC and HMAC-SHA-256, vodozemac's pickle
//! format) with a 32-byte key derived by Argon2id from the profile's
//! passphrase (see [`super::secret`]), with a random salt kept in the
//! `meta` record. A profile made without a passphrase uses an all-zero key,
//! which protects nothing (the command line says so once, when the profile
//! is made); setting a passphrase later re-encrypts the keys with it. The
//! history itself is not encrypted here.
//!
//! Trust: keys claimed from the server are used only if the device's
//! Ed25519 identity signed its Curve25519 identity and the one-time key
//! ([`crate::keys`]). A device's identity is remembered the first time it
//! is seen; a different one later for the same device is reported as
//! [`Notice::IdentityChanged`] and then used (users compare safety numbers,
//! [`safety_number`], to rule out a key-swapping server).
//!
//! What it does not do: talk to the server or decide when to (that is
//! [`super::client`] and the operations), or know how its records are
//! stored.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use zeroize::Zeroizing;

use super::Error;
use super::content::{Envelope, OlmKind};
use super::history::{E2eStore, Writes};
use super::secret::{Kdf, Passphrase, PassphraseError};
use crate::keys;
use crate::wire::{DeviceAddr, DeviceId, DeviceKeys, IdentityKeys, PublishKeys, Signature, SignedKey};

/// One-time keys a device keeps on the server after a top-up.
pub const ONE_TIME_TARGET: u32 = 50;
/// Below this many one-time keys on the server, the device tops up (the
/// server tells it with `KeyCount`, spec §5.4).
pub const LOW_WATER: u32 = 10;
/// A fallback key is replaced after this long (the previous one is kept
/// until the next replacement, for pre-key messages still on their way).
pub const FALLBACK_ROTATE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Olm sessions kept per device pair (the most recently used first).
pub const MAX_SESSIONS_PER_DEVICE: usize = 4;
/// At most one session reset is sent to a device in this time.
pub const RESET_INTERVAL_MS: u64 = 60_000;
/// Most ephemeral bodies (typing) written to a device between two messages
/// written to it. Each is a message key of the sending chain that the
/// receiving session skips (it decrypts ephemerals on a copy, see
/// [`Crypto::decrypt_ephemeral`]); vodozemac skips at most 2,000 in one
/// chain, so this leaves room for a few session switches.
pub const EPHEMERAL_RUN: u32 = 500;

/// Something the user should hear about a contact's devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// A user one already talks to has a device not seen before.
    NewDevice {
        /// Whose.
        user: String,
        /// Which.
        device: DeviceId,
    },
    /// A device is gone (revoked); it gets no more messages.
    DeviceRemoved {
        /// Whose.
        user: String,
        /// Which.
        device: DeviceId,
    },
    /// A device already known now presents a different identity key: a
    /// warning, since the server could be substituting keys.
    IdentityChanged {
        /// Whose.
        user: String,
        /// Which.
        device: DeviceId,
    },
    /// The server offered keys for a device whose signatures do not verify;
    /// they were not used.
    BadSignature {
        /// Whose.
        user: String,
        /// Which.
        device: DeviceId,
    },
}

impl Notice {
    /// Whether this is a warning (as opposed to news).
    pub fn is_warning(&self) -> bool {
        matches!(self, Notice::IdentityChanged { .. } | Notice::BadSignature { .. })
    }

    /// A short name for scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::NewDevice { .. } => "new_device",
            Notice::DeviceRemoved { .. } => "device_removed",
            Notice::IdentityChanged { .. } => "identity_changed",
            Notice::BadSignature { .. } => "bad_signature",
        }
    }

    /// The user and device it is about.
    pub fn about(&self) -> (&str, DeviceId) {
        match self {
            Notice::NewDevice { user, device }
            | Notice::DeviceRemoved { user, device }
            | Notice::IdentityChanged { user, device }
            | Notice::BadSignature { user, device } => (user, *device),
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::NewDevice { user, device } => write!(f, "{user} added a device (device {device})"),
            Notice::DeviceRemoved { user, device } => write!(f, "{user} removed a device (device {device})"),
            Notice::IdentityChanged { user, device } => write!(
                f,
                "the identity key of {user}'s device {device} changed; if {user} did not reinstall it, \
                 the server may be intercepting: compare safety numbers again (tidings verify {user})"
            ),
            Notice::BadSignature { user, device } => write!(
                f,
                "the server offered keys for {user}'s device {device} that its identity did not sign; \
                 they were not used"
            ),
        }
    }
}

/// Why a body could not be decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// Not an envelope or Olm message.
    #[error("not an Olm message")]
    Malformed,
    /// A normal message, and no session with its device opens it.
    #[error("no session opens it")]
    NoSession,
    /// The Olm session (or the account, for a new session) refused it.
    #[error("Olm refused it")]
    Refused,
}

/// What is known of another device's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    /// Its Curve25519 identity key.
    pub curve25519: [u8; 32],
    /// Its Ed25519 identity key, once seen in a verified claim (a pre-key
    /// message carries only the Curve25519 key).
    pub ed25519: Option<[u8; 32]>,
}

/// The `meta` record; the tag is the version.
#[derive(Serialize, Deserialize)]
enum StoredMeta {
    V1 { kdf: Option<Kdf>, fallback_ms: u64 },
}

#[derive(Serialize, Deserialize)]
struct StoredSession {
    /// The other device's Curve25519 identity key.
    peer: [u8; 32],
    /// The encrypted vodozemac pickle.
    pickle: String,
}

/// A device's sessions record; the tag is the version.
#[derive(Serialize, Deserialize)]
enum StoredSessions {
    V1(Vec<StoredSession>),
}

/// A session in memory.
struct Live {
    peer: [u8; 32],
    session: Session,
}

const META: &[u8] = b"meta";
const ACCOUNT: &[u8] = b"account";

fn device_key(tag: u8, addr: &DeviceAddr) -> Vec<u8> {
    let mut k = Vec::with_capacity(addr.user.len() + 7);
    k.push(tag);
    k.push(0);
    k.extend_from_slice(addr.user.as_bytes());
    k.push(0);
    k.extend_from_slice(&addr.device.0.to_be_bytes());
    k
}

fn user_key(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 2);
    k.extend_from_slice(b"u\0");
    k.extend_from_slice(user.as_bytes());
    k
}

fn damaged(what: &str) -> Error {
    Error::Damaged(format!("end-to-end state: {what}"))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("records always encode")
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|_| damaged(what))
}

fn to_signature(s: vodozemac::Ed25519Signature) -> Signature {
    Signature(s.to_bytes())
}

/// The device's Olm state.
pub struct Crypto {
    pub(super) tree: E2eStore,
    pub(super) key: Zeroizing<[u8; 32]>,
    kdf: Option<Kdf>,
    passphrase: Option<Arc<Passphrase>>,
    fallback_ms: u64,
    account: Option<Account>,
    sessions: HashMap<DeviceAddr, Vec<Live>>,
    pub(super) writes: Writes,
}

impl fmt::Debug for Crypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crypto")
            .field(
                "account",
                &self.account.as_ref().map(|a| a.curve25519_key().to_base64()),
            )
            .field("encrypted", &self.kdf.is_some())
            .finish_non_exhaustive()
    }
}

impl Crypto {
    /// Loads the state from `tree`, decrypting the account with the key
    /// derived from `passphrase` if it was stored encrypted. A plain one is
    /// encrypted with the passphrase when one is given.
    ///
    /// # Errors
    /// [`Error::Passphrase`] if the stored keys need a passphrase and none
    /// or the wrong one is given; store errors; damage.
    pub fn open(tree: E2eStore, passphrase: Option<Arc<Passphrase>>) -> Result<Crypto, Error> {
        let mut c = Crypto {
            tree,
            key: Zeroizing::new([0u8; 32]),
            kdf: None,
            passphrase: passphrase.clone(),
            fallback_ms: 0,
            account: None,
            sessions: HashMap::new(),
            writes: Writes::new(),
        };
        let Some(meta) = c.tree.get(META)? else {
            return Ok(c);
        };
        let StoredMeta::V1 { kdf, fallback_ms } = decode(&meta, "meta")?;
        c.fallback_ms = fallback_ms;
        c.kdf = kdf;
        if let Some(kdf) = &kdf {
            let Some(p) = &passphrase else {
                return Err(Error::Passphrase(PassphraseError::Needed));
            };
            c.key = p.key(kdf)?;
        }
        if let Some(pickle) = c.tree.get(ACCOUNT)? {
            let text = std::str::from_utf8(&pickle).map_err(|_| damaged("account"))?;
            let account = match AccountPickle::from_encrypted(text, &c.key) {
                Ok(p) => Account::from_pickle(p),
                Err(_) if c.kdf.is_some() => {
                    return Err(Error::Passphrase(PassphraseError::Wrong));
                }
                Err(_) => return Err(damaged("account")),
            };
            c.account = Some(account);
            if c.kdf.is_none()
                && let Some(p) = &passphrase
            {
                c.encrypt_with(p)?;
            }
        }
        Ok(c)
    }

    /// Re-encrypts a plain profile's secrets with a passphrase, at once
    /// and durably.
    fn encrypt_with(&mut self, passphrase: &Passphrase) -> Result<(), Error> {
        let kdf = passphrase.kdf()?;
        let key = passphrase.key(&kdf)?;
        let mut batch = Writes::new();
        for (k, v) in self.tree.scan_prefix(b"s\0")? {
            let StoredSessions::V1(list) = decode(&v, "sessions")?;
            let mut out = Vec::with_capacity(list.len());
            for s in list {
                let pickle = SessionPickle::from_encrypted(&s.pickle, &self.key).map_err(|_| damaged("session"))?;
                out.push(StoredSession {
                    peer: s.peer,
                    pickle: pickle.encrypt(&key),
                });
            }
            batch.insert(k, Some(encode(&StoredSessions::V1(out))));
        }
        super::megolm::reencrypt(&self.tree, &self.key, &key, &mut batch)?;
        self.key = key;
        self.kdf = Some(kdf);
        if let Some(a) = &self.account {
            batch.insert(ACCOUNT.to_vec(), Some(a.pickle().encrypt(&self.key).into_bytes()));
        }
        batch.insert(META.to_vec(), Some(self.meta()));
        self.tree.apply(batch)?;
        self.tree.flush()?;
        log::warn!("this profile's end-to-end keys are now encrypted with the passphrase (TIDINGS_PASSPHRASE)");
        Ok(())
    }

    fn meta(&self) -> Vec<u8> {
        encode(&StoredMeta::V1 {
            kdf: self.kdf,
            fallback_ms: self.fallback_ms,
        })
    }

    /// Whether the device has an Olm account yet.
    pub fn has_account(&self) -> bool {
        self.account.is_some()
    }

    /// Whether the account's secrets are encrypted with a passphrase.
    pub fn is_encrypted(&self) -> bool {
        self.kdf.is_some()
    }

    /// Creates the account if there is none (registration, link, or a
    /// profile from before end-to-end encryption). Returns whether it did.
    ///
    /// # Errors
    /// If the system's randomness fails, or the passphrase cannot be used.
    pub fn ensure_account(&mut self) -> Result<bool, Error> {
        if self.account.is_some() {
            return Ok(false);
        }
        if let Some(p) = self.passphrase.clone() {
            let kdf = p.kdf()?;
            self.key = p.key(&kdf)?;
            self.kdf = Some(kdf);
        }
        self.account = Some(Account::new());
        self.write_account();
        self.writes.insert(META.to_vec(), Some(self.meta()));
        Ok(true)
    }

    fn account(&self) -> Result<&Account, Error> {
        self.account.as_ref().ok_or(Error::NoAccount)
    }

    fn write_account(&mut self) {
        if let Some(a) = &self.account {
            let pickle = a.pickle().encrypt(&self.key);
            self.writes.insert(ACCOUNT.to_vec(), Some(pickle.into_bytes()));
        }
    }

    /// This device's signed identity.
    ///
    /// # Errors
    /// [`Error::NoAccount`].
    pub fn identity(&self) -> Result<IdentityKeys, Error> {
        let a = self.account()?;
        let curve25519 = a.curve25519_key().to_bytes();
        let ed25519 = *a.ed25519_key().as_bytes();
        Ok(IdentityKeys {
            curve25519,
            ed25519,
            signature: to_signature(a.sign(keys::identity_message(&curve25519, &ed25519))),
        })
    }

    /// The keys to publish: always the identity (the server accepts the
    /// same one again), the one-time keys not yet published (new ones when
    /// `server_count` is below [`LOW_WATER`], or nothing was ever
    /// published, up to [`ONE_TIME_TARGET`]),
    /// and a new fallback key when the current one is older than
    /// [`FALLBACK_ROTATE_MS`]. `None` if there is nothing new. Call
    /// [`Crypto::mark_published`] once the server answered.
    ///
    /// # Errors
    /// [`Error::NoAccount`].
    pub fn keys_to_publish(&mut self, server_count: Option<u32>, now_ms: u64) -> Result<Option<PublishKeys>, Error> {
        let identity = self.identity()?;
        // Nothing was ever published: the server holds no one-time key.
        let server_count = if self.fallback_ms == 0 {
            Some(server_count.unwrap_or(0))
        } else {
            server_count
        };
        let account = self.account.as_mut().ok_or(Error::NoAccount)?;
        let mut changed = false;
        if let Some(n) = server_count.filter(|n| *n < LOW_WATER) {
            let unpublished = account.one_time_keys().len() as u32;
            let want = ONE_TIME_TARGET.saturating_sub(n + unpublished);
            if want > 0 {
                account.generate_one_time_keys(want as usize);
                changed = true;
            }
        }
        if self.fallback_ms == 0 || now_ms.saturating_sub(self.fallback_ms) >= FALLBACK_ROTATE_MS {
            account.generate_fallback_key();
            self.fallback_ms = now_ms;
            self.writes.insert(META.to_vec(), Some(self.meta()));
            changed = true;
        }
        let account = self.account.as_ref().ok_or(Error::NoAccount)?;
        let mut one_time: Vec<_> = account.one_time_keys().into_iter().collect();
        one_time.sort_by_key(|(id, _)| *id);
        let sign = |k: Curve25519PublicKey| {
            let key = k.to_bytes();
            SignedKey {
                key,
                signature: to_signature(account.sign(keys::one_time_message(&key))),
            }
        };
        let one_time: Vec<SignedKey> = one_time.into_iter().map(|(_, k)| sign(k)).collect();
        let fallback = account.fallback_key().into_values().next().map(sign);
        if changed {
            self.write_account();
        }
        if one_time.is_empty() && fallback.is_none() {
            return Ok(None);
        }
        Ok(Some(PublishKeys {
            identity: Some(identity),
            one_time,
            fallback,
        }))
    }

    /// Whether some keys were made but not yet published.
    pub fn has_unpublished(&self) -> bool {
        self.account
            .as_ref()
            .is_some_and(|a| !a.one_time_keys().is_empty() || !a.fallback_key().is_empty())
    }

    /// Records that the server holds every key made so far.
    pub fn mark_published(&mut self) {
        if let Some(a) = self.account.as_mut() {
            a.mark_keys_as_published();
        }
        self.write_account();
    }

    // ---- device lists and identities ----

    /// The devices of `user` that messages to them are encrypted for (for
    /// this device's own user, the others), if ever learnt.
    ///
    /// # Errors
    /// Store errors.
    pub fn devices(&self, user: &str) -> Result<Option<Vec<DeviceId>>, Error> {
        let key = user_key(user);
        if let Some(w) = self.writes.get(&key) {
            return w.as_deref().map(|v| decode(v, "device list")).transpose();
        }
        self.tree.get(key)?.map(|v| decode(&v, "device list")).transpose()
    }

    /// Sets the device list of `user`.
    pub fn set_devices(&mut self, user: &str, mut devices: Vec<DeviceId>) {
        devices.sort();
        devices.dedup();
        self.writes.insert(user_key(user), Some(encode(&devices)));
    }

    /// What is known of a device's identity.
    ///
    /// # Errors
    /// Store errors.
    pub fn known(&self, addr: &DeviceAddr) -> Result<Option<Known>, Error> {
        let key = device_key(b'i', addr);
        if let Some(w) = self.writes.get(&key) {
            return w.as_deref().map(|v| decode(v, "identity")).transpose();
        }
        self.tree.get(key)?.map(|v| decode(&v, "identity")).transpose()
    }

    fn set_known(&mut self, addr: &DeviceAddr, known: Known) {
        self.writes.insert(device_key(b'i', addr), Some(encode(&known)));
    }

    /// Notes that `addr` presented the Curve25519 identity `curve` (and the
    /// Ed25519 one, when it came from a verified claim). Returns whether
    /// it differs from a known one.
    fn learn(
        &mut self,
        addr: &DeviceAddr,
        curve: [u8; 32],
        ed: Option<[u8; 32]>,
        notices: &mut Vec<Notice>,
    ) -> Result<bool, Error> {
        let changed = match self.known(addr)? {
            None => false,
            Some(k) => k.curve25519 != curve || matches!((k.ed25519, ed), (Some(a), Some(b)) if a != b),
        };
        if changed {
            log::warn!("identity of {}/{} changed", addr.user, addr.device);
            notices.push(Notice::IdentityChanged {
                user: addr.user.clone(),
                device: addr.device,
            });
        }
        let ed = match (ed, self.known(addr)?) {
            (Some(e), _) => Some(e),
            (None, Some(k)) if !changed => k.ed25519,
            _ => None,
        };
        self.set_known(
            addr,
            Known {
                curve25519: curve,
                ed25519: ed,
            },
        );
        // A device of a user whose list we keep, not in it: news.
        if let Some(mut list) = self.devices(&addr.user)?
            && !list.contains(&addr.device)
        {
            notices.push(Notice::NewDevice {
                user: addr.user.clone(),
                device: addr.device,
            });
            list.push(addr.device);
            self.set_devices(&addr.user, list);
        }
        Ok(changed)
    }

    /// Forgets a device that is gone: its sessions, identity and place in
    /// its user's list.
    ///
    /// # Errors
    /// Store errors.
    pub fn forget_device(&mut self, addr: &DeviceAddr) -> Result<(), Error> {
        // Empty, not absent: the stored ones are gone once the writes are.
        self.sessions.insert(addr.clone(), Vec::new());
        for tag in [b's', b'i', b'r', b'e'] {
            self.writes.insert(device_key(tag, addr), None);
        }
        if let Some(mut list) = self.devices(&addr.user)? {
            list.retain(|d| *d != addr.device);
            self.set_devices(&addr.user, list);
        }
        Ok(())
    }

    /// Takes keys claimed for `addr`: checks the identity's self-signature
    /// and the one-time key's signature (refusing both if either fails),
    /// remembers the identity, and makes a new outbound session from the
    /// one-time key if there is no session with the device yet, its
    /// identity changed, or `fresh` asks for one. Returns whether there is
    /// a session with the device now.
    ///
    /// # Errors
    /// Store errors; [`Error::NoAccount`].
    pub fn accept_claimed(
        &mut self,
        user: &str,
        keys: &DeviceKeys,
        fresh: bool,
        notices: &mut Vec<Notice>,
    ) -> Result<bool, Error> {
        let addr = DeviceAddr {
            user: user.to_owned(),
            device: keys.device,
        };
        let signed = keys
            .one_time
            .as_ref()
            .is_none_or(|k| keys::verify_signed_key(&keys.identity, k));
        if !keys::verify_identity(&keys.identity) || !signed {
            log::warn!("refusing keys of {user}/{} that do not verify", keys.device);
            notices.push(Notice::BadSignature {
                user: user.to_owned(),
                device: keys.device,
            });
            return self.has_session(&addr);
        }
        let changed = self.learn(&addr, keys.identity.curve25519, Some(keys.identity.ed25519), notices)?;
        if changed {
            self.sessions.insert(addr.clone(), Vec::new());
            self.writes.insert(device_key(b's', &addr), None);
        }
        if self.has_session(&addr)? && !fresh {
            return Ok(true);
        }
        let Some(otk) = keys.one_time else {
            return self.has_session(&addr);
        };
        let account = self.account()?;
        let identity = Curve25519PublicKey::from_bytes(keys.identity.curve25519);
        let session = match account.create_outbound_session(
            SessionConfig::version_1(),
            identity,
            Curve25519PublicKey::from_bytes(otk.key),
        ) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot start a session with {user}/{}: {e}", keys.device);
                return self.has_session(&addr);
            }
        };
        self.push_session(&addr, keys.identity.curve25519, session)?;
        Ok(true)
    }

    // ---- sessions ----

    /// A device's sessions, loaded on first use. A damaged record loses
    /// its sessions (with a warning) rather than stop the client: the
    /// next body from that device then does not decrypt and a session
    /// reset repairs it.
    fn load_sessions(&mut self, addr: &DeviceAddr) -> Result<&mut Vec<Live>, Error> {
        if !self.sessions.contains_key(addr) {
            let mut list = Vec::new();
            if let Some(v) = self.tree.get(device_key(b's', addr))? {
                match decode::<StoredSessions>(&v, "sessions") {
                    Ok(StoredSessions::V1(stored)) => {
                        for s in stored {
                            match SessionPickle::from_encrypted(&s.pickle, &self.key) {
                                Ok(p) => list.push(Live {
                                    peer: s.peer,
                                    session: Session::from_pickle(p),
                                }),
                                Err(e) => {
                                    log::warn!("dropping a damaged Olm session with {}/{}: {e}", addr.user, addr.device)
                                }
                            }
                        }
                    }
                    Err(_) => log::warn!("dropping damaged Olm sessions with {}/{}", addr.user, addr.device),
                }
            }
            self.sessions.insert(addr.clone(), list);
        }
        Ok(self.sessions.get_mut(addr).expect("just inserted"))
    }

    fn write_sessions(&mut self, addr: &DeviceAddr) {
        if let Some(list) = self.sessions.get(addr) {
            let stored: Vec<StoredSession> = list
                .iter()
                .map(|l| StoredSession {
                    peer: l.peer,
                    pickle: l.session.pickle().encrypt(&self.key),
                })
                .collect();
            self.writes
                .insert(device_key(b's', addr), Some(encode(&StoredSessions::V1(stored))));
        }
    }

    fn push_session(&mut self, addr: &DeviceAddr, peer: [u8; 32], session: Session) -> Result<(), Error> {
        let list = self.load_sessions(addr)?;
        list.insert(0, Live { peer, session });
        list.truncate(MAX_SESSIONS_PER_DEVICE);
        self.write_sessions(addr);
        Ok(())
    }

    /// Whether there is an Olm session with `addr`.
    ///
    /// # Errors
    /// Store errors; damage.
    pub fn has_session(&mut self, addr: &DeviceAddr) -> Result<bool, Error> {
        Ok(!self.load_sessions(addr)?.is_empty())
    }

    /// Encrypts `plaintext` for `addr` with its most recently used session
    /// and returns the body.
    ///
    /// # Errors
    /// [`Error::NoSession`]; store errors.
    pub fn encrypt(&mut self, addr: &DeviceAddr, plaintext: &[u8], notices: &mut Vec<Notice>) -> Result<Bytes, Error> {
        // A message: the receiving session catches up past the ephemerals
        // written since the last one.
        if self.ephemeral_run(addr)? > 0 {
            self.writes.insert(device_key(b'e', addr), None);
        }
        self.seal(addr, plaintext, notices)
    }

    /// Ephemeral bodies written to `addr` since the last message.
    fn ephemeral_run(&self, addr: &DeviceAddr) -> Result<u32, Error> {
        let key = device_key(b'e', addr);
        let v = match self.writes.get(&key) {
            Some(w) => w.clone(),
            None => self.tree.get(&key)?,
        };
        v.map_or(Ok(0), |v| decode(&v, "ephemeral count"))
    }

    /// Encrypts an ephemeral body (spec §5.6) for `addr` with its most
    /// recently used session, if there is one and fewer than
    /// [`EPHEMERAL_RUN`] ephemerals went to it since the last message;
    /// `None` otherwise (never a new session: no keys are claimed for an
    /// ephemeral). The advanced session is in [`Crypto::take_writes`]:
    /// commit and flush before the body leaves, as for a message, so that
    /// a message key is never used twice.
    ///
    /// # Errors
    /// Store errors.
    pub fn encrypt_ephemeral(&mut self, addr: &DeviceAddr, plaintext: &[u8]) -> Result<Option<Bytes>, Error> {
        if !self.has_session(addr)? {
            return Ok(None);
        }
        let run = self.ephemeral_run(addr)?;
        if run >= EPHEMERAL_RUN {
            log::debug!(
                "no more ephemerals to {}/{} until a message goes",
                addr.user,
                addr.device
            );
            return Ok(None);
        }
        let mut notices = Vec::new();
        let body = self.seal(addr, plaintext, &mut notices)?;
        self.writes.insert(device_key(b'e', addr), Some(encode(&(run + 1))));
        Ok(Some(body))
    }

    fn seal(&mut self, addr: &DeviceAddr, plaintext: &[u8], notices: &mut Vec<Notice>) -> Result<Bytes, Error> {
        let list = self.load_sessions(addr)?;
        let live = list.first_mut().ok_or_else(|| Error::NoSession(addr.clone()))?;
        let peer = live.peer;
        let msg = live
            .session
            .encrypt(plaintext)
            .map_err(|_| Error::NoSession(addr.clone()))?;
        self.write_sessions(addr);
        self.check_peer(addr, peer, notices)?;
        let (kind, ciphertext) = msg.to_parts();
        let kind = OlmKind::from_olm(kind).ok_or(Error::Unexpected("unknown Olm message type"))?;
        Ok(Envelope {
            kind,
            ciphertext: Bytes::from(ciphertext),
        }
        .encode())
    }

    /// Decrypts a body from `addr`: with the session it names (a pre-key
    /// message) or any session with the device (a normal one), or with a
    /// new inbound session made from a pre-key message. The state changes
    /// are in [`Crypto::take_writes`].
    ///
    /// # Errors
    /// A [`DecryptError`] (nothing changed); store errors.
    pub fn decrypt(
        &mut self,
        addr: &DeviceAddr,
        body: &[u8],
        notices: &mut Vec<Notice>,
    ) -> Result<Result<Vec<u8>, DecryptError>, Error> {
        let Ok(env) = Envelope::decode(body) else {
            return Ok(Err(DecryptError::Malformed));
        };
        let Ok(msg) = OlmMessage::from_parts(env.kind.to_olm(), &env.ciphertext) else {
            return Ok(Err(DecryptError::Malformed));
        };
        let list = self.load_sessions(addr)?;
        let found = match &msg {
            OlmMessage::Normal(_) => list
                .iter_mut()
                .enumerate()
                .find_map(|(i, l)| l.session.decrypt(&msg).ok().map(|p| (i, p))),
            OlmMessage::PreKey(pre) => {
                let id = pre.session_id();
                match list.iter().position(|l| l.session.session_id() == id) {
                    Some(i) => match list[i].session.decrypt(&msg) {
                        Ok(p) => Some((i, p)),
                        Err(_) => return Ok(Err(DecryptError::Refused)),
                    },
                    None => None,
                }
            }
        };
        if let Some((i, plaintext)) = found {
            let live = list.remove(i);
            let peer = live.peer;
            list.insert(0, live);
            self.write_sessions(addr);
            self.check_peer(addr, peer, notices)?;
            return Ok(Ok(plaintext));
        }
        let OlmMessage::PreKey(pre) = &msg else {
            return Ok(Err(DecryptError::NoSession));
        };
        let account = self.account.as_mut().ok_or(Error::NoAccount)?;
        let their = pre.identity_key();
        let created = match account.create_inbound_session(SessionConfig::version_1(), their, pre) {
            Ok(c) => c,
            Err(e) => {
                log::debug!(
                    "no session from a pre-key message of {}/{}: {e}",
                    addr.user,
                    addr.device
                );
                return Ok(Err(DecryptError::Refused));
            }
        };
        // The account used up a one-time key.
        self.write_account();
        self.push_session(addr, their.to_bytes(), created.session)?;
        self.check_peer(addr, their.to_bytes(), notices)?;
        Ok(Ok(created.plaintext))
    }

    /// Decrypts an ephemeral body from `addr` (spec §5.6) on a copy of the
    /// session it names or of each session with the device, and throws the
    /// copy away: the sessions never change for an ephemeral. So one that
    /// arrives before messages written earlier (it does not wait in the
    /// queue) cannot push their keys out of the session's store of skipped
    /// keys (vodozemac keeps 40 a chain), and one that is lost changes
    /// nothing; each is only a skipped key when the next message comes
    /// (see [`EPHEMERAL_RUN`]). Never makes a session (no one-time key is
    /// used up), and only a session bound to the identity known for the
    /// device opens it. `None` if nothing opens it.
    ///
    /// # Errors
    /// Store errors.
    pub fn decrypt_ephemeral(&mut self, addr: &DeviceAddr, body: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let Ok(env) = Envelope::decode(body) else {
            return Ok(None);
        };
        let Ok(msg) = OlmMessage::from_parts(env.kind.to_olm(), &env.ciphertext) else {
            return Ok(None);
        };
        let Some(known) = self.known(addr)? else {
            return Ok(None);
        };
        let list = self.load_sessions(addr)?;
        for live in list.iter().filter(|l| l.peer == known.curve25519) {
            if let OlmMessage::PreKey(pre) = &msg
                && pre.session_id() != live.session.session_id()
            {
                continue;
            }
            let mut copy = Session::from_pickle(live.session.pickle());
            if let Ok(plaintext) = copy.decrypt(&msg) {
                return Ok(Some(plaintext));
            }
        }
        Ok(None)
    }

    /// Checks the identity a session is bound to against the one known for
    /// the device; learns it if there is none.
    fn check_peer(&mut self, addr: &DeviceAddr, peer: [u8; 32], notices: &mut Vec<Notice>) -> Result<(), Error> {
        match self.known(addr)? {
            Some(k) if k.curve25519 == peer => Ok(()),
            _ => self.learn(addr, peer, None, notices).map(|_| ()),
        }
    }

    // ---- session resets ----

    /// Whether a session reset may be sent to `addr` now (at most one a
    /// [`RESET_INTERVAL_MS`]); if so, records it.
    ///
    /// # Errors
    /// Store errors.
    pub fn may_reset(&mut self, addr: &DeviceAddr, now_ms: u64) -> Result<bool, Error> {
        let key = device_key(b'r', addr);
        let last = match self.writes.get(&key) {
            Some(w) => w.clone(),
            None => self.tree.get(&key)?,
        };
        let last: u64 = match last {
            Some(v) => decode(&v, "reset time")?,
            None => 0,
        };
        if now_ms.saturating_sub(last) < RESET_INTERVAL_MS {
            return Ok(false);
        }
        self.writes.insert(key, Some(encode(&now_ms)));
        Ok(true)
    }

    /// The record writes made since the last call: commit them (then
    /// flush) before acting on the state they describe.
    pub fn take_writes(&mut self) -> Writes {
        std::mem::take(&mut self.writes)
    }

    /// Writes pending changes without a transaction (the caller flushes).
    ///
    /// # Errors
    /// Store errors.
    pub fn persist(&mut self) -> Result<(), Error> {
        let writes = self.take_writes();
        self.tree.apply(writes)
    }

    /// The Ed25519 identity key of this device.
    ///
    /// # Errors
    /// [`Error::NoAccount`].
    pub fn ed25519(&self) -> Result<[u8; 32], Error> {
        Ok(*self.account()?.ed25519_key().as_bytes())
    }

    /// For tests: overwrite what is known of a device's identity, as a
    /// key-swapping server would make it look.
    #[doc(hidden)]
    pub fn set_known_for_test(&mut self, addr: &DeviceAddr, known: Known) {
        self.set_known(addr, known);
    }
}

/// The safety number of two users: for each, a 30-digit fingerprint of
/// its user name and the Ed25519 identity keys of all its current devices
/// (in device-number order), made by iterating SHA-512 5200 times as
/// Signal does; the two fingerprints in ascending order, so both users
/// see the same 60 digits, in twelve groups of five.
pub fn safety_number(a: (&str, &[[u8; 32]]), b: (&str, &[[u8; 32]])) -> String {
    let mut parts = [fingerprint(a.0, a.1), fingerprint(b.0, b.1)];
    parts.sort();
    let digits = parts.concat();
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).expect("digits"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Version of the fingerprint format, hashed in first.
const FINGERPRINT_VERSION: [u8; 2] = [0, 1];
const FINGERPRINT_ITERATIONS: usize = 5200;

fn fingerprint(user: &str, keys: &[[u8; 32]]) -> String {
    use ring::digest::{Context, SHA512};
    let all: Vec<u8> = keys.concat();
    let mut ctx = Context::new(&SHA512);
    ctx.update(&FINGERPRINT_VERSION);
    ctx.update(&all);
    ctx.update(user.as_bytes());
    let mut hash = ctx.finish();
    for _ in 1..FINGERPRINT_ITERATIONS {
        let mut ctx = Context::new(&SHA512);
        ctx.update(hash.as_ref());
        ctx.update(&all);
        hash = ctx.finish();
    }
    let h = hash.as_ref();
    (0..6)
        .map(|i| {
            let chunk = &h[i * 5..i * 5 + 5];
            let n = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests;
