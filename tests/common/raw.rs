//! A small blocking protocol client made of the library's own pieces
//! ([`RawClient`]), for tests that need control of every frame and byte
//! (pipelining, request ids, raw garbage).
//!
//! It is not the product client (see [`super::profiles`] for that) and
//! does no end-to-end encryption, retries or reconnects of its own.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tidings::code::Code;
use tidings::noise::{self, Keypair, Opened, PublicKey, Transport};
use tidings::wire::{self, ClientFrame, DeviceId, Flow, MAX_RECORD_LEN, RecordDecoder, RecordError, ServerFrame};

/// How a [`RawClient`] call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket failed, or the server closed it (`UnexpectedEof`).
    Io(io::Error),
    /// The handshake failed (wrong key, or the server hung up during it).
    Handshake,
    /// A record or frame from the server did not open or decode.
    Protocol(String),
    /// The expected answer did not come in time.
    Timeout,
    /// The server answered with something else.
    Unexpected(Box<ServerFrame>),
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o: {e}"),
            ClientError::Handshake => f.write_str("handshake failed"),
            ClientError::Protocol(s) => write!(f, "protocol: {s}"),
            ClientError::Timeout => f.write_str("timed out"),
            ClientError::Unexpected(frame) => write!(f, "unexpected answer {frame:?}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A blocking client connection that speaks frames, for tests.
///
/// Requests get ids from 1 up ([`RawClient::send`]), or the caller's
/// ([`RawClient::send_with_req`]); sends are written at once and never
/// wait for answers, so many can be in flight. [`RawClient::recv`] hands
/// back frames in arrival order and answers the server's `Ping` itself.
pub struct RawClient {
    stream: TcpStream,
    key: Keypair,
    transport: Transport,
    decoder: RecordDecoder,
    inbox: VecDeque<(u32, ServerFrame)>,
    next_req: u32,
    read_buf: Vec<u8>,
    out: Vec<u8>,
    plain: Vec<u8>,
    scratch: Vec<u8>,
    eof: bool,
}

/// Answer to a `Register`: the client, now authenticated, and the device
/// number it got.
pub struct Registered {
    /// The connection.
    pub client: RawClient,
    /// The device number.
    pub device: DeviceId,
}

/// Reads one whole record body from a blocking stream (for the handshake).
fn read_record(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut header = [0u8; wire::RECORD_HEADER_LEN];
    stream.read_exact(&mut header)?;
    let mut body = vec![0u8; u16::from_be_bytes(header) as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

impl RawClient {
    /// Connects to `addr`, pins `server_key`, and completes the XK
    /// handshake as `key`. The server decides only afterwards whether the
    /// key is a device, unregistered, or revoked.
    ///
    /// # Errors
    /// If the connection or the handshake fails.
    pub fn connect(addr: SocketAddr, server_key: &PublicKey, key: Keypair) -> Result<RawClient, ClientError> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = Vec::new();
        let hello = noise::client_start(&key, server_key, &mut out).map_err(|_| ClientError::Handshake)?;
        stream.write_all(&out)?;
        let body = read_record(&mut stream).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => ClientError::Handshake,
            _ => ClientError::Io(e),
        })?;
        out.clear();
        let transport = hello
            .handle(&body, Instant::now(), &mut out)
            .map_err(|_| ClientError::Handshake)?;
        stream.write_all(&out)?;
        out.clear();
        Ok(RawClient {
            stream,
            key,
            transport,
            decoder: RecordDecoder::new(),
            inbox: VecDeque::new(),
            next_req: 1,
            read_buf: vec![0; 64 * 1024],
            out,
            plain: Vec::new(),
            scratch: Vec::new(),
            eof: false,
        })
    }

    /// Connects with a fresh key and registers `name` with `invite`.
    /// Frames that came before the answer stay in the inbox.
    ///
    /// # Errors
    /// If anything fails or the answer is not `Registered`.
    pub fn register(addr: SocketAddr, invite: &Code, name: &str) -> Result<Registered, ClientError> {
        let key = Keypair::generate().map_err(|_| ClientError::Handshake)?;
        let mut client = RawClient::connect(addr, &invite.server_key, key)?;
        let frame = ClientFrame::Register {
            invite: invite.token.clone(),
            name: name.into(),
        };
        match client.request(&frame, Duration::from_secs(10))? {
            ServerFrame::Registered { device, .. } => Ok(Registered { client, device }),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// This device's static key (to reconnect as the same device).
    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The id the next [`RawClient::send`] will use.
    pub fn next_req(&self) -> u32 {
        self.next_req
    }

    /// Sends a frame with the next request id; returns the id.
    ///
    /// # Errors
    /// If the socket fails.
    pub fn send(&mut self, frame: &ClientFrame) -> Result<u32, ClientError> {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.send_with_req(req, frame)?;
        Ok(req)
    }

    /// Sends a frame with the given request id.
    ///
    /// # Errors
    /// If the socket fails.
    pub fn send_with_req(&mut self, req: u32, frame: &ClientFrame) -> Result<(), ClientError> {
        self.queue(req, frame);
        self.flush()
    }

    /// Seals a frame into the output without writing it; [`RawClient::flush`]
    /// writes everything queued with one `write_all`.
    pub fn queue(&mut self, req: u32, frame: &ClientFrame) {
        self.scratch.clear();
        wire::encode_client(req, frame, &mut self.scratch);
        self.transport
            .seal(&self.scratch, Instant::now(), &mut self.out)
            .expect("a client frame fits in a record");
    }

    /// Takes what [`RawClient::queue`] sealed, to be written elsewhere
    /// (on [`RawClient::writer`], from another thread).
    pub fn take_queued(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// A second handle on the socket, for writing from another thread
    /// while this one reads.
    pub fn writer(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the socket")
    }

    /// Writes what [`RawClient::queue`] sealed.
    ///
    /// # Errors
    /// If the socket fails.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            let r = self.stream.write_all(&self.out);
            self.out.clear();
            r?;
        }
        Ok(())
    }

    /// Writes bytes as they are, outside any record or encryption.
    ///
    /// # Errors
    /// If the socket fails.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Seals `plain` as one transport record, whatever it holds (a frame
    /// with a bad encoding, say).
    ///
    /// # Errors
    /// If the socket fails.
    pub fn send_sealed(&mut self, plain: &[u8]) -> Result<(), ClientError> {
        self.transport
            .seal(plain, Instant::now(), &mut self.out)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.flush()
    }

    /// The next frame from the server, waiting up to `timeout`; `Ok(None)`
    /// if none came. A `Ping` is answered with `Pong` and still returned.
    ///
    /// # Errors
    /// `Io(UnexpectedEof)` once the server closed the connection and every
    /// frame before that was returned; other socket or protocol failures.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<(u32, ServerFrame)>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.inbox.pop_front() {
                return Ok(Some(f));
            }
            if self.eof {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut self.read_buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.take_input(n)?,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Like [`RawClient::recv`], but a timeout is an error.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or as [`RawClient::recv`].
    pub fn expect_frame(&mut self, timeout: Duration) -> Result<(u32, ServerFrame), ClientError> {
        self.recv(timeout)?.ok_or(ClientError::Timeout)
    }

    /// Sends `frame` and waits for the frame answering it (same request
    /// id). Frames with other ids that arrive meanwhile stay queued for
    /// [`RawClient::recv`], in order.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], or as [`RawClient::recv`].
    pub fn request(&mut self, frame: &ClientFrame, timeout: Duration) -> Result<ServerFrame, ClientError> {
        let req = self.send(frame)?;
        let deadline = Instant::now() + timeout;
        let mut others = VecDeque::new();
        let answer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some((r, f))) if r == req => break Ok(f),
                Ok(Some(other)) => others.push_back(other),
                Ok(None) => break Err(ClientError::Timeout),
                Err(e) => break Err(e),
            }
        };
        // Put the others back in front, in arrival order.
        while let Some(f) = others.pop_back() {
            self.inbox.push_front(f);
        }
        answer
    }

    /// Decodes `n` bytes just read into frames in the inbox.
    fn take_input(&mut self, n: usize) -> Result<(), ClientError> {
        let Self {
            decoder,
            transport,
            read_buf,
            plain,
            scratch,
            inbox,
            out,
            ..
        } = self;
        let mut failure = None;
        decoder
            .feed(&read_buf[..n], MAX_RECORD_LEN, |body: &[u8]| {
                match transport.open(body, plain) {
                    Ok(Opened::Frame) => match wire::decode_server(plain, scratch) {
                        Ok((req, frame)) => {
                            if frame == ServerFrame::Ping {
                                scratch.clear();
                                wire::encode_client(0, &ClientFrame::Pong, scratch);
                                let _ = transport.seal(scratch, Instant::now(), out);
                            }
                            inbox.push_back((req, frame));
                        }
                        Err(e) => failure = Some(format!("undecodable server frame: {e}")),
                    },
                    Ok(Opened::Rekeyed) => {}
                    Err(e) => failure = Some(format!("server record: {e}")),
                }
                if failure.is_some() {
                    Ok::<_, RecordError>(Flow::Stop)
                } else {
                    Ok(Flow::Continue(MAX_RECORD_LEN))
                }
            })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Some(f) = failure {
            return Err(ClientError::Protocol(f));
        }
        // A Pong for a Ping.
        self.flush()
    }

    /// Closes the connection: both directions, at once, without a word.
    pub fn hang_up(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
