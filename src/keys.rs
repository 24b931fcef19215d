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
