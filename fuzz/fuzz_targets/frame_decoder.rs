//! A frame either fails to decode or re-encodes to exactly its input
//! (spec §5: one encoding per frame, no trailing bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::wire::{decode_client, decode_server, encode_client, encode_server};

fuzz_target!(|data: &[u8]| {
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    if let Ok((req, frame)) = decode_client(data, &mut scratch) {
        encode_client(req, &frame, &mut out);
        assert_eq!(out, data, "{frame:?}");
    }
    out.clear();
    if let Ok((req, frame)) = decode_server(data, &mut scratch) {
        encode_server(req, &frame, &mut out);
        assert_eq!(out, data, "{frame:?}");
    }
});
