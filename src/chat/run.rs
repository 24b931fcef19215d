//! `tidings chat`: the terminal, and the client behind it.
//!
//! Two threads. The client thread holds the profile as its one writer
//! (like `listen`: other `tidings` commands on the profile hand it their
//! work over the profile's socket) and stays connected, reconnecting with
//! backoff; it reports events on a channel. The screen thread reads keys
//! and events, draws, and reads the history straight from the database
//! (reads never wait for the network); what a key asks for goes to the
//! client as a job, and its outcome comes back on a channel of its own. So
//! the screen never waits on the network.

use std::io::{Stdout, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{
    self, DisableFocusChange, EnableFocusChange, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers,
};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, SetTitle, disable_raw_mode, enable_raw_mode,
};

use super::app::{Action, App, Key, Link, Modal};
use super::ui;
use crate::client::content::{TYPING_EVERY, TYPING_SHOWN};
use crate::client::driver::Input;
use crate::client::ipc;
use crate::client::request::{Job, Outcome, Reply, Request};
use crate::client::{Error, Event, History, Unlock};

/// What the client thread says (one a time through a channel: the size
/// of an event does not matter here).
#[allow(clippy::large_enum_variant)]
enum FromClient {
    Event(Event),
    Done(Result<(), String>),
}

/// A job sent to the client, waiting for its outcome.
struct InFlight {
    /// The key's action; `None` for the screen's own work (watching).
    action: Option<Action>,
    reply: Receiver<Result<Reply, String>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn request_of(action: &Action) -> Option<Request> {
    Some(match action {
        Action::Send { to, text, reply_to } => Request::Send {
            to: to.clone(),
            text: text.clone(),
            reply_to: reply_to.map(|id| id.to_string()),
        },
        Action::Edit { id, text } => Request::Edit {
            id: id.to_string(),
            text: text.clone(),
        },
        Action::Delete(id) => Request::Delete { id: id.to_string() },
        Action::Forward { id, to } => Request::Forward {
            id: id.to_string(),
            to: to.clone(),
        },
        Action::React { id, emoji } => Request::React {
            id: id.to_string(),
            emoji: emoji.clone(),
        },
        Action::Read(user) => Request::Read { user: user.clone() },
        Action::Info(id) => Request::Info { id: id.to_string() },
        Action::Download(id) => Request::Download {
            id: id.to_string(),
            output: None,
        },
        Action::Typing { to, active } => Request::Typing {
            to: to.clone(),
            active: *active,
        },
        Action::Open(_) | Action::Quit => return None,
    })
}

/// Maps a terminal key to the screen's.
fn key_of(k: event::KeyEvent) -> Option<Key> {
    if k.kind != KeyEventKind::Press {
        return None;
    }
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    let alt = k.modifiers.contains(KeyModifiers::ALT);
    Some(match k.code {
        KeyCode::Char(c) if ctrl => Key::Ctrl(c.to_ascii_lowercase()),
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Enter if alt => Key::Newline,
        KeyCode::Enter => Key::Enter,
        KeyCode::Backspace => Key::Backspace,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab => Key::Tab,
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::F(1) => Key::F1,
        _ => return None,
    })
}

/// The screen's side: state, the history to read, the client to ask.
struct Screen {
    app: App,
    history: History,
    inputs: Sender<Input>,
    in_flight: Vec<InFlight>,
    /// The user read the open conversation up to here (so a read is asked
    /// for once per new message).
    asked_read: Option<(String, usize)>,
    /// The last "typing" sent: to whom, when (one every
    /// [`TYPING_EVERY`] at most).
    typing_sent: Option<(String, Instant)>,
    /// The users whose presence the client was asked to watch.
    watched: Vec<String>,
}

impl Screen {
    fn refresh(&mut self) {
        match self.history.conversations() {
            Ok(list) => self.app.set_conversations(list),
            Err(e) => self.app.notice = Some(format!("cannot read the history: {e}")),
        }
        self.watch();
        if let Some(peer) = self.app.open.clone() {
            match self.history.conversation(&peer) {
                Ok(messages) => self.app.set_messages(messages),
                Err(e) => self.app.notice = Some(format!("cannot read the history: {e}")),
            }
        }
        self.mark_read();
    }

    /// The open conversation is read while the terminal has focus.
    fn mark_read(&mut self) {
        if !self.app.focused {
            return;
        }
        let Some(peer) = self.app.open.clone() else { return };
        let unread = self
            .app
            .conversations
            .iter()
            .find(|c| c.peer == peer)
            .map_or(0, |c| c.unread);
        if unread == 0 || self.asked_read == Some((peer.clone(), unread)) {
            return;
        }
        self.asked_read = Some((peer.clone(), unread));
        self.act(Action::Read(peer));
    }

    /// Asks the client to watch the presence of the users shown: the open
    /// chat's and the list's (when that changed).
    fn watch(&mut self) {
        // A group (`#id`) has no presence of its own.
        let person = |p: &String| crate::wire::valid_user_name(p);
        let mut users: Vec<String> = self.app.open.iter().filter(|p| person(p)).cloned().collect();
        for c in &self.app.conversations {
            if users.len() >= crate::wire::MAX_WATCHED {
                break;
            }
            if person(&c.peer) && !users.contains(&c.peer) {
                users.push(c.peer.clone());
            }
        }
        users.sort();
        if users == self.watched {
            return;
        }
        self.watched = users.clone();
        self.job(Request::Watch { users }, None);
    }

    fn act(&mut self, action: Action) {
        match &action {
            Action::Open(_) => {
                self.refresh();
                return;
            }
            Action::Quit => return,
            // At most one every few seconds; a stop only after a start.
            Action::Typing { to, active: true } => {
                let recent = |(p, at): &(String, Instant)| p == to && at.elapsed() < TYPING_EVERY;
                if self.typing_sent.as_ref().is_some_and(recent) {
                    return;
                }
                self.typing_sent = Some((to.clone(), Instant::now()));
            }
            Action::Typing { to, active: false } => {
                let shown = |(p, at): &(String, Instant)| p == to && at.elapsed() < TYPING_SHOWN;
                if !self.typing_sent.as_ref().is_some_and(shown) {
                    return;
                }
                self.typing_sent = None;
            }
            // The message ends it over there; the next key starts anew.
            Action::Send { .. } => self.typing_sent = None,
            _ => {}
        }
        let Some(request) = request_of(&action) else { return };
        self.job(request, Some(action));
    }

    fn job(&mut self, request: Request, action: Option<Action>) {
        let (reply_tx, reply) = mpsc::channel();
        if self
            .inputs
            .send(Input::Local(Job {
                request,
                reply: reply_tx,
            }))
            .is_err()
        {
            self.app.notice = Some("the client has stopped".into());
            return;
        }
        self.in_flight.push(InFlight { action, reply });
    }

    /// Takes the outcomes that came; whether any did.
    fn outcomes(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.in_flight.len() {
            match self.in_flight[i].reply.try_recv() {
                Err(TryRecvError::Empty) => i += 1,
                Err(TryRecvError::Disconnected) => {
                    self.in_flight.remove(i);
                    any = true;
                }
                Ok(result) => {
                    let f = self.in_flight.remove(i);
                    any = true;
                    // Typing and watching are best effort: no word of them.
                    let Some(action) = f.action.filter(|a| !matches!(a, Action::Typing { .. })) else {
                        continue;
                    };
                    match result {
                        Err(e) => self.app.notice = Some(e),
                        Ok(reply) => {
                            if let Some(n) = reply.notices.last() {
                                self.app.notice = Some(n.to_string());
                            }
                            match reply.outcome {
                                Outcome::Pending(_) => {
                                    self.app.notice = Some("pending: it goes when the server is back".into());
                                }
                                Outcome::Info(found) => self.app.modal = Some(Modal::Info(info_lines(&found))),
                                Outcome::Downloaded { path, .. } => self.app.notice = Some(format!("saved: {path}")),
                                _ => {
                                    if !matches!(action, Action::Read(_)) {
                                        self.app.notice = None;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        any
    }
}

fn info_lines(
    found: &[(
        crate::client::Message,
        crate::client::Receipts,
        Vec<crate::client::MemberState>,
    )],
) -> Vec<String> {
    let mut out = Vec::new();
    for (m, r, members) in found {
        out.push(format!("{} from {} to {}: {}", m.id, m.from, m.to, m.status.as_str()));
        out.push(format!("sent {}", ui::clock(m.ts_ms)));
        // A group message: each other member's state first (spec §14.9).
        for s in members {
            out.push(format!("  {}: {}", s.user, s.status));
        }
        for d in &r.devices {
            let mut parts = Vec::new();
            if let Some(t) = d.delivered_ms {
                parts.push(format!("delivered {}", ui::clock(t)));
            }
            if let Some(t) = d.read_ms {
                parts.push(format!("read {}", ui::clock(t)));
            }
            if let Some(t) = d.expired_ms {
                parts.push(format!("expired undelivered {}", ui::clock(t)));
            }
            out.push(format!("  {}/{}: {}", d.user, d.device, parts.join(", ")));
        }
    }
    out
}

struct TermGuard;

impl Drop for TermGuard {
    fn drop(&mut self) {
        restore();
    }
}

fn restore() {
    let _ = disable_raw_mode();
    let mut out = std::io::stdout();
    let _ = execute!(out, DisableFocusChange, LeaveAlternateScreen);
    let _ = out.flush();
}

/// Runs the chat screen on the profile in `dir` until the user quits.
///
/// # Errors
/// Opening the profile (another `listen` or `chat` on it, a wrong
/// passphrase, not registered), or the terminal failing.
pub fn run(dir: &Path, unlock: &mut Unlock<'_>) -> Result<(), Error> {
    let (mut client, served) = ipc::serve_profile(dir, unlock)?;
    let me = client.profile().registered()?.user.clone();
    let history = client.profile().history().clone();
    let inputs = client.input_sender();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("tidings-chat-client".into())
        .spawn(move || {
            let _served = served;
            let r = client.listen(&mut |e| tx.send(FromClient::Event(e.clone())).is_ok());
            client.disconnect();
            let _ = tx.send(FromClient::Done(r.map_err(|e| e.to_string())));
        })?;
    let mut screen = Screen {
        app: App::new(&me),
        history,
        inputs: inputs.clone(),
        in_flight: Vec::new(),
        asked_read: None,
        typing_sent: None,
        watched: Vec::new(),
    };
    screen.refresh();
    let result = (|| -> Result<(), Error> {
        enable_raw_mode()?;
        let _guard = TermGuard;
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            default_hook(info);
        }));
        let mut stdout = std::io::stdout();
        execute!(stdout, EnterAlternateScreen, EnableFocusChange, SetTitle("tidings"))?;
        let mut terminal = Terminal::new(CrosstermBackend::new(stdout))?;
        terminal.clear()?;
        event_loop(&mut terminal, &mut screen, &rx)
    })();
    let _ = inputs.send(Input::Stop);
    let _ = worker.join();
    result
}

fn event_loop(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    screen: &mut Screen,
    rx: &Receiver<FromClient>,
) -> Result<(), Error> {
    let mut last_refresh = Instant::now();
    let mut dirty = true;
    loop {
        if dirty {
            terminal.draw(|f| ui::draw(f, &screen.app, now_ms()))?;
            dirty = false;
        }
        if screen.app.quit {
            return Ok(());
        }
        if event::poll(Duration::from_millis(100))? {
            match event::read()? {
                TermEvent::Key(k) => {
                    if let Some(key) = key_of(k) {
                        for action in screen.app.key(key) {
                            screen.act(action);
                        }
                        dirty = true;
                    }
                }
                TermEvent::FocusGained => {
                    screen.app.focused = true;
                    execute!(std::io::stdout(), SetTitle("tidings"))?;
                    screen.mark_read();
                    dirty = true;
                }
                TermEvent::FocusLost => screen.app.focused = false,
                TermEvent::Resize(..) => {
                    terminal.autoresize()?;
                    dirty = true;
                }
                _ => {}
            }
        }
        let mut refresh = false;
        if screen.app.expire_typing(now_ms()) {
            dirty = true;
        }
        loop {
            match rx.try_recv() {
                // Typing and presence change the screen, not the history.
                Ok(FromClient::Event(Event::Typing { from, active })) => {
                    if active {
                        let until = now_ms() + TYPING_SHOWN.as_millis() as u64;
                        screen.app.typing.insert(from, until);
                    } else {
                        screen.app.typing.remove(&from);
                    }
                    dirty = true;
                }
                Ok(FromClient::Event(Event::Presence { user, seen })) => {
                    screen.app.presence.insert(user, seen);
                    dirty = true;
                }
                Ok(FromClient::Event(e)) => {
                    match &e {
                        Event::Connected => screen.app.link = Link::Connected,
                        Event::Disconnected(why) => {
                            screen.app.link = Link::Offline(why.clone());
                            screen.app.presence.clear();
                            screen.app.typing.clear();
                        }
                        Event::Message(m) => {
                            // A message ends its sender's typing.
                            screen.app.typing.remove(&m.from);
                            let here = screen.app.focused && screen.app.open.as_deref() == Some(m.from.as_str());
                            if m.from != screen.app.me && !here {
                                // A bell, and the count in the title.
                                let unread = screen.app.unread() + 1;
                                let mut out = std::io::stdout();
                                let _ = write!(out, "\x07");
                                let _ = execute!(out, SetTitle(format!("({unread}) tidings")));
                            }
                        }
                        _ => {}
                    }
                    refresh = true;
                }
                Ok(FromClient::Done(r)) => {
                    screen.app.link = match r {
                        Ok(()) => Link::Stopped("the client stopped".into()),
                        Err(e) => Link::Stopped(e),
                    };
                    refresh = true;
                }
                Err(_) => break,
            }
        }
        if screen.outcomes() {
            refresh = true;
        }
        // While work is on its way, the history shows its progress (a
        // message stored as pending before it leaves, say).
        if refresh || (!screen.in_flight.is_empty() && last_refresh.elapsed() > Duration::from_millis(300)) {
            screen.refresh();
            last_refresh = Instant::now();
            dirty = true;
        }
    }
}
