//! The account: creating it with an invite, joining it as a new device
//! with a link code, asking for a link code, listing and revoking its
//! devices.

use super::Error;
use super::core::Client;
use super::profile::Registration;
use crate::code::Code;
use crate::wire::{self, ClientFrame, DeviceAddr, DeviceId, DeviceInfo, ServerFrame};

impl Client {
    /// Creates an account with an invite and makes this profile its first
    /// device.
    ///
    /// # Errors
    /// [`Error::AlreadyRegistered`], [`Error::Usage`] for an invalid name,
    /// the server's refusal (`INVALID_INVITE`, `NAME_TAKEN`...), connection
    /// failures.
    pub fn register(&mut self, invite: &Code, name: &str) -> Result<Registration, Error> {
        if let Some(r) = self.profile.registration() {
            return Err(Error::AlreadyRegistered(r.user.clone()));
        }
        if !wire::valid_user_name(name) {
            return Err(Error::Usage(format!(
                "invalid user name {name:?}: use 3 to 32 of a-z, 0-9, _ and ."
            )));
        }
        let frame = ClientFrame::Register {
            invite: invite.token.clone(),
            name: name.to_owned(),
        };
        self.join(invite, &frame)
    }

    /// Makes this (empty) profile a new device of the account that asked
    /// for the link code.
    ///
    /// # Errors
    /// [`Error::AlreadyRegistered`]; `INVALID_LINK_CODE`, `DEVICE_LIMIT`;
    /// connection failures.
    pub fn link(&mut self, code: &Code) -> Result<Registration, Error> {
        if let Some(r) = self.profile.registration() {
            return Err(Error::AlreadyRegistered(r.user.clone()));
        }
        let frame = ClientFrame::RedeemLink {
            code: code.token.clone(),
        };
        self.join(code, &frame)
    }

    fn join(&mut self, code: &Code, frame: &ClientFrame) -> Result<Registration, Error> {
        self.connect_to(&code.addr, &code.server_key, self.config.handshake_timeout)?;
        match self.call(frame, "registration")? {
            ServerFrame::Registered { user, device } => {
                let reg = Registration {
                    server: code.addr.clone(),
                    server_key: code.server_key,
                    user,
                    device: device.0,
                };
                self.profile.save_registration(reg.clone())?;
                // The keys go up at once, so others can write to the new
                // device; if that fails, the next command publishes them.
                if let Err(e) = self.maintain() {
                    log::warn!("registered, but the end-to-end keys are not published yet: {e}");
                }
                Ok(reg)
            }
            _ => Err(Error::Unexpected("expected Registered")),
        }
    }

    /// Asks for a one-time code that links a new device to this account.
    /// Returns the code and when it expires (ms since the epoch).
    ///
    /// # Errors
    /// Connection failures and server refusals.
    pub fn link_code(&mut self) -> Result<(Code, u64), Error> {
        self.connect()?;
        let reg = self.profile.registered()?.clone();
        match self.call(&ClientFrame::RequestLink, "a link code")? {
            ServerFrame::LinkCode { code, expires_ms } => Ok((
                Code {
                    addr: reg.server,
                    server_key: reg.server_key,
                    token: code,
                },
                expires_ms,
            )),
            _ => Err(Error::Unexpected("expected LinkCode")),
        }
    }

    /// This account's devices.
    ///
    /// # Errors
    /// Connection failures.
    pub fn my_devices(&mut self) -> Result<Vec<DeviceInfo>, Error> {
        self.connect()?;
        match self.call(&ClientFrame::MyDevices, "the device list")? {
            ServerFrame::MyDevices { devices } => Ok(devices),
            _ => Err(Error::Unexpected("expected MyDevices")),
        }
    }

    /// Revokes one of this account's devices.
    ///
    /// # Errors
    /// `UNKNOWN_DEVICE`; connection failures.
    pub fn revoke(&mut self, device: DeviceId) -> Result<(), Error> {
        self.connect()?;
        match self.call(&ClientFrame::RevokeDevice { device }, "revocation")? {
            ServerFrame::Done => {
                let me = self.me()?;
                let crypto = self.profile.crypto_mut();
                crypto.forget_device(&DeviceAddr { user: me, device })?;
                crypto.persist()?;
                self.profile.history().flush()?;
                Ok(())
            }
            _ => Err(Error::Unexpected("expected Done")),
        }
    }

    /// A user's current devices, as the server lists them.
    pub(super) fn list_devices(&mut self, user: &str) -> Result<Vec<DeviceId>, Error> {
        match self.call(&ClientFrame::ListDevices { user: user.to_owned() }, "a device list")? {
            ServerFrame::Devices { devices, .. } => Ok(devices),
            _ => Err(Error::Unexpected("expected Devices")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::World;
    use crate::wire::ErrorCode;

    #[test]
    fn register_link_list_and_revoke() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        assert!(matches!(
            alice.register(&w.invite(), "alice"),
            Err(Error::AlreadyRegistered(u)) if u == "alice"
        ));
        let e = w
            .client(&tmp.path().join("x"), false)
            .register(&w.invite(), "alice")
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Server {
                    code: ErrorCode::NAME_TAKEN,
                    ..
                }
            ),
            "{e}"
        );
        let e = w
            .client(&tmp.path().join("y"), false)
            .register(&w.invite(), "A!")
            .unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e}");
        let (code, _) = alice.link_code().unwrap();
        let reg = w.client(&tmp.path().join("a2"), false).link(&code).unwrap();
        assert_eq!((reg.user.as_str(), reg.device), ("alice", 2));
        let devices: Vec<u32> = alice.my_devices().unwrap().iter().map(|d| d.device.0).collect();
        assert_eq!(devices, [1, 2]);
        alice.revoke(DeviceId(2)).unwrap();
        let devices: Vec<u32> = alice.my_devices().unwrap().iter().map(|d| d.device.0).collect();
        assert_eq!(devices, [1]);
        let e = alice.revoke(DeviceId(7)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Server {
                    code: ErrorCode::UNKNOWN_DEVICE,
                    ..
                }
            ),
            "{e}"
        );
        // The revoked device is forgotten: a send encrypts for nobody else.
        let _bob = w.user(&tmp.path().join("b"), "bob", false);
        alice.send("bob", "hi").unwrap();
        assert!(w.server().sends().last().unwrap().own.is_empty());
    }

    #[test]
    fn an_unanswered_request_times_out_by_the_drivers_clock() {
        let w = World::new();
        let tmp = tempfile::tempdir().unwrap();
        let mut alice = w.user(&tmp.path().join("a"), "alice", false);
        w.server().fault("MyDevices", crate::client::testing::Fault::Ignore);
        let t0 = alice.now();
        assert!(matches!(alice.my_devices(), Err(Error::Timeout(_))));
        assert_eq!(alice.now() - t0, crate::client::core::ANSWER_TIMEOUT);
        // The connection was dropped; the next request makes a new one.
        assert_eq!(alice.my_devices().unwrap().len(), 1);
    }
}
