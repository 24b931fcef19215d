//! Invite and link codes as text (spec §5.1):
//! `tidings://HOST:PORT/` followed by the unpadded base64url of 56 bytes:
//! the server's static public key (32), the token id (8) and the token
//! secret (16).
//!
//! A code is a bearer secret: [`Code`]'s `Debug` hides the secret, and only
//! `Display` (which *is* the code) shows it. The daemon prints invites with
//! the same type.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

use crate::noise::{KEY_LEN, PublicKey};
use crate::wire::Token;

/// The scheme every code starts with.
pub const SCHEME: &str = "tidings://";
/// Length of the decoded payload: key, token id, token secret.
pub const PAYLOAD_LEN: usize = KEY_LEN + 8 + 16;

/// An invite or link code: where the server is, its pinned key, and the
/// one-time token.
#[derive(Clone, PartialEq, Eq)]
pub struct Code {
    /// `host:port` to connect to (a host may be a name, an IPv4 address or
    /// a bracketed IPv6 address).
    pub addr: String,
    /// The server's static public key, pinned by the client.
    pub server_key: PublicKey,
    /// The secret part the server checks.
    pub token: Token,
}

/// Why a text is not a code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodeError {
    /// It does not start with `tidings://`.
    #[error("a code starts with {SCHEME}")]
    Scheme,
    /// The `HOST:PORT` part is missing or has no valid port.
    #[error("the code has no valid HOST:PORT")]
    Address,
    /// The part after the address is not base64url of the right length.
    #[error("the code's key and secret are damaged (expected {PAYLOAD_LEN} bytes of base64url)")]
    Payload,
}

impl Code {
    /// Parses a code, ignoring surrounding whitespace.
    ///
    /// # Errors
    /// [`CodeError`] saying which part is wrong (never echoing the secret).
    pub fn parse(text: &str) -> Result<Code, CodeError> {
        let rest = text.trim().strip_prefix(SCHEME).ok_or(CodeError::Scheme)?;
        let (addr, payload) = rest.rsplit_once('/').ok_or(CodeError::Address)?;
        if !valid_addr(addr) {
            return Err(CodeError::Address);
        }
        let mut bytes = [0u8; PAYLOAD_LEN + 3];
        let n = URL_SAFE_NO_PAD
            .decode_slice(payload, &mut bytes)
            .map_err(|_| CodeError::Payload)?;
        if n != PAYLOAD_LEN {
            return Err(CodeError::Payload);
        }
        let mut server_key = [0u8; KEY_LEN];
        server_key.copy_from_slice(&bytes[..KEY_LEN]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[KEY_LEN..KEY_LEN + 8]);
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&bytes[KEY_LEN + 8..PAYLOAD_LEN]);
        bytes.fill(0);
        Ok(Code {
            addr: addr.to_owned(),
            server_key,
            token: Token { id, secret },
        })
    }
}

/// `host:port` with a non-empty host without `/` or whitespace, and a
/// port from 1 to 65535; IPv6 hosts in brackets.
fn valid_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p != 0) && port.bytes().all(|b| b.is_ascii_digit());
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(':') && host.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    };
    port_ok && host_ok
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = [0u8; PAYLOAD_LEN];
        bytes[..KEY_LEN].copy_from_slice(&self.server_key);
        bytes[KEY_LEN..KEY_LEN + 8].copy_from_slice(&self.token.id);
        bytes[KEY_LEN + 8..].copy_from_slice(&self.token.secret);
        write!(f, "{SCHEME}{}/{}", self.addr, URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Code({}, key {}, {:?})",
            self.addr,
            hex::encode(self.server_key),
            self.token
        )
    }
}

impl FromStr for Code {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Code, CodeError> {
        Code::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(addr: &str) -> Code {
        Code {
            addr: addr.into(),
            server_key: [0xfb; 32],
            token: Token {
                id: [1, 2, 3, 4, 5, 6, 7, 8],
                secret: [0xee; 16],
            },
        }
    }

    #[test]
    fn round_trip() {
        for addr in ["127.0.0.1:7070", "chat.example.org:443", "[::1]:9", "pi:65535"] {
            let code = sample(addr);
            let text = code.to_string();
            assert!(text.starts_with("tidings://"));
            // 56 bytes are 75 base64 characters without padding.
            assert_eq!(text.len(), SCHEME.len() + addr.len() + 1 + 75);
            assert_eq!(Code::parse(&text), Ok(code.clone()));
            assert_eq!(format!(" {text}\n").parse::<Code>(), Ok(code));
        }
    }

    #[test]
    fn known_text() {
        let code = Code {
            addr: "h:1".into(),
            server_key: [0; 32],
            token: Token {
                id: [0; 8],
                secret: [0; 16],
            },
        };
        assert_eq!(code.to_string(), format!("tidings://h:1/{}", "A".repeat(75)));
    }

    #[test]
    fn rejects() {
        let good = sample("host:7070").to_string();
        assert_eq!(
            Code::parse(&good.replace("tidings://", "http://")),
            Err(CodeError::Scheme)
        );
        assert_eq!(Code::parse(&good.replace(":7070", "")), Err(CodeError::Address));
        assert_eq!(Code::parse(&good.replace(":7070", ":0")), Err(CodeError::Address));
        assert_eq!(Code::parse(&good.replace(":7070", ":x")), Err(CodeError::Address));
        assert_eq!(Code::parse(&good.replace("host", "")), Err(CodeError::Address));
        assert_eq!(Code::parse(&good[..good.len() - 1]), Err(CodeError::Payload));
        assert_eq!(Code::parse(&format!("{good}A")), Err(CodeError::Payload));
        assert_eq!(Code::parse(&format!("{good}=")), Err(CodeError::Payload));
        assert_eq!(Code::parse("tidings://[::1:7/x"), Err(CodeError::Address));
    }

    #[test]
    fn debug_hides_the_secret() {
        let code = sample("h:1");
        let shown = format!("{code:?}");
        assert!(!shown.contains("ee"), "{shown}");
        assert!(!shown.contains(&code.to_string()[15..]));
    }
}
