//! Keys: publishing this device's (and topping them up when the server
//! says they run low), claiming other devices' (checking their
//! signatures), the devices a message is encrypted for, and session resets
//! for devices whose messages did not decrypt.
//!
//! Guarantees: the private halves of keys are durable before the public
//! ones leave; claimed keys are used only if they verify (see
//! [`super::e2e`]); a session reset goes to a device at most once a minute.

use super::Error;
use super::content::{Content, Payload};
use super::core::Client;
use super::e2e::Notice;
use crate::wire::{ClientFrame, DeviceAddr, DeviceId, DeviceKeys, ErrorCode, ServerFrame};

impl Client {
    /// Creates the Olm account if there is none, and publishes what the
    /// server should hold: new one-time keys when it said the stock is
    /// low, a new fallback key when the old one is due, keys a failed
    /// attempt left unpublished. Makes no request when there is nothing
    /// to publish. The private halves are durable before the public ones
    /// leave.
    ///
    /// # Errors
    /// [`Error::KeysRefused`] if the server holds another identity for
    /// this device; connection failures.
    pub fn maintain(&mut self) -> Result<(), Error> {
        self.profile.registered()?;
        self.connect()?;
        let now_ms = self.unix_ms();
        let keys_low = self.keys_low.take();
        let crypto = self.profile.crypto_mut();
        crypto.ensure_account()?;
        // Taken: if publishing fails, the server says so again at the next
        // authentication (and keys made meanwhile go up then).
        let Some(publish) = crypto.keys_to_publish(keys_low, now_ms)? else {
            return Ok(());
        };
        crypto.persist()?;
        self.profile.history().flush()?;
        log::debug!(
            "publishing {} one-time keys{}",
            publish.one_time.len(),
            if publish.fallback.is_some() {
                " and a fallback key"
            } else {
                ""
            }
        );
        match self.call(
            &ClientFrame::PublishKeys(Box::new(publish)),
            "the server to take the keys",
        ) {
            Ok(ServerFrame::KeyCount { one_time }) => {
                log::debug!("the server holds {one_time} one-time keys");
                let crypto = self.profile.crypto_mut();
                crypto.mark_published();
                crypto.persist()?;
                self.profile.history().flush()?;
                Ok(())
            }
            Ok(_) => Err(Error::Unexpected("expected KeyCount")),
            Err(Error::Server {
                code: ErrorCode::NOT_ALLOWED,
                ..
            }) => Err(Error::KeysRefused),
            Err(e) => Err(e),
        }
    }

    /// Claims one key set for every device of `user` (for this account,
    /// its other devices) and returns those whose signatures verify.
    ///
    /// # Errors
    /// `UNKNOWN_USER`, `RATE_LIMITED`; connection failures.
    pub fn claim_keys(&mut self, user: &str) -> Result<Vec<DeviceKeys>, Error> {
        self.connect()?;
        let mut keys = self.claim(user)?;
        keys.retain(|k| {
            crate::keys::verify_identity(&k.identity)
                && k.one_time
                    .as_ref()
                    .is_none_or(|o| crate::keys::verify_signed_key(&k.identity, o))
        });
        Ok(keys)
    }

    pub(super) fn claim(&mut self, user: &str) -> Result<Vec<DeviceKeys>, Error> {
        match self.call(&ClientFrame::ClaimKeys { user: user.to_owned() }, "keys")? {
            ServerFrame::Keys { user: u, devices } if u == user => Ok(devices),
            _ => Err(Error::Unexpected("expected Keys")),
        }
    }

    /// The devices of `user` to encrypt for (for this account, the other
    /// devices), each with an Olm session: claims keys when the user is
    /// new, a `Mismatch` named a device missing, a listed device has no
    /// session, or `fresh` asks for a new session with one device (then
    /// clears it).
    pub(super) fn recipients(
        &mut self,
        user: &str,
        fresh: &mut Option<DeviceAddr>,
        notices: &mut Vec<Notice>,
    ) -> Result<Vec<DeviceId>, Error> {
        let me = self.profile.registered()?.clone();
        let mine = DeviceId(me.device);
        let crypto = self.profile.crypto_mut();
        let list = crypto.devices(user)?;
        let mut need = list.is_none()
            || self.missing.iter().any(|a| a.user == user)
            || fresh.as_ref().is_some_and(|f| f.user == user);
        for d in list.iter().flatten() {
            need = need
                || !crypto.has_session(&DeviceAddr {
                    user: user.to_owned(),
                    device: *d,
                })?;
        }
        if need {
            let keys = self.claim(user)?;
            self.missing.retain(|a| a.user != user);
            let crypto = self.profile.crypto_mut();
            let mut got = Vec::new();
            for k in &keys {
                if user == me.user && k.device == mine {
                    continue;
                }
                let addr = DeviceAddr {
                    user: user.to_owned(),
                    device: k.device,
                };
                let renew = fresh.as_ref() == Some(&addr);
                if crypto.accept_claimed(user, k, renew, notices)? {
                    got.push(k.device);
                }
            }
            if fresh.as_ref().is_some_and(|f| f.user == user) {
                *fresh = None;
            }
            if list.is_none() {
                crypto.set_devices(user, got);
            }
        }
        // A listed device that still has no session published no keys (or
        // is gone): it is left out, and a `Mismatch` says which.
        let crypto = self.profile.crypto_mut();
        let mut out = Vec::new();
        for d in crypto.devices(user)?.unwrap_or_default() {
            let addr = DeviceAddr {
                user: user.to_owned(),
                device: d,
            };
            if crypto.has_session(&addr)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Sends a session reset to each device that sent something
    /// undecryptable: a [`Content::SessionReset`] to its user, on a new
    /// Olm session with that device from freshly claimed keys. Failures
    /// are logged (the device asks again on its next undecryptable body).
    fn send_resets(&mut self) {
        while let Some(addr) = self.resets.pop() {
            let result = self.new_id().and_then(|id| {
                let payload = Payload {
                    id,
                    to: addr.user.clone(),
                    ts_ms: self.unix_ms(),
                    content: Content::SessionReset,
                };
                let plaintext = payload.encode()?;
                let deadline = self.now() + super::send::SEND_PATIENCE;
                self.send_payload(&addr.user, id, &plaintext, None, Some(addr.clone()), deadline)
            });
            match result {
                Ok(_) => log::info!("sent a session reset to {}/{}", addr.user, addr.device),
                Err(e) => log::warn!("could not send a session reset to {}/{}: {e}", addr.user, addr.device),
            }
        }
    }

    /// Key upkeep and session resets, at a moment when nothing else waits;
    /// failures are logged.
    pub(super) fn housekeeping(&mut self) {
        if let Err(e) = self.maintain() {
            log::warn!("could not publish end-to-end keys: {e}");
        }
        self.send_resets();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::e2e::{LOW_WATER, ONE_TIME_TARGET};
    use crate::client::testing::World;

    #[test]
    fn keys_are_published_at_registration_and_topped_up_when_low() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", true);
        assert_eq!(w.server().one_time_keys("alice", 1), ONE_TIME_TARGET as usize);
        let mut bob = w.user(&tmp.path().join("b"), "bob", false);
        // Claims drain alice's stock; only verified keys come back.
        for _ in 0..ONE_TIME_TARGET - LOW_WATER + 1 {
            assert_eq!(bob.claim_keys("alice").unwrap().len(), 1);
        }
        assert!(w.server().one_time_keys("alice", 1) < LOW_WATER as usize);
        // At her next connection the server says so, and she tops up.
        alice.disconnect();
        World::sync(&mut alice);
        assert_eq!(w.server().one_time_keys("alice", 1), ONE_TIME_TARGET as usize);
    }

    #[test]
    fn other_keys_for_this_device_on_the_server_are_a_clear_error() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        w.server().fault(
            "PublishKeys",
            crate::client::testing::Fault::Refuse(ErrorCode::NOT_ALLOWED),
        );
        // Make something to publish: a stock that runs low.
        alice.keys_low = Some(0);
        assert!(matches!(alice.maintain(), Err(Error::KeysRefused)));
    }
}
