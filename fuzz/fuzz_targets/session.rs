//! A server `Session` never panics on input, whatever the bytes, their
//! split, their timing or the caller's answers; and everything it writes
//! after a handshake opens and decodes for a real client.
//!
//! Input: a flags byte, a clock step in seconds, 6 chunk lengths, then the
//! payload (the last chunk is whatever the lengths leave).
//! - flags bit 0: the valid preamble goes first, so the fuzzer reaches the
//!   handshake;
//! - flags bit 1: a real client does the handshake first, and each chunk
//!   is then the plaintext of one transport record, so the fuzzer reaches
//!   frame handling (no fuzzer can forge the third handshake message: it
//!   depends on the server's fresh ephemeral key);
//! - flags bits 2-3: what `identify` says: 1 a device, 2 revoked, else
//!   unregistered.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tidings::ids::{DeviceKey, UserId};
use tidings::noise::{self, Keypair, Opened, Transport};
use tidings::session::{Event, Identity, Session, SessionConfig};
use tidings::wire::{
    self, ClientFrame, DeviceId, Flow, MAX_RECORD_LEN, PREAMBLE, RecordDecoder, RecordError, ServerFrame,
};

const HEAD: usize = 8;
/// Key derivation is a scalar multiplication: do it once, not per input.
static SERVER: LazyLock<Arc<Keypair>> =
    LazyLock::new(|| Arc::new(Keypair::from_private(&[7u8; 32]).expect("32 bytes")));
static CLIENT: LazyLock<Keypair> = LazyLock::new(|| Keypair::from_private(&[9u8; 32]).expect("32 bytes"));
const DEVICE: DeviceKey = DeviceKey {
    user: UserId(1),
    device: DeviceId(1),
};

/// A real client reading what the server writes.
struct Client {
    transport: Transport,
    decoder: RecordDecoder,
    plain: Vec<u8>,
    scratch: Vec<u8>,
}

impl Client {
    fn read(&mut self, bytes: &[u8]) {
        let Client {
            transport,
            plain,
            scratch,
            ..
        } = self;
        self.decoder
            .feed(bytes, MAX_RECORD_LEN, |r: &[u8]| {
                if transport.open(r, plain).expect("server record opens") == Opened::Frame {
                    wire::decode_server(plain, scratch).expect("server frame decodes");
                }
                Ok::<_, RecordError>(Flow::Continue(MAX_RECORD_LEN))
            })
            .expect("server records fit");
    }
}

/// Writes out up to half of the session's pending output (rounded up), as
/// a slow socket would, handing it to the client if there is one.
fn write_some(session: &mut Session, client: &mut Option<Client>) {
    let n = session.transmit().len().div_ceil(2);
    if let Some(c) = client {
        c.read(&session.transmit()[..n]);
    }
    session.advance(n);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let (flags, step) = (data[0], Duration::from_secs(u64::from(data[1])));
    let identity = match (flags >> 2) & 3 {
        1 => Identity::Device(DEVICE),
        2 => Identity::Revoked,
        _ => Identity::Unregistered,
    };
    let mut identify = |_: &noise::PublicKey| identity;
    let mut now = Instant::now();
    let mut session = Session::new(SERVER.clone(), SessionConfig::default(), now);

    let mut client = None;
    if flags & 2 != 0 {
        let mut c2s = Vec::new();
        let hello = noise::client_start(&CLIENT, &SERVER.public, &mut c2s).expect("valid key");
        session.handle_input(&c2s, now, &mut identify);
        let s2c = session.transmit().to_vec();
        session.advance(s2c.len());
        c2s.clear();
        let transport = hello.handle(&s2c[2..], now, &mut c2s).expect("server hello");
        session.handle_input(&c2s, now, &mut identify);
        client = Some(Client {
            transport,
            decoder: RecordDecoder::new(),
            plain: Vec::new(),
            scratch: Vec::new(),
        });
    } else if flags & 1 != 0 {
        session.handle_input(&PREAMBLE, now, &mut identify);
    }

    let mut payload = &data[HEAD..];
    let mut chunks = Vec::new();
    for &n in &data[2..HEAD] {
        let (a, b) = payload.split_at(usize::from(n).min(payload.len()));
        chunks.push(a);
        payload = b;
    }
    chunks.push(payload);

    let mut sealed = Vec::new();
    for chunk in chunks {
        let bytes = match &mut client {
            Some(c) => {
                sealed.clear();
                // An empty chunk cannot be a frame: send nothing.
                let _ = c.transport.seal(chunk, now, &mut sealed);
                &sealed[..]
            }
            None => chunk,
        };
        session.handle_input(bytes, now, &mut identify);
        while let Some(event) = session.poll_event() {
            match event {
                Event::Frame {
                    frame: ClientFrame::Register { .. } | ClientFrame::RedeemLink { .. },
                    ..
                } => session.set_device(DEVICE),
                Event::Frame { req, .. } => {
                    session.send(req, &ServerFrame::Done, now);
                }
                Event::Authenticated(_) => {}
            }
        }
        write_some(&mut session, &mut client);
        now += step;
        session.handle_timeout(now);
    }
    while !session.transmit().is_empty() {
        write_some(&mut session, &mut client);
    }
    let _ = (session.poll_timeout(), session.is_closed(), session.phase());
});
