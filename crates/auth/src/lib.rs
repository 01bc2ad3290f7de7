//! Authentication, authorisation and quotas of hitcounter's public services (ingest, query).
//!
//! ```text
//!  call ──▶ AuthenticateLayer (tower): `authorization: Bearer <token>` → SHA-256 → tokens file
//!             │ no/unknown token: UNAUTHENTICATED      │ ok: Principal in the extensions
//!             ▼                                         ▼
//!           (answered)                 handler decodes, then one domain check of the principal:
//!                                      role → key prefixes → token quota → global limit
//!                                      PERMISSION_DENIED / RESOURCE_EXHAUSTED + retry-after-ms
//! ```
//!
//! - [`file`]: the TOML tokens file and its checks.
//! - [`token`]: making tokens, their hashes, tokens-file entries (`hitctl token new`).
//! - [`Authority`]: the tokens in force (reloaded on change), the global limit, authentication.
//! - [`AuthenticateLayer`]: the tower layer in front of a public service.
//! - [`Principal`]: the caller, with the domain checks the handlers run.
//! - [`quota`] and [`QuotaClock`]: GCRA token buckets (`governor`) on a clock tests control.
//!
//! Quotas are per service instance: with several ingest or query replicas, each enforces the
//! whole quota on its own.

mod authority;
pub mod clock;
pub mod file;
mod layer;
pub mod metrics;
mod principal;
pub mod quota;
pub mod token;

pub use authority::{AuthArgs, Authority, Reloaded, Unauthenticated};
pub use clock::QuotaClock;
pub use layer::{Authenticate, AuthenticateLayer};
pub use principal::{retry_after_ms, Principal, Refusal, RefusalKind, Role, WatchSlot, ANONYMOUS};
pub use quota::Rate;

/// The metadata key of a RESOURCE_EXHAUSTED answer saying in how many milliseconds the request
/// would fit.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<Refusal> for tonic::Status {
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        match refusal.kind {
            RefusalKind::MissingRole(_)
            | RefusalKind::KeyOutOfScope { .. }
            | RefusalKind::PrefixOutOfScope { .. } => tonic::Status::permission_denied(message),
            RefusalKind::OverQuota { retry_after, .. } => {
                let mut status = tonic::Status::resource_exhausted(message);
                status.metadata_mut().insert(
                    RETRY_AFTER_MS,
                    tonic::metadata::MetadataValue::from(retry_after_ms(retry_after)),
                );
                status
            }
            RefusalKind::LargerThanBurst { .. } | RefusalKind::TooManyWatches { .. } => {
                tonic::Status::resource_exhausted(message)
            }
        }
    }
}

/// The principal the [`AuthenticateLayer`] put into `request`.
///
/// # Errors
/// INTERNAL when there is none: the service was assembled without the layer, and failing closed
/// is the only safe answer.
pub fn principal_of<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            tonic::Status::internal("the request reached its handler without authentication")
        })
}
