//! Invite and link codes as text (spec §11):
//! `tidings://HOST:PORT/` followed by base64url (no padding) of 56 bytes:
//! the server's static public key (32), the token id (8) and the token
//! secret (16). A code is everything a new device needs: where to dial,
//! which key to pin, and what to prove.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

use crate::noise::PublicKey;
use crate::wire::Token;

const SCHEME: &str = "tidings://";
const RAW_LEN: usize = 56;

/// A parsed invite or link code.
#[derive(Clone, PartialEq, Eq)]
pub struct Code {
    /// `host:port` to dial.
    pub addr: String,
    /// The server's static key, to pin.
    pub server_key: PublicKey,
    /// The secret token.
    pub token: Token,
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({}, {:?})", self.addr, self.token)
    }
}

/// Why a code did not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodeError {
    /// It does not start with `tidings://`.
    #[error("a code starts with tidings://")]
    Scheme,
    /// No `/` between address and key material, or an empty address.
    #[error("a code is tidings://HOST:PORT/KEY")]
    Shape,
    /// The part after the address is not base64url of 56 bytes.
    #[error("the code's key part is damaged (was it copied whole?)")]
    Payload,
}

impl Code {
    /// Parses a code, ignoring surrounding whitespace.
    ///
    /// # Errors
    /// See [`CodeError`].
    pub fn parse(text: &str) -> Result<Code, CodeError> {
        let rest = text.trim().strip_prefix(SCHEME).ok_or(CodeError::Scheme)?;
        let (addr, payload) = rest.rsplit_once('/').ok_or(CodeError::Shape)?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(CodeError::Shape);
        }
        let raw = URL_SAFE_NO_PAD.decode(payload).map_err(|_| CodeError::Payload)?;
        if raw.len() != RAW_LEN {
            return Err(CodeError::Payload);
        }
        let mut server_key = [0u8; 32];
        server_key.copy_from_slice(&raw[..32]);
        let mut token = Token {
            id: [0; 8],
            secret: [0; 16],
        };
        token.id.copy_from_slice(&raw[32..40]);
        token.secret.copy_from_slice(&raw[40..]);
        Ok(Code {
            addr: addr.to_string(),
            server_key,
            token,
        })
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; RAW_LEN];
        raw[..32].copy_from_slice(&self.server_key);
        raw[32..40].copy_from_slice(&self.token.id);
        raw[40..].copy_from_slice(&self.token.secret);
        write!(f, "{SCHEME}{}/{}", self.addr, URL_SAFE_NO_PAD.encode(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let code = Code {
            addr: "[::1]:7420".into(),
            server_key: [3; 32],
            token: Token {
                id: [1; 8],
                secret: [2; 16],
            },
        };
        let text = code.to_string();
        assert!(text.starts_with("tidings://[::1]:7420/"));
        assert_eq!(Code::parse(&format!("  {text}\n")), Ok(code));
    }

    #[test]
    fn damaged_codes_are_refused() {
        assert_eq!(Code::parse("http://x:1/abc"), Err(CodeError::Scheme));
        assert_eq!(Code::parse("tidings://nowhere"), Err(CodeError::Shape));
        assert_eq!(Code::parse("tidings://x:1/abc"), Err(CodeError::Payload));
        assert_eq!(Code::parse("tidings:///AAAA"), Err(CodeError::Shape));
    }
}
