//! The Noise layer (spec §4): `Noise_XK_25519_ChaChaPoly_SHA256` through
//! `snow`, with the preamble as prologue.
//!
//! XK: the client knows the server's static key in advance (from its invite
//! or profile) and pins it; the client's own static key travels encrypted in
//! the third message, so an onlooker never learns which device connects.
//! After the handshake each side knows the other's static key.
//!
//! The handshake is modelled as states that consume themselves
//! ([`ExpectServerHello`], [`ExpectClientHello`], [`ExpectClientAuth`]), so
//! a half-finished handshake cannot send transport data. Failures carry no
//! detail ([`NoiseError::Handshake`]): the peer is never told why.
//!
//! [`Transport`] seals frames into records and opens them. Any failure to
//! open a record is fatal for the connection. Rekeying (spec §4.3): a
//! sender rekeys its direction after [`REKEY_AFTER_RECORDS`] records or
//! [`REKEY_AFTER`] of time, whichever comes first, by sending one record
//! with an empty plaintext and then calling `rekey_outgoing`; a receiver
//! that opens an empty record calls `rekey_incoming`. Frames are never
//! empty, so the marker is unambiguous, and the receiver needs no clock.

use std::time::{Duration, Instant};

use snow::params::NoiseParams;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::wire::{self, MAX_FRAME_LEN, PREAMBLE, RECORD_HEADER_LEN, TAG_LEN};

/// The Noise protocol name (spec §4).
pub const NOISE_PARAMS: &str = "Noise_XK_25519_ChaChaPoly_SHA256";
/// Length of a Curve25519 key.
pub const KEY_LEN: usize = 32;
/// A sender rekeys after this many records in its direction (spec §4.3).
pub const REKEY_AFTER_RECORDS: u64 = 1 << 16;
/// A sender rekeys after this much time since the handshake or the last
/// rekey (spec §4.3).
pub const REKEY_AFTER: Duration = Duration::from_secs(3600);

/// A public key.
pub type PublicKey = [u8; KEY_LEN];

/// A Noise failure. Deliberately without detail: nothing here is sent to a
/// peer, and logs need no more than the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NoiseError {
    /// A handshake message was invalid.
    #[error("handshake failed")]
    Handshake,
    /// A transport record failed to authenticate.
    #[error("record failed to decrypt")]
    Decrypt,
    /// A frame too long for one record.
    #[error("frame too long for a record")]
    TooLong,
}

fn params() -> NoiseParams {
    NOISE_PARAMS.parse().expect("the fixed Noise parameter string parses")
}

/// A static Curve25519 key pair. The private half is zeroed on drop.
#[derive(Clone)]
pub struct Keypair {
    /// The public half.
    pub public: PublicKey,
    private: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair({}, <private>)", hex::encode(self.public))
    }
}

impl Keypair {
    /// A fresh key pair from the operating system's randomness.
    ///
    /// # Errors
    /// If the randomness source fails.
    pub fn generate() -> Result<Keypair, NoiseError> {
        let kp = snow::Builder::new(params())
            .generate_keypair()
            .map_err(|_| NoiseError::Handshake)?;
        let private = Zeroizing::new(kp.private);
        Keypair::from_private(&private).ok_or(NoiseError::Handshake)
    }

    /// Rebuilds a key pair from its 32-byte private half.
    pub fn from_private(private: &[u8]) -> Option<Keypair> {
        let private: [u8; KEY_LEN] = private.try_into().ok()?;
        let private = Zeroizing::new(private);
        // X25519 public key = scalar mult of the base point.
        let public = x25519_public(&private);
        Some(Keypair { public, private })
    }

    /// The private half (for storage).
    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }
}

fn x25519_public(private: &[u8; KEY_LEN]) -> PublicKey {
    // snow's own Curve25519 implementation derives the public half.
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("curve25519 is supported");
    dh.set(private);
    let mut public = [0u8; KEY_LEN];
    public.copy_from_slice(dh.pubkey());
    public
}

fn seal_handshake(hs: &mut snow::HandshakeState, out: &mut Vec<u8>) -> Result<(), NoiseError> {
    let mut buf = [0u8; wire::HANDSHAKE_RECORD_CAP];
    let n = hs.write_message(&[], &mut buf).map_err(|_| NoiseError::Handshake)?;
    wire::write_record(&buf[..n], out);
    Ok(())
}

fn open_handshake(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<(), NoiseError> {
    let mut payload = [0u8; wire::HANDSHAKE_RECORD_CAP];
    let n = hs.read_message(body, &mut payload).map_err(|_| NoiseError::Handshake)?;
    // spec §4.2: handshake payloads are empty.
    if n != 0 {
        return Err(NoiseError::Handshake);
    }
    Ok(())
}

/// Client side, step 1: appends the preamble and the first handshake
/// record (`-> e, es`) to `out`.
///
/// # Errors
/// [`NoiseError::Handshake`] if `server` is not a valid key.
pub fn client_start(local: &Keypair, server: &PublicKey, out: &mut Vec<u8>) -> Result<ExpectServerHello, NoiseError> {
    let mut hs = snow::Builder::new(params())
        .local_private_key(local.private())
        .and_then(|b| b.remote_public_key(server))
        .and_then(|b| b.prologue(&PREAMBLE))
        .and_then(|b| b.build_initiator())
        .map_err(|_| NoiseError::Handshake)?;
    out.extend_from_slice(&PREAMBLE);
    seal_handshake(&mut hs, out)?;
    Ok(ExpectServerHello { hs })
}

/// Client, waiting for the server's `<- e, ee`.
pub struct ExpectServerHello {
    hs: snow::HandshakeState,
}

impl ExpectServerHello {
    /// Reads the server's record body and appends the final handshake record
    /// (`-> s, se`) to `out`.
    ///
    /// # Errors
    /// [`NoiseError::Handshake`], without detail.
    pub fn handle(mut self, body: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<Transport, NoiseError> {
        open_handshake(&mut self.hs, body)?;
        seal_handshake(&mut self.hs, out)?;
        Transport::new(self.hs, now)
    }
}

/// Server, waiting for the client's `-> e, es`.
pub struct ExpectClientHello {
    hs: snow::HandshakeState,
}

impl ExpectClientHello {
    /// A responder with the server's static key.
    ///
    /// # Errors
    /// Only if snow rejects the parameters, which are fixed.
    pub fn new(server: &Keypair) -> Result<ExpectClientHello, NoiseError> {
        let hs = snow::Builder::new(params())
            .local_private_key(server.private())
            .and_then(|b| b.prologue(&PREAMBLE))
            .and_then(|b| b.build_responder())
            .map_err(|_| NoiseError::Handshake)?;
        Ok(ExpectClientHello { hs })
    }

    /// Reads the first message and appends the second (`<- e, ee`) to `out`.
    ///
    /// # Errors
    /// [`NoiseError::Handshake`], without detail.
    pub fn handle(mut self, body: &[u8], out: &mut Vec<u8>) -> Result<ExpectClientAuth, NoiseError> {
        open_handshake(&mut self.hs, body)?;
        seal_handshake(&mut self.hs, out)?;
        Ok(ExpectClientAuth { hs: self.hs })
    }
}

/// Server, waiting for the client's `-> s, se`.
pub struct ExpectClientAuth {
    hs: snow::HandshakeState,
}

impl ExpectClientAuth {
    /// Reads the third message; returns the transport and the client's
    /// static key.
    ///
    /// # Errors
    /// [`NoiseError::Handshake`], without detail.
    pub fn handle(mut self, body: &[u8], now: Instant) -> Result<(Transport, PublicKey), NoiseError> {
        open_handshake(&mut self.hs, body)?;
        let remote: PublicKey = self
            .hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or(NoiseError::Handshake)?;
        Ok((Transport::new(self.hs, now)?, remote))
    }
}

/// What an opened record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// A frame's bytes, now in the caller's buffer.
    Frame,
    /// The peer's rekey marker; already acted on.
    Rekeyed,
}

/// An established Noise transport.
pub struct Transport {
    ts: snow::TransportState,
    sent_since_rekey: u64,
    rekeyed_at: Instant,
    remote: PublicKey,
}

impl Transport {
    fn new(hs: snow::HandshakeState, now: Instant) -> Result<Transport, NoiseError> {
        let remote = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or(NoiseError::Handshake)?;
        let ts = hs.into_transport_mode().map_err(|_| NoiseError::Handshake)?;
        Ok(Transport {
            ts,
            sent_since_rekey: 0,
            rekeyed_at: now,
            remote,
        })
    }

    /// The peer's static key.
    pub fn remote_static(&self) -> &PublicKey {
        &self.remote
    }

    fn seal_raw(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let start = out.len();
        let len = plain.len() + TAG_LEN;
        out.resize(start + RECORD_HEADER_LEN + len, 0);
        match self.ts.write_message(plain, &mut out[start + RECORD_HEADER_LEN..]) {
            Ok(n) if n == len => {
                out[start..start + RECORD_HEADER_LEN].copy_from_slice(&(len as u16).to_be_bytes());
                Ok(())
            }
            _ => {
                out.truncate(start);
                Err(NoiseError::TooLong)
            }
        }
    }

    /// Encrypts one frame's bytes as a record appended to `out`, rekeying
    /// first if this direction is due (spec §4.3).
    ///
    /// # Errors
    /// [`NoiseError::TooLong`] if `plain` is empty or longer than a frame
    /// may be; `out` is left as it was.
    pub fn seal(&mut self, plain: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<(), NoiseError> {
        if plain.is_empty() || plain.len() > MAX_FRAME_LEN {
            return Err(NoiseError::TooLong);
        }
        if self.sent_since_rekey >= REKEY_AFTER_RECORDS || now.saturating_duration_since(self.rekeyed_at) >= REKEY_AFTER
        {
            self.seal_raw(&[], out)?;
            self.ts.rekey_outgoing();
            self.sent_since_rekey = 0;
            self.rekeyed_at = now;
        }
        self.seal_raw(plain, out)?;
        self.sent_since_rekey += 1;
        Ok(())
    }

    /// Decrypts a record body into `plain` (cleared first).
    ///
    /// # Errors
    /// [`NoiseError::Decrypt`]; the transport must not be used again.
    pub fn open(&mut self, body: &[u8], plain: &mut Vec<u8>) -> Result<Opened, NoiseError> {
        if body.len() < TAG_LEN {
            return Err(NoiseError::Decrypt);
        }
        plain.clear();
        plain.resize(body.len() - TAG_LEN, 0);
        let n = self.ts.read_message(body, plain).map_err(|_| NoiseError::Decrypt)?;
        plain.truncate(n);
        if n == 0 {
            self.ts.rekey_incoming();
            return Ok(Opened::Rekeyed);
        }
        Ok(Opened::Frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flow, RecordDecoder, RecordError};

    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        RecordDecoder::new()
            .feed(bytes, usize::MAX, |r: &[u8]| {
                out.push(r.to_vec());
                Ok::<_, RecordError>(Flow::Continue(usize::MAX))
            })
            .unwrap();
        out
    }

    pub(crate) fn pair(now: Instant) -> (Transport, Transport, Keypair) {
        let server = Keypair::generate().unwrap();
        let client = Keypair::generate().unwrap();
        let mut c2s = Vec::new();
        let hello = client_start(&client, &server.public, &mut c2s).unwrap();
        assert_eq!(&c2s[..8], &PREAMBLE);
        let m1 = records(&c2s[8..]);
        assert_eq!(m1[0].len(), 48);
        let mut s2c = Vec::new();
        let auth = ExpectClientHello::new(&server)
            .unwrap()
            .handle(&m1[0], &mut s2c)
            .unwrap();
        let m2 = records(&s2c);
        assert_eq!(m2[0].len(), 48);
        let mut c2s = Vec::new();
        let ct = hello.handle(&m2[0], now, &mut c2s).unwrap();
        let m3 = records(&c2s);
        assert_eq!(m3[0].len(), 64);
        let (st, remote) = auth.handle(&m3[0], now).unwrap();
        assert_eq!(remote, client.public);
        assert_eq!(ct.remote_static(), &server.public);
        (ct, st, client)
    }

    #[test]
    fn public_key_derivation_matches_snow() {
        let kp = snow::Builder::new(params()).generate_keypair().unwrap();
        let ours = Keypair::from_private(&kp.private).unwrap();
        assert_eq!(&ours.public[..], &kp.public[..]);
    }

    #[test]
    fn handshake_and_transport() {
        let now = Instant::now();
        let (mut c, mut s, _) = pair(now);
        let mut wire = Vec::new();
        c.seal(b"hi", now, &mut wire).unwrap();
        let recs = records(&wire);
        let mut plain = Vec::new();
        assert_eq!(s.open(&recs[0], &mut plain), Ok(Opened::Frame));
        assert_eq!(plain, b"hi");
        // A flipped bit is fatal.
        let mut wire = Vec::new();
        c.seal(b"hi", now, &mut wire).unwrap();
        wire[3] ^= 1;
        assert_eq!(s.open(&records(&wire)[0], &mut plain), Err(NoiseError::Decrypt));
    }

    #[test]
    fn wrong_server_key_fails_without_detail() {
        let server = Keypair::generate().unwrap();
        let other = Keypair::generate().unwrap();
        let client = Keypair::generate().unwrap();
        let mut c2s = Vec::new();
        let _hello = client_start(&client, &other.public, &mut c2s).unwrap();
        let m1 = records(&c2s[8..]);
        let mut s2c = Vec::new();
        let r = ExpectClientHello::new(&server).unwrap().handle(&m1[0], &mut s2c);
        assert!(matches!(r, Err(NoiseError::Handshake)));
    }

    #[test]
    fn rekeys_by_age_and_count() {
        let t0 = Instant::now();
        let (mut c, mut s, _) = pair(t0);
        let mut plain = Vec::new();
        // By age: the next seal after REKEY_AFTER emits a marker first.
        let mut wire = Vec::new();
        c.seal(b"x", t0 + REKEY_AFTER, &mut wire).unwrap();
        let recs = records(&wire);
        assert_eq!(recs.len(), 2);
        assert_eq!(s.open(&recs[0], &mut plain), Ok(Opened::Rekeyed));
        assert_eq!(s.open(&recs[1], &mut plain), Ok(Opened::Frame));
        assert_eq!(plain, b"x");
        // By count.
        let mut rekeys = 0;
        for _ in 0..REKEY_AFTER_RECORDS + 1 {
            let mut wire = Vec::new();
            s.seal(b"y", t0, &mut wire).unwrap();
            for r in records(&wire) {
                if c.open(&r, &mut plain).unwrap() == Opened::Rekeyed {
                    rekeys += 1;
                }
            }
        }
        assert_eq!(rekeys, 1);
        assert_eq!(plain, b"y");
    }
}
