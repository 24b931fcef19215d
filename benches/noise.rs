//! The Noise layer: a full XK handshake (both sides) and the transport's
//! per-record cost.
//!
//! `record_250` puts the transport the daemon uses (`tidings::noise`, whose
//! ChaCha20-Poly1305 keeps only its 32-byte key) next to snow's own
//! resolvers on the same 250-byte frame: `snow_ring` is snow with
//! `ring-accelerated` as it comes (a boxed ring key per direction, about
//! 540 bytes each), `snow_rustcrypto` is snow's pure-Rust resolver. `seal`
//! encrypts one frame, `open` decrypts one; the relay seals a `Deliver`
//! for every copy and opens every `Send`, so both are on its hot path.
//!
//! Times are the benchmarking thread's CPU time, not wall time: on a
//! machine shared with builds and load tests, being descheduled inflates
//! wall time by whole multiples, CPU time hardly at all.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use tidings::noise::{ExpectClientHello, Keypair, NOISE_PARAMS, Transport, client_start};
use tidings::wire::{PREAMBLE, PREAMBLE_LEN, RECORD_HEADER_LEN, TAG_LEN};

/// Criterion measurement: CPU time of the thread running the benchmark
/// (`CLOCK_THREAD_CPUTIME_ID`), shown like wall time.
struct ThreadCpuTime(WallTime);

fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.unsigned_abs(), t.tv_nsec.unsigned_abs() as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

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

/// The same handshake straight through snow with `resolver`.
fn snow_handshake(
    client: &Keypair,
    server: &Keypair,
    resolver: fn() -> BoxedCryptoResolver,
) -> (snow::TransportState, snow::TransportState) {
    let builder = || snow::Builder::with_resolver(NOISE_PARAMS.parse().expect("params"), resolver());
    let mut c = builder()
        .local_private_key(client.private())
        .and_then(|b| b.remote_public_key(&server.public))
        .and_then(|b| b.prologue(&PREAMBLE))
        .and_then(|b| b.build_initiator())
        .expect("initiator");
    let mut s = builder()
        .local_private_key(server.private())
        .and_then(|b| b.prologue(&PREAMBLE))
        .and_then(|b| b.build_responder())
        .expect("responder");
    let (mut msg, mut payload) = ([0u8; 128], [0u8; 128]);
    let n = c.write_message(&[], &mut msg).expect("-> e, es");
    s.read_message(&msg[..n], &mut payload).expect("read e, es");
    let n = s.write_message(&[], &mut msg).expect("<- e, ee");
    c.read_message(&msg[..n], &mut payload).expect("read e, ee");
    let n = c.write_message(&[], &mut msg).expect("-> s, se");
    s.read_message(&msg[..n], &mut payload).expect("read s, se");
    (
        c.into_transport_mode().expect("client transport"),
        s.into_transport_mode().expect("server transport"),
    )
}

fn snow_ring() -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver)))
}

fn snow_rustcrypto() -> BoxedCryptoResolver {
    Box::new(DefaultResolver)
}

/// How many records a timed `open` run may need, sealed beforehand.
const OPEN_BATCH: u64 = 4096;

fn noise(c: &mut Criterion<ThreadCpuTime>) {
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

    record_250(c, &client, &server, now);
}

fn record_250(c: &mut Criterion<ThreadCpuTime>, client: &Keypair, server: &Keypair, now: Instant) {
    let frame = [0x5a; 250];
    let mut g = c.benchmark_group("record_250");
    g.throughput(Throughput::Bytes(frame.len() as u64));

    // The transport the daemon and the client library use.
    let (mut ct, _) = handshake(client, server, now);
    let mut wire = Vec::with_capacity(1024);
    g.bench_function("tidings/seal", |b| {
        b.iter(|| {
            wire.clear();
            ct.seal(black_box(&frame), now, &mut wire).expect("seal");
            black_box(&wire);
        })
    });
    // A fresh pair: the sender's nonces must match the receiver's.
    let (mut ct, mut st) = handshake(client, server, now);
    let mut plain = Vec::with_capacity(1024);
    g.bench_function("tidings/open", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(OPEN_BATCH);
                left -= n;
                let mut sealed = Vec::with_capacity(n as usize * (RECORD_HEADER_LEN + frame.len() + TAG_LEN + 32));
                for _ in 0..n {
                    ct.seal(&frame, now, &mut sealed).expect("seal");
                }
                let start = thread_cpu_time();
                let mut rest = &sealed[..];
                while !rest.is_empty() {
                    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                    let (record, tail) = rest[RECORD_HEADER_LEN..].split_at(len);
                    st.open(black_box(record), &mut plain).expect("open");
                    rest = tail;
                }
                took += thread_cpu_time().saturating_sub(start);
            }
            took
        })
    });

    // snow's transport with its own resolvers, for comparison.
    for (name, resolver) in [
        ("snow_ring", snow_ring as fn() -> BoxedCryptoResolver),
        ("snow_rustcrypto", snow_rustcrypto),
    ] {
        let (mut ct, _) = snow_handshake(client, server, resolver);
        let mut msg = [0u8; 512];
        g.bench_function(format!("{name}/seal"), |b| {
            b.iter(|| black_box(ct.write_message(black_box(&frame), &mut msg).expect("seal")))
        });
        // As `Transport::open` calls it: a payload buffer as long as the
        // plaintext, not the record.
        let (mut ct, mut st) = snow_handshake(client, server, resolver);
        let mut payload = vec![0u8; frame.len()];
        g.bench_function(format!("{name}/open"), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                let mut left = iters;
                let len = frame.len() + TAG_LEN;
                while left > 0 {
                    let n = left.min(OPEN_BATCH) as usize;
                    left -= n as u64;
                    let mut sealed = vec![0u8; n * len];
                    for chunk in sealed.chunks_mut(len) {
                        ct.write_message(&frame, chunk).expect("seal");
                    }
                    let start = thread_cpu_time();
                    for record in sealed.chunks(len) {
                        st.read_message(black_box(record), &mut payload).expect("open");
                    }
                    took += thread_cpu_time().saturating_sub(start);
                }
                took
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime(WallTime));
    targets = noise
}
criterion_main!(benches);
