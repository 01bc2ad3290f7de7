//! Who is calling, and what they may do: the [`Principal`] the authentication layer puts in
//! every request's extensions, and the checks the handlers run once the request is decoded.
//!
//! The order of the checks is the same everywhere: role, then key scope (so a refused request
//! spends no quota), then the token's own quota, then the service's global limit (so a client
//! over its own quota cannot use up the shared capacity of the others). A refused request takes
//! nothing from any bucket it did not pass; when the global limit refuses, the token's bucket has
//! already been charged (GCRA cannot hand units back), which only happens while the service as
//! a whole is over its limit.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    clock::QuotaClock,
    quota::{Bucket, Rate, Shortfall},
};

/// What a token may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `hitcounter.v1.Ingest`.
    Write,
    /// `hitcounter.v1.Query`.
    Read,
    /// Both.
    Admin,
}

impl Role {
    /// The role's name in the tokens file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Write => "write",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "write" => Ok(Role::Write),
            "read" => Ok(Role::Read),
            "admin" => Ok(Role::Admin),
            _ => Err(()),
        }
    }
}

/// One token's rights and buckets, shared by every request it makes (and kept across reloads of
/// the tokens file while its quota is unchanged, so a reload does not refill a bucket).
#[derive(Debug)]
pub(crate) struct Grant {
    pub(crate) name: String,
    pub(crate) roles: Vec<Role>,
    pub(crate) prefixes: Vec<String>,
    pub(crate) hits: Option<Arc<Bucket>>,
    pub(crate) requests: Option<Arc<Bucket>>,
    pub(crate) max_watches: Option<u32>,
    pub(crate) open_watches: Arc<AtomicU32>,
}

impl Grant {
    /// The grant of calls without a tokens file: every role, every key, no quota of its own.
    pub(crate) fn anonymous() -> Self {
        Self {
            name: ANONYMOUS.to_owned(),
            roles: vec![Role::Admin],
            prefixes: Vec::new(),
            hits: None,
            requests: None,
            max_watches: None,
            open_watches: Arc::default(),
        }
    }

    fn has(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == role || *r == Role::Admin)
    }

    fn covers(&self, key: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// The name of the principal of every call when there is no tokens file (a metric label; token
/// names cannot contain parentheses, so it cannot collide with one).
pub const ANONYMOUS: &str = "(anonymous)";

/// The authenticated caller of one request, with the rights and quotas of its token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub(crate) grant: Arc<Grant>,
    /// The service's global limit, shared by every caller.
    pub(crate) global: Option<Arc<Bucket>>,
    /// The service's name in metric names (`ingest`, `query`).
    pub(crate) service: &'static str,
    pub(crate) clock: QuotaClock,
}

/// Why an authenticated request was refused. Nothing of it was counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The token's name.
    pub token: String,
    /// What went wrong.
    pub kind: RefusalKind,
}

/// The kinds of [`Refusal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalKind {
    /// The token lacks the role the service needs.
    MissingRole(Role),
    /// A key lies outside the token's prefixes; `field` names it (`hits[3]`, `key`).
    KeyOutOfScope {
        /// The request field holding the key.
        field: String,
        /// The token's prefixes.
        prefixes: Vec<String>,
    },
    /// A TopKeys prefix lies outside the token's prefixes.
    PrefixOutOfScope {
        /// The requested prefix.
        prefix: String,
        /// The token's prefixes.
        prefixes: Vec<String>,
    },
    /// A bucket is empty for now.
    OverQuota {
        /// Which bucket: `hits`, `requests` (the token's) or `global` (the service's).
        quota: &'static str,
        /// Its rate.
        rate: Rate,
        /// How long until the request would fit.
        retry_after: Duration,
    },
    /// More units in one request than the bucket's whole burst: it can never fit.
    LargerThanBurst {
        /// Which bucket.
        quota: &'static str,
        /// The units asked for.
        units: u64,
        /// Its rate.
        rate: Rate,
    },
    /// The token has its most WatchHits streams open.
    TooManyWatches {
        /// The limit.
        limit: u32,
    },
}

impl Refusal {
    /// The `reason` label of the rejection metrics: `permission_denied` or `quota`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            RefusalKind::MissingRole(_)
            | RefusalKind::KeyOutOfScope { .. }
            | RefusalKind::PrefixOutOfScope { .. } => "permission_denied",
            RefusalKind::OverQuota { .. }
            | RefusalKind::LargerThanBurst { .. }
            | RefusalKind::TooManyWatches { .. } => "quota",
        }
    }

    /// How long until the request would fit, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            RefusalKind::OverQuota { retry_after, .. } => Some(retry_after),
            _ => None,
        }
    }
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = &self.token;
        match &self.kind {
            RefusalKind::MissingRole(role) => write!(
                f,
                "token {token:?} lacks the `{}` role this service needs (or `admin`)",
                role.as_str()
            ),
            RefusalKind::KeyOutOfScope { field, prefixes } => write!(
                f,
                "{field}: the key is outside the prefixes of token {token:?} ({}); nothing of this request was counted",
                quoted_list(prefixes)
            ),
            RefusalKind::PrefixOutOfScope { prefix, prefixes } => write!(
                f,
                "prefix {prefix:?} is outside the prefixes of token {token:?} ({}): ask for one of them, a longer prefix within one, or no prefix for all of them",
                quoted_list(prefixes)
            ),
            RefusalKind::OverQuota { quota, rate, retry_after } => {
                let whose = if *quota == "global" {
                    "the service's global limit".to_owned()
                } else {
                    format!("the {quota} quota of token {token:?}")
                };
                write!(
                    f,
                    "over {whose} ({rate}); nothing of this request was counted; it fits in {} ms (retry-after-ms)",
                    retry_after_ms(*retry_after)
                )
            }
            RefusalKind::LargerThanBurst { quota, units, rate } => write!(
                f,
                "{units} {quota} in one request is more than the burst of the {} ({rate}); nothing was counted: split the request",
                if *quota == "global" { "service's global limit".to_owned() } else { format!("{quota} quota of token {token:?}") }
            ),
            RefusalKind::TooManyWatches { limit } => write!(
                f,
                "token {token:?} has its most WatchHits streams open ({limit}); close one first"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Whole milliseconds, rounded up so a client that waits this long fits.
pub fn retry_after_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Holds one of a token's WatchHits slots; dropping it frees the slot.
#[derive(Debug)]
pub struct WatchSlot {
    open: Arc<AtomicU32>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Principal {
    /// The token's name (`(anonymous)` without a tokens file).
    pub fn name(&self) -> &str {
        &self.grant.name
    }

    fn refuse(&self, kind: RefusalKind) -> Refusal {
        let refusal = Refusal {
            token: self.grant.name.clone(),
            kind,
        };
        crate::metrics::rejected_request(self.service, refusal.reason(), &self.grant.name);
        refusal
    }

    fn need(&self, role: Role) -> Result<(), Refusal> {
        if self.grant.has(role) {
            Ok(())
        } else {
            Err(self.refuse(RefusalKind::MissingRole(role)))
        }
    }

    fn out_of_scope(&self, field: String) -> Refusal {
        self.refuse(RefusalKind::KeyOutOfScope {
            field,
            prefixes: self.grant.prefixes.clone(),
        })
    }

    /// Ingest, before anything of a batch is looked at: the `write` role, and every key within
    /// the token's prefixes (the first one outside is named by its index in `field`, e.g.
    /// `hits[3]`).
    ///
    /// # Errors
    /// A [`Refusal`] (PERMISSION_DENIED).
    pub fn may_write<'a>(
        &self,
        field: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Refusal> {
        self.need(Role::Write)?;
        self.check_keys(field, keys)
    }

    /// Ingest, once the batch is valid: takes `hits` from the token's hits quota, then from the
    /// service's global limit.
    ///
    /// # Errors
    /// A [`Refusal`] (RESOURCE_EXHAUSTED, with when it would fit).
    pub fn take_hits(&self, hits: u64) -> Result<(), Refusal> {
        self.take("hits", self.grant.hits.as_deref(), hits)
    }

    /// [`Principal::take_hits`] for a stream: waits until the hits fit (HTTP/2 flow control
    /// then slows the client, as a full buffer does), and fails only when they never will.
    ///
    /// # Errors
    /// A [`Refusal`] when the hits are more than a whole burst.
    pub async fn take_hits_waiting(&self, hits: u64) -> Result<(), Refusal> {
        // Bucket by bucket, so a wait for the global limit does not charge the token twice.
        for (quota, bucket) in [
            ("hits", self.grant.hits.as_deref()),
            ("global", self.global.as_deref()),
        ] {
            let Some(bucket) = bucket else { continue };
            loop {
                match take_one(quota, bucket, hits) {
                    Ok(()) => break,
                    Err(RefusalKind::OverQuota { retry_after, .. }) => {
                        crate::metrics::throttled(self.service, &self.grant.name);
                        self.clock.sleep(retry_after).await;
                    }
                    Err(kind) => return Err(self.refuse(kind)),
                }
            }
        }
        Ok(())
    }

    /// Query reads of keys (GetHits, GetHitsMany, GetSeries): the `read` role, every key within
    /// the token's prefixes, then one request from the token's quota and the global limit.
    ///
    /// # Errors
    /// A [`Refusal`].
    pub fn admit_read<'a>(
        &self,
        field: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Refusal> {
        self.need(Role::Read)?;
        self.check_keys(field, keys)?;
        self.take("requests", self.grant.requests.as_deref(), 1)
    }

    /// TopKeys: the `read` role and a prefix within the token's scope, then one request. Returns
    /// the prefixes to search: the requested one, or without one every prefix of the token
    /// (disjoint, so their tops merge exactly), or `[""]` for a token allowed every key.
    ///
    /// # Errors
    /// A [`Refusal`]; a prefix outside every one of the token's is PERMISSION_DENIED.
    pub fn admit_top(&self, prefix: &str) -> Result<Vec<String>, Refusal> {
        self.need(Role::Read)?;
        let scope = if self.grant.prefixes.is_empty() || !prefix.is_empty() {
            if !self.grant.covers(prefix) {
                return Err(self.refuse(RefusalKind::PrefixOutOfScope {
                    prefix: prefix.to_owned(),
                    prefixes: self.grant.prefixes.clone(),
                }));
            }
            vec![prefix.to_owned()]
        } else {
            self.grant.prefixes.clone()
        };
        self.take("requests", self.grant.requests.as_deref(), 1)?;
        Ok(scope)
    }

    /// WatchHits: the `read` role, the key within scope, a free watch slot of the token, then
    /// one request. The slot is held until the returned [`WatchSlot`] is dropped.
    ///
    /// # Errors
    /// A [`Refusal`].
    pub fn admit_watch(&self, key: &str) -> Result<WatchSlot, Refusal> {
        self.need(Role::Read)?;
        self.check_keys("key", [key])?;
        let open = Arc::clone(&self.grant.open_watches);
        let limit = self.grant.max_watches.unwrap_or(u32::MAX);
        if open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_err()
        {
            return Err(self.refuse(RefusalKind::TooManyWatches { limit }));
        }
        let slot = WatchSlot { open };
        self.take("requests", self.grant.requests.as_deref(), 1)?;
        Ok(slot)
    }

    fn check_keys<'a>(
        &self,
        field: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Refusal> {
        if self.grant.prefixes.is_empty() {
            return Ok(());
        }
        for (index, key) in keys.into_iter().enumerate() {
            if !self.grant.covers(key) {
                // A request's single key is named by its field alone (`key`), a list's by index.
                let named = if field == "key" {
                    field.to_owned()
                } else {
                    format!("{field}[{index}]")
                };
                return Err(self.out_of_scope(named));
            }
        }
        Ok(())
    }

    fn take(&self, quota: &'static str, own: Option<&Bucket>, units: u64) -> Result<(), Refusal> {
        self.take_quietly(quota, own, units)
            .map_err(|kind| self.refuse(kind))
    }

    /// The token's bucket, then the global one; the refusal unrecorded.
    fn take_quietly(
        &self,
        quota: &'static str,
        own: Option<&Bucket>,
        units: u64,
    ) -> Result<(), RefusalKind> {
        for (quota, bucket) in [(quota, own), ("global", self.global.as_deref())] {
            if let Some(bucket) = bucket {
                take_one(quota, bucket, units)?;
            }
        }
        Ok(())
    }
}

fn take_one(quota: &'static str, bucket: &Bucket, units: u64) -> Result<(), RefusalKind> {
    bucket.take(units).map_err(|shortfall| match shortfall {
        Shortfall::RetryAfter(retry_after) => RefusalKind::OverQuota {
            quota,
            rate: bucket.rate(),
            retry_after,
        },
        Shortfall::LargerThanBurst => RefusalKind::LargerThanBurst {
            quota,
            units,
            rate: bucket.rate(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(prefixes: &[&str], roles: &[Role], max_watches: Option<u32>) -> Principal {
        let clock = QuotaClock::manual();
        Principal {
            grant: Arc::new(Grant {
                name: "t".into(),
                roles: roles.to_vec(),
                prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
                hits: None,
                requests: Rate::new(1, Some(100))
                    .map(|rate| Arc::new(Bucket::new(rate, clock.clone()))),
                max_watches,
                open_watches: Arc::default(),
            }),
            global: None,
            service: "test",
            clock,
        }
    }

    #[test]
    fn keys_outside_the_prefixes_are_named_by_field_and_index() {
        let p = principal(&["a/", "b/"], &[Role::Write], None);
        assert_eq!(p.may_write("hits", ["a/1", "b/2"]), Ok(()));
        let refused = p.may_write("hits", ["a/1", "c/2", "d/3"]).expect_err("c/2");
        assert_eq!(refused.reason(), "permission_denied");
        assert!(refused.to_string().starts_with("hits[1]: "), "{refused}");
        let refused = p.may_write("key", ["c"]).expect_err("c");
        assert!(refused.to_string().starts_with("key: "), "{refused}");
        let refused = p.admit_read("keys", ["a/1"]).expect_err("no read role");
        assert!(refused.to_string().contains("`read` role"), "{refused}");
        let admin = principal(&[], &[Role::Admin], None);
        assert_eq!(admin.may_write("hits", ["x"]), Ok(()));
        assert_eq!(admin.admit_read("keys", ["x"]), Ok(()));
    }

    #[test]
    fn top_keys_search_within_the_prefixes() {
        let p = principal(&["a/", "b/"], &[Role::Read], None);
        assert_eq!(p.admit_top(""), Ok(vec!["a/".to_owned(), "b/".to_owned()]));
        assert_eq!(p.admit_top("a/x"), Ok(vec!["a/x".to_owned()]));
        for outside in ["c/", "a"] {
            let refused = p.admit_top(outside).expect_err(outside);
            assert!(matches!(refused.kind, RefusalKind::PrefixOutOfScope { .. }));
        }
        let everything = principal(&[], &[Role::Read], None);
        assert_eq!(everything.admit_top(""), Ok(vec![String::new()]));
        assert_eq!(everything.admit_top("z"), Ok(vec!["z".to_owned()]));
    }

    #[test]
    fn watch_slots_are_counted_and_freed() {
        let p = principal(&[], &[Role::Read], Some(2));
        let first = p.admit_watch("k").expect("1 of 2");
        let second = p.admit_watch("k").expect("2 of 2");
        let refused = p.admit_watch("k").expect_err("full");
        assert_eq!(refused.kind, RefusalKind::TooManyWatches { limit: 2 });
        drop(first);
        let third = p.admit_watch("k").expect("a slot was freed");
        drop((second, third));
        assert_eq!(p.grant.open_watches.load(Ordering::Acquire), 0);
    }

    #[test]
    fn refusals_become_statuses_with_a_retry_after_rounded_up() {
        let refusal = Refusal {
            token: "t".into(),
            kind: RefusalKind::OverQuota {
                quota: "hits",
                rate: Rate::new(3, None).expect("a rate"),
                retry_after: Duration::from_micros(1_200),
            },
        };
        let status = tonic::Status::from(refusal);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get(crate::RETRY_AFTER_MS)
                .map(|v| v.to_str().ok()),
            Some(Some("2"))
        );
        let denied = tonic::Status::from(Refusal {
            token: "t".into(),
            kind: RefusalKind::MissingRole(Role::Write),
        });
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }
}
