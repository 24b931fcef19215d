//! `RecordDecoder::feed` gives the same records, the same outcome and the
//! same leftover however its input is split, and never buffers more than
//! the cap in force allows (spec §3).
//!
//! Input: a 2-byte big-endian cap, 6 chunk lengths, then the stream (the
//! last chunk is whatever the lengths leave). A record's first byte steers
//! the callback: `0xff` stops, `0xf0..=0xfe` sets the next cap to
//! `(b & 0x0f) << 8`, anything else keeps the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::wire::{Flow, RECORD_HEADER_LEN, RecordDecoder, RecordError};

const HEAD: usize = 8;

#[derive(Debug, PartialEq)]
enum End {
    /// All input taken; this many bytes held for an incomplete record.
    Taken(usize),
    Stopped,
    Failed(RecordError),
}

fn next(cap: usize, record: &[u8]) -> Flow {
    match record.first() {
        Some(0xff) => Flow::Stop,
        Some(&b) if b >= 0xf0 => Flow::Continue(usize::from(b & 0x0f) << 8),
        _ => Flow::Continue(cap),
    }
}

/// Feeds `chunks` in order, as a driver would, passing the cap the last
/// record asked for.
fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, mut cap: usize) -> (Vec<Vec<u8>>, End) {
    let mut dec = RecordDecoder::new();
    let mut records = Vec::new();
    for chunk in chunks {
        let res = dec.feed(chunk, cap, |r: &[u8]| {
            records.push(r.to_vec());
            let flow = next(cap, r);
            if let Flow::Continue(c) = flow {
                cap = c;
            }
            Ok::<_, RecordError>(flow)
        });
        match res {
            Ok(true) => assert!(dec.buffered() < RECORD_HEADER_LEN + cap, "buffered past the cap"),
            Ok(false) => return (records, End::Stopped),
            Err(e) => return (records, End::Failed(e)),
        }
    }
    (records, End::Taken(dec.buffered()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let cap = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let mut stream = &data[HEAD..];
    let mut chunks = Vec::new();
    for &n in &data[2..HEAD] {
        let (a, b) = stream.split_at(usize::from(n).min(stream.len()));
        chunks.push(a);
        stream = b;
    }
    chunks.push(stream);
    let whole = run(std::iter::once(&data[HEAD..]), cap);
    let split = run(chunks.into_iter(), cap);
    assert_eq!(whole, split);
});
