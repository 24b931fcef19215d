//! Files (spec §14.8): sealing and opening one 61,424-byte chunk with
//! ChaCha20-Poly1305, the SHA-256 every chunk also goes through (the blob
//! id on the sender, the server's check, the plaintext's checksum on the
//! receiver), and encoding and decoding the `UploadChunk` frame that
//! carries it.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tidings::client::attachment::{ChunkCipher, FileKey, PLAIN_CHUNK, SEALED_CHUNK};
use tidings::wire::{BlobId, ClientFrame, UploadChunk, decode_client, encode_client};

fn chunks(c: &mut Criterion) {
    let key = FileKey([0x42; 32]);
    // A file of three chunks: chunk 1 is a middle one.
    let cipher = ChunkCipher::new(&key, 3 * PLAIN_CHUNK as u64);
    let plain = vec![0x5a; PLAIN_CHUNK];
    let mut sealed = plain.clone();
    cipher.seal(1, &mut sealed);

    let mut g = c.benchmark_group("blob");
    g.throughput(Throughput::Bytes(PLAIN_CHUNK as u64));
    let mut buf = Vec::with_capacity(SEALED_CHUNK);
    g.bench_function("seal_chunk", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(&plain));
            cipher.seal(1, &mut buf);
            black_box(&buf);
        })
    });
    g.bench_function("open_chunk", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(&sealed));
            cipher.open(1, &mut buf).expect("opens");
            black_box(&buf);
        })
    });
    g.throughput(Throughput::Bytes(SEALED_CHUNK as u64));
    g.bench_function("sha256_chunk", |b| {
        b.iter(|| black_box(ring::digest::digest(&ring::digest::SHA256, black_box(&sealed))))
    });
    let frame = ClientFrame::UploadChunk(UploadChunk {
        id: BlobId([7; 32]),
        offset: 61_440 * 100,
        data: Bytes::from(sealed.clone()),
    });
    let mut bytes = Vec::new();
    encode_client(42, &frame, &mut bytes);
    let mut out = Vec::with_capacity(bytes.len());
    g.bench_function("encode_upload_chunk", |b| {
        b.iter(|| {
            out.clear();
            encode_client(42, black_box(&frame), &mut out);
            black_box(&out);
        })
    });
    let mut scratch = Vec::with_capacity(bytes.len());
    g.bench_function("decode_upload_chunk", |b| {
        b.iter(|| decode_client(black_box(&bytes), &mut scratch).expect("valid frame"))
    });
    g.finish();
}

criterion_group!(benches, chunks);
criterion_main!(benches);
