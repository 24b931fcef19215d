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
use tidings::server::{Server, ServerConfig};
use tidings::store::{Store, StoreConfig, StoreError};

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
    /// Data directory, created if missing [default: ./tidings-data].
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

#[derive(Subcommand)]
enum Cmd {
    /// Create an invite code for new accounts.
    Invite {
        /// How many accounts it may create.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid (e.g. 7d, 12h); forever if not given.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
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
        Cmd::Invite { uses, expires } => Command::Invite {
            uses,
            expires,
            public_addr,
        },
        Cmd::Users => Command::Users,
        Cmd::Devices { user } => Command::Devices { user },
        Cmd::Revoke { user, device } => Command::Revoke { user, device },
    }
}

fn serve(config: ServerConfig) -> Result<(), String> {
    let data_dir = &config.data_dir;
    let server = Server::bind(&config).map_err(|e| e.to_string())?;
    let addr = server.local_addr();
    let key = hex::encode(server.store().server_key().public);
    println!("tidingsd listening on {addr}");
    log::info!(
        "{} event loop{}",
        config.workers,
        if config.workers == 1 { "" } else { "s" }
    );
    println!("server key {key}");
    println!("data directory {}", data_dir.display());
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
    server.run(true).map_err(|e| e.to_string())
}

fn operator(data_dir: &Path, cmd: Command) -> Result<(), String> {
    let lines = match admin::request(data_dir, &cmd)? {
        Some(lines) => lines,
        None => {
            // No daemon: open the store ourselves.
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
            let lines = admin::execute(&store, None, &cmd, Now::read().unix_ms);
            store.stop(threads);
            store.flush().map_err(|e| e.to_string())?;
            lines?
        }
    };
    if let Command::Invite { uses, expires, .. } = cmd {
        let validity = match expires {
            Some(d) => format!("valid for {}", humantime::format_duration(d)),
            None => "valid until used".into(),
        };
        eprintln!(
            "invite for {uses} account{} ({validity}); give it to the new user:",
            if uses == 1 { "" } else { "s" }
        );
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
