//! The Noise layer: a full XK handshake (both sides) and the transport's
//! per-record cost.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings::noise::{ExpectClientHello, Keypair, Transport, client_start};
use tidings::wire::{PREAMBLE_LEN, RECORD_HEADER_LEN};

/// Both sides of one handshake; returns the client's and the server's
/// transports.
fn handshake(client: &Keypair, server: &Keypair, now: Instant) -> (Transport, Transport) {
    // Each message is one record; the first follows the preamble.
    let mut c2s = Vec::with_capacity(128);
    let hello = client_start(client, &server.public, &mut c2s).expect("client start");
    let mut s2c = Vec::with_capacity(128);
    let auth = ExpectClientHello::new(server)
        .and_then(|h| h.handle(&c2s[PREAMBLE_LEN + RECORD_HEADER_LEN..], &mut s2c))
        .expect("client hello");
    c2s.clear();
    let ct = hello
        .handle(&s2c[RECORD_HEADER_LEN..], now, &mut c2s)
        .expect("server hello");
    let (st, _) = auth.handle(&c2s[RECORD_HEADER_LEN..], now).expect("client auth");
    (ct, st)
}

fn noise(c: &mut Criterion) {
    let client = Keypair::generate().expect("keypair");
    let server = Keypair::generate().expect("keypair");
    let now = Instant::now();

    let mut g = c.benchmark_group("noise");
    g.bench_function("handshake_xk", |b| {
        b.iter(|| black_box(handshake(black_box(&client), black_box(&server), now)))
    });

    let (mut ct, mut st) = handshake(&client, &server, now);
    let frame = [0x5a; 200];
    let mut wire = Vec::with_capacity(512);
    let mut plain = Vec::with_capacity(512);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("seal_open_200", |b| {
        b.iter(|| {
            wire.clear();
            ct.seal(black_box(&frame), now, &mut wire).expect("seal");
            // Usually one record; every 2^16 records a rekey marker first.
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let (record, tail) = rest[RECORD_HEADER_LEN..].split_at(len);
                st.open(record, &mut plain).expect("open");
                rest = tail;
            }
            black_box(&plain);
        })
    });
    g.finish();
}

criterion_group!(benches, noise);
criterion_main!(benches);
