//! Checks `protocol-spec/` against the code, so that the two cannot drift:
//!
//! - every frame vector (`client-*`, `server-*`) decodes and re-encodes to
//!   exactly its bytes, its file name's tag and kind match the frame, and
//!   every tag of both enums has a vector;
//! - every `invalid-*` vector is refused with the error its `# expect:`
//!   line names;
//! - the preamble and refusal vectors are `wire::PREAMBLE` and
//!   `Refusal::to_bytes`;
//! - the invite and link code vectors' text decodes to their bytes (§11);
//! - `handshake.txt` is what `Noise_XK_25519_ChaChaPoly_SHA256` with the
//!   preamble as prologue produces from its keys, and our own handshake
//!   completes against a peer using those keys (§4);
//! - the key directory vectors (§5.4) hold real keys and Ed25519
//!   signatures: each is rebuilt here from the seeds its comments name,
//!   signing the messages exactly as §5.4 states them, and `tidings::keys`
//!   accepts every signature in them;
//! - the README's §7 table lists every `ErrorCode` by number and name, its
//!   §6 table states the limits and defaults the code uses (quotas and
//!   retention included), and each of its worked examples is byte for
//!   byte the vector it names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tidings::hub::HubConfig;
use tidings::noise::{self, Keypair, NOISE_PARAMS};
use tidings::server::sweeper::RetentionConfig;
use tidings::store::Quotas;
use tidings::wire::{
    self, CLIENT_FRAME_KINDS, ClientFrame, DeviceId, DeviceKeys, ErrorCode, Flow, IdentityKeys, PREAMBLE, PublishKeys,
    RecordDecoder, RecordError, Refusal, RefusalNotice, SERVER_FRAME_KINDS, ServerFrame, Signature, SignedKey,
    decode_client, decode_server, encode_client, encode_server,
};

fn spec_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol-spec")
}

fn readme() -> String {
    fs::read_to_string(spec_dir().join("README.md")).expect("protocol-spec/README.md")
}

/// Every vector file: (file name, contents).
fn vector_files() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(spec_dir().join("vectors")).expect("protocol-spec/vectors") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        out.insert(name, fs::read_to_string(&path).unwrap());
    }
    assert!(!out.is_empty());
    out
}

/// Parses hex that may contain whitespace.
fn parse_hex(text: &str) -> Vec<u8> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(&digits).unwrap_or_else(|e| panic!("bad hex {digits:?}: {e}"))
}

/// A `.hex` vector: its comment lines (without `#`) and its bytes.
fn parse_vector(text: &str) -> (Vec<String>, Vec<u8>) {
    let mut comments = Vec::new();
    let mut hex = String::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix('#') {
            comments.push(c.trim().to_string());
        } else {
            hex.push_str(line);
        }
    }
    (comments, parse_hex(&hex))
}

/// Reads one LEB128 varint (for the checks below, independent of postcard).
fn varint(bytes: &[u8]) -> (u64, &[u8]) {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (v, &bytes[i + 1..]);
        }
    }
    panic!("unterminated varint");
}

/// `QueueDrained` -> `queue-drained`.
fn kebab(kind: &str) -> String {
    let mut out = String::new();
    for (i, c) in kind.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits `client-09-send.hex` into ("client", 9, "send").
fn frame_vector_name(name: &str) -> Option<(&str, u32, &str)> {
    let stem = name.strip_suffix(".hex")?;
    let (side, rest) = stem.split_once('-')?;
    if side != "client" && side != "server" {
        return None;
    }
    let (tag, what) = rest.split_once('-')?;
    assert_eq!(tag.len(), 2, "{name}: the tag is two digits");
    Some((side, tag.parse().ok()?, what))
}

#[test]
fn every_frame_vector_round_trips() {
    let mut client_tags = BTreeSet::new();
    let mut server_tags = BTreeSet::new();
    let mut scratch = Vec::new();
    for (name, text) in vector_files() {
        let Some((side, tag, what)) = frame_vector_name(&name) else {
            continue;
        };
        let (_, bytes) = parse_vector(&text);
        let (req, rest) = varint(&bytes);
        let (wire_tag, _) = varint(rest);
        assert_eq!(wire_tag, u64::from(tag), "{name}: tag on the wire");
        let mut again = Vec::new();
        let kind = if side == "client" {
            let (r, frame) = decode_client(&bytes, &mut scratch).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(u64::from(r), req, "{name}");
            encode_client(r, &frame, &mut again);
            client_tags.insert(tag);
            frame.kind()
        } else {
            let (r, frame) = decode_server(&bytes, &mut scratch).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(u64::from(r), req, "{name}");
            encode_server(r, &frame, &mut again);
            server_tags.insert(tag);
            frame.kind()
        };
        assert_eq!(hex::encode(&again), hex::encode(&bytes), "{name}: re-encoding");
        let k = kebab(kind);
        assert!(
            what == k || what.starts_with(&format!("{k}-")),
            "{name}: the file name should name the kind {kind}"
        );
    }
    let all_client: BTreeSet<u32> = (0..CLIENT_FRAME_KINDS).collect();
    let all_server: BTreeSet<u32> = (0..SERVER_FRAME_KINDS).collect();
    assert_eq!(client_tags, all_client, "a client vector for every tag");
    assert_eq!(server_tags, all_server, "a server vector for every tag");
}

#[test]
fn invalid_vectors_are_refused_as_expected() {
    let mut scratch = Vec::new();
    let mut seen = 0;
    for (name, text) in vector_files() {
        let Some(rest) = name.strip_prefix("invalid-") else {
            continue;
        };
        let (comments, bytes) = parse_vector(&text);
        let expect = comments
            .iter()
            .find_map(|c| c.strip_prefix("expect:"))
            .unwrap_or_else(|| panic!("{name}: no '# expect:' line"))
            .trim();
        let got = if rest.starts_with("client-") {
            decode_client(&bytes, &mut scratch).map(|_| ())
        } else if rest.starts_with("server-") {
            decode_server(&bytes, &mut scratch).map(|_| ())
        } else {
            panic!("{name}: invalid-client-* or invalid-server-*");
        };
        let err = got.expect_err(&name);
        assert_eq!(format!("{err:?}"), expect, "{name}");
        seen += 1;
    }
    assert!(seen > 0);
}

#[test]
fn preamble_and_refusals() {
    let files = vector_files();
    let (_, preamble) = parse_vector(&files["preamble.hex"]);
    assert_eq!(preamble, PREAMBLE);
    assert_eq!(wire::check_preamble(&PREAMBLE), Ok(()));

    let mut refusals = 0;
    for (name, text) in &files {
        let Some(reason) = name.strip_prefix("refusal-").and_then(|n| n.strip_suffix(".hex")) else {
            continue;
        };
        let (_, bytes) = parse_vector(text);
        let busy = |r: Refusal| {
            let n = RefusalNotice::parse(&bytes).unwrap_or_else(|| panic!("{name}: not a refusal"));
            assert_eq!(n.known(), Some(r), "{name}");
            assert_eq!(n.version, wire::PROTOCOL_VERSION, "{name}");
            let retry = n.retry_after.unwrap_or_else(|| panic!("{name}: no retry-after"));
            assert_eq!(bytes, r.busy_bytes(retry), "{name}");
            assert_eq!(RefusalNotice::len_for(&bytes), Some(wire::BUSY_REFUSAL_LEN), "{name}");
        };
        match reason {
            "bad-magic" | "unsupported-version" => {
                let refusal = if reason == "bad-magic" {
                    Refusal::BadMagic
                } else {
                    Refusal::UnsupportedVersion
                };
                assert_eq!(bytes, refusal.to_bytes(), "{name}");
                assert_eq!(
                    Refusal::parse(&bytes),
                    Some((refusal, wire::PROTOCOL_VERSION)),
                    "{name}"
                );
            }
            "address-connections" => busy(Refusal::AddressConnections),
            "address-rate" => busy(Refusal::AddressRate),
            "server-full" => busy(Refusal::ServerFull),
            "shutting-down" => busy(Refusal::ShuttingDown),
            other => panic!("unknown refusal vector {other}"),
        }
        refusals += 1;
    }
    assert_eq!(refusals, 6);
}

#[test]
fn code_vectors_decode_to_their_bytes() {
    let files = vector_files();
    for name in ["invite-code.hex", "link-code.hex"] {
        let (comments, bytes) = parse_vector(&files[name]);
        assert_eq!(bytes.len(), 56, "{name}");
        let text = comments
            .iter()
            .find_map(|c| c.strip_prefix("text:"))
            .unwrap_or_else(|| panic!("{name}: no '# text:' line"))
            .trim();
        let rest = text.strip_prefix("tidings://").expect("scheme");
        let (authority, code) = rest.rsplit_once('/').expect("a '/' before the code");
        let (host, port) = authority.rsplit_once(':').expect("HOST:PORT");
        assert!(!host.is_empty(), "{name}");
        port.parse::<u16>().expect("decimal port");
        assert_eq!(code.len(), 75, "{name}: 56 bytes are 75 base64 characters");
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(code)
            .expect("base64url without padding");
        assert_eq!(decoded, bytes, "{name}");
        // The README shows the same text.
        assert!(readme().contains(text), "{name}: the README's §11 example");
    }
}

/// `name = hex` lines of `handshake.txt`.
fn handshake_vector() -> BTreeMap<String, Vec<u8>> {
    let text = &vector_files()["handshake.txt"];
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').expect("name = hex");
            (k.trim().to_string(), parse_hex(v))
        })
        .collect()
}

fn record(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_record(body, &mut out);
    out
}

/// The body of the single record in `bytes`.
fn body_of(bytes: &[u8]) -> Vec<u8> {
    let mut bodies = Vec::new();
    RecordDecoder::new()
        .feed(bytes, wire::MAX_RECORD_LEN, |b: &[u8]| {
            bodies.push(b.to_vec());
            Ok::<_, RecordError>(Flow::Continue(wire::MAX_RECORD_LEN))
        })
        .unwrap();
    assert_eq!(bodies.len(), 1);
    bodies.pop().unwrap()
}

#[test]
fn handshake_transcript() {
    let v = handshake_vector();
    let key = |k: &str| -> &[u8] { &v[k] };
    for who in ["client_static", "client_ephemeral", "server_static", "server_ephemeral"] {
        let kp = Keypair::from_private(key(&format!("{who}_private"))).unwrap();
        assert_eq!(&kp.public[..], key(&format!("{who}_public")), "{who}");
    }
    assert_eq!(key("prologue"), PREAMBLE);

    // Rebuild the transcript with fixed ephemeral keys (a snow test hook).
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
    let mut client = snow::Builder::new(params.clone())
        .local_private_key(key("client_static_private"))
        .and_then(|b| b.remote_public_key(key("server_static_public")))
        .and_then(|b| b.prologue(&PREAMBLE))
        .unwrap()
        .fixed_ephemeral_key_for_testing_only(key("client_ephemeral_private"))
        .build_initiator()
        .unwrap();
    let mut server = snow::Builder::new(params)
        .local_private_key(key("server_static_private"))
        .and_then(|b| b.prologue(&PREAMBLE))
        .unwrap()
        .fixed_ephemeral_key_for_testing_only(key("server_ephemeral_private"))
        .build_responder()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut payload = [0u8; 256];
    for (name, sender_is_client, len) in [("message1", true, 48), ("message2", false, 48), ("message3", true, 64)] {
        let (from, to) = if sender_is_client {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        let n = from.write_message(&[], &mut buf).unwrap();
        assert_eq!(n, len, "{name}");
        assert_eq!(record(&buf[..n]), key(name), "{name}");
        assert_eq!(
            to.read_message(&buf[..n], &mut payload).unwrap(),
            0,
            "{name}: empty payload"
        );
    }
    assert_eq!(client.get_handshake_hash(), key("handshake_hash"));
    let mut client = client.into_transport_mode().unwrap();
    let mut server = server.into_transport_mode().unwrap();
    let mut seal = |t: &mut snow::TransportState, plain: &[u8]| {
        let n = t.write_message(plain, &mut buf).unwrap();
        record(&buf[..n])
    };
    assert_eq!(seal(&mut client, &[0x01, 0x00]), key("c2s_ping"));
    assert_eq!(seal(&mut server, &[0x01, 0x00]), key("s2c_pong"));
    assert_eq!(seal(&mut client, &[]), key("c2s_rekey"));
    client.rekey_outgoing();
    assert_eq!(seal(&mut client, &[0x02, 0x00]), key("c2s_ping_after_rekey"));
}

#[test]
fn our_handshake_matches_the_transcripts_parameters() {
    // Our client (random ephemeral) against a responder holding the
    // vector's server keys, then our transport's records are opened by it,
    // rekey marker included: the prologue, pattern and rekey rule agree.
    let v = handshake_vector();
    let now = Instant::now();
    let device = Keypair::from_private(&v["client_static_private"]).unwrap();
    let server_public: noise::PublicKey = v["server_static_public"].as_slice().try_into().unwrap();
    let mut c2s = Vec::new();
    let hello = noise::client_start(&device, &server_public, &mut c2s).unwrap();
    assert_eq!(&c2s[..8], &PREAMBLE);
    let mut server = snow::Builder::new(NOISE_PARAMS.parse().unwrap())
        .local_private_key(&v["server_static_private"])
        .and_then(|b| b.prologue(&v["prologue"]))
        .and_then(|b| b.build_responder())
        .unwrap();
    let mut buf = [0u8; 256];
    let mut payload = [0u8; 256];
    assert_eq!(server.read_message(&body_of(&c2s[8..]), &mut payload).unwrap(), 0);
    let n = server.write_message(&[], &mut buf).unwrap();
    let mut c2s = Vec::new();
    let mut transport = hello.handle(&buf[..n], now, &mut c2s).unwrap();
    assert_eq!(server.read_message(&body_of(&c2s), &mut payload).unwrap(), 0);
    assert_eq!(server.get_remote_static(), Some(&device.public[..]));
    let mut server = server.into_transport_mode().unwrap();

    let mut out = Vec::new();
    transport.seal(&[0x01, 0x00], now, &mut out).unwrap();
    let n = server.read_message(&body_of(&out), &mut payload).unwrap();
    assert_eq!(&payload[..n], [0x01, 0x00]);
    // After an hour the next frame is preceded by a rekey marker (§4.3).
    let mut out = Vec::new();
    transport
        .seal(&[0x02, 0x00], now + noise::REKEY_AFTER, &mut out)
        .unwrap();
    let (marker, rest) = out.split_at(2 + 16);
    assert_eq!(server.read_message(&body_of(marker), &mut payload).unwrap(), 0);
    server.rekey_incoming();
    let n = server.read_message(&body_of(rest), &mut payload).unwrap();
    assert_eq!(&payload[..n], [0x02, 0x00]);
}

/// A device of the key directory vectors (§5.4): device `n`'s Ed25519 seed
/// is 32 bytes of `e0 + n`, its Curve25519 identity key the X25519 public
/// key of 32 bytes of `c0 + n`.
struct VectorDevice {
    signer: Ed25519KeyPair,
    identity: IdentityKeys,
}

/// The X25519 public key of the private key made of 32 bytes `b`.
fn x25519_public(b: u8) -> [u8; 32] {
    Keypair::from_private(&[b; 32]).unwrap().public
}

fn sign(signer: &Ed25519KeyPair, message: &[u8]) -> Signature {
    Signature(signer.sign(message).as_ref().try_into().unwrap())
}

impl VectorDevice {
    fn new(n: u8) -> VectorDevice {
        let signer = Ed25519KeyPair::from_seed_unchecked(&[0xe0 + n; 32]).unwrap();
        let ed25519: [u8; 32] = signer.public_key().as_ref().try_into().unwrap();
        let curve25519 = x25519_public(0xc0 + n);
        // §5.4, written out here rather than taken from `tidings::keys`.
        let message = [&b"tidings identity v1"[..], &curve25519, &ed25519].concat();
        let signature = sign(&signer, &message);
        VectorDevice {
            signer,
            identity: IdentityKeys {
                curve25519,
                ed25519,
                signature,
            },
        }
    }

    /// The X25519 public key of 32 bytes `private`, signed by this device.
    fn key(&self, private: u8) -> SignedKey {
        let key = x25519_public(private);
        let message = [&b"tidings one-time key v1"[..], &key].concat();
        SignedKey {
            key,
            signature: sign(&self.signer, &message),
        }
    }
}

#[test]
fn key_directory_vectors_are_real_keys_and_signatures() {
    let (b1, b2) = (VectorDevice::new(1), VectorDevice::new(2));
    let client = |req, frame: ClientFrame| {
        let mut out = Vec::new();
        encode_client(req, &frame, &mut out);
        out
    };
    let server = |req, frame: ServerFrame| {
        let mut out = Vec::new();
        encode_server(req, &frame, &mut out);
        out
    };
    let expected = [
        (
            "client-11-publish-keys.hex",
            client(
                7,
                ClientFrame::PublishKeys(Box::new(PublishKeys {
                    identity: Some(b1.identity),
                    one_time: vec![b1.key(0xa1)],
                    fallback: Some(b1.key(0xf1)),
                })),
            ),
        ),
        (
            "client-11-publish-keys-top-up.hex",
            client(
                9,
                ClientFrame::PublishKeys(Box::new(PublishKeys {
                    identity: None,
                    one_time: vec![b1.key(0xa2), b1.key(0xa3)],
                    fallback: None,
                })),
            ),
        ),
        (
            "server-14-keys.hex",
            server(
                8,
                ServerFrame::Keys {
                    user: "bob".into(),
                    devices: vec![
                        DeviceKeys {
                            device: DeviceId(1),
                            identity: b1.identity,
                            one_time: Some(b1.key(0xa1)),
                            fallback: false,
                        },
                        DeviceKeys {
                            device: DeviceId(2),
                            identity: b2.identity,
                            one_time: Some(b2.key(0xf2)),
                            fallback: true,
                        },
                    ],
                },
            ),
        ),
    ];
    let files = vector_files();
    for (name, bytes) in &expected {
        assert_eq!(hex::encode(parse_vector(&files[*name]).1), hex::encode(bytes), "{name}");
    }
    // And the code's signature checks accept them (so `tidings::keys`
    // signs and verifies the messages §5.4 states).
    assert!(tidings::keys::verify_identity(&b1.identity));
    assert!(tidings::keys::verify_identity(&b2.identity));
    for (signer, key) in [(&b1, 0xa1), (&b1, 0xa2), (&b1, 0xa3), (&b1, 0xf1), (&b2, 0xf2)] {
        assert!(tidings::keys::verify_signed_key(&signer.identity, &signer.key(key)));
    }
    assert!(
        !tidings::keys::verify_signed_key(&b2.identity, &b1.key(0xa1)),
        "a key signed by another device"
    );
    let text = readme();
    for context in [tidings::keys::IDENTITY_CONTEXT, tidings::keys::ONE_TIME_CONTEXT] {
        let quoted = format!("`\"{}\"`", std::str::from_utf8(context).unwrap());
        assert!(text.contains(&quoted), "the README's §5.4 names {quoted}");
        let spaced: Vec<String> = context.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            text.contains(&spaced.join(" ")),
            "the README's §5.4 spells out {quoted} in hex"
        );
    }
}

/// Rows of the README's tables, as trimmed cells.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn readme_lists_every_error_code() {
    let text = readme();
    let rows = table_rows(&text);
    for code in ErrorCode::ALL {
        let name = format!("`{}`", code.name());
        let row = rows
            .iter()
            .find(|r| r.len() >= 3 && r[1] == name)
            .unwrap_or_else(|| panic!("{} is not in the README's §7 table", code.name()));
        assert_eq!(row[0], code.0.to_string(), "{}: number in the README", code.name());
        assert!(
            row[2] == "Error" || row[2] == "Close",
            "{}: sent in Error or Close",
            code.name()
        );
    }
    // And the table names no code the code does not know.
    for row in &rows {
        let (Some(n), Some(name)) = (row.first().and_then(|n| n.parse::<u16>().ok()), row.get(1)) else {
            continue;
        };
        if name.starts_with('`') && name.chars().all(|c| c == '`' || c == '_' || c.is_ascii_uppercase()) {
            assert_eq!(*name, format!("`{}`", ErrorCode(n).name()), "README row for code {n}");
        }
    }
}

#[test]
fn readme_states_the_limits() {
    let text = readme();
    let rows = table_rows(&text);
    let limits = [
        ("MIN_NAME_LEN", wire::MIN_NAME_LEN),
        ("MAX_NAME_LEN", wire::MAX_NAME_LEN),
        ("MAX_DEVICES_PER_USER", wire::MAX_DEVICES_PER_USER),
        ("MAX_BODIES", wire::MAX_BODIES),
        ("MAX_BODY_LEN", wire::MAX_BODY_LEN),
        ("MAX_FRAME_LEN", wire::MAX_FRAME_LEN),
        ("MAX_RECORD_LEN", wire::MAX_RECORD_LEN),
        ("HANDSHAKE_RECORD_CAP", wire::HANDSHAKE_RECORD_CAP),
        ("MAX_TEXT_LEN", wire::MAX_TEXT_LEN),
        ("MAX_RECEIPT_IDS", wire::MAX_RECEIPT_IDS),
        ("MAX_EPHEMERAL_LEN", wire::MAX_EPHEMERAL_LEN),
        ("MAX_WATCHED", wire::MAX_WATCHED),
        ("MAX_BLOB_DATA", wire::MAX_BLOB_DATA),
        ("MAX_BLOB_USERS", wire::MAX_BLOB_USERS),
        ("MAX_GROUP_MEMBERS", wire::MAX_GROUP_MEMBERS),
        ("MAX_GROUPS_PER_USER", wire::MAX_GROUPS_PER_USER),
        ("MAX_GROUP_CHANGE", wire::MAX_GROUP_CHANGE),
        ("MAX_KEY_BODIES", wire::MAX_KEY_BODIES),
        ("MAX_BLOCKED", wire::MAX_BLOCKED),
    ];
    for (name, value) in limits {
        let stated = format!("`wire::{name}` = {value}");
        assert!(
            rows.iter().any(|r| r.iter().any(|c| c.contains(&stated))),
            "the README's §6 table should say {stated}"
        );
    }
    let hub = HubConfig::default();
    let quotas = Quotas::default();
    let store = tidings::store::StoreConfig::default();
    let retention = RetentionConfig::default();
    assert_eq!(
        retention.period.as_secs() % 86_400,
        0,
        "the retention period is stated in days"
    );
    for stated in [
        format!("`noise::REKEY_AFTER_RECORDS` = {}", noise::REKEY_AFTER_RECORDS),
        format!("`noise::REKEY_AFTER` = {} s", noise::REKEY_AFTER.as_secs()),
        format!("`store::MAX_ONE_TIME_KEYS` = {}", tidings::store::MAX_ONE_TIME_KEYS),
        format!("`store::MAX_LINK_CODES` = {}", tidings::store::MAX_LINK_CODES),
        format!("`store::LINK_REQUESTS_BURST` = {}", tidings::store::LINK_REQUESTS_BURST),
        format!(
            "`store::LINK_REQUEST_REFILL` = {} s",
            tidings::store::LINK_REQUEST_REFILL.as_secs()
        ),
        format!("`HubConfig::link_ttl` = {} s", hub.link_ttl.as_secs()),
        format!("`HubConfig::claims_per_minute` = {}", hub.claims_per_minute),
        format!("`HubConfig::low_keys` = {}", hub.low_keys),
        format!("`HubConfig::ephemeral_per_minute` = {}", hub.ephemeral_per_minute),
        format!("`HubConfig::window` = {}", hub.window),
        format!("`HubConfig::group_members` = {}", hub.group_members),
        format!("`HubConfig::groups_per_user` = {}", hub.groups_per_user),
        format!(
            "`HubConfig::group_changes_per_minute` = {}",
            hub.group_changes_per_minute
        ),
        format!("`Quotas::queue_messages` = {}", quotas.queue_messages),
        format!("`Quotas::queue_bytes` = {}", quotas.queue_bytes),
        format!("`Quotas::disk_budget` = {}", quotas.disk_budget),
        format!("`Quotas::total_messages` = {}", quotas.total_messages),
        format!("`StoreConfig::write_delay` = {} ms", store.write_delay.as_millis()),
        format!("`StoreConfig::write_memory` = {}", store.write_memory),
        format!("`StoreConfig::min_free` = {}", store.min_free),
        format!("`store::RECENT_MESSAGES` = {}", tidings::store::RECENT_MESSAGES),
        format!(
            "`RetentionConfig::period` = {} days",
            retention.period.as_secs() / 86_400
        ),
        format!("`RetentionConfig::sweep_every` = {} s", retention.sweep_every.as_secs()),
        format!("`BlobConfig::max_size` = {}", store.blobs.max_size),
        format!("`BlobConfig::user_budget` = {}", store.blobs.user_budget),
        format!("`BlobConfig::upload_ttl` = {} s", store.blobs.upload_ttl.as_secs()),
        format!(
            "`store::blobs::BLOB_OVERHEAD` = {}",
            tidings::store::blobs::BLOB_OVERHEAD
        ),
        format!(
            "`store::blobs::MAX_UPLOADS_PER_USER` = {}",
            tidings::store::blobs::MAX_UPLOADS_PER_USER
        ),
        format!("`HubConfig::blob_window` = {}", hub.blob_window),
        format!("`HubConfig::blob_memory` = {}", hub.blob_memory),
    ] {
        assert!(
            rows.iter().any(|r| r.iter().any(|c| c.contains(&stated))),
            "the README's §6 table should say {stated}"
        );
    }
}

/// The README's worked examples: for each fenced block right after a line
/// naming `vectors/X.hex`, the hex columns of its lines (each line is hex
/// bytes, then two or more spaces, then an annotation).
fn readme_examples() -> Vec<(String, Vec<u8>)> {
    let text = readme();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with("```") {
            let before = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
            let name = before.and_then(|l| {
                let l = l.trim();
                l.strip_prefix("`vectors/").and_then(|r| r.strip_suffix(".hex`:"))
            });
            let end = i + 1 + lines[i + 1..].iter().position(|l| l.starts_with("```")).unwrap();
            if let Some(name) = name {
                let mut bytes = String::new();
                for line in &lines[i + 1..end] {
                    let hex_part = line.split("  ").next().unwrap();
                    for token in hex_part.split_whitespace() {
                        assert!(
                            token.len() == 2 && token.chars().all(|c| c.is_ascii_hexdigit()),
                            "README example {name}: {line:?}"
                        );
                        bytes.push_str(token);
                    }
                }
                out.push((format!("{name}.hex"), parse_hex(&bytes)));
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn readme_examples_are_the_vectors() {
    let files = vector_files();
    let mut client_tags = BTreeSet::new();
    let mut server_tags = BTreeSet::new();
    for (name, bytes) in readme_examples() {
        let text = files
            .get(&name)
            .unwrap_or_else(|| panic!("README example names a missing vector {name}"));
        assert_eq!(
            hex::encode(&bytes),
            hex::encode(parse_vector(text).1),
            "README example {name}"
        );
        match frame_vector_name(&name) {
            Some(("client", tag, _)) => client_tags.insert(tag),
            Some((_, tag, _)) => server_tags.insert(tag),
            None => panic!("README example {name} is not a frame vector"),
        };
    }
    assert_eq!(
        client_tags.len() as u32,
        CLIENT_FRAME_KINDS,
        "a README example for every client frame"
    );
    assert_eq!(
        server_tags.len() as u32,
        SERVER_FRAME_KINDS,
        "a README example for every server frame"
    );
}

#[test]
fn every_vector_file_is_checked() {
    for name in vector_files().keys() {
        let known = frame_vector_name(name).is_some()
            || name.starts_with("invalid-")
            || name.starts_with("refusal-")
            || ["preamble.hex", "invite-code.hex", "link-code.hex", "handshake.txt"].contains(&name.as_str());
        assert!(known, "vectors/{name} is not checked by any test");
    }
}
