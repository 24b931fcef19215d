//! Interoperability with an independent Noise implementation (issue 2).
//!
//! Python's `noiseprotocol` package, which shares no code with `snow`,
//! completes the XK handshake against the server's session
//! (`tidings::session::Session`) and exchanges frames with it
//! (`tests/interop/xk_client.py`). That proves the handshake and transport
//! (spec §2–§5) are standard `Noise_XK_25519_ChaChaPoly_SHA256` with the
//! preamble as prologue and a 2-byte length prefix, not a private dialect.
//! The client also rekeys its direction, and a second test moves the
//! server's clock past [`REKEY_AFTER`] so the server rekeys its own: the
//! rekey markers of spec §4.3 are a standard Noise `REKEY`. A last test
//! pins the wrong server key and checks the server drops the connection
//! after the first message without a word (spec §4).
//!
//! The session sits behind a loopback socket in a small blocking harness
//! (one thread a connection), since the daemon's event loop is not what is
//! under test here.
//!
//! Needs a Python with `noiseprotocol` 0.3.1: `$TIDINGS_PYTHON` if set,
//! else `python3`. `scripts/test` sets that up; without it these tests fail
//! and say so.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant};

use tidings::noise::{Keypair, PublicKey, REKEY_AFTER};
use tidings::session::Phase;

/// The server's private key: fixed, so a failure reproduces with the same
/// key.
const SERVER_PRIVATE: [u8; 32] = [
    0x4f, 0x1e, 0x6a, 0x93, 0x2c, 0xb7, 0x05, 0xd8, 0x71, 0x3a, 0xe4, 0x9c, 0x10, 0x5b, 0x86, 0xf2, 0x27, 0xc9, 0x3d,
    0x64, 0xa1, 0x0e, 0x58, 0xbb, 0x92, 0x47, 0x7f, 0x13, 0xd6, 0x2a, 0x85, 0x68,
];

/// Another key pair's private half, whose public half the client pins by
/// mistake in the wrong-key test.
const OTHER_PRIVATE: [u8; 32] = [0x11; 32];

/// What the client sends before the server must decide: the preamble
/// (spec §2) and the first handshake record, a 2-byte length and the
/// 48-byte `-> e, es` (spec §3, §4.2).
const PREAMBLE_AND_FIRST_MESSAGE: usize = 8 + 2 + 48;

/// Exit statuses of `xk_client.py` (see the script).
const EXIT_REFUSED: i32 = 3;
const EXIT_NO_NOISE: i32 = 4;

/// Longest a client run may take before the test kills it.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

mod harness {
    //! Serves [`Session`]s on a loopback listener: blocking sockets, one
    //! thread a connection, no hub (every key is unregistered, events are
    //! drained and not answered).

    use std::io::{self, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::thread;
    use std::time::{Duration, Instant};

    use tidings::noise::{Keypair, PublicKey};
    use tidings::session::{Identity, Phase, Session, SessionConfig};

    /// How a connection ended.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum End {
        /// The session said it was done ([`Session::is_closed`]).
        SessionClosed,
        /// The peer closed its side first.
        PeerClosed,
        /// A socket error.
        Io(io::ErrorKind),
    }

    /// What happened on one connection, seen from the server.
    #[derive(Debug, Clone)]
    pub struct Report {
        /// Bytes read from the peer and handed to the session.
        pub read: usize,
        /// Bytes the session produced and that were written to the peer.
        pub written: usize,
        /// The client's static key, as the session learnt it in the
        /// handshake.
        pub remote: Option<PublicKey>,
        /// The session's phase at the end.
        pub phase: Phase,
        /// Why the connection ended.
        pub end: End,
    }

    /// A listener on 127.0.0.1 whose connections are served by sessions.
    pub struct Harness {
        /// Where it listens.
        pub addr: SocketAddr,
        /// One report per finished connection.
        pub reports: Receiver<Report>,
    }

    /// Starts listening on an ephemeral loopback port; the accepting thread
    /// lives as long as the test process.
    ///
    /// Each session's clock is the real one, moved forward by `jump` from
    /// the first bytes it reads after the handshake on (so that a test can
    /// make the server's transport due for a rekey).
    pub fn start(key: Keypair, jump: Duration) -> io::Result<Harness> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let key = Arc::new(key);
        let (tx, reports) = mpsc::channel();
        thread::spawn(move || accept(listener, key, jump, tx));
        Ok(Harness { addr, reports })
    }

    fn accept(listener: TcpListener, key: Arc<Keypair>, jump: Duration, tx: Sender<Report>) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let key = key.clone();
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = tx.send(serve(stream, key, jump));
            });
        }
    }

    /// Drives one session, in the order [`Session`]'s docs give: input (or
    /// timeout), events, output; until the session is closed.
    fn serve(mut stream: TcpStream, key: Arc<Keypair>, jump: Duration) -> Report {
        let mut skew = Duration::ZERO;
        let clock = |skew: Duration| Instant::now() + skew;
        let mut session = Session::new(key, SessionConfig::default(), clock(skew));
        let mut buf = vec![0u8; 16 * 1024];
        let mut read = 0;
        let mut written = 0;
        let mut remote = None;
        let end = loop {
            // A hard close (`Phase::Closed`) drops the connection without
            // writing; a closing session writes its last bytes first.
            if session.phase() != Phase::Closed
                && let Err(e) = flush(&mut stream, &mut session, &mut written)
            {
                break End::Io(e.kind());
            }
            if session.is_closed() {
                break End::SessionClosed;
            }
            // Wake up for the session's next deadline. A zero timeout is an
            // error for `set_read_timeout`, hence the floor.
            let wait = session
                .poll_timeout()
                .map(|t| t.saturating_duration_since(clock(skew)).max(Duration::from_millis(1)));
            if let Err(e) = stream.set_read_timeout(wait) {
                break End::Io(e.kind());
            }
            match stream.read(&mut buf) {
                Ok(0) => break End::PeerClosed,
                Ok(n) => {
                    read += n;
                    if matches!(session.phase(), Phase::Unregistered | Phase::Authenticated) {
                        skew = jump;
                    }
                    session.handle_input(&buf[..n], clock(skew), &mut |_| Identity::Unregistered);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    session.handle_timeout(clock(skew));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break End::Io(e.kind()),
            }
            // No hub: nothing is answered.
            while session.poll_event().is_some() {}
            if remote.is_none() {
                remote = session.remote_static().copied();
            }
        };
        Report {
            read,
            written,
            remote,
            phase: session.phase(),
            end,
        }
    }

    fn flush(stream: &mut TcpStream, session: &mut Session, written: &mut usize) -> io::Result<()> {
        while !session.transmit().is_empty() {
            let n = stream.write(session.transmit())?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            session.advance(n);
            *written += n;
        }
        Ok(())
    }
}

fn python() -> OsString {
    std::env::var_os("TIDINGS_PYTHON").unwrap_or_else(|| "python3".into())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/xk_client.py")
}

/// What a run of the Python client left behind.
struct ClientRun {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn reader(mut from: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = from.read_to_string(&mut s);
        s
    })
}

/// Runs `xk_client.py PORT KEY`, killing it after [`CLIENT_DEADLINE`].
/// Panics, saying what to do, if Python or its `noiseprotocol` package is
/// missing: a missing dependency must not pass as a skipped test.
fn run_client(port: u16, server_public: &PublicKey) -> ClientRun {
    let python = python();
    let mut child = Command::new(&python)
        .arg(script())
        .arg(port.to_string())
        .arg(hex::encode(server_public))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the Python interpreter {python:?} ({e}). Run scripts/test, which creates \
                 target/py with noiseprotocol==0.3.1 and sets TIDINGS_PYTHON, or point TIDINGS_PYTHON at a \
                 Python that has noiseprotocol."
            )
        });
    let stdout = reader(child.stdout.take().expect("piped stdout"));
    let stderr = reader(child.stderr.take().expect("piped stderr"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the Python client") {
            break status;
        }
        if started.elapsed() > CLIENT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the Python client ran for more than {CLIENT_DEADLINE:?}; stderr: {}",
                stderr.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let run = ClientRun {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if run.status.code() == Some(EXIT_NO_NOISE) {
        panic!(
            "the Python package noiseprotocol is missing for {python:?}. Run scripts/test, which installs \
             noiseprotocol==0.3.1 into target/py and sets TIDINGS_PYTHON.\n{}",
            run.stderr
        );
    }
    run
}

/// The value of the client's `NAME value` output line.
fn output<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} line in the client's output: {stdout:?}"))
        .trim()
}

/// The client's static public key, as it reports it.
fn client_static(stdout: &str) -> PublicKey {
    let mut key = [0u8; 32];
    hex::decode_to_slice(output(stdout, "client_static"), &mut key).expect("client_static is 64 hex digits");
    key
}

/// How many rekey markers the client received from the server.
fn server_rekeys(stdout: &str) -> u32 {
    output(stdout, "server_rekeys")
        .parse()
        .expect("server_rekeys is a number")
}

/// Runs the client against a harness whose clock jumps by `jump` after the
/// handshake; checks everything succeeded; returns how many times the
/// server rekeyed.
fn successful_run(jump: Duration) -> u32 {
    let server = Keypair::from_private(&SERVER_PRIVATE).expect("a 32-byte private key");
    let server_public = server.public;
    let h = harness::start(server, jump).expect("loopback listener");

    let run = run_client(h.addr.port(), &server_public);
    assert!(
        run.status.success(),
        "the Python client failed ({}):\n{}{}",
        run.status,
        run.stdout,
        run.stderr
    );

    let r = report(&h.reports);
    // The session learnt the key the client sent, encrypted, in the third
    // handshake message: both sides computed the same handshake. (This
    // also shows that `Keypair::from_private` derives the standard X25519
    // public key: the client pinned it, and the server used the private
    // half.)
    assert_eq!(r.remote, Some(client_static(&run.stdout)), "{r:?}");
    // The client's Close ended the session on the server's side.
    assert_eq!(r.end, harness::End::SessionClosed, "{r:?}");
    assert_eq!(r.phase, Phase::Closing, "{r:?}");
    assert!(r.written > 0, "{r:?}");
    server_rekeys(&run.stdout)
}

fn report(reports: &Receiver<harness::Report>) -> harness::Report {
    reports
        .recv_timeout(Duration::from_secs(30))
        .expect("the harness reports the connection's end")
}

#[test]
fn python_noiseprotocol_completes_xk_and_exchanges_frames() {
    // Ping/Pong, an unknown frame kind answered with UNSUPPORTED, a client
    // rekey followed by the server, Close. The server has no reason to
    // rekey.
    assert_eq!(successful_run(Duration::ZERO), 0);
}

#[test]
fn python_noiseprotocol_follows_the_servers_rekey() {
    // spec §4.3: an hour after the handshake the server's next record is
    // preceded by a rekey marker; the client follows it with Noise's
    // standard REKEY and still reads every answer.
    assert_eq!(successful_run(REKEY_AFTER), 1);
}

#[test]
fn python_noiseprotocol_with_the_wrong_server_key_is_dropped_without_a_word() {
    let server = Keypair::from_private(&SERVER_PRIVATE).expect("a 32-byte private key");
    let wrong = Keypair::from_private(&OTHER_PRIVATE)
        .expect("a 32-byte private key")
        .public;
    assert_ne!(wrong, server.public);
    let h = harness::start(server, Duration::ZERO).expect("loopback listener");

    let run = run_client(h.addr.port(), &wrong);
    assert_eq!(
        run.status.code(),
        Some(EXIT_REFUSED),
        "expected the handshake to be refused by a silent close ({}):\n{}{}",
        run.status,
        run.stdout,
        run.stderr
    );

    let r = report(&h.reports);
    // spec §4: a failed handshake closes without a word. The server read
    // exactly the preamble and the first message, wrote nothing, and was
    // the one to close.
    assert_eq!(r.read, PREAMBLE_AND_FIRST_MESSAGE, "{r:?}");
    assert_eq!(r.written, 0, "{r:?}");
    assert_eq!(r.end, harness::End::SessionClosed, "{r:?}");
    assert_eq!(r.phase, Phase::Closed, "{r:?}");
    assert_eq!(r.remote, None, "{r:?}");
}
