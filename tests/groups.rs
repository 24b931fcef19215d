//! Groups and blocking through the real `tidingsd` and the real client
//! (spec §5.8, §14.9): one ciphertext per group message, fanned out by the
//! server and stored once; Megolm keys that open what comes after they
//! were shared and nothing before, rotated when a member goes; receipts
//! from every member; delete for everyone; blocks that the blocked user
//! cannot see.

mod common;

use std::path::Path;

use common::Daemon;
use common::cli::{json_lines, stdout, tidings};
use common::profiles::{messages, open, open_receiving, sync, texts};
use tidings::client::{Event, Message, Status};
use tidings::ids::DeviceKey;
use tidings::store::{Entry, StoreApi};
use tidings::wire::{DeviceAddr, DeviceId, GroupId, MsgId};

fn addr(user: &str, device: u32) -> DeviceAddr {
    DeviceAddr {
        user: user.into(),
        device: DeviceId(device),
    }
}

/// The group messages in a device's history, oldest first.
fn group_history(dir: &Path, g: GroupId) -> Vec<Message> {
    open(dir).history(&g.tag()).unwrap_or_default()
}

/// The body of the group message `id` waiting in `user`'s device
/// `device`'s queue on the server (the store read with the daemon down).
fn queued_body(d: &mut Daemon, user: &str, device: u32, id: MsgId) -> Option<bytes::Bytes> {
    d.with_store_stopped(|s| {
        let u = s.user_id(user).unwrap();
        let mut out = Vec::new();
        s.read_queue(
            DeviceKey {
                user: u,
                device: DeviceId(device),
            },
            0,
            10_000,
            &mut out,
        )
        .unwrap();
        out.into_iter().find_map(|(_, e)| match e {
            Entry::Group(m) if m.id == id => Some(m.body),
            _ => None,
        })
    })
}

#[test]
fn four_users_one_with_two_devices_share_a_group_end_to_end() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-phone");
    let carol = d.user("carol");
    let dave = d.user("dave");

    // alice makes the group; every member device learns its title, end to
    // end.
    let g = open(&alice)
        .group_create("Family", &["bob".into(), "carol".into()])
        .unwrap();
    assert_eq!(g.members.len(), 3);
    assert!(g.is_admin("alice") && !g.is_admin("bob"));
    for p in [&bob, &bob2, &carol] {
        let events = sync(p);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::GroupTitle { title, by, .. } if title == "Family" && by == "alice")),
            "{}: {events:?}",
            p.display()
        );
        let local = open(p).profile().history().group(g.id).unwrap().unwrap();
        assert_eq!(local.title, "Family");
    }
    assert!(open(&dave).profile().history().group(g.id).unwrap().is_none());

    // Messages from three members, the two-device member writing from
    // both; every member device gets every other device's messages once,
    // each sender's in order.
    let tag = g.id.tag();
    let script: [(&Path, &str); 6] = [
        (&alice, "a: one"),
        (&bob2, "b2: from my phone"),
        (&carol, "c: hello"),
        (&alice, "a: two"),
        (&bob, "b1: from my desk"),
        (&alice, "a: three"),
    ];
    for (i, (from, text)) in script.iter().enumerate() {
        let m = open(from).send(&tag, text).unwrap();
        assert_eq!((m.status, m.to.as_str()), (Status::Sent, tag.as_str()));
        if i == 2 {
            for p in [&alice, &bob, &bob2, &carol] {
                sync(p);
            }
        }
    }
    for p in [&alice, &bob, &bob2, &carol] {
        sync(p);
    }
    for p in [&alice, &bob, &bob2, &carol] {
        let h = group_history(p, g.id);
        assert!(h.iter().all(|m| !m.undecryptable), "{}: {h:?}", p.display());
        assert_eq!(h.len(), script.len(), "each once on {}: {:?}", p.display(), texts(&h));
        for sender in ["a:", "b2:", "c:", "b1:"] {
            let got: Vec<&str> = texts(&h).into_iter().filter(|t| t.starts_with(sender)).collect();
            let want: Vec<&str> = script
                .iter()
                .map(|(_, t)| *t)
                .filter(|t| t.starts_with(sender))
                .collect();
            assert_eq!(got, want, "{}", p.display());
        }
        assert!(h.iter().all(|m| m.group() == Some(g.id)));
    }

    // The server stores a group message's body once, however many member
    // devices it waits for.
    let (base, count) = d.with_store_stopped(|s| (s.queued_bytes(), s.queue_totals().0));
    let long = "x".repeat(3000);
    let m = open(&alice).send(&tag, &long).unwrap();
    let (now, count_now) = d.with_store_stopped(|s| (s.queued_bytes(), s.queue_totals().0));
    assert_eq!(count_now - count, 3, "a copy for bob's two devices and carol's");
    assert!(
        now - base < 2 * long.len() as u64,
        "{} bytes stored for three copies of a body of about {}",
        now - base,
        long.len()
    );
    for p in [&bob, &bob2, &carol] {
        let got = messages(&sync(p));
        assert_eq!(texts(&got), [long.as_str()], "{}", p.display());
        assert_eq!(got[0].id, m.id);
    }

    // carol is removed: her devices get nothing after, and hold no key that
    // opens the next message.
    let g2 = open(&alice).group_remove(g.id, &["carol".into()]).unwrap();
    assert!(!g2.has("carol"));
    let after = open(&alice).send(&tag, "after carol left").unwrap();
    let events = sync(&carol);
    assert!(messages(&events).is_empty(), "{events:?}");
    assert!(!open(&carol).profile().history().group(g.id).unwrap().unwrap().member);
    let body = queued_body(&mut d, "bob", 1, after.id).expect("bob's copy waits");
    let mut c = open(&carol);
    let opened = c
        .profile_mut()
        .crypto_mut()
        .group_decrypt(g.id, &addr("alice", 1), &body)
        .unwrap();
    assert!(opened.is_err(), "carol can still read the group: {opened:?}");
    drop(c);
    assert!(open(&carol).send(&tag, "still here?").is_err());

    // dave is added later: he gets the title and can read what comes now,
    // not what came before.
    open(&alice).group_add(g.id, &["dave".into()]).unwrap();
    let events = sync(&dave);
    assert!(messages(&events).is_empty(), "nothing from before: {events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::GroupTitle { title, .. } if title == "Family"))
    );
    let mut dv = open(&dave);
    let opened = dv
        .profile_mut()
        .crypto_mut()
        .group_decrypt(g.id, &addr("alice", 1), &body)
        .unwrap();
    assert!(opened.is_err(), "dave reads what came before him");
    drop(dv);
    open(&alice).send(&tag, "welcome dave").unwrap();
    assert_eq!(texts(&messages(&sync(&dave))), ["welcome dave"]);
    for p in [&alice, &bob, &bob2, &dave] {
        sync(p);
        open_receiving(p).read(&tag).unwrap();
    }

    // bob asks; each other member reads it; both of bob's devices see
    // every member's read receipt.
    let q = open(&bob).send(&tag, "who is coming?").unwrap();
    for p in [&alice, &dave] {
        sync(p);
        assert_eq!(open_receiving(p).read(&tag).unwrap(), 1, "{}", p.display());
    }
    for p in [&bob, &bob2] {
        sync(p);
        let m = group_history(p, g.id).into_iter().find(|m| m.id == q.id).unwrap();
        assert_eq!(m.status, Status::Read, "{}", p.display());
        let info = open(p).info(q.id).unwrap();
        let states: Vec<(String, String)> = info[0].2.iter().map(|s| (s.user.clone(), s.status.clone())).collect();
        assert_eq!(
            states,
            [("alice".into(), "read".into()), ("dave".into(), "read".into())],
            "{}",
            p.display()
        );
    }

    // Deleted for everyone: the copies still queued for offline members
    // go from the server.
    let oops = open(&alice).send(&tag, "oops").unwrap();
    assert!(queued_body(&mut d, "dave", 1, oops.id).is_some());
    open(&alice).delete(oops.id).unwrap();
    assert!(queued_body(&mut d, "dave", 1, oops.id).is_none(), "purged");
    assert!(queued_body(&mut d, "bob", 2, oops.id).is_none(), "purged");
    let h = {
        sync(&dave);
        group_history(&dave, g.id)
    };
    let deleted: Vec<&Message> = h.iter().filter(|m| m.id == oops.id).collect();
    assert!(
        deleted.iter().all(|m| m.deleted && m.text.is_empty()),
        "dave never sees the text: {deleted:?}"
    );
}

#[test]
fn a_device_linked_later_learns_the_title_and_reads_only_what_comes_after() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let _bob = d.user("bob");
    let g = open(&alice).group_create("Club", &["bob".into()]).unwrap();
    let tag = g.id.tag();
    open(&alice).send(&tag, "before").unwrap();
    let tablet = d.link(&alice, "alice-tablet");
    // alice's first device finds the new device when it next sends (the
    // server's device digest), shares its session and the title with it.
    open(&alice).send(&tag, "after").unwrap();
    let events = sync(&tablet);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::GroupTitle { title, .. } if title == "Club")),
        "{events:?}"
    );
    let local = open(&tablet).profile().history().group(g.id).unwrap().unwrap();
    assert_eq!(local.title, "Club");
    let h = group_history(&tablet, g.id);
    assert_eq!(texts(&h), ["after"], "{h:?}");
    assert!(h.iter().all(|m| !m.undecryptable));
}

#[test]
fn a_blocked_user_is_told_accepted_and_reaches_the_blocker_only_in_groups() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-phone");
    let g = open(&bob).group_create("Club", &["alice".into()]).unwrap();
    for p in [&alice, &bob2] {
        sync(p);
    }
    open(&alice).send("bob", "before").unwrap();
    for p in [&bob, &bob2] {
        assert_eq!(texts(&messages(&sync(p))), ["before"]);
    }
    open(&bob).set_blocked("alice", true).unwrap();
    // bob's other device hears of it, and refuses to write to alice too.
    let events = sync(&bob2);
    assert!(events.contains(&Event::Blocked {
        user: "alice".into(),
        blocked: true
    }));
    for p in [&bob, &bob2] {
        let e = open(p).send("alice", "hi").unwrap_err();
        assert!(e.to_string().contains("unblock"), "{e}");
    }
    // alice's messages are accepted and never delivered; she cannot tell.
    let m = open(&alice).send("bob", "are you there?").unwrap();
    assert_eq!(m.status, Status::Sent);
    for p in [&bob, &bob2] {
        assert!(messages(&sync(p)).is_empty(), "{}", p.display());
    }
    // In the group they share, her messages still arrive.
    open(&alice).send(&g.id.tag(), "in the club").unwrap();
    for p in [&bob, &bob2] {
        assert_eq!(texts(&messages(&sync(p))), ["in the club"], "{}", p.display());
    }
    assert_eq!(open(&bob2).blocked().unwrap(), ["alice"]);
    // Unblocked: her next message arrives (the one sent while blocked never
    // does).
    open(&bob2).set_blocked("alice", false).unwrap();
    open(&alice).send("bob", "again").unwrap();
    assert_eq!(texts(&messages(&sync(&bob))), ["again"]);
    assert!(open(&bob).blocked().unwrap().is_empty());
}

#[test]
fn the_command_line_names_groups_with_a_hash_and_prints_json() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let out = stdout(&tidings(&alice, &["group", "create", "Book club", "bob"]));
    let tag = out.trim().to_owned();
    let g = GroupId::parse_tag(&tag).unwrap_or_else(|| panic!("{out:?}"));
    let sent = stdout(&tidings(&alice, &["send", &tag, "chapter one"]));
    assert_eq!(sent.trim().len(), 32);
    stdout(&tidings(&bob, &["sync"]));
    let lines = json_lines(&tidings(&bob, &["history", &tag, "--json"]));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["group"], g.to_string());
    assert_eq!(lines[0]["to"], tag);
    assert_eq!(lines[0]["text"], "chapter one");
    let info = json_lines(&tidings(&bob, &["group", "info", &tag, "--json"]));
    assert_eq!(
        info[0],
        serde_json::json!({
            "type": "group",
            "id": g.to_string(),
            "title": "Book club",
            "version": 1,
            "members": [{"user": "alice", "admin": true}, {"user": "bob", "admin": false}],
        })
    );
    let list = json_lines(&tidings(&alice, &["group", "list", "--json"]));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], g.to_string());
    // A direct message has no group.
    stdout(&tidings(&alice, &["send", "bob", "hi"]));
    stdout(&tidings(&bob, &["sync"]));
    let lines = json_lines(&tidings(&bob, &["history", "alice", "--json"]));
    assert!(lines[0]["group"].is_null());
    stdout(&tidings(&bob, &["block", "alice"]));
    let blocked = json_lines(&tidings(&bob, &["blocked", "--json"]));
    assert_eq!(blocked, [serde_json::json!({"type": "blocked", "user": "alice"})]);
    // Bad group names are a clear error.
    let bad = tidings(&alice, &["send", "#nothex", "x"]);
    assert!(!bad.status.success());
    // A non-member learns nothing.
    let carol = d.user("carol");
    let e = tidings(&carol, &["group", "info", &tag]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("not a member"));
}
