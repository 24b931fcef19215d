//! The `tidings` command line: one-off runs on a profile and their output,
//! and a running `tidings listen --json` ([`Listener`]).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidings::wire::MsgId;

use super::WAIT;

/// The client binary Cargo built for this test run.
pub const TIDINGS: &str = env!("CARGO_BIN_EXE_tidings");

/// `tidings --profile PROFILE`, to add arguments and environment to.
pub fn tidings_cmd(profile: &Path) -> Command {
    let mut cmd = Command::new(TIDINGS);
    cmd.arg("--profile").arg(profile);
    cmd
}

/// Runs `tidings --profile PROFILE ARGS` to the end.
pub fn tidings(profile: &Path, args: &[&str]) -> Output {
    tidings_cmd(profile).args(args).output().unwrap()
}

/// The stdout of a run that must have succeeded.
pub fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The stdout of a `--json` run that must have succeeded, a value a line.
pub fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The `id` of a JSON line.
pub fn id_of(v: &Value) -> MsgId {
    MsgId::from_hex(v["id"].as_str().unwrap()).unwrap()
}

/// `tidings listen --json` on a profile, its lines on a channel; killed
/// (SIGKILL) on drop.
pub struct Listener {
    child: Child,
    lines: Receiver<String>,
}

impl Listener {
    /// Starts it and waits for its socket (through which other `tidings`
    /// commands on the profile then go). A socket that a killed listener
    /// left behind counts.
    pub fn start(profile: &Path) -> Listener {
        let mut child = tidings_cmd(profile)
            .args(["listen", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let listener = Listener { child, lines };
        let deadline = Instant::now() + WAIT;
        while !profile.join("sock").exists() {
            assert!(Instant::now() < deadline, "listen never opened its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        listener
    }

    /// The next line it prints, whatever it is (`what` names it for the
    /// failure message).
    pub fn next(&self, what: &str) -> Value {
        self.wait_for(what, |_| true)
    }

    /// The next line for which `want` holds (others are skipped).
    pub fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("listen printed {line:?}: {e}"));
                    if want(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("listen never printed {what}"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
