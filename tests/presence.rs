//! Typing and presence against the real daemon (spec §5.6), through the
//! client library and the `tidings` command: who hides their presence is
//! hidden and sees no one's; a watcher hears a user come and go; a typing
//! indicator reaches the other user's listening device and nothing of it
//! is queued.

mod common;

use std::sync::mpsc::{self, Receiver};
use std::time::Instant;

use common::cli::{stdout, tidings};
use common::profiles::{open, open_receiving, sync};
use common::{Daemon, WAIT};
use tidings::client::Event;
use tidings::client::driver::Input;
use tidings::wire::{DeviceId, Seen};

/// Waits for an event that `want` picks out.
fn wait_for(rx: &Receiver<Event>, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(_) => {}
            Err(_) => panic!("never got {what}"),
        }
    }
}

fn bobs(seen: impl Fn(&Seen) -> bool) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Presence { user, seen: s } if user == "bob" && seen(s))
}

#[test]
fn presence_follows_the_setting_and_typing_reaches_the_listener() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    open(&alice).send("bob", "hi").unwrap();
    sync(&bob);
    let out = stdout(&tidings(&bob, &["settings", "last-seen", "nobody"]));
    assert_eq!(out.trim(), "read-receipts on\nlast-seen nobody\nauto-download 1048576");

    // Alice listens, watching bob.
    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let dir = alice.clone();
    let listener = std::thread::spawn(move || {
        let mut c = open_receiving(&dir);
        c.watch_presence(vec!["bob".into()]).unwrap();
        stop_tx.send(c.input_sender()).unwrap();
        c.listen(&mut |e| tx.send(e.clone()).is_ok()).unwrap();
    });
    let stop = stop_rx.recv_timeout(WAIT).unwrap();
    wait_for(&rx, "bob hidden", bobs(|s| *s == Seen::Hidden));

    // Bob comes online: nothing tells alice. He watches alice: hidden to
    // him, since he hides his own.
    let mut b = open(&bob);
    b.connect().unwrap();
    b.watch_presence(vec!["alice".into()]).unwrap();
    assert_eq!(b.presence_of("alice"), Some(&Seen::Hidden));
    // He shows it again: alice sees him online, and he sees her.
    b.set_last_seen(true).unwrap();
    wait_for(
        &rx,
        "bob online",
        bobs(|s| {
            *s == Seen::Online {
                devices: vec![DeviceId(1)],
            }
        }),
    );
    b.watch_presence(vec!["alice".into()]).unwrap();
    assert!(matches!(b.presence_of("alice"), Some(Seen::Online { .. })));
    // He types (he never wrote to alice: the session her message started
    // is enough, and no keys are claimed): her listener hears it.
    assert!(b.typing("alice", true).unwrap());
    wait_for(
        &rx,
        "bob typing",
        |e| matches!(e, Event::Typing { from, active: true } if from == "bob"),
    );
    assert!(b.typing("alice", false).unwrap());
    wait_for(
        &rx,
        "bob stopped",
        |e| matches!(e, Event::Typing { from, active: false } if from == "bob"),
    );
    // He leaves: last seen just now.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    b.disconnect();
    drop(b);
    let e = wait_for(&rx, "bob away", bobs(|s| matches!(s, Seen::Away { .. })));
    let Event::Presence {
        seen: Seen::Away { last_seen_ms },
        ..
    } = e
    else {
        unreachable!()
    };
    assert!(last_seen_ms + 5_000 >= before, "{last_seen_ms} vs {before}");
    stop.send(Input::Stop).unwrap();
    listener.join().unwrap();
    // Nothing of the typing was queued: alice's next sync has nothing.
    assert!(sync(&alice).is_empty());
}
