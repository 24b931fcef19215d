//! The chat screen's state and what each key does to it: pure, so that the
//! screen can be tested without a terminal.
//!
//! The state holds what is shown (the list of conversations, the open one,
//! the compose line, a modal) and produces [`Action`]s for the runner
//! ([`super::run`]) to carry out on the client, which owns the network. A
//! key never waits for anything.

use std::collections::BTreeMap;

use crate::client::{Conversation, Message, Status};
use crate::wire::{MsgId, Seen};

/// Where keys go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    /// The list of conversations.
    List,
    /// The compose line of the open conversation.
    Compose,
    /// A message of the open conversation (to reply, edit, react...).
    Messages,
}

/// What the compose line will send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Draft {
    /// A new message.
    New,
    /// A reply to this message (quoting it).
    Reply {
        /// The message replied to.
        id: MsgId,
        /// Its sender.
        from: String,
        /// The start of its text.
        text: String,
    },
    /// A new text for this message of the user's.
    Edit(MsgId),
}

/// A window over the screen that takes the keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modal {
    /// Every key.
    Help,
    /// A user name to start a conversation with.
    NewChat(String),
    /// A user name to forward the message to.
    Forward(MsgId, String),
    /// An emoji to react with.
    React(MsgId, String),
    /// Delete for everyone? (y/n)
    ConfirmDelete(MsgId),
    /// What became of a message: lines of text.
    Info(Vec<String>),
}

/// The connection, as the status line tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Before the first connection.
    Connecting,
    /// Connected.
    Connected,
    /// Lost; the text says why and when it tries again.
    Offline(String),
    /// The client stopped for good (revoked, say).
    Stopped(String),
}

/// Work for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a text (as a reply if `reply_to`).
    Send {
        /// To whom.
        to: String,
        /// The text.
        text: String,
        /// The message it replies to.
        reply_to: Option<MsgId>,
    },
    /// Edit one of the user's messages.
    Edit {
        /// Which.
        id: MsgId,
        /// The new text.
        text: String,
    },
    /// Delete one of the user's messages for everyone.
    Delete(MsgId),
    /// Forward a message.
    Forward {
        /// Which.
        id: MsgId,
        /// To whom.
        to: String,
    },
    /// React (or, with `None`, take the reaction back).
    React {
        /// To which message.
        id: MsgId,
        /// The emoji.
        emoji: Option<String>,
    },
    /// Mark the conversation with this user read.
    Read(String),
    /// Show what became of a message.
    Info(MsgId),
    /// Save the file of a message (to the profile's downloads folder,
    /// unless it is on this device already).
    Download(MsgId),
    /// The user is writing to this user (`active`), or cleared what it
    /// wrote (the runner sends at most one every few seconds).
    Typing {
        /// To whom.
        to: String,
        /// Writing, or stopped.
        active: bool,
    },
    /// Open the conversation with this user (read it from the history).
    Open(String),
    /// Leave.
    Quit,
}

/// The quick reactions, on keys 1 to 6 of the react window.
pub const QUICK_REACTIONS: [&str; 6] = ["👍", "❤️", "😂", "😮", "😢", "🙏"];

/// A key, as the screen needs it (the runner maps terminal keys to these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// A character typed.
    Char(char),
    /// Ctrl and a letter.
    Ctrl(char),
    /// Enter.
    Enter,
    /// Alt-Enter (or Ctrl-J): a newline in the compose line.
    Newline,
    /// Backspace.
    Backspace,
    /// Escape.
    Esc,
    /// Tab.
    Tab,
    /// Arrow up.
    Up,
    /// Arrow down.
    Down,
    /// F1.
    F1,
}

/// The chat screen's state.
#[derive(Clone, Debug)]
pub struct App {
    /// This user.
    pub me: String,
    /// The conversations, the most recent first.
    pub conversations: Vec<Conversation>,
    /// The selected conversation in the list.
    pub selected: usize,
    /// The open conversation's peer.
    pub open: Option<String>,
    /// Its messages, oldest first.
    pub messages: Vec<Message>,
    /// The message selected in it (in [`Focus::Messages`]).
    pub cursor: Option<usize>,
    /// What is being written.
    pub compose: String,
    /// What it will be.
    pub draft: Draft,
    /// Where keys go.
    pub focus: Focus,
    /// A window taking the keys, if any.
    pub modal: Option<Modal>,
    /// The connection.
    pub link: Link,
    /// The last outcome worth a line (an error, "sent as pending"...).
    pub notice: Option<String>,
    /// Whether the terminal has focus (assumed until it says otherwise).
    pub focused: bool,
    /// Who is typing in which conversation (user → when it stops showing,
    /// ms since the epoch).
    pub typing: BTreeMap<String, u64>,
    /// What the server says of the presence of the users shown.
    pub presence: BTreeMap<String, Seen>,
    /// Whether the user asked to leave.
    pub quit: bool,
}

impl App {
    /// A screen for user `me`, with nothing loaded yet.
    pub fn new(me: &str) -> App {
        App {
            me: me.to_owned(),
            conversations: Vec::new(),
            selected: 0,
            open: None,
            messages: Vec::new(),
            cursor: None,
            compose: String::new(),
            draft: Draft::New,
            focus: Focus::List,
            modal: None,
            link: Link::Connecting,
            notice: None,
            focused: true,
            typing: BTreeMap::new(),
            presence: BTreeMap::new(),
            quit: false,
        }
    }

    /// Replaces the list of conversations, keeping the selection on the
    /// same peer where it can.
    pub fn set_conversations(&mut self, list: Vec<Conversation>) {
        let keep = self.conversations.get(self.selected).map(|c| c.peer.clone());
        self.conversations = list;
        self.selected = keep
            .and_then(|p| self.conversations.iter().position(|c| c.peer == p))
            .unwrap_or(0);
    }

    /// Replaces the open conversation's messages, keeping the cursor on the
    /// same message where it can.
    pub fn set_messages(&mut self, messages: Vec<Message>) {
        let keep = self
            .cursor
            .and_then(|i| self.messages.get(i))
            .map(|m| (m.from.clone(), m.id));
        self.messages = messages;
        self.cursor = keep.and_then(|(from, id)| self.messages.iter().position(|m| m.from == from && m.id == id));
        if self.focus == Focus::Messages && self.cursor.is_none() {
            self.focus = Focus::Compose;
        }
    }

    /// Unread messages across conversations.
    pub fn unread(&self) -> usize {
        self.conversations.iter().map(|c| c.unread).sum()
    }

    /// The selected message.
    pub fn current(&self) -> Option<&Message> {
        self.cursor.and_then(|i| self.messages.get(i))
    }

    fn open_chat(&mut self, peer: String, out: &mut Vec<Action>) {
        if self.open.as_deref() != Some(&peer) {
            self.open = Some(peer.clone());
            self.messages.clear();
            self.cursor = None;
            self.compose.clear();
            self.draft = Draft::New;
        }
        self.focus = Focus::Compose;
        out.push(Action::Open(peer));
    }

    /// Handles one key; returns the work it calls for.
    pub fn key(&mut self, key: Key) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(key, Key::Ctrl('c') | Key::Ctrl('q')) {
            self.quit = true;
            out.push(Action::Quit);
            return out;
        }
        if let Some(modal) = self.modal.take() {
            self.modal_key(modal, key, &mut out);
            return out;
        }
        match key {
            Key::F1 => {
                self.modal = Some(Modal::Help);
                return out;
            }
            Key::Ctrl('n') => {
                self.modal = Some(Modal::NewChat(String::new()));
                return out;
            }
            Key::Tab => {
                self.focus = match self.focus {
                    Focus::List if self.open.is_some() => Focus::Compose,
                    Focus::Compose if !self.messages.is_empty() => {
                        self.cursor = Some(self.cursor.unwrap_or(self.messages.len() - 1));
                        Focus::Messages
                    }
                    _ => Focus::List,
                };
                return out;
            }
            _ => {}
        }
        match self.focus {
            Focus::List => self.list_key(key, &mut out),
            Focus::Compose => self.compose_key(key, &mut out),
            Focus::Messages => self.messages_key(key, &mut out),
        }
        out
    }

    fn list_key(&mut self, key: Key, out: &mut Vec<Action>) {
        match key {
            Key::Up | Key::Char('k') => self.selected = self.selected.saturating_sub(1),
            Key::Down | Key::Char('j') if self.selected + 1 < self.conversations.len() => self.selected += 1,
            Key::Enter => {
                if let Some(c) = self.conversations.get(self.selected) {
                    let peer = c.peer.clone();
                    self.open_chat(peer, out);
                }
            }
            Key::Char('n') => self.modal = Some(Modal::NewChat(String::new())),
            Key::Char('?') => self.modal = Some(Modal::Help),
            Key::Char('q') => {
                self.quit = true;
                out.push(Action::Quit);
            }
            _ => {}
        }
    }

    /// Whether `peer` is typing at `now_ms`.
    pub fn is_typing(&self, peer: &str, now_ms: u64) -> bool {
        self.typing.get(peer).is_some_and(|until| *until > now_ms)
    }

    /// Forgets the typing indicators that ran out; whether any did.
    pub fn expire_typing(&mut self, now_ms: u64) -> bool {
        let before = self.typing.len();
        self.typing.retain(|_, until| *until > now_ms);
        self.typing.len() != before
    }

    /// Typing news for the open conversation, when the compose line went
    /// from `was` to what it is now (an edit is not news).
    fn typing_news(&self, was: bool, out: &mut Vec<Action>) {
        let Some(to) = self.open.clone() else { return };
        if matches!(self.draft, Draft::Edit(_)) {
            return;
        }
        let now = !self.compose.trim().is_empty();
        if now {
            out.push(Action::Typing { to, active: true });
        } else if was {
            out.push(Action::Typing { to, active: false });
        }
    }

    fn compose_key(&mut self, key: Key, out: &mut Vec<Action>) {
        let was = !self.compose.trim().is_empty();
        match key {
            Key::Char(c) => {
                self.compose.push(c);
                self.typing_news(was, out);
            }
            Key::Newline | Key::Ctrl('j') => self.compose.push('\n'),
            Key::Backspace => {
                self.compose.pop();
                self.typing_news(was, out);
            }
            Key::Esc => {
                if self.draft != Draft::New || !self.compose.is_empty() {
                    self.compose.clear();
                    self.typing_news(was, out);
                    self.draft = Draft::New;
                } else {
                    self.focus = Focus::List;
                }
            }
            Key::Up if self.compose.is_empty() && !self.messages.is_empty() => {
                self.focus = Focus::Messages;
                self.cursor = Some(self.messages.len() - 1);
            }
            Key::Enter => {
                let Some(to) = self.open.clone() else { return };
                let text = self.compose.trim_end().to_owned();
                if text.trim().is_empty() {
                    return;
                }
                self.compose.clear();
                match std::mem::replace(&mut self.draft, Draft::New) {
                    Draft::New => out.push(Action::Send {
                        to,
                        text,
                        reply_to: None,
                    }),
                    Draft::Reply { id, .. } => out.push(Action::Send {
                        to,
                        text,
                        reply_to: Some(id),
                    }),
                    Draft::Edit(id) => out.push(Action::Edit { id, text }),
                }
            }
            _ => {}
        }
    }

    fn messages_key(&mut self, key: Key, out: &mut Vec<Action>) {
        let Some(i) = self.cursor else {
            self.focus = Focus::Compose;
            return;
        };
        let Some(m) = self.messages.get(i).cloned() else {
            self.focus = Focus::Compose;
            return;
        };
        let usable = !m.deleted && !m.undecryptable;
        let mine = m.from == self.me;
        match key {
            Key::Up | Key::Char('k') => self.cursor = Some(i.saturating_sub(1)),
            Key::Down | Key::Char('j') => {
                if i + 1 < self.messages.len() {
                    self.cursor = Some(i + 1);
                } else {
                    self.cursor = None;
                    self.focus = Focus::Compose;
                }
            }
            Key::Esc => {
                self.cursor = None;
                self.focus = Focus::Compose;
            }
            Key::Char('?') => self.modal = Some(Modal::Help),
            Key::Char('r') | Key::Enter if usable => {
                self.draft = Draft::Reply {
                    id: m.id,
                    from: m.from.clone(),
                    text: m.text.clone(),
                };
                self.focus = Focus::Compose;
                self.cursor = None;
            }
            Key::Char('e') if usable && mine && m.status != Status::Pending => {
                self.draft = Draft::Edit(m.id);
                self.compose = m.text.clone();
                self.focus = Focus::Compose;
                self.cursor = None;
            }
            Key::Char('d') if mine && !m.deleted && m.status != Status::Pending => {
                self.modal = Some(Modal::ConfirmDelete(m.id));
            }
            Key::Char('f') if usable => self.modal = Some(Modal::Forward(m.id, String::new())),
            Key::Char('a') | Key::Char('+') if usable => self.modal = Some(Modal::React(m.id, String::new())),
            Key::Char('-') if m.reactions.contains_key(&self.me) => {
                out.push(Action::React { id: m.id, emoji: None });
                self.focus = Focus::Compose;
                self.cursor = None;
            }
            Key::Char('i') => out.push(Action::Info(m.id)),
            Key::Char('s') if usable && m.attachment.as_ref().is_some_and(|a| !a.expired) => {
                out.push(Action::Download(m.id));
                self.notice = Some("saving the file…".into());
            }
            _ => {}
        }
    }

    fn modal_key(&mut self, modal: Modal, key: Key, out: &mut Vec<Action>) {
        self.modal_choice(modal, key, out);
        if self.modal.is_none() && !out.is_empty() && self.open.is_some() {
            // Done with the message: back to writing.
            self.focus = Focus::Compose;
            self.cursor = None;
        }
    }

    fn modal_choice(&mut self, modal: Modal, key: Key, out: &mut Vec<Action>) {
        match modal {
            Modal::Help | Modal::Info(_) => {}
            Modal::ConfirmDelete(id) => {
                if key == Key::Char('y') {
                    out.push(Action::Delete(id));
                }
            }
            Modal::NewChat(mut name) => match key {
                Key::Enter => {
                    let name = name.trim().to_owned();
                    if crate::wire::valid_user_name(&name) || crate::wire::GroupId::parse_tag(&name).is_some() {
                        self.open_chat(name, out);
                    } else if !name.is_empty() {
                        self.notice = Some(format!(
                            "{name:?} is not a user name (3 to 32 of a-z, 0-9, _ and .) or a group (# and its 32-digit id)"
                        ));
                    }
                }
                Key::Esc => {}
                _ => {
                    edit_line(&mut name, key);
                    self.modal = Some(Modal::NewChat(name));
                }
            },
            Modal::Forward(id, mut name) => match key {
                Key::Enter => {
                    let to = name.trim().to_owned();
                    if crate::wire::valid_user_name(&to) || crate::wire::GroupId::parse_tag(&to).is_some() {
                        out.push(Action::Forward { id, to });
                    }
                }
                Key::Esc => {}
                _ => {
                    edit_line(&mut name, key);
                    self.modal = Some(Modal::Forward(id, name));
                }
            },
            Modal::React(id, mut emoji) => match key {
                Key::Char(c @ '1'..='6') if emoji.is_empty() => {
                    let pick = QUICK_REACTIONS[(c as u8 - b'1') as usize];
                    out.push(Action::React {
                        id,
                        emoji: Some(pick.to_owned()),
                    });
                }
                Key::Enter if !emoji.is_empty() => out.push(Action::React { id, emoji: Some(emoji) }),
                Key::Esc => {}
                _ => {
                    edit_line(&mut emoji, key);
                    self.modal = Some(Modal::React(id, emoji));
                }
            },
        }
    }
}

fn edit_line(line: &mut String, key: Key) {
    match key {
        Key::Char(c) => line.push(c),
        Key::Backspace => {
            line.pop();
        }
        _ => {}
    }
}

/// Every key, as the help window lists it.
pub const HELP: &[(&str, &str)] = &[
    ("Tab", "move between the chats, the compose line and the messages"),
    ("Ctrl-N / n", "start a conversation with a user"),
    ("↑ ↓ / k j", "move in the list or among the messages"),
    ("Enter", "open the chat (list); send (compose); reply (message)"),
    ("Alt-Enter / Ctrl-J", "a new line in the message"),
    ("↑ (empty compose)", "select the last message"),
    ("r", "reply to the selected message"),
    ("e", "edit your selected message (15 minutes)"),
    ("d", "delete your selected message for everyone (2 days)"),
    ("f", "forward the selected message"),
    ("a / +", "react (1-6 quick picks, or type an emoji)"),
    ("-", "take your reaction back"),
    ("i", "what became of the selected message"),
    ("s", "save the selected message's file (downloads folder)"),
    ("Esc", "cancel; back to the compose line or the list"),
    ("? / F1", "this help"),
    ("q / Ctrl-C", "quit"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Direction, Message};
    use crate::wire::DeviceId;

    fn conv(peer: &str, unread: usize) -> Conversation {
        Conversation {
            peer: peer.into(),
            last: Message::default(),
            unread,
        }
    }

    fn msg(n: u8, from: &str, to: &str) -> Message {
        Message {
            id: MsgId([n; 16]),
            from: from.into(),
            from_device: DeviceId(1),
            to: to.into(),
            text: format!("m{n}"),
            direction: if from == "alice" { Direction::Out } else { Direction::In },
            status: if from == "alice" {
                Status::Sent
            } else {
                Status::Received
            },
            ..Message::default()
        }
    }

    fn typed(app: &mut App, text: &str) -> Vec<Action> {
        text.chars().flat_map(|c| app.key(Key::Char(c))).collect()
    }

    #[test]
    fn open_write_send_reply_edit_and_react() {
        let mut app = App::new("alice");
        app.set_conversations(vec![conv("bob", 1), conv("carol", 0)]);
        app.key(Key::Down);
        assert_eq!(app.key(Key::Enter), vec![Action::Open("carol".into())]);
        assert_eq!(app.focus, Focus::Compose);
        typed(&mut app, "hi");
        app.key(Key::Newline);
        typed(&mut app, "there");
        assert_eq!(
            app.key(Key::Enter),
            vec![Action::Send {
                to: "carol".into(),
                text: "hi\nthere".into(),
                reply_to: None
            }]
        );
        assert!(app.compose.is_empty());
        assert!(app.key(Key::Enter).is_empty(), "nothing to send");
        app.set_messages(vec![msg(1, "carol", "alice"), msg(2, "alice", "carol")]);
        // Up on an empty line selects the last message; r replies to the
        // one above it.
        app.key(Key::Up);
        app.key(Key::Up);
        assert_eq!(app.current().map(|m| m.id), Some(MsgId([1; 16])));
        app.key(Key::Char('r'));
        assert!(matches!(app.draft, Draft::Reply { id, .. } if id == MsgId([1; 16])));
        typed(&mut app, "yes");
        assert_eq!(
            app.key(Key::Enter),
            vec![Action::Send {
                to: "carol".into(),
                text: "yes".into(),
                reply_to: Some(MsgId([1; 16]))
            }]
        );
        // Edit is for one's own messages.
        app.key(Key::Up);
        app.key(Key::Up);
        app.key(Key::Char('e'));
        assert_eq!(app.draft, Draft::New, "not alice's");
        app.key(Key::Down);
        app.key(Key::Char('e'));
        assert_eq!(
            (app.draft.clone(), app.compose.as_str()),
            (Draft::Edit(MsgId([2; 16])), "m2")
        );
        typed(&mut app, "!");
        assert_eq!(
            app.key(Key::Enter),
            vec![Action::Edit {
                id: MsgId([2; 16]),
                text: "m2!".into()
            }]
        );
        // React with a quick pick; delete asks first.
        app.key(Key::Up);
        app.key(Key::Char('a'));
        assert_eq!(
            app.key(Key::Char('1')),
            vec![Action::React {
                id: MsgId([2; 16]),
                emoji: Some("👍".into())
            }]
        );
        assert_eq!(app.focus, Focus::Compose, "back to writing after a reaction");
        app.key(Key::Up);
        app.key(Key::Char('d'));
        assert_eq!(app.modal, Some(Modal::ConfirmDelete(MsgId([2; 16]))));
        assert!(app.key(Key::Char('n')).is_empty());
        assert_eq!(app.focus, Focus::Messages, "no: still on the message");
        app.key(Key::Char('d'));
        assert_eq!(app.key(Key::Char('y')), vec![Action::Delete(MsgId([2; 16]))]);
    }

    #[test]
    fn writing_in_the_open_chat_says_typing_and_clearing_says_stopped() {
        let mut app = App::new("alice");
        app.set_conversations(vec![conv("bob", 0)]);
        app.key(Key::Enter);
        let typing = |active| Action::Typing {
            to: "bob".into(),
            active,
        };
        assert_eq!(app.key(Key::Char('h')), vec![typing(true)]);
        assert_eq!(app.key(Key::Char('i')), vec![typing(true)]);
        assert_eq!(app.key(Key::Backspace), vec![typing(true)]);
        assert_eq!(app.key(Key::Backspace), vec![typing(false)]);
        assert!(app.key(Key::Backspace).is_empty(), "nothing to say");
        app.key(Key::Char(' '));
        assert!(app.key(Key::Char(' ')).is_empty(), "blanks are not writing");
        app.key(Key::Char('x'));
        assert_eq!(app.key(Key::Esc), vec![typing(false)]);
        // Sending says nothing more (the message ends it over there); an
        // edit is not typing.
        typed(&mut app, "yo");
        assert!(matches!(&app.key(Key::Enter)[..], [Action::Send { .. }]));
        app.set_messages(vec![msg(1, "alice", "bob")]);
        app.key(Key::Up);
        app.key(Key::Char('e'));
        assert!(app.key(Key::Char('!')).is_empty());
        // Indicators run out.
        app.typing.insert("bob".into(), 1_000);
        assert!(app.is_typing("bob", 999));
        assert!(!app.expire_typing(999));
        assert!(app.expire_typing(1_000));
        assert!(!app.is_typing("bob", 999));
    }

    #[test]
    fn new_chat_by_name_help_and_quit() {
        let mut app = App::new("alice");
        app.key(Key::Ctrl('n'));
        typed(&mut app, "Not Valid");
        assert!(app.key(Key::Enter).is_empty());
        assert!(app.notice.is_some());
        app.key(Key::Char('n'));
        typed(&mut app, "dave");
        assert_eq!(app.key(Key::Enter), vec![Action::Open("dave".into())]);
        assert_eq!(app.open.as_deref(), Some("dave"));
        // ? is text in the compose line; F1 is help anywhere.
        app.key(Key::Char('?'));
        assert_eq!(app.compose, "?");
        app.key(Key::F1);
        assert_eq!(app.modal, Some(Modal::Help));
        app.key(Key::Esc);
        assert_eq!(app.modal, None);
        assert_eq!(app.key(Key::Ctrl('c')), vec![Action::Quit]);
        assert!(app.quit);
    }
}
