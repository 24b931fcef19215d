//! One device's connection as the load generator sees it, sans-I/O: bytes
//! in, bytes out, and a few neutral events. [`Link::Tidings`] wraps the
//! library's [`Conn`]; [`Link::Mqtt`] is a minimal MQTT 3.1.1 QoS 1 client,
//! so that a broker such as mosquitto can be measured by the same driver,
//! with the same pairs, window and clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidings::client::conn::{Closed, Conn, ConnEvent};
use tidings::wire::{self, Body, ClientFrame, DeviceId, ErrorCode, MsgId, ServerFrame};

/// What a link reports to the driver.
#[derive(Debug)]
pub enum Ev {
    /// The device was registered just now (save its key).
    Registered,
    /// Ready for traffic: authenticated with its queue drained (tidings),
    /// or subscribed (MQTT).
    Live,
    /// A send was accepted: durable in the recipient's queue (tidings), or
    /// `PUBACK` (MQTT).
    Accepted(u32),
    /// A send was refused: its request id, the error code (tidings), and
    /// why, for people.
    Refused(u32, Option<ErrorCode>, String),
    /// A message for this device (already acknowledged by the link).
    Delivered(Bytes),
    /// A group's membership: the answer to `CreateGroup` or `GetGroup`.
    Group(u32, wire::GroupInfo),
    /// Something that must stop the run (a used-up invite, say).
    Fatal(String),
    /// The connection ended.
    Closed {
        /// Why, for people.
        why: String,
        /// It ended before the link was ready, without a word from the
        /// server: likely a per-address limit.
        dropped: bool,
        /// The server closed it on purpose for a reason that will not go
        /// away by retrying.
        fatal: bool,
    },
}

/// One connection.
pub enum Link {
    /// tidingsd.
    Tidings(TidingsLink),
    /// An MQTT broker.
    Mqtt(MqttLink),
}

impl Link {
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        match self {
            Link::Tidings(l) => l.conn.handle_input(data, now),
            Link::Mqtt(l) => l.handle_input(data, now),
        }
    }

    pub fn handle_eof(&mut self) {
        match self {
            Link::Tidings(l) => l.conn.handle_eof(),
            Link::Mqtt(l) => l.finish("the server closed the connection".into(), false),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self {
            Link::Tidings(l) => l.conn.handle_timeout(now),
            Link::Mqtt(l) => l.handle_timeout(now),
        }
    }

    pub fn transmit(&self) -> &[u8] {
        match self {
            Link::Tidings(l) => l.conn.transmit(),
            Link::Mqtt(l) => &l.out[l.out_pos..],
        }
    }

    pub fn advance(&mut self, n: usize) {
        match self {
            Link::Tidings(l) => l.conn.advance(n),
            Link::Mqtt(l) => l.advance(n),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Link::Tidings(l) => l.conn.is_closed(),
            Link::Mqtt(l) => l.closed,
        }
    }

    /// Says goodbye; [`Link::transmit`] holds the last bytes.
    pub fn close(&mut self, now: Instant) {
        match self {
            Link::Tidings(l) => l.conn.close(now),
            Link::Mqtt(l) => {
                if !l.closed {
                    l.out.extend_from_slice(&[0xE0, 0x00]);
                    l.closed = true;
                    l.reported = true;
                }
            }
        }
    }

    /// Moves what happened to `out`, acknowledging deliveries on the way.
    pub fn drain(&mut self, now: Instant, out: &mut Vec<Ev>) {
        match self {
            Link::Tidings(l) => l.drain(now, out),
            Link::Mqtt(l) => out.extend(l.events.drain(..)),
        }
    }

    /// Sends `body` to the device named `to`; returns the id its
    /// [`Ev::Accepted`] will carry.
    pub fn send(&mut self, to: &str, id: MsgId, body: Bytes, now: Instant) -> Option<u32> {
        match self {
            Link::Tidings(l) => {
                let frame = ClientFrame::Send(wire::Send {
                    id,
                    to: to.to_string(),
                    bodies: vec![Body {
                        device: DeviceId(1),
                        data: body,
                    }],
                    own: Vec::new(),
                });
                l.conn.request(&frame, now).ok()
            }
            Link::Mqtt(l) => l.publish(to, &body),
        }
    }

    /// Sends a request (tidings only); returns its request id.
    pub fn request(&mut self, frame: &ClientFrame, now: Instant) -> Option<u32> {
        match self {
            Link::Tidings(l) => l.conn.request(frame, now).ok(),
            Link::Mqtt(_) => None,
        }
    }
}

// ---------------------------------------------------------------------------

/// A tidings device.
pub struct TidingsLink {
    conn: Conn,
    /// The name and invite to register with, for a new device.
    register: Option<(String, wire::Token)>,
    register_req: Option<u32>,
    live: bool,
}

impl TidingsLink {
    pub fn new(conn: Conn, register: Option<(String, wire::Token)>) -> TidingsLink {
        TidingsLink {
            conn,
            register,
            register_req: None,
            live: false,
        }
    }

    fn drain(&mut self, now: Instant, out: &mut Vec<Ev>) {
        let mut ack = None;
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                ConnEvent::Ready => {
                    if let Some((name, invite)) = self.register.clone() {
                        let frame = ClientFrame::Register { invite, name };
                        self.register_req = self.conn.request(&frame, now).ok();
                    }
                }
                ConnEvent::Answer { req, frame } if Some(req) == self.register_req => {
                    self.register_req = None;
                    match frame {
                        ServerFrame::Registered { .. } => {
                            self.register = None;
                            out.push(Ev::Registered);
                        }
                        ServerFrame::Error { code, text } => {
                            let hint = if code == ErrorCode::INVALID_INVITE {
                                " (make one with enough uses: tidingsd invite --uses N)"
                            } else {
                                ""
                            };
                            out.push(Ev::Fatal(format!("registering: {text} ({}){hint}", code.name())));
                        }
                        other => out.push(Ev::Fatal(format!("registering: unexpected {}", other.kind()))),
                    }
                }
                // The connection's own keepalive.
                ConnEvent::Answer {
                    frame: ServerFrame::Pong,
                    ..
                } => {}
                ConnEvent::Answer { req, frame } => match frame {
                    ServerFrame::Accepted { .. } => out.push(Ev::Accepted(req)),
                    ServerFrame::Group(info) => out.push(Ev::Group(req, info)),
                    ServerFrame::Error { code, text } => {
                        out.push(Ev::Refused(req, Some(code), format!("{text} ({})", code.name())))
                    }
                    other => out.push(Ev::Refused(req, None, format!("answered with {}", other.kind()))),
                },
                ConnEvent::Deliver(d) => {
                    ack = ack.max(Some(d.seq));
                    out.push(Ev::Delivered(d.body));
                }
                // Nothing here sends receipts, and a run is too short for
                // retention, but whatever is queued is acknowledged.
                ConnEvent::Receipt(r) => ack = ack.max(Some(r.seq)),
                ConnEvent::Gap(g) => ack = ack.max(Some(g.seq)),
                ConnEvent::Expired(e) => ack = ack.max(Some(e.seq)),
                ConnEvent::Queued(ServerFrame::GroupDeliver(d)) => {
                    ack = ack.max(Some(d.seq));
                    out.push(Ev::Delivered(d.body));
                }
                ConnEvent::Queued(ServerFrame::GroupNotice(n)) => ack = ack.max(Some(n.seq)),
                ConnEvent::Queued(ServerFrame::GroupReceipt(r)) => ack = ack.max(Some(r.seq)),
                ConnEvent::Queued(ServerFrame::BlockNotice(b)) => ack = ack.max(Some(b.seq)),
                ConnEvent::Queued(_) => {}
                // Devices here publish no end-to-end keys, and neither
                // type nor watch presence.
                ConnEvent::KeyCount(_)
                | ConnEvent::Ephemeral(_)
                | ConnEvent::Presence(_)
                | ConnEvent::RetryAfter(_) => {}
                ConnEvent::QueueDrained => {
                    if !self.live {
                        self.live = true;
                        out.push(Ev::Live);
                    }
                }
                ConnEvent::Closed(closed) => {
                    // The daemon refuses a connection over its limits
                    // before the handshake (spec §2).
                    let dropped = !self.live
                        && (matches!(closed, Closed::Handshake | Closed::EndOfStream)
                            || matches!(&closed, Closed::Refused(n) if n.is_busy()));
                    let fatal = matches!(&closed, Closed::ByServer { code, .. } if *code != ErrorCode::SHUTTING_DOWN)
                        || matches!(closed, Closed::Refused(n) if !n.is_busy());
                    let why = if closed == Closed::Local {
                        "closed".to_string()
                    } else {
                        closed.to_string()
                    };
                    out.push(Ev::Closed { why, dropped, fatal });
                }
            }
        }
        if let Some(up_to) = ack {
            let _ = self.conn.notify(&ClientFrame::Ack { up_to }, now);
        }
    }
}

// ---------------------------------------------------------------------------

/// The MQTT 3.1.1 packets used here.
const CONNECT: u8 = 0x10;
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const PUBACK: u8 = 0x40;
const SUBSCRIBE: u8 = 0x82;
const SUBACK: u8 = 0x90;
const PINGREQ: u8 = 0xC0;
const KEEPALIVE: Duration = Duration::from_secs(60);

/// An MQTT client that subscribes to its own name as a topic with QoS 1
/// and publishes to other names with QoS 1.
pub struct MqttLink {
    name: String,
    out: Vec<u8>,
    out_pos: usize,
    input: Vec<u8>,
    events: VecDeque<Ev>,
    next_pid: u16,
    /// Publish packet id → the id reported in `Accepted`.
    pids: HashMap<u16, u32>,
    next_req: u32,
    live: bool,
    closed: bool,
    reported: bool,
    last_tx: Instant,
    started: Instant,
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

impl MqttLink {
    /// A client named `name` (its client id and its topic); CONNECT is
    /// ready in the output.
    pub fn new(name: String, now: Instant) -> MqttLink {
        let mut out = Vec::with_capacity(64);
        let mut body = Vec::with_capacity(32);
        put_str(&mut body, b"MQTT");
        body.push(4); // protocol level 3.1.1
        body.push(0x02); // clean session
        body.extend_from_slice(&(KEEPALIVE.as_secs() as u16).to_be_bytes());
        put_str(&mut body, name.as_bytes());
        out.push(CONNECT);
        put_len(&mut out, body.len());
        out.extend_from_slice(&body);
        MqttLink {
            name,
            out,
            out_pos: 0,
            input: Vec::new(),
            events: VecDeque::new(),
            next_pid: 0,
            pids: HashMap::new(),
            next_req: 0,
            live: false,
            closed: false,
            reported: false,
            last_tx: now,
            started: now,
        }
    }

    fn pid(&mut self) -> u16 {
        self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
        self.next_pid
    }

    fn finish(&mut self, why: String, fatal: bool) {
        if !self.reported {
            self.reported = true;
            self.closed = true;
            let dropped = !self.live && !fatal;
            self.events.push_back(Ev::Closed { why, dropped, fatal });
        }
    }

    fn advance(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if !self.live && now >= self.started + Duration::from_secs(10) {
            self.finish("no CONNACK/SUBACK in time".into(), false);
        } else if now >= self.last_tx + KEEPALIVE / 2 {
            self.out.extend_from_slice(&[PINGREQ, 0x00]);
            self.last_tx = now;
        }
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Option<u32> {
        if self.closed || !self.live {
            return None;
        }
        let pid = self.pid();
        self.next_req = self.next_req.wrapping_add(1);
        self.pids.insert(pid, self.next_req);
        self.out.push(PUBLISH | 0x02); // QoS 1
        put_len(&mut self.out, 2 + topic.len() + 2 + payload.len());
        put_str(&mut self.out, topic.as_bytes());
        self.out.extend_from_slice(&pid.to_be_bytes());
        self.out.extend_from_slice(payload);
        Some(self.next_req)
    }

    fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.closed {
            return;
        }
        self.input.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let rest = &self.input[pos..];
            if rest.len() < 2 {
                break;
            }
            // Fixed header: type and flags, then remaining length (1-4 bytes).
            let (mut len, mut shift, mut i) = (0usize, 0, 1);
            let complete = loop {
                let Some(&b) = rest.get(i) else { break false };
                len |= usize::from(b & 0x7F) << shift;
                i += 1;
                if b & 0x80 == 0 {
                    break true;
                }
                shift += 7;
                if shift > 21 {
                    self.finish("malformed MQTT length".into(), true);
                    return;
                }
            };
            if !complete || rest.len() < i + len {
                break;
            }
            let kind = rest[0];
            let body = rest[i..i + len].to_vec();
            pos += i + len;
            self.packet(kind, &body, now);
            if self.closed {
                return;
            }
        }
        self.input.drain(..pos);
    }

    fn packet(&mut self, kind: u8, body: &[u8], now: Instant) {
        let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
        match kind & 0xF0 {
            CONNACK => {
                if body.get(1) != Some(&0) {
                    self.finish(format!("CONNACK refused: code {:?}", body.get(1)), true);
                    return;
                }
                let pid = self.pid();
                self.out.push(SUBSCRIBE);
                put_len(&mut self.out, 2 + 2 + self.name.len() + 1);
                self.out.extend_from_slice(&pid.to_be_bytes());
                let name = self.name.clone();
                put_str(&mut self.out, name.as_bytes());
                self.out.push(1); // QoS 1
                self.last_tx = now;
            }
            SUBACK => {
                if body.get(2).is_some_and(|&rc| rc <= 2) && !self.live {
                    self.live = true;
                    self.events.push_back(Ev::Live);
                } else if !self.live {
                    self.finish("SUBSCRIBE refused".into(), true);
                }
            }
            PUBACK => {
                if let Some(req) = u16_at(body, 0).and_then(|pid| self.pids.remove(&pid)) {
                    self.events.push_back(Ev::Accepted(req));
                }
            }
            PUBLISH => {
                let qos = (kind >> 1) & 0x03;
                let Some(tlen) = u16_at(body, 0) else { return };
                let mut at = 2 + usize::from(tlen);
                if qos > 0 {
                    if let Some(pid) = u16_at(body, at) {
                        self.out.push(PUBACK);
                        self.out.push(2);
                        self.out.extend_from_slice(&pid.to_be_bytes());
                        self.last_tx = now;
                    }
                    at += 2;
                }
                if let Some(payload) = body.get(at..) {
                    self.events.push_back(Ev::Delivered(Bytes::copy_from_slice(payload)));
                }
            }
            _ => {} // PINGRESP and anything else.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connects_subscribes_publishes_and_acks() {
        let t = Instant::now();
        let mut l = MqttLink::new("ab".into(), t);
        // CONNECT: MQTT 3.1.1, clean session, keepalive 60, client id "ab".
        assert_eq!(hex::encode(&l.out), "100e00044d5154540402003c00026162");
        l.advance(l.out.len());
        // CONNACK accepted → SUBSCRIBE "ab" at QoS 1 (packet id 1).
        l.handle_input(&[0x20, 0x02, 0x00, 0x00], t);
        assert_eq!(hex::encode(&l.out), "820700010002616201");
        l.advance(l.out.len());
        // SUBACK granted QoS 1, split across two reads.
        l.handle_input(&[0x90, 0x03], t);
        assert!(l.events.is_empty());
        l.handle_input(&[0x00, 0x01, 0x01], t);
        assert!(matches!(l.events.pop_front(), Some(Ev::Live)));
        // PUBLISH QoS 1 to "cd" with packet id 2.
        let req = l.publish("cd", b"hi").unwrap();
        assert_eq!(hex::encode(&l.out), "32080002636400026869");
        l.advance(l.out.len());
        l.handle_input(&[0x40, 0x02, 0x00, 0x02], t);
        assert!(matches!(l.events.pop_front(), Some(Ev::Accepted(r)) if r == req));
        // An incoming QoS 1 PUBLISH is delivered and answered with PUBACK.
        l.handle_input(&[0x32, 0x09, 0x00, 0x02, b'a', b'b', 0x12, 0x34, b'x', b'y', b'z'], t);
        assert!(matches!(l.events.pop_front(), Some(Ev::Delivered(b)) if &b[..] == b"xyz"));
        assert_eq!(hex::encode(&l.out), "40021234");
    }
}
