//! Olm as the client uses it (vodozemac, session config version 1): one
//! 200-byte body encrypted and decrypted on an established session, and
//! first contact (an outbound session from claimed keys, its first
//! pre-key message, and the recipient's inbound session from it). Also the
//! pickling the client does after each message (pickle, encrypt, decrypt,
//! unpickle a session).
//!
//! `cargo bench --bench olm`

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tidings::client::content::{Envelope, OlmKind};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig, SessionPickle};

const PLAINTEXT: [u8; 200] = [0x5a; 200];

/// Alice and bob with a session that has run both ways (so messages are
/// normal, not pre-key).
fn established() -> (Session, Session) {
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().unwrap();
    bob.mark_keys_as_published();
    let mut a = alice
        .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
        .unwrap();
    let first = a.encrypt(PLAINTEXT).unwrap();
    let OlmMessage::PreKey(pre) = &first else {
        unreachable!()
    };
    let mut b = bob
        .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), pre)
        .unwrap()
        .session;
    let back = b.encrypt(PLAINTEXT).unwrap();
    a.decrypt(&back).unwrap();
    (a, b)
}

/// The body bytes the client sends: the envelope around the Olm message.
fn body(m: &OlmMessage) -> bytes::Bytes {
    let (kind, ciphertext) = m.to_parts();
    Envelope {
        kind: OlmKind::from_olm(kind).unwrap(),
        ciphertext: ciphertext.into(),
    }
    .encode()
}

fn open(body: &[u8]) -> OlmMessage {
    let env = Envelope::decode(body).unwrap();
    OlmMessage::from_parts(env.kind.to_olm(), &env.ciphertext).unwrap()
}

fn olm(c: &mut Criterion) {
    let mut g = c.benchmark_group("olm");
    let (mut a, _) = established();
    g.bench_function("encrypt 200 B", |bench| {
        bench.iter(|| body(&a.encrypt(black_box(PLAINTEXT)).unwrap()))
    });

    // A fresh pair for decryption, so that the messages arrive in order.
    let (mut a, mut b) = established();
    g.bench_function("decrypt 200 B", |bench| {
        bench.iter_batched(
            || body(&a.encrypt(PLAINTEXT).unwrap()),
            |bytes| {
                let pt = b.decrypt(&open(&bytes)).unwrap();
                assert_eq!(pt.len(), 200);
                pt
            },
            BatchSize::SmallInput,
        )
    });

    let alice = Account::new();
    let bob = std::cell::RefCell::new(Account::new());
    g.bench_function("first contact (outbound + pre-key + inbound)", |bench| {
        bench.iter_batched(
            || {
                let mut bob = bob.borrow_mut();
                bob.generate_one_time_keys(1);
                let otk = *bob.one_time_keys().values().next().unwrap();
                bob.mark_keys_as_published();
                otk
            },
            |otk| {
                let mut bob = bob.borrow_mut();
                let mut out = alice
                    .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
                    .unwrap();
                let bytes = body(&out.encrypt(PLAINTEXT).unwrap());
                let OlmMessage::PreKey(pre) = open(&bytes) else {
                    unreachable!()
                };
                let created = bob
                    .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &pre)
                    .unwrap();
                assert_eq!(created.plaintext.len(), 200);
                (out, created.session)
            },
            BatchSize::SmallInput,
        )
    });

    let (s, _) = established();
    let key = [7u8; 32];
    g.bench_function("session pickle round trip", |bench| {
        bench.iter(|| {
            let text = s.pickle().encrypt(&key);
            Session::from_pickle(SessionPickle::from_encrypted(&text, &key).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, olm);
criterion_main!(benches);
