//! Files against the real `tidingsd` and `tidings` binaries (spec §5.7,
//! §14.8): a file reaches every device byte for byte and neither the
//! server's disk nor the wire holds its plaintext; uploads cut off by a
//! killed client or a killed daemon resume with the same blob and no half
//! blob is ever served; a damaged blob or a wrong key saves nothing;
//! forwarding shares the blob, deleting releases it; small files download
//! by themselves; a file to a group is for its members when it was sent;
//! and the size limit, the budget and expiry refuse with their codes.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cli::{id_of, json_lines, stdout, tidings, tidings_cmd};
use common::profiles::{history, open};
use common::raw::RawClient;
use common::{Daemon, WAIT};
use serde_json::Value;
use tidings::client::Content;
use tidings::noise::Keypair;
use tidings::wire::{BlobId, ClientFrame, Download, ErrorCode, ServerFrame};

/// A TCP proxy between the clients and the daemon: keeps every byte that
/// passes (when `record`), and passes what clients send at most `rate`
/// bytes a second (when set), so that an upload takes long enough to be
/// cut off in the middle.
struct Proxy {
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn bind() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    fn start(listener: TcpListener, upstream: String, record: bool, rate: Option<u64>) -> Proxy {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // A daemon being restarted is waited for, as a client
                // dialling it directly would retry.
                let deadline = Instant::now() + Duration::from_secs(10);
                let server = loop {
                    match TcpStream::connect(&upstream) {
                        Ok(s) => break Some(s),
                        Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                        Err(_) => break None,
                    }
                };
                let Some(server) = server else { continue };
                for (mut from, mut to, slow) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), rate),
                    (server, client, None),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if record {
                                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                                    }
                                    if let Some(rate) = slow {
                                        std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / rate));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { seen }
    }
}

/// A daemon whose invites point at a proxy in front of it.
fn behind_proxy(record: bool, rate: Option<u64>) -> (Daemon, Proxy) {
    let (listener, proxy_addr) = Proxy::bind();
    let d = Daemon::start_with(&["--public-addr", &proxy_addr]);
    let proxy = Proxy::start(listener, d.addr().to_string(), record, rate);
    (d, proxy)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else { continue };
        for entry in entries.flatten() {
            let Ok(t) = entry.file_type() else { continue };
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                out.extend(std::fs::read(entry.path()).unwrap_or_default());
            }
        }
    }
    out
}

/// Pseudo-random bytes (xorshift) with `marker` planted at a few places.
fn file_bytes(len: usize, seed: u64, marker: &[u8]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if !marker.is_empty() {
        for at in [0, len / 3, len / 2 + 7, len - marker.len()] {
            out[at..at + marker.len()].copy_from_slice(marker);
        }
    }
    out
}

fn write_file(d: &Daemon, name: &str, data: &[u8]) -> PathBuf {
    let dir = d.dir().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// The blob files of the data directory: (id, extension, length).
fn blob_files(d: &Daemon) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(d.data_dir().join("blobs")) else {
        return out;
    };
    for shard in shards.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some((id, ext)) = name.split_once('.') {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((id.to_owned(), ext.to_owned(), len));
            }
        }
    }
    out.sort();
    out
}

fn blobs_with(d: &Daemon, ext: &str) -> Vec<String> {
    blob_files(d)
        .into_iter()
        .filter(|(_, e, _)| e == ext)
        .map(|(id, _, _)| id)
        .collect()
}

/// Waits until `what` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `tidings --json ARGS` on a profile; its JSON lines.
fn json(profile: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    json_lines(&tidings(profile, &all))
}

/// Syncs a profile (JSON), then downloads the file of message `id`;
/// returns the saved file's bytes.
fn sync_and_download(profile: &Path, id: &str) -> Vec<u8> {
    json(profile, &["sync"]);
    let lines = json(profile, &["download", id]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["type"], "download");
    assert_eq!(line["id"], id);
    let path = line["path"].as_str().unwrap();
    assert!(
        Path::new(path).starts_with(profile.join("downloads").canonicalize().unwrap()),
        "{path}"
    );
    std::fs::read(path).unwrap()
}

/// The raw key of a profile's device.
fn device_key(profile: &Path) -> Keypair {
    Keypair::from_private(&std::fs::read(profile.join("key")).unwrap()).unwrap()
}

#[test]
fn a_file_reaches_every_device_byte_identical_and_the_server_never_sees_it() {
    let (mut d, proxy) = behind_proxy(true, None);
    let alice = d.user("alice");
    let alice2 = d.link(&alice, "alice-2");
    let bob = d.user("bob");
    let bob2 = d.link(&bob, "bob-2");
    let marker = b"MARKER-in-the-file-7f3a91c2";
    let data = file_bytes(5 << 20, 17, marker);
    let path = write_file(&d, "holiday.jpg", &data);
    let sent = json(
        &alice,
        &[
            "send",
            "bob",
            "--file",
            path.to_str().unwrap(),
            "--caption",
            "the beach",
        ],
    );
    assert_eq!(sent[0]["type"], "sent");
    let id = sent[0]["id"].as_str().unwrap().to_owned();
    // One complete blob on the server, no upload left over.
    assert_eq!(blobs_with(&d, "blob").len(), 1);
    assert!(blobs_with(&d, "part").is_empty());
    let on_disk = all_bytes(d.data_dir());
    assert!(!contains(&on_disk, marker), "the marker in the data directory");
    // Every device of bob's, and alice's other device: 5 MiB is over the
    // auto-download size, so each asks for it.
    for (profile, peer) in [(&bob, "alice"), (&bob2, "alice"), (&alice2, "bob")] {
        assert_eq!(sync_and_download(profile, &id), data, "{}", profile.display());
        let h = history(profile, peer);
        let m = h.iter().find(|m| m.id.to_string() == id).unwrap();
        assert_eq!(m.text, "the beach");
        let lines = json(profile, &["history", peer]);
        let line = lines.iter().find(|l| l["id"] == id.as_str()).unwrap();
        let a = &line["attachment"];
        assert_eq!(a["name"], "holiday.jpg");
        assert_eq!(a["size"], 5 << 20);
        assert_eq!(a["media_type"], "image/jpeg");
        assert_eq!(
            a["sha256"].as_str().unwrap(),
            hex::encode(ring::digest::digest(&ring::digest::SHA256, &data))
        );
        assert!(a["path"].as_str().unwrap().ends_with("holiday.jpg"));
        let text = stdout(&tidings(profile, &["history", peer]));
        assert!(
            text.contains(&format!("[file holiday.jpg {}] the beach", 5 << 20)),
            "{text}"
        );
    }
    // Every device it was for has it: the server let it go.
    wait_until("the blob to go", || blob_files(&d).is_empty());
    d.kill9();
    let wire = proxy.seen.lock().unwrap().clone();
    assert!(wire.len() > 4 * (5 << 20), "the proxy saw the transfers");
    assert!(!contains(&wire, marker), "the marker on the wire");
    // The search works: bob's downloaded copy holds it.
    assert!(contains(&all_bytes(&bob), marker));
}

#[test]
fn an_upload_cut_off_by_killing_the_client_resumes_with_the_same_blob() {
    let (d, _proxy) = behind_proxy(false, Some(2 << 20));
    let alice = d.user("alice");
    let bob = d.user("bob");
    let data = file_bytes(6 << 20, 5, b"");
    let path = write_file(&d, "video.mp4", &data);
    let mut child = tidings_cmd(&alice)
        .args(["send", "bob", "--file", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("a part of the upload", || {
        blob_files(&d).iter().any(|(_, e, len)| e == "part" && *len >= 1 << 20)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let parts = blobs_with(&d, "part");
    assert_eq!(parts.len(), 1);
    assert!(blobs_with(&d, "blob").is_empty());
    // No half blob is served, not even to a device it is for.
    let mut raw = RawClient::connect(d.addr(), &d.server_key(), device_key(&bob)).unwrap();
    let ask = ClientFrame::Download(Download {
        id: BlobId::from_hex(&parts[0]).unwrap(),
        offset: 0,
        len: 1000,
    });
    match raw.request(&ask, WAIT).unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::UNKNOWN_BLOB),
        other => panic!("{other:?}"),
    }
    drop(raw);
    // The same command again: the same message, key and blob, resumed.
    let id = stdout(&tidings(&alice, &["send", "bob", "--file", path.to_str().unwrap()]))
        .trim()
        .to_owned();
    assert_eq!(blobs_with(&d, "blob"), parts);
    assert!(blobs_with(&d, "part").is_empty());
    let mine = history(&alice, "bob");
    assert_eq!(mine.len(), 1, "one message, not two: {mine:?}");
    assert_eq!(mine[0].id.to_string(), id);
    assert_eq!(sync_and_download(&bob, &id), data);
}

#[test]
fn an_upload_cut_off_by_the_daemon_dying_resumes_with_the_same_blob() {
    let (mut d, _proxy) = behind_proxy(false, Some(2 << 20));
    let alice = d.user("alice");
    let bob = d.user("bob");
    let data = file_bytes(6 << 20, 9, b"");
    let path = write_file(&d, "notes.pdf", &data);
    let child = tidings_cmd(&alice)
        .args(["send", "bob", "--file", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("a part of the upload", || {
        blob_files(&d).iter().any(|(_, e, len)| e == "part" && *len >= 1 << 20)
    });
    d.kill9();
    let parts = blobs_with(&d, "part");
    assert_eq!(parts.len(), 1);
    assert!(blobs_with(&d, "blob").is_empty());
    d.restart();
    // The client reconnects and finishes what it started.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(blobs_with(&d, "blob"), parts);
    assert!(blobs_with(&d, "part").is_empty());
    assert_eq!(sync_and_download(&bob, &id), data);
}

#[test]
fn a_damaged_blob_or_a_wrong_key_fails_cleanly_and_saves_nothing() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    stdout(&tidings(&bob, &["settings", "auto-download", "0"]));
    let data = file_bytes(200_000, 3, b"");
    let path = write_file(&d, "scan.png", &data);
    let id = stdout(&tidings(&alice, &["send", "bob", "--file", path.to_str().unwrap()]))
        .trim()
        .to_owned();
    json(&bob, &["sync"]);
    // A bit flips in the blob on the server's disk.
    let (blob, _, _) = blob_files(&d).into_iter().find(|(_, e, _)| e == "blob").unwrap();
    let file = d.data_dir().join("blobs").join(&blob[..2]).join(format!("{blob}.blob"));
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[100_000] ^= 0x20;
    std::fs::write(&file, &bad).unwrap();
    let downloads = bob.join("downloads");
    let out = tidings(&bob, &["download", &id]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk 1 of the file does not decrypt"), "{err}");
    assert!(err.contains("nothing was saved"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    std::fs::write(&file, &good).unwrap();
    // A message that names the blob with another key (a sender that lies,
    // or a key damaged on the way) opens nothing.
    let mut m = open(&alice).history("bob").unwrap().remove(0);
    let mut file_ref = m.attachment.take().unwrap().file;
    file_ref.key.0[0] ^= 1;
    file_ref.name = "wrong-key.png".into();
    let content = Content::File {
        file: file_ref,
        caption: String::new(),
        forwards: 0,
    };
    open(&alice).send_content("bob", content, 1).unwrap();
    let got = json(&bob, &["sync"]);
    let wrong = got
        .iter()
        .find(|l| l["type"] == "message" && l["attachment"]["name"] == "wrong-key.png")
        .unwrap();
    let out = tidings(&bob, &["download", wrong["id"].as_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk 0 of the file does not decrypt"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // With the right key and the blob whole, it downloads.
    let lines = json(&bob, &["download", &id]);
    assert_eq!(std::fs::read(lines[0]["path"].as_str().unwrap()).unwrap(), data);
}

#[test]
fn forwarding_shares_the_blob_and_deleting_releases_it() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let carol = d.user("carol");
    let data = file_bytes(3 << 20, 11, b"");
    let path = write_file(&d, "talk.ogg", &data);
    let id = stdout(&tidings(&alice, &["send", "bob", "--file", path.to_str().unwrap()]))
        .trim()
        .to_owned();
    json(&bob, &["sync"]);
    // Bob forwards it without downloading it: no second upload.
    let fwd = stdout(&tidings(&bob, &["forward", &id, "carol"])).trim().to_owned();
    assert_eq!(blobs_with(&d, "blob").len(), 1);
    let got = json(&carol, &["sync"]);
    let line = got.iter().find(|l| l["type"] == "message").unwrap();
    assert_eq!(line["forwarded"], true);
    assert_eq!(line["attachment"]["name"], "talk.ogg");
    let lines = json(&carol, &["download", &fwd]);
    assert_eq!(std::fs::read(lines[0]["path"].as_str().unwrap()).unwrap(), data);
    // Carol cannot read alice's other files.
    let other = write_file(&d, "private.txt", b"for bob only");
    stdout(&tidings(&alice, &["send", "bob", "--file", other.to_str().unwrap()]));
    let private = blob_files(&d)
        .into_iter()
        .filter(|(_, e, len)| e == "blob" && *len < 100)
        .map(|(id, _, _)| id)
        .next()
        .unwrap();
    let mut raw = RawClient::connect(d.addr(), &d.server_key(), device_key(&carol)).unwrap();
    let ask = ClientFrame::Download(Download {
        id: BlobId::from_hex(&private).unwrap(),
        offset: 0,
        len: 10,
    });
    match raw.request(&ask, WAIT).unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::UNKNOWN_BLOB),
        other => panic!("{other:?}"),
    }
    drop(raw);
    // Alice deletes the private one for everyone: its blob goes at once.
    let sent = history(&alice, "bob");
    let private_msg = sent
        .iter()
        .find(|m| m.text.is_empty() && m.attachment.as_ref().is_some_and(|a| a.file.name == "private.txt"))
        .unwrap();
    stdout(&tidings(&alice, &["delete", &private_msg.id.to_string()]));
    assert!(!blob_files(&d).iter().any(|(id, _, _)| *id == private));
    // Bob and carol deleting nothing of theirs changes nothing: the shared
    // blob stays until its devices have it.
    assert_eq!(blobs_with(&d, "blob").len(), 1);
    let lines = json(&bob, &["download", &id]);
    assert_eq!(std::fs::read(lines[0]["path"].as_str().unwrap()).unwrap(), data);
}

#[test]
fn small_files_download_by_themselves() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let small = file_bytes(100_000, 21, b"");
    let path = write_file(&d, "sticker.webp", &small);
    let id = stdout(&tidings(&alice, &["send", "bob", "--file", path.to_str().unwrap()]))
        .trim()
        .to_owned();
    let got = json(&bob, &["sync"]);
    let msg = got.iter().position(|l| l["type"] == "message").unwrap();
    let dl = got.iter().position(|l| l["type"] == "download").unwrap();
    assert!(msg < dl, "{got:?}");
    assert_eq!(got[dl]["id"], id.as_str());
    assert_eq!(std::fs::read(got[dl]["path"].as_str().unwrap()).unwrap(), small);
    let h = json(&bob, &["history", "alice"]);
    assert!(h[0]["attachment"]["path"].is_string());
    // Turned off, nothing is fetched until asked for.
    assert!(
        stdout(&tidings(&bob, &["settings", "auto-download", "0"]))
            .lines()
            .any(|l| l == "auto-download 0")
    );
    let path = write_file(&d, "sticker2.webp", &small);
    let id2 = id_of(&json(&alice, &["send", "bob", "--file", path.to_str().unwrap()])[0]);
    let got = json(&bob, &["sync"]);
    assert!(got.iter().all(|l| l["type"] != "download"), "{got:?}");
    let h = history(&bob, "alice");
    let m = h.iter().find(|m| m.id == id2).unwrap();
    assert_eq!(m.attachment.as_ref().unwrap().path, None);
}

#[test]
fn the_size_limit_and_the_budget_refuse_with_their_codes() {
    let d = Daemon::start_with_config("[blobs]\nmax_size = \"1MiB\"\nuser_budget = \"3MiB\"\n");
    let alice = d.user("alice");
    d.user("bob");
    // 1 MiB of file fits (sealed, a little more); a byte more does not.
    let big = write_file(&d, "big.bin", &file_bytes((1 << 20) + 1, 1, b""));
    let out = tidings(&alice, &["send", "bob", "--file", big.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BLOB_TOO_LARGE"), "{err}");
    assert!(history(&alice, "bob").is_empty(), "nothing left pending");
    // Three of 900 KiB fit the budget (each counted with 4 KiB more), a
    // fourth does not.
    for n in 0..3 {
        let f = write_file(&d, &format!("f{n}.bin"), &file_bytes(900 << 10, n + 2, b""));
        stdout(&tidings(&alice, &["send", "bob", "--file", f.to_str().unwrap()]));
    }
    let f = write_file(&d, "f3.bin", &file_bytes(900 << 10, 9, b""));
    let out = tidings(&alice, &["send", "bob", "--file", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BLOB_BUDGET"), "{err}");
    assert_eq!(history(&alice, "bob").len(), 3);
}

#[test]
fn an_expired_file_is_refused_and_shown_as_expired() {
    let d = Daemon::start_with_config("[retention]\nperiod = \"2s\"\nsweep_every = \"1s\"\n");
    let alice = d.user("alice");
    let bob = d.user("bob");
    stdout(&tidings(&bob, &["settings", "auto-download", "0"]));
    let f = write_file(&d, "old.txt", b"a file that will not wait");
    let id = stdout(&tidings(&alice, &["send", "bob", "--file", f.to_str().unwrap()]))
        .trim()
        .to_owned();
    json(&bob, &["sync"]);
    wait_until("the blob to expire", || blob_files(&d).is_empty());
    let out = tidings(&bob, &["download", &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expired on the server"), "{err}");
    let text = stdout(&tidings(&bob, &["history", "alice"]));
    assert!(text.contains("[file old.txt 25, expired on the server]"), "{text}");
    let lines = json(&bob, &["history", "alice"]);
    assert_eq!(lines[0]["attachment"]["expired"], true);
    // The server's answer was the code for it.
    let mut raw = RawClient::connect(d.addr(), &d.server_key(), device_key(&bob)).unwrap();
    let blob = open(&bob).history("alice").unwrap()[0]
        .attachment
        .as_ref()
        .unwrap()
        .file
        .blob;
    let ask = ClientFrame::Download(Download {
        id: blob,
        offset: 0,
        len: 10,
    });
    match raw.request(&ask, WAIT).unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::UNKNOWN_BLOB),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_file_to_a_group_is_for_its_members_when_it_was_sent() {
    let d = Daemon::start();
    let alice = d.user("alice");
    let bob = d.user("bob");
    let carol = d.user("carol");
    let dave = d.user("dave");
    let tag = stdout(&tidings(&alice, &["group", "create", "Club", "bob", "carol"]))
        .trim()
        .to_owned();
    // Bob fetches by hand; carol's is small enough to come by itself.
    stdout(&tidings(&bob, &["settings", "auto-download", "0"]));
    let data = file_bytes(150_000, 23, b"");
    let path = write_file(&d, "minutes.pdf", &data);
    let sent = json(
        &alice,
        &["send", &tag, "--file", path.to_str().unwrap(), "--caption", "read this"],
    );
    assert_eq!(sent[0]["type"], "sent", "{sent:?}");
    let id = sent[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(blobs_with(&d, "blob").len(), 1);
    let got = json(&carol, &["sync"]);
    let msg = got.iter().find(|l| l["type"] == "message").unwrap();
    assert_eq!(msg["to"], tag.as_str());
    assert_eq!(msg["attachment"]["name"], "minutes.pdf");
    assert_eq!(msg["attachment"]["size"], 150_000);
    let dl = got.iter().find(|l| l["type"] == "download").unwrap();
    assert_eq!(dl["id"], id.as_str());
    assert_eq!(std::fs::read(dl["path"].as_str().unwrap()).unwrap(), data);
    // A non-member cannot send one there, and nothing stays pending.
    let out = tidings(&dave, &["send", &tag, "--file", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("not a member") || err.contains("NOT_A_MEMBER"),
        "{err}"
    );
    assert!(history(&dave, &tag).is_empty());
    // Dave, added after the send, is not among its readers: the server
    // does not know the blob for him (it is still there: bob lacks it).
    stdout(&tidings(&alice, &["group", "add", &tag, "dave"]));
    json(&dave, &["sync"]);
    assert!(history(&dave, &tag).is_empty());
    let blob = history(&alice, &tag)[0].attachment.as_ref().unwrap().file.blob;
    assert_eq!(blobs_with(&d, "blob"), [blob.to_string()]);
    let mut raw = RawClient::connect(d.addr(), &d.server_key(), device_key(&dave)).unwrap();
    let ask = ClientFrame::Download(Download {
        id: blob,
        offset: 0,
        len: 10,
    });
    match raw.request(&ask, WAIT).unwrap() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::UNKNOWN_BLOB),
        other => panic!("{other:?}"),
    }
    drop(raw);
    // Bob's, by hand: byte for byte, shown as a file in the group.
    let got = json(&bob, &["sync"]);
    assert!(got.iter().all(|l| l["type"] != "download"), "{got:?}");
    assert_eq!(sync_and_download(&bob, &id), data);
    let text = stdout(&tidings(&bob, &["history", &tag]));
    assert!(text.contains("[file minutes.pdf 150000] read this"), "{text}");
    // Bob forwards it to dave: that lets dave read it.
    let fwd = stdout(&tidings(&bob, &["forward", &id, "dave"])).trim().to_owned();
    assert_eq!(sync_and_download(&dave, &fwd), data);
    // Every device it was for has it: the server let it go. A second one,
    // deleted for everyone before anyone fetched it, goes at once.
    wait_until("the blob to go", || blob_files(&d).is_empty());
    let path = write_file(&d, "draft.txt", b"not for keeping");
    let id2 = stdout(&tidings(&alice, &["send", &tag, "--file", path.to_str().unwrap()]))
        .trim()
        .to_owned();
    assert_eq!(blobs_with(&d, "blob").len(), 1);
    stdout(&tidings(&alice, &["delete", &id2]));
    assert!(blob_files(&d).is_empty());
}
