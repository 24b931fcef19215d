//! A simulation harness: many in-memory clients against the real [`Core`]s
//! (one or several loops), a virtual clock, and the real store in a temp
//! directory. No sockets; bytes are moved by hand, so every interleaving is
//! the test's choice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::core::Core;
use crate::hub::{Effect, HubConfig, Now, Shared};
use crate::ids::ConnId;
use crate::noise::{self, ExpectServerHello, Keypair, Opened, Transport};
use crate::session::SessionConfig;
use crate::store::{Completion, Op, Outcome, Sink, Store, StoreApi, StoreConfig, Waiter};
use crate::wire::{self, ClientFrame, Flow, MAX_RECORD_LEN, RecordDecoder, RecordError, ServerFrame, Token};

/// One simulated device connection.
pub struct SimClient {
    pub key: Keypair,
    /// Acknowledges every queue entry it receives, as a real client does
    /// once it stored them.
    pub auto_ack: bool,
    hello: Option<ExpectServerHello>,
    transport: Option<Transport>,
    decoder: RecordDecoder,
    outbox: Vec<u8>,
    pub inbox: Vec<(u32, ServerFrame)>,
    next_req: u32,
    plain: Vec<u8>,
    scratch: Vec<u8>,
}

impl SimClient {
    fn receive(&mut self, bytes: &[u8], now: Now) {
        let mut records = Vec::new();
        self.decoder
            .feed(bytes, MAX_RECORD_LEN, |r: &[u8]| {
                records.push(r.to_vec());
                Ok::<_, RecordError>(Flow::Continue(MAX_RECORD_LEN))
            })
            .expect("server records fit");
        for r in records {
            if let Some(hello) = self.hello.take() {
                self.transport = Some(hello.handle(&r, now.mono, &mut self.outbox).expect("server hello"));
                continue;
            }
            let t = self.transport.as_mut().expect("transport");
            if t.open(&r, &mut self.plain).expect("server record opens") == Opened::Frame {
                let f = wire::decode_server(&self.plain, &mut self.scratch).expect("server frame decodes");
                if f.1 == ServerFrame::Ping {
                    let mut plain = Vec::new();
                    wire::encode_client(0, &ClientFrame::Pong, &mut plain);
                    t.seal(&plain, now.mono, &mut self.outbox).expect("seal");
                }
                let seq = match &f.1 {
                    ServerFrame::Deliver(d) => Some(d.seq),
                    ServerFrame::Receipt(r) => Some(r.seq),
                    ServerFrame::Gap(g) => Some(g.seq),
                    ServerFrame::Expired(e) => Some(e.seq),
                    _ => None,
                };
                if let (Some(up_to), true) = (seq, self.auto_ack) {
                    let mut plain = Vec::new();
                    let req = self.next_req;
                    self.next_req += 1;
                    wire::encode_client(req, &ClientFrame::Ack { up_to }, &mut plain);
                    t.seal(&plain, now.mono, &mut self.outbox).expect("seal");
                }
                self.inbox.push(f);
            }
        }
    }
}

/// The simulated world.
pub struct World {
    pub store: Arc<Store>,
    pub shared: Arc<Shared>,
    pub cores: Vec<Core<()>>,
    pub clients: HashMap<ConnId, SimClient>,
    pub now: Now,
    /// Whether `run` flushes what the store thread wrote (tests turn it
    /// off to look between write and flush).
    pub auto_flush: bool,
    /// Effects posted from outside the loops (as the admin socket posts
    /// its closes), applied by [`World::exchange`].
    pub mailbox: Vec<Effect>,
    /// Whether new clients acknowledge what they receive at once.
    pub auto_ack: bool,
    /// Revokes the operator asked for, waiting for the store's answer.
    operator: Arc<Sink>,
    revoking: Vec<(u64, crate::ids::DeviceKey)>,
    dead: Vec<ConnId>,
    _dir: tempfile::TempDir,
}

impl World {
    pub fn new(workers: u16) -> World {
        Self::with_config(workers, HubConfig::default())
    }

    pub fn with_config(workers: u16, config: HubConfig) -> World {
        Self::with_configs(workers, config, StoreConfig::default())
    }

    pub fn with_configs(workers: u16, config: HubConfig, store_config: StoreConfig) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), &store_config).expect("store"));
        let shared = Shared::new(store.clone() as Arc<dyn StoreApi>, config);
        let key = Arc::new(store.server_key().clone());
        let cores = (0..workers)
            .map(|w| {
                Core::new(
                    w,
                    shared.clone(),
                    key.clone(),
                    SessionConfig::default(),
                    Sink::new(|| {}),
                )
            })
            .collect();
        World {
            store,
            shared,
            cores,
            clients: HashMap::new(),
            now: Now::read(),
            auto_flush: true,
            mailbox: Vec::new(),
            auto_ack: true,
            operator: Sink::new(|| {}),
            revoking: Vec::new(),
            dead: Vec::new(),
            _dir: dir,
        }
    }

    /// Opens a connection on `worker` and completes the handshake.
    pub fn connect(&mut self, worker: u16, key: Keypair) -> ConnId {
        let serial = self.cores[worker as usize].accept((), self.now);
        let id = ConnId { worker, serial };
        let mut outbox = Vec::new();
        let server = self.store.server_key().public;
        let hello = noise::client_start(&key, &server, &mut outbox).expect("client start");
        let client = SimClient {
            key,
            auto_ack: self.auto_ack,
            hello: Some(hello),
            transport: None,
            decoder: RecordDecoder::new(),
            outbox,
            inbox: Vec::new(),
            next_req: 1,
            plain: Vec::new(),
            scratch: Vec::new(),
        };
        self.clients.insert(id, client);
        self.run();
        id
    }

    /// Opens a connection on `worker` and runs the handshake up to the
    /// client's last message, which waits in the client's outbox: the
    /// server does not know yet who the client is.
    pub fn connect_pending(&mut self, worker: u16, key: Keypair) -> ConnId {
        let serial = self.cores[worker as usize].accept((), self.now);
        let id = ConnId { worker, serial };
        let mut outbox = Vec::new();
        let server = self.store.server_key().public;
        let hello = noise::client_start(&key, &server, &mut outbox).expect("client start");
        self.cores[worker as usize].input(serial, &outbox, self.now);
        let client = SimClient {
            key,
            auto_ack: self.auto_ack,
            hello: Some(hello),
            transport: None,
            decoder: RecordDecoder::new(),
            outbox: Vec::new(),
            inbox: Vec::new(),
            next_req: 1,
            plain: Vec::new(),
            scratch: Vec::new(),
        };
        self.clients.insert(id, client);
        self.exchange();
        assert!(
            !self.clients[&id].outbox.is_empty(),
            "the client's last handshake message"
        );
        id
    }

    /// Half a turn of `conn`'s loop: it reads what the client sent (for the
    /// handshake's last message, the key is identified) but does not
    /// handle the events that follow yet.
    pub fn read_only(&mut self, conn: ConnId) {
        let bytes = std::mem::take(&mut self.clients.get_mut(&conn).expect("client").outbox);
        let shared = self.shared.clone();
        let now = self.now;
        if let Some(c) = self.cores[conn.worker as usize].conn_mut(conn.serial) {
            c.session
                .handle_input(&bytes, now.mono, &mut |key| shared.identify(key));
        }
    }

    /// The rest of the turn begun by [`World::read_only`]: the loop handles
    /// the events and ends its turn. What it sends, and its effects for
    /// other loops, wait for [`World::exchange`]; operations it handed the
    /// store thread, and answers that wait for them, wait for
    /// [`World::flush`].
    pub fn handle_read(&mut self, conn: ConnId) {
        let core = &mut self.cores[conn.worker as usize];
        core.input(conn.serial, &[], self.now);
        core.end_turn(self.now);
    }

    /// One whole turn of `conn`'s loop on what its client sent.
    pub fn turn(&mut self, conn: ConnId) {
        self.read_only(conn);
        self.handle_read(conn);
    }

    /// The store thread runs a turn and flushes; the loops take what it
    /// answered.
    pub fn flush(&mut self) {
        self.step_store(true);
    }

    /// One store-thread turn (flushed if `flush`), then the loops take its
    /// outcomes, and the operator's revokes that are done close their
    /// device's connection (as the admin thread does).
    pub fn step_store(&mut self, flush: bool) {
        assert!(
            self.store.step(self.now.mono, self.now.unix_ms, flush),
            "the store failed"
        );
        for core in &mut self.cores {
            core.end_turn(self.now);
        }
        let mut done = Vec::new();
        self.operator.take(&mut done);
        for c in done {
            let Some(i) = self.revoking.iter().position(|(t, _)| *t == c.token) else {
                continue;
            };
            let (_, d) = self.revoking.remove(i);
            if c.outcome == Outcome::Revoked(true)
                && let Some(conn) = self.shared.connection_of(d)
            {
                self.mailbox.push(Effect::Close {
                    conn,
                    why: crate::hub::Refusal::Revoked,
                });
            }
        }
    }

    /// The operator revokes `d` (`tidingsd revoke`): handed to the store
    /// thread now; its connection is closed once the store answers.
    pub fn operator_revoke(&mut self, d: crate::ids::DeviceKey) {
        let token = self.revoking.len() as u64 + 1000;
        self.revoking.push((token, d));
        self.store.submit(
            Op::Revoke {
                device: d,
                now_ms: self.now.unix_ms,
            },
            Some(Waiter {
                sink: self.operator.clone(),
                token,
            }),
        );
    }

    /// Runs one whole retention sweep with `cutoff_ms`, waking the devices
    /// that got a notice.
    pub fn sweep(&mut self, cutoff_ms: u64) {
        let sink = Sink::new(|| {});
        let mut cursor = Vec::new();
        loop {
            self.store.submit(
                Op::Sweep {
                    cursor: std::mem::take(&mut cursor),
                    cutoff_ms,
                    max_keys: 100,
                    now_ms: self.now.unix_ms,
                },
                Some(Waiter {
                    sink: sink.clone(),
                    token: 1,
                }),
            );
            self.step_store(true);
            let mut got = Vec::new();
            sink.take(&mut got);
            let Some(Completion {
                outcome: Outcome::Swept(swept, next),
                ..
            }) = got.pop()
            else {
                panic!("the sweep failed: {got:?}");
            };
            for d in swept.notified {
                if let Some(c) = self.shared.connection_of(d) {
                    self.mailbox.push(Effect::Wake(c));
                }
            }
            if swept.wrapped {
                break;
            }
            cursor = next;
        }
        self.run();
    }

    /// Queues a request; returns its id. Call [`World::run`] to move it.
    pub fn request(&mut self, conn: ConnId, frame: &ClientFrame) -> u32 {
        let c = self.clients.get_mut(&conn).expect("client");
        let req = c.next_req;
        c.next_req += 1;
        let mut plain = Vec::new();
        wire::encode_client(req, frame, &mut plain);
        c.transport
            .as_mut()
            .expect("handshake done")
            .seal(&plain, self.now.mono, &mut c.outbox)
            .expect("seal");
        req
    }

    /// Moves bytes both ways (and flushes, if `auto_flush`) until nothing
    /// moves.
    pub fn run(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            // Clients to server.
            let ids: Vec<ConnId> = self.clients.keys().copied().collect();
            for id in ids {
                let c = self.clients.get_mut(&id).expect("client");
                if c.outbox.is_empty() {
                    continue;
                }
                let bytes = std::mem::take(&mut c.outbox);
                moved = true;
                self.cores[id.worker as usize].input(id.serial, &bytes, self.now);
            }
            for core in &mut self.cores {
                core.end_turn(self.now);
            }
            self.step_store(self.auto_flush);
            moved |= self.exchange();
            if !moved {
                return;
            }
        }
        panic!("the simulation did not settle");
    }

    /// Server to clients, remote effects between loops, dead connections.
    pub fn exchange(&mut self) -> bool {
        let mut moved = false;
        let mut remote = std::mem::take(&mut self.mailbox);
        for core in &mut self.cores {
            remote.extend(core.take_remote());
        }
        for effect in remote {
            moved = true;
            let w = effect.conn().worker as usize;
            self.cores[w].apply(effect, self.now);
        }
        for w in 0..self.cores.len() {
            for serial in self.cores[w].take_dirty() {
                let Some(conn) = self.cores[w].conn_mut(serial) else {
                    continue;
                };
                let bytes = conn.session.transmit().to_vec();
                let n = bytes.len();
                self.cores[w].wrote(serial, n, self.now);
                let id = ConnId {
                    worker: w as u16,
                    serial,
                };
                if let Some(c) = self.clients.get_mut(&id) {
                    c.receive(&bytes, self.now);
                }
                moved = true;
            }
            for (id, ()) in self.cores[w].take_dead() {
                // The client keeps its inbox for inspection.
                if let Some(c) = self.clients.get_mut(&id) {
                    c.outbox.clear();
                }
                self.dead.push(id);
            }
        }
        moved
    }

    /// Whether the server dropped this connection.
    pub fn is_dead(&self, conn: ConnId) -> bool {
        self.dead.contains(&conn)
    }

    /// Takes what a client received.
    pub fn inbox(&mut self, conn: ConnId) -> Vec<(u32, ServerFrame)> {
        std::mem::take(&mut self.clients.get_mut(&conn).expect("client").inbox)
    }

    /// Advances the virtual clock and runs timers.
    pub fn advance(&mut self, by: Duration) {
        self.now.mono += by;
        self.now.unix_ms += by.as_millis() as u64;
        for core in &mut self.cores {
            core.timeout(self.now);
        }
        self.run();
    }

    /// An invite with many uses.
    pub fn invite(&self) -> Token {
        self.store.accounts().create_invite(1000, None).expect("invite")
    }

    /// Registers `name` on a new connection on `worker`.
    pub fn register(&mut self, worker: u16, name: &str) -> ConnId {
        let invite = self.invite();
        self.new_device(
            worker,
            &ClientFrame::Register {
                invite,
                name: name.into(),
            },
        )
    }

    /// Links a new device to the account on `existing`, on `worker`.
    pub fn link(&mut self, existing: ConnId, worker: u16) -> ConnId {
        self.request(existing, &ClientFrame::RequestLink);
        self.run();
        let code = match self.inbox(existing).pop() {
            Some((_, ServerFrame::LinkCode { code, .. })) => code,
            other => panic!("expected a link code, got {other:?}"),
        };
        self.new_device(worker, &ClientFrame::RedeemLink { code })
    }

    /// A new connection on `worker`, with a fresh key, whose `frame`
    /// (`Register` or `RedeemLink`) must be answered with `Registered`.
    fn new_device(&mut self, worker: u16, frame: &ClientFrame) -> ConnId {
        let conn = self.connect(worker, Keypair::generate().expect("key"));
        self.request(conn, frame);
        self.run();
        let got = self.inbox(conn);
        assert!(
            matches!(got.first(), Some((_, ServerFrame::Registered { .. }))),
            "{got:?}"
        );
        conn
    }

    /// Reconnects with the same key as `conn` (a new connection).
    pub fn reconnect(&mut self, conn: ConnId, worker: u16) -> ConnId {
        let key = self.clients[&conn].key.clone();
        self.connect(worker, key)
    }
}
