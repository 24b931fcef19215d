//! Frame encoding and decoding: a `Send` with two 200-byte bodies, the
//! commonest frame on a busy server.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings::wire::{Body, ClientFrame, DeviceId, MsgId, Send, decode_client, encode_client};

fn send_frame() -> ClientFrame {
    let body = |d| Body {
        device: DeviceId(d),
        data: Bytes::from(vec![0xab; 200]),
    };
    ClientFrame::Send(Send {
        id: MsgId([7; 16]),
        to: "bob".into(),
        bodies: vec![body(1), body(2)],
        own: vec![],
    })
}

fn frames(c: &mut Criterion) {
    let frame = send_frame();
    let mut bytes = Vec::new();
    encode_client(42, &frame, &mut bytes);

    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    let mut out = Vec::with_capacity(bytes.len());
    g.bench_function("encode_send_2x200", |b| {
        b.iter(|| {
            out.clear();
            encode_client(42, black_box(&frame), &mut out);
            black_box(&out);
        })
    });
    let mut scratch = Vec::with_capacity(bytes.len());
    g.bench_function("decode_send_2x200", |b| {
        b.iter(|| decode_client(black_box(&bytes), &mut scratch).expect("valid frame"))
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
