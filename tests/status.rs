//! Receipts and status updates through the real `tidingsd`: message states
//! on every device of both users (sent, delivered, read), replies,
//! forwards, edits and deletes for everyone (with devices offline when
//! they happen), retraction of queued copies, read receipts turned off,
//! retention notices and quota refusals.

mod common;

use std::time::Duration;

use common::cli::{Listener, id_of, json_lines, stdout, tidings};
use common::profiles::{history, messages, one, open, sync};
use common::raw::RawClient;
use common::{Daemon, WAIT};
use tidings::client::{self, Content, DeviceState, Event, Message, Report, Status, UpdateKind};
use tidings::wire::{ClientFrame, DeviceId, MsgId, Receipt, ReceiptKind, ServerFrame};

#[test]
fn a_message_goes_sent_then_delivered_then_read_on_every_device() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-2");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    let listener = Listener::start(&alice);
    // Alice sends (through her running listen) while bob is offline.
    let id = stdout(&tidings(&alice, &["send", "bob", "are you there?"]));
    let id = MsgId::from_hex(id.trim()).unwrap();
    let h = json_lines(&tidings(&alice, &["history", "bob", "--json"]));
    assert_eq!(h.len(), 1);
    assert_eq!(
        (h[0]["status"].as_str(), h[0]["direction"].as_str()),
        (Some("sent"), Some("out"))
    );
    for field in ["reply_to", "quote"] {
        assert!(h[0][field].is_null(), "{field} always present: {}", h[0]);
    }
    for field in ["forwarded", "edited", "deleted"] {
        assert_eq!(h[0][field], false, "{field}: {}", h[0]);
    }
    // Bob's device 1 syncs: alice hears at once that it was delivered.
    let got = messages(&sync(&bob));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].status, Status::Received);
    let r = listener.wait_for("a delivered receipt", |v| v["type"] == "receipt");
    assert_eq!(
        (
            r["id"].as_str(),
            r["status"].as_str(),
            r["by"].as_str(),
            r["by_device"].as_u64()
        ),
        (Some(id.to_string().as_str()), Some("delivered"), Some("bob"), Some(1))
    );
    let h = json_lines(&tidings(&alice, &["history", "bob", "--json"]));
    assert_eq!(h[0]["status"], "delivered");
    // Bob reads the conversation: read on alice's listening device...
    let out = stdout(&tidings(&bob, &["read", "alice"]));
    assert_eq!(out.trim(), "1");
    let r = listener.wait_for("a read receipt", |v| v["type"] == "receipt" && v["status"] == "read");
    assert_eq!((r["by"].as_str(), r["by_device"].as_u64()), (Some("bob"), Some(1)));
    assert_eq!(history(&bob, "alice")[0].status, Status::Read);
    assert_eq!(stdout(&tidings(&bob, &["read", "alice"])).trim(), "0", "read already");
    // ...and on her other device, which was offline all along.
    let events = sync(&alice2);
    assert_eq!(messages(&events).len(), 1, "her own copy");
    assert_eq!(one(&alice2, "bob", id).status, Status::Read);
    // Bob's second device gets the message and learns it was read on his
    // first; its own delivered receipt moves nothing backwards for alice.
    let got = messages(&sync(&bob2));
    assert_eq!(got.len(), 1);
    assert_eq!(one(&bob2, "alice", id).status, Status::Read);
    let r = listener.wait_for("bob-2's receipt", |v| v["type"] == "receipt" && v["by_device"] == 2);
    assert_eq!(r["status"], "read", "the message stays read: {r}");
    let h = json_lines(&tidings(&alice, &["history", "bob", "--json"]));
    assert_eq!(h[0]["status"], "read");
    let text = stdout(&tidings(&alice, &["history", "bob"]));
    assert!(text.contains("✓✓ read"), "{text}");
    // Per device, with times.
    let info = json_lines(&tidings(&alice, &["info", &id.to_string(), "--json"]));
    assert_eq!(info.len(), 1);
    let devices = info[0]["devices"].as_array().unwrap();
    let states: Vec<(&str, u64, &str)> = devices
        .iter()
        .map(|d| {
            (
                d["user"].as_str().unwrap(),
                d["device"].as_u64().unwrap(),
                d["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("bob", 1, "read"), ("bob", 2, "delivered")]);
    assert!(devices[0]["read"].as_u64().unwrap() >= devices[0]["delivered"].as_u64().unwrap());
    let text = stdout(&tidings(&alice, &["info", &id.to_string()]));
    assert!(text.contains("bob/1: read"), "{text}");
    drop(listener);
    sync(&alice2);
    assert_eq!(one(&alice2, "bob", id).status, Status::Read);
    let (m, r, _) = open(&alice2).info(id).unwrap().remove(0);
    assert_eq!(m.status, Status::Read);
    assert_eq!(
        r.devices.iter().map(|d| d.state()).collect::<Vec<_>>(),
        [DeviceState::Read, DeviceState::Delivered]
    );
}

#[test]
fn replies_forwards_edits_and_deletes_reach_every_device() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-2");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    let carol = d.user("carol");
    let all = [(&alice, "bob"), (&alice2, "bob"), (&bob, "alice"), (&bob2, "alice")];
    let sync_all = || {
        for (dev, _) in all {
            sync(dev);
        }
    };
    let original = open(&alice).send("bob", "lunch at noon?").unwrap();
    sync_all();
    // A device linked after the original: it gets the reply, not what it
    // quotes.
    let bob3 = d.link(&bob, "bob-3");
    // A reply quotes it, on every device.
    let reply = json_lines(&tidings(
        &bob,
        &[
            "send",
            "alice",
            "yes!",
            "--reply-to",
            &original.id.to_string(),
            "--json",
        ],
    ));
    let reply_id = id_of(&reply[0]);
    sync_all();
    for (dev, peer) in all {
        let r = one(dev, peer, reply_id);
        assert_eq!(r.reply_to, Some(original.id), "{}", dev.display());
        let q = r.quote.unwrap();
        assert_eq!((q.from.as_str(), q.text.as_deref()), ("alice", Some("lunch at noon?")));
    }
    let h = json_lines(&tidings(&alice2, &["history", "bob", "--json"]));
    assert_eq!(h[1]["reply_to"], original.id.to_string());
    assert_eq!(h[1]["quote"]["text"], "lunch at noon?");
    let text = stdout(&tidings(&alice, &["history", "bob"]));
    assert!(text.contains("[reply to alice: \"lunch at noon?\"] yes!"), "{text}");
    // A device without the quoted message shows the quote the reply
    // carried.
    sync(&bob3);
    assert!(history(&bob3, "alice").iter().all(|m| m.id != original.id));
    let q = one(&bob3, "alice", reply_id).quote.unwrap();
    assert_eq!(q.text.as_deref(), Some("lunch at noon?"));
    assert!(stdout(&tidings(&bob3, &["history", "alice"])).contains("[reply to alice: \"lunch at noon?\"] yes!"));
    // One can only reply to a message of the same conversation.
    let e = open(&bob).send_reply("carol", "x", original.id).unwrap_err();
    assert!(matches!(e, client::Error::Usage(_)), "{e}");

    // Edit, while bob's second device is offline.
    let edited = stdout(&tidings(&alice, &["edit", &original.id.to_string(), "lunch at one?"]));
    assert_eq!(edited.trim(), original.id.to_string());
    let live = sync(&bob);
    assert!(live.iter().any(|e| matches!(e,
        Event::Update(u) if u.kind == UpdateKind::Edit && u.id == original.id && u.text.as_deref() == Some("lunch at one?"))));
    sync(&alice2);
    sync(&bob2);
    for (dev, peer) in all {
        let m = one(dev, peer, original.id);
        assert_eq!(m.text, "lunch at one?", "{}", dev.display());
        assert!(m.edited(), "{}", dev.display());
        // The reply quotes the latest text where the original is present.
        let q = one(dev, peer, reply_id).quote.unwrap();
        assert_eq!(q.text.as_deref(), Some("lunch at one?"), "{}", dev.display());
    }
    let h = json_lines(&tidings(&bob2, &["history", "alice", "--json"]));
    assert_eq!(
        (h[0]["edited"].as_bool(), h[0]["text"].as_str()),
        (Some(true), Some("lunch at one?"))
    );
    assert!(stdout(&tidings(&bob2, &["history", "alice"])).contains("lunch at one? (edited)"));
    // listen --json prints the edit.
    let listener = Listener::start(&bob2);
    stdout(&tidings(&alice, &["edit", &original.id.to_string(), "lunch at two?"]));
    let e = listener.wait_for("the edit", |v| v["type"] == "edit");
    assert_eq!(
        (e["id"].as_str(), e["text"].as_str(), e["from"].as_str()),
        (
            Some(original.id.to_string().as_str()),
            Some("lunch at two?"),
            Some("alice")
        )
    );
    drop(listener);

    sync(&bob);
    // Forwards: bob forwards alice's message to carol, and it goes back
    // and forth until it has been forwarded five times.
    let fwd = json_lines(&tidings(
        &bob,
        &["forward", &original.id.to_string(), "carol", "--json"],
    ));
    let mut last = id_of(&fwd[0]);
    let got = messages(&sync(&carol));
    assert_eq!((got[0].text.as_str(), got[0].forwards), ("lunch at two?", 1));
    let h = json_lines(&tidings(&carol, &["history", "bob", "--json"]));
    assert_eq!(
        (h[0]["forwarded"].as_bool(), h[0]["forwarded_many_times"].as_bool()),
        (Some(true), Some(false))
    );
    for hop in 2..=5 {
        let (from, to, to_name) = if hop % 2 == 0 {
            (&carol, &bob, "bob")
        } else {
            (&bob, &carol, "carol")
        };
        sync(from);
        last = open(from).forward(last, to_name).unwrap().id;
        let got = messages(&sync(to));
        assert_eq!(got.last().unwrap().forwards, hop);
    }
    let m = one(&carol, "bob", last);
    assert!(m.forwarded_many_times());
    assert!(stdout(&tidings(&carol, &["history", "bob"])).contains("[forwarded many times] lunch at two?"));
    // Bob's other device has his forwards too, marked.
    sync(&bob2);
    assert!(history(&bob2, "carol").iter().all(|m| m.forwarded()));

    // Nobody edits or deletes someone else's message, or an old one.
    for args in [
        vec!["edit", &*original.id.to_string(), "mine now"],
        vec!["delete", &*original.id.to_string()],
    ] {
        let out = tidings(&bob, &args.iter().map(|s| &**s).collect::<Vec<_>>());
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not yours"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _old = {
        let a = open(&alice);
        let m = Message {
            id: a.new_id().unwrap(),
            from: "alice".into(),
            from_device: DeviceId(1),
            to: "bob".into(),
            text: "last week".into(),
            ts_ms: now_ms() - 3 * 24 * 3600 * 1000,
            direction: client::Direction::Out,
            status: Status::Sent,
            ..Message::default()
        };
        a.profile().history().insert("alice", &m).unwrap();
        a.profile().history().flush().unwrap();
        m.id
    };
    let out = tidings(&alice, &["edit", &_old.to_string(), "too late"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("15 minutes"));
    let out = tidings(&alice, &["delete", &_old.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 days"));
    // A receiving client ignores forged ones: bob claims to edit and to
    // delete alice's message (alice's devices look for bob's message of
    // that id, which there is none of), and carol too.
    for (forger, to) in [(&bob, "alice"), (&carol, "bob")] {
        let mut f = open(forger);
        f.send_content(
            to,
            Content::Edit {
                target: original.id,
                text: "forged".into(),
            },
            now_ms(),
        )
        .unwrap();
        f.send_content(to, Content::Delete { target: original.id }, now_ms())
            .unwrap();
    }
    // And alice's client, if it did not check, could not edit past the
    // window either: an edit made an hour after the message is ignored.
    open(&alice)
        .send_content(
            "bob",
            Content::Edit {
                target: original.id,
                text: "an hour later".into(),
            },
            now_ms() + 3600 * 1000,
        )
        .unwrap();
    sync_all();
    for (dev, peer) in all {
        let m = one(dev, peer, original.id);
        assert_eq!(
            (m.text.as_str(), m.deleted),
            ("lunch at two?", false),
            "{}",
            dev.display()
        );
    }

    // Delete for everyone, while alice's second device is offline.
    let deleted = json_lines(&tidings(&alice, &["delete", &original.id.to_string(), "--json"]));
    assert_eq!(
        (deleted[0]["type"].as_str(), deleted[0]["deleted"].as_bool()),
        (Some("deleted"), Some(true))
    );
    assert!(deleted[0]["text"].is_null());
    let live = sync(&bob);
    assert!(
        live.iter()
            .any(|e| matches!(e, Event::Update(u) if u.kind == UpdateKind::Delete && u.id == original.id))
    );
    sync(&bob2);
    sync(&alice2);
    for (dev, peer) in all {
        let m = one(dev, peer, original.id);
        assert!(m.deleted && m.text.is_empty(), "{}: {m:?}", dev.display());
        let q = one(dev, peer, reply_id).quote.unwrap();
        assert_eq!(q.text, None, "the quote shows it deleted on {}", dev.display());
        let h = json_lines(&tidings(dev, &["history", peer, "--json"]));
        let line = h.iter().find(|l| l["id"] == original.id.to_string()).unwrap();
        assert!(line["text"].is_null() && line["deleted"] == true, "{line}");
        let text = stdout(&tidings(dev, &["history", peer]));
        assert!(!text.contains("lunch at"), "{}: {text}", dev.display());
        assert!(
            text.contains("[deleted]") && text.contains("(deleted message)"),
            "{text}"
        );
    }
    // The device that never had the original shows it deleted, and its
    // reply's quote too.
    sync(&bob3);
    assert!(one(&bob3, "alice", original.id).deleted);
    assert_eq!(one(&bob3, "alice", reply_id).quote.unwrap().text, None);
    // Carol's forwarded copy is hers (as in WhatsApp).
    assert!(history(&carol, "bob").iter().all(|m| !m.deleted));
}

#[test]
fn a_delete_while_the_recipient_is_offline_leaves_no_copy_queued() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-2");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    // Sessions both ways first.
    open(&alice).send("bob", "hello").unwrap();
    sync(&bob);
    sync(&bob2);
    sync(&alice2);
    let secret = open(&alice).send("bob", "oops, wrong chat").unwrap();
    let after = open(&alice).send("bob", "ignore that").unwrap();
    open(&alice).delete(secret.id).unwrap();
    // On the server: no queue holds the original any more; the message
    // after it and the delete wait.
    let queued = d.with_store_stopped(|store| {
        let mut out = Vec::new();
        for (user, device) in [("bob", 1), ("bob", 2), ("alice", 2)] {
            let key = tidings::ids::DeviceKey {
                user: store.accounts().user_id(user).unwrap(),
                device: DeviceId(device),
            };
            let mut entries = Vec::new();
            store.read_queue(key, 0, 1000, &mut entries).unwrap();
            let ids: Vec<MsgId> = entries
                .into_iter()
                .filter_map(|(_, e)| match e {
                    tidings::store::Entry::Message(m) => Some(m.id),
                    _ => None,
                })
                .collect();
            out.push(ids);
        }
        out
    });
    for ids in &queued {
        assert!(!ids.contains(&secret.id), "{ids:?}");
        assert!(ids.contains(&after.id));
        assert_eq!(ids.len(), 2, "the message after it and the delete");
    }
    // Both of bob's devices and alice's other device were offline: the
    // server removed the queued copies (Retract), so none of them gets the
    // original, only the delete, and shows it deleted.
    for (dev, peer) in [(&bob, "alice"), (&bob2, "alice"), (&alice2, "bob")] {
        let events = sync(dev);
        let got = messages(&events);
        assert!(got.iter().all(|m| m.id != secret.id), "{}: {got:?}", dev.display());
        assert!(got.iter().any(|m| m.id == after.id));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Update(u) if u.kind == UpdateKind::Delete && u.id == secret.id))
        );
        let m = one(dev, peer, secret.id);
        assert!(m.deleted && m.text.is_empty());
        assert!(!history(dev, peer).iter().any(|m| m.text.contains("wrong chat")));
    }
    assert!(!history(&alice, "bob").iter().any(|m| m.text.contains("wrong chat")));
}

#[test]
fn with_read_receipts_off_no_read_receipt_leaves_and_none_is_shown() {
    let mut d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    open(&alice).send("bob", "first").unwrap();
    sync(&bob);
    sync(&bob2);
    // Off on one device of bob's: his other device learns it.
    assert_eq!(
        stdout(&tidings(&bob, &["settings", "read-receipts", "off"])).trim(),
        "read-receipts off\nlast-seen everyone\nauto-download 1048576"
    );
    let events = sync(&bob2);
    assert!(events.contains(&Event::Settings { read_receipts: false }), "{events:?}");
    assert_eq!(
        stdout(&tidings(&bob2, &["settings"])).trim(),
        "read-receipts off\nlast-seen everyone\nauto-download 1048576"
    );
    let m = open(&alice).send("bob", "did you read this?").unwrap();
    sync(&bob);
    assert_eq!(stdout(&tidings(&bob, &["read", "alice"])).trim(), "2");
    // On the server: alice's queue holds receipts from bob, and only
    // delivered ones.
    let kinds = d.with_store_stopped(|store| {
        let alice_id = store.accounts().user_id("alice").unwrap();
        let mut entries = Vec::new();
        let device = tidings::ids::DeviceKey {
            user: alice_id,
            device: DeviceId(1),
        };
        store.read_queue(device, 0, 1000, &mut entries).unwrap();
        entries
            .into_iter()
            .filter_map(|(_, e)| match e {
                tidings::store::Entry::Receipt(r) => Some(r.kind),
                _ => None,
            })
            .collect::<Vec<u8>>()
    });
    assert!(!kinds.is_empty());
    assert!(kinds.iter().all(|k| *k == ReceiptKind::DELIVERED.0), "{kinds:?}");
    // Alice's queue holds delivered receipts only: her device (which shows
    // read receipts) hears of no read.
    let events = sync(&alice);
    let receipts: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Receipt(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert!(!receipts.is_empty());
    assert!(receipts.iter().all(|r| r.report == Report::Delivered), "{receipts:?}");
    assert_eq!(one(&alice, "bob", m.id).status, Status::Delivered);
    // Bob's other device still knows he read it (told end to end).
    sync(&bob2);
    assert!(history(&bob2, "alice").iter().all(|m| m.status == Status::Read));
    // And bob sees no read receipt: alice reads his message, his status
    // for it stays delivered.
    let his = open(&bob).send("alice", "ok").unwrap();
    sync(&alice);
    tidings(&alice, &["read", "bob"]);
    let events = sync(&bob);
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Receipt(r) if r.status == Status::Read))
    );
    assert_eq!(one(&bob, "alice", his.id).status, Status::Delivered);
    // On again: the next read is a read receipt.
    stdout(&tidings(&bob2, &["settings", "read-receipts", "on"]));
    sync(&bob);
    let m2 = open(&alice).send("bob", "and now?").unwrap();
    sync(&bob);
    stdout(&tidings(&bob, &["read", "alice"]));
    sync(&alice);
    assert_eq!(one(&alice, "bob", m2.id).status, Status::Read);
}

#[test]
fn receipts_and_notices_are_acknowledged_and_never_stall_delivery() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let _bob = d.user("bob");
    // More receipt entries than the delivery window (256) waiting in
    // alice's queue: receipts of different kinds never fold, and the
    // server routes kinds it does not know (spec §5.5).
    let addr = d.addr();
    let invite = d.invite(2);
    for name in ["rawone", "rawtwo"] {
        let mut raw = RawClient::register(addr, &invite, name).unwrap().client;
        let kinds = if name == "rawone" { 1..=255u8 } else { 1..=10 };
        let n = kinds.clone().count();
        for kind in kinds {
            raw.send(&ClientFrame::Receipt(Receipt {
                to: "alice".into(),
                kind: ReceiptKind(kind),
                ids: vec![MsgId([kind; 16])],
            }))
            .unwrap();
        }
        let mut done = 0;
        while done < n {
            match raw.expect_frame(WAIT).unwrap() {
                (req, ServerFrame::Done) if req != 0 => done += 1,
                (0, _) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    open(&d.profile("bob")).send("alice", "behind them all").unwrap();
    let got = messages(&sync(&alice));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "behind them all");
    assert!(sync(&alice).is_empty(), "everything was acknowledged");
}

#[test]
fn gap_and_expiry_notices_are_shown() {
    // A notice is a queue entry subject to retention too: bob syncs after
    // his messages expired (3 to 4 s) and before the notice would (6 s).
    let d = Daemon::start_with_config("[retention]\nperiod = \"3s\"\nsweep_every = \"1s\"\n");
    let alice = d.user("alice");
    let bob = d.user("bob");
    open(&alice).send("bob", "hello").unwrap();
    sync(&bob);
    let listener = Listener::start(&alice);
    let a = json_lines(&tidings(&alice, &["send", "bob", "one", "--json"]));
    let b = json_lines(&tidings(&alice, &["send", "bob", "two", "--json"]));
    let (a, b) = (id_of(&a[0]), id_of(&b[0]));
    std::thread::sleep(Duration::from_millis(4500));
    // Bob's device lost them: a gap notice (JSON and a human line).
    let lines = json_lines(&tidings(&bob, &["sync", "--json"]));
    let gap = lines
        .iter()
        .find(|l| l["type"] == "gap")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(
        (gap["from"].as_str(), gap["device"].as_u64(), gap["count"].as_u64()),
        (Some("alice"), Some(1), Some(2))
    );
    assert!(gap["first"].as_u64().unwrap() <= gap["last"].as_u64().unwrap());
    assert!(lines.iter().all(|l| l["type"] != "message"));
    // Alice's device hears which of her messages never reached which
    // device, and `info` says so per device.
    // Two sends a few hundred milliseconds apart may expire in two passes
    // of the sweeper (one notice each) or in one.
    let mut ids: Vec<String> = Vec::new();
    while ids.len() < 2 {
        let e = listener.wait_for("the expiry notice", |v| v["type"] == "expired");
        assert_eq!((e["user"].as_str(), e["device"].as_u64()), (Some("bob"), Some(1)));
        ids.extend(
            e["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string()),
        );
    }
    ids.sort();
    let mut want = [a.to_string(), b.to_string()];
    want.sort();
    assert_eq!(ids, want);
    for id in [a, b] {
        let info = json_lines(&tidings(&alice, &["info", &id.to_string(), "--json"]));
        let devices = info[0]["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(
            (
                devices[0]["user"].as_str(),
                devices[0]["device"].as_u64(),
                devices[0]["status"].as_str()
            ),
            (Some("bob"), Some(1), Some("expired"))
        );
        assert!(stdout(&tidings(&alice, &["info", &id.to_string()])).contains("bob/1: expired"));
    }
    drop(listener);
    let out = stdout(&tidings(&alice, &["sync"]));
    assert!(!out.contains("expired"), "acknowledged by the listener: {out}");
    // Human lines for both.
    open(&alice).send("bob", "three").unwrap();
    std::thread::sleep(Duration::from_millis(4500));
    let text = stdout(&tidings(&alice, &["sync"]));
    assert!(
        text.contains("1 of your messages expired on the server before bob's device 1 collected them"),
        "{text}"
    );
    let text = stdout(&tidings(&bob, &["sync"]));
    assert!(text.contains("1 message from alice (device 1), sent between"), "{text}");
    // Not again: the notices were acknowledged.
    assert!(stdout(&tidings(&bob, &["sync", "--json"])).trim().is_empty());
}

#[test]
fn a_full_queue_refuses_the_send_and_keeps_what_it_has() {
    // A lone sender may fill half of a queue (spec §10, *Fair shares*):
    // three of six.
    let d = Daemon::start_with_config("[quotas]\nqueue_messages = 6\n");
    let alice = d.user("alice");
    let bob = d.user("bob");
    let mut sent = Vec::new();
    for t in ["one", "two", "three"] {
        sent.push(stdout(&tidings(&alice, &["send", "bob", t])).trim().to_owned());
    }
    let out = tidings(&alice, &["send", "bob", "four"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QUOTA_EXCEEDED") && err.contains("full"), "{err}");
    assert!(
        !history(&alice, "bob").iter().any(|m| m.text == "four"),
        "a refused message is not kept"
    );
    let got = messages(&sync(&bob));
    assert_eq!(
        got.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert_eq!(got.iter().map(|m| m.id.to_string()).collect::<Vec<_>>(), sent);
    // Room again.
    stdout(&tidings(&alice, &["send", "bob", "four"]));
    assert_eq!(messages(&sync(&bob))[0].text, "four");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn reactions_show_in_listen_and_history_and_can_be_taken_back() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let listener = Listener::start(&bob);
    let id = stdout(&tidings(&alice, &["send", "bob", "lunch?"])).trim().to_owned();
    listener.wait_for("the message", |v| v["type"] == "message");
    stdout(&tidings(&alice, &["react", &id, "👍"]));
    let v = listener.wait_for("the reaction", |v| v["type"] == "reaction");
    assert_eq!(
        (
            v["id"].as_str(),
            v["by"].as_str(),
            v["from"].as_str(),
            v["emoji"].as_str()
        ),
        (Some(id.as_str()), Some("alice"), Some("alice"), Some("👍"))
    );
    // Bob's history (through his listener) has it, as an object.
    let hist = stdout(&tidings(&bob, &["history", "alice", "--json"]));
    let m: serde_json::Value = serde_json::from_str(hist.lines().next().unwrap()).unwrap();
    assert_eq!(m["reactions"], serde_json::json!({"alice": "👍"}));
    // Bob reacts too, through his listener; alice sees both.
    stdout(&tidings(&bob, &["react", &id, "❤️"]));
    stdout(&tidings(&alice, &["sync"]));
    let line = stdout(&tidings(&alice, &["history", "bob"]));
    assert!(line.contains("[reactions: alice 👍, bob ❤️]"), "{line}");
    // Taken back: emoji null, and gone from the history.
    stdout(&tidings(&alice, &["react", &id, "--remove"]));
    let v = listener.wait_for("the removal", |v| v["type"] == "reaction" && v["by"] == "alice");
    assert!(v["emoji"].is_null(), "{v}");
    let hist = stdout(&tidings(&bob, &["history", "alice", "--json"]));
    let m: serde_json::Value = serde_json::from_str(hist.lines().next().unwrap()).unwrap();
    assert_eq!(m["reactions"], serde_json::json!({"bob": "❤️"}));
    // Not one emoji: a clear error, nothing on stdout.
    let out = tidings(&alice, &["react", &id, "👍👍"]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not one emoji"));
}
