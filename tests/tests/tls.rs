//! TLS everywhere, over real connections: the public services with server TLS and a bearer
//! token, the internal links (ingest→aggregator, query→aggregator) with mutual TLS, driven by
//! the real `grpcurl -cacert`, the Python example, `hitctl` and the Rust client; every refusal
//! (plain text to a TLS port, an expired certificate, a certificate from another CA, no client
//! certificate where one is required); a SIGHUP certificate reload under an open `StreamHits`
//! stream; and start-up failures for unusable TLS files.
//!
//! Certificates are made here with `rcgen`: a CA, a server certificate for `127.0.0.1` and
//! `localhost`, and a client certificate for the internal links.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use hitcounter_auth::token;
use hitcounter_integration_tests::{
    eventually, init_logging, metric_value, now_ms, process, scrape, start_aggregator,
    start_ingest_at, start_query_at, tools, Running,
};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest, Hit, RecordHitsRequest,
};
use hitcounter_transport::tls::ClientTls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const TOKEN: &str = "tok-tls-all-5e1d";
const VISIBLE: Duration = Duration::from_secs(30);

/// A certificate authority made for the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A certificate for `127.0.0.1` and `localhost` usable by servers and clients, expired
    /// when asked: `(cert PEM, key PEM)`.
    fn issue(&self, name: &str, expired: bool) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The PEM files of a test, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let pki = Self {
            dir: tempfile::tempdir()?,
            ca: Ca::new("hitcounter test CA")?,
        };
        pki.write("ca.pem", &pki.ca.pem)?;
        let (cert, key) = pki.ca.issue("server", false)?;
        pki.write("server.pem", &cert)?;
        pki.write("server.key", &key)?;
        // Ingest's own, so that a test can renew it alone.
        let (cert, key) = pki.ca.issue("ingest", false)?;
        pki.write("ingest.pem", &cert)?;
        pki.write("ingest.key", &key)?;
        let (cert, key) = pki.ca.issue("internal client", false)?;
        pki.write("client.pem", &cert)?;
        pki.write("client.key", &key)?;
        let tokens = format!(
            "[[token]]\nname = \"all\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n",
            token::to_hex(&token::hash(TOKEN))
        );
        pki.write("tokens.toml", &tokens)?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn write(&self, name: &str, content: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(name);
        // Write beside and rename, as a certificate manager would: a reload never reads half.
        let staging = self.path(&format!(".{name}.new"));
        std::fs::write(&staging, content)?;
        std::fs::rename(&staging, &path)?;
        Ok(path)
    }

    /// The server flags: TLS with the certificate `{name}.pem`.
    fn server_args(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.arg(&format!("{name}.pem")),
            "--tls-key".into(),
            self.arg(&format!("{name}.key")),
        ]
    }

    /// The flags of ingest or query (certificate `{name}.pem`): server TLS and a token on the
    /// public side, mutual TLS to the aggregator.
    fn public_args(&self, name: &str) -> Vec<String> {
        let mut args = self.server_args(name);
        args.extend([
            "--tokens-file".into(),
            self.arg("tokens.toml"),
            "--aggregator-ca-cert".into(),
            self.arg("ca.pem"),
            "--aggregator-tls-cert".into(),
            self.arg("client.pem"),
            "--aggregator-tls-key".into(),
            self.arg("client.key"),
        ]);
        args
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` (cert, key) when given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Channel> {
    let tls = ClientTls {
        ca_cert: Some(ca.to_owned()),
        cert: identity.map(|(cert, _)| cert.to_owned()),
        key: identity.map(|(_, key)| key.to_owned()),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(Duration::from_secs(5));
    Ok(hitcounter_transport::connect(&tls.apply(endpoint)?).await?)
}

/// The overall health of the server behind `channel`.
async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    Ok(HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status)
}

/// Waits until the TLS server at `running.addr` answers SERVING (or fails naming why `serve`
/// returned).
async fn ready(
    running: &mut Running,
    what: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(60),
        &format!("{what} to be SERVING"),
        || async {
            if running.task.is_finished() {
                return Some(Err(anyhow::anyhow!("{what} stopped while starting")));
            }
            let channel = tls_channel(running.addr, ca, identity).await.ok()?;
            (health(channel).await.ok()? == ServingStatus::Serving as i32).then_some(Ok(()))
        },
    )
    .await?
}

/// An aggregator requiring client certificates, and ingest and query serving TLS with a
/// tokens file, reaching it with mutual TLS.
struct TlsStack {
    pki: Pki,
    aggregator: Running,
    ingest: Running,
    query: Running,
}

impl TlsStack {
    async fn start() -> anyhow::Result<Self> {
        init_logging();
        let pki = Pki::new()?;
        let mut aggregator_args = pki.server_args("server");
        aggregator_args.extend(["--tls-client-ca".into(), pki.arg("ca.pem")]);
        let mut aggregator = start_aggregator(&strs(&aggregator_args)).await?;
        let upstream = format!("https://127.0.0.1:{}", aggregator.addr.port());
        let mut ingest = start_ingest_at(&upstream, &strs(&pki.public_args("ingest"))).await?;
        let mut query = start_query_at(&upstream, &strs(&pki.public_args("server"))).await?;
        let (ca, client) = (
            pki.path("ca.pem"),
            (pki.path("client.pem"), pki.path("client.key")),
        );
        let identity = Some((client.0.as_path(), client.1.as_path()));
        ready(&mut aggregator, "aggregator", &ca, identity).await?;
        ready(&mut ingest, "ingest", &ca, None).await?;
        ready(&mut query, "query", &ca, None).await?;
        Ok(Self {
            pki,
            aggregator,
            ingest,
            query,
        })
    }

    async fn stop(self) -> Result<(), String> {
        let ingest = self.ingest.stop().await;
        let query = self.query.stop().await;
        let aggregator = self.aggregator.stop().await;
        ingest.and(query).and(aggregator)
    }
}

fn run(program: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(program).args(args).output()?)
}

fn succeeded(what: &str, output: std::process::Output) -> anyhow::Result<String> {
    anyhow::ensure!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_writes_and_reads_over_tls_with_a_token_through_mutual_tls_links(
) -> anyhow::Result<()> {
    let Some(grpcurl) = tools::grpcurl()? else {
        return Ok(());
    };
    let stack = TlsStack::start().await?;
    let ca = stack.pki.arg("ca.pem");
    let (ingest, query) = (stack.ingest.addr.to_string(), stack.query.addr.to_string());
    let bearer = format!("authorization: Bearer {TOKEN}");
    let (recorded, listed, healthy) = tokio::task::spawn_blocking({
        let (grpcurl, ca, bearer, ingest) = (grpcurl.clone(), ca.clone(), bearer.clone(), ingest);
        move || -> anyhow::Result<_> {
            let recorded = run(
                &grpcurl,
                &[
                    "-cacert",
                    &ca,
                    "-H",
                    &bearer,
                    "-d",
                    r#"{"key": "/tls/grpcurl", "count": 3}"#,
                    &ingest,
                    "hitcounter.v1.Ingest/RecordHit",
                ],
            )?;
            let listed = run(&grpcurl, &["-cacert", &ca, &ingest, "list"])?;
            let healthy = run(
                &grpcurl,
                &["-cacert", &ca, &ingest, "grpc.health.v1.Health/Check"],
            )?;
            Ok((
                succeeded("grpcurl RecordHit", recorded)?,
                succeeded("grpcurl list", listed)?,
                succeeded("grpcurl health", healthy)?,
            ))
        }
    })
    .await??;
    let recorded: serde_json::Value = serde_json::from_str(&recorded)?;
    assert_eq!(recorded["accepted"], "3", "{recorded}");
    // Reflection and health over TLS.
    assert!(listed.contains("hitcounter.v1.Ingest"), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
    assert!(healthy.contains("SERVING"), "{healthy}");

    // The write went ingest → aggregator and the read goes query → aggregator, both over
    // mutual TLS.
    let count = eventually(VISIBLE, "the hit to be visible over grpcurl", || {
        let (grpcurl, ca, bearer, query) =
            (grpcurl.clone(), ca.clone(), bearer.clone(), query.clone());
        async move {
            let output = tokio::task::spawn_blocking(move || {
                run(
                    &grpcurl,
                    &[
                        "-cacert",
                        &ca,
                        "-H",
                        &bearer,
                        "-d",
                        r#"{"key": "/tls/grpcurl", "window_seconds": 3600}"#,
                        &query,
                        "hitcounter.v1.Query/GetHits",
                    ],
                )
            })
            .await
            .ok()?
            .ok()?;
            let text = succeeded("grpcurl GetHits", output).ok()?;
            let answer: serde_json::Value = serde_json::from_str(&text).ok()?;
            (answer["count"] == "3").then_some(answer)
        }
    })
    .await?;
    assert_eq!(count["count"], "3");

    // Without the token, over TLS: refused by authentication, not by TLS.
    let output = tokio::task::spawn_blocking({
        let (grpcurl, ca) = (grpcurl.clone(), ca.clone());
        let ingest = stack.ingest.addr.to_string();
        move || {
            run(
                &grpcurl,
                &[
                    "-cacert",
                    &ca,
                    "-d",
                    r#"{"key": "/tls/grpcurl"}"#,
                    &ingest,
                    "hitcounter.v1.Ingest/RecordHit",
                ],
            )
        }
    })
    .await??;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_runs_over_tls_with_a_token() -> anyhow::Result<()> {
    if !tools::python_with_grpc()? {
        return Ok(());
    }
    let stack = TlsStack::start().await?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/hitcounter_example.py"
    );
    let ingest = format!("https://{}", stack.ingest.addr);
    let query = format!("https://{}", stack.query.addr);
    let ca = stack.pki.arg("ca.pem");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--ingest", &ingest, "--query", &query, "--ca-cert", &ca])
            .env("HITCOUNTER_TOKEN", TOKEN)
            .output()
    })
    .await??;
    let stdout = succeeded("the Python example", output)?;
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(summary["accepted"], 58, "{summary}");
    assert_eq!(summary["get_hits"]["count"], 55, "{summary}");
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn hitctl_works_over_tls_and_explains_a_plain_text_address() -> anyhow::Result<()> {
    let hitctl = process::binary("hitctl")?;
    let stack = TlsStack::start().await?;
    let ca = stack.pki.arg("ca.pem");
    let ingest = format!("https://{}", stack.ingest.addr);
    let query = format!("https://{}", stack.query.addr);
    let plain_query = stack.query.addr.to_string();
    let (hit, plain, no_ca) = tokio::task::spawn_blocking({
        let (hitctl, ca, ingest, query) = (hitctl.clone(), ca.clone(), ingest, query.clone());
        move || -> anyhow::Result<_> {
            let hitctl = |args: &[&str]| {
                Command::new(&hitctl)
                    .args(args)
                    .env("HITCOUNTER_TOKEN", TOKEN)
                    .output()
            };
            Ok((
                hitctl(&[
                    "--ingest",
                    &ingest,
                    "--ca-cert",
                    &ca,
                    "hit",
                    "/tls/hitctl",
                    "-n",
                    "4",
                ])?,
                hitctl(&["--query", &plain_query, "get", "/tls/hitctl"])?,
                hitctl(&["--query", &query, "get", "/tls/hitctl"])?,
            ))
        }
    })
    .await??;
    succeeded("hitctl hit over TLS", hit)?;
    // A plain-text address to a TLS port: an actionable message, not an HTTP/2 error.
    assert!(!plain.status.success());
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(
        stderr.contains("the server speaks TLS: use https:// and --ca-cert"),
        "{stderr}"
    );
    // https:// without a CA: says which flag is missing.
    assert!(!no_ca.status.success());
    let stderr = String::from_utf8_lossy(&no_ca.stderr);
    assert!(stderr.contains("--ca-cert"), "{stderr}");

    let shown = eventually(VISIBLE, "hitctl get over TLS to show 4", || {
        let (hitctl, ca, query) = (hitctl.clone(), ca.clone(), query.clone());
        async move {
            let output = tokio::task::spawn_blocking(move || {
                Command::new(&hitctl)
                    .args(["--query", &query, "--ca-cert", &ca, "--json", "get"])
                    .arg("/tls/hitctl")
                    .env("HITCOUNTER_TOKEN", TOKEN)
                    .output()
            })
            .await
            .ok()?
            .ok()?;
            let text = succeeded("hitctl get", output).ok()?;
            let answer: serde_json::Value = serde_json::from_str(&text).ok()?;
            (answer["count"] == 4).then_some(answer)
        }
    })
    .await?;
    assert_eq!(shown["count"], 4);
    // The refused plain-text connection was counted on the query side.
    let metrics = scrape(stack.query.metrics_addr).await?;
    let refused = metric_value(
        &metrics,
        "hitcounter_tls_handshake_failures_total",
        &["reason=\"not_tls\""],
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_wrong_ca_plain_and_missing_client_certificates_are_refused() -> anyhow::Result<()>
{
    let stack = TlsStack::start().await?;
    let pki = &stack.pki;
    let ca = pki.path("ca.pem");
    let client = (pki.path("client.pem"), pki.path("client.key"));
    let identity = Some((client.0.as_path(), client.1.as_path()));

    // The aggregator requires a client certificate: a TLS client without one is refused at the
    // handshake, and a plain-text client never gets an HTTP/2 answer; with one, it answers.
    let without_cert = match tls_channel(stack.aggregator.addr, &ca, None).await {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        without_cert.is_some(),
        "a client without a certificate was served"
    );
    let plain = hitcounter_integration_tests::connect(stack.aggregator.addr).await;
    let plain = match plain {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(plain.is_some(), "a plain-text client was served");
    let with_cert = tls_channel(stack.aggregator.addr, &ca, identity).await?;
    assert_eq!(health(with_cert).await?, ServingStatus::Serving as i32);

    // A client that trusts another CA refuses the server's certificate.
    let other = Ca::new("another CA")?;
    pki.write("other-ca.pem", &other.pem)?;
    let wrong_ca = match tls_channel(stack.query.addr, &pki.path("other-ca.pem"), None).await {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        wrong_ca.is_some(),
        "a server certificate of another CA was trusted"
    );
    // ... and the aggregator refuses a client certificate from another CA.
    let (cert, key) = other.issue("stranger", false)?;
    pki.write("stranger.pem", &cert)?;
    pki.write("stranger.key", &key)?;
    let stranger = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let refused = match tls_channel(
        stack.aggregator.addr,
        &ca,
        Some((stranger.0.as_path(), stranger.1.as_path())),
    )
    .await
    {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        refused.is_some(),
        "a client certificate of another CA was accepted"
    );

    // A server with an expired certificate is refused by a client that trusts its CA.
    let (cert, key) = pki.ca.issue("expired", true)?;
    pki.write("expired.pem", &cert)?;
    pki.write("expired.key", &key)?;
    let expired_server = start_aggregator(&[
        "--tls-cert",
        &pki.arg("expired.pem"),
        "--tls-key",
        &pki.arg("expired.key"),
    ])
    .await?;
    let expired = eventually(
        Duration::from_secs(30),
        "the expired-cert refusal",
        || async {
            match tls_channel(expired_server.addr, &ca, None).await {
                Ok(channel) => health(channel).await.err().map(|s| s.to_string()),
                Err(error) => Some(format!("{error:?}")),
            }
        },
    )
    .await?;
    assert!(
        expired.to_lowercase().contains("expired"),
        "refused for another reason: {expired}"
    );
    expired_server.stop().await.map_err(anyhow::Error::msg)?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_certificate_without_dropping_an_open_stream() -> anyhow::Result<()> {
    let stack = TlsStack::start().await?;
    let pki = &stack.pki;
    let channel = tls_channel(stack.ingest.addr, &pki.path("ca.pem"), None).await?;
    let bearer = hitcounter_client::Bearer::new(Some(TOKEN))?;
    let mut ingest = IngestClient::with_interceptor(channel, bearer.clone());
    let (requests, requests_rx) = tokio::sync::mpsc::channel(4);
    let mut responses = ingest
        .stream_hits(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
        .await?
        .into_inner();
    let batch = |count| RecordHitsRequest {
        hits: vec![Hit {
            key: "/tls/reload".into(),
            timestamp_ms: now_ms(),
            count,
        }],
        batch_id: String::new(),
    };
    requests.send(batch(1)).await?;
    let first = responses
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("no answer"))?;
    assert_eq!(first.accepted, 1);

    // A new certificate for ingest, from a new CA (so that a client can tell which one it
    // got), written over its files, then SIGHUP.
    let renewed = Ca::new("renewed CA")?;
    let (cert, key) = renewed.issue("renewed ingest", false)?;
    pki.write("renewed-ca.pem", &renewed.pem)?;
    pki.write("ingest.pem", &cert)?;
    pki.write("ingest.key", &key)?;
    let status = Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -HUP failed");

    // New connections get the new certificate (trusted through the renewed CA only)...
    let renewed_ca = pki.path("renewed-ca.pem");
    eventually(
        Duration::from_secs(30),
        "the renewed certificate",
        || async {
            let channel = tls_channel(stack.ingest.addr, &renewed_ca, None)
                .await
                .ok()?;
            health(channel).await.ok()
        },
    )
    .await?;
    let old_ca = tls_channel(stack.ingest.addr, &pki.path("ca.pem"), None).await;
    let old_ca = match old_ca {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(old_ca.is_some(), "the old certificate is still served");

    // ... and the stream opened before the reload goes on.
    requests.send(batch(2)).await?;
    let second = responses
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the stream ended at the reload"))?;
    assert_eq!(second.accepted, 2);
    drop(requests);
    assert!(responses.message().await?.is_none());

    let metrics = scrape(stack.ingest.metrics_addr).await?;
    let reloads = metric_value(
        &metrics,
        "hitcounter_tls_reloads_total",
        &["outcome=\"ok\""],
    );
    assert!(reloads.is_some_and(|n| n >= 1.0), "{reloads:?}");
    // The stream's 3 hits are counted (query re-read its unchanged files on the same SIGHUP).
    let query_channel = tls_channel(stack.query.addr, &pki.path("ca.pem"), None).await?;
    let query = QueryClient::with_interceptor(query_channel, bearer);
    eventually(VISIBLE, "the stream's hits to be visible", || {
        let mut query = query.clone();
        async move {
            let count = query
                .get_hits(GetHitsRequest {
                    key: "/tls/reload".into(),
                    window_seconds: 3600,
                    at_ms: 0,
                })
                .await
                .ok()?
                .into_inner()
                .count;
            (count == 3).then_some(())
        }
    })
    .await?;
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_tls_files_fail_at_start_up_naming_the_file() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let missing = pki.arg("missing.pem");
    let error = start_aggregator(&["--tls-cert", &missing, "--tls-key", &pki.arg("server.key")])
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("started with a missing certificate"))?;
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot read the certificate file") && message.contains(&missing),
        "{message}"
    );

    // A key that is not the certificate's.
    let error = start_aggregator(&[
        "--tls-cert",
        &pki.arg("server.pem"),
        "--tls-key",
        &pki.arg("client.key"),
    ])
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("started with a key that does not fit"))?;
    let message = format!("{error:#}");
    assert!(
        message.contains("does not fit the certificate"),
        "{message}"
    );

    // A certificate file that is not PEM.
    let error = start_aggregator(&[
        "--tls-cert",
        &pki.arg("tokens.toml"),
        "--tls-key",
        &pki.arg("server.key"),
    ])
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("started with a certificate that is not PEM"))?;
    assert!(format!("{error:#}").contains("holds no PEM"), "{error:#}");

    // An https:// aggregator without its CA, on ingest.
    let running = start_ingest_at("https://127.0.0.1:1", &[]).await?;
    let served = running.task.await?;
    let message = served.err().unwrap_or_default();
    assert!(message.contains("--aggregator-ca-cert"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_over_max_connections_is_closed_logged_and_counted() -> anyhow::Result<()> {
    init_logging();
    let mut aggregator = start_aggregator(&["--max-connections", "1"]).await?;
    aggregator.ready("aggregator").await?;
    // `ready` connected and went away: wait until its place is given back.
    let first = eventually(Duration::from_secs(30), "a first connection", || async {
        let channel = hitcounter_integration_tests::connect(aggregator.addr)
            .await
            .ok()?;
        health(channel.clone()).await.ok().map(|_| channel)
    })
    .await?;
    // A call held open on it keeps it busy: an idle connection would be closed to make room
    // for the next one (tests/idle.rs).
    let mut busy = HealthClient::new(first.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert!(busy.message().await?.is_some());
    // The second one is closed at once: no answer on it.
    let second = match hitcounter_integration_tests::connect(aggregator.addr).await {
        Ok(channel) => health(channel).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(second.is_some(), "a connection over the limit was served");
    // The first is still served.
    assert_eq!(health(first.clone()).await?, ServingStatus::Serving as i32);
    let metrics = scrape(aggregator.metrics_addr).await?;
    let refused = metric_value(
        &metrics,
        "hitcounter_grpc_connections_refused_total",
        &["service=\"hitcounter.aggregator.v1.Aggregator\""],
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    let open = metric_value(&metrics, "hitcounter_grpc_connections_open", &[]);
    assert_eq!(open, Some(1.0), "{metrics}");
    // Closing the first gives its place to the next.
    drop((busy, first));
    eventually(
        Duration::from_secs(30),
        "a connection after the first closed",
        || async {
            let channel = hitcounter_integration_tests::connect(aggregator.addr)
                .await
                .ok()?;
            health(channel).await.ok()
        },
    )
    .await?;
    aggregator.stop().await.map_err(anyhow::Error::msg)
}
