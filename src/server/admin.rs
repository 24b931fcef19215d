//! Operator commands: through the admin socket while the daemon runs, or
//! straight on the store when it does not (sled allows one process).
//!
//! The socket is `admin.sock` in the data directory (mode 0600, in a
//! directory of mode 0700). A request is one line: a command and its
//! arguments separated by single spaces, `-` for an absent one. The answer
//! is `ok` and the command's output lines, or `error MESSAGE`; then the
//! daemon closes the connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Loops;
use crate::code::Code;
use crate::hub::{Effect, Now, Refusal, Shared};
use crate::ids::DeviceKey;
use crate::store::{Op, Outcome, Store};
use crate::wire::DeviceId;

/// File name of the admin socket in the data directory.
pub const SOCKET: &str = "admin.sock";
const MAX_REQUEST: u64 = 4096;
/// Operator commands served at once; one more is told to try again.
const MAX_OPERATORS: usize = 16;

/// An operator command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Make an invite.
    Invite {
        /// Registrations it allows.
        uses: u32,
        /// Lifetime.
        expires: Option<Duration>,
        /// Address to put in the code instead of the recorded one.
        public_addr: Option<String>,
    },
    /// List users.
    Users,
    /// List a user's devices.
    Devices {
        /// Whose.
        user: String,
    },
    /// Revoke one device, or every device, of a user.
    Revoke {
        /// Whose.
        user: String,
        /// Which (all if `None`).
        device: Option<u32>,
    },
}

impl Command {
    /// The request line.
    pub fn to_line(&self) -> String {
        let opt = |s: Option<String>| s.unwrap_or_else(|| "-".into());
        match self {
            Command::Invite {
                uses,
                expires,
                public_addr,
            } => {
                format!(
                    "invite {uses} {} {}",
                    opt(expires.map(|d| d.as_secs().to_string())),
                    opt(public_addr.clone())
                )
            }
            Command::Users => "users".into(),
            Command::Devices { user } => format!("devices {user}"),
            Command::Revoke { user, device } => format!("revoke {user} {}", opt(device.map(|d| d.to_string()))),
        }
    }

    /// Parses a request line.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(' ').collect();
        let opt = |w: &str| if w == "-" { None } else { Some(w.to_string()) };
        let num = |w: &str| w.parse::<u64>().map_err(|_| format!("not a number: {w}"));
        match words.as_slice() {
            ["invite", uses, expires, addr] => Ok(Command::Invite {
                uses: u32::try_from(num(uses)?).map_err(|_| "too many uses".to_string())?,
                expires: opt(expires).map(|e| num(&e).map(Duration::from_secs)).transpose()?,
                public_addr: opt(addr),
            }),
            ["users"] => Ok(Command::Users),
            ["devices", user] => Ok(Command::Devices { user: user.to_string() }),
            ["revoke", user, device] => Ok(Command::Revoke {
                user: user.to_string(),
                device: opt(device)
                    .map(|d| num(&d).and_then(|n| u32::try_from(n).map_err(|_| "no such device".to_string())))
                    .transpose()?,
            }),
            _ => Err("unknown command".into()),
        }
    }
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Runs a command on the store, whose thread must run. `online` is there
/// when the daemon runs, to disconnect revoked devices. Returns the output
/// lines.
///
/// # Errors
/// A message for the operator.
pub fn execute(
    store: &Store,
    online: Option<(&Shared, &Loops)>,
    cmd: &Command,
    now_ms: u64,
) -> Result<Vec<String>, String> {
    let accounts = store.accounts();
    let failed = || "the store failed; see the daemon's log".to_string();
    match cmd {
        Command::Invite {
            uses,
            expires,
            public_addr,
        } => {
            let addr = match public_addr.clone().or_else(|| store.public_addr()) {
                Some(a) => a,
                None => {
                    return Err(
                        "this daemon listens on a wildcard address and no --public-addr was ever given; \
                                pass --public-addr HOST:PORT (the address devices should dial)"
                            .into(),
                    );
                }
            };
            if *uses == 0 {
                return Err("--uses must be at least 1".into());
            }
            let expires_ms = expires.map(|d| now_ms + d.as_millis() as u64);
            let Outcome::Token(token, _) = store.call(Op::Invite {
                uses: *uses,
                expires_ms,
            }) else {
                return Err(failed());
            };
            let code = Code {
                addr,
                server_key: store.server_key().public,
                token,
            };
            Ok(vec![code.to_string()])
        }
        Command::Users => Ok(accounts
            .users()
            .into_iter()
            .map(|(name, _, devices)| format!("{name}\t{devices} device{}", if devices == 1 { "" } else { "s" }))
            .collect()),
        Command::Devices { user } => {
            let id = accounts.user_id(user).ok_or_else(|| format!("no user {user}"))?;
            Ok(accounts
                .device_infos(id)
                .into_iter()
                .map(|d| {
                    let key = DeviceKey {
                        user: id,
                        device: d.device,
                    };
                    let online = match online.and_then(|(shared, _)| shared.connection_of(key)) {
                        Some(c) => format!("\tonline (loop {})", c.worker),
                        None => String::new(),
                    };
                    format!(
                        "{}\tcreated {}\tlast seen {}{online}",
                        d.device,
                        fmt_time(d.created_ms),
                        fmt_time(d.last_seen_ms)
                    )
                })
                .collect())
        }
        Command::Revoke { user, device } => {
            let id = accounts.user_id(user).ok_or_else(|| format!("no user {user}"))?;
            let targets: Vec<DeviceId> = match device {
                Some(d) => vec![DeviceId(*d)],
                None => accounts.device_infos(id).into_iter().map(|d| d.device).collect(),
            };
            if targets.is_empty() {
                return Err(format!("{user} has no devices"));
            }
            let mut out = Vec::new();
            for d in targets {
                let key = DeviceKey { user: id, device: d };
                match store.call(Op::Revoke { device: key, now_ms }) {
                    Outcome::Revoked(false) => return Err(format!("{user} has no device {d}")),
                    Outcome::Revoked(true) => {
                        if let Some((shared, loops)) = online
                            && let Some(conn) = shared.connection_of(key)
                        {
                            loops.post(Effect::Close {
                                conn,
                                why: Refusal::Revoked,
                            });
                        }
                        out.push(format!("revoked {user} device {d}"));
                    }
                    _ => return Err(failed()),
                }
            }
            Ok(out)
        }
    }
}

/// The admin socket's thread.
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `admin.sock` (replacing one a crash left behind: we hold the
    /// data directory's lock, so no live daemon owns it) and serves it.
    ///
    /// # Errors
    /// If the socket cannot be created.
    pub fn start(store: Arc<Store>, shared: Arc<Shared>, loops: Loops) -> std::io::Result<AdminServer> {
        let path = store.dir().join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed a stale admin socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let busy = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new().name("admin".into()).spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("admin socket: {e}");
                        continue;
                    }
                };
                // One thread per operator, so that one who is slow to
                // send (or a long backup) holds up nobody else.
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_OPERATORS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.write_all(b"error too many operator commands at once; try again\n");
                    continue;
                }
                let (store, shared, loops, done) = (store.clone(), shared.clone(), loops.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("admin-command".into())
                    .spawn(move || {
                        serve(stream, &store, &shared, &loops);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("admin socket: cannot start a thread: {e}");
                }
            }
        })?;
        Ok(AdminServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving and removes the socket (as dropping it does).
    pub fn stop(self) {
        drop(self)
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, store: &Store, shared: &Shared, loops: &Loops) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let Ok(reader) = stream.try_clone() else { return };
    if BufReader::new(reader.take(MAX_REQUEST)).read_line(&mut line).is_err() {
        return;
    }
    let reply = match Command::parse(&line) {
        Ok(cmd) => {
            log::info!(
                "admin: {}",
                match &cmd {
                    Command::Invite { .. } => "invite",
                    Command::Users => "users",
                    Command::Devices { .. } => "devices",
                    Command::Revoke { .. } => "revoke",
                }
            );
            execute(store, Some((shared, loops)), &cmd, Now::read().unix_ms)
        }
        Err(e) => Err(e),
    };
    let text = match reply {
        Ok(lines) => {
            let mut t = String::from("ok\n");
            for l in lines {
                t.push_str(&l);
                t.push('\n');
            }
            t
        }
        Err(e) => format!("error {}\n", e.replace('\n', " ")),
    };
    let mut stream = stream;
    let _ = stream.write_all(text.as_bytes());
}

/// Sends a command to a running daemon. `Ok(None)` if no daemon listens on
/// the socket (then the caller opens the store itself).
///
/// # Errors
/// The daemon's error message, or a failure talking to it.
pub fn request(data_dir: &Path, cmd: &Command) -> Result<Option<Vec<String>>, String> {
    let path = data_dir.join(SOCKET);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream
        .write_all(format!("{}\n", cmd.to_line()).as_bytes())
        .map_err(|e| format!("talking to the daemon: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("talking to the daemon: {e}"))?;
    let mut lines = text.lines();
    match lines.next() {
        Some("ok") => Ok(Some(lines.map(str::to_string).collect())),
        Some(l) if l.starts_with("error ") => Err(l["error ".len()..].to_string()),
        _ => Err("the daemon gave no answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_round_trip() {
        for cmd in [
            Command::Invite {
                uses: 3,
                expires: Some(Duration::from_secs(3600)),
                public_addr: Some("h:1".into()),
            },
            Command::Invite {
                uses: 1,
                expires: None,
                public_addr: None,
            },
            Command::Users,
            Command::Devices { user: "bob".into() },
            Command::Revoke {
                user: "bob".into(),
                device: Some(2),
            },
            Command::Revoke {
                user: "bob".into(),
                device: None,
            },
        ] {
            assert_eq!(Command::parse(&cmd.to_line()), Ok(cmd));
        }
        assert!(Command::parse("rm -rf /").is_err());
        assert!(Command::parse("invite x - -").is_err());
    }

    /// One operator who connects and sends nothing holds up nobody else.
    #[test]
    fn a_silent_operator_does_not_hold_up_another() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = super::super::ServerConfig::new(dir.path().join("data"));
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = super::super::Server::bind(&config).unwrap();
        let mut silent = UnixStream::connect(config.data_dir.join(SOCKET)).unwrap();
        assert_eq!(request(&config.data_dir, &Command::Users), Ok(Some(vec![])));
        // The silent one was still waited for meanwhile (served one after
        // the other, it would have been given up on first).
        silent.write_all(b"users\n").unwrap();
        let mut text = String::new();
        silent.read_to_string(&mut text).unwrap();
        assert_eq!(text, "ok\n");
        drop(server);
    }

    /// `tidingsd` prints its banner once `Server::bind` returns, and
    /// operators (and scripts) run `tidingsd invite` as soon as they see
    /// it: from then on the admin socket must answer, or the command finds
    /// the store locked and no socket, and fails.
    #[test]
    fn the_admin_socket_answers_once_the_server_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = super::super::ServerConfig::new(dir.path().join("data"));
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let server = super::super::Server::bind(&config).unwrap();
        assert_eq!(request(&config.data_dir, &Command::Users), Ok(Some(vec![])));
        // A server dropped without running leaves no socket behind.
        drop(server);
        assert!(!config.data_dir.join(SOCKET).exists());
    }
}
