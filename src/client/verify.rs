//! Safety numbers (spec §14.5): bringing both users' device lists up to
//! date with the server, claiming (and checking) keys for devices whose
//! identity is not known yet, and the number over every current device's
//! Ed25519 identity key.

use super::Error;
use super::core::{Client, Event};
use super::e2e::{self, Notice};
use crate::wire::{self, DeviceAddr, DeviceId};

/// A safety number (see [`e2e::safety_number`]) and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    /// The other user.
    pub user: String,
    /// Sixty digits in groups of five.
    pub number: String,
    /// The Ed25519 identity keys it covers: user, device, key.
    pub devices: Vec<(String, DeviceId, [u8; 32])>,
}

impl Client {
    /// The safety number of this account and `user` (see
    /// [`e2e::safety_number`]): both device lists are brought up to date
    /// with the server, keys are claimed (and checked) for devices whose
    /// identity is not known yet, and the number covers every current
    /// device's Ed25519 identity key.
    ///
    /// # Errors
    /// `UNKNOWN_USER`; [`Error::NoKeys`]; connection failures.
    pub fn verify(&mut self, user: &str) -> Result<SafetyNumber, Error> {
        if !wire::valid_user_name(user) {
            return Err(Error::Usage(format!("invalid user name {user:?}")));
        }
        self.connect()?;
        self.maintain()?;
        let me = self.profile.registered()?.clone();
        let mine = DeviceId(me.device);
        let mut notices = Vec::new();
        let mut keys_of = |this: &mut Client, u: &str| -> Result<Vec<(String, DeviceId, [u8; 32])>, Error> {
            let mut current = this.list_devices(u)?;
            if u == me.user {
                current.retain(|d| *d != mine);
            }
            let crypto = this.profile.crypto_mut();
            for d in crypto.devices(u)?.unwrap_or_default() {
                if !current.contains(&d) {
                    crypto.forget_device(&DeviceAddr {
                        user: u.to_owned(),
                        device: d,
                    })?;
                    notices.push(Notice::DeviceRemoved {
                        user: u.to_owned(),
                        device: d,
                    });
                }
            }
            let mut unknown = false;
            for d in &current {
                let known = crypto.known(&DeviceAddr {
                    user: u.to_owned(),
                    device: *d,
                })?;
                unknown = unknown || known.and_then(|k| k.ed25519).is_none();
            }
            if unknown || crypto.devices(u)?.is_none() {
                let keys = this.claim(u)?;
                let crypto = this.profile.crypto_mut();
                let had_list = crypto.devices(u)?.is_some();
                for k in keys.iter().filter(|k| current.contains(&k.device)) {
                    crypto.accept_claimed(u, k, false, &mut notices)?;
                }
                if !had_list {
                    crypto.set_devices(u, current.clone());
                }
            }
            let crypto = this.profile.crypto_mut();
            let mut out = Vec::new();
            for d in current {
                let addr = DeviceAddr {
                    user: u.to_owned(),
                    device: d,
                };
                match crypto.known(&addr)?.and_then(|k| k.ed25519) {
                    Some(ed) => out.push((u.to_owned(), d, ed)),
                    None => {
                        return Err(Error::NoKeys {
                            user: addr.user,
                            device: d,
                        });
                    }
                }
            }
            Ok(out)
        };
        let mut mine_keys = keys_of(self, &me.user)?;
        mine_keys.push((me.user.clone(), mine, self.profile.crypto().ed25519()?));
        mine_keys.sort_by_key(|(_, d, _)| *d);
        let theirs = if user == me.user {
            mine_keys.clone()
        } else {
            keys_of(self, user)?
        };
        self.profile.crypto_mut().persist()?;
        self.profile.history().flush()?;
        self.events.extend(notices.into_iter().map(Event::Notice));
        let ed = |v: &[(String, DeviceId, [u8; 32])]| v.iter().map(|(_, _, k)| *k).collect::<Vec<_>>();
        let number = e2e::safety_number((&me.user, &ed(&mine_keys)), (user, &ed(&theirs)));
        let mut devices = mine_keys;
        if user != me.user {
            devices.extend(theirs);
        }
        Ok(SafetyNumber {
            user: user.to_owned(),
            number,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::World;

    #[test]
    fn both_sides_see_the_same_number_and_it_follows_the_devices() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        let mut bob = w.user(&tmp.path().join("b"), "bob", false);
        let a = alice.verify("bob").unwrap();
        let b = bob.verify("alice").unwrap();
        assert_eq!(a.number, b.number);
        assert_eq!(a.number.len(), 12 * 5 + 11);
        assert_eq!(a.devices.len(), 2);
        // Bob links a device: the number changes, and alice hears of it.
        let (code, _) = bob.link_code().unwrap();
        w.client(&tmp.path().join("b2"), false).link(&code).unwrap();
        let again = alice.verify("bob").unwrap();
        assert_ne!(again.number, a.number);
        assert_eq!(again.devices.len(), 3);
        assert!(std::iter::from_fn(|| alice.poll_event()).any(|e| matches!(
            e,
            Event::Notice(Notice::NewDevice { ref user, device: DeviceId(2) }) if user == "bob"
        )));
        assert!(matches!(alice.verify("No Such"), Err(Error::Usage(_))));
    }
}
