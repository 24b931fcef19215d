//! The end-to-end key directory, in the `e2e` tree: each device's identity
//! keys, its one-time keys (each handed out once, then deleted) and its
//! fallback key. Signatures are checked by the caller before anything is
//! stored here.
//!
//! Layout: `i` ‖ user ‖ device → [`IdentityKeys`]; `o` ‖ user ‖ device ‖
//! key → signature; `f` ‖ user ‖ device → [`SignedKey`].

use super::StoreError;
use crate::ids::DeviceKey;
use crate::wire::{DeviceKeys, IdentityKeys, Signature, SignedKey};

/// Most one-time keys the server holds per device.
pub const MAX_ONE_TIME_KEYS: usize = 100;

/// Why a publish was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishError {
    /// The device already has a different identity.
    IdentityChanged,
    /// Keys before an identity.
    NoIdentity,
    /// More than [`MAX_ONE_TIME_KEYS`] would be stored.
    TooMany,
    /// The identity's self-signature or a key's signature does not verify.
    BadSignature,
}

fn prefix(tag: u8, d: DeviceKey) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..5].copy_from_slice(&d.user.0.to_be_bytes());
    k[5..].copy_from_slice(&d.device.0.to_be_bytes());
    k
}

/// Whether a key of the `e2e` tree is a one-time key's (for restores,
/// which drop them: spec §5.4).
pub(crate) fn is_one_time(k: &[u8]) -> bool {
    k.first() == Some(&b'o')
}

fn one_time_key(d: DeviceKey, key: &[u8; 32]) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[..9].copy_from_slice(&prefix(b'o', d));
    k[9..].copy_from_slice(key);
    k
}

fn decode<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("e2e"))
}

/// A device's published identity.
///
/// # Errors
/// On a database failure.
pub(crate) fn identity_of(e2e: &sled::Tree, d: DeviceKey) -> Result<Option<IdentityKeys>, StoreError> {
    e2e.get(prefix(b'i', d))?.map(|v| decode(&v)).transpose()
}

/// How many one-time keys the server holds for a device.
///
/// # Errors
/// On a database failure.
pub(crate) fn one_time_count(e2e: &sled::Tree, d: DeviceKey) -> Result<u32, StoreError> {
    let mut n = 0;
    for item in e2e.scan_prefix(prefix(b'o', d)) {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Stores keys a device published (signatures already checked).
/// Returns the one-time key count. (Only the store thread writes keys, so
/// the count and the cap hold without a lock.)
///
/// # Errors
/// On a database failure; refusals are the inner result.
pub(crate) fn publish_keys(
    e2e: &sled::Tree,
    d: DeviceKey,
    identity: Option<&IdentityKeys>,
    one_time: &[SignedKey],
    fallback: Option<&SignedKey>,
) -> Result<Result<u32, PublishError>, StoreError> {
    let existing = identity_of(e2e, d)?;
    // spec §5.4: every signature is checked before anything is stored,
    // against the identity given or the one on record.
    if let Some(id) = identity.or(existing.as_ref()) {
        let mut signed = one_time.iter().chain(fallback);
        if !crate::keys::verify_identity(id) || !signed.all(|k| crate::keys::verify_signed_key(id, k)) {
            return Ok(Err(PublishError::BadSignature));
        }
    }
    match (identity, &existing) {
        (Some(new), Some(old)) if new != old => return Ok(Err(PublishError::IdentityChanged)),
        (None, None) if !one_time.is_empty() || fallback.is_some() => return Ok(Err(PublishError::NoIdentity)),
        _ => {}
    }
    let count = one_time_count(e2e, d)? as usize;
    if count + one_time.len() > MAX_ONE_TIME_KEYS {
        return Ok(Err(PublishError::TooMany));
    }
    let mut batch = sled::Batch::default();
    if let (Some(id), None) = (identity, &existing) {
        batch.insert(&prefix(b'i', d)[..], postcard::to_stdvec(id).expect("encodes"));
    }
    for k in one_time {
        batch.insert(&one_time_key(d, &k.key)[..], &k.signature.0[..]);
    }
    if let Some(f) = fallback {
        batch.insert(&prefix(b'f', d)[..], postcard::to_stdvec(f).expect("encodes"));
    }
    e2e.apply_batch(batch)?;
    Ok(Ok(one_time_count(e2e, d)?))
}

/// Claims one device's keys: its identity and one one-time key, which
/// is deleted so nobody gets it again (or the fallback key if none is
/// left). `None` if the device published no identity.
///
/// # Errors
/// On a database failure.
pub(crate) fn claim_keys(e2e: &sled::Tree, d: DeviceKey) -> Result<Option<DeviceKeys>, StoreError> {
    let Some(identity) = identity_of(e2e, d)? else {
        return Ok(None);
    };
    for item in e2e.scan_prefix(prefix(b'o', d)) {
        let (k, _) = item?;
        if let Some(sig) = e2e.remove(&k)? {
            let key: [u8; 32] = k
                .get(9..)
                .and_then(|b| b.try_into().ok())
                .ok_or(StoreError::Corrupt("e2e"))?;
            let signature = Signature(sig.as_ref().try_into().map_err(|_| StoreError::Corrupt("e2e"))?);
            return Ok(Some(DeviceKeys {
                device: d.device,
                identity,
                one_time: Some(SignedKey { key, signature }),
                fallback: false,
            }));
        }
    }
    let fallback: Option<SignedKey> = e2e.get(prefix(b'f', d))?.map(|v| decode(&v)).transpose()?;
    Ok(Some(DeviceKeys {
        device: d.device,
        identity,
        fallback: fallback.is_some(),
        one_time: fallback,
    }))
}

/// Forgets every key of a device (after revocation).
///
/// # Errors
/// On a database failure.
pub(crate) fn delete_keys(e2e: &sled::Tree, d: DeviceKey) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for tag in [b'i', b'o', b'f'] {
        for item in e2e.scan_prefix(prefix(tag, d)) {
            batch.remove(item?.0);
        }
    }
    e2e.apply_batch(batch)?;
    Ok(())
}

/// Every device's one-time key count, for devices with an identity (at
/// open).
pub(crate) fn load_counts(e2e: &sled::Tree) -> Result<std::collections::HashMap<DeviceKey, u32>, StoreError> {
    let mut counts = std::collections::HashMap::new();
    for item in e2e.iter() {
        let (k, _) = item?;
        let d = super::disk::parse_dev(&k).ok_or(StoreError::Corrupt("e2e"))?;
        match k.first() {
            Some(b'i') => {
                counts.entry(d).or_insert(0);
            }
            Some(b'o') => *counts.entry(d).or_insert(0) += 1,
            _ => {}
        }
    }
    // One-time keys without an identity cannot exist (checked on publish).
    Ok(counts)
}
