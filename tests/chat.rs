//! `tidings chat` end to end: the real binary in a pseudo-terminal (tmux,
//! on a private socket, 80x24) against the real daemon, with bob on the
//! command line, then in a `chat` of his own (in a second tmux) to type.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cli::{TIDINGS, json_lines, stdout, tidings};
use common::{Daemon, WAIT};

/// A tmux server of its own, one session running a command.
struct Tmux {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        let t = Tmux { socket, _dir: dir };
        let out = t.run(&["new-session", "-d", "-s", "chat", "-x", "80", "-y", "24", command]);
        assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux is installed")
    }

    /// Presses keys (tmux key names: `Enter`, `C-n`, `Up`...).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Types text as it is.
    fn type_text(&self, text: &str) {
        assert!(self.run(&["send-keys", "-t", "chat", "-l", text]).status.success());
    }

    /// The screen as text; with `escapes`, with its colours.
    fn screen(&self, escapes: bool) -> String {
        let mut args = vec!["capture-pane", "-p", "-t", "chat"];
        if escapes {
            args.push("-e");
        }
        String::from_utf8_lossy(&self.run(&args).stdout).into_owned()
    }

    /// Waits until the screen satisfies `want`.
    fn wait_for(&self, what: &str, escapes: bool, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.screen(escapes);
            if want(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "the screen never showed {what}:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "chat"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn chat_command(profile: &Path) -> String {
    format!(
        "RUST_LOG=off TIDINGS_PASSPHRASE= '{}' --profile '{}' chat",
        TIDINGS,
        profile.display()
    )
}

#[test]
fn alice_chats_in_a_terminal_with_bob_on_the_command_line_then_typing_in_his_own() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let t = Tmux::start(&chat_command(&alice));
    t.wait_for("the status line", false, |s| s.contains("connected as alice"));
    assert!(t.screen(false).contains("No chats yet."));
    // A new conversation by name; a message; Enter sends it.
    t.keys(&["C-n"]);
    t.type_text("bob");
    t.keys(&["Enter"]);
    t.wait_for("the compose line", false, |s| s.contains("Message to bob"));
    t.type_text("hello bob");
    t.keys(&["Enter"]);
    t.wait_for("the sent tick", false, |s| {
        s.contains("hello bob") && s.contains("you ✓")
    });
    // Bob gets it; his device's receipt makes it delivered on alice's
    // screen, and his reading it makes the tick blue, without a key press.
    let got = stdout(&tidings(&bob, &["sync"]));
    assert!(got.contains("alice/1 -> bob: hello bob"), "{got}");
    t.wait_for("the delivered tick", false, |s| s.contains("you ✓✓"));
    stdout(&tidings(&bob, &["read", "alice"]));
    // Blue: SGR 34, or colour 4 of the 256 (how tmux writes it back).
    let blue = |s: &str| {
        s.lines()
            .any(|l| l.contains("you") && (l.contains("[34m✓✓") || l.contains(";5;4m✓✓")))
    };
    t.wait_for("the read tick (blue)", true, blue);
    // Bob's answer shows as it comes.
    stdout(&tidings(&bob, &["send", "alice", "hi alice"]));
    t.wait_for("bob's answer", false, |s| s.contains("hi alice"));
    // Alice reacts to bob's message: select it, a, 1 (👍).
    t.keys(&["Up", "a", "1"]);
    t.wait_for("the reaction", false, |s| {
        s.lines().any(|l| l.contains("👍") && l.contains("you"))
    });
    stdout(&tidings(&bob, &["sync"]));
    let hist = json_lines(&tidings(&bob, &["history", "alice", "--json"]));
    let answer = hist.iter().find(|m| m["text"] == "hi alice").unwrap();
    assert_eq!(answer["reactions"], serde_json::json!({"alice": "👍"}));
    // Bob opens a chat of his own: alice sees him online, his typing
    // shows on her screen while he types, and goes when his message comes.
    let b = Tmux::start(&chat_command(&bob));
    b.wait_for("bob's status line", false, |s| s.contains("connected as bob"));
    t.wait_for("bob online", false, |s| s.contains(" bob · online "));
    b.keys(&["Enter"]);
    b.wait_for("bob's compose line", false, |s| s.contains("Message to alice"));
    b.type_text("see you soon");
    t.wait_for("bob typing", false, |s| s.contains(" bob · typing… "));
    b.keys(&["Enter"]);
    t.wait_for("bob's message, his typing gone", false, |s| {
        s.contains("see you soon") && !s.contains("typing…")
    });
    // He leaves: alice sees when he was last online.
    b.keys(&["C-c"]);
    let deadline = Instant::now() + WAIT;
    while b.alive() {
        assert!(Instant::now() < deadline, "bob's chat did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.wait_for("bob last seen", false, |s| s.contains(" bob · last seen "));
    // Other commands on alice's profile go through the running chat.
    let hist = stdout(&tidings(&alice, &["history", "bob"]));
    assert!(hist.contains("hello bob") && hist.contains("hi alice"), "{hist}");
    // The daemon goes away: the status line says so, the screen still
    // answers keys, and it reconnects by itself when the daemon is back.
    d.kill9();
    t.wait_for("offline", false, |s| s.contains("offline:"));
    t.keys(&["F1"]);
    t.wait_for("the help", false, |s| s.contains("Keys (any key closes)"));
    t.keys(&["Escape"]);
    t.wait_for("the help closed", false, |s| !s.contains("Keys (any key closes)"));
    d.restart();
    t.wait_for("connected again", false, |s| s.contains("connected as alice"));
    t.type_text("after the restart");
    t.keys(&["Enter"]);
    t.wait_for("the sent tick", false, |s| s.contains("after the restart"));
    let deadline = Instant::now() + WAIT;
    loop {
        let got = stdout(&tidings(&bob, &["sync"]));
        if got.contains("after the restart") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never got the message sent after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Resize: it redraws to the new size.
    assert!(
        t.run(&["resize-window", "-t", "chat", "-x", "50", "-y", "20"])
            .status
            .success()
    );
    t.wait_for("the narrow layout", false, |s| {
        !s.contains("Chats") && s.contains("Message to bob")
    });
    // Ctrl-C leaves, and frees the profile.
    t.keys(&["C-c"]);
    let deadline = Instant::now() + WAIT;
    while t.alive() {
        assert!(Instant::now() < deadline, "chat did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alice.join("sock").exists(), "the socket is removed");
    assert!(tidings(&alice, &["history", "bob"]).status.success());
}

#[test]
fn files_show_in_chat_and_s_saves_one() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    stdout(&tidings(&bob, &["send", "alice", "hello"]));
    let t = Tmux::start(&chat_command(&alice));
    t.wait_for("the status line", false, |s| s.contains("connected as alice"));
    t.keys(&["Enter"]);
    t.wait_for("the chat with bob", false, |s| s.contains("Message to bob"));
    // Above the auto-download size (1 MiB): shown, not fetched.
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &big).unwrap();
    stdout(&tidings(
        &bob,
        &[
            "send",
            "alice",
            "--file",
            path.to_str().unwrap(),
            "--caption",
            "the data",
        ],
    ));
    t.wait_for("the file line", false, |s| {
        s.contains("[file big.bin 2097152] (s: save)") && s.contains("the data")
    });
    // Select it (the last message) and save it.
    t.keys(&["Up", "s"]);
    t.wait_for("saved", false, |s| s.contains("[file big.bin 2097152] saved:"));
    let saved = alice.join("downloads").join("big.bin");
    assert_eq!(std::fs::read(&saved).unwrap(), big);
    // A small file saves itself; one sent from the command line while the
    // chat holds the profile goes through it.
    let small = dir.path().join("note.txt");
    std::fs::write(&small, b"a small note").unwrap();
    stdout(&tidings(&bob, &["send", "alice", "--file", small.to_str().unwrap()]));
    t.wait_for("the small file saved", false, |s| {
        s.contains("[file note.txt 12] saved:")
    });
    let mine = dir.path().join("reply.txt");
    std::fs::write(&mine, b"got it").unwrap();
    stdout(&tidings(&alice, &["send", "bob", "--file", mine.to_str().unwrap()]));
    t.wait_for("alice's own file", false, |s| s.contains("[file reply.txt 6] saved:"));
    let got = stdout(&tidings(&bob, &["sync"]));
    assert!(got.contains("[file reply.txt 6]"), "{got}");
    t.keys(&["C-c"]);
    let deadline = Instant::now() + WAIT;
    while t.alive() {
        assert!(Instant::now() < deadline, "chat did not quit");
        std::thread::sleep(Duration::from_millis(50));
    }
}
