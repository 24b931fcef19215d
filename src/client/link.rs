//! The blocking socket driver around a [`Conn`]: a TCP stream, a reader
//! thread that turns the stream into [`Input`]s on a channel, and writes
//! from the caller's thread.
//!
//! Everything the client waits for arrives on one channel (server bytes,
//! end of stream, and work handed over by a second command), so one thread
//! owns all state and waits in one place. Inputs carry the epoch of
//! the connection they came from, so bytes of a dropped connection are
//! ignored after a reconnect.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::Error;
use super::conn::{Conn, ConnConfig};
use super::local::Job;
use crate::noise::{Keypair, PublicKey};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may block before the connection counts as dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client's thread waits for.
pub enum Input {
    /// Bytes from connection `epoch`.
    Net {
        /// Which connection.
        epoch: u64,
        /// What was read.
        data: Vec<u8>,
    },
    /// Connection `epoch` reached its end (or failed to read).
    Eof {
        /// Which connection.
        epoch: u64,
    },
    /// Work from a second command.
    Local(Job),
}

/// One live TCP connection.
pub struct Link {
    stream: TcpStream,
    /// The protocol state.
    pub conn: Conn,
    /// This connection's epoch.
    pub epoch: u64,
}

impl Link {
    /// Connects to `addr`, starts the handshake and the reader thread.
    ///
    /// # Errors
    /// [`Error::Connect`] if no address answers.
    pub fn connect(
        addr: &str,
        key: &Keypair,
        server_key: &PublicKey,
        config: ConnConfig,
        epoch: u64,
        tx: Sender<Input>,
    ) -> Result<Link, Error> {
        let connect_err = |source| Error::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
        let mut stream = None;
        for sa in addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
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
        let conn = Conn::new(key, server_key, config, Instant::now())
            .map_err(|_| Error::Damaged("the pinned server key is not a valid key".into()))?;
        let mut reader = stream.try_clone()?;
        std::thread::Builder::new()
            .name(format!("tidings-read-{epoch}"))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx
                                .send(Input::Net {
                                    epoch,
                                    data: buf[..n].to_vec(),
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(Input::Eof { epoch });
            })?;
        let mut link = Link { stream, conn, epoch };
        link.flush()?;
        Ok(link)
    }

    /// Writes everything the connection has queued.
    ///
    /// # Errors
    /// I/O errors (the connection is then unusable).
    pub fn flush(&mut self) -> Result<(), Error> {
        while !self.conn.transmit().is_empty() {
            let n = self.stream.write(self.conn.transmit())?;
            if n == 0 {
                return Err(Error::Closed(super::conn::Closed::EndOfStream));
            }
            self.conn.advance(n);
        }
        Ok(())
    }

    /// Says goodbye (best effort) and closes.
    pub fn close(mut self) {
        self.conn.close(Instant::now());
        let _ = self.flush();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Wakes the reader thread, which then ends.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
