//! Bearer tokens: making a new one, its SHA-256 hash (what the tokens file stores), and the
//! tokens-file entry for it.
//!
//! A token is `hc_` followed by 43 base64url characters (32 random bytes from the thread-local
//! CSPRNG, seeded from the operating system). The server never stores or logs the token, only
//! its hash; a 256-bit random token needs no slow password hash, since there is nothing to
//! guess from a dictionary.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// What every token starts with, so a leaked one is recognisable (e.g. by secret scanners).
pub const TOKEN_PREFIX: &str = "hc_";

/// The SHA-256 of a token.
pub type TokenHash = [u8; 32];

/// A new random token.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", base64url(&bytes))
}

/// The SHA-256 of `token`.
pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// `bytes` in lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// Parses 64 hex digits (either case) into a hash.
pub fn parse_hash(hex: &str) -> Option<TokenHash> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let value = digit(pair[0])? * 16 + digit(pair[1])?;
        *byte = u8::try_from(value).ok()?;
    }
    Some(out)
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // 3 bytes give 4 characters; a short last chunk gives one more than its bytes.
        for i in 0..=chunk.len() {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// What a new tokens-file entry says (everything but the hash, which comes from the token).
#[derive(Debug, Clone, Default)]
pub struct EntrySpec {
    /// The entry's name (logs, metric labels).
    pub name: String,
    /// `write`, `read`, `admin`.
    pub roles: Vec<String>,
    /// Key prefixes; empty for every key.
    pub prefixes: Vec<String>,
    /// Ingest quota in hits per second, and its burst.
    pub hits: Option<(u32, Option<u32>)>,
    /// Query quota in requests per second, and its burst.
    pub requests: Option<(u32, Option<u32>)>,
    /// Most open WatchHits streams.
    pub max_watches: Option<u32>,
}

/// The `[[token]]` TOML entry of `spec` for a token whose hash is `hash`.
pub fn toml_entry(spec: &EntrySpec, hash: &TokenHash) -> String {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|item| toml_string(item))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("[[token]]\n");
    out.push_str(&format!("name = {}\n", toml_string(&spec.name)));
    out.push_str(&format!("sha256 = \"{}\"\n", to_hex(hash)));
    out.push_str(&format!("roles = [{}]\n", list(&spec.roles)));
    if !spec.prefixes.is_empty() {
        out.push_str(&format!("prefixes = [{}]\n", list(&spec.prefixes)));
    }
    if let Some((per_second, burst)) = spec.hits {
        out.push_str(&format!("hits_per_second = {per_second}\n"));
        if let Some(burst) = burst {
            out.push_str(&format!("hits_burst = {burst}\n"));
        }
    }
    if let Some((per_second, burst)) = spec.requests {
        out.push_str(&format!("requests_per_second = {per_second}\n"));
        if let Some(burst) = burst {
            out.push_str(&format!("requests_burst = {burst}\n"));
        }
    }
    if let Some(max) = spec.max_watches {
        out.push_str(&format!("max_watches = {max}\n"));
    }
    out
}

/// A TOML basic string: quoted, with `"`, `\` and control characters escaped.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_sha256_in_hex() {
        // SHA-256("abc") from FIPS 180-2.
        assert_eq!(
            to_hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let parsed = parse_hash("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD");
        assert_eq!(parsed, Some(hash("abc")));
        assert_eq!(parse_hash("ba78"), None);
        assert_eq!(parse_hash(&"g".repeat(64)), None);
    }

    #[test]
    fn new_tokens_are_distinct_urlsafe_and_long() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert!(a[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
    }
}
