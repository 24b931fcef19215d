//! The signed-key formats of the key directory (spec §5.4), shared by the
//! server (which checks every upload) and the client (which checks every
//! claim, since the server is not trusted with keys).

use ring::signature::{ED25519, UnparsedPublicKey};

use crate::wire::{IdentityKeys, Signature, SignedKey};

/// Domain separation for the identity self-signature.
pub const IDENTITY_CONTEXT: &[u8] = b"tidings identity v1";
/// Domain separation for one-time and fallback key signatures.
pub const ONE_TIME_CONTEXT: &[u8] = b"tidings one-time key v1";

/// The bytes an identity's Ed25519 key signs.
pub fn identity_message(curve25519: &[u8; 32], ed25519: &[u8; 32]) -> Vec<u8> {
    [IDENTITY_CONTEXT, curve25519, ed25519].concat()
}

/// The bytes a device signs for one of its one-time or fallback keys.
pub fn one_time_message(key: &[u8; 32]) -> Vec<u8> {
    [ONE_TIME_CONTEXT, key].concat()
}

fn verify(signer: &[u8; 32], message: &[u8], signature: &Signature) -> bool {
    UnparsedPublicKey::new(&ED25519, signer)
        .verify(message, &signature.0)
        .is_ok()
}

/// Whether an identity's self-signature is valid.
pub fn verify_identity(id: &IdentityKeys) -> bool {
    verify(
        &id.ed25519,
        &identity_message(&id.curve25519, &id.ed25519),
        &id.signature,
    )
}

/// Whether `key` was signed by the device whose identity is `id`.
pub fn verify_signed_key(id: &IdentityKeys, key: &SignedKey) -> bool {
    verify(&id.ed25519, &one_time_message(&key.key), &key.signature)
}

/// Domain separation for the digest of a group's member devices.
pub const DEVICES_CONTEXT: &[u8] = b"tidings group devices v1";

/// The digest of a group's member devices (spec §5.8, *Device digest*):
/// the first 8 bytes of SHA-256 over [`DEVICES_CONTEXT`], then for each
/// member in the order given (the order `GroupInfo` lists them) its name's
/// length (one byte), its name, its device count (one byte) and each
/// device number (4 bytes, big-endian, ascending). A `GroupSend` names the
/// digest of the devices it was encrypted for; the server refuses one
/// that does not match the devices there are now, so that no device
/// silently misses a group's key.
pub fn devices_digest<'a, I, D>(members: I) -> [u8; 8]
where
    I: IntoIterator<Item = (&'a str, D)>,
    D: IntoIterator<Item = crate::wire::DeviceId>,
{
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(DEVICES_CONTEXT);
    let mut devices = Vec::new();
    for (name, ds) in members {
        devices.clear();
        devices.extend(ds);
        ctx.update(&[name.len() as u8]);
        ctx.update(name.as_bytes());
        ctx.update(&[devices.len() as u8]);
        for d in &devices {
            ctx.update(&d.0.to_be_bytes());
        }
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&ctx.finish().as_ref()[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DeviceId;

    #[test]
    fn the_device_digest_depends_on_members_their_order_and_devices() {
        let d = |ds: &[u32]| ds.iter().map(|&n| DeviceId(n)).collect::<Vec<_>>();
        let a = devices_digest([("alice", d(&[1, 2])), ("bob", d(&[1]))]);
        assert_eq!(a, devices_digest([("alice", d(&[1, 2])), ("bob", d(&[1]))]));
        assert_ne!(a, devices_digest([("bob", d(&[1])), ("alice", d(&[1, 2]))]));
        assert_ne!(a, devices_digest([("alice", d(&[1, 3])), ("bob", d(&[1]))]));
        assert_ne!(a, devices_digest([("alice", d(&[1])), ("bob", d(&[2, 1]))]));
        // Fixed bytes: the spec's example (§5.8, vectors/client-32-group-send.hex).
        let spec = devices_digest([("alice", d(&[1, 2])), ("bob", d(&[1])), ("carol", d(&[1]))]);
        assert_eq!(hex::encode(spec), "a076c5c11bffb317");
    }
}
