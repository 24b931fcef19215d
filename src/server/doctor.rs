//! `tidingsd doctor`: checks the machine and the data directory for what
//! makes a daemon fail or misbehave, and says how to fix each problem.
//!
//! It reads only: the data directory's metadata, free space, the
//! file-descriptor limit (the running daemon's, else its own), the clock,
//! the public address's name, and the running daemon's health through the
//! admin socket. It changes nothing.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::ServerConfig;
use super::admin::{self, Command};
use crate::store::DataDir;

/// How a check came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok(String),
    /// Worth a look; nothing fails because of it yet.
    Warn(String, String),
    /// Will cause failures: what, and the fix.
    Fail(String, String),
}

/// Runs every check, prints one line each (and a fix for each problem),
/// and returns whether none failed.
pub fn run(config: &ServerConfig) -> bool {
    let verdicts = check(config);
    let mut ok = true;
    for v in &verdicts {
        match v {
            Verdict::Ok(what) => println!("ok    {what}"),
            Verdict::Warn(what, fix) => println!("warn  {what}\n      fix: {fix}"),
            Verdict::Fail(what, fix) => {
                ok = false;
                println!("FAIL  {what}\n      fix: {fix}");
            }
        }
    }
    ok
}

/// The checks, in order.
pub fn check(config: &ServerConfig) -> Vec<Verdict> {
    let dir = &config.data_dir;
    let mut out = Vec::new();
    // The running daemon, if any: its health and process.
    let daemon = match DataDir::check(dir) {
        DataDir::Data => admin::request_within(dir, &Command::Status, Duration::from_secs(2)),
        _ => Ok(None),
    };
    let mut pid = None;
    match &daemon {
        Ok(Some(lines)) => {
            let get = |k: &str| {
                lines
                    .iter()
                    .filter_map(|l| l.split_once('\t'))
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            };
            pid = get("pid").and_then(|p| p.parse::<u32>().ok());
            match get("healthy").as_deref() {
                Some("true") => out.push(Verdict::Ok("the daemon runs and is healthy".into())),
                _ => out.push(Verdict::Fail(
                    format!(
                        "the daemon runs but is unhealthy{}",
                        get("stalled")
                            .filter(|s| s != "-")
                            .map(|s| format!(" (stalled: {s})"))
                            .unwrap_or_default()
                    ),
                    "see `tidingsd status` and the daemon's log (journalctl -u tidingsd); restart it".into(),
                )),
            }
        }
        Ok(None) => out.push(Verdict::Warn(
            "the daemon is not running (no admin socket answers)".into(),
            "start it: systemctl start tidingsd (or run tidingsd)".into(),
        )),
        Err(e) => out.push(Verdict::Fail(
            format!("the daemon does not answer on its admin socket: {e}"),
            "see the daemon's log; restart it".into(),
        )),
    }
    out.push(data_dir(dir, pid));
    out.push(free_space(dir, config.store.min_free));
    out.push(fd_limit(pid, config));
    out.extend(clock(dir));
    out.push(public_addr(config));
    out
}

/// The real user id of process `pid` (or this one), from `/proc`.
fn uid_of(pid: Option<u32>) -> Option<u32> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn data_dir(dir: &Path, daemon: Option<u32>) -> Verdict {
    use std::os::unix::fs::MetadataExt;
    let shown = dir.display();
    match DataDir::check(dir) {
        DataDir::Data => {}
        DataDir::Missing | DataDir::Empty => {
            return Verdict::Warn(
                format!("{shown} holds no data directory yet"),
                "the daemon's first start creates it (check --data-dir or data_dir if one should be there)".into(),
            );
        }
        DataDir::Foreign => {
            return Verdict::Fail(
                format!("{shown} is not a tidings data directory"),
                "point --data-dir (or data_dir in the config) at the data directory".into(),
            );
        }
        DataDir::Unreadable(e) => {
            return Verdict::Fail(
                format!("{shown}: {e}"),
                "run doctor as the daemon's user (sudo -u tidings tidingsd doctor ...)".into(),
            );
        }
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Verdict::Fail(format!("{shown} cannot be read"), "check its permissions".into());
    };
    let owner = uid_of(daemon).or_else(|| uid_of(None));
    let mode = meta.mode() & 0o777;
    if owner.is_some_and(|u| u != meta.uid()) {
        return Verdict::Fail(
            format!(
                "{shown} belongs to uid {}, not to the {} (uid {})",
                meta.uid(),
                if daemon.is_some() {
                    "daemon's user"
                } else {
                    "user running doctor"
                },
                owner.unwrap_or(0)
            ),
            format!("chown -R tidings:tidings {shown} (the user the daemon runs as)"),
        );
    }
    if mode & 0o077 != 0 {
        return Verdict::Fail(
            format!("{shown} has mode {mode:o}: others can read the server's private key"),
            format!("chmod 700 {shown}"),
        );
    }
    Verdict::Ok(format!("{shown}: a data directory, owner and mode {mode:o} are right"))
}

fn free_space(dir: &Path, floor: u64) -> Verdict {
    let probe = if dir.exists() {
        dir.to_path_buf()
    } else {
        dir.parent().map_or_else(|| ".".into(), Path::to_path_buf)
    };
    match fs2::available_space(&probe) {
        Ok(free) if free < floor => Verdict::Fail(
            format!(
                "{} MiB free on {}'s filesystem, below the floor of {} MiB: new messages are refused",
                free >> 20,
                dir.display(),
                floor >> 20
            ),
            "free space on that filesystem (or lower store.min_free and send SIGHUP)".into(),
        ),
        Ok(free) if free < floor.saturating_mul(4) => Verdict::Warn(
            format!(
                "{} MiB free, less than four times the floor of {} MiB",
                free >> 20,
                floor >> 20
            ),
            "free space before new messages are refused".into(),
        ),
        Ok(free) => Verdict::Ok(format!("{} MiB free (floor {} MiB)", free >> 20, floor >> 20)),
        Err(e) => Verdict::Warn(format!("cannot measure free space: {e}"), "check the path".into()),
    }
}

/// The soft "Max open files" limit of `pid` (or this process).
fn nofile(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/limits"),
        None => "/proc/self/limits".into(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

fn fd_limit(pid: Option<u32>, config: &ServerConfig) -> Verdict {
    // A connection is one descriptor; the database, sockets and threads
    // take a few dozen more.
    const SPARE: u64 = 128;
    let Some(limit) = nofile(pid) else {
        return Verdict::Warn("cannot read the file-descriptor limit".into(), "check ulimit -n".into());
    };
    let whose = if pid.is_some() { "the daemon's" } else { "this shell's" };
    let want = u64::from(config.max_connections) + SPARE;
    if limit < u64::from(config.per_ip.connections).min(u64::from(config.max_connections)) + SPARE {
        Verdict::Fail(
            format!(
                "{whose} file-descriptor limit is {limit}: fewer than one address's connections (limits.connections_per_ip = {})",
                config.per_ip.connections
            ),
            "raise it: LimitNOFILE=262144 in the unit (as contrib/tidingsd.service has), or ulimit -n before starting"
                .into(),
        )
    } else if limit < want {
        Verdict::Warn(
            format!(
                "{whose} file-descriptor limit is {limit}, below limits.max_connections ({}) + {SPARE}: past it accepts fail",
                config.max_connections
            ),
            "raise it (LimitNOFILE= in the unit, ulimit -n), or lower limits.max_connections to fit".into(),
        )
    } else {
        Verdict::Ok(format!(
            "{whose} file-descriptor limit {limit} covers limits.max_connections ({})",
            config.max_connections
        ))
    }
}

fn clock(dir: &Path) -> Vec<Verdict> {
    let mut out = Vec::new();
    let now = SystemTime::now();
    // Files written "in the future" mean the clock went back since.
    let newest = ["FORMAT", "db/conf", "db/db", "db/snap"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok())
        .max();
    match newest {
        Some(t) if t > now + Duration::from_secs(60) => out.push(Verdict::Fail(
            format!(
                "the clock is behind the data directory's files by {} s: it went back since the daemon last wrote",
                t.duration_since(now).map_or(0, |d| d.as_secs())
            ),
            "set the clock right (enable NTP: timedatectl set-ntp true) before starting the daemon; message times and expiries follow it".into(),
        )),
        _ => out.push(Verdict::Ok("the clock is not behind the data directory".into())),
    }
    match std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .output()
    {
        Ok(o) if o.status.success() => {
            if String::from_utf8_lossy(&o.stdout).trim() == "yes" {
                out.push(Verdict::Ok("the clock is synchronised (NTP)".into()));
            } else {
                out.push(Verdict::Warn(
                    "the clock is not synchronised by NTP".into(),
                    "timedatectl set-ntp true (a Raspberry Pi has no battery-backed clock)".into(),
                ));
            }
        }
        _ => out.push(Verdict::Warn(
            "cannot tell whether the clock is synchronised (no timedatectl)".into(),
            "make sure an NTP client runs (chrony, systemd-timesyncd)".into(),
        )),
    }
    out
}

fn public_addr(config: &ServerConfig) -> Verdict {
    let (addr, from) = match &config.public_addr {
        Some(a) => (a.clone(), "public_addr"),
        None if config.listen.ip().is_unspecified() => {
            return Verdict::Warn(
                format!("listening on the wildcard {} with no public_addr", config.listen),
                "set public_addr = \"HOST:PORT\" (the address devices dial) in the config, or pass --public-addr to invite".into(),
            );
        }
        None => (config.listen.to_string(), "listen"),
    };
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                return Verdict::Fail(
                    format!("{from} {addr} resolves to no address"),
                    "fix the name's DNS records, or set public_addr to an address devices can reach".into(),
                );
            }
            if addrs.iter().all(|a| a.ip().is_loopback()) && config.listen.ip().is_unspecified() {
                return Verdict::Warn(
                    format!(
                        "{from} {addr} resolves only to this machine's loopback: other machines cannot use invites"
                    ),
                    "set public_addr to a name or address other machines reach".into(),
                );
            }
            Verdict::Ok(format!(
                "{from} {addr} resolves ({})",
                addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
            ))
        }
        Err(e) => Verdict::Fail(
            format!("{from} {addr} does not resolve: {e}"),
            "fix the name (DNS, /etc/hosts) or set public_addr to an address devices can reach".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_readable_data_directory_fails_with_a_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("FORMAT"), "tidings-data 3\n").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            matches!(data_dir(dir.path(), None), Verdict::Fail(w, f) if w.contains("755") && f.contains("chmod 700"))
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(data_dir(dir.path(), None), Verdict::Ok(_)));
    }

    #[test]
    fn free_space_below_the_floor_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(free_space(dir.path(), u64::MAX), Verdict::Fail(..)));
        assert!(matches!(free_space(dir.path(), 0), Verdict::Ok(_)));
    }

    #[test]
    fn an_unresolvable_public_address_fails() {
        let mut c = ServerConfig::new("x".into());
        c.public_addr = Some("no-such-host.invalid:7420".into());
        assert!(matches!(public_addr(&c), Verdict::Fail(..)));
        c.public_addr = Some("127.0.0.1:7420".into());
        assert!(matches!(public_addr(&c), Verdict::Ok(_)));
    }

    #[test]
    fn the_fd_limit_is_read() {
        assert!(nofile(None).is_some_and(|n| n > 0));
    }
}
