//! The [`Authority`] of one service: the tokens in force (reloaded when the file changes), the
//! service's global limit, and the check of a request's `authorization: Bearer <token>`.
//!
//! Without a tokens file every call is the anonymous principal (every role, every key, only the
//! global limit): the services behave as they did before authentication existed, which is for
//! trusted networks only.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::QuotaClock,
    file::{self, Entry, TokensFileError},
    metrics,
    principal::{Grant, Principal},
    quota::{Bucket, Rate},
    token::{self, TokenHash},
};

/// The authentication settings of a public service (flattened into its `Config`).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// TOML file of the bearer tokens that may call this service: per token a name, the SHA-256
    /// of the token (never the token), roles (write, read, admin), optional key prefixes and
    /// quotas. Make entries with `hitctl token new`. Re-read when it changes (a broken new file
    /// is logged and the previous tokens stay). Without it every caller may do everything:
    /// for trusted networks only.
    #[arg(long, env = "HITCOUNTER_TOKENS_FILE", value_name = "PATH")]
    pub tokens_file: Option<PathBuf>,

    /// Require a token for health checks and reflection too (they are open by default so that
    /// orchestrators and grpcurl can probe without one).
    #[arg(long, env = "HITCOUNTER_AUTH_HEALTH", requires = "tokens_file")]
    pub auth_health: bool,

    /// How often the tokens file is checked for changes, in milliseconds. A change is taken
    /// when two checks in a row read the same contents (so a half-written file is never used):
    /// within two periods.
    #[arg(long, env = "HITCOUNTER_TOKENS_POLL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub tokens_poll_ms: u64,

    /// The clock of the quota buckets: the system's, or a manual one in tests.
    #[arg(skip)]
    pub quota_clock: QuotaClock,
}

impl Default for AuthArgs {
    /// No tokens file, open health, a 2 s poll, the system clock (the command line's defaults).
    fn default() -> Self {
        Self {
            tokens_file: None,
            auth_health: false,
            tokens_poll_ms: 2000,
            quota_clock: QuotaClock::system(),
        }
    }
}

/// Why a call was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    /// No `authorization` metadata.
    #[error("missing `authorization: Bearer <token>` metadata: this service requires a token")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("the `authorization` metadata must be `Bearer <token>`")]
    Malformed,
    /// The token is not in the tokens file.
    #[error("unknown token: it is not (or no longer) in this service's tokens file")]
    Unknown,
}

impl Unauthenticated {
    /// The `token` label of the rejection metric.
    pub fn label(self) -> &'static str {
        match self {
            Unauthenticated::Missing => metrics::MISSING,
            Unauthenticated::Malformed | Unauthenticated::Unknown => metrics::UNKNOWN,
        }
    }
}

/// The tokens in force: hashes and grants in the same order.
#[derive(Debug, Default)]
struct Table {
    hashes: Vec<TokenHash>,
    grants: Vec<Arc<Grant>>,
}

#[derive(Debug)]
enum Tokens {
    /// No tokens file.
    Open(Arc<Grant>),
    /// From a file.
    File {
        path: PathBuf,
        poll: Duration,
        table: RwLock<Arc<Table>>,
        seen: Mutex<Seen>,
    },
}

/// What the reloads have seen of the file.
#[derive(Debug, Default)]
struct Seen {
    /// The contents last acted on, taken or refused, so an unchanged file is not parsed again
    /// and a bad one is reported once. `None` after a failed read.
    current: Option<String>,
    /// New contents seen once: taken only if the next poll reads them again, so a file caught
    /// half-written (an editor saving in place truncates it first) is never used.
    candidate: Option<String>,
}

/// Authentication and quotas of one service.
#[derive(Debug)]
pub struct Authority {
    service: &'static str,
    clock: QuotaClock,
    global: Option<Arc<Bucket>>,
    auth_health: bool,
    tokens: Tokens,
}

/// What [`Authority::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The file is as it was.
    Unchanged,
    /// The file changed since the last look; it is taken once it reads the same twice.
    Pending,
    /// New tokens are in force: this many.
    Tokens(usize),
}

impl Authority {
    /// The authority of `service` (`ingest`, `query`: the metric names' part), with its global
    /// limit, reading the tokens file if one is given.
    ///
    /// # Errors
    /// [`TokensFileError`] when the file cannot be read or has an error.
    pub fn new(
        args: &AuthArgs,
        service: &'static str,
        global: Option<Rate>,
    ) -> Result<Arc<Self>, TokensFileError> {
        let clock = args.quota_clock.clone();
        let tokens = match &args.tokens_file {
            None => Tokens::Open(Arc::new(Grant::anonymous())),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
                        path: path.display().to_string(),
                        source,
                    })?;
                let entries = file::parse(&path.display().to_string(), &text)?;
                let table = build(&entries, &Table::default(), &clock);
                metrics::reloaded(service, true, Some(entries.len()));
                tracing::info!(path = %path.display(), tokens = entries.len(), "tokens loaded");
                if entries.is_empty() {
                    tracing::warn!(path = %path.display(), "the tokens file has no tokens: every call will be refused");
                }
                Tokens::File {
                    path: path.clone(),
                    poll: Duration::from_millis(args.tokens_poll_ms),
                    table: RwLock::new(Arc::new(table)),
                    seen: Mutex::new(Seen {
                        current: Some(text),
                        candidate: None,
                    }),
                }
            }
        };
        Ok(Arc::new(Self {
            service,
            global: global.map(|rate| Arc::new(Bucket::new(rate, clock.clone()))),
            clock,
            auth_health: args.auth_health,
            tokens,
        }))
    }

    /// Whether calls need a token (a tokens file is in force).
    pub fn requires_tokens(&self) -> bool {
        matches!(self.tokens, Tokens::File { .. })
    }

    /// The service's name in metric names.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Whether a call to `path` (`/package.Service/Method`) goes through without a token:
    /// health checks and reflection, unless `--auth-health`.
    pub fn is_open_path(&self, path: &str) -> bool {
        const OPEN: [&str; 3] = [
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1.ServerReflection/",
            "/grpc.reflection.v1alpha.ServerReflection/",
        ];
        !self.auth_health && OPEN.iter().any(|open| path.starts_with(open))
    }

    /// The principal of a call with these headers.
    ///
    /// # Errors
    /// [`Unauthenticated`] when a token is required and missing, malformed or unknown.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, Unauthenticated> {
        let grant = match &self.tokens {
            Tokens::Open(anonymous) => Arc::clone(anonymous),
            Tokens::File { table, .. } => {
                let value = headers
                    .get(http::header::AUTHORIZATION)
                    .ok_or(Unauthenticated::Missing)?;
                let token = bearer(value).ok_or(Unauthenticated::Malformed)?;
                let table = Arc::clone(&table.read().unwrap_or_else(PoisonError::into_inner));
                find(&table, &token::hash(token)).ok_or(Unauthenticated::Unknown)?
            }
        };
        Ok(Principal {
            grant,
            global: self.global.clone(),
            service: self.service,
            clock: self.clock.clone(),
        })
    }

    /// Re-reads the tokens file and takes it if it changed and reads the same as at the previous
    /// call. A file that cannot be read or has an error keeps the tokens in force, and is logged
    /// (once per change of the file).
    ///
    /// # Errors
    /// The file's error.
    pub fn reload(&self) -> Result<Reloaded, TokensFileError> {
        let Tokens::File {
            path, table, seen, ..
        } = &self.tokens
        else {
            return Ok(Reloaded::Unchanged);
        };
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(source) => {
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                let error = TokensFileError::Read {
                    path: shown,
                    source,
                };
                // Report a file that went missing once, not on every poll.
                seen.candidate = None;
                if seen.current.take().is_some() {
                    metrics::reloaded(self.service, false, None);
                    tracing::error!(%error, "cannot reload the tokens file; the previous tokens stay in force");
                }
                return Err(error);
            }
        };
        let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.current.as_deref() == Some(text.as_str()) {
            seen.candidate = None;
            return Ok(Reloaded::Unchanged);
        }
        if seen.candidate.as_deref() != Some(text.as_str()) {
            seen.candidate = Some(text);
            return Ok(Reloaded::Pending);
        }
        seen.candidate = None;
        let parsed = file::parse(&shown, &text);
        seen.current = Some(text);
        // A file with no tokens at all is refused on reload: it is what a file truncated for a
        // rewrite reads as (twice in a row, when the writer stalls between truncating and
        // writing, as seen under load), and taking it would refuse every caller. To revoke
        // every token, keep one entry (e.g. an admin's) or stop the service.
        let parsed = parsed.and_then(|entries| {
            if entries.is_empty() {
                Err(TokensFileError::NoTokens {
                    path: shown.clone(),
                })
            } else {
                Ok(entries)
            }
        });
        let entries = match parsed {
            Ok(entries) => entries,
            Err(error) => {
                metrics::reloaded(self.service, false, None);
                tracing::error!(%error, "the tokens file changed but has an error; the previous tokens stay in force");
                return Err(error);
            }
        };
        let mut current = table.write().unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(build(&entries, &current, &self.clock));
        metrics::reloaded(self.service, true, Some(entries.len()));
        tracing::info!(path = %shown, tokens = entries.len(), "tokens file reloaded");
        Ok(Reloaded::Tokens(entries.len()))
    }

    /// Checks the tokens file for changes every `--tokens-poll-ms` until `shutdown`; a change is
    /// taken at the poll after it is first seen.
    ///
    /// Why a poll and not file-system notifications: the file is small, so reading it every two
    /// seconds costs nothing; a poll sees every way a file gets replaced (an editor's rename, a
    /// Kubernetes Secret's symlink swap, a network file system), where inotify on the file
    /// misses some of them; and it needs no extra dependency or thread.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let Tokens::File { poll, .. } = &self.tokens else {
            return;
        };
        let mut ticks = tokio::time::interval(*poll);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let this = Arc::clone(&self);
            // The read is a blocking file operation: keep it off the request workers.
            if let Err(error) = tokio::task::spawn_blocking(move || this.reload()).await {
                tracing::error!(%error, "the tokens reload task failed");
            }
        }
    }
}

/// The token of `Bearer <token>` (the scheme in any case).
fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The grant whose hash is `hash`. Every hash is compared in constant time and the scan does not
/// stop at a match, so the time taken says nothing about which bytes of which hash matched.
fn find(table: &Table, hash: &TokenHash) -> Option<Arc<Grant>> {
    let mut found = subtle::Choice::from(0);
    let mut index = 0u32;
    for (i, candidate) in table.hashes.iter().enumerate() {
        let equal = candidate.ct_eq(hash);
        // The file holds at most MAX_ENTRIES (10 000) tokens, so the index fits.
        index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), equal);
        found |= equal;
    }
    if bool::from(found) {
        table.grants.get(index as usize).cloned()
    } else {
        None
    }
}

/// The table of `entries`, keeping the buckets of `previous` grants of the same name and rate
/// (a reload must not refill them) and the open-watch count of the same name (its streams are
/// still open).
fn build(entries: &[Entry], previous: &Table, clock: &QuotaClock) -> Table {
    let before: HashMap<&str, &Arc<Grant>> = previous
        .grants
        .iter()
        .map(|grant| (grant.name.as_str(), grant))
        .collect();
    let bucket = |old: Option<&Arc<Bucket>>, rate: Option<Rate>| match (old, rate) {
        (Some(old), Some(rate)) if old.rate() == rate => Some(Arc::clone(old)),
        (_, Some(rate)) => Some(Arc::new(Bucket::new(rate, clock.clone()))),
        (_, None) => None,
    };
    let mut table = Table::default();
    for entry in entries {
        let old = before.get(entry.name.as_str());
        let grant = Grant {
            name: entry.name.clone(),
            roles: entry.roles.clone(),
            prefixes: entry.prefixes.clone(),
            hits: bucket(old.and_then(|g| g.hits.as_ref()), entry.hits),
            requests: bucket(old.and_then(|g| g.requests.as_ref()), entry.requests),
            max_watches: entry.max_watches,
            open_watches: old.map(|g| Arc::clone(&g.open_watches)).unwrap_or_default(),
        };
        table.hashes.push(entry.hash);
        table.grants.push(Arc::new(grant));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{principal::RefusalKind, token::to_hex};

    fn header(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).expect("a header value"),
        );
        headers
    }

    fn entry(name: &str, token: &str, extra: &str) -> String {
        format!(
            "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"write\"]\n{extra}\n",
            to_hex(&token::hash(token))
        )
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        clock: QuotaClock,
        authority: Arc<Authority>,
    }

    fn fixture(text: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, text).expect("write");
        let clock = QuotaClock::manual();
        let args = AuthArgs {
            tokens_file: Some(path.clone()),
            auth_health: false,
            tokens_poll_ms: 2000,
            quota_clock: clock.clone(),
        };
        let authority = Authority::new(&args, "test", None).expect("loads");
        Fixture {
            _dir: dir,
            path,
            clock,
            authority,
        }
    }

    #[test]
    fn tokens_are_checked_by_hash_and_scheme() {
        let f = fixture(&(entry("a", "tok-a", "") + &entry("b", "tok-b", "")));
        let name = |value: &str| {
            f.authority
                .authenticate(&header(value))
                .map(|p| p.name().to_owned())
        };
        assert_eq!(name("Bearer tok-a").as_deref(), Ok("a"));
        assert_eq!(name("bearer  tok-b ").as_deref(), Ok("b"));
        assert_eq!(name("Bearer tok-c"), Err(Unauthenticated::Unknown));
        assert_eq!(name("Basic tok-a"), Err(Unauthenticated::Malformed));
        assert_eq!(name("Bearer "), Err(Unauthenticated::Malformed));
        assert_eq!(
            f.authority
                .authenticate(&http::HeaderMap::new())
                .map(|_| ()),
            Err(Unauthenticated::Missing)
        );
    }

    #[test]
    fn a_reload_replaces_tokens_keeps_buckets_and_a_bad_file_keeps_the_old_tokens() {
        let quota = "hits_per_second = 1\nhits_burst = 2";
        let f = fixture(&entry("a", "tok-a", quota));
        let a = f
            .authority
            .authenticate(&header("Bearer tok-a"))
            .expect("a");
        assert_eq!(a.take_hits(2), Ok(()));
        assert_eq!(
            f.authority.reload().expect("unchanged"),
            Reloaded::Unchanged
        );

        // Same quota: the bucket (empty now) carries over; the new token works, the old one not.
        std::fs::write(&f.path, entry("a", "tok-a2", quota)).expect("write");
        assert_eq!(f.authority.reload().expect("seen once"), Reloaded::Pending);
        assert_eq!(f.authority.reload().expect("reloads"), Reloaded::Tokens(1));
        assert_eq!(
            f.authority
                .authenticate(&header("Bearer tok-a"))
                .map(|_| ()),
            Err(Unauthenticated::Unknown)
        );
        let a2 = f
            .authority
            .authenticate(&header("Bearer tok-a2"))
            .expect("a2");
        let refused = a2.take_hits(1).expect_err("the bucket is still empty");
        assert!(
            matches!(refused.kind, RefusalKind::OverQuota { .. }),
            "{refused}"
        );

        // A broken file: an error, and the tokens in force stay.
        std::fs::write(&f.path, "[[token]]\nname = \"x\"\n").expect("write");
        assert_eq!(f.authority.reload().expect("seen once"), Reloaded::Pending);
        let error = f.authority.reload().expect_err("broken").to_string();
        assert_eq!(
            f.authority.reload().expect("reported once"),
            Reloaded::Unchanged
        );
        assert!(error.contains("token #1 (x)"), "{error}");
        assert!(f.authority.authenticate(&header("Bearer tok-a2")).is_ok());
        f.clock.advance(Duration::from_secs(1));
        assert_eq!(a2.take_hits(1), Ok(()));
    }

    /// A file being rewritten in place is empty between its truncation and the write; a writer
    /// that stalls there is read empty twice in a row (seen under load: the integration test
    /// `the_tokens_file_is_reloaded_and_a_broken_one_keeps_the_old_tokens` failed once in a loop
    /// of full runs, every caller refused). That must not refuse every caller.
    #[test]
    fn an_empty_file_read_twice_keeps_the_tokens_in_force() {
        let f = fixture(&entry("a", "tok-a", ""));
        std::fs::write(&f.path, "").expect("truncate");
        assert_eq!(f.authority.reload().expect("seen once"), Reloaded::Pending);
        let error = f.authority.reload().expect_err("empty").to_string();
        assert!(error.contains("has no tokens"), "{error}");
        assert!(f.authority.authenticate(&header("Bearer tok-a")).is_ok());
        // The completed write is taken as usual.
        std::fs::write(&f.path, entry("b", "tok-b", "")).expect("write");
        assert_eq!(f.authority.reload().expect("seen once"), Reloaded::Pending);
        assert_eq!(f.authority.reload().expect("reloads"), Reloaded::Tokens(1));
        assert!(f.authority.authenticate(&header("Bearer tok-b")).is_ok());
    }

    #[test]
    fn without_a_file_every_call_is_anonymous_with_every_right() {
        let authority = Authority::new(&AuthArgs::default(), "test", None).expect("open");
        let principal = authority
            .authenticate(&http::HeaderMap::new())
            .expect("anonymous");
        assert_eq!(principal.name(), crate::ANONYMOUS);
        assert_eq!(principal.may_write("hits", ["any"]), Ok(()));
        assert_eq!(principal.admit_read("keys", ["any"]), Ok(()));
        assert_eq!(principal.admit_top(""), Ok(vec![String::new()]));
        assert!(!authority.requires_tokens());
    }
}
