//! The product's [`Driver`]: TCP sockets, a reader thread per connection
//! that turns the stream into [`Input`]s on a channel, writes from the
//! caller's thread, and the system clocks.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Error;
use super::driver::{Driver, Input};

/// How long one connection attempt may take at most.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may block before the connection counts as dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Sockets and threads.
pub struct SocketDriver {
    tx: Sender<Input>,
    rx: Receiver<Input>,
    stream: Option<TcpStream>,
}

impl Default for SocketDriver {
    fn default() -> Self {
        SocketDriver::new()
    }
}

impl SocketDriver {
    /// A driver with no connection yet.
    pub fn new() -> SocketDriver {
        let (tx, rx) = mpsc::channel();
        SocketDriver { tx, rx, stream: None }
    }
}

impl Driver for SocketDriver {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn open(&mut self, addr: &str, epoch: u64, within: Duration) -> Result<(), Error> {
        self.close();
        let connect_err = |source| Error::Connect {
            addr: addr.to_owned(),
            source,
        };
        let within = within.clamp(Duration::from_millis(100), CONNECT_TIMEOUT);
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
        let mut stream = None;
        for sa in addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&sa, within) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| connect_err(last))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut reader = stream.try_clone()?;
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name(format!("tidings-read-{epoch}"))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let data = buf[..n].to_vec();
                            if tx.send(Input::Net { epoch, data }).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(Input::Eof { epoch });
            })?;
        self.stream = Some(stream);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        let stream = self
            .stream
            .as_mut()
            .ok_or(Error::Closed(super::conn::Closed::EndOfStream))?;
        match stream.write(bytes) {
            Ok(0) => Err(Error::Closed(super::conn::Closed::EndOfStream)),
            Ok(n) => Ok(n),
            Err(e) => Err(e.into()),
        }
    }

    fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            // Wakes the reader thread, which then ends.
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn wait(&mut self, deadline: Instant) -> Option<Input> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(timeout) {
            Ok(input) => Some(input),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => unreachable!("the driver holds a sender"),
        }
    }

    fn inputs(&self) -> Sender<Input> {
        self.tx.clone()
    }
}

impl Drop for SocketDriver {
    fn drop(&mut self) {
        self.close();
    }
}
