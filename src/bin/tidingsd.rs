//! `tidingsd`: the daemon, and its operator commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidings::config::FileConfig;
use tidings::hub::Now;
use tidings::server::admin::{self, Command};
use tidings::server::{Server, ServerConfig, doctor};
use tidings::store::{DataDir, Store, StoreConfig, StoreError, backup};

#[derive(Parser)]
#[command(
    name = "tidingsd",
    version,
    about = "A self-hosted, end-to-end-encrypted messaging server"
)]
struct Cli {
    /// Configuration file (TOML); flags override it.
    #[arg(long, global = true, env = "TIDINGSD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./tidings-data]. Only the daemon's first
    /// start (and `restore`) creates one.
    #[arg(long, global = true, env = "TIDINGSD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7420].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The host:port that invites and link codes carry (default: the listen
    /// address; needed when listening on 0.0.0.0 or `[::]`).
    #[arg(long, global = true)]
    public_addr: Option<String>,
    /// Event loops [default: the number of CPUs].
    #[arg(long)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// An invite's lifetime: a duration, or `never`.
#[derive(Clone, Copy, Debug)]
struct Expiry(Option<Duration>);

fn parse_expiry(s: &str) -> Result<Expiry, String> {
    if s == "never" {
        return Ok(Expiry(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(Expiry(Some(d))),
        Ok(_) => Err("must be more than zero".into()),
        Err(e) => Err(format!("{e} (write e.g. 7d, 12h, or never)")),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an invite code for new accounts (or revoke one).
    Invite {
        /// How many accounts it may create.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid (e.g. 7d, 12h), or `never`.
        #[arg(long, default_value = "7d", value_parser = parse_expiry)]
        expires: Expiry,
        /// Revoke the invite with this id (as `tidingsd invites` shows it)
        /// instead of making one.
        #[arg(long, value_name = "ID", conflicts_with_all = ["uses", "expires"])]
        revoke: Option<String>,
    },
    /// List invites: id, uses left, expiry.
    Invites,
    /// List users.
    Users,
    /// List a user's devices.
    Devices {
        /// The user.
        user: String,
    },
    /// Revoke a user's device (all of them without --device).
    Revoke {
        /// The user.
        user: String,
        /// The device number.
        #[arg(long)]
        device: Option<u32>,
    },
    /// Delete an account: every device revoked, its queues purged, the
    /// name reserved for the retention period, then free.
    DeleteUser {
        /// The user.
        user: String,
        /// Yes, delete it (there is no undo).
        #[arg(long)]
        yes: bool,
    },
    /// Whether the running daemon is healthy (exit 1 if not).
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Check the machine and the data directory, with a fix for each
    /// problem.
    Doctor,
    /// Write a consistent backup of the data directory to FILE (from the
    /// running daemon, or from the directory when it is stopped).
    Backup {
        /// Where to write it.
        file: PathBuf,
    },
    /// Make a new data directory (--data-dir) from a backup.
    Restore {
        /// The backup.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match FileConfig::load(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("tidingsd: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => FileConfig::default(),
    };
    let level = file.log_level.clone().unwrap_or_else(|| "info".into());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(format!("sled=warn,{level}"))).init();
    let mut config = file.to_server_config();
    config.config_file = cli.config.clone();
    if file.workers.is_none() {
        config.workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    if let Some(p) = cli.public_addr.clone() {
        config.public_addr = Some(p);
    }
    if let Some(w) = cli.workers {
        if w == 0 {
            eprintln!("tidingsd: --workers must be at least 1");
            return ExitCode::FAILURE;
        }
        config.workers = w;
    }
    let result = match cli.command {
        None => serve(config),
        Some(Cmd::Status { json }) => return status(&config.data_dir, json),
        Some(Cmd::Doctor) => {
            return if doctor::run(&config) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Cmd::Backup { file }) => backup(&config.data_dir, &file),
        Some(Cmd::Restore { file }) => restore(&file, &config.data_dir),
        Some(Cmd::DeleteUser { yes: false, user }) => Err(format!(
            "deleting {user} revokes every device of the account and purges its queues, for good; add --yes to do it"
        )),
        Some(cmd) => operator(&config.data_dir, to_command(cmd, cli.public_addr)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidingsd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn to_command(cmd: Cmd, public_addr: Option<String>) -> Command {
    match cmd {
        Cmd::Invite { revoke: Some(id), .. } => Command::RevokeInvite { id },
        Cmd::Invite { uses, expires, .. } => Command::Invite {
            uses,
            expires: expires.0,
            public_addr,
        },
        Cmd::Invites => Command::Invites,
        Cmd::Users => Command::Users,
        Cmd::Devices { user } => Command::Devices { user },
        Cmd::Revoke { user, device } => Command::Revoke { user, device },
        Cmd::DeleteUser { user, .. } => Command::DeleteUser { user },
        Cmd::Status { .. } | Cmd::Doctor | Cmd::Backup { .. } | Cmd::Restore { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn serve(config: ServerConfig) -> Result<(), String> {
    let data_dir = &config.data_dir;
    // Only the daemon's first start makes a data directory (and a server
    // key), in a missing or empty directory; anything else in the way is
    // refused rather than taken over.
    let created = match DataDir::check(data_dir) {
        DataDir::Data => false,
        DataDir::Missing | DataDir::Empty => true,
        DataDir::Foreign => {
            return Err(format!(
                "{} is not empty and is not a tidings data directory; point --data-dir (or data_dir) at an empty or missing directory to start a new server there",
                data_dir.display()
            ));
        }
        DataDir::Unreadable(e) => return Err(format!("{}: {e}", data_dir.display())),
    };
    let server = Server::bind(&config).map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    let key = hex::encode(server.store().server_key().public);
    if created {
        log::info!(
            "created a new data directory {} with a new server key {key}",
            data_dir.display()
        );
    }
    println!("tidingsd listening on {addr}");
    log::info!(
        "{} event loop{}",
        config.workers,
        if config.workers == 1 { "" } else { "s" }
    );
    println!("server key {key}");
    println!("data directory {}", data_dir.display());
    if let Some(m) = server.metrics_addr() {
        log::info!("metrics on http://{m}/metrics");
    }
    match server.store().public_addr() {
        Some(p) => println!(
            "invites carry {p}; make one with: tidingsd invite --data-dir {}",
            data_dir.display()
        ),
        None => println!(
            "listening on a wildcard address: make invites with: tidingsd invite --data-dir {} --public-addr HOST:PORT",
            data_dir.display()
        ),
    }
    // systemd (Type=notify): ready once the listener and the admin socket
    // are up.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {addr}")),
    ]);
    let r = server.run(true).map_err(|e| e.to_string());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    r
}

/// Refuses to go on unless `data_dir` is a data directory (operator
/// commands never create one).
fn existing(data_dir: &Path) -> Result<(), String> {
    match DataDir::check(data_dir) {
        DataDir::Data => Ok(()),
        DataDir::Missing => Err(format!(
            "{}: no such data directory (the daemon makes it on its first start); check --data-dir or --config",
            data_dir.display()
        )),
        DataDir::Empty | DataDir::Foreign => Err(format!(
            "{} is not a tidings data directory; check --data-dir or --config",
            data_dir.display()
        )),
        DataDir::Unreadable(e) => Err(format!("{}: {e}", data_dir.display())),
    }
}

/// Opens the store of a stopped daemon and starts its thread.
fn open_stopped(data_dir: &Path) -> Result<(Arc<Store>, tidings::store::StoreThreads), String> {
    let store = match Store::open(data_dir, &StoreConfig::default()) {
        Ok(s) => Arc::new(s),
        Err(StoreError::Locked) => {
            return Err(format!(
                "{} is in use by a running tidingsd whose admin socket is missing; restart the daemon",
                data_dir.display()
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let threads = store.start().map_err(|e| e.to_string())?;
    Ok((store, threads))
}

fn operator(data_dir: &Path, cmd: Command) -> Result<(), String> {
    existing(data_dir)?;
    let lines = match admin::request(data_dir, &cmd)? {
        Some(lines) => lines,
        None => {
            // No daemon: open the store ourselves.
            let (store, threads) = open_stopped(data_dir)?;
            let lines = admin::execute(&store, None, &cmd, Now::read().unix_ms);
            store.stop(threads);
            store.flush().map_err(|e| e.to_string())?;
            lines?
        }
    };
    let mut lines = lines.into_iter().peekable();
    if let Command::Invite { uses, expires, .. } = &cmd {
        let validity = match expires {
            Some(d) => format!("valid for {}", humantime::format_duration(*d)),
            None => "valid until used".into(),
        };
        let id = lines
            .next_if(|l| l.starts_with("id "))
            .map(|l| format!(", {l}"))
            .unwrap_or_default();
        eprintln!(
            "invite for {uses} account{} ({validity}{id}); give it to the new user:",
            if *uses == 1 { "" } else { "s" }
        );
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// How long `status` waits for the daemon before it calls it unhealthy.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// The `status` keys, in order, and whether each is a number.
const STATUS_KEYS: [&str; 12] = [
    "version",
    "uptime_s",
    "connections",
    "online_devices",
    "queued_messages",
    "queued_bytes",
    "oldest_undelivered_s",
    "disk_used_bytes",
    "disk_free_bytes",
    "min_free_bytes",
    "flush_p99_ms",
    "healthy",
];

fn status(data_dir: &Path, json: bool) -> ExitCode {
    let answer = match existing(data_dir) {
        Err(e) => Err(e),
        Ok(()) => match admin::request_within(data_dir, &Command::Status, STATUS_WAIT) {
            Ok(Some(lines)) => Ok(lines),
            Ok(None) => Err("tidingsd is not running (no admin socket answers)".to_string()),
            Err(e) => Err(format!(
                "the daemon did not answer within {} s: {e}",
                STATUS_WAIT.as_secs()
            )),
        },
    };
    let fields: Vec<(String, String)> = match &answer {
        Ok(lines) => lines
            .iter()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        Err(_) => Vec::new(),
    };
    let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let healthy = get("healthy") == Some("true");
    if json {
        let mut obj = serde_json::Map::new();
        for k in STATUS_KEYS {
            let v = match (k, get(k)) {
                ("healthy", _) => serde_json::Value::Bool(healthy),
                ("version", Some(v)) => serde_json::Value::String(v.to_string()),
                ("version", None) => serde_json::Value::Null,
                (_, Some(v)) if v != "-" => v
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .or_else(|_| v.parse::<f64>().map(serde_json::Value::from))
                    .unwrap_or(serde_json::Value::Null),
                _ => serde_json::Value::Null,
            };
            obj.insert(k.to_string(), v);
        }
        println!("{}", serde_json::Value::Object(obj));
    } else if answer.is_ok() {
        let n = |k: &str| get(k).unwrap_or("-").to_string();
        let mib = |k: &str| {
            get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .map_or("-".into(), |b| format!("{} MiB", b >> 20))
        };
        println!(
            "tidingsd {}: {}",
            n("version"),
            if healthy { "healthy" } else { "UNHEALTHY" }
        );
        println!("up {} s, pid {}", n("uptime_s"), n("pid"));
        println!(
            "connections {}, devices online {}",
            n("connections"),
            n("online_devices")
        );
        println!(
            "queued {} entries ({} bytes), oldest undelivered {} s",
            n("queued_messages"),
            n("queued_bytes"),
            n("oldest_undelivered_s")
        );
        println!(
            "disk: data {}, free {}, floor {}",
            mib("disk_used_bytes"),
            mib("disk_free_bytes"),
            mib("min_free_bytes")
        );
        println!("flush p99 {} ms", n("flush_p99_ms"));
        if let Some(s) = get("stalled").filter(|s| *s != "-") {
            println!("stalled: {s}");
        }
        let free = get("disk_free_bytes").and_then(|v| v.parse::<u64>().ok());
        let floor = get("min_free_bytes").and_then(|v| v.parse::<u64>().ok());
        if let (Some(f), Some(m)) = (free, floor)
            && f < m
        {
            println!("free space is below the floor: new messages are refused until space is freed");
        }
    }
    if let Err(e) = &answer {
        eprintln!("tidingsd: {e}");
    }
    if healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn backup(data_dir: &Path, file: &Path) -> Result<(), String> {
    existing(data_dir)?;
    let tmp = {
        let mut name = file.file_name().ok_or("the backup needs a file name")?.to_os_string();
        name.push(".partial");
        file.with_file_name(name)
    };
    let out = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let result = (|| {
        let mut w = std::io::BufWriter::new(out.try_clone().map_err(|e| e.to_string())?);
        match admin::request_backup(data_dir, &mut w)? {
            Some(_) => {}
            None => {
                drop(w);
                // Opening the store migrates an older format in place: a
                // backup taken before an upgrade must not change it.
                if let Some(found) = tidings::store::data_format(data_dir).map_err(|e| e.to_string())?
                    && found < tidings::store::FORMAT_VERSION
                {
                    return Err(format!(
                        "{} holds data format {found}, older than this build's {}; back it up with the tidingsd that wrote it (a backup never migrates), or start this one on it first (it migrates)",
                        data_dir.display(),
                        tidings::store::FORMAT_VERSION
                    ));
                }
                let (store, threads) = open_stopped(data_dir)?;
                let r = admin::backup_to(&store, out.try_clone().map_err(|e| e.to_string())?);
                store.stop(threads);
                r?;
                return Ok(());
            }
        }
        std::io::Write::flush(&mut w).map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok::<_, String>(())
    })();
    let checked = result.and_then(|()| {
        out.sync_all().map_err(|e| format!("{}: {e}", tmp.display()))?;
        backup::verify(&tmp).map_err(|e| format!("the backup is incomplete ({e}); see the daemon's log"))
    });
    match checked {
        Ok((format, taken_ms)) => {
            std::fs::rename(&tmp, file).map_err(|e| format!("{}: {e}", file.display()))?;
            let size = std::fs::metadata(file).map_or(0, |m| m.len());
            eprintln!(
                "backup of {} taken {} (data format {format}, {size} bytes) written to {}",
                data_dir.display(),
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(taken_ms)),
                file.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn restore(file: &Path, data_dir: &Path) -> Result<(), String> {
    let r = backup::restore(file, data_dir).map_err(|e| e.to_string())?;
    eprintln!(
        "restored {} into {} (taken {}, data format {}): {} records, {} files; {} one-time keys dropped (devices publish new ones), queues continue from sequence {}",
        file.display(),
        data_dir.display(),
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(r.taken_ms)),
        r.format,
        r.records,
        r.files,
        r.one_time_keys_dropped,
        r.ceiling
    );
    eprintln!(
        "start the daemon on it: tidingsd --data-dir {} (with --public-addr if its address changed; devices then need `tidings server-address HOST:PORT`)",
        data_dir.display()
    );
    Ok(())
}
