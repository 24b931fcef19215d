//! Checks the body examples of `protocol-spec/` §14 against the client's
//! encoders, so that the document and the code cannot drift.

use bytes::Bytes;
use tidings::client::Content;
use tidings::client::content::{Envelope, GroupEnvelope, OlmKind, Payload};
use tidings::wire::{GroupId, MsgId};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/protocol-spec/README.md")).unwrap()
}

/// The hex columns of the fenced block after the line starting `title`.
fn example(title: &str) -> Vec<u8> {
    let text = readme();
    let start = text
        .find(&format!("\n{title}"))
        .unwrap_or_else(|| panic!("no {title:?}"));
    let rest = &text[start..];
    let open = rest.find("```text\n").unwrap() + "```text\n".len();
    let close = open + rest[open..].find("```").unwrap();
    let mut hex = String::new();
    for line in rest[open..close].lines() {
        for token in line.split("  ").next().unwrap().split_whitespace() {
            assert!(token.len() == 2, "{title}: {line:?}");
            hex.push_str(token);
        }
    }
    hex::decode(hex).unwrap()
}

/// The group of the spec's examples (§5.8, §14.9).
const GROUP: GroupId = GroupId([
    0x3b, 0x8e, 0x0c, 0x5a, 0x91, 0xd2, 0x47, 0xf6, 0xa0, 0xc3, 0xe2, 0x1b, 0x7d, 0x5f, 0x98, 0x64,
]);

#[test]
fn the_group_envelope_example_is_what_the_client_writes() {
    let mut session = [0u8; 32];
    for (i, b) in session.iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    let e = GroupEnvelope {
        session,
        ciphertext: Bytes::from_static(&[9, 8, 7]),
    };
    assert_eq!(hex::encode(e.encode()), hex::encode(example("GroupEnvelope example")));
    assert_eq!(GroupEnvelope::decode(&example("GroupEnvelope example")), Ok(e));
    assert_eq!(GROUP.tag(), "#3b8e0c5a91d247f6a0c3e21b7d5f9864");
}

#[test]
fn the_envelope_example_is_what_the_client_writes() {
    let e = Envelope {
        kind: OlmKind::Normal,
        ciphertext: Bytes::from_static(&[9, 8, 7]),
    };
    assert_eq!(hex::encode(e.encode()), hex::encode(example("Envelope example")));
    assert_eq!(Envelope::decode(&example("Envelope example")), Ok(e));
}

#[test]
fn the_payload_example_is_what_the_client_writes() {
    let p = Payload {
        id: MsgId([0xab; 16]),
        to: "bob".into(),
        ts_ms: 1,
        content: Content::Text("hi".into()),
    };
    assert_eq!(
        hex::encode(p.encode().unwrap()),
        hex::encode(example("Payload example"))
    );
    assert_eq!(Payload::decode(&example("Payload example")), Ok(p));
}

#[test]
fn the_status_update_examples_are_what_the_client_writes() {
    use tidings::client::content::QuoteText;
    let target = MsgId([0xcd; 16]);
    let cases = [
        (
            "Reply example",
            "alice",
            Content::Reply {
                text: "yes".into(),
                reply_to: target,
                quote: QuoteText {
                    from: "alice".into(),
                    text: "lunch?".into(),
                },
            },
        ),
        (
            "Forward example",
            "carol",
            Content::Forward {
                text: "hi".into(),
                forwards: 1,
            },
        ),
        (
            "Edit example",
            "bob",
            Content::Edit {
                target,
                text: "hi!".into(),
            },
        ),
        ("Delete example", "bob", Content::Delete { target }),
        ("Settings example", "alice", Content::Settings { read_receipts: false }),
        (
            "Read example",
            "bob",
            Content::Read {
                peer: "alice".into(),
                ids: vec![target],
            },
        ),
        (
            "Reaction example",
            "alice",
            Content::Reaction {
                target,
                target_from: "alice".into(),
                emoji: Some("👍".into()),
            },
        ),
        (
            "Reaction removal example",
            "alice",
            Content::Reaction {
                target,
                target_from: "alice".into(),
                emoji: None,
            },
        ),
        ("Typing example", "alice", Content::Typing { active: true }),
        ("LastSeen example", "bob", Content::LastSeen { everyone: false }),
        (
            "GroupKey example",
            "bob",
            Content::GroupKey {
                group: GROUP,
                session_key: Bytes::from_static(&[2, 0, 0, 0, 0]),
            },
        ),
        (
            "GroupTitle example",
            "#3b8e0c5a91d247f6a0c3e21b7d5f9864",
            Content::GroupTitle {
                group: GROUP,
                title: "Family".into(),
            },
        ),
    ];
    for (title, to, content) in cases {
        let p = Payload {
            id: MsgId([0xab; 16]),
            to: to.into(),
            ts_ms: 1,
            content,
        };
        assert_eq!(hex::encode(p.encode().unwrap()), hex::encode(example(title)), "{title}");
        assert_eq!(Payload::decode(&example(title)), Ok(p), "{title}");
    }
}

#[test]
fn the_file_examples_are_what_the_client_writes() {
    use tidings::client::attachment::{ChunkCipher, FileKey, FileRef};
    use tidings::wire::BlobId;
    let key = FileKey([0x42; 32]);
    let mut chunk = b"hello".to_vec();
    ChunkCipher::new(&key, 5).seal(0, &mut chunk);
    assert_eq!(hex::encode(&chunk), hex::encode(example("Sealed chunk example")));
    let id = ring::digest::digest(&ring::digest::SHA256, &chunk);
    assert_eq!(hex::encode(id.as_ref()), hex::encode(example("Blob id example")));
    let p = Payload {
        id: MsgId([0xab; 16]),
        to: "bob".into(),
        ts_ms: 1,
        content: Content::File {
            file: FileRef {
                blob: BlobId(id.as_ref().try_into().unwrap()),
                key,
                size: 5,
                sha256: ring::digest::digest(&ring::digest::SHA256, b"hello")
                    .as_ref()
                    .try_into()
                    .unwrap(),
                media_type: "text/plain".into(),
                name: "hello.txt".into(),
                thumbnail: None,
            },
            caption: "hi".into(),
            forwards: 0,
        },
    };
    assert_eq!(hex::encode(p.encode().unwrap()), hex::encode(example("File example")));
    assert_eq!(Payload::decode(&example("File example")), Ok(p));
}
