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
use super::health::{Health, Snapshot};
use crate::code::Code;
use crate::hub::{Effect, Now, Refusal, Shared};
use crate::ids::DeviceKey;
use crate::store::backup::Written;
use crate::store::{BackupSink, Op, Outcome, Store};
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
        /// Lifetime (`None`: it never expires).
        expires: Option<Duration>,
        /// Address to put in the code instead of the recorded one.
        public_addr: Option<String>,
    },
    /// List the invites.
    Invites,
    /// Delete an invite.
    RevokeInvite {
        /// Its id, as `invites` shows it.
        id: String,
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
    /// Delete an account.
    DeleteUser {
        /// Whose.
        user: String,
    },
    /// The daemon's health and figures, `key\tvalue` a line.
    Status,
    /// Stream a backup (see [`request_backup`]).
    Backup,
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
            Command::Invites => "invites".into(),
            Command::RevokeInvite { id } => format!("revoke-invite {id}"),
            Command::Users => "users".into(),
            Command::Devices { user } => format!("devices {user}"),
            Command::Revoke { user, device } => format!("revoke {user} {}", opt(device.map(|d| d.to_string()))),
            Command::DeleteUser { user } => format!("delete-user {user}"),
            Command::Status => "status".into(),
            Command::Backup => "backup".into(),
        }
    }

    /// A word for the log.
    fn name(&self) -> &'static str {
        match self {
            Command::Invite { .. } => "invite",
            Command::Invites => "invites",
            Command::RevokeInvite { .. } => "revoke-invite",
            Command::Users => "users",
            Command::Devices { .. } => "devices",
            Command::Revoke { .. } => "revoke",
            Command::DeleteUser { .. } => "delete-user",
            Command::Status => "status",
            Command::Backup => "backup",
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
            ["invites"] => Ok(Command::Invites),
            ["revoke-invite", id] => Ok(Command::RevokeInvite { id: id.to_string() }),
            ["users"] => Ok(Command::Users),
            ["devices", user] => Ok(Command::Devices { user: user.to_string() }),
            ["revoke", user, device] => Ok(Command::Revoke {
                user: user.to_string(),
                device: opt(device)
                    .map(|d| num(&d).and_then(|n| u32::try_from(n).map_err(|_| "no such device".to_string())))
                    .transpose()?,
            }),
            ["delete-user", user] => Ok(Command::DeleteUser { user: user.to_string() }),
            ["status"] => Ok(Command::Status),
            ["backup"] => Ok(Command::Backup),
            _ => Err("unknown command".into()),
        }
    }
}

fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What a running daemon adds to a command: its online directory and
/// loops (to disconnect revoked devices) and its health.
#[derive(Clone, Copy)]
pub struct Running<'a> {
    /// Who is online.
    pub shared: &'a Shared,
    /// The loops.
    pub loops: &'a Loops,
    /// Health and figures.
    pub health: &'a Health,
}

/// The `status` lines of a snapshot: `key\tvalue`, `-` for none.
pub fn status_lines(s: &Snapshot) -> Vec<String> {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    vec![
        format!("version\t{}", s.version),
        format!("uptime_s\t{}", s.uptime_s),
        format!("connections\t{}", s.connections),
        format!("online_devices\t{}", s.online_devices),
        format!("queued_messages\t{}", s.queued_messages),
        format!("queued_bytes\t{}", s.queued_bytes),
        format!(
            "oldest_undelivered_s\t{}",
            opt(s.oldest_undelivered_s.map(|v| v.to_string()))
        ),
        format!("disk_used_bytes\t{}", s.disk_used_bytes),
        format!("disk_free_bytes\t{}", s.disk_free_bytes),
        format!("min_free_bytes\t{}", s.min_free_bytes),
        format!("flush_p99_ms\t{}", opt(s.flush_p99_ms.map(|v| format!("{v}")))),
        format!("stalled\t{}", opt(s.stalled.clone())),
        format!("healthy\t{}", s.healthy),
        format!("pid\t{}", s.pid),
    ]
}

/// Revokes `targets` of `user` (the store thread must run) and closes
/// their connections when the daemon runs.
fn revoke_devices(
    store: &Store,
    running: Option<Running<'_>>,
    user: &str,
    id: crate::ids::UserId,
    targets: Vec<DeviceId>,
    now_ms: u64,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for d in targets {
        let key = DeviceKey { user: id, device: d };
        match store.call(Op::Revoke { device: key, now_ms }) {
            Outcome::Revoked(false) => return Err(format!("{user} has no device {d}")),
            Outcome::Revoked(true) => {
                close_revoked(running, key);
                out.push(format!("revoked {user} device {d}"));
            }
            _ => return Err(failed()),
        }
    }
    Ok(out)
}

fn close_revoked(running: Option<Running<'_>>, key: DeviceKey) {
    if let Some(r) = running
        && let Some(conn) = r.shared.connection_of(key)
    {
        r.loops.post(Effect::Close {
            conn,
            why: Refusal::Revoked,
        });
    }
}

fn failed() -> String {
    "the store failed; see the daemon's log".to_string()
}

/// Runs a command on the store, whose thread must run. `running` is there
/// when the daemon runs. Returns the output lines. ([`Command::Backup`]
/// is not run here: see [`backup_to`].)
///
/// # Errors
/// A message for the operator.
pub fn execute(store: &Store, running: Option<Running<'_>>, cmd: &Command, now_ms: u64) -> Result<Vec<String>, String> {
    let accounts = store.accounts();
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
            let expires_ms = expires.map(|d| now_ms.saturating_add(d.as_millis() as u64));
            let Outcome::Token(token, _) = store.call(Op::Invite {
                uses: *uses,
                expires_ms,
            }) else {
                return Err(failed());
            };
            let id = hex::encode(token.id);
            let code = Code {
                addr,
                server_key: store.server_key().public,
                token,
            };
            Ok(vec![format!("id {id}"), code.to_string()])
        }
        Command::Invites => {
            let mut lines = Vec::new();
            for (id, uses, expires) in accounts.invites().map_err(|e| e.to_string())? {
                let expiry = match expires {
                    None => "never expires".to_string(),
                    Some(t) if t <= now_ms => format!("expired {}", fmt_time(t)),
                    Some(t) => format!("expires {}", fmt_time(t)),
                };
                lines.push(format!(
                    "{}\t{uses} use{} left\t{expiry}",
                    hex::encode(id),
                    if uses == 1 { "" } else { "s" }
                ));
            }
            Ok(lines)
        }
        Command::RevokeInvite { id } => {
            let bytes: [u8; 8] = hex::decode(id)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("{id:?} is not an invite id (16 hex digits, as `tidingsd invites` shows)"))?;
            match store.call(Op::RevokeInvite { id: bytes }) {
                Outcome::InviteRevoked(true) => Ok(vec![format!("revoked invite {id}")]),
                Outcome::InviteRevoked(false) => {
                    Err(format!("no invite {id} (used up, expired and swept, or never made)"))
                }
                _ => Err(failed()),
            }
        }
        Command::Users => {
            let mut lines: Vec<String> = accounts
                .users()
                .into_iter()
                .map(|(name, _, devices)| format!("{name}\t{devices} device{}", if devices == 1 { "" } else { "s" }))
                .collect();
            for (name, when) in accounts.reserved_names() {
                lines.push(format!(
                    "{name}\tdeleted {}, name reserved for the retention period",
                    fmt_time(when)
                ));
            }
            Ok(lines)
        }
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
                    let online = match running.and_then(|r| r.shared.connection_of(key)) {
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
            revoke_devices(store, running, user, id, targets, now_ms)
        }
        Command::DeleteUser { user } => {
            let id = accounts.user_id(user).ok_or_else(|| format!("no user {user}"))?;
            match store.call(Op::DeleteUser { user: id, now_ms }) {
                Outcome::UserDeleted(Some(devices)) => {
                    for d in &devices {
                        close_revoked(running, *d);
                    }
                    Ok(vec![format!(
                        "deleted {user}: {} device{} revoked, queues purged; the name is reserved for the retention period, then free",
                        devices.len(),
                        if devices.len() == 1 { "" } else { "s" }
                    )])
                }
                Outcome::UserDeleted(None) => Err(format!("no user {user}")),
                _ => Err(failed()),
            }
        }
        Command::Status => match running {
            Some(r) => Ok(status_lines(&r.health.snapshot())),
            None => Err("the daemon is not running".into()),
        },
        Command::Backup => Err("a backup is streamed, not listed".into()),
    }
}

/// Writes a backup of `store` (whose thread must run) to `out`, through
/// the store thread. Returns what it holds.
///
/// # Errors
/// A message for the operator.
pub fn backup_to(store: &Store, out: impl Write + Send + 'static) -> Result<Written, String> {
    match store.call(Op::Backup {
        out: BackupSink::new(out),
    }) {
        Outcome::BackedUp(r) => r,
        _ => Err(failed()),
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
    pub fn start(
        store: Arc<Store>,
        shared: Arc<Shared>,
        loops: Loops,
        health: Arc<Health>,
    ) -> std::io::Result<AdminServer> {
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
                let health = health.clone();
                let spawned = std::thread::Builder::new().name("admin-command".into()).spawn(move || {
                    serve(stream, &store, &shared, &loops, &health);
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

fn serve(stream: UnixStream, store: &Store, shared: &Shared, loops: &Loops, health: &Health) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let Ok(reader) = stream.try_clone() else { return };
    if BufReader::new(reader.take(MAX_REQUEST)).read_line(&mut line).is_err() {
        return;
    }
    let running = Running { shared, loops, health };
    let mut stream = stream;
    let reply = match Command::parse(&line) {
        Ok(Command::Backup) => {
            log::info!("admin: backup");
            // The backup follows the first line; a stall of the reader
            // ends it rather than hold the store thread.
            let _ = stream.set_write_timeout(Some(BACKUP_STALL));
            if stream.write_all(b"ok backup\n").is_err() {
                return;
            }
            let Ok(out) = stream.try_clone() else { return };
            match backup_to(store, out) {
                Ok(w) => log::info!(
                    "backup: {} trees, {} records, {} files, {} bytes",
                    w.trees,
                    w.records,
                    w.files,
                    w.bytes
                ),
                Err(e) => log::error!("backup failed: {e}"),
            }
            return;
        }
        Ok(cmd) => {
            log::info!("admin: {}", cmd.name());
            execute(store, Some(running), &cmd, Now::read().unix_ms)
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
    let _ = stream.write_all(text.as_bytes());
}

/// How long a backup waits for its reader before it gives up.
const BACKUP_STALL: Duration = Duration::from_secs(60);

/// Asks a running daemon for a backup and copies it to `out`. `Ok(None)`
/// if no daemon listens on the socket.
///
/// # Errors
/// The daemon's error, or a failure talking to it or writing `out`.
pub fn request_backup(data_dir: &Path, out: &mut dyn Write) -> Result<Option<u64>, String> {
    let Some(mut stream) = connect(data_dir)? else {
        return Ok(None);
    };
    let _ = stream.set_read_timeout(Some(BACKUP_STALL));
    stream
        .write_all(b"backup\n")
        .map_err(|e| format!("talking to the daemon: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .map_err(|e| format!("talking to the daemon: {e}"))?;
    match first.trim_end() {
        "ok backup" => {}
        l if l.starts_with("error ") => return Err(l["error ".len()..].to_string()),
        _ => return Err("the daemon gave no answer".into()),
    }
    let n = std::io::copy(&mut reader, out).map_err(|e| format!("copying the backup: {e}"))?;
    Ok(Some(n))
}

fn connect(data_dir: &Path) -> Result<Option<UnixStream>, String> {
    let path = data_dir.join(SOCKET);
    match UnixStream::connect(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Sends a command to a running daemon. `Ok(None)` if no daemon listens on
/// the socket (then the caller opens the store itself).
///
/// # Errors
/// The daemon's error message, or a failure talking to it.
pub fn request(data_dir: &Path, cmd: &Command) -> Result<Option<Vec<String>>, String> {
    request_within(data_dir, cmd, Duration::from_secs(30))
}

/// [`request`], giving up on an answer after `timeout`.
///
/// # Errors
/// The daemon's error message, or a failure talking to it (a timeout
/// among them).
pub fn request_within(data_dir: &Path, cmd: &Command, timeout: Duration) -> Result<Option<Vec<String>>, String> {
    let Some(mut stream) = connect(data_dir)? else {
        return Ok(None);
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
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
            Command::Invites,
            Command::RevokeInvite {
                id: "0011223344556677".into(),
            },
            Command::DeleteUser { user: "bob".into() },
            Command::Status,
            Command::Backup,
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
