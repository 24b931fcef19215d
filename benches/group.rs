//! The client's cost to send one text to a group of 256 members (one
//! device each), with the client's own end-to-end code ([`Crypto`]: its
//! records, pickled and encrypted as it stores them):
//!
//! - **Megolm once**: one group body, encrypted once with the device's
//!   outbound session (spec §14.9), what a `GroupSend` carries;
//! - **Olm each**: the same text encrypted for each of the 256 devices on
//!   its Olm session, what 256 direct sends would carry;
//! - **key share**: what a new or rotated session costs once (its key
//!   over Olm to each of the 256 devices); a session serves up to 100
//!   messages.
//!
//! Each measures encryption and the state records the client writes with
//! it (not the flush to disk, the same for both).
//!
//! `cargo bench --bench group`

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tidings::client::content::{Content, Payload};
use tidings::client::e2e::Crypto;
use tidings::client::history::{Batch, History};
use tidings::wire::{DeviceAddr, DeviceId, DeviceKeys, GroupId, IdentityKeys, MsgId, Signature, SignedKey};
use vodozemac::olm::Account;

const MEMBERS: usize = 256;
const G: GroupId = GroupId([9; 16]);

/// Keys as a device publishes them and another claims them.
fn claimed(account: &mut Account) -> DeviceKeys {
    let curve25519 = account.curve25519_key().to_bytes();
    let ed25519 = *account.ed25519_key().as_bytes();
    let sign = |a: &Account, m: &[u8]| Signature(a.sign(m).to_bytes());
    account.generate_one_time_keys(1);
    let otk = account.one_time_keys().into_values().next().unwrap().to_bytes();
    account.mark_keys_as_published();
    DeviceKeys {
        device: DeviceId(1),
        identity: IdentityKeys {
            curve25519,
            ed25519,
            signature: sign(account, &tidings::keys::identity_message(&curve25519, &ed25519)),
        },
        one_time: Some(SignedKey {
            key: otk,
            signature: sign(account, &tidings::keys::one_time_message(&otk)),
        }),
        fallback: false,
    }
}

fn member(i: usize) -> DeviceAddr {
    DeviceAddr {
        user: format!("member{i:03}"),
        device: DeviceId(1),
    }
}

/// A sender with an Olm session with each of the members' devices.
fn sender(dir: &std::path::Path) -> (History, Crypto) {
    let h = History::open(dir).unwrap();
    let mut c = Crypto::open(h.e2e(), None).unwrap();
    c.ensure_account().unwrap();
    let mut notices = Vec::new();
    for i in 0..MEMBERS {
        let mut a = Account::new();
        let keys = claimed(&mut a);
        assert!(c.accept_claimed(&member(i).user, &keys, false, &mut notices).unwrap());
    }
    h.apply(Batch::default(), c.take_writes()).unwrap();
    (h, c)
}

fn text(to: &str) -> Vec<u8> {
    Payload {
        id: MsgId([1; 16]),
        to: to.into(),
        ts_ms: 1,
        content: Content::Text("x".repeat(200)),
    }
    .encode()
    .unwrap()
}

fn group(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let (history, mut crypto) = sender(tmp.path());
    crypto.new_outbound(G, 0).unwrap();
    // Stored as a client stores it; each iteration below encrypts with it
    // and drops its writes, so every one starts from the same state.
    history.apply(Batch::default(), crypto.take_writes()).unwrap();
    let mut g = c.benchmark_group("send a 200-byte text to 256 members");
    g.sample_size(20);
    let plain = text(&G.tag());
    g.bench_function("megolm once (one group body)", |b| {
        b.iter(|| {
            let body = crypto.group_encrypt(G, black_box(&plain)).unwrap();
            // A session is rotated after 100 messages; the bench keeps one.
            let writes = crypto.take_writes();
            (body, writes)
        })
    });
    let mut notices = Vec::new();
    g.bench_function("olm each (256 bodies)", |b| {
        b.iter(|| {
            let mut bodies = Vec::with_capacity(MEMBERS);
            for i in 0..MEMBERS {
                let to = member(i);
                let p = text(&to.user);
                bodies.push(crypto.encrypt(&to, black_box(&p), &mut notices).unwrap());
            }
            let writes = crypto.take_writes();
            (bodies, writes)
        })
    });
    g.bench_function("megolm key share (once a session: 256 olm bodies)", |b| {
        b.iter(|| {
            let key = crypto.outbound_key(G).unwrap();
            let mut bodies = Vec::with_capacity(MEMBERS);
            for i in 0..MEMBERS {
                let to = member(i);
                let p = Payload {
                    id: MsgId([2; 16]),
                    to: to.user.clone(),
                    ts_ms: 1,
                    content: Content::GroupKey {
                        group: G,
                        session_key: key.clone(),
                    },
                }
                .encode()
                .unwrap();
                bodies.push(crypto.encrypt(&to, &p, &mut notices).unwrap());
            }
            let writes = crypto.take_writes();
            (bodies, writes)
        })
    });
    g.finish();
}

criterion_group!(benches, group);
criterion_main!(benches);
