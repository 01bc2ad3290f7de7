//! Each port reflects the services it serves and nothing else: the internal aggregator API is
//! never listed or described on a public port, and a call to a service that another port serves
//! answers `UNIMPLEMENTED` with a message naming that port (instead of tonic's empty message).
//! Checked over real gRPC with the standard reflection client.

use std::{collections::BTreeSet, net::SocketAddr};

use hitcounter_integration_tests::{connect, Stack};
use hitcounter_proto::v1::{
    ingest_client::IngestClient, query_client::QueryClient, GetHitsRequest,
};
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

/// Asks the reflection service at `addr` one question and returns its answer.
async fn ask(addr: SocketAddr, request: MessageRequest) -> anyhow::Result<MessageResponse> {
    let mut client = ServerReflectionClient::new(connect(addr).await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("reflection stream ended without an answer"))??;
    response
        .message_response
        .ok_or_else(|| anyhow::anyhow!("reflection answer without a message"))
}

/// The services the reflection service at `addr` lists.
async fn listed(addr: SocketAddr) -> anyhow::Result<BTreeSet<String>> {
    match ask(addr, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(list) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected answer to list: {other:?}"),
    }
}

/// Whether the reflection service at `addr` describes `symbol` (`NOT_FOUND` means no).
async fn describes(addr: SocketAddr, symbol: &str) -> anyhow::Result<bool> {
    match ask(
        addr,
        MessageRequest::FileContainingSymbol(symbol.to_owned()),
    )
    .await
    {
        Ok(MessageResponse::FileDescriptorResponse(files)) => {
            Ok(!files.file_descriptor_proto.is_empty())
        }
        Err(error)
            if error
                .downcast_ref::<tonic::Status>()
                .is_some_and(|status| status.code() == tonic::Code::NotFound) =>
        {
            Ok(false)
        }
        other => anyhow::bail!("unexpected answer to file_containing_symbol: {other:?}"),
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

const STANDARD: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

#[tokio::test(flavor = "multi_thread")]
async fn each_port_lists_only_its_own_services() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    for (addr, own) in [
        (stack.ingest.addr, "hitcounter.v1.Ingest"),
        (stack.query.addr, "hitcounter.v1.Query"),
        (
            stack.aggregators[0].addr,
            "hitcounter.aggregator.v1.Aggregator",
        ),
    ] {
        let mut expected = set(&STANDARD);
        expected.insert(own.to_owned());
        assert_eq!(listed(addr).await?, expected, "port of {own}");
        assert!(
            describes(addr, own).await?,
            "{own} is described on its port"
        );
    }
    // The internal API is not described on a public port either, and the public services are
    // not described on each other's ports.
    for (addr, foreign) in [
        (stack.ingest.addr, "hitcounter.aggregator.v1.Aggregator"),
        (stack.query.addr, "hitcounter.aggregator.v1.Aggregator"),
        (stack.ingest.addr, "hitcounter.aggregator.v1.ApplyRequest"),
        (stack.aggregators[0].addr, "hitcounter.v1.Query"),
    ] {
        assert!(
            !describes(addr, foreign).await?,
            "{foreign} described on {addr}"
        );
    }
    // The query port still describes its own messages (grpcurl needs them to encode JSON).
    assert!(describes(stack.query.addr, "hitcounter.v1.GetHitsResponse").await?);
    stack.stop().await.map_err(anyhow::Error::msg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_on_the_wrong_port_names_the_port_that_serves_it() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut query_on_ingest = QueryClient::new(connect(stack.ingest.addr).await?);
    let status = query_on_ingest
        .get_hits(GetHitsRequest {
            key: "/home".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("Query answered on the ingest port"))?;
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(
        status.message(),
        "hitcounter.v1.Query is served by query (default port 50053), not on this port; \
         this is ingest (hitcounter.v1.Ingest)"
    );

    let mut ingest_on_query = IngestClient::new(connect(stack.query.addr).await?);
    let status = ingest_on_query
        .record_hit(hitcounter_proto::v1::RecordHitRequest {
            key: "/home".into(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("Ingest answered on the query port"))?;
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(
        status
            .message()
            .contains("served by ingest (default port 50051)"),
        "{}",
        status.message()
    );
    stack.stop().await.map_err(anyhow::Error::msg)
}
