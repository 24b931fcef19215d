//! Property tests of the wire format (spec §3, §5):
//!
//! - every client and server frame round-trips through encode and decode,
//!   with its tag where the spec puts it;
//! - any input a decoder accepts is the unique encoding of what it decoded;
//! - the record decoder yields the same bodies however a stream is split,
//!   and never buffers more than one header and one capped body;
//! - non-canonical encodings (overlong varints) are refused as
//!   `NonCanonical`, trailing bytes and option or bool bytes other than
//!   `00` and `01` as `Malformed`, unknown tags as `Unsupported` with the
//!   request id;
//! - arbitrary bytes never panic the decoders.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tidings::wire::{
    BlobData, BlobGrant, BlobId, Body, CLIENT_FRAME_KINDS, ClientFrame, Deliver, DeviceAddr, DeviceId, DeviceInfo,
    DeviceKeys, Download, Ephemeral, EphemeralDeliver, ErrorCode, ExpiredNotice, Flow, FrameError, GapNotice,
    IdentityKeys, Lost, MAX_FRAME_LEN, MAX_NAME_LEN, MAX_RECEIPT_IDS, MAX_RECORD_LEN, MsgId, PublishKeys,
    RECORD_HEADER_LEN, Receipt, ReceiptDeliver, ReceiptKind, RecordDecoder, RecordError, SERVER_FRAME_KINDS, Seen,
    Send, ServerFrame, Signature, SignedKey, Token, UploadChunk, UploadStart, UploadStatus, decode_client,
    decode_server, encode_client, encode_server, write_record,
};
use tidings::wire::{
    BlockNotice, ChangeKind, GroupChange, GroupDeliver, GroupId, GroupInfo, GroupKeys, GroupNotice, GroupReceipt,
    GroupReceiptDeliver, GroupSend, GroupVersion, KeyBody, Member,
};

// ---------------------------------------------------------------------------
// Strategies

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_.]{3,32}", "\\PC{0,24}"]
}

fn blob() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..48),
        1 => vec(any::<u8>(), 100..300),
    ]
    .prop_map(Bytes::from)
}

/// Varint-encoded numbers: small ones, boundary ones, and any.
fn int_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..300,
        prop::sample::select(vec![
            127u64,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX
        ]),
        any::<u64>(),
    ]
}

fn int_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..300,
        prop::sample::select(vec![127u32, 128, 16_384, u32::MAX]),
        any::<u32>()
    ]
}

fn msg_id() -> impl Strategy<Value = MsgId> {
    any::<[u8; 16]>().prop_map(MsgId)
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    int_u32().prop_map(DeviceId)
}

fn device_addr() -> impl Strategy<Value = DeviceAddr> {
    (text(), device_id()).prop_map(|(user, device)| DeviceAddr { user, device })
}

fn token() -> impl Strategy<Value = Token> {
    (any::<[u8; 8]>(), any::<[u8; 16]>()).prop_map(|(id, secret)| Token { id, secret })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        prop::sample::select(ErrorCode::ALL.to_vec()),
        any::<u16>().prop_map(ErrorCode)
    ]
}

fn body() -> impl Strategy<Value = Body> {
    (device_id(), blob()).prop_map(|(device, data)| Body { device, data })
}

fn device_info() -> impl Strategy<Value = DeviceInfo> {
    (device_id(), int_u64(), int_u64()).prop_map(|(device, created_ms, last_seen_ms)| DeviceInfo {
        device,
        created_ms,
        last_seen_ms,
    })
}

/// Signatures and keys: the codec does not check them, so any bytes do.
fn signature() -> impl Strategy<Value = Signature> {
    vec(any::<u8>(), 64).prop_map(|v| Signature(v.try_into().expect("64 bytes")))
}

fn identity_keys() -> impl Strategy<Value = IdentityKeys> {
    (any::<[u8; 32]>(), any::<[u8; 32]>(), signature()).prop_map(|(curve25519, ed25519, signature)| IdentityKeys {
        curve25519,
        ed25519,
        signature,
    })
}

fn signed_key() -> impl Strategy<Value = SignedKey> {
    (any::<[u8; 32]>(), signature()).prop_map(|(key, signature)| SignedKey { key, signature })
}

fn publish_keys() -> impl Strategy<Value = PublishKeys> {
    (
        prop::option::of(identity_keys()),
        prop_oneof![4 => vec(signed_key(), 0..4), 1 => vec(signed_key(), 90..110)],
        prop::option::of(signed_key()),
    )
        .prop_map(|(identity, one_time, fallback)| PublishKeys {
            identity,
            one_time,
            fallback,
        })
}

fn device_keys() -> impl Strategy<Value = DeviceKeys> {
    (
        device_id(),
        identity_keys(),
        prop::option::of(signed_key()),
        any::<bool>(),
    )
        .prop_map(|(device, identity, one_time, fallback)| DeviceKeys {
            device,
            identity,
            one_time,
            fallback,
        })
}

/// Receipt kinds: the two clients know (1 delivered, 2 read), and any
/// other byte (the codec carries any `u8`; the server refuses 0).
fn receipt_kind() -> impl Strategy<Value = ReceiptKind> {
    prop_oneof![
        prop::sample::select(vec![ReceiptKind::DELIVERED, ReceiptKind::READ]),
        any::<u8>().prop_map(ReceiptKind),
    ]
}

/// Message id lists: usually a few, sometimes up to `MAX_RECEIPT_IDS`.
fn msg_ids() -> impl Strategy<Value = Vec<MsgId>> {
    prop_oneof![
        8 => vec(msg_id(), 0..6),
        1 => vec(msg_id(), MAX_RECEIPT_IDS - 4..=MAX_RECEIPT_IDS),
    ]
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (text(), receipt_kind(), msg_ids()).prop_map(|(to, kind, ids)| Receipt { to, kind, ids })
}

fn receipt_deliver() -> impl Strategy<Value = ReceiptDeliver> {
    (int_u64(), device_addr(), text(), receipt_kind(), msg_ids(), int_u64()).prop_map(
        |(seq, from, to, kind, ids, time_ms)| ReceiptDeliver {
            seq,
            from,
            to,
            kind,
            ids,
            time_ms,
        },
    )
}

fn lost() -> impl Strategy<Value = Lost> {
    (device_addr(), int_u32(), int_u64(), int_u64()).prop_map(|(from, count, first_ms, last_ms)| Lost {
        from,
        count,
        first_ms,
        last_ms,
    })
}

fn gap_notice() -> impl Strategy<Value = GapNotice> {
    (int_u64(), vec(lost(), 0..6)).prop_map(|(seq, lost)| GapNotice { seq, lost })
}

fn expired_notice() -> impl Strategy<Value = ExpiredNotice> {
    (int_u64(), device_addr(), msg_ids()).prop_map(|(seq, device, ids)| ExpiredNotice { seq, device, ids })
}

fn blob_id() -> impl Strategy<Value = BlobId> {
    any::<[u8; 32]>().prop_map(BlobId)
}

fn names() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..5)
}

/// The blob frames (spec §5.7).
fn blob_client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (blob_id(), int_u64(), names()).prop_map(|(id, size, to)| ClientFrame::UploadStart(UploadStart {
            id,
            size,
            to
        })),
        (blob_id(), int_u64(), blob()).prop_map(|(id, offset, data)| ClientFrame::UploadChunk(UploadChunk {
            id,
            offset,
            data
        })),
        blob_id().prop_map(|id| ClientFrame::UploadFinish { id }),
        (blob_id(), int_u64(), int_u32()).prop_map(|(id, offset, len)| ClientFrame::Download(Download {
            id,
            offset,
            len
        })),
        blob_id().prop_map(|id| ClientFrame::BlobFetched { id }),
        (blob_id(), names()).prop_map(|(id, to)| ClientFrame::BlobGrant(BlobGrant { id, to })),
        blob_id().prop_map(|id| ClientFrame::BlobDelete { id }),
    ]
}

fn seen() -> impl Strategy<Value = Seen> {
    prop_oneof![
        Just(Seen::Hidden),
        vec(device_id(), 0..9).prop_map(|devices| Seen::Online { devices }),
        int_u64().prop_map(|last_seen_ms| Seen::Away { last_seen_ms }),
    ]
}

fn group_id() -> impl Strategy<Value = GroupId> {
    any::<[u8; 16]>().prop_map(GroupId)
}

fn group_info() -> impl Strategy<Value = GroupInfo> {
    let member = (text(), any::<bool>(), vec(device_id(), 0..9)).prop_map(|(user, admin, devices)| Member {
        user,
        admin,
        devices,
    });
    (group_id(), int_u64(), vec(member, 0..12)).prop_map(|(group, version, members)| GroupInfo {
        group,
        version,
        members,
    })
}

fn change_kind() -> impl Strategy<Value = ChangeKind> {
    prop::sample::select(vec![
        ChangeKind::Created,
        ChangeKind::Added,
        ChangeKind::Removed,
        ChangeKind::Left,
        ChangeKind::Promoted,
    ])
}

fn group_client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (group_id(), vec(text(), 0..9)).prop_map(|(group, members)| ClientFrame::CreateGroup { group, members }),
        (group_id(), vec(text(), 0..9)).prop_map(|(group, users)| ClientFrame::AddMembers { group, users }),
        (group_id(), vec(text(), 0..9)).prop_map(|(group, users)| ClientFrame::RemoveMembers { group, users }),
        group_id().prop_map(|group| ClientFrame::LeaveGroup { group }),
        (group_id(), text()).prop_map(|(group, user)| ClientFrame::MakeAdmin { group, user }),
        group_id().prop_map(|group| ClientFrame::GetGroup { group }),
        Just(ClientFrame::ListGroups),
        (msg_id(), group_id(), int_u64(), any::<[u8; 8]>(), blob()).prop_map(|(id, group, version, devices, body)| {
            ClientFrame::GroupSend(GroupSend {
                id,
                group,
                version,
                devices,
                body,
            })
        }),
        (
            msg_id(),
            group_id(),
            vec(
                (text(), device_id(), blob()).prop_map(|(user, device, data)| KeyBody { user, device, data }),
                0..9
            )
        )
            .prop_map(|(id, group, bodies)| ClientFrame::GroupKeys(GroupKeys { id, group, bodies })),
        (group_id(), text(), receipt_kind(), msg_ids())
            .prop_map(|(group, to, kind, ids)| ClientFrame::GroupReceipt(GroupReceipt { group, to, kind, ids })),
        (text(), any::<bool>()).prop_map(|(user, blocked)| ClientFrame::Block { user, blocked }),
        Just(ClientFrame::ListBlocked),
    ]
}

fn group_server_frame() -> impl Strategy<Value = ServerFrame> {
    let change =
        (text(), change_kind(), vec(text(), 0..5)).prop_map(|(by, kind, users)| GroupChange { by, kind, users });
    prop_oneof![
        group_info().prop_map(ServerFrame::Group),
        vec(
            (group_id(), int_u64()).prop_map(|(group, version)| GroupVersion { group, version }),
            0..9
        )
        .prop_map(|groups| ServerFrame::Groups { groups }),
        (msg_id(), group_info()).prop_map(|(id, group)| ServerFrame::GroupMismatch { id, group }),
        (int_u64(), msg_id(), device_addr(), group_id(), int_u64(), blob()).prop_map(
            |(seq, id, from, group, time_ms, body)| ServerFrame::GroupDeliver(GroupDeliver {
                seq,
                id,
                from,
                group,
                time_ms,
                body
            })
        ),
        (int_u64(), group_id(), int_u64(), vec(change, 0..4), int_u64()).prop_map(
            |(seq, group, version, changes, time_ms)| ServerFrame::GroupNotice(GroupNotice {
                seq,
                group,
                version,
                changes,
                time_ms
            })
        ),
        (
            int_u64(),
            group_id(),
            device_addr(),
            text(),
            receipt_kind(),
            msg_ids(),
            int_u64()
        )
            .prop_map(|(seq, group, from, to, kind, ids, time_ms)| ServerFrame::GroupReceipt(
                GroupReceiptDeliver {
                    seq,
                    group,
                    from,
                    to,
                    kind,
                    ids,
                    time_ms
                }
            )),
        vec(text(), 0..9).prop_map(|users| ServerFrame::Blocked { users }),
        (int_u64(), text(), any::<bool>(), int_u64()).prop_map(|(seq, user, blocked, time_ms)| {
            ServerFrame::BlockNotice(BlockNotice {
                seq,
                user,
                blocked,
                time_ms,
            })
        }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        12 => group_client_frame(),
        18 => base_client_frame(),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        8 => group_server_frame(),
        20 => base_server_frame(),
    ]
}

fn base_client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        blob_client_frame(),
        Just(ClientFrame::Ping),
        Just(ClientFrame::Pong),
        Just(ClientFrame::Close),
        (token(), text()).prop_map(|(invite, name)| ClientFrame::Register { invite, name }),
        token().prop_map(|code| ClientFrame::RedeemLink { code }),
        Just(ClientFrame::RequestLink),
        text().prop_map(|user| ClientFrame::ListDevices { user }),
        Just(ClientFrame::MyDevices),
        device_id().prop_map(|device| ClientFrame::RevokeDevice { device }),
        (msg_id(), text(), vec(body(), 0..9), vec(body(), 0..8))
            .prop_map(|(id, to, bodies, own)| ClientFrame::Send(Send { id, to, bodies, own })),
        int_u64().prop_map(|up_to| ClientFrame::Ack { up_to }),
        publish_keys().prop_map(|keys| ClientFrame::PublishKeys(Box::new(keys))),
        text().prop_map(|user| ClientFrame::ClaimKeys { user }),
        receipt().prop_map(ClientFrame::Receipt),
        msg_id().prop_map(|id| ClientFrame::Retract { id }),
        (text(), vec(body(), 0..9)).prop_map(|(to, bodies)| ClientFrame::Ephemeral(Ephemeral { to, bodies })),
        any::<bool>().prop_map(|everyone| ClientFrame::SetLastSeen { everyone }),
        vec(text(), 0..12).prop_map(|users| ClientFrame::WatchPresence { users }),
    ]
}

fn base_server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        Just(ServerFrame::Pong),
        Just(ServerFrame::Ping),
        (error_code(), text()).prop_map(|(code, text)| ServerFrame::Close { code, text }),
        (error_code(), text()).prop_map(|(code, text)| ServerFrame::Error { code, text }),
        (text(), device_id()).prop_map(|(user, device)| ServerFrame::Registered { user, device }),
        (token(), int_u64()).prop_map(|(code, expires_ms)| ServerFrame::LinkCode { code, expires_ms }),
        (text(), vec(device_id(), 0..9)).prop_map(|(user, devices)| ServerFrame::Devices { user, devices }),
        vec(device_info(), 0..9).prop_map(|devices| ServerFrame::MyDevices { devices }),
        Just(ServerFrame::Done),
        (msg_id(), int_u64()).prop_map(|(id, time_ms)| ServerFrame::Accepted { id, time_ms }),
        (msg_id(), vec(device_addr(), 0..9), vec(device_addr(), 0..9))
            .prop_map(|(id, missing, extra)| ServerFrame::Mismatch { id, missing, extra }),
        (int_u64(), msg_id(), device_addr(), text(), int_u64(), blob()).prop_map(
            |(seq, id, from, to, time_ms, body)| ServerFrame::Deliver(Deliver {
                seq,
                id,
                from,
                to,
                time_ms,
                body
            })
        ),
        Just(ServerFrame::QueueDrained),
        int_u32().prop_map(|one_time| ServerFrame::KeyCount { one_time }),
        (text(), vec(device_keys(), 0..9)).prop_map(|(user, devices)| ServerFrame::Keys { user, devices }),
        receipt_deliver().prop_map(ServerFrame::Receipt),
        gap_notice().prop_map(ServerFrame::Gap),
        expired_notice().prop_map(ServerFrame::Expired),
        (device_addr(), text(), blob()).prop_map(|(from, to, body)| ServerFrame::Ephemeral(EphemeralDeliver {
            from,
            to,
            body
        })),
        (text(), seen()).prop_map(|(user, seen)| ServerFrame::Presence(tidings::wire::Presence { user, seen })),
        int_u64().prop_map(|after_ms| ServerFrame::RetryAfter { after_ms }),
        (blob_id(), int_u64(), any::<bool>())
            .prop_map(|(id, received, complete)| ServerFrame::UploadStatus(UploadStatus { id, received, complete })),
        (blob_id(), int_u64(), blob()).prop_map(|(id, offset, data)| ServerFrame::BlobData(BlobData {
            id,
            offset,
            data
        })),
    ]
}

/// The spec's tag for each frame (spec §5.2). The match has no wildcard:
/// a new variant does not compile until it is given its tag here, which is
/// the reminder to give it a strategy above too.
fn client_tag(f: &ClientFrame) -> u32 {
    match f {
        ClientFrame::Ping => 0,
        ClientFrame::Pong => 1,
        ClientFrame::Close => 2,
        ClientFrame::Register { .. } => 3,
        ClientFrame::RedeemLink { .. } => 4,
        ClientFrame::RequestLink => 5,
        ClientFrame::ListDevices { .. } => 6,
        ClientFrame::MyDevices => 7,
        ClientFrame::RevokeDevice { .. } => 8,
        ClientFrame::Send(_) => 9,
        ClientFrame::Ack { .. } => 10,
        ClientFrame::PublishKeys(_) => 11,
        ClientFrame::ClaimKeys { .. } => 12,
        ClientFrame::Receipt(_) => 13,
        ClientFrame::Retract { .. } => 14,
        ClientFrame::Ephemeral(_) => 15,
        ClientFrame::SetLastSeen { .. } => 16,
        ClientFrame::WatchPresence { .. } => 17,
        ClientFrame::UploadStart(_) => 18,
        ClientFrame::UploadChunk(_) => 19,
        ClientFrame::UploadFinish { .. } => 20,
        ClientFrame::Download(_) => 21,
        ClientFrame::BlobFetched { .. } => 22,
        ClientFrame::BlobGrant(_) => 23,
        ClientFrame::BlobDelete { .. } => 24,
        ClientFrame::CreateGroup { .. } => 25,
        ClientFrame::AddMembers { .. } => 26,
        ClientFrame::RemoveMembers { .. } => 27,
        ClientFrame::LeaveGroup { .. } => 28,
        ClientFrame::MakeAdmin { .. } => 29,
        ClientFrame::GetGroup { .. } => 30,
        ClientFrame::ListGroups => 31,
        ClientFrame::GroupSend(_) => 32,
        ClientFrame::GroupKeys(_) => 33,
        ClientFrame::GroupReceipt(_) => 34,
        ClientFrame::Block { .. } => 35,
        ClientFrame::ListBlocked => 36,
    }
}

/// The spec's tag for each frame (spec §5.3); see [`client_tag`].
fn server_tag(f: &ServerFrame) -> u32 {
    match f {
        ServerFrame::Pong => 0,
        ServerFrame::Ping => 1,
        ServerFrame::Close { .. } => 2,
        ServerFrame::Error { .. } => 3,
        ServerFrame::Registered { .. } => 4,
        ServerFrame::LinkCode { .. } => 5,
        ServerFrame::Devices { .. } => 6,
        ServerFrame::MyDevices { .. } => 7,
        ServerFrame::Done => 8,
        ServerFrame::Accepted { .. } => 9,
        ServerFrame::Mismatch { .. } => 10,
        ServerFrame::Deliver(_) => 11,
        ServerFrame::QueueDrained => 12,
        ServerFrame::KeyCount { .. } => 13,
        ServerFrame::Keys { .. } => 14,
        ServerFrame::Receipt(_) => 15,
        ServerFrame::Gap(_) => 16,
        ServerFrame::Expired(_) => 17,
        ServerFrame::Ephemeral(_) => 18,
        ServerFrame::Presence(_) => 19,
        ServerFrame::RetryAfter { .. } => 20,
        ServerFrame::UploadStatus(_) => 21,
        ServerFrame::BlobData(_) => 22,
        ServerFrame::Group(_) => 23,
        ServerFrame::Groups { .. } => 24,
        ServerFrame::GroupMismatch { .. } => 25,
        ServerFrame::GroupDeliver(_) => 26,
        ServerFrame::GroupNotice(_) => 27,
        ServerFrame::GroupReceipt(_) => 28,
        ServerFrame::Blocked { .. } => 29,
        ServerFrame::BlockNotice(_) => 30,
    }
}

// ---------------------------------------------------------------------------
// Varint helpers, written from the spec (§5.1), not from postcard

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out
}

/// Length of the varint at the start of `bytes`.
fn varint_len(bytes: &[u8]) -> usize {
    bytes.iter().position(|b| b & 0x80 == 0).expect("terminated varint") + 1
}

/// Replaces the `len`-byte varint at `at` by an overlong form of the same
/// value: one more byte, `x | 0x80, 0x00`.
fn pad_varint(bytes: &[u8], at: usize, len: usize) -> Vec<u8> {
    let mut out = bytes[..at + len].to_vec();
    out[at + len - 1] |= 0x80;
    out.push(0x00);
    out.extend_from_slice(&bytes[at + len..]);
    out
}

// ---------------------------------------------------------------------------
// Round trips

#[test]
fn strategies_cover_every_frame_kind() {
    let mut runner = TestRunner::deterministic();
    let (client, server) = (client_frame(), server_frame());
    let mut client_seen = [false; CLIENT_FRAME_KINDS as usize];
    let mut server_seen = [false; SERVER_FRAME_KINDS as usize];
    for _ in 0..2000 {
        client_seen[client_tag(&client.new_tree(&mut runner).unwrap().current()) as usize] = true;
        server_seen[server_tag(&server.new_tree(&mut runner).unwrap().current()) as usize] = true;
    }
    assert!(client_seen.iter().all(|s| *s), "{client_seen:?}");
    assert!(server_seen.iter().all(|s| *s), "{server_seen:?}");
}

proptest! {
    #[test]
    fn client_frames_round_trip(req in int_u32(), frame in client_frame()) {
        let mut out = Vec::new();
        encode_client(req, &frame, &mut out);
        prop_assert!(out.len() <= MAX_FRAME_LEN);
        let req_len = varint_len(&out);
        prop_assert_eq!(&out[..req_len], &varint(req.into())[..]);
        let rest = &out[req_len..];
        prop_assert_eq!(&rest[..varint_len(rest)], &varint(client_tag(&frame).into())[..]);
        let mut scratch = Vec::new();
        prop_assert_eq!(decode_client(&out, &mut scratch), Ok((req, frame)));
    }

    #[test]
    fn server_frames_round_trip(req in int_u32(), frame in server_frame()) {
        let mut out = Vec::new();
        encode_server(req, &frame, &mut out);
        prop_assert!(out.len() <= MAX_FRAME_LEN);
        let req_len = varint_len(&out);
        prop_assert_eq!(&out[..req_len], &varint(req.into())[..]);
        let rest = &out[req_len..];
        prop_assert_eq!(&rest[..varint_len(rest)], &varint(server_tag(&frame).into())[..]);
        let mut scratch = Vec::new();
        prop_assert_eq!(decode_server(&out, &mut scratch), Ok((req, frame)));
    }
}

// ---------------------------------------------------------------------------
// Record framing (spec §3)

/// Record body lengths: mostly small, sometimes near the maximum.
fn record_bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let body = prop_oneof![
        12 => vec(any::<u8>(), 0..300),
        1 => (MAX_RECORD_LEN - 300..=MAX_RECORD_LEN).prop_map(|n| vec![0x5a; n]),
    ];
    vec(body, 0..12)
}

/// Where to cut a stream: at random points, or after every byte.
#[derive(Debug, Clone)]
enum Split {
    At(Vec<prop::sample::Index>),
    EveryByte,
}

fn split() -> impl Strategy<Value = Split> {
    prop_oneof![
        4 => vec(any::<prop::sample::Index>(), 0..40).prop_map(Split::At),
        1 => Just(Split::EveryByte),
    ]
}

fn chunks<'a>(stream: &'a [u8], how: &Split) -> Vec<&'a [u8]> {
    match how {
        Split::EveryByte => stream.chunks(1).collect(),
        Split::At(points) => {
            let mut cuts: Vec<usize> = points.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
        }
    }
}

/// Feeds `pieces` with a fixed cap; returns the bodies seen and the first
/// error. Checks after every feed that at most one header and one capped
/// body are buffered.
fn feed_all(pieces: &[&[u8]], cap: usize) -> (Vec<Vec<u8>>, Option<RecordError>) {
    let mut dec = RecordDecoder::new();
    let mut got = Vec::new();
    for piece in pieces {
        let res = dec.feed(piece, cap, |r: &[u8]| {
            assert!(r.len() <= cap);
            got.push(r.to_vec());
            Ok::<_, RecordError>(Flow::Continue(cap))
        });
        assert!(dec.buffered() <= RECORD_HEADER_LEN + cap);
        match res {
            Ok(all) => assert!(all),
            Err(e) => return (got, Some(e)),
        }
    }
    assert_eq!(dec.buffered(), 0, "nothing left over after whole records");
    (got, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn records_survive_any_split(bodies in record_bodies(), how in split()) {
        let mut stream = Vec::new();
        for b in &bodies {
            write_record(b, &mut stream);
        }
        let (got, err) = feed_all(&chunks(&stream, &how), MAX_RECORD_LEN);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, bodies);
    }

    #[test]
    fn the_cap_stops_the_stream_at_the_first_long_record(
        bodies in vec(vec(any::<u8>(), 0..200), 1..10),
        cap in 0usize..200,
        how in split(),
    ) {
        let mut stream = Vec::new();
        for b in &bodies {
            write_record(b, &mut stream);
        }
        let (got, err) = feed_all(&chunks(&stream, &how), cap);
        let first_long = bodies.iter().position(|b| b.len() > cap);
        match first_long {
            None => {
                prop_assert_eq!(err, None);
                prop_assert_eq!(got, bodies);
            }
            Some(i) => {
                prop_assert_eq!(err, Some(RecordError::TooLong { len: bodies[i].len(), cap }));
                prop_assert_eq!(got.as_slice(), &bodies[..i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Canonical encoding (spec §5.1)

/// Checks that padding the varint at `at` (of `len` bytes, at most `max`
/// allowed for its type) is refused: `NonCanonical` while the padded form
/// still fits the type, `Malformed` once it does not.
fn check_padded(
    decode: Decoder,
    bytes: &[u8],
    at: usize,
    len: usize,
    max: usize,
    req: u32,
    req_is_padded: bool,
) -> Result<(), TestCaseError> {
    let padded = pad_varint(bytes, at, len);
    let got = decode(&padded);
    if len < max {
        prop_assert_eq!(got, Err(FrameError::NonCanonical { req }), "{:02x?}", padded);
    } else if req_is_padded {
        prop_assert_eq!(got, Err(FrameError::Malformed { req: None }), "{:02x?}", padded);
    } else {
        prop_assert_eq!(got, Err(FrameError::Malformed { req: Some(req) }), "{:02x?}", padded);
    }
    Ok(())
}

/// A decoder reduced to the request id it returns.
type Decoder = fn(&[u8]) -> Result<u32, FrameError>;

fn client_decoder(bytes: &[u8]) -> Result<u32, FrameError> {
    decode_client(bytes, &mut Vec::new()).map(|(r, _)| r)
}

fn server_decoder(bytes: &[u8]) -> Result<u32, FrameError> {
    decode_server(bytes, &mut Vec::new()).map(|(r, _)| r)
}

/// Client frames whose last field is a varint, with that varint's value
/// and the most bytes its type allows.
fn client_frame_ending_in_varint() -> impl Strategy<Value = (ClientFrame, u64, usize)> {
    prop_oneof![
        device_id().prop_map(|device| (ClientFrame::RevokeDevice { device }, device.0.into(), 5)),
        int_u64().prop_map(|up_to| (ClientFrame::Ack { up_to }, up_to, 10)),
    ]
}

/// Server frames whose last field is a varint, with that varint's value
/// and the most bytes its type allows.
fn server_frame_ending_in_varint() -> impl Strategy<Value = (ServerFrame, u64, usize)> {
    prop_oneof![
        (text(), device_id()).prop_map(|(user, device)| (ServerFrame::Registered { user, device }, device.0.into(), 5)),
        (token(), int_u64()).prop_map(|(code, expires_ms)| (
            ServerFrame::LinkCode { code, expires_ms },
            expires_ms,
            10
        )),
        (msg_id(), int_u64()).prop_map(|(id, time_ms)| (ServerFrame::Accepted { id, time_ms }, time_ms, 10)),
        (text(), vec(device_id(), 1..9)).prop_map(|(user, devices)| {
            let last = devices.last().map_or(0, |d| d.0.into());
            (ServerFrame::Devices { user, devices }, last, 5)
        }),
        int_u32().prop_map(|one_time| (ServerFrame::KeyCount { one_time }, one_time.into(), 5)),
        receipt_deliver().prop_map(|r| {
            let time_ms = r.time_ms;
            (ServerFrame::Receipt(r), time_ms, 10)
        }),
        (int_u64(), vec(lost(), 1..4)).prop_map(|(seq, lost)| {
            let last = lost.last().map_or(0, |l| l.last_ms);
            (ServerFrame::Gap(GapNotice { seq, lost }), last, 10)
        }),
    ]
}

proptest! {
    #[test]
    fn overlong_request_ids_and_tags_are_refused(req in int_u32(), frame in client_frame(), sframe in server_frame()) {
        let mut client = Vec::new();
        encode_client(req, &frame, &mut client);
        let mut server = Vec::new();
        encode_server(req, &sframe, &mut server);
        for (bytes, decode) in [(client, client_decoder as Decoder), (server, server_decoder as Decoder)] {
            let req_len = varint_len(&bytes);
            check_padded(decode, &bytes, 0, req_len, 5, req, true)?;
            // The tag is a u32 varint too; every known tag fits in one byte.
            let tag_len = varint_len(&bytes[req_len..]);
            prop_assert_eq!(tag_len, 1);
            check_padded(decode, &bytes, req_len, tag_len, 5, req, false)?;
        }
    }

    #[test]
    fn overlong_fields_are_refused(
        req in int_u32(),
        (frame, value, max) in client_frame_ending_in_varint(),
        (sframe, svalue, smax) in server_frame_ending_in_varint(),
    ) {
        let mut bytes = Vec::new();
        encode_client(req, &frame, &mut bytes);
        let len = varint(value).len();
        prop_assert!(bytes.ends_with(&varint(value)));
        check_padded(client_decoder, &bytes, bytes.len() - len, len, max, req, false)?;

        let mut bytes = Vec::new();
        encode_server(req, &sframe, &mut bytes);
        let len = varint(svalue).len();
        prop_assert!(bytes.ends_with(&varint(svalue)));
        check_padded(server_decoder, &bytes, bytes.len() - len, len, smax, req, false)?;
    }

    #[test]
    fn overlong_error_codes_are_refused(req in int_u32(), code in error_code(), text in text(), close in any::<bool>()) {
        let frame = if close { ServerFrame::Close { code, text } } else { ServerFrame::Error { code, text } };
        let mut bytes = Vec::new();
        encode_server(req, &frame, &mut bytes);
        let at = varint_len(&bytes) + 1;
        let len = varint_len(&bytes[at..]);
        check_padded(server_decoder, &bytes, at, len, 3, req, false)?;
    }

    #[test]
    fn option_and_bool_bytes_other_than_0_and_1_are_refused(
        req in int_u32(),
        keys in publish_keys(),
        user in text(),
        devices in vec(device_keys(), 1..4),
        bad in 2u8..=255,
    ) {
        // PublishKeys: the byte after the tag is `identity`'s option byte.
        let mut bytes = Vec::new();
        encode_client(req, &ClientFrame::PublishKeys(Box::new(keys)), &mut bytes);
        let at = varint_len(&bytes) + 1;
        bytes[at] = bad;
        prop_assert_eq!(decode_client(&bytes, &mut Vec::new()), Err(FrameError::Malformed { req: Some(req) }));

        // Keys: the last byte is the last device's `fallback` bool.
        let mut bytes = Vec::new();
        encode_server(req, &ServerFrame::Keys { user, devices }, &mut bytes);
        *bytes.last_mut().unwrap() = bad;
        prop_assert_eq!(decode_server(&bytes, &mut Vec::new()), Err(FrameError::Malformed { req: Some(req) }));
    }

    #[test]
    fn trailing_bytes_are_refused(req in int_u32(), frame in client_frame(), sframe in server_frame(), extra in vec(any::<u8>(), 1..4)) {
        let mut bytes = Vec::new();
        encode_client(req, &frame, &mut bytes);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode_client(&bytes, &mut Vec::new()), Err(FrameError::Malformed { req: Some(req) }));

        let mut bytes = Vec::new();
        encode_server(req, &sframe, &mut bytes);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode_server(&bytes, &mut Vec::new()), Err(FrameError::Malformed { req: Some(req) }));
    }

    #[test]
    fn unknown_tags_keep_the_request_id(req in int_u32(), tag in any::<u32>(), tail in vec(any::<u8>(), 0..32)) {
        let mut bytes = varint(req.into());
        let client_tag = tag.max(CLIENT_FRAME_KINDS);
        let mut client = bytes.clone();
        client.extend(varint(client_tag.into()));
        client.extend_from_slice(&tail);
        prop_assert_eq!(
            decode_client(&client, &mut Vec::new()),
            Err(FrameError::Unsupported { req, tag: client_tag })
        );
        let server_tag = tag.max(SERVER_FRAME_KINDS);
        bytes.extend(varint(server_tag.into()));
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(
            decode_server(&bytes, &mut Vec::new()),
            Err(FrameError::Unsupported { req, tag: server_tag })
        );
    }
}

// ---------------------------------------------------------------------------
// Arbitrary input

/// Arbitrary bytes, or a valid request id and known tag followed by
/// arbitrary bytes (to reach the frame decoders).
fn junk(kinds: u32) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        (int_u32(), 0..kinds, vec(any::<u8>(), 0..200)).prop_map(|(req, tag, tail)| {
            let mut v = varint(req.into());
            v.extend(varint(tag.into()));
            v.extend(tail);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_client_bytes_never_panic(bytes in junk(CLIENT_FRAME_KINDS)) {
        // Whatever is accepted is the one encoding of what it decoded to.
        if let Ok((req, frame)) = decode_client(&bytes, &mut Vec::new()) {
            let mut again = Vec::new();
            encode_client(req, &frame, &mut again);
            prop_assert_eq!(again, bytes);
        }
    }

    #[test]
    fn arbitrary_server_bytes_never_panic(bytes in junk(SERVER_FRAME_KINDS)) {
        if let Ok((req, frame)) = decode_server(&bytes, &mut Vec::new()) {
            let mut again = Vec::new();
            encode_server(req, &frame, &mut again);
            prop_assert_eq!(again, bytes);
        }
    }

    #[test]
    fn arbitrary_streams_never_panic_the_record_decoder(
        bytes in vec(any::<u8>(), 0..600),
        caps in vec(0usize..=MAX_RECORD_LEN, 1..8),
        how in split(),
    ) {
        let mut dec = RecordDecoder::new();
        let mut next = 0;
        for piece in chunks(&bytes, &how) {
            let cap = caps[next % caps.len()];
            let res = dec.feed(piece, cap, |r: &[u8]| {
                assert!(r.len() <= caps[next % caps.len()]);
                next += 1;
                Ok::<_, RecordError>(Flow::Continue(caps[next % caps.len()]))
            });
            if res.is_err() {
                break;
            }
        }
    }
}

#[test]
fn too_long_frames_are_refused_before_decoding() {
    let mut bytes = vec![0x01, 0x00];
    bytes.resize(MAX_FRAME_LEN + 1, 0);
    assert_eq!(decode_client(&bytes, &mut Vec::new()), Err(FrameError::TooLong));
    assert_eq!(decode_server(&bytes, &mut Vec::new()), Err(FrameError::TooLong));
}

#[test]
fn the_largest_receipts_and_notices_fit_in_a_frame() {
    // spec §6: a receipt names at most MAX_RECEIPT_IDS messages, and the
    // server folds waiting receipts and expiry notices up to that many; with
    // the longest names and the largest numbers each still fits one record.
    let addr = DeviceAddr {
        user: "z".repeat(MAX_NAME_LEN),
        device: DeviceId(u32::MAX),
    };
    let ids = vec![MsgId([0xff; 16]); MAX_RECEIPT_IDS];
    let kind = ReceiptKind(u8::MAX);
    let mut out = Vec::new();
    let client = ClientFrame::Receipt(Receipt {
        to: addr.user.clone(),
        kind,
        ids: ids.clone(),
    });
    encode_client(u32::MAX, &client, &mut out);
    assert!(out.len() <= MAX_FRAME_LEN, "Receipt: {} bytes", out.len());
    assert_eq!(decode_client(&out, &mut Vec::new()), Ok((u32::MAX, client)));
    for frame in [
        ServerFrame::Receipt(ReceiptDeliver {
            seq: u64::MAX,
            from: addr.clone(),
            to: addr.user.clone(),
            kind,
            ids: ids.clone(),
            time_ms: u64::MAX,
        }),
        ServerFrame::Expired(ExpiredNotice {
            seq: u64::MAX,
            device: addr.clone(),
            ids: ids.clone(),
        }),
    ] {
        out.clear();
        encode_server(u32::MAX, &frame, &mut out);
        assert!(out.len() <= MAX_FRAME_LEN, "{}: {} bytes", frame.kind(), out.len());
        assert_eq!(decode_server(&out, &mut Vec::new()), Ok((u32::MAX, frame)));
    }
}
