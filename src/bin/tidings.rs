//! `tidings`: the command-line client. It parses arguments, calls
//! [`tidings::client`], and prints: results to stdout, one per line, the
//! value a script wants last; diagnostics to stderr; nothing on stdout when
//! a command fails (exit status 1). With `--json`, one JSON object a line.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io::IsTerminal;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tidings::client::secret::PassphraseError;
use tidings::client::{
    self, Direction, Event, LocalGroup, MemberState, Message, Notice, Outcome, ReceiptNews, Receipts, Report, Request,
    Status, Unlock, Update,
};
use tidings::wire::{ChangeKind, DeviceAddr, Lost, MsgId};
use zeroize::Zeroizing;

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
    /// Send a message to a user or a group ('#<id>'), or a file (--file); prints its id once the server has accepted it.
    ///
    /// A text is at most 3,500 bytes of UTF-8 (about 3,500 letters of
    /// English, fewer in scripts that take more bytes a letter). If the
    /// server cannot be reached within about 3 seconds, the message is kept
    /// as pending: its id is printed, "pending" is said on stderr, the exit
    /// status is 75, and it goes with the next `listen`, `sync` or `chat`.
    Send {
        /// The recipient: a user, or a group as '#<id>'.
        user: String,
        /// The text (not empty; at most 3,500 bytes; not with --file: use
        /// --caption).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Reply to (and quote) this message of the conversation.
        #[arg(long, value_name = "ID", conflicts_with = "file")]
        reply_to: Option<String>,
        /// Send this file (encrypted on this device, then uploaded).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// A text shown with the file.
        #[arg(long, value_name = "TEXT", requires = "file")]
        caption: Option<String>,
    },
    /// Download the file of a message; prints where it was saved.
    Download {
        /// The message's id.
        id: String,
        /// Where to save it (a file, or a folder to put it in); default:
        /// the profile's downloads folder, under the sender's name for it.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Forward a message (from any conversation) to a user; prints the new message's id.
    Forward {
        /// The message's id.
        id: String,
        /// The recipient: a user, or a group as '#<id>'.
        user: String,
    },
    /// Change the text of one of your messages, within 15 minutes of sending it.
    Edit {
        /// The message's id.
        id: String,
        /// The new text (not empty; at most 3,500 bytes).
        text: String,
    },
    /// Delete one of your messages for everyone, within 2 days of sending it.
    Delete {
        /// The message's id.
        id: String,
    },
    /// React to a message with one emoji (replacing your earlier reaction), or take it back.
    React {
        /// The message's id.
        id: String,
        /// One emoji (one character as shown, at most 32 bytes).
        #[arg(required_unless_present = "remove", conflicts_with = "remove")]
        emoji: Option<String>,
        /// Take your reaction back.
        #[arg(long)]
        remove: bool,
    },
    /// Mark the conversation with a user read (sends read receipts unless they are off).
    Read {
        /// The other party, or a group as '#<id>'.
        user: String,
    },
    /// Show a message and what became of it on each device.
    Info {
        /// The message's id.
        id: String,
    },
    /// Show or change settings (they reach your other devices too).
    Settings {
        #[command(subcommand)]
        setting: Option<Setting>,
    },
    /// Fetch, store and print everything queued for this device, then exit.
    Sync,
    /// Stay connected and print messages as they arrive.
    Listen,
    /// The terminal messenger: your chats, the open conversation, ticks
    /// that change as you watch (`?` or F1 shows every key).
    Chat,
    /// Print the local conversation with a user (an error if there is none).
    History {
        /// The other party, or a group as '#<id>'.
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
    /// Groups: create, change, leave, list; a group is written '#' and its
    /// 32-digit id (quote it in a shell).
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Block a user: their messages, receipts and typing no longer reach
    /// you (they are not told); messages in groups you share still do.
    Block {
        /// Whom.
        user: String,
    },
    /// Unblock a user.
    Unblock {
        /// Whom.
        user: String,
    },
    /// List the users you block.
    Blocked,
    /// Change the address of this profile's server (it moved); the pinned
    /// server key stays, so only the same server is accepted there.
    ServerAddress {
        /// The new host:port.
        address: String,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create a group (you are its first admin); prints its id as '#<id>'.
    Create {
        /// Its title (end to end: the server never sees it).
        title: String,
        /// The other members.
        users: Vec<String>,
    },
    /// Add members (admins only); they get the title, and no earlier message.
    Add {
        /// The group: '#<id>'.
        group: String,
        /// Whom.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members (admins only); they can read nothing sent after.
    Remove {
        /// The group: '#<id>'.
        group: String,
        /// Whom.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave a group (when its last admin leaves, its longest-standing member becomes admin).
    Leave {
        /// The group: '#<id>'.
        group: String,
    },
    /// Make a member an admin (admins only).
    Admin {
        /// The group: '#<id>'.
        group: String,
        /// The member.
        user: String,
    },
    /// Give a group a new title (admins only).
    Rename {
        /// The group: '#<id>'.
        group: String,
        /// The new title.
        title: String,
    },
    /// Print a group's title and members.
    Info {
        /// The group: '#<id>'.
        group: String,
    },
    /// List your groups.
    List,
}

#[derive(Subcommand)]
enum Setting {
    /// Send and show read receipts (on, the default) or neither (off).
    ReadReceipts {
        /// on or off.
        state: OnOff,
    },
    /// Files up to this size download by themselves when they arrive on
    /// this device (such as 1MiB, the default; 0 turns it off).
    AutoDownload {
        /// A size: 4096, 500KiB, 2MiB...
        size: String,
    },
    /// Who sees when you are online or were last seen: everyone (the
    /// default) or nobody; who hides theirs sees no one's.
    LastSeen {
        /// everyone or nobody.
        who: Audience,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Audience {
    Everyone,
    Nobody,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Writes result lines to stdout, flushing each.
struct Out {
    json: bool,
    /// Colour for read ticks (stdout is a terminal).
    color: bool,
    /// Progress bars for big transfers (stderr is a terminal).
    bars: bool,
    bar: RefCell<Option<ProgressBar>>,
}

/// Transfers from this size on get a progress bar.
const BAR_FROM: u64 = 1 << 20;

/// A message's file as JSON, or null.
fn attachment_json(m: &Message) -> serde_json::Value {
    match &m.attachment {
        Some(a) if !m.deleted => json!({
            "name": a.file.name,
            "size": a.file.size,
            "media_type": a.file.media_type,
            "sha256": hex::encode(a.file.sha256),
            "path": a.path,
            "expired": a.expired,
        }),
        _ => serde_json::Value::Null,
    }
}

/// A group as JSON: one object per group.
fn group_json(g: &LocalGroup) -> serde_json::Value {
    let members: Vec<serde_json::Value> = g
        .members
        .iter()
        .map(|m| json!({"user": m.user, "admin": m.admin}))
        .collect();
    json!({
        "type": "group",
        "id": g.id.to_string(),
        "title": g.title,
        "version": g.version,
        "members": members,
    })
}

/// A message as JSON: the fields of every message line.
fn message_json(m: &Message) -> serde_json::Value {
    json!({
        "type": "message",
        "id": m.id.to_string(),
        "from": m.from,
        "from_device": m.from_device.0,
        "to": m.to,
        "group": m.group().map(|g| g.to_string()),
        "text": if m.deleted { serde_json::Value::Null } else { json!(m.text) },
        "ts": m.ts_ms,
        "direction": m.direction.as_str(),
        "status": m.status.as_str(),
        "reply_to": m.reply_to.map(|id| id.to_string()),
        "quote": m.quote.as_ref().map(|q| json!({"from": q.from, "text": q.text})),
        "forwarded": m.forwarded(),
        "forwarded_many_times": m.forwarded_many_times(),
        "forwards": m.forwards,
        "edited": m.edited(),
        "deleted": m.deleted,
        "undecryptable": m.undecryptable,
        "repeats": m.repeats,
        "reactions": m.reactions,
        "attachment": attachment_json(m),
    })
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

    /// A message, a notice, a receipt or an update, as things arrive.
    fn event(&self, e: &Event) {
        match e {
            Event::Message(m) => self.message(m, false),
            Event::Notice(n) => self.notice(n),
            Event::Receipt(r) => self.receipt(r),
            Event::Update(u) => self.update(u),
            Event::Reaction(r) => {
                if self.json {
                    self.value(json!({
                        "type": "reaction",
                        "id": r.id.to_string(),
                        "from": r.from,
                        "by": r.by,
                        "emoji": r.emoji,
                        "ts": r.ts_ms,
                    }));
                } else {
                    let what = match &r.emoji {
                        Some(e) => format!("reacted {e} to"),
                        None => "took back their reaction to".to_owned(),
                    };
                    self.line(&format!("{} {} {what} {} ({})", time(r.ts_ms), r.by, r.id, r.from));
                }
            }
            Event::Gap(lost) => self.gap(lost),
            Event::Expired { device, ids } => self.expired(device, ids),
            Event::Settings { read_receipts } => {
                if self.json {
                    self.value(json!({"type": "settings", "read_receipts": read_receipts}));
                } else {
                    eprintln!(
                        "read receipts turned {} on another of your devices",
                        if *read_receipts { "on" } else { "off" }
                    );
                }
            }
            Event::Downloaded { id, path } => self.downloaded(&id.to_string(), path),
            Event::Progress { done, total } => self.progress(*done, *total),
            Event::LastSeen { everyone } => {
                let who = if *everyone { "everyone" } else { "nobody" };
                if self.json {
                    self.value(json!({"type": "settings", "last_seen": who}));
                } else {
                    eprintln!("last seen shown to {who}, as set on another of your devices");
                }
            }
            Event::Typing { from, active } => {
                if self.json {
                    self.value(json!({"type": "typing", "from": from, "active": active}));
                }
            }
            Event::Group(n) => {
                if self.json {
                    let changes: Vec<serde_json::Value> = n
                        .changes
                        .iter()
                        .map(|c| json!({"by": c.by, "kind": change_kind(c.kind), "users": c.users}))
                        .collect();
                    self.value(json!({
                        "type": "group_change",
                        "group": n.group.to_string(),
                        "version": n.version,
                        "changes": changes,
                        "ts": n.ts_ms,
                    }));
                } else if n.changes.is_empty() {
                    self.line(&format!("{} {}: the members changed", time(n.ts_ms), n.group.tag()));
                }
                for c in &n.changes {
                    if !self.json {
                        self.line(&format!(
                            "{} {}: {} {} {}",
                            time(n.ts_ms),
                            n.group.tag(),
                            c.by,
                            change_kind(c.kind),
                            c.users.join(", ")
                        ));
                    }
                }
            }
            Event::GroupTitle { group, title, by } => {
                if self.json {
                    self.value(json!({"type": "group_title", "group": group.to_string(), "title": title, "by": by}));
                } else {
                    self.line(&format!(
                        "{}: {by} named the group \"{}\"",
                        group.tag(),
                        one_line(title)
                    ));
                }
            }
            Event::Blocked { user, blocked } => {
                if self.json {
                    self.value(json!({"type": "block", "user": user, "blocked": blocked}));
                } else {
                    eprintln!(
                        "{} {user} on another of your devices",
                        if *blocked { "blocked" } else { "unblocked" }
                    );
                }
            }
            Event::Presence { .. } | Event::Served | Event::Connected | Event::Disconnected(_) | Event::Drained => {}
        }
    }

    fn downloaded(&self, id: &str, path: &str) {
        if self.json {
            self.value(json!({"type": "download", "id": id, "path": path}));
        } else {
            self.line(path);
        }
    }

    /// A progress bar on stderr for a big transfer, when it is a terminal.
    fn progress(&self, done: u64, total: u64) {
        if !self.bars || total < BAR_FROM {
            return;
        }
        let mut bar = self.bar.borrow_mut();
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}") {
                b.set_style(style);
            }
            b
        });
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
            *bar = None;
        }
    }

    fn receipt(&self, r: &ReceiptNews) {
        if self.json {
            self.value(json!({
                "type": "receipt",
                "id": r.id.to_string(),
                "from": r.from,
                "to": r.to,
                "status": r.status.as_str(),
                "report": match r.report {
                    Report::Delivered => "delivered",
                    Report::Read => "read",
                    Report::Expired => "expired",
                },
                "by": r.by,
                "by_device": r.by_device.0,
                "ts": r.ts_ms,
            }));
        } else {
            self.line(&format!(
                "{} {} -> {} {}: {} (reported by {}/{})",
                time(r.ts_ms),
                r.from,
                r.to,
                r.id,
                self.ticks(r.status),
                r.by,
                r.by_device
            ));
        }
    }

    fn update(&self, u: &Update) {
        if self.json {
            self.value(json!({
                "type": u.kind.as_str(),
                "id": u.id.to_string(),
                "from": u.from,
                "from_device": u.by_device.0,
                "to": u.to,
                "text": u.text,
                "ts": u.ts_ms,
            }));
        } else {
            let what = match &u.text {
                Some(t) => format!("edited {}: {}", u.id, one_line(t)),
                None => format!("deleted {} for everyone", u.id),
            };
            self.line(&format!(
                "{} {}/{} -> {} {what}",
                time(u.ts_ms),
                u.from,
                u.by_device,
                u.to
            ));
        }
    }

    fn gap(&self, l: &Lost) {
        if self.json {
            self.value(json!({
                "type": "gap",
                "from": l.from.user,
                "device": l.from.device.0,
                "count": l.count,
                "first": l.first_ms,
                "last": l.last_ms,
            }));
        } else {
            self.line(&format!(
                "{} message{} from {} (device {}), sent between {} and {}, expired on the server before this device collected {}",
                l.count,
                if l.count == 1 { "" } else { "s" },
                l.from.user,
                l.from.device,
                time(l.first_ms),
                time(l.last_ms),
                if l.count == 1 { "it" } else { "them" }
            ));
        }
    }

    fn expired(&self, device: &DeviceAddr, ids: &[MsgId]) {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        if self.json {
            self.value(json!({
                "type": "expired",
                "user": device.user,
                "device": device.device.0,
                "ids": ids,
            }));
        } else {
            self.line(&format!(
                "{} of your messages expired on the server before {}'s device {} collected them: {}",
                ids.len(),
                device.user,
                device.device,
                ids.join(" ")
            ));
        }
    }

    /// ✓ sent, ✓✓ delivered, ✓✓ read (blue on a terminal).
    fn ticks(&self, status: Status) -> String {
        match status {
            Status::Pending => "pending".into(),
            Status::Sent => "✓ sent".into(),
            Status::Delivered => "✓✓ delivered".into(),
            Status::Read if self.color => "\x1b[34m✓✓ read\x1b[0m".into(),
            Status::Read => "✓✓ read".into(),
            Status::Received => "received".into(),
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
            self.value(message_json(m));
        } else {
            self.line(&self.message_line(m, history));
        }
    }

    /// One message as a line: when, who, (in history) its ticks, what it
    /// replies to or that it was forwarded, its text, and whether it was
    /// edited.
    fn message_line(&self, m: &Message, history: bool) -> String {
        let status = if history {
            let ticks = match (m.direction, m.status) {
                (Direction::In, Status::Read) => "read".to_owned(),
                (_, s) => self.ticks(s),
            };
            format!(" [{ticks}]")
        } else {
            String::new()
        };
        let mut text = String::new();
        if m.forwarded_many_times() {
            text.push_str("[forwarded many times] ");
        } else if m.forwarded() {
            text.push_str("[forwarded] ");
        }
        if let Some(q) = &m.quote {
            match &q.text {
                Some(t) => text.push_str(&format!("[reply to {}: \"{}\"] ", q.from, one_line(t))),
                None => text.push_str(&format!("[reply to {}: (deleted message)] ", q.from)),
            }
        }
        if m.deleted {
            text.push_str("[deleted]");
        } else if m.undecryptable && m.repeats > 0 {
            text.push_str(&format!(
                "[{} undecryptable messages from this device; asked it for a new session]",
                u64::from(m.repeats) + 1
            ));
        } else if let Some(a) = &m.attachment {
            let expired = if a.expired { ", expired on the server" } else { "" };
            text.push_str(&format!("[file {} {}{expired}]", one_line(&a.file.name), a.file.size));
            if !m.text.is_empty() {
                text.push(' ');
                text.push_str(&one_line(&m.text));
            }
        } else if m.undecryptable {
            text.push_str("[undecryptable message; asked the sender's device for a new session]");
        } else {
            text.push_str(&one_line(&m.text));
        }
        if m.edited() && !m.deleted {
            text.push_str(" (edited)");
        }
        if !m.reactions.is_empty() {
            let r: Vec<String> = m.reactions.iter().map(|(u, e)| format!("{u} {e}")).collect();
            text.push_str(&format!(" [reactions: {}]", r.join(", ")));
        }
        format!(
            "{} {}/{} -> {}{}: {}",
            time(m.ts_ms),
            m.from,
            m.from_device,
            m.to,
            status,
            text
        )
    }

    /// A group: a line for it, then one per member (or a JSON object).
    fn group(&self, g: &LocalGroup) {
        if self.json {
            self.value(group_json(g));
        } else {
            let title = if g.title.is_empty() {
                "(no title yet)".to_owned()
            } else {
                one_line(&g.title)
            };
            self.line(&format!("{} {title}", g.id.tag()));
            for m in &g.members {
                self.line(&format!("  {}{}", m.user, if m.admin { " (admin)" } else { "" }));
            }
        }
    }

    /// A message and what each device reported about it.
    fn info(&self, m: &Message, r: &Receipts, members: &[MemberState]) {
        let stamp = |t: Option<u64>| t.map(time);
        if self.json {
            let mut v = message_json(m);
            v["type"] = json!("info");
            if m.group().is_some() {
                v["members"] = members
                    .iter()
                    .map(|s| json!({"user": s.user, "status": s.status}))
                    .collect();
            }
            v["devices"] = r
                .devices
                .iter()
                .map(|d| {
                    json!({
                        "user": d.user,
                        "device": d.device.0,
                        "status": d.state().as_str(),
                        "delivered": d.delivered_ms,
                        "read": d.read_ms,
                        "expired": d.expired_ms,
                    })
                })
                .collect();
            v["read_here"] = json!(r.read_here_ms);
            self.value(v);
        } else {
            self.line(&self.message_line(m, true));
            for d in &r.devices {
                let mut parts = Vec::new();
                if let Some(t) = stamp(d.delivered_ms) {
                    parts.push(format!("delivered {t}"));
                }
                if let Some(t) = stamp(d.read_ms) {
                    parts.push(format!("read {t}"));
                }
                if let Some(t) = stamp(d.expired_ms) {
                    parts.push(format!("expired undelivered (noticed {t})"));
                }
                self.line(&format!(
                    "  {}/{}: {}: {}",
                    d.user,
                    d.device,
                    d.state().as_str(),
                    parts.join(", ")
                ));
            }
            if let Some(t) = stamp(r.read_here_ms) {
                self.line(&format!("  read by you {t}"));
            }
            for s in members {
                self.line(&format!("  {}: {}", s.user, s.status));
            }
        }
    }
}

fn change_kind(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Created => "created",
        ChangeKind::Added => "added",
        ChangeKind::Removed => "removed",
        ChangeKind::Left => "left",
        ChangeKind::Promoted => "made admin",
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
    let out = Out {
        json: cli.json,
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        bars: std::io::stderr().is_terminal(),
        bar: RefCell::new(None),
    };
    match run(cli.command, &dir, &out) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidings: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A path made absolute against the current folder (a running `listen`
/// may do the work, elsewhere).
fn absolute(path: &Path) -> Result<String, client::Error> {
    let p = std::path::absolute(path).map_err(|e| client::Error::Usage(format!("{}: {e}", path.display())))?;
    Ok(p.to_string_lossy().into_owned())
}

/// `tidings server-address HOST:PORT`: a profile's server moved.
fn server_address(dir: &Path, unlock: &mut Unlock<'_>, address: &str, out: &Out) -> Result<(), client::Error> {
    let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) && !host.contains(char::is_whitespace)
    });
    if !valid {
        return Err(client::Error::Usage(format!(
            "{address:?} is not HOST:PORT (for example chat.example.org:7420 or [2001:db8::7]:7420)"
        )));
    }
    let mut profile = unlock.open(dir, std::time::Duration::from_secs(5))?;
    let mut reg = profile.registered()?.clone();
    let old = std::mem::replace(&mut reg.server, address.to_string());
    let key = hex::encode(reg.server_key);
    profile.save_registration(reg)?;
    eprintln!("server address was {old}, now {address}; the pinned server key stays {key}");
    if out.json {
        out.value(json!({"type": "server_address", "old": old, "new": address, "server_key": key}));
    } else {
        out.line(address);
    }
    Ok(())
}

/// The exit status of a message left pending: EX_TEMPFAIL (sysexits.h),
/// "try again later"; here the client itself tries again.
const EX_TEMPFAIL: u8 = 75;

/// Asks on the terminal for the passphrase of the profile in `dir`.
fn ask_passphrase(dir: &Path, why: PassphraseError) -> Option<Zeroizing<String>> {
    if why == PassphraseError::Wrong {
        eprintln!("tidings: wrong passphrase");
    }
    let prompt = format!("passphrase of profile {}: ", dir.display());
    rpassword::prompt_password(prompt).ok().map(Zeroizing::new)
}

/// Asks on the terminal for a new profile's passphrase (twice); empty is
/// none.
fn ask_new_passphrase() -> Result<Option<Zeroizing<String>>, client::Error> {
    loop {
        let first = Zeroizing::new(rpassword::prompt_password(
            "passphrase to protect this device's keys (empty for none): ",
        )?);
        if first.is_empty() {
            return Ok(None);
        }
        let again = Zeroizing::new(rpassword::prompt_password("the same passphrase again: ")?);
        if *again == *first {
            return Ok(Some(first));
        }
        eprintln!("tidings: the two passphrases differ; once more");
    }
}

fn run(cmd: Cmd, dir: &Path, out: &Out) -> Result<ExitCode, client::Error> {
    let terminal = std::io::stdin().is_terminal();
    let mut asker = |why| ask_passphrase(dir, why);
    let mut unlock = Unlock::from_env();
    if terminal && unlock.passphrase.is_none() {
        unlock.ask = Some(&mut asker);
    }
    let new_profile = matches!(cmd, Cmd::Register { .. } | Cmd::Link { .. })
        && !dir.join(client::profile::REGISTRATION_FILE).exists()
        && client::ipc::delegate_target(dir).is_none();
    if new_profile {
        if terminal && unlock.passphrase.is_none() {
            unlock.passphrase = ask_new_passphrase()?;
        }
        if unlock.passphrase.is_none() {
            eprintln!(
                "warning: no passphrase: this device's keys are stored unencrypted, and whoever copies the \
                 profile can act as this device and read what comes to it (set TIDINGS_PASSPHRASE, or answer \
                 the prompt on a terminal, to protect them)"
            );
        }
    }
    let request = match cmd {
        Cmd::Listen => return listen(dir, &mut unlock, out).map(|()| ExitCode::SUCCESS),
        Cmd::Chat => return tidings::chat::run(dir, &mut unlock).map(|()| ExitCode::SUCCESS),
        Cmd::ServerAddress { address } => {
            return server_address(dir, &mut unlock, &address, out).map(|()| ExitCode::SUCCESS);
        }
        Cmd::Register { invite, name } => Request::Register { code: invite, name },
        Cmd::Link { code } => Request::Link { code },
        Cmd::LinkCode => Request::LinkCode,
        Cmd::Send {
            user,
            file: Some(file),
            caption,
            ..
        } => Request::SendFile {
            to: user,
            path: absolute(&file)?,
            caption: caption.unwrap_or_default(),
        },
        Cmd::Send {
            user, text, reply_to, ..
        } => Request::Send {
            to: user,
            text: text.unwrap_or_default(),
            reply_to,
        },
        Cmd::Download { id, output } => Request::Download {
            id,
            output: output.as_deref().map(absolute).transpose()?,
        },
        Cmd::Forward { id, user } => Request::Forward { id, to: user },
        Cmd::Edit { id, text } => Request::Edit { id, text },
        Cmd::Delete { id } => Request::Delete { id },
        Cmd::React { id, emoji, .. } => Request::React { id, emoji },
        Cmd::Read { user } => Request::Read { user },
        Cmd::Info { id } => Request::Info { id },
        Cmd::Settings { setting } => Request::Settings {
            read_receipts: match setting {
                Some(Setting::ReadReceipts { state }) => Some(matches!(state, OnOff::On)),
                _ => None,
            },
            last_seen: match setting {
                Some(Setting::LastSeen { who }) => Some(matches!(who, Audience::Everyone)),
                _ => None,
            },
            auto_download: match setting {
                Some(Setting::AutoDownload { size }) => Some(tidings::config::parse_size(&size).ok_or_else(|| {
                    client::Error::Usage(format!("not a size: {size:?} (write e.g. 0, 500KiB, 1MiB)"))
                })?),
                _ => None,
            },
        },
        Cmd::Sync => Request::Sync,
        Cmd::History { user } => Request::History { user },
        Cmd::Devices => Request::Devices,
        Cmd::Revoke { device } => Request::Revoke { device },
        Cmd::Verify { user } => Request::Verify { user },
        Cmd::Group { cmd } => match cmd {
            GroupCmd::Create { title, users } => Request::GroupCreate { title, users },
            GroupCmd::Add { group, users } => Request::GroupAdd { group, users },
            GroupCmd::Remove { group, users } => Request::GroupRemove { group, users },
            GroupCmd::Leave { group } => Request::GroupLeave { group },
            GroupCmd::Admin { group, user } => Request::GroupAdmin { group, user },
            GroupCmd::Rename { group, title } => Request::GroupRename { group, title },
            GroupCmd::Info { group } => Request::GroupInfo { group },
            GroupCmd::List => Request::GroupList,
        },
        Cmd::Block { user } => Request::Block { user, blocked: true },
        Cmd::Unblock { user } => Request::Block { user, blocked: false },
        Cmd::Blocked => Request::Blocked,
    };
    let creating = matches!(request, Request::GroupCreate { .. });
    let outcome = client::run_with(dir, request, &mut unlock, &mut |e| out.event(e))?;
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
        Outcome::Pending(m) => {
            eprintln!("pending: it goes when the server is back");
            if out.json {
                out.value(json!({"type": "pending", "id": m.id.to_string()}));
            } else {
                out.line(&m.id.to_string());
            }
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Outcome::Reacted(m) => {
            if out.json {
                let mut v = message_json(&m);
                v["type"] = json!("reacted");
                out.value(v);
            } else {
                out.line(&m.id.to_string());
            }
        }
        Outcome::Edited(m) | Outcome::Deleted(m) => {
            if out.json {
                let mut v = message_json(&m);
                v["type"] = json!(if m.deleted { "deleted" } else { "edited" });
                out.value(v);
            } else {
                out.line(&m.id.to_string());
            }
        }
        Outcome::Read { user, count } => {
            eprintln!(
                "{count} message{} from {user} marked read",
                if count == 1 { "" } else { "s" }
            );
            if out.json {
                out.value(json!({"type": "read", "user": user, "count": count}));
            } else {
                out.line(&count.to_string());
            }
        }
        Outcome::Info(found) => {
            for (m, r, members) in &found {
                out.info(m, r, members);
            }
        }
        Outcome::Group(g) => {
            if creating && !out.json {
                eprintln!(
                    "created group \"{}\" with {} members",
                    one_line(&g.title),
                    g.members.len()
                );
                out.line(&g.id.tag());
            } else {
                out.group(&g);
            }
        }
        Outcome::Groups(groups) => {
            for g in &groups {
                if out.json {
                    out.value(group_json(g));
                } else {
                    let title = if g.title.is_empty() {
                        "(no title yet)".to_owned()
                    } else {
                        one_line(&g.title)
                    };
                    out.line(&format!("{} {title} ({} members)", g.id.tag(), g.members.len()));
                }
            }
        }
        Outcome::Left { group } => {
            if out.json {
                out.value(json!({"type": "left", "group": group.trim_start_matches('#')}));
            } else {
                out.line(&format!("left {group}"));
            }
        }
        Outcome::BlockChanged { user, blocked } => {
            if out.json {
                out.value(json!({"type": "block", "user": user, "blocked": blocked}));
            } else {
                out.line(&format!("{} {user}", if blocked { "blocked" } else { "unblocked" }));
            }
        }
        Outcome::BlockList(users) => {
            for u in &users {
                if out.json {
                    out.value(json!({"type": "blocked", "user": u}));
                } else {
                    out.line(u);
                }
            }
        }
        Outcome::Settings {
            read_receipts,
            last_seen,
            auto_download,
        } => {
            if out.json {
                let who = if last_seen { "everyone" } else { "nobody" };
                out.value(json!({"type": "settings", "read_receipts": read_receipts, "last_seen": who, "auto_download": auto_download}));
            } else {
                out.line(&format!("read-receipts {}", if read_receipts { "on" } else { "off" }));
                out.line(&format!("last-seen {}", if last_seen { "everyone" } else { "nobody" }));
                out.line(&format!("auto-download {auto_download}"));
            }
        }
        Outcome::Downloaded { id, path } => out.downloaded(&id, &path),
        // The chat screen's requests.
        Outcome::Typing { .. } | Outcome::Watching { .. } => {}
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
    Ok(ExitCode::SUCCESS)
}

fn listen(dir: &Path, unlock: &mut Unlock<'_>, out: &Out) -> Result<(), client::Error> {
    let started = SystemTime::now();
    client::listen_with(dir, unlock, &mut |event| {
        match event {
            Event::Connected => eprintln!("connected; listening (Ctrl-C to stop)"),
            Event::Drained => log::info!("up to date after {:?}", started.elapsed().unwrap_or_default()),
            Event::Disconnected(why) => eprintln!("disconnected: {why}"),
            other => out.event(other),
        }
        true
    })
}
