//! The real daemon as a child process ([`Daemon`]): started on a loopback
//! port in a temporary directory, restarted on the same port and data,
//! killed with SIGKILL or stopped with SIGTERM, and asked to run operator
//! commands (invites, users, devices).
//!
//! The temporary directory holds `data/` (the data directory),
//! `tidingsd.log` (the daemon's stderr, across restarts), the config file
//! when there is one, and `profiles/` (see [`super::profiles`]).

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tidings::code::Code;
use tidings::noise::PublicKey;
use tidings::store::Store;

/// The daemon binary Cargo built for this test run.
pub const TIDINGSD: &str = env!("CARGO_BIN_EXE_tidingsd");

/// How long the daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restart keeps retrying a port still held by the old process.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A `tidingsd` child process on a loopback port with a temporary data
/// directory. Killed (SIGKILL) when dropped.
pub struct Daemon {
    /// Always `Some` until dropped.
    root: Option<tempfile::TempDir>,
    /// The temporary directory's path.
    dir: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    server_key: PublicKey,
    /// The rest of the daemon's stdout, drained by a thread so that its
    /// writes never fail on a closed pipe.
    stdout: Option<Receiver<String>>,
    /// Extra flags, kept for restarts.
    args: Vec<String>,
    /// Extra environment, kept for restarts.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon on `127.0.0.1:0` with a fresh data directory.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts a daemon with extra flags (such as `--workers 2`), which
    /// restarts keep.
    pub fn start_with(args: &[&str]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().expect("temp dir"), args)
    }

    /// Starts a daemon with `toml` as its config file (`--config`), which
    /// restarts keep.
    pub fn start_with_config(toml: &str) -> Daemon {
        let root = tempfile::tempdir().expect("temp dir");
        let config = root.path().join("tidingsd.toml");
        fs::write(&config, toml).expect("write the config file");
        let config = config.to_str().expect("a UTF-8 temp dir").to_owned();
        Daemon::start_in(root, &["--config", &config])
    }

    /// Starts a daemon in `root` (whose `data/` may hold a data directory
    /// already, such as a restored one), with extra flags and environment.
    pub fn start_in_with_env(root: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_env(root, args, env)
    }

    fn start_in(root: tempfile::TempDir, args: &[&str]) -> Daemon {
        Daemon::start_env(root, args, &[])
    }

    fn start_env(root: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = root.path().to_path_buf();
        let data_dir = dir.join("data");
        let mut d = Daemon {
            root: Some(root),
            dir,
            data_dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server_key: [0; 32],
            stdout: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        d.spawn_listening(d.addr).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        d
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's static public key, as the daemon printed it.
    pub fn server_key(&self) -> PublicKey {
        self.server_key
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temporary directory that holds the data directory, the log and
    /// the profiles.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address invites carry: the `--public-addr` flag if it was
    /// given, else the address it listens on.
    pub fn public_addr(&self) -> String {
        match self.args.iter().position(|a| a == "--public-addr") {
            Some(i) => self.args[i + 1].clone(),
            None => self.addr.to_string(),
        }
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon wrote to stderr (its log), across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("tidingsd.log")
    }

    /// Spawns the daemon on `listen` and waits for its banner and its
    /// admin socket (which operator commands use while it runs). On
    /// failure the child is reaped and the reason returned.
    fn spawn_listening(&mut self, listen: SocketAddr) -> Result<(), String> {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = Command::new(TIDINGSD)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("TIDINGS_TEST_LOG").unwrap_or_else(|_| "info,sled=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot run {TIDINGSD}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining.
                    continue;
                }
            }
        });
        let banner = (|| {
            let first = rx.recv_timeout(START_TIMEOUT).map_err(|_| "no banner on stdout")?;
            let addr = first
                .strip_prefix("tidingsd listening on ")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("unexpected first line: {first:?}"))?;
            let second = rx.recv_timeout(START_TIMEOUT).map_err(|_| "no server key on stdout")?;
            let key = second
                .strip_prefix("server key ")
                .and_then(|k| hex::decode(k).ok())
                .and_then(|k| <PublicKey>::try_from(k).ok())
                .ok_or_else(|| format!("unexpected second line: {second:?}"))?;
            // The daemon binds its admin socket before it prints the
            // banner; a socket a killed daemon left behind counts too (the
            // new one replaces it before the banner).
            let deadline = Instant::now() + START_TIMEOUT;
            while !self.data_dir.join("admin.sock").exists() {
                if Instant::now() >= deadline {
                    return Err("no admin socket".to_string());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok::<_, String>((addr, key))
        })();
        match banner {
            Ok((addr, key)) => {
                self.addr = addr;
                self.server_key = key;
                self.child = Some(child);
                self.stdout = Some(rx);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                Err(format!("tidingsd did not start ({e}; exit {status:?})"))
            }
        }
    }

    /// Runs `tidingsd ARGS --data-dir DIR` (an operator command) and
    /// returns its stdout lines.
    ///
    /// # Panics
    /// If the command fails.
    pub fn operator(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new(TIDINGSD)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run tidingsd");
        assert!(
            out.status.success(),
            "tidingsd {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 output")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs `tidingsd ARGS --data-dir DIR` and returns its output, whatever
    /// its exit status.
    pub fn operator_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(TIDINGSD)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run tidingsd")
    }

    /// Makes an invite for `uses` accounts (`tidingsd invite`).
    ///
    /// # Panics
    /// If the command fails, or the code does not carry this daemon's key
    /// and [`Daemon::public_addr`].
    pub fn invite(&self, uses: u32) -> Code {
        let lines = self.operator(&["invite", "--uses", &uses.to_string()]);
        let last = lines.last().expect("invite prints the code last");
        let code = Code::parse(last).unwrap_or_else(|e| panic!("invite {last:?}: {e}"));
        assert_eq!(code.addr, self.public_addr(), "the address in the invite");
        assert_eq!(code.server_key, self.server_key, "the server key in the invite");
        code
    }

    /// Kills the daemon with SIGKILL (what `Child::kill` sends on unix)
    /// and reaps it. Nothing gets to run: no flush, no clean close.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdout = None;
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    ///
    /// # Panics
    /// If it is not running or does not exit within the timeout.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is running");
        self.stdout = None;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for tidingsd") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tidingsd did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again on the same data directory and the same
    /// port (kills it first if it still runs). Retries the bind briefly in
    /// case the port is not free yet.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let addr = self.addr;
        loop {
            match self.spawn_listening(addr) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot restart on {addr}: {e}\n{}", self.log()),
            }
        }
    }

    /// Stops the daemon (SIGKILL), runs `f` on its store (the server's side
    /// of things), and starts it again on the same port.
    pub fn with_store_stopped<R>(&mut self, f: impl FnOnce(&Store) -> R) -> R {
        self.kill9();
        let r = {
            let store = Store::open(&self.data_dir, &Default::default()).expect("open the daemon's store");
            f(&store)
        };
        self.restart();
        r
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // TIDINGS_TEST_KEEP=1 keeps the data directory and log of a failed
        // test for a look.
        if std::thread::panicking()
            && std::env::var_os("TIDINGS_TEST_KEEP").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept the daemon's directory {}", root.keep().display());
        }
    }
}
