//! `tidings`: the command-line client. It parses arguments, calls
//! [`tidings::client`], and prints: results to stdout, one per line, the
//! value a script wants last; diagnostics to stderr; nothing on stdout when
//! a command fails (exit status 1). With `--json`, one JSON object a line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::json;
use tidings::client::{self, Event, Message, Notice, Outcome, Request};

#[derive(Parser)]
#[command(name = "tidings", version, about = "The tidings messaging client")]
struct Cli {
    /// Profile directory (default: a per-user data directory).
    #[arg(long, global = true, env = "TIDINGS_PROFILE")]
    profile: Option<PathBuf>,
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account with an invite code; this profile becomes its first device.
    Register {
        /// The invite code (tidings://...).
        invite: String,
        /// The user name: 3 to 32 of a-z, 0-9, _ and .
        name: String,
    },
    /// Print a one-time code that links a new device to this account.
    LinkCode,
    /// Make this (empty) profile a new device of an account, with a link code.
    Link {
        /// The link code (tidings://...).
        code: String,
    },
    /// Send a message; prints its id once the server has accepted it.
    Send {
        /// The recipient.
        user: String,
        /// The text.
        text: String,
    },
    /// Fetch, store and print everything queued for this device, then exit.
    Sync,
    /// Stay connected and print messages as they arrive.
    Listen,
    /// Print the local conversation with a user.
    History {
        /// The other party.
        user: String,
    },
    /// List this account's devices.
    Devices,
    /// Revoke one of this account's devices.
    Revoke {
        /// The device number.
        device: u32,
    },
    /// Print the safety number of your and a user's identity keys, to
    /// compare with theirs (in person or over another channel).
    Verify {
        /// The other party.
        user: String,
    },
}

/// Writes result lines to stdout, flushing each.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    fn value(&self, value: serde_json::Value) {
        self.line(&value.to_string());
    }

    /// A message or a notice, as things arrive.
    fn event(&self, e: &Event) {
        match e {
            Event::Message(m) => self.message(m, false),
            Event::Notice(n) => self.notice(n),
            _ => {}
        }
    }

    /// News about a contact's devices: in JSON a `notice` line (a `warning`
    /// line for warnings); else a line on stderr.
    fn notice(&self, n: &Notice) {
        let (user, device) = n.about();
        if self.json {
            let kind = if n.is_warning() { "warning" } else { "notice" };
            self.value(json!({
                "type": kind,
                "event": n.kind(),
                "user": user,
                "device": device.0,
                "text": n.to_string(),
            }));
        }
        if n.is_warning() {
            eprintln!("warning: {n}");
        } else if !self.json {
            eprintln!("{n}");
        }
    }

    fn message(&self, m: &Message, history: bool) {
        if self.json {
            let mut v = json!({
                "type": "message",
                "id": m.id.to_string(),
                "from": m.from,
                "from_device": m.from_device.0,
                "to": m.to,
                "text": m.text,
                "ts": m.ts_ms,
            });
            if m.undecryptable {
                v["undecryptable"] = json!(true);
            }
            if history {
                v["direction"] = json!(m.direction.as_str());
                v["status"] = json!(m.status.as_str());
            }
            self.value(v);
        } else {
            let status = if history {
                format!(" [{}]", m.status.as_str())
            } else {
                String::new()
            };
            self.line(&format!(
                "{} {}/{} -> {}{}: {}",
                time(m.ts_ms),
                m.from,
                m.from_device,
                m.to,
                status,
                if m.undecryptable {
                    "[undecryptable message; asked the sender's device for a new session]".to_owned()
                } else {
                    one_line(&m.text)
                }
            ));
        }
    }
}

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Control characters (newlines included) escaped, so one message is one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,sled=error"))
        .format_timestamp(None)
        .init();
    let Some(dir) = cli.profile.clone().or_else(client::profile::default_dir) else {
        eprintln!("tidings: no home directory for a default profile; pass --profile DIR");
        return ExitCode::FAILURE;
    };
    let out = Out { json: cli.json };
    match run(cli.command, &dir, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, dir: &std::path::Path, out: &Out) -> Result<(), client::Error> {
    let request = match cmd {
        Cmd::Listen => return listen(dir, out),
        Cmd::Register { invite, name } => Request::Register { code: invite, name },
        Cmd::Link { code } => Request::Link { code },
        Cmd::LinkCode => Request::LinkCode,
        Cmd::Send { user, text } => Request::Send { to: user, text },
        Cmd::Sync => Request::Sync,
        Cmd::History { user } => Request::History { user },
        Cmd::Devices => Request::Devices,
        Cmd::Revoke { device } => Request::Revoke { device },
        Cmd::Verify { user } => Request::Verify { user },
    };
    let outcome = client::run(dir, request, &mut |e| out.event(e))?;
    match outcome {
        Outcome::Registered(r) => {
            eprintln!("registered: {} device {} on {}", r.user, r.device, r.server);
            if out.json {
                out.value(json!({"type": "registered", "user": r.user, "device": r.device, "server": r.server}));
            } else {
                out.line(&format!("{} {}", r.user, r.device));
            }
        }
        Outcome::LinkCode { code, expires_ms } => {
            eprintln!(
                "one-time link code, valid until {}; on the new device run: tidings link CODE",
                time(expires_ms)
            );
            if out.json {
                out.value(json!({"type": "link_code", "code": code, "expires": expires_ms}));
            } else {
                out.line(&code);
            }
        }
        Outcome::Sent(m) => {
            if out.json {
                out.value(json!({"type": "sent", "id": m.id.to_string(), "to": m.to, "ts": m.ts_ms}));
            } else {
                out.line(&m.id.to_string());
            }
        }
        Outcome::Synced { count } => eprintln!("{count} new message{}", if count == 1 { "" } else { "s" }),
        Outcome::Messages(messages) => {
            for m in &messages {
                out.message(m, true);
            }
        }
        Outcome::Devices { this, devices } => {
            for d in devices {
                let is_this = d.device == this;
                if out.json {
                    out.value(json!({
                        "type": "device",
                        "device": d.device.0,
                        "this": is_this,
                        "created": d.created_ms,
                        "last_seen": d.last_seen_ms,
                    }));
                } else {
                    out.line(&format!(
                        "{}{} created {} last seen {}",
                        d.device,
                        if is_this { " (this device)" } else { "" },
                        time(d.created_ms),
                        time(d.last_seen_ms)
                    ));
                }
            }
        }
        Outcome::Revoked { device } => {
            if out.json {
                out.value(json!({"type": "revoked", "device": device}));
            } else {
                out.line(&format!("revoked {device}"));
            }
        }
        Outcome::SafetyNumber { user, number, devices } => {
            eprintln!(
                "safety number of your and {user}'s identity keys; {user} runs `tidings verify` with your name \
                 and sees the same digits if no one is in between:"
            );
            for (u, d, key) in &devices {
                eprintln!("  {u} device {d}: {key}");
            }
            if out.json {
                let devices: Vec<_> = devices
                    .iter()
                    .map(|(u, d, key)| json!({"user": u, "device": d, "ed25519": key}))
                    .collect();
                out.value(json!({"type": "safety_number", "user": user, "number": number, "devices": devices}));
            } else {
                out.line(&number);
            }
        }
    }
    Ok(())
}

fn listen(dir: &std::path::Path, out: &Out) -> Result<(), client::Error> {
    let started = SystemTime::now();
    client::listen(dir, &mut |event| {
        match event {
            Event::Message(m) => out.message(m, false),
            Event::Connected => eprintln!("connected; listening (Ctrl-C to stop)"),
            Event::Drained => log::info!("up to date after {:?}", started.elapsed().unwrap_or_default()),
            Event::Disconnected(why) => eprintln!("disconnected: {why}"),
            Event::Notice(n) => out.notice(n),
        }
        true
    })
}
