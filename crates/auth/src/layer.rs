//! The tower layer in front of a public service: it authenticates every call's
//! `authorization: Bearer <token>` metadata and puts the [`Principal`] into the request's
//! extensions, where the handlers find it ([`crate::principal_of`]). A call without a valid
//! token ends here with UNAUTHENTICATED, before it is decoded: refusing it costs one SHA-256.
//! Health checks and reflection pass without a token unless `--auth-health`.

use std::{
    future::{ready, Ready},
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;

use crate::{metrics, Authority};

/// Adds [`Authenticate`] in front of a service.
#[derive(Debug, Clone)]
pub struct AuthenticateLayer {
    authority: Arc<Authority>,
}

impl AuthenticateLayer {
    /// A layer checking calls against `authority`.
    pub fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

impl<S> tower::Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            authority: Arc::clone(&self.authority),
        }
    }
}

/// Authenticates each call before `S` sees it.
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    authority: Arc<Authority>,
}

// === impl Authenticate ===

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if self.authority.is_open_path(request.uri().path()) {
            return Either::Right(self.inner.call(request));
        }
        match self.authority.authenticate(request.headers()) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Either::Right(self.inner.call(request))
            }
            Err(refused) => {
                metrics::rejected_request(
                    self.authority.service(),
                    "unauthenticated",
                    refused.label(),
                );
                let status = tonic::Status::unauthenticated(refused.to_string());
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}
