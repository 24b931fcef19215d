//! The profile's passphrase, and what it protects at rest: the keys that
//! make the device itself.
//!
//! - The key is Argon2id of the passphrase with a random salt (19 MiB, 2
//!   passes, 1 lane: the crate's defaults, OWASP's recommendation), kept
//!   with what it protects. One [`Passphrase`] remembers the last key it
//!   derived, so opening a profile costs one derivation: the Noise key file
//!   and the Olm pickles share a salt.
//! - The Olm account and sessions are vodozemac pickles encrypted with that
//!   key (see [`super::e2e`]).
//! - The device's Noise static key, which alone authenticates as the
//!   device, is sealed in the `key` file ([`seal_key`]) with
//!   ChaCha20-Poly1305 under a key expanded from it by HKDF-SHA-256 (so
//!   the two uses never share a key).
//!
//! `key` file formats (the first bytes tell them apart):
//! - 32 bytes: the private key in clear (a profile without a passphrase,
//!   and every profile made before passphrases covered this key);
//! - `TKEY` ‖ version 1 ‖ salt (16) ‖ Argon2 memory KiB, passes, lanes
//!   (u32 big-endian each) ‖ nonce (12) ‖ ciphertext and tag (48): 93
//!   bytes; the header is the AEAD's associated data.
//!
//! What it does not do: protect the history (messages, contacts, receipts
//! are stored in clear; see the README), or keep a passphrase anywhere but
//! in memory.

use std::sync::Mutex;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Error;

/// Argon2id memory, KiB.
pub const ARGON2_M_KIB: u32 = 19 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 2;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 1;

/// The magic that starts a sealed key file.
pub const KEY_MAGIC: &[u8; 4] = b"TKEY";
/// The sealed key file's version.
pub const KEY_VERSION: u8 = 1;
/// Length of a sealed key file.
pub const SEALED_KEY_LEN: usize = 4 + 1 + 16 + 12 + 12 + 32 + 16;
const HEADER_LEN: usize = 4 + 1 + 16 + 12;

/// Why a passphrase does not open a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PassphraseError {
    /// The profile's keys are encrypted and no passphrase was given.
    #[error("this profile's keys are encrypted: set TIDINGS_PASSPHRASE to its passphrase")]
    Needed,
    /// The passphrase given does not open them.
    #[error("wrong passphrase (TIDINGS_PASSPHRASE) for this profile's keys")]
    Wrong,
}

/// The parameters of one derivation: salt and Argon2id costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdf {
    /// Random salt.
    pub salt: [u8; 16],
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Kdf {
    /// New parameters with a fresh salt.
    ///
    /// # Errors
    /// If the system's randomness fails.
    pub fn fresh() -> Result<Kdf, Error> {
        let mut salt = [0u8; 16];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| Error::Damaged("no randomness for a salt".into()))?;
        Ok(Kdf {
            salt,
            m_kib: ARGON2_M_KIB,
            t: ARGON2_T,
            p: ARGON2_P,
        })
    }
}

/// A 32-byte key, wiped when dropped.
pub type Key = Zeroizing<[u8; 32]>;

fn derive(passphrase: &str, kdf: &Kdf) -> Result<Key, Error> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let damaged = || Error::Damaged("key derivation parameters".into());
    // Costs come from the disk: refuse absurd ones rather than allocate.
    if kdf.m_kib > 1 << 20 || kdf.t > 64 || kdf.p > 16 {
        return Err(damaged());
    }
    let params = Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32)).map_err(|_| damaged())?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), &kdf.salt, &mut key[..])
        .map_err(|_| damaged())?;
    Ok(key)
}

/// A passphrase, and the last key derived from it.
pub struct Passphrase {
    text: Zeroizing<String>,
    last: Mutex<Option<(Kdf, Key)>>,
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    /// Wraps a passphrase.
    pub fn new(text: &str) -> Passphrase {
        Passphrase {
            text: Zeroizing::new(text.to_owned()),
            last: Mutex::new(None),
        }
    }

    /// The key for `kdf` (derived once, then remembered).
    ///
    /// # Errors
    /// Absurd parameters.
    pub fn key(&self, kdf: &Kdf) -> Result<Key, Error> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, key)) = last.as_ref()
            && k == kdf
        {
            return Ok(key.clone());
        }
        let key = derive(&self.text, kdf)?;
        *last = Some((*kdf, key.clone()));
        Ok(key)
    }

    /// Parameters to encrypt something new with: those of the last key
    /// derived (so one derivation serves the whole profile), else fresh.
    ///
    /// # Errors
    /// If the system's randomness fails.
    pub fn kdf(&self) -> Result<Kdf, Error> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.as_ref() {
            Some((k, _)) => Ok(*k),
            None => Kdf::fresh(),
        }
    }
}

fn file_key(key: &Key) -> LessSafeKey {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tidings").extract(&key[..]);
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&[b"noise key file v1"], Len)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("32 bytes is a valid HKDF-SHA-256 output");
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &out[..]).expect("a 32-byte key"))
}

/// Whether `bytes` (a `key` file) is sealed.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(KEY_MAGIC)
}

/// Seals a private key under `passphrase`: the bytes of a `key` file.
///
/// # Errors
/// If the system's randomness fails.
pub fn seal_key(private: &[u8; 32], passphrase: &Passphrase) -> Result<Vec<u8>, Error> {
    let kdf = passphrase.kdf()?;
    let key = passphrase.key(&kdf)?;
    let mut nonce = [0u8; 12];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::Damaged("no randomness for a nonce".into()))?;
    let mut out = Vec::with_capacity(SEALED_KEY_LEN);
    out.extend_from_slice(KEY_MAGIC);
    out.push(KEY_VERSION);
    out.extend_from_slice(&kdf.salt);
    for n in [kdf.m_kib, kdf.t, kdf.p] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&nonce);
    let mut sealed = private.to_vec();
    file_key(&key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&out[..HEADER_LEN + 12]),
            &mut sealed,
        )
        .map_err(|_| Error::Damaged("cannot seal the key".into()))?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a sealed `key` file.
///
/// # Errors
/// [`PassphraseError::Needed`] without a passphrase,
/// [`PassphraseError::Wrong`] if it does not open; [`Error::Damaged`] for
/// a file of another shape.
pub fn open_key(bytes: &[u8], passphrase: Option<&Passphrase>) -> Result<Zeroizing<[u8; 32]>, Error> {
    let damaged = || Error::Damaged("key: not a sealed key".into());
    if bytes.len() != SEALED_KEY_LEN || !is_sealed(bytes) || bytes[4] != KEY_VERSION {
        return Err(damaged());
    }
    let Some(passphrase) = passphrase else {
        return Err(Error::Passphrase(PassphraseError::Needed));
    };
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&bytes[5..21]);
    let n = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let kdf = Kdf {
        salt,
        m_kib: n(21),
        t: n(25),
        p: n(29),
    };
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[33..45]);
    let key = passphrase.key(&kdf)?;
    let mut sealed = bytes[45..].to_vec();
    let plain = file_key(&key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&bytes[..45]),
            &mut sealed,
        )
        .map_err(|_| Error::Passphrase(PassphraseError::Wrong))?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(plain);
    sealed.iter_mut().for_each(|b| *b = 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_with_its_passphrase_only() {
        let p = Passphrase::new("correct horse");
        let private = [0x42; 32];
        let file = seal_key(&private, &p).unwrap();
        assert_eq!(file.len(), SEALED_KEY_LEN);
        assert!(is_sealed(&file));
        // The key itself is nowhere in the file.
        assert!(!file.windows(32).any(|w| w == private));
        assert_eq!(*open_key(&file, Some(&p)).unwrap(), private);
        // A fresh Passphrase (no remembered key) derives it again.
        assert_eq!(
            *open_key(&file, Some(&Passphrase::new("correct horse"))).unwrap(),
            private
        );
        assert!(matches!(
            open_key(&file, None),
            Err(Error::Passphrase(PassphraseError::Needed))
        ));
        assert!(matches!(
            open_key(&file, Some(&Passphrase::new("wrong"))),
            Err(Error::Passphrase(PassphraseError::Wrong))
        ));
        // Any changed byte, header included, is refused.
        for i in [0, 4, 5, 22, 40, 60, 92] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(open_key(&bad, Some(&p)).is_err(), "byte {i}");
        }
        assert!(open_key(&file[..92], Some(&p)).is_err());
    }

    #[test]
    fn one_derivation_serves_what_shares_a_salt() {
        let p = Passphrase::new("x");
        let kdf = p.kdf().unwrap();
        let k1 = p.key(&kdf).unwrap();
        assert_eq!(p.kdf().unwrap(), kdf, "the remembered parameters are reused");
        assert_eq!(p.key(&kdf).unwrap(), k1);
        let absurd = Kdf { m_kib: u32::MAX, ..kdf };
        assert!(matches!(p.key(&absurd), Err(Error::Damaged(_))));
    }
}
