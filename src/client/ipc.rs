//! The profile's IPC socket. One process per profile: a running `listen`
//! (or `chat`) serves a Unix socket
//! (`sock` in the profile, mode 0600, in a 0700 directory) through which a
//! second command hands over its work and gets the outcome; without a
//! listener, a command opens the profile itself, waiting while another
//! short-lived command holds it. Never two writers.
//!
//! The socket speaks one JSON [`Request`] line in, one JSON reply line out
//! (`{"Ok": {"notices": [...], "outcome": Outcome}}` or `{"Err": "text"}`).
//! Only the profile's owner can reach it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use super::Error;
use super::backoff::Backoff;
use super::core::{Client, Event};
use super::driver::Input;
use super::profile::{SOCKET_FILE, Unlock};
use super::request::{Job, Outcome, Reply, Request};

/// Longest request line accepted on the socket.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a command waits for a short-lived command holding the profile.
pub const PROFILE_WAIT: Duration = Duration::from_secs(30);
/// How long a command waits for the listener to do its work.
pub const DELEGATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `request` on the profile in `dir`: through its running `listen` if
/// there is one, else on the profile itself (waiting up to
/// [`PROFILE_WAIT`] for another command to finish with it). New messages of
/// a `Sync` are passed to `on_event` as they become durable, and notices
/// about contacts' devices as they arise (for handed-over work: before the
/// outcome is returned).
///
/// # Errors
/// The request's failure, [`Error::ProfileBusy`], or [`Error::Remote`]
/// with the listener's message.
pub fn run(dir: &Path, request: Request, on_event: &mut dyn FnMut(&Event)) -> Result<Outcome, Error> {
    run_with(dir, request, &mut Unlock::from_env(), on_event)
}

/// [`run`], opening the profile (if no listener has it) with `unlock`.
///
/// # Errors
/// See [`run`].
pub fn run_with(
    dir: &Path,
    request: Request,
    unlock: &mut Unlock<'_>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Outcome, Error> {
    let mut backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_millis(100)).giving_up_after(PROFILE_WAIT);
    let mut told = false;
    loop {
        if let Some(reply) = delegate(dir, &request)? {
            let reply = reply.map_err(Error::Remote)?;
            for n in reply.notices {
                on_event(&Event::Notice(n));
            }
            return Ok(reply.outcome);
        }
        match unlock.open(dir, Duration::ZERO) {
            Ok(profile) => {
                let receive = matches!(request, Request::Sync);
                let mut client = Client::new(profile, receive);
                let outcome = client.execute(request, on_event);
                client.disconnect();
                return outcome;
            }
            Err(Error::ProfileBusy(p)) => {
                let now = Instant::now();
                let Some(at) = backoff.next(now) else {
                    return Err(Error::ProfileBusy(p));
                };
                if !told {
                    log::warn!("profile {} is busy with another command; waiting", dir.display());
                    told = true;
                }
                std::thread::sleep(at - now);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a `listen` or `chat` holds the profile in `dir` (its socket
/// answers).
pub fn delegate_target(dir: &Path) -> Option<PathBuf> {
    let path = dir.join(SOCKET_FILE);
    UnixStream::connect(&path).ok().map(|_| path)
}

/// Hands `request` to the `listen` running on the profile in `dir`;
/// `None` if none runs.
///
/// # Errors
/// I/O failures talking to a listener that is there.
pub fn delegate(dir: &Path, request: &Request) -> Result<Option<Result<Reply, String>>, Error> {
    let mut stream = match UnixStream::connect(dir.join(SOCKET_FILE)) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    log::info!("handing the work to the running `tidings listen`");
    stream.set_read_timeout(Some(DELEGATE_TIMEOUT))?;
    let mut line = serde_json::to_vec(request).map_err(|e| Error::Remote(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream.take(16 << 20)).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(Error::Remote("the listener closed without answering".into()));
    }
    let reply = serde_json::from_str(&answer).map_err(|e| Error::Remote(format!("unreadable answer: {e}")))?;
    Ok(Some(reply))
}

/// Removes the socket file when `listen` ends.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `tidings listen` on the profile in `dir`: opens it (waiting for a
/// short-lived command), serves the local socket, and stays connected,
/// reporting through `on_event` until it returns `false` or a failure that
/// reconnecting cannot fix.
///
/// # Errors
/// A listener already running, [`Error::ProfileBusy`], or what ends
/// [`Client::listen`].
pub fn listen(dir: &Path, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<(), Error> {
    listen_with(dir, &mut Unlock::from_env(), on_event)
}

/// [`listen`], opening the profile with `unlock`.
///
/// # Errors
/// See [`listen`].
pub fn listen_with(dir: &Path, unlock: &mut Unlock<'_>, on_event: &mut dyn FnMut(&Event) -> bool) -> Result<(), Error> {
    let (mut client, _served) = serve_profile(dir, unlock)?;
    let result = client.listen(on_event);
    client.disconnect();
    result
}

/// The socket of a profile's one writer, served while this lives (the
/// socket file is removed when it is dropped).
pub struct Served {
    _guard: SocketGuard,
}

/// Opens the profile in `dir` as its one writer (`listen`, `chat`): a
/// receiving client, and the socket through which other commands hand it
/// their work (as [`Input::Local`] jobs to the client's driver).
///
/// # Errors
/// Another writer running, [`Error::ProfileBusy`], an unregistered
/// profile, I/O failures.
pub fn serve_profile(dir: &Path, unlock: &mut Unlock<'_>) -> Result<(Client, Served), Error> {
    if UnixStream::connect(dir.join(SOCKET_FILE)).is_ok() {
        return Err(Error::Usage(format!(
            "`tidings listen` or `tidings chat` is already running on profile {}",
            dir.display()
        )));
    }
    let profile = unlock.open(dir, PROFILE_WAIT)?;
    profile.registered()?;
    let client = Client::new(profile, true);
    // Holding the profile lock, any socket file is a crashed listener's.
    let path = client.profile().socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let guard = SocketGuard(path.clone());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let tx = client.input_sender();
    std::thread::Builder::new()
        .name("tidings-local".into())
        .spawn(move || accept_loop(listener, tx))?;
    Ok((client, Served { _guard: guard }))
}

fn accept_loop(listener: UnixListener, tx: Sender<Input>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("tidings-local-conn".into())
            .spawn(move || {
                if let Err(e) = serve_one(stream, &tx) {
                    log::debug!("local request failed: {e}");
                }
            });
    }
}

fn serve_one(stream: UnixStream, tx: &Sender<Input>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (reply_tx, reply_rx) = mpsc::channel();
            if tx
                .send(Input::Local(Job {
                    request,
                    reply: reply_tx,
                }))
                .is_err()
            {
                Err("the listener is stopping".to_string())
            } else {
                reply_rx
                    .recv()
                    .unwrap_or_else(|_| Err("the listener stopped".to_string()))
            }
        }
        Err(e) => Err(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::super::profile::Profile;
    use super::*;

    #[test]
    fn without_a_listener_a_command_waits_for_the_profile() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let held = Profile::open(&dir, Duration::ZERO).unwrap();
        // A socket file left by a crashed listener is not a listener.
        drop(UnixListener::bind(dir.join(SOCKET_FILE)).unwrap());
        assert!(delegate(&dir, &Request::Devices).unwrap().is_none());
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let started = Instant::now();
        let outcome = run(
            &dir,
            Request::Settings {
                read_receipts: None,
                last_seen: None,
                auto_download: None,
            },
            &mut |_| {},
        )
        .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(
            outcome,
            Outcome::Settings {
                read_receipts: true,
                last_seen: true,
                auto_download: crate::client::files::AUTO_DOWNLOAD,
            }
        );
        // A conversation that never was is a clear error.
        let e = run(&dir, Request::History { user: "bob".into() }, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("no conversation with bob"), "{e}");
        holder.join().unwrap();
        // Not registered: a clear error, not a hang.
        let e = run(&dir, Request::LinkCode, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::NotRegistered), "{e}");
    }

    #[test]
    fn requests_and_replies_are_json_lines() {
        use super::super::e2e::Notice;
        use crate::wire::DeviceId;
        let r = Request::Send {
            to: "bob".into(),
            text: "hi".into(),
            reply_to: None,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"Send":{"to":"bob","text":"hi"}}"#);
        let reply: Result<Reply, String> = Err("no".into());
        assert_eq!(serde_json::to_string(&reply).unwrap(), r#"{"Err":"no"}"#);
        let reply: Result<Reply, String> = Ok(Reply {
            notices: vec![Notice::NewDevice {
                user: "bob".into(),
                device: DeviceId(2),
            }],
            outcome: Outcome::Revoked { device: 2 },
        });
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"Ok":{"notices":[{"NewDevice":{"user":"bob","device":2}}],"outcome":{"Revoked":{"device":2}}}}"#
        );
    }
}
