//! The device's Megolm state (spec §14.9): for each group, the outbound
//! session this device writes with and which member devices it shared it
//! with; and the inbound sessions other members' devices shared, by group,
//! sending device and session.
//!
//! A group message is encrypted once with the outbound session and
//! relayed by the server to every member device; a device that lacks the
//! session gets its key first, over Olm ([`super::content::Content::GroupKey`]).
//! A key is exported at the session's current message, so a device given
//! it later (a member added, a device linked) cannot read what came
//! before; the client rotates the session (a new one, shared afresh) when
//! a device it was shared with is no longer a member device, so a member
//! removed, or a device revoked, cannot read what comes after
//! ([`Outbound::stale`]).
//!
//! Records live with the Olm state in the end-to-end tree, encrypted with
//! the same pickle key, and changes collect in [`Crypto::take_writes`] like
//! Olm's: a sender commits the advanced ratchet before the message leaves,
//! so a message key is never used twice.
//!
//! - `m\0o` ‖ group → the outbound session ([`StoredOutbound`]);
//! - `m\0i` ‖ group ‖ user ‖ 0 ‖ device ‖ session id → an inbound session;
//! - `m\0l` ‖ group ‖ user ‖ 0 ‖ device → the ids of the inbound sessions
//!   kept for that device, oldest first (at most [`MAX_INBOUND`]).

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle, MegolmMessage, SessionConfig,
    SessionKey,
};

use super::Error;
use super::content::GroupEnvelope;
use super::e2e::{Crypto, DecryptError};
use super::history::{E2eStore, Writes};
use crate::wire::{DeviceAddr, DeviceId, GroupId};

/// A sender starts a new session after this many messages.
pub const ROTATE_MESSAGES: u32 = 100;
/// A sender starts a new session after this long (7 days).
pub const ROTATE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Inbound sessions kept per group and sending device (a device rotates
/// at least every [`ROTATE_MESSAGES`] messages; older ones go first).
pub const MAX_INBOUND: usize = 32;

/// The outbound session of a group as stored; the tag is the version.
#[derive(Serialize, Deserialize)]
enum StoredOutbound {
    V1 {
        /// The encrypted vodozemac pickle.
        pickle: String,
        /// When it was made (ms, this device's clock).
        created_ms: u64,
        /// Messages written with it.
        sent: u32,
        /// The devices it was shared with.
        shared: Vec<(String, u32)>,
    },
}

#[derive(Serialize, Deserialize)]
enum StoredInbound {
    V1 { pickle: String },
}

/// What is known of a group's outbound session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Its id (its public signing key).
    pub session: [u8; 32],
    /// When it was made.
    pub created_ms: u64,
    /// Messages written with it.
    pub sent: u32,
    /// The devices it was shared with.
    pub shared: BTreeSet<(String, DeviceId)>,
}

impl Outbound {
    /// Whether a new session must replace it before the next message to
    /// a group whose member devices are `devices`: a device it was shared
    /// with is no longer one (a member left or was removed, a device was
    /// revoked), it wrote [`ROTATE_MESSAGES`], or it is older than
    /// [`ROTATE_MS`].
    pub fn stale(&self, devices: &BTreeSet<(String, DeviceId)>, now_ms: u64) -> bool {
        self.sent >= ROTATE_MESSAGES
            || now_ms.saturating_sub(self.created_ms) >= ROTATE_MS
            || self.shared.iter().any(|d| !devices.contains(d))
    }
}

const OUTBOUND: &[u8] = b"m\0o";
const INBOUND: &[u8] = b"m\0i";
const INBOUND_LIST: &[u8] = b"m\0l";

fn outbound_key(group: GroupId) -> Vec<u8> {
    [OUTBOUND, &group.0[..]].concat()
}

fn device_part(group: GroupId, from: &DeviceAddr) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + from.user.len() + 5);
    k.extend_from_slice(&group.0);
    k.extend_from_slice(from.user.as_bytes());
    k.push(0);
    k.extend_from_slice(&from.device.0.to_be_bytes());
    k
}

fn inbound_key(group: GroupId, from: &DeviceAddr, session: &[u8; 32]) -> Vec<u8> {
    [INBOUND, &device_part(group, from), &session[..]].concat()
}

fn list_key(group: GroupId, from: &DeviceAddr) -> Vec<u8> {
    [INBOUND_LIST, &device_part(group, from)].concat()
}

fn damaged(what: &str) -> Error {
    Error::Damaged(format!("group session state: {what}"))
}

fn session_id(s: &str) -> Result<[u8; 32], Error> {
    vodozemac::base64_decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| damaged("session id"))
}

/// Re-encrypts every Megolm pickle under `new` (a passphrase was set):
/// the writes join `batch`.
///
/// # Errors
/// A record that does not decrypt under `old`; store errors.
pub(super) fn reencrypt(tree: &E2eStore, old: &[u8; 32], new: &[u8; 32], batch: &mut Writes) -> Result<(), Error> {
    for (k, v) in tree.scan_prefix(OUTBOUND)? {
        let StoredOutbound::V1 {
            pickle,
            created_ms,
            sent,
            shared,
        } = postcard::from_bytes(&v).map_err(|_| damaged("outbound"))?;
        let p = GroupSessionPickle::from_encrypted(&pickle, old).map_err(|_| damaged("outbound"))?;
        let v = StoredOutbound::V1 {
            pickle: p.encrypt(new),
            created_ms,
            sent,
            shared,
        };
        batch.insert(k, Some(postcard::to_stdvec(&v).map_err(|_| damaged("outbound"))?));
    }
    for (k, v) in tree.scan_prefix(INBOUND)? {
        let StoredInbound::V1 { pickle } = postcard::from_bytes(&v).map_err(|_| damaged("inbound"))?;
        let p = InboundGroupSessionPickle::from_encrypted(&pickle, old).map_err(|_| damaged("inbound"))?;
        let v = StoredInbound::V1 { pickle: p.encrypt(new) };
        batch.insert(k, Some(postcard::to_stdvec(&v).map_err(|_| damaged("inbound"))?));
    }
    Ok(())
}

impl Crypto {
    fn record(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        match self.writes.get(key) {
            Some(w) => Ok(w.clone()),
            None => self.tree.get(key),
        }
    }

    fn load_outbound(&self, group: GroupId) -> Result<Option<(GroupSession, Outbound)>, Error> {
        let Some(v) = self.record(&outbound_key(group))? else {
            return Ok(None);
        };
        let StoredOutbound::V1 {
            pickle,
            created_ms,
            sent,
            shared,
        } = postcard::from_bytes(&v).map_err(|_| damaged("outbound"))?;
        let p = GroupSessionPickle::from_encrypted(&pickle, &self.key).map_err(|_| damaged("outbound"))?;
        let session = GroupSession::from_pickle(p);
        let info = Outbound {
            session: session_id(&session.session_id())?,
            created_ms,
            sent,
            shared: shared.into_iter().map(|(u, d)| (u, DeviceId(d))).collect(),
        };
        Ok(Some((session, info)))
    }

    fn store_outbound(&mut self, group: GroupId, session: &GroupSession, info: &Outbound) -> Result<(), Error> {
        let v = StoredOutbound::V1 {
            pickle: session.pickle().encrypt(&self.key),
            created_ms: info.created_ms,
            sent: info.sent,
            shared: info.shared.iter().map(|(u, d)| (u.clone(), d.0)).collect(),
        };
        let bytes = postcard::to_stdvec(&v).map_err(|_| damaged("outbound"))?;
        self.writes.insert(outbound_key(group), Some(bytes));
        Ok(())
    }

    /// What is known of `group`'s outbound session, if there is one.
    ///
    /// # Errors
    /// Store errors; damage.
    pub fn outbound(&self, group: GroupId) -> Result<Option<Outbound>, Error> {
        Ok(self.load_outbound(group)?.map(|(_, info)| info))
    }

    /// Starts a new outbound session for `group` (shared with nobody yet),
    /// replacing the old one.
    ///
    /// # Errors
    /// Store errors.
    pub fn new_outbound(&mut self, group: GroupId, now_ms: u64) -> Result<Outbound, Error> {
        let session = GroupSession::new(SessionConfig::version_1());
        let info = Outbound {
            session: session_id(&session.session_id())?,
            created_ms: now_ms,
            sent: 0,
            shared: BTreeSet::new(),
        };
        self.store_outbound(group, &session, &info)?;
        Ok(info)
    }

    /// Forgets `group`'s outbound session (this user left).
    pub fn forget_outbound(&mut self, group: GroupId) {
        self.writes.insert(outbound_key(group), None);
    }

    /// The key of `group`'s outbound session at its current message: what
    /// a device that lacks it is sent.
    ///
    /// # Errors
    /// [`Error::Unexpected`] if there is no session; store errors.
    pub fn outbound_key(&self, group: GroupId) -> Result<Bytes, Error> {
        let (session, _) = self
            .load_outbound(group)?
            .ok_or(Error::Unexpected("no group session to share"))?;
        Ok(Bytes::from(session.session_key().to_bytes()))
    }

    /// Records that `devices` have `group`'s outbound session now.
    ///
    /// # Errors
    /// Store errors.
    pub fn mark_shared(&mut self, group: GroupId, devices: &[(String, DeviceId)]) -> Result<(), Error> {
        let Some((session, mut info)) = self.load_outbound(group)? else {
            return Ok(());
        };
        info.shared.extend(devices.iter().cloned());
        self.store_outbound(group, &session, &info)
    }

    /// Encrypts `plaintext` once for `group` with its outbound session and
    /// returns the body (a [`GroupEnvelope`]). The advanced ratchet is in
    /// the writes: commit it before the body leaves.
    ///
    /// # Errors
    /// [`Error::Unexpected`] if there is no session; store errors.
    pub fn group_encrypt(&mut self, group: GroupId, plaintext: &[u8]) -> Result<Bytes, Error> {
        let (mut session, mut info) = self
            .load_outbound(group)?
            .ok_or(Error::Unexpected("no group session to write with"))?;
        let message = session.encrypt(plaintext);
        info.sent = info.sent.saturating_add(1);
        self.store_outbound(group, &session, &info)?;
        Ok(GroupEnvelope {
            session: info.session,
            ciphertext: Bytes::from(message.to_bytes()),
        }
        .encode())
    }

    /// Takes a session key `from` shared for `group` (over Olm, so it is
    /// that device's). Returns whether it was new. Keeps at most
    /// [`MAX_INBOUND`] per sending device; a key already held is kept as
    /// first received (a later copy cannot move it forward or back).
    ///
    /// # Errors
    /// Store errors; a key that does not decode is `Ok(false)`.
    pub fn add_inbound(&mut self, group: GroupId, from: &DeviceAddr, session_key: &[u8]) -> Result<bool, Error> {
        let Ok(key) = SessionKey::from_bytes(session_key) else {
            log::warn!("{}/{} shared an unreadable group key", from.user, from.device);
            return Ok(false);
        };
        let session = InboundGroupSession::new(&key, SessionConfig::version_1());
        let id = session_id(&session.session_id())?;
        let k = inbound_key(group, from, &id);
        if self.record(&k)?.is_some() {
            return Ok(false);
        }
        let v = StoredInbound::V1 {
            pickle: session.pickle().encrypt(&self.key),
        };
        self.writes
            .insert(k, Some(postcard::to_stdvec(&v).map_err(|_| damaged("inbound"))?));
        let lk = list_key(group, from);
        let mut list: Vec<[u8; 32]> = match self.record(&lk)? {
            Some(v) => postcard::from_bytes(&v).map_err(|_| damaged("inbound list"))?,
            None => Vec::new(),
        };
        list.push(id);
        while list.len() > MAX_INBOUND {
            let old = list.remove(0);
            self.writes.insert(inbound_key(group, from, &old), None);
        }
        self.writes.insert(
            lk,
            Some(postcard::to_stdvec(&list).map_err(|_| damaged("inbound list"))?),
        );
        Ok(true)
    }

    /// Decrypts a group message `from` in `group` with the session it
    /// names, if that device shared it with this one.
    ///
    /// # Errors
    /// Store errors; a [`DecryptError`] as the inner result.
    pub fn group_decrypt(
        &mut self,
        group: GroupId,
        from: &DeviceAddr,
        body: &[u8],
    ) -> Result<Result<Vec<u8>, DecryptError>, Error> {
        let Ok(env) = GroupEnvelope::decode(body) else {
            return Ok(Err(DecryptError::Malformed));
        };
        let Ok(message) = MegolmMessage::from_bytes(&env.ciphertext) else {
            return Ok(Err(DecryptError::Malformed));
        };
        let Some(v) = self.record(&inbound_key(group, from, &env.session))? else {
            return Ok(Err(DecryptError::NoSession));
        };
        let StoredInbound::V1 { pickle } = postcard::from_bytes(&v).map_err(|_| damaged("inbound"))?;
        let p = InboundGroupSessionPickle::from_encrypted(&pickle, &self.key).map_err(|_| damaged("inbound"))?;
        let mut session = InboundGroupSession::from_pickle(p);
        match session.decrypt(&message) {
            Ok(d) => Ok(Ok(d.plaintext)),
            Err(_) => Ok(Err(DecryptError::Refused)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::history::History;

    fn crypto(dir: &std::path::Path) -> Crypto {
        let h = History::open(dir).unwrap();
        let mut c = Crypto::open(h.e2e(), None).unwrap();
        c.ensure_account().unwrap();
        c
    }

    const G: GroupId = GroupId([5; 16]);

    fn addr(user: &str, device: u32) -> DeviceAddr {
        DeviceAddr {
            user: user.into(),
            device: DeviceId(device),
        }
    }

    #[test]
    fn a_key_shared_opens_messages_from_then_on_and_no_earlier_or_other_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = crypto(&tmp.path().join("a"));
        let mut bob = crypto(&tmp.path().join("b"));
        alice.new_outbound(G, 0).unwrap();
        let early = alice.group_encrypt(G, b"before bob").unwrap();
        let key = alice.outbound_key(G).unwrap();
        assert!(bob.add_inbound(G, &addr("alice", 1), &key).unwrap());
        assert!(!bob.add_inbound(G, &addr("alice", 1), &key).unwrap(), "once");
        let m = alice.group_encrypt(G, b"hello").unwrap();
        assert_eq!(
            bob.group_decrypt(G, &addr("alice", 1), &m).unwrap(),
            Ok(b"hello".to_vec())
        );
        // What came before the key was exported stays closed.
        assert_eq!(
            bob.group_decrypt(G, &addr("alice", 1), &early).unwrap(),
            Err(DecryptError::Refused)
        );
        // Said to come from another device, or another group: no session.
        assert_eq!(
            bob.group_decrypt(G, &addr("alice", 2), &m).unwrap(),
            Err(DecryptError::NoSession)
        );
        assert_eq!(
            bob.group_decrypt(GroupId([6; 16]), &addr("alice", 1), &m).unwrap(),
            Err(DecryptError::NoSession)
        );
        // A rotation: the old key does not open the new session.
        alice.new_outbound(G, 1).unwrap();
        let after = alice.group_encrypt(G, b"after").unwrap();
        assert_eq!(
            bob.group_decrypt(G, &addr("alice", 1), &after).unwrap(),
            Err(DecryptError::NoSession)
        );
        assert_eq!(
            bob.group_decrypt(G, &addr("alice", 1), b"junk").unwrap(),
            Err(DecryptError::Malformed)
        );
    }

    #[test]
    fn a_session_is_stale_when_a_device_it_went_to_is_gone_or_it_is_old() {
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = crypto(tmp.path());
        let mut info = alice.new_outbound(G, 1000).unwrap();
        alice
            .mark_shared(G, &[("bob".into(), DeviceId(1)), ("carol".into(), DeviceId(1))])
            .unwrap();
        info = alice.outbound(G).unwrap().unwrap_or(info);
        let all: BTreeSet<(String, DeviceId)> = [("bob", 1), ("carol", 1), ("dave", 1)]
            .iter()
            .map(|(u, d)| (u.to_string(), DeviceId(*d)))
            .collect();
        assert!(!info.stale(&all, 1000), "a new member does not rotate it");
        let mut without_carol = all.clone();
        without_carol.remove(&("carol".into(), DeviceId(1)));
        assert!(info.stale(&without_carol, 1000));
        assert!(info.stale(&all, 1000 + ROTATE_MS));
        for _ in 0..ROTATE_MESSAGES {
            alice.group_encrypt(G, b"x").unwrap();
        }
        assert!(alice.outbound(G).unwrap().unwrap().stale(&all, 1000));
    }
}
