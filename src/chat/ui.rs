//! Drawing the chat screen from its state (pure: a function of [`App`] and
//! the time, tested on ratatui's `TestBackend`).
//!
//! Wide terminals show the chats on the left and the open conversation on
//! the right; below 60 columns only one of them shows (the list until a
//! chat is open). The status line at the bottom says whether the client is
//! connected, and how to get help.

use std::time::{Duration, UNIX_EPOCH};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph, Wrap};

use super::app::{App, Draft, Focus, HELP, Link, Modal, QUICK_REACTIONS};
use crate::client::{Direction, Message, Status};
use crate::wire::Seen;

/// Below this width, one pane at a time.
pub const NARROW: u16 = 60;

/// `HH:MM` (UTC) of a time in ms since the epoch.
pub fn clock(ms: u64) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
    t.get(11..16).unwrap_or("--:--").to_owned()
}

/// What a chat's header says of its user's presence, if anything:
/// "online", or "last seen" and a time (the date when not within a day).
pub fn presence_text(seen: &Seen, now_ms: u64) -> Option<String> {
    match seen {
        Seen::Online { .. } => Some("online".into()),
        Seen::Away { last_seen_ms: 0 } | Seen::Hidden => None,
        Seen::Away { last_seen_ms } => {
            if now_ms.saturating_sub(*last_seen_ms) < 24 * 3600 * 1000 {
                Some(format!("last seen {}", clock(*last_seen_ms)))
            } else {
                let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(*last_seen_ms));
                Some(format!("last seen {}", t.to_string().get(..10).unwrap_or("long ago")))
            }
        }
    }
}

/// The tick of one of the user's messages.
pub fn tick(status: Status) -> Span<'static> {
    match status {
        Status::Pending => Span::styled("◷", Style::default().fg(Color::DarkGray)),
        Status::Sent => Span::styled("✓", Style::default().fg(Color::DarkGray)),
        Status::Delivered => Span::styled("✓✓", Style::default().fg(Color::DarkGray)),
        Status::Read => Span::styled("✓✓", Style::default().fg(Color::Blue).add_modifier(Modifier::BOLD)),
        Status::Received => Span::raw(""),
    }
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn preview(m: &Message) -> String {
    if m.deleted {
        "(deleted)".into()
    } else if m.undecryptable {
        "(undecryptable)".into()
    } else if let Some(a) = &m.attachment {
        let mut p = format!("[file {}]", one_line(&a.file.name));
        if !m.text.is_empty() {
            p.push(' ');
            p.push_str(&one_line(&m.text));
        }
        p
    } else {
        one_line(&m.text)
    }
}

/// The line of a message's file: `[file NAME SIZE]` (SIZE in bytes, as
/// `history` shows it), and where it is saved, or that it can be saved
/// with `s`, or that it expired on the server.
pub fn file_line(a: &crate::client::attachment::Attachment) -> String {
    let state = match (&a.path, a.expired) {
        (Some(p), _) => format!(" saved: {}", one_line(p)),
        (None, true) => " expired on the server".to_owned(),
        (None, false) => " (s: save)".to_owned(),
    };
    format!("  [file {} {}]{state}", one_line(&a.file.name), a.file.size)
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame, app: &App, now_ms: u64) {
    let area = f.area();
    let [main, status] = Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(area);
    let narrow = area.width < NARROW;
    if narrow {
        if app.open.is_some() && app.focus != Focus::List {
            draw_chat(f, app, main, now_ms);
        } else {
            draw_list(f, app, main, now_ms);
        }
    } else {
        let list_width = (area.width / 4).clamp(18, 30);
        let [left, right] = Layout::horizontal([Constraint::Length(list_width), Constraint::Min(20)]).areas(main);
        draw_list(f, app, left, now_ms);
        draw_chat(f, app, right, now_ms);
    }
    draw_status(f, app, status);
    if let Some(modal) = &app.modal {
        draw_modal(f, modal, area);
    }
}

fn focused_block(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::default().fg(Color::Cyan)
    } else {
        Style::default()
    };
    Block::default().borders(Borders::ALL).border_style(style).title(title)
}

fn draw_list(f: &mut Frame, app: &App, area: Rect, now_ms: u64) {
    let block = focused_block(" Chats ".into(), app.focus == Focus::List);
    if app.conversations.is_empty() {
        let text = Text::from(vec![
            Line::from("No chats yet."),
            Line::from(""),
            Line::from("Ctrl-N to write"),
            Line::from("to someone."),
        ]);
        f.render_widget(Paragraph::new(text).block(block).wrap(Wrap { trim: true }), area);
        return;
    }
    let width = area.width.saturating_sub(4) as usize;
    let items: Vec<ListItem> = app
        .conversations
        .iter()
        .map(|c| {
            let mut head = vec![Span::styled(
                c.peer.clone(),
                Style::default().add_modifier(Modifier::BOLD),
            )];
            if c.unread > 0 {
                head.push(Span::raw(" "));
                head.push(Span::styled(
                    format!("({})", c.unread),
                    Style::default().fg(Color::Green).add_modifier(Modifier::BOLD),
                ));
            }
            if matches!(app.presence.get(&c.peer), Some(Seen::Online { .. })) {
                head.push(Span::styled(" ●", Style::default().fg(Color::Green)));
            }
            if app.is_typing(&c.peer, now_ms) {
                head.push(Span::styled(" typing…", Style::default().fg(Color::Green)));
            }
            let mine = if c.last.direction == Direction::Out {
                "you: "
            } else {
                ""
            };
            let mut p: String = format!("{mine}{}", preview(&c.last));
            if p.chars().count() > width {
                p = p.chars().take(width.saturating_sub(1)).collect::<String>() + "…";
            }
            ListItem::new(vec![
                Line::from(head),
                Line::styled(p, Style::default().fg(Color::DarkGray)),
            ])
        })
        .collect();
    let mut state = ListState::default().with_selected(Some(app.selected));
    let list = List::new(items)
        .block(block)
        .highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol(">");
    f.render_stateful_widget(list, area, &mut state);
}

/// The lines of one message: header (time, sender, tick), what it quotes
/// or that it was forwarded, its text, and its reactions.
fn message_lines(app: &App, m: &Message, selected: bool) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let who = if m.from == app.me {
        "you".to_owned()
    } else {
        m.from.clone()
    };
    let mut head = vec![
        Span::styled(clock(m.ts_ms), Style::default().fg(Color::DarkGray)),
        Span::raw(" "),
        Span::styled(
            who,
            Style::default()
                .fg(if m.from == app.me { Color::Cyan } else { Color::Magenta })
                .add_modifier(Modifier::BOLD),
        ),
    ];
    if m.direction == Direction::Out {
        head.push(Span::raw(" "));
        head.push(tick(m.status));
    }
    if m.forwarded_many_times() {
        head.push(Span::styled(
            " forwarded many times",
            Style::default().fg(Color::DarkGray),
        ));
    } else if m.forwarded() {
        head.push(Span::styled(" forwarded", Style::default().fg(Color::DarkGray)));
    }
    if m.edited() && !m.deleted {
        head.push(Span::styled(" edited", Style::default().fg(Color::DarkGray)));
    }
    lines.push(Line::from(head));
    if let Some(q) = &m.quote {
        let quoted = match &q.text {
            Some(t) => one_line(t),
            None => "(deleted message)".into(),
        };
        lines.push(Line::styled(
            format!("  ┃ {}: {quoted}", q.from),
            Style::default().fg(Color::DarkGray),
        ));
    }
    if m.deleted {
        lines.push(Line::styled(
            "  (deleted)",
            Style::default().fg(Color::DarkGray).add_modifier(Modifier::ITALIC),
        ));
    } else if m.undecryptable {
        let n = u64::from(m.repeats) + 1;
        let text = if n > 1 {
            format!("  ({n} messages that could not be decrypted; asked for a new session)")
        } else {
            "  (a message that could not be decrypted; asked for a new session)".to_owned()
        };
        lines.push(Line::styled(text, Style::default().fg(Color::Red)));
    } else {
        if let Some(a) = &m.attachment {
            lines.push(Line::styled(file_line(a), Style::default().fg(Color::Green)));
        }
        if m.attachment.is_none() || !m.text.is_empty() {
            for l in m.text.split('\n') {
                lines.push(Line::from(format!("  {}", one_line(l))));
            }
        }
    }
    if !m.reactions.is_empty() {
        let r: Vec<String> = m
            .reactions
            .iter()
            .map(|(u, e)| format!("{e} {}", if *u == app.me { "you" } else { u }))
            .collect();
        lines.push(Line::styled(
            format!("  {}", r.join("  ")),
            Style::default().fg(Color::Yellow),
        ));
    }
    if selected {
        for l in &mut lines {
            *l = l.clone().patch_style(Style::default().add_modifier(Modifier::REVERSED));
        }
    }
    lines
}

fn draw_chat(f: &mut Frame, app: &App, area: Rect, now_ms: u64) {
    let Some(peer) = &app.open else {
        let block = Block::default().borders(Borders::ALL).title(" tidings ");
        let text = Text::from(vec![
            Line::from(""),
            Line::from("  Pick a chat on the left (Enter), or Ctrl-N to start one."),
            Line::from("  ? or F1 shows every key."),
        ]);
        f.render_widget(Paragraph::new(text).block(block).wrap(Wrap { trim: false }), area);
        return;
    };
    let compose_lines = app.compose.split('\n').count().clamp(1, 4) as u16;
    let draft_line = u16::from(app.draft != Draft::New);
    let [log, compose] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(compose_lines + draft_line + 2)]).areas(area);
    // The conversation: newest at the bottom, scrolled to show the
    // selected message (or the end).
    // Who it is, and whether they are typing, online or when last seen.
    let mut title = format!(" {peer} ");
    if app.is_typing(peer, now_ms) {
        title.push_str("· typing… ");
    } else if let Some(p) = app.presence.get(peer).and_then(|s| presence_text(s, now_ms)) {
        title.push_str(&format!("· {p} "));
    }
    let block = focused_block(title, app.focus == Focus::Messages);
    let inner_width = log.width.saturating_sub(2).max(1) as usize;
    let mut lines: Vec<Line> = Vec::new();
    let mut selected_end = 0usize;
    for (i, m) in app.messages.iter().enumerate() {
        let selected = app.cursor == Some(i) && app.focus == Focus::Messages;
        lines.extend(message_lines(app, m, selected));
        if selected {
            selected_end = lines.len();
        }
    }
    if app.messages.is_empty() {
        lines.push(Line::styled(
            "  No messages yet: write the first one below.",
            Style::default().fg(Color::DarkGray),
        ));
    }
    // Rows each line takes once wrapped.
    let rows = |l: &Line| l.width().max(1).div_ceil(inner_width);
    let height = log.height.saturating_sub(2) as usize;
    let total: usize = lines.iter().map(rows).sum();
    let end = if selected_end > 0 {
        lines[..selected_end].iter().map(rows).sum::<usize>()
    } else {
        total
    };
    let scroll = end.saturating_sub(height);
    f.render_widget(
        Paragraph::new(Text::from(lines))
            .block(block)
            .wrap(Wrap { trim: false })
            .scroll((scroll.min(u16::MAX as usize) as u16, 0)),
        log,
    );
    // The compose line.
    let title = match &app.draft {
        Draft::New => format!(" Message to {peer} "),
        Draft::Reply { .. } => " Reply ".to_owned(),
        Draft::Edit(_) => " Edit ".to_owned(),
    };
    let mut text: Vec<Line> = Vec::new();
    if let Draft::Reply { from, text: quoted, .. } = &app.draft {
        text.push(Line::styled(
            format!("┃ {from}: {}", one_line(quoted)),
            Style::default().fg(Color::DarkGray),
        ));
    }
    if let Draft::Edit(_) = &app.draft {
        text.push(Line::styled(
            "editing your message (Esc cancels)",
            Style::default().fg(Color::DarkGray),
        ));
    }
    let parts: Vec<&str> = app.compose.split('\n').collect();
    let shown = parts.len().saturating_sub(4);
    for (i, part) in parts[shown..].iter().enumerate() {
        let cursor = app.focus == Focus::Compose && i + shown + 1 == parts.len();
        let mut spans = vec![Span::raw(part.to_string())];
        if cursor {
            spans.push(Span::styled("▏", Style::default().fg(Color::Cyan)));
        }
        text.push(Line::from(spans));
    }
    f.render_widget(
        Paragraph::new(Text::from(text)).block(focused_block(title, app.focus == Focus::Compose)),
        compose,
    );
}

fn draw_status(f: &mut Frame, app: &App, area: Rect) {
    let (text, color) = match &app.link {
        Link::Connecting => ("connecting…".to_owned(), Color::Yellow),
        Link::Connected => (format!("connected as {}", app.me), Color::Green),
        Link::Offline(why) => (format!("offline: {why}"), Color::Yellow),
        Link::Stopped(why) => (format!("stopped: {why}"), Color::Red),
    };
    let mut spans = vec![Span::styled(text, Style::default().fg(color))];
    if let Some(n) = &app.notice {
        spans.push(Span::raw(" · "));
        spans.push(Span::raw(one_line(n)));
    }
    spans.push(Span::styled(" · ? help", Style::default().fg(Color::DarkGray)));
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn draw_modal(f: &mut Frame, modal: &Modal, area: Rect) {
    let (title, lines): (&str, Vec<Line>) = match modal {
        Modal::Help => (
            " Keys (any key closes) ",
            HELP.iter()
                .map(|(k, what)| {
                    Line::from(vec![
                        Span::styled(format!("{k:<19}"), Style::default().fg(Color::Cyan)),
                        Span::raw(*what),
                    ])
                })
                .collect(),
        ),
        Modal::NewChat(name) => (
            " New chat ",
            vec![Line::from("Write to (user name):"), Line::from(format!("{name}▏"))],
        ),
        Modal::Forward(_, name) => (
            " Forward ",
            vec![Line::from("Forward to (user name):"), Line::from(format!("{name}▏"))],
        ),
        Modal::React(_, emoji) => (
            " React ",
            vec![
                Line::from(
                    QUICK_REACTIONS
                        .iter()
                        .enumerate()
                        .map(|(i, e)| format!("{} {e}  ", i + 1))
                        .collect::<String>(),
                ),
                Line::from(format!("or type one and Enter: {emoji}▏")),
            ],
        ),
        Modal::ConfirmDelete(_) => (" Delete ", vec![Line::from("Delete this message for everyone? y / n")]),
        Modal::Info(text) => (
            " Info (any key closes) ",
            text.iter().map(|l| Line::from(l.clone())).collect(),
        ),
    };
    let width = lines.iter().map(Line::width).max().unwrap_or(20).max(title.len()) as u16 + 4;
    let rect = centered(area, width, lines.len() as u16 + 2);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(Text::from(lines))
            .block(Block::default().borders(Borders::ALL).title(title))
            .wrap(Wrap { trim: false }),
        rect,
    );
}
