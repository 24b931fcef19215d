//! The profile directory: one device's identity, its registration, and
//! the one-writer lock around its history.
//!
//! Layout:
//! - `lock`: held (advisory, `flock`) by the one process using the profile;
//! - `key`: the device's Noise private key, mode 0600: 32 bytes in clear,
//!   or sealed under the passphrase where the profile has one (see
//!   [`super::secret`]);
//! - `profile.json`: the server address and key, user name and device
//!   number, written once registration succeeds (atomically, by rename);
//! - `history/`: the local messages and their states, and the Olm account
//!   and sessions, encrypted with a key derived from `TIDINGS_PASSPHRASE`
//!   where one is set (see [`super::history`], [`super::e2e`]);
//! - `sock`: the Unix socket of a running `listen` or `chat` (see
//!   [`super::ipc`]).
//!
//! Guarantees: one writer at a time (a second [`Profile::open`] waits for
//! the lock or fails after its timeout). What it does not do: talk to the
//! server, or decide what goes into the history.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Error;
use super::e2e::Crypto;
use super::history::History;
use super::secret::{self, Passphrase, PassphraseError};
use crate::noise::{Keypair, PublicKey};

/// File names inside a profile.
pub const LOCK_FILE: &str = "lock";
/// The device key.
pub const KEY_FILE: &str = "key";
/// The registration.
pub const REGISTRATION_FILE: &str = "profile.json";
/// The history database.
pub const HISTORY_DIR: &str = "history";
/// The socket of a running `listen`.
pub const SOCKET_FILE: &str = "sock";
/// The environment variable holding the passphrase of the end-to-end keys.
pub const PASSPHRASE_VAR: &str = "TIDINGS_PASSPHRASE";

/// The per-user default profile directory (for example
/// `~/.local/share/tidings` on Linux).
pub fn default_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "tidings").map(|d| d.data_dir().to_path_buf())
}

/// Who this device is, and where its server is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// `host:port` of the server.
    pub server: String,
    /// The server's static key, hex.
    #[serde(with = "hex_key")]
    pub server_key: PublicKey,
    /// This account's user name.
    pub user: String,
    /// This device's number.
    pub device: u32,
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(&text, &mut key).map_err(serde::de::Error::custom)?;
        Ok(key)
    }
}

/// An open profile: holds the lock until dropped.
pub struct Profile {
    dir: PathBuf,
    key: Keypair,
    registration: Option<Registration>,
    crypto: Crypto,
    /// Declared before the lock so that it closes first.
    history: History,
    _lock: File,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("dir", &self.dir)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

impl Profile {
    /// Opens (creating if needed) the profile in `dir`, waiting up to
    /// `wait` for another process to let go of it, with the passphrase in
    /// `TIDINGS_PASSPHRASE` if that is set.
    ///
    /// # Errors
    /// See [`Profile::open_with`].
    pub fn open(dir: &Path, wait: Duration) -> Result<Profile, Error> {
        Profile::open_with(dir, wait, passphrase_from_env().as_deref().map(String::as_str))
    }

    /// Opens (creating if needed) the profile in `dir`, waiting up to
    /// `wait` for another process to let go of it; `passphrase` decrypts
    /// (or from now on encrypts) the device's keys: its Noise key and its
    /// end-to-end keys.
    ///
    /// # Errors
    /// [`Error::ProfileBusy`] after `wait`; [`Error::Passphrase`] if the
    /// keys need one, or another; I/O and store errors; a damaged key or
    /// registration file.
    pub fn open_with(dir: &Path, wait: Duration, passphrase: Option<&str>) -> Result<Profile, Error> {
        let passphrase = passphrase
            .filter(|p| !p.is_empty())
            .map(|p| Arc::new(Passphrase::new(p)));
        // The directory holds the key and the socket: owner only. An
        // existing directory is left as it is (it may be one the user
        // chose for other things too), with a warning if others can enter.
        if dir.is_dir() {
            let mode = fs::metadata(dir)?.permissions().mode();
            if mode & 0o077 != 0 {
                log::warn!(
                    "profile directory {} is accessible to other users (mode {:o}); consider chmod 700",
                    dir.display(),
                    mode & 0o777
                );
            }
        } else {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let lock = lock(dir, wait)?;
        let registration = match fs::read(dir.join(REGISTRATION_FILE)) {
            Ok(bytes) => {
                Some(serde_json::from_slice(&bytes).map_err(|e| Error::Damaged(format!("{REGISTRATION_FILE}: {e}")))?)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let history = History::open(&dir.join(HISTORY_DIR))?;
        // The end-to-end keys first: their derivation then serves the key
        // file too (one Argon2 run per open).
        let crypto = Crypto::open(history.e2e(), passphrase.clone())?;
        let key = load_or_create_key(&dir.join(KEY_FILE), passphrase.as_deref())?;
        Ok(Profile {
            dir: dir.to_path_buf(),
            _lock: lock,
            key,
            registration,
            crypto,
            history,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device's Noise key.
    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The registration, once there is one.
    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// The registration.
    ///
    /// # Errors
    /// [`Error::NotRegistered`].
    pub fn registered(&self) -> Result<&Registration, Error> {
        self.registration.as_ref().ok_or(Error::NotRegistered)
    }

    /// Records the registration durably (write, fsync, rename, fsync dir).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_registration(&mut self, registration: Registration) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(&registration).map_err(|e| Error::Damaged(e.to_string()))?;
        write_atomically(&self.dir.join(REGISTRATION_FILE), &json)?;
        self.registration = Some(registration);
        Ok(())
    }

    /// The local history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The end-to-end state.
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    /// The end-to-end state, to change.
    pub fn crypto_mut(&mut self) -> &mut Crypto {
        &mut self.crypto
    }

    /// Both at once.
    pub fn parts(&mut self) -> (&History, &mut Crypto) {
        (&self.history, &mut self.crypto)
    }

    /// Path of the `listen` socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }
}

fn lock(dir: &Path, wait: Duration) -> Result<File, Error> {
    use fs2::FileExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        match file.try_lock_exclusive() {
            Ok(()) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(11) => {
                if Instant::now() >= deadline {
                    return Err(Error::ProfileBusy(dir.to_path_buf()));
                }
                if !told && !wait.is_zero() {
                    log::warn!(
                        "profile {} is in use by another tidings command; waiting",
                        dir.display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How a command opens a profile: with the passphrase it has (from
/// `TIDINGS_PASSPHRASE` or asked for already), and optionally a way to ask
/// for one when the profile's keys need it (a terminal).
pub struct Unlock<'a> {
    /// The passphrase to try first.
    pub passphrase: Option<Zeroizing<String>>,
    /// Asks for a passphrase, told why the last one did not do; `None`
    /// gives up.
    pub ask: Option<&'a mut dyn FnMut(PassphraseError) -> Option<Zeroizing<String>>>,
}

/// How many times [`Unlock::open`] asks before it gives up.
pub const PASSPHRASE_TRIES: u32 = 3;

impl<'a> Unlock<'a> {
    /// The passphrase in `TIDINGS_PASSPHRASE`, asking nothing.
    pub fn from_env() -> Unlock<'a> {
        Unlock {
            passphrase: passphrase_from_env(),
            ask: None,
        }
    }

    /// Opens the profile in `dir` (see [`Profile::open_with`]), asking for
    /// the passphrase (up to [`PASSPHRASE_TRIES`] times) when its keys need
    /// one and this has a way to ask.
    ///
    /// # Errors
    /// See [`Profile::open_with`].
    pub fn open(&mut self, dir: &Path, wait: Duration) -> Result<Profile, Error> {
        let mut tries = 0;
        loop {
            match Profile::open_with(dir, wait, self.passphrase.as_deref().map(String::as_str)) {
                Err(Error::Passphrase(why)) if tries < PASSPHRASE_TRIES => {
                    let Some(ask) = self.ask.as_mut() else {
                        return Err(Error::Passphrase(why));
                    };
                    match ask(why) {
                        Some(p) => self.passphrase = Some(p),
                        None => return Err(Error::Passphrase(why)),
                    }
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// The passphrase in `TIDINGS_PASSPHRASE`, if set and not empty.
pub fn passphrase_from_env() -> Option<Zeroizing<String>> {
    std::env::var(PASSPHRASE_VAR)
        .ok()
        .filter(|p| !p.is_empty())
        .map(Zeroizing::new)
}

/// Whether the profile in `dir` keeps its keys under a passphrase (its
/// key file is sealed). Reads one file; takes no lock.
pub fn has_passphrase(dir: &Path) -> bool {
    fs::read(dir.join(KEY_FILE)).is_ok_and(|b| secret::is_sealed(&b))
}

/// Writes `bytes` to `path` durably (write, fsync, rename, fsync dir).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Loads the device's key, sealed or not, or makes one (sealed under
/// `passphrase` if there is one). A key in clear is sealed once a
/// passphrase is given.
fn load_or_create_key(path: &Path, passphrase: Option<&Passphrase>) -> Result<Keypair, Error> {
    let not_a_key = || Error::Damaged(format!("{}: not a key", path.display()));
    match File::open(path) {
        Ok(mut f) => {
            let mut bytes = Zeroizing::new(Vec::with_capacity(secret::SEALED_KEY_LEN));
            Read::by_ref(&mut f).take(4096).read_to_end(&mut bytes)?;
            if secret::is_sealed(&bytes) {
                let private = secret::open_key(&bytes, passphrase)?;
                return Keypair::from_private(&private[..]).ok_or_else(not_a_key);
            }
            let key = Keypair::from_private(&bytes).ok_or_else(not_a_key)?;
            if let Some(p) = passphrase {
                write_atomically(path, &secret::seal_key(key.private(), p)?)?;
                log::warn!("this profile's device key is now sealed with the passphrase");
            }
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate().map_err(|_| Error::Damaged("no randomness for a key".into()))?;
            match passphrase {
                Some(p) => {
                    write_atomically(path, &secret::seal_key(key.private(), p)?)?;
                }
                None => write_atomically(path, key.private())?,
            }
            Ok(key)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let public = {
            let p = Profile::open(&dir, Duration::ZERO).unwrap();
            assert!(p.registration().is_none());
            assert!(matches!(p.registered(), Err(Error::NotRegistered)));
            p.key().public
        };
        let mode = fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let p = Profile::open(&dir, Duration::ZERO).unwrap();
        assert_eq!(p.key().public, public);
    }

    #[test]
    fn registration_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registration {
            server: "127.0.0.1:7070".into(),
            server_key: [7; 32],
            user: "alice".into(),
            device: 2,
        };
        {
            let mut p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
            p.save_registration(reg.clone()).unwrap();
        }
        let p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
        assert_eq!(p.registration(), Some(&reg));
        let text = fs::read_to_string(tmp.path().join(REGISTRATION_FILE)).unwrap();
        assert!(text.contains(&"07".repeat(32)), "{text}");
    }

    #[test]
    fn one_process_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let p = Profile::open(tmp.path(), Duration::ZERO).unwrap();
        let e = Profile::open(tmp.path(), Duration::from_millis(120)).unwrap_err();
        assert!(matches!(e, Error::ProfileBusy(_)), "{e:?}");
        // A waiter gets it once the holder lets go.
        let dir = tmp.path().to_path_buf();
        let waiter = std::thread::spawn(move || Profile::open(&dir, Duration::from_secs(10)).map(|_| ()));
        std::thread::sleep(Duration::from_millis(100));
        drop(p);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn damaged_files_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(KEY_FILE), b"short").unwrap();
        assert!(matches!(
            Profile::open(tmp.path(), Duration::ZERO),
            Err(Error::Damaged(_))
        ));
        fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();
        fs::write(tmp.path().join(REGISTRATION_FILE), b"{").unwrap();
        assert!(matches!(
            Profile::open(tmp.path(), Duration::ZERO),
            Err(Error::Damaged(_))
        ));
    }

    #[test]
    fn with_a_passphrase_the_device_key_is_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        let public = {
            let p = Profile::open_with(&dir, Duration::ZERO, Some("pw")).unwrap();
            p.key().public
        };
        assert!(has_passphrase(&dir));
        let file = fs::read(dir.join(KEY_FILE)).unwrap();
        assert_eq!(file.len(), secret::SEALED_KEY_LEN);
        let e = Profile::open_with(&dir, Duration::ZERO, None).unwrap_err();
        assert!(matches!(e, Error::Passphrase(secret::PassphraseError::Needed)), "{e}");
        let e = Profile::open_with(&dir, Duration::ZERO, Some("nope")).unwrap_err();
        assert!(matches!(e, Error::Passphrase(secret::PassphraseError::Wrong)), "{e}");
        let p = Profile::open_with(&dir, Duration::ZERO, Some("pw")).unwrap();
        assert_eq!(p.key().public, public);
        drop(p);
        // A key in clear is sealed once a passphrase comes.
        let plain = tmp.path().join("q");
        let public = Profile::open_with(&plain, Duration::ZERO, None).unwrap().key().public;
        assert!(!has_passphrase(&plain));
        let p = Profile::open_with(&plain, Duration::ZERO, Some("later")).unwrap();
        assert_eq!(p.key().public, public);
        assert!(has_passphrase(&plain));
    }
}
