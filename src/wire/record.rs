//! Record framing (spec §3): a 2-byte big-endian length, then that many
//! bytes of body.
//!
//! [`RecordDecoder`] is incremental and keeps nothing for complete records:
//! records that arrive whole are handed to the caller straight from the
//! input slice, and only the tail of a record split across reads is copied
//! into its buffer, which is allocated to that record's declared size (after
//! the cap check) and released once the record is complete. A connected but
//! quiet peer therefore costs no buffer at all, whatever it sent before.

use thiserror::Error;

/// Length of the record header.
pub const RECORD_HEADER_LEN: usize = 2;

/// A decoding failure. The stream cannot be resynchronised after one, so
/// the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RecordError {
    /// The header declares more than the current state allows.
    #[error("record of {len} bytes exceeds the cap of {cap}")]
    TooLong {
        /// The declared length.
        len: usize,
        /// The cap in force.
        cap: usize,
    },
}

/// What the record callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on, with this cap for the next record.
    Continue(usize),
    /// Stop decoding; the caller ignores the rest of the input.
    Stop,
}

/// Reassembles records from arbitrarily split input.
#[derive(Debug, Default)]
pub struct RecordDecoder {
    /// Header and body bytes of one incomplete record; empty otherwise.
    partial: Vec<u8>,
}

impl RecordDecoder {
    /// A decoder holding nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held for an incomplete record.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Capacity currently allocated (for memory accounting in tests).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds `input`, calling `on_record` with the body of every complete
    /// record, in order. `cap` bounds the first record; the callback returns
    /// the cap for the next one. Returns `Ok(true)` if all input was taken,
    /// `Ok(false)` if the callback said [`Flow::Stop`].
    ///
    /// # Errors
    /// [`RecordError::TooLong`] (converted into `E`) as soon as a header
    /// exceeds its cap, before any of that body is buffered; or whatever
    /// `on_record` returns.
    pub fn feed<E: From<RecordError>>(
        &mut self,
        mut input: &[u8],
        mut cap: usize,
        mut on_record: impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<bool, E> {
        // Finish a record split across earlier reads.
        if !self.partial.is_empty() {
            if self.partial.len() < RECORD_HEADER_LEN {
                let take = (RECORD_HEADER_LEN - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < RECORD_HEADER_LEN {
                    return Ok(true);
                }
                let len = u16::from_be_bytes([self.partial[0], self.partial[1]]) as usize;
                if len > cap {
                    self.partial = Vec::new();
                    return Err(RecordError::TooLong { len, cap }.into());
                }
                self.partial.reserve_exact(len);
            }
            let len = u16::from_be_bytes([self.partial[0], self.partial[1]]) as usize;
            let need = RECORD_HEADER_LEN + len - self.partial.len();
            let take = need.min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if take < need {
                return Ok(true);
            }
            let flow = on_record(&self.partial[RECORD_HEADER_LEN..]);
            self.partial = Vec::new();
            match flow? {
                Flow::Continue(next) => cap = next,
                Flow::Stop => return Ok(false),
            }
        }
        // Whole records straight from the input.
        while input.len() >= RECORD_HEADER_LEN {
            let len = u16::from_be_bytes([input[0], input[1]]) as usize;
            if len > cap {
                return Err(RecordError::TooLong { len, cap }.into());
            }
            let end = RECORD_HEADER_LEN + len;
            if input.len() < end {
                break;
            }
            match on_record(&input[RECORD_HEADER_LEN..end])? {
                Flow::Continue(next) => cap = next,
                Flow::Stop => return Ok(false),
            }
            input = &input[end..];
        }
        // Keep the start of the next record.
        if !input.is_empty() {
            if input.len() >= RECORD_HEADER_LEN {
                let len = u16::from_be_bytes([input[0], input[1]]) as usize;
                self.partial.reserve_exact(RECORD_HEADER_LEN + len);
            }
            self.partial.extend_from_slice(input);
        }
        Ok(true)
    }
}

/// Appends a record header and `body` to `out`.
///
/// # Panics
/// If `body` is longer than [`super::MAX_RECORD_LEN`]; callers build bodies
/// within the limit.
pub fn write_record(body: &[u8], out: &mut Vec<u8>) {
    let len = u16::try_from(body.len()).expect("record body within u16");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(dec: &mut RecordDecoder, input: &[u8], cap: usize, out: &mut Vec<Vec<u8>>) -> Result<bool, RecordError> {
        dec.feed(input, cap, |r: &[u8]| {
            out.push(r.to_vec());
            Ok::<_, RecordError>(Flow::Continue(cap))
        })
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut stream = Vec::new();
        write_record(b"hello", &mut stream);
        write_record(b"", &mut stream);
        write_record(&[9; 300], &mut stream);
        let mut dec = RecordDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            collect(&mut dec, std::slice::from_ref(b), 1000, &mut got).unwrap();
        }
        assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![9; 300]]);
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.capacity(), 0);
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut dec = RecordDecoder::new();
        let mut got = Vec::new();
        // Header alone, split: refused once the second byte arrives.
        assert!(collect(&mut dec, &[0x01], 128, &mut got).is_ok());
        let err = collect(&mut dec, &[0x00], 128, &mut got).unwrap_err();
        assert_eq!(err, RecordError::TooLong { len: 256, cap: 128 });
        assert_eq!(dec.capacity(), 0);
        // Header with a body following in the same read.
        let mut dec = RecordDecoder::new();
        let err = collect(&mut dec, &[0xff, 0xff, 0, 0, 0], 128, &mut got).unwrap_err();
        assert_eq!(err, RecordError::TooLong { len: 65535, cap: 128 });
        assert_eq!(dec.capacity(), 0);
        assert!(got.is_empty());
    }

    #[test]
    fn stop_leaves_the_rest() {
        let mut stream = Vec::new();
        write_record(b"a", &mut stream);
        write_record(b"b", &mut stream);
        let mut dec = RecordDecoder::new();
        let mut n = 0;
        let all = dec
            .feed(&stream, 10, |_r: &[u8]| {
                n += 1;
                Ok::<_, RecordError>(Flow::Stop)
            })
            .unwrap();
        assert!(!all);
        assert_eq!(n, 1);
    }

    #[test]
    fn cap_changes_between_records() {
        let mut stream = Vec::new();
        write_record(&[1; 10], &mut stream);
        write_record(&[2; 100], &mut stream);
        let mut dec = RecordDecoder::new();
        // The first record is allowed 10 bytes and raises the cap to 100.
        let res = dec.feed(&stream, 10, |_r: &[u8]| Ok::<_, RecordError>(Flow::Continue(100)));
        assert_eq!(res, Ok(true));
        // With the cap left at 10 the second record is refused.
        let mut dec = RecordDecoder::new();
        let res = dec.feed(&stream, 10, |_r: &[u8]| Ok::<_, RecordError>(Flow::Continue(10)));
        assert_eq!(res, Err(RecordError::TooLong { len: 100, cap: 10 }));
    }
}
