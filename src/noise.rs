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
//!
//! Memory: every connection keeps its transport for as long as it is open,
//! so the transport is kept small. snow's ring resolver keeps each
//! direction's ChaCha20-Poly1305 key as a boxed `ring::aead::LessSafeKey`,
//! sized for ring's largest cipher (544 bytes); [`Resolver`] gives snow a
//! cipher that keeps only the 32-byte key and builds ring's key for each
//! record, which costs a copy of 32 bytes. Hashing, randomness and X25519
//! are snow's own (ring's where it has them). The bytes on the wire are
//! the same: `benches/noise.rs` and the tests below check it against snow's
//! stock resolver and the handshake vector.

use std::time::{Duration, Instant};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
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

/// A snow builder with [`Resolver`].
fn builder() -> snow::Builder<'static> {
    snow::Builder::with_resolver(params(), Box::new(Resolver))
}

/// snow's primitives, with [`ChaChaPoly`] for the cipher.
struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        RingResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        RingResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => Some(Box::new(ChaChaPoly::default())),
            _ => None,
        }
    }
}

/// ChaCha20-Poly1305 as Noise uses it (Noise §12.3: the nonce is 32 zero
/// bits then the 64-bit counter, little-endian), keeping only the key.
#[derive(Default)]
struct ChaChaPoly {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl ChaChaPoly {
    fn ring_key(&self) -> Option<LessSafeKey> {
        UnboundKey::new(&CHACHA20_POLY1305, &self.key[..])
            .ok()
            .map(LessSafeKey::new)
    }
}

fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&n.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; KEY_LEN]) {
        self.key.copy_from_slice(key);
    }

    /// Returns the ciphertext's length, or 0 (which every caller treats as
    /// a failure) if `out` is too short; snow's trait has no error here.
    fn encrypt(&self, n: u64, ad: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        let Some(key) = self.ring_key() else { return 0 };
        if out.len() < len + TAG_LEN {
            return 0;
        }
        let (body, rest) = out.split_at_mut(len);
        body.copy_from_slice(plaintext);
        match key.seal_in_place_separate_tag(nonce(n), Aad::from(ad), body) {
            Ok(tag) => {
                rest[..TAG_LEN].copy_from_slice(tag.as_ref());
                len + TAG_LEN
            }
            Err(_) => 0,
        }
    }

    /// Decrypts into `out`, which needs room for the plaintext only (snow's
    /// ring cipher copies the record to the heap when `out` is shorter than
    /// the ciphertext).
    fn decrypt(&self, n: u64, ad: &[u8], ciphertext: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        let len = ciphertext.len().checked_sub(TAG_LEN).ok_or(snow::Error::Decrypt)?;
        let body = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        let (sealed, tag) = ciphertext.split_at(len);
        let tag = Tag::try_from(tag).map_err(|_| snow::Error::Decrypt)?;
        let key = self.ring_key().ok_or(snow::Error::Decrypt)?;
        body.copy_from_slice(sealed);
        key.open_in_place_separate_tag(nonce(n), Aad::from(ad), tag, body, 0..)
            .map(|plain| plain.len())
            .map_err(|_| snow::Error::Decrypt)
    }
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
        let kp = builder().generate_keypair().map_err(|_| NoiseError::Handshake)?;
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
    let mut dh = DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
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
    let mut hs = builder()
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
        let hs = builder()
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
        let transport = Transport::new(self.hs, now)?;
        let remote = *transport.remote_static().ok_or(NoiseError::Handshake)?;
        Ok((transport, remote))
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
}

impl Transport {
    fn new(hs: snow::HandshakeState, now: Instant) -> Result<Transport, NoiseError> {
        let ts = hs.into_transport_mode().map_err(|_| NoiseError::Handshake)?;
        let transport = Transport {
            ts,
            sent_since_rekey: 0,
            rekeyed_at: now,
        };
        transport.remote_static().ok_or(NoiseError::Handshake)?;
        Ok(transport)
    }

    /// The peer's static key: always there once the handshake is done
    /// (snow keeps it; a transport is only made after checking it).
    pub fn remote_static(&self) -> Option<&PublicKey> {
        self.ts.get_remote_static().and_then(|k| k.try_into().ok())
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
        assert_eq!(ct.remote_static(), Some(&server.public));
        (ct, st, client)
    }

    /// The spec's handshake vector, as name → bytes.
    fn vector() -> std::collections::HashMap<String, Vec<u8>> {
        include_str!("../protocol-spec/vectors/handshake.txt")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.trim().to_string(), hex::decode(v.trim()).unwrap())
            })
            .collect()
    }

    fn with_header(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_record(body, &mut out);
        out
    }

    /// The key-only cipher reproduces the spec's vector byte for byte:
    /// handshake, transport records in both directions, a rekey.
    #[test]
    fn key_only_cipher_matches_the_handshake_vector() {
        let v = vector();
        let mut client = builder()
            .local_private_key(&v["client_static_private"])
            .and_then(|b| b.remote_public_key(&v["server_static_public"]))
            .and_then(|b| b.prologue(&PREAMBLE))
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&v["client_ephemeral_private"])
            .build_initiator()
            .unwrap();
        let mut server = builder()
            .local_private_key(&v["server_static_private"])
            .and_then(|b| b.prologue(&PREAMBLE))
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&v["server_ephemeral_private"])
            .build_responder()
            .unwrap();
        let (mut buf, mut payload) = ([0u8; 256], [0u8; 256]);
        for (name, from_client) in [("message1", true), ("message2", false), ("message3", true)] {
            let (from, to) = if from_client {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            let n = from.write_message(&[], &mut buf).unwrap();
            assert_eq!(with_header(&buf[..n]), v[name], "{name}");
            assert_eq!(to.read_message(&buf[..n], &mut payload).unwrap(), 0, "{name}");
        }
        assert_eq!(client.get_handshake_hash(), &v["handshake_hash"][..]);
        let now = Instant::now();
        let mut client = Transport::new(client, now).unwrap();
        let mut server = Transport::new(server, now).unwrap();
        let mut plain = Vec::new();
        let mut check = |from: &mut Transport, to: &mut Transport, frame: &[u8], name: &str| {
            let mut out = Vec::new();
            from.seal_raw(frame, &mut out).unwrap();
            assert_eq!(out, v[name], "{name}");
            let opened = to.open(&out[RECORD_HEADER_LEN..], &mut plain).unwrap();
            assert_eq!(opened == Opened::Rekeyed, frame.is_empty(), "{name}");
            assert_eq!(plain, frame, "{name}");
        };
        check(&mut client, &mut server, &[0x01, 0x00], "c2s_ping");
        check(&mut server, &mut client, &[0x01, 0x00], "s2c_pong");
        check(&mut client, &mut server, &[], "c2s_rekey");
        client.ts.rekey_outgoing();
        check(&mut client, &mut server, &[0x02, 0x00], "c2s_ping_after_rekey");
    }

    /// Our transport against snow's stock resolver (ring's boxed keys) on
    /// the other end, both ways round, across rekeys and record sizes.
    #[test]
    fn key_only_cipher_talks_to_snows_stock_cipher() {
        let server_key = Keypair::generate().unwrap();
        let client_key = Keypair::generate().unwrap();
        let now = Instant::now();
        let mut c2s = Vec::new();
        let hello = client_start(&client_key, &server_key.public, &mut c2s).unwrap();
        let mut stock = snow::Builder::new(params())
            .local_private_key(server_key.private())
            .and_then(|b| b.prologue(&PREAMBLE))
            .and_then(|b| b.build_responder())
            .unwrap();
        let (mut buf, mut payload) = (vec![0u8; 70_000], vec![0u8; 70_000]);
        stock.read_message(&records(&c2s[8..])[0], &mut payload).unwrap();
        let n = stock.write_message(&[], &mut buf).unwrap();
        let mut c2s = Vec::new();
        let mut ours = hello.handle(&buf[..n], now, &mut c2s).unwrap();
        stock.read_message(&records(&c2s)[0], &mut payload).unwrap();
        let mut stock = stock.into_transport_mode().unwrap();

        let mut plain = Vec::new();
        let mut t = now;
        for (i, len) in [1, 2, 15, 16, 17, 200, 250, 4096, MAX_FRAME_LEN]
            .into_iter()
            .enumerate()
        {
            let frame: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            // Ours to stock; every third frame an hour later, so a rekey
            // marker goes first.
            if i % 3 == 2 {
                t += REKEY_AFTER;
            }
            let mut out = Vec::new();
            ours.seal(&frame, t, &mut out).unwrap();
            for r in records(&out) {
                let n = stock.read_message(&r, &mut payload).unwrap();
                if n == 0 {
                    stock.rekey_incoming();
                } else {
                    assert_eq!(&payload[..n], &frame[..]);
                }
            }
            // Stock to ours, with a marker of its own now and then.
            if i % 4 == 3 {
                let n = stock.write_message(&[], &mut buf).unwrap();
                stock.rekey_outgoing();
                assert_eq!(ours.open(&buf[..n], &mut plain), Ok(Opened::Rekeyed));
            }
            let n = stock.write_message(&frame, &mut buf).unwrap();
            assert_eq!(ours.open(&buf[..n], &mut plain), Ok(Opened::Frame));
            assert_eq!(plain, frame);
        }
    }

    #[test]
    fn key_only_cipher_refuses_bad_records_without_panicking() {
        let now = Instant::now();
        let (mut c, mut s, _) = pair(now);
        let mut wire = Vec::new();
        c.seal(b"hello", now, &mut wire).unwrap();
        let body = &records(&wire)[0];
        let mut plain = Vec::new();
        // Too short for a tag, a cut tag, a flipped tag bit.
        assert_eq!(s.open(&body[..TAG_LEN - 1], &mut plain), Err(NoiseError::Decrypt));
        let mut bad = body.clone();
        *bad.last_mut().unwrap() ^= 0x80;
        assert_eq!(s.open(&bad, &mut plain), Err(NoiseError::Decrypt));
        // The cipher itself, with buffers too short.
        let cipher = ChaChaPoly::default();
        assert_eq!(cipher.encrypt(0, &[], b"abc", &mut [0u8; 18]), 0);
        let mut sealed = [0u8; 19];
        assert_eq!(cipher.encrypt(0, &[], b"abc", &mut sealed), 19);
        assert!(cipher.decrypt(0, &[], &sealed, &mut [0u8; 2]).is_err());
        assert!(cipher.decrypt(0, &[], &sealed[..15], &mut [0u8; 32]).is_err());
        let mut out = [0u8; 3];
        assert_eq!(cipher.decrypt(0, &[], &sealed, &mut out).unwrap(), 3);
        assert_eq!(&out, b"abc");
        assert!(cipher.decrypt(1, &[], &sealed, &mut out).is_err());
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
