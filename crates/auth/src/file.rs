//! The tokens file: TOML, one `[[token]]` table per client.
//!
//! ```toml
//! [[token]]
//! name = "shop-frontend"          # in logs and metric labels; letters, digits, `.`, `_`, `-`
//! sha256 = "9f86d081884c7d65..."  # SHA-256 of the token in hex (never the token itself)
//! roles = ["write"]               # write (Ingest), read (Query), admin (both)
//! prefixes = ["shop/"]            # optional: the keys it may write and read; absent = all
//! hits_per_second = 5000          # optional Ingest quota, in hits (a hit's count, 0 = 1)
//! hits_burst = 10000              # optional; default one second's worth
//! requests_per_second = 100       # optional Query quota, in requests
//! requests_burst = 200            # optional; default one second's worth
//! max_watches = 10                # optional: most WatchHits streams open at once
//! ```
//!
//! [`parse`] checks every entry and names the file and the entry in its errors; nothing of a
//! file with an error is used.

use std::{collections::HashSet, path::Path};

use serde::Deserialize;

use crate::{
    quota::Rate,
    token::{parse_hash, TokenHash},
    Role,
};

/// The longest key prefix (the longest key is 256 bytes).
const MAX_PREFIX_BYTES: usize = 256;

/// The most entries in one file: names become metric labels, so their number is bounded.
pub const MAX_ENTRIES: usize = 10_000;

/// A tokens file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    /// The file cannot be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape.
    #[error("tokens file {path} is not valid: {source}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// One entry is wrong.
    #[error("tokens file {path}: token #{index} ({name}): {problem}")]
    Entry {
        /// The file.
        path: String,
        /// The entry's position, from 1.
        index: usize,
        /// The entry's name, or `unnamed`.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A reloaded file holds no token (see `Authority::reload`).
    #[error("tokens file {path} has no tokens; a reload never takes an empty file (it would refuse every caller): keep at least one entry")]
    NoTokens {
        /// The file.
        path: String,
    },
    /// Too many entries.
    #[error("tokens file {path} has {count} tokens; the limit is {MAX_ENTRIES}")]
    TooMany {
        /// The file.
        path: String,
        /// How many.
        count: usize,
    },
}

/// One checked entry of the tokens file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// The SHA-256 of its token.
    pub hash: TokenHash,
    /// What it may call.
    pub roles: Vec<Role>,
    /// The key prefixes it may use, with prefixes covered by a shorter one removed; empty for
    /// every key.
    pub prefixes: Vec<String>,
    /// Ingest quota, in hits.
    pub hits: Option<Rate>,
    /// Query quota, in requests.
    pub requests: Option<Rate>,
    /// Most open WatchHits streams.
    pub max_watches: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    sha256: String,
    roles: Vec<String>,
    #[serde(default)]
    prefixes: Option<Vec<String>>,
    hits_per_second: Option<u32>,
    hits_burst: Option<u32>,
    requests_per_second: Option<u32>,
    requests_burst: Option<u32>,
    max_watches: Option<u32>,
}

/// Reads and checks the tokens file at `path`.
///
/// # Errors
/// [`TokensFileError`] naming the file and, for a wrong entry, the entry.
pub fn load(path: &Path) -> Result<Vec<Entry>, TokensFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}

/// Checks the text of a tokens file; `path` names it in errors.
///
/// # Errors
/// [`TokensFileError`].
pub fn parse(path: &str, text: &str) -> Result<Vec<Entry>, TokensFileError> {
    let raw: RawFile = toml::from_str(text).map_err(|source| TokensFileError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    if raw.token.len() > MAX_ENTRIES {
        return Err(TokensFileError::TooMany {
            path: path.to_owned(),
            count: raw.token.len(),
        });
    }
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    let mut entries = Vec::with_capacity(raw.token.len());
    for (i, table) in raw.token.into_iter().enumerate() {
        let name = table
            .get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or("unnamed")
            .to_owned();
        let error = |problem: String| TokensFileError::Entry {
            path: path.to_owned(),
            index: i + 1,
            name: name.clone(),
            problem,
        };
        let raw = RawEntry::deserialize(toml::Value::Table(table))
            .map_err(|e| error(e.message().to_owned()))?;
        let entry = check(raw).map_err(error)?;
        if !names.insert(entry.name.clone()) {
            return Err(error("another token has this name".into()));
        }
        if !hashes.insert(entry.hash) {
            return Err(error(
                "another token has this sha256 (the same token twice)".into(),
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn check(raw: RawEntry) -> Result<Entry, String> {
    if raw.name.is_empty()
        || raw.name.len() > 64
        || !raw
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(
            "name must be 1 to 64 letters, digits, `.`, `_` or `-` (it becomes a metric label)"
                .into(),
        );
    }
    let hash = parse_hash(&raw.sha256).ok_or_else(|| {
        "sha256 must be 64 hex digits, the SHA-256 of the token (`hitctl token new` prints it)"
            .to_owned()
    })?;
    if raw.roles.is_empty() {
        return Err("roles is empty: give at least one of write, read, admin".into());
    }
    let roles = raw
        .roles
        .iter()
        .map(|role| {
            role.parse::<Role>()
                .map_err(|()| format!("unknown role `{role}`: expected write, read or admin"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prefixes = match raw.prefixes {
        None => Vec::new(),
        Some(prefixes) if prefixes.is_empty() => {
            return Err(
                "prefixes is empty, which would allow no key: leave it out to allow every key"
                    .into(),
            )
        }
        Some(prefixes) => {
            for prefix in &prefixes {
                if prefix.is_empty() || prefix.len() > MAX_PREFIX_BYTES {
                    return Err(format!(
                        "prefix {prefix:?} must be 1 to {MAX_PREFIX_BYTES} bytes"
                    ));
                }
            }
            minimal_prefixes(prefixes)
        }
    };
    let rate = |what: &str, per_second: Option<u32>, burst: Option<u32>| match (per_second, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(format!("{what}_burst needs {what}_per_second")),
        (Some(per_second), burst) => Rate::new(per_second, burst).map(Some).ok_or_else(|| {
            format!(
                "{what}_per_second and {what}_burst must be above 0 (leave them out for no limit)"
            )
        }),
    };
    Ok(Entry {
        name: raw.name,
        hash,
        roles,
        prefixes,
        hits: rate("hits", raw.hits_per_second, raw.hits_burst)?,
        requests: rate("requests", raw.requests_per_second, raw.requests_burst)?,
        max_watches: raw.max_watches,
    })
}

/// The prefixes without those another one covers (`a/` covers `a/b/`), sorted: the key spaces
/// left are disjoint, so a TopKeys over each of them can be merged without counting a key twice.
fn minimal_prefixes(mut prefixes: Vec<String>) -> Vec<String> {
    prefixes.sort();
    prefixes.dedup();
    let mut kept: Vec<String> = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        // Sorted order puts a covering prefix before everything it covers.
        if !kept
            .iter()
            .any(|shorter| prefix.starts_with(shorter.as_str()))
        {
            kept.push(prefix);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn entry(body: &str) -> String {
        format!("[[token]]\nname = \"web\"\nsha256 = \"{HASH}\"\n{body}\n")
    }

    #[test]
    fn a_full_entry_parses() {
        let text = entry(
            "roles = [\"write\", \"read\"]\nprefixes = [\"a/b/\", \"a/\", \"c/\"]\n\
             hits_per_second = 10\nhits_burst = 20\nrequests_per_second = 2\nmax_watches = 1",
        );
        let entries = parse("t.toml", &text).expect("valid");
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.name, "web");
        assert_eq!(e.roles, vec![Role::Write, Role::Read]);
        assert_eq!(e.prefixes, vec!["a/".to_owned(), "c/".to_owned()]);
        assert_eq!(e.hits, Rate::new(10, Some(20)));
        assert_eq!(e.requests, Rate::new(2, Some(2)));
        assert_eq!(e.max_watches, Some(1));
        assert!(parse("t.toml", "").expect("empty is valid").is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        let second = |body: &str| {
            format!(
                "{}[[token]]\nname = \"api\"\nsha256 = \"{}\"\n{body}\n",
                entry("roles = [\"read\"]"),
                "0".repeat(64)
            )
        };
        for (text, expected) in [
            (
                second("roles = [\"reader\"]"),
                "token #2 (api): unknown role `reader`",
            ),
            (second("roles = []"), "token #2 (api): roles is empty"),
            (
                second("role = [\"read\"]"),
                "token #2 (api): unknown field `role`",
            ),
            (
                second("roles = [\"read\"]\nprefixes = []"),
                "token #2 (api): prefixes is empty",
            ),
            (
                second("roles = [\"read\"]\nhits_burst = 3"),
                "token #2 (api): hits_burst needs hits_per_second",
            ),
            (
                second("roles = [\"read\"]\nrequests_per_second = 0"),
                "token #2 (api): requests_per_second and requests_burst must be above 0",
            ),
            (
                entry("roles = [\"read\"]").repeat(2),
                "token #2 (web): another token has this name",
            ),
            (
                entry("roles = [\"read\"]").replace("sha256 = \"ba", "sha256 = \"zz"),
                "token #1 (web): sha256 must be 64 hex digits",
            ),
            (
                entry("roles = [\"read\"]").replace("\"web\"", "\"a b\""),
                "token #1 (a b): name must be",
            ),
            ("[[tokens]]\n".to_owned(), "t.toml is not valid"),
        ] {
            let error = parse("t.toml", &text).expect_err(&text).to_string();
            assert!(error.contains(expected), "{error}");
            assert!(error.contains("t.toml"), "{error}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = load(Path::new("/nonexistent/tokens.toml"))
            .expect_err("missing")
            .to_string();
        assert!(error.contains("/nonexistent/tokens.toml"), "{error}");
    }
}
