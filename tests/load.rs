//! The load generator against the real daemon: it registers its devices
//! through an invite, delivers messages, saves the devices, and a second
//! run reuses them without an invite; in group mode every accepted group
//! send reaches every other member's device. No timing is asserted.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    // The generator sends as fast as its window allows, past the
    // per-device send rate a real server keeps (as scripts/load does).
    let config = dir.path().join("tidingsd.toml");
    std::fs::write(
        &config,
        "[limits]\nsends_per_minute = 1000000000\nsend_burst = 1000000\nwrites_per_minute = 1000000000\nwrite_burst = 1000000\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it listens; keep draining its stdout.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("tidingsd listening on "), "{first}");
    std::thread::spawn(move || for _ in lines {});
    // It prints before its admin socket is up; `tidingsd invite` needs
    // that socket while the daemon runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("data").join("admin.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never opened its admin socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Daemon { child, dir }
}

fn run_load(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings-load"))
        .args(args)
        .args([
            "--pairs",
            "5",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--settle",
            "100ms",
        ])
        .args(["--connect-rate", "0", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tidings-load failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn registers_sends_and_reuses_its_devices() {
    let daemon = start_daemon();
    let out = Command::new(env!("CARGO_BIN_EXE_tidingsd"))
        .args(["invite", "--uses", "20", "--data-dir"])
        .arg(daemon.dir.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let invite = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let file = daemon.dir.path().join("devices.json");
    let file = file.to_str().unwrap();

    let first = run_load(&["--invite", &invite, "--devices", "20", "--devices-file", file]);
    assert!(first["delivered"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["connections_lost"], 0, "{first}");
    assert!(
        first["rss_kib"]["before"].as_u64().is_some(),
        "the daemon was found: {first}"
    );

    // The invite is used up: the second run must come from the file.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(saved["devices"].as_array().unwrap().len(), 20);
    let second = run_load(&["--devices", "20", "--devices-file", file, "--rate", "500"]);
    assert!(second["delivered"].as_u64().unwrap() > 0, "{second}");

    // Group mode: two groups of 5, each send fanned out to 4 devices; the
    // second run finds the groups the first made.
    for _ in 0..2 {
        let g = run_load(&[
            "--devices",
            "20",
            "--devices-file",
            file,
            "--group-size",
            "5",
            "--groups",
            "2",
        ]);
        let accepted = g["accepted"].as_u64().unwrap();
        assert!(accepted > 0, "{g}");
        assert_eq!(g["fanout"], 4, "{g}");
        assert_eq!(g["drained"], true, "{g}");
        assert_eq!(g["delivered"].as_u64().unwrap(), accepted * 4, "{g}");
        assert_eq!(g["errors"], serde_json::json!({}), "{g}");
    }
}
