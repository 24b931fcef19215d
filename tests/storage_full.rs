//! Issue 9, *a full disk that heals*, against the real daemon: with
//! `store.min_free` raised above the free space of the test's disk (and
//! SIGHUP), new messages are refused at once with `STORAGE_FULL`, which
//! the client says in words; what was accepted before is still delivered
//! and acknowledged; with the floor lowered again (and SIGHUP), accepting
//! resumes without a restart, and nothing accepted was lost.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Daemon;
use common::cli::tidings;
use common::profiles::{messages, sync, texts};

fn set_floor(d: &Daemon, min_free: u64) {
    let config = d.dir().join("tidingsd.toml");
    std::fs::write(&config, format!("[store]\nmin_free = {min_free}\n")).expect("write the config");
    let pid = d.pid().expect("running").to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
}

/// Waits until the daemon's log has `needle` `n` times.
fn wait_for_log(d: &Daemon, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.log().matches(needle).count() < n {
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(profile: &Path, to: &str, text: &str) -> std::process::Output {
    tidings(profile, &["send", to, text])
}

#[test]
fn below_the_floor_new_messages_are_refused_in_words_and_accepting_resumes_by_itself() {
    let mut d = Daemon::start_with_config("[store]\nmin_free = \"1MiB\"\n");
    let pid = d.pid();
    let alice = d.user("alice");
    let bob = d.user("bob");
    assert!(send(&alice, "bob", "before the floor").status.success());

    // The floor above everything this disk has.
    let free = fs2::available_space(d.data_dir()).expect("free space");
    set_floor(&d, free.saturating_mul(4).max(1 << 40));
    wait_for_log(&d, "below the floor", 1);
    let out = send(&alice, "bob", "while full");
    assert!(!out.status.success(), "a send below the floor must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("out of disk space"), "{stderr}");

    // Deliveries and acks go on: bob gets what was accepted before.
    let got = messages(&sync(&bob));
    assert_eq!(texts(&got), vec!["before the floor"]);

    // Space "returns": accepting resumes without a restart.
    set_floor(&d, 1 << 20);
    wait_for_log(&d, "accepting new messages", 1);
    assert!(send(&alice, "bob", "after the floor").status.success());
    let got = messages(&sync(&bob));
    assert_eq!(texts(&got), vec!["after the floor"]);
    // One daemon ran all along.
    assert!(d.is_running());
    assert_eq!(d.pid(), pid);
    assert!(d.log().contains("SIGHUP: re-read"), "{}", d.log());
}
