//! The daemon's metrics: counters the loops and sessions bump as things
//! happen, gauges read at scrape time, and the Prometheus text endpoint
//! (`[metrics] listen`, off by default), encoded by `prometheus-client`.
//!
//! What it guarantees: counting is an atomic add (nothing locks on the hot
//! path but the per-code and per-outcome families, which take a read lock
//! once the label exists); the endpoint serves `GET /metrics` only, one
//! request at a time with short timeouts, so a scraper cannot hold the
//! daemon's resources. What it does not do: authentication (listen on a
//! local address), or anything with what it counts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::session::{HandshakeOutcome, Observer};
use crate::wire::ServerFrame;

/// `code` label of refused requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// `outcome` label of handshakes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Flush-time buckets, in seconds: 0.25 ms to about 4 s.
const FLUSH_BUCKETS: usize = 15;
const FLUSH_FIRST: f64 = 0.000_25;

/// Everything counted.
pub struct Metrics {
    accepted: Counter,
    delivered: Counter,
    refused: Family<CodeLabel, Counter>,
    handshakes: Family<OutcomeLabel, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    connections: Gauge,
    online: Gauge,
    queued_entries: Gauge,
    queued_bytes: Gauge,
    store_bytes: Gauge,
    flush: Histogram,
    /// Flush times, in the same buckets, for the p99 `status` reports.
    flush_buckets: [AtomicU64; FLUSH_BUCKETS + 1],
    registry: Registry,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// What the gauges show, read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Open connections.
    pub connections: u64,
    /// Devices online.
    pub online: u64,
    /// Entries in all queues.
    pub queued_entries: u64,
    /// Bytes of all queue entries.
    pub queued_bytes: u64,
    /// Bytes the data directory takes on disk.
    pub store_bytes: u64,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let m = Metrics {
            accepted: Counter::default(),
            delivered: Counter::default(),
            refused: Family::default(),
            handshakes: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            connections: Gauge::default(),
            online: Gauge::default(),
            queued_entries: Gauge::default(),
            queued_bytes: Gauge::default(),
            store_bytes: Gauge::default(),
            flush: Histogram::new(exponential_buckets(FLUSH_FIRST, 2.0, FLUSH_BUCKETS as u16)),
            flush_buckets: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tidings_messages_accepted",
            "Messages answered Accepted (every copy safe)",
            m.accepted.clone(),
        );
        registry.register(
            "tidings_messages_delivered",
            "Deliver frames sent to devices",
            m.delivered.clone(),
        );
        registry.register(
            "tidings_requests_refused",
            "Requests answered with Error, by error code",
            m.refused.clone(),
        );
        registry.register(
            "tidings_handshakes",
            "Connections by how their start ended (limited ones were refused in the clear before a handshake)",
            m.handshakes.clone(),
        );
        registry.register("tidings_bytes_in", "Bytes read from clients", m.bytes_in.clone());
        registry.register("tidings_bytes_out", "Bytes written to clients", m.bytes_out.clone());
        registry.register("tidings_connections", "Open connections", m.connections.clone());
        registry.register("tidings_online_devices", "Devices connected", m.online.clone());
        registry.register(
            "tidings_queued_entries",
            "Entries waiting in device queues (messages, receipts, notices)",
            m.queued_entries.clone(),
        );
        registry.register(
            "tidings_queued_bytes",
            "Bytes of the entries waiting in device queues",
            m.queued_bytes.clone(),
        );
        registry.register(
            "tidings_store_bytes",
            "Bytes the data directory takes on disk",
            m.store_bytes.clone(),
        );
        registry.register(
            "tidings_flush_seconds",
            "Time of one group-commit flush (sled flush and fdatasync)",
            m.flush.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Bytes read from a client.
    pub fn read(&self, n: usize) {
        self.bytes_in.inc_by(n as u64);
    }

    /// Bytes written to a client.
    pub fn wrote(&self, n: usize) {
        self.bytes_out.inc_by(n as u64);
    }

    /// A connection refused in the clear before its handshake (spec §2).
    pub fn limited(&self, why: crate::wire::Refusal) {
        use crate::wire::Refusal as R;
        let outcome = match why {
            R::AddressConnections => "limited_address_connections",
            R::AddressRate => "limited_address_rate",
            R::ServerFull => "limited_server_full",
            R::ShuttingDown => "limited_shutting_down",
            R::BadMagic | R::UnsupportedVersion => "bad_preamble",
        };
        self.handshakes.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A flush took `d`.
    pub fn flushed(&self, d: Duration) {
        let s = d.as_secs_f64();
        self.flush.observe(s);
        let mut i = 0;
        let mut bound = FLUSH_FIRST;
        while i < FLUSH_BUCKETS && s > bound {
            i += 1;
            bound *= 2.0;
        }
        self.flush_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The 99th percentile of flush times since the start, in
    /// milliseconds (the upper bound of its bucket); `None` before the
    /// first flush.
    pub fn flush_p99_ms(&self) -> Option<f64> {
        let counts: Vec<u64> = self.flush_buckets.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = total - total / 100;
        let mut seen = 0;
        let mut bound = FLUSH_FIRST;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(if i == FLUSH_BUCKETS {
                    f64::INFINITY
                } else {
                    bound * 1000.0
                });
            }
            bound *= 2.0;
        }
        None
    }

    /// The text exposition, with the gauges set to `g`.
    pub fn encode(&self, g: Gauges) -> String {
        self.connections.set(to_i64(g.connections));
        self.online.set(to_i64(g.online));
        self.queued_entries.set(to_i64(g.queued_entries));
        self.queued_bytes.set(to_i64(g.queued_bytes));
        self.store_bytes.set(to_i64(g.store_bytes));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Observer for Metrics {
    fn frame_sent(&self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Accepted { .. } => {
                self.accepted.inc();
            }
            ServerFrame::Deliver(_) => {
                self.delivered.inc();
            }
            ServerFrame::Error { code, .. } => {
                self.refused
                    .get_or_create(&CodeLabel {
                        code: code.name().to_string(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    fn handshake(&self, outcome: HandshakeOutcome) {
        let outcome = match outcome {
            HandshakeOutcome::Authenticated => "authenticated",
            HandshakeOutcome::Unregistered => "unregistered",
            HandshakeOutcome::Revoked => "revoked",
            HandshakeOutcome::Failed => "failed",
            HandshakeOutcome::TimedOut => "timed_out",
            HandshakeOutcome::BadPreamble => "bad_preamble",
        };
        self.handshakes.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// Longest request the endpoint reads.
const MAX_REQUEST: u64 = 8192;

/// The HTTP endpoint's thread.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Serves `GET /metrics` on `addr`; `gauges` reads the gauges at each
    /// scrape.
    ///
    /// # Errors
    /// If the address cannot be bound.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        gauges: impl Fn() -> Gauges + Send + 'static,
    ) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            log::warn!(
                "metrics are served on {addr}, which is not a loopback address: anyone who reaches it can read them"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(s) = stream {
                    serve(s, &metrics, &gauges);
                }
            }
        })?;
        Ok(Endpoint {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, metrics: &Metrics, gauges: &dyn Fn() -> Gauges) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(reader) = stream.try_clone() else { return };
    let mut reader = BufReader::new(reader.take(MAX_REQUEST));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The headers, up to the blank line.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 0) {
        if header == "\r\n" || header == "\n" {
            break;
        }
        header.clear();
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(gauges()),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".into(),
        )
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text() {
        let m = Metrics::new();
        m.frame_sent(&ServerFrame::Accepted {
            id: crate::wire::MsgId([0; 16]),
            time_ms: 1,
        });
        m.frame_sent(&ServerFrame::error(crate::wire::ErrorCode::QUOTA_EXCEEDED, "x"));
        m.handshake(HandshakeOutcome::Authenticated);
        m.limited(crate::wire::Refusal::AddressRate);
        m.flushed(Duration::from_millis(3));
        let text = m.encode(Gauges {
            connections: 4,
            ..Gauges::default()
        });
        for want in [
            "tidings_messages_accepted_total 1",
            "tidings_requests_refused_total{code=\"QUOTA_EXCEEDED\"} 1",
            "tidings_handshakes_total{outcome=\"authenticated\"} 1",
            "tidings_handshakes_total{outcome=\"limited_address_rate\"} 1",
            "tidings_connections 4",
            "tidings_flush_seconds_count 1",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        assert_eq!(m.flush_p99_ms(), Some(4.0));
    }
}
