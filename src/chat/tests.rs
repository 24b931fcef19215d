//! The chat screen drawn on ratatui's `TestBackend` for the states that
//! matter: an empty profile, a conversation with every kind of message and
//! tick, the other side typing (and its presence), a reply being composed,
//! the help window, a narrow terminal, and the daemon away.

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::style::Color;

use super::app::{App, Focus, Key, Link};
use super::ui;
use crate::client::{Conversation, Direction, Message, Quote, Status};
use crate::wire::{DeviceId, MsgId, Seen};

const T0: u64 = 1_800_000_000_000; // 2027-01-15 08:00 UTC

fn screen(app: &App, w: u16, h: u16) -> (String, ratatui::buffer::Buffer) {
    screen_at(app, w, h, T0)
}

fn screen_at(app: &App, w: u16, h: u16, now_ms: u64) -> (String, ratatui::buffer::Buffer) {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::draw(f, app, now_ms)).unwrap();
    let buf = t.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..h {
        let mut line = String::new();
        for x in 0..w {
            line.push_str(buf[(x, y)].symbol());
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    (text, buf)
}

fn msg(n: u8, from: &str, text: &str, status: Status) -> Message {
    let out = from == "alice";
    Message {
        id: MsgId([n; 16]),
        from: from.into(),
        from_device: DeviceId(1),
        to: if out { "bob".into() } else { "alice".into() },
        text: text.into(),
        ts_ms: T0 + u64::from(n) * 60_000,
        direction: if out { Direction::Out } else { Direction::In },
        status,
        ..Message::default()
    }
}

fn every_kind() -> Vec<Message> {
    let mut reply = msg(2, "alice", "yes, at noon", Status::Read);
    reply.reply_to = Some(MsgId([1; 16]));
    reply.quote = Some(Quote {
        from: "bob".into(),
        text: Some("lunch?".into()),
    });
    let mut fwd = msg(3, "bob", "a joke", Status::Received);
    fwd.forwards = 1;
    let mut edited = msg(4, "alice", "see you there", Status::Delivered);
    edited.edited_ms = Some(T0);
    let mut deleted = msg(5, "bob", "", Status::Received);
    deleted.deleted = true;
    let mut reacted = msg(6, "alice", "on my way", Status::Sent);
    reacted.reactions.insert("bob".into(), "👍".into());
    let pending = msg(7, "alice", "still here?", Status::Pending);
    let mut garbage = msg(8, "bob", "", Status::Received);
    garbage.undecryptable = true;
    garbage.repeats = 2;
    vec![
        msg(1, "bob", "lunch?", Status::Received),
        reply,
        fwd,
        edited,
        deleted,
        reacted,
        pending,
        garbage,
    ]
}

fn with_bob() -> App {
    let mut app = App::new("alice");
    app.link = Link::Connected;
    let messages = every_kind();
    app.set_conversations(vec![
        Conversation {
            peer: "bob".into(),
            last: messages.last().unwrap().clone(),
            unread: 2,
        },
        Conversation {
            peer: "carol".into(),
            last: msg(9, "alice", "hello carol", Status::Sent),
            unread: 0,
        },
    ]);
    app.key(Key::Enter);
    app.set_messages(messages);
    app
}

#[test]
fn an_empty_profile_says_how_to_start() {
    let app = App::new("alice");
    let (text, _) = screen(&app, 80, 24);
    assert!(text.contains("No chats yet."), "{text}");
    assert!(text.contains("Ctrl-N"), "{text}");
    assert!(text.contains("connecting…"), "{text}");
    assert!(text.contains("? help"), "{text}");
}

#[test]
fn a_conversation_shows_every_kind_of_message_and_tick_in_80x24() {
    let app = with_bob();
    let (text, buf) = screen(&app, 80, 24);
    println!("{text}");
    for want in [
        "Chats",
        "bob (2)",
        "carol",
        "you: hello carol",
        " bob ",
        "┃ bob: lunch?",
        "yes, at noon",
        "forwarded",
        "edited",
        "(deleted)",
        "◷",
        "(3 messages that could not be decrypted",
        "Message to bob",
        "connected as alice",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    // A wide emoji takes two cells.
    assert!(text.lines().any(|l| l.contains("👍") && l.contains("bob")), "{text}");
    // Sent ✓, delivered ✓✓ grey, read ✓✓ blue.
    let ticks: Vec<(String, Option<Color>)> = (0..24)
        .flat_map(|y| (0..80).map(move |x| (x, y)))
        .filter(|p| buf[*p].symbol() == "✓")
        .map(|p| (buf[p].symbol().to_owned(), buf[p].style().fg))
        .collect();
    assert!(
        ticks.iter().any(|(_, c)| *c == Some(Color::Blue)),
        "a read tick: {ticks:?}"
    );
    assert!(
        ticks.iter().any(|(_, c)| *c == Some(Color::DarkGray)),
        "a grey tick: {ticks:?}"
    );
}

#[test]
fn a_reply_being_composed_shows_what_it_quotes() {
    let mut app = with_bob();
    app.key(Key::Up); // the last message
    for _ in 0..7 {
        app.key(Key::Up);
    }
    app.key(Key::Char('r'));
    for c in "sure".chars() {
        app.key(Key::Char(c));
    }
    assert_eq!(app.focus, Focus::Compose);
    let (text, _) = screen(&app, 80, 24);
    assert!(text.contains(" Reply "), "{text}");
    assert!(text.contains("┃ bob: lunch?"), "{text}");
    assert!(text.contains("sure▏"), "{text}");
}

#[test]
fn the_help_window_lists_every_key() {
    let mut app = with_bob();
    app.key(Key::F1);
    let (text, _) = screen(&app, 80, 24);
    println!("{text}");
    for (key, _) in super::app::HELP {
        assert!(text.contains(key), "{key:?} missing:\n{text}");
    }
    app.key(Key::Char('x'));
    assert!(app.modal.is_none(), "any key closes it");
}

#[test]
fn a_narrow_terminal_shows_one_pane_and_the_daemon_away() {
    let mut app = with_bob();
    app.link = Link::Offline("the server closed the connection; reconnecting in 4s".into());
    let (text, _) = screen(&app, 40, 12);
    println!("{text}");
    assert!(!text.contains("Chats"), "the conversation alone:\n{text}");
    assert!(text.contains("Message to bob"), "{text}");
    assert!(text.contains("offline:"), "{text}");
    app.key(Key::Esc);
    app.key(Key::Esc);
    assert_eq!(app.focus, Focus::List);
    let (text, _) = screen(&app, 40, 12);
    assert!(text.contains("Chats") && text.contains("bob (2)"), "{text}");
    // Every size draws, however small.
    for (w, h) in [(1, 1), (10, 3), (20, 5), (59, 24), (60, 24), (200, 60)] {
        screen(&app, w, h);
        screen(&with_bob(), w, h);
    }
}

#[test]
fn the_other_side_typing_shows_in_the_header_and_the_list_and_runs_out() {
    let mut app = with_bob();
    app.presence.insert(
        "bob".into(),
        Seen::Online {
            devices: vec![DeviceId(1)],
        },
    );
    let (text, buf) = screen(&app, 80, 24);
    assert!(text.contains(" bob · online "), "{text}");
    assert!(text.contains("bob (2) ●"), "{text}");
    let dot = (0..20).find(|x| buf[(*x, 1)].symbol() == "●").expect("a dot");
    assert_eq!(buf[(dot, 1)].style().fg, Some(Color::Green));
    // Bob types: his indicator shows for six seconds.
    app.typing.insert("bob".into(), T0 + 6_000);
    let (text, _) = screen(&app, 80, 24);
    println!("{text}");
    assert!(text.contains(" bob · typing… "), "{text}");
    assert!(text.contains("bob (2) ● typing…"), "{text}");
    let (text, _) = screen(&app, 40, 12);
    assert!(text.contains(" bob · typing… "), "narrow: {text}");
    let (text, _) = screen_at(&app, 80, 24, T0 + 6_000);
    assert!(!text.contains("typing"), "run out: {text}");
    assert!(text.contains(" bob · online "), "{text}");
    // Away: when last seen; hidden: nothing.
    app.typing.clear();
    app.presence.insert(
        "bob".into(),
        Seen::Away {
            last_seen_ms: T0 - 5 * 60_000,
        },
    );
    let (text, _) = screen(&app, 80, 24);
    assert!(text.contains(" bob · last seen 07:55 "), "{text}");
    assert!(!text.contains('●'), "{text}");
    app.presence.insert(
        "bob".into(),
        Seen::Away {
            last_seen_ms: T0 - 3 * 86_400_000,
        },
    );
    let (text, _) = screen(&app, 80, 24);
    assert!(text.contains(" bob · last seen 2027-01-12 "), "{text}");
    app.presence.insert("bob".into(), Seen::Hidden);
    let (text, _) = screen(&app, 80, 24);
    assert!(text.contains("┌ bob ──"), "{text}");
    assert!(!text.contains(" bob · "), "{text}");
}

fn file_msg(n: u8, from: &str, name: &str, caption: &str) -> Message {
    use crate::client::attachment::{Attachment, FileKey, FileRef};
    let mut m = msg(n, from, caption, Status::Received);
    m.attachment = Some(Box::new(Attachment {
        file: FileRef {
            blob: crate::wire::BlobId([n; 32]),
            key: FileKey([n; 32]),
            size: 5_242_880,
            sha256: [n; 32],
            media_type: "image/jpeg".into(),
            name: name.into(),
            thumbnail: None,
        },
        path: None,
        expired: false,
        uploaded: false,
    }));
    m
}

#[test]
fn files_show_as_a_line_and_s_saves_the_selected_one() {
    use super::app::Action;
    let mut app = App::new("alice");
    app.link = Link::Connected;
    let mut saved = file_msg(2, "bob", "beach.jpg", "");
    if let Some(a) = saved.attachment.as_mut() {
        a.path = Some("/home/alice/downloads/beach.jpg".into());
    }
    let mut expired = file_msg(3, "bob", "old.pdf", "");
    if let Some(a) = expired.attachment.as_mut() {
        a.expired = true;
    }
    let messages = vec![
        file_msg(1, "bob", "photo.jpg", "look at this"),
        saved,
        expired,
        msg(4, "bob", "plain text", Status::Received),
    ];
    app.set_conversations(vec![Conversation {
        peer: "bob".into(),
        last: messages[0].clone(),
        unread: 0,
    }]);
    app.key(Key::Enter);
    app.set_messages(messages);
    let (text, _) = screen(&app, 100, 30);
    for want in [
        "[file photo.jpg 5242880] (s: save)",
        "look at this",
        "[file beach.jpg 5242880] saved: /home/alice/downloads/beach.jpg",
        "[file old.pdf 5242880] expired on the server",
        " [file photo.jpg] loo",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    // Select the last message, go up to each file: `s` saves only one
    // the server still has.
    app.focus = Focus::Compose;
    app.key(Key::Up);
    assert!(app.key(Key::Char('s')).is_empty(), "a text has no file");
    app.key(Key::Up);
    assert!(app.key(Key::Char('s')).is_empty(), "expired");
    app.key(Key::Up);
    app.key(Key::Up);
    assert_eq!(app.key(Key::Char('s')), vec![Action::Download(MsgId([1; 16]))]);
}
