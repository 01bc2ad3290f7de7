"""A Python client of hitcounter, from stubs generated out of proto/ (see generate.py).

Records hits three ways (RecordHit, an idempotent RecordHits batch, a StreamHits stream), then
reads them back through Query (GetHits, GetHitsMany, GetSeries, TopKeys) and checks the counts.

    python3 -m pip install grpcio grpcio-tools
    python3 examples/python/hitcounter_example.py --ingest localhost:50051 --query localhost:50053

Services started with --tokens-file need a token (from `hitctl token new`) with the write and read
roles (or admin): pass --token, or set HITCOUNTER_TOKEN. It is sent as `authorization: Bearer …`
metadata on every call.

Services started with --tls-cert speak TLS: give the addresses as https://HOST:PORT (or plain
HOST:PORT) with --ca-cert, the CA file that signs their certificates (default:
$HITCOUNTER_CA_CERT):

    python3 examples/python/hitcounter_example.py --ingest https://localhost:50051 \
        --query https://localhost:50053 --ca-cert ca.pem --token "$HITCOUNTER_TOKEN"

Prints one JSON summary line; exits 1 if a count read back is not what was recorded.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid

HERE = pathlib.Path(__file__).resolve().parent


def load_stubs():
    """Imports the generated stubs, generating them first if needed."""
    generated = HERE / "generated"
    if not (generated / "hitcounter" / "v1" / "hitcounter_pb2_grpc.py").exists():
        sys.path.insert(0, str(HERE))
        from generate import generate

        # Generate beside it and rename into place, so that runs started together (tests in
        # parallel) see all of the stubs or none, never a half-written file.
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".generated-", dir=HERE))
        generate(staging)
        try:
            staging.rename(generated)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another run got there first
    sys.path.insert(0, str(generated))
    from hitcounter.v1 import hitcounter_pb2, hitcounter_pb2_grpc

    return hitcounter_pb2, hitcounter_pb2_grpc


def channel(grpc, address, token, ca_cert=None):
    """A channel (TLS when `ca_cert` is given or the address is https://, else plain text) that
    sends `authorization: Bearer <token>` on every call, if given."""
    tls = address.startswith("https://")
    for scheme in ("https://", "http://"):
        if address.startswith(scheme):
            address = address[len(scheme):].rstrip("/")
    if tls and not ca_cert:
        raise SystemExit(f"{address} is https://: give --ca-cert (the CA that signs its certificate)")
    if ca_cert:
        with open(ca_cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        plain = grpc.secure_channel(address, credentials)
    else:
        plain = grpc.insecure_channel(address)
    if not token:
        return plain

    class Bearer(
        grpc.UnaryUnaryClientInterceptor,
        grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor,
        grpc.StreamStreamClientInterceptor,
    ):
        def _with_token(self, details):
            metadata = list(details.metadata or []) + [("authorization", f"Bearer {token}")]
            return details._replace(metadata=metadata)

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._with_token(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._with_token(details), request)

        def intercept_stream_unary(self, continuation, details, requests):
            return continuation(self._with_token(details), requests)

        def intercept_stream_stream(self, continuation, details, requests):
            return continuation(self._with_token(details), requests)

    return grpc.intercept_channel(plain, Bearer())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", default="localhost:50051")
    parser.add_argument("--query", default="localhost:50053")
    parser.add_argument("--prefix", default=f"/py/{uuid.uuid4().hex[:8]}")
    parser.add_argument(
        "--token",
        default=os.environ.get("HITCOUNTER_TOKEN"),
        help="bearer token for services with --tokens-file (default: $HITCOUNTER_TOKEN)",
    )
    parser.add_argument(
        "--ca-cert",
        default=os.environ.get("HITCOUNTER_CA_CERT"),
        help="CA certificate (PEM) of services with --tls-cert (default: $HITCOUNTER_CA_CERT)",
    )
    args = parser.parse_args()

    import grpc

    pb, rpc = load_stubs()
    ingest = rpc.IngestStub(channel(grpc, args.ingest, args.token, args.ca_cert))
    query = rpc.QueryStub(channel(grpc, args.query, args.token, args.ca_cert))
    home, cart = f"{args.prefix}/home", f"{args.prefix}/cart"

    # One hit; count 0 counts as 1, timestamp 0 means "now".
    accepted = ingest.RecordHit(pb.RecordHitRequest(key=home), timeout=5).accepted
    # A batch with an idempotency key: the retry is not counted twice.
    batch = pb.RecordHitsRequest(
        hits=[pb.Hit(key=home, count=2), pb.Hit(key=cart, count=5)],
        batch_id=f"{args.prefix}-batch-1",
    )
    first = ingest.RecordHits(batch, timeout=5)
    retry = ingest.RecordHits(batch, timeout=5)
    assert (first.accepted, first.duplicate) == (7, False), first
    assert (retry.accepted, retry.duplicate) == (7, True), retry
    accepted += first.accepted
    # The streaming path: one response per request, in order.
    requests = (pb.RecordHitsRequest(hits=[pb.Hit(key=cart, count=1)] * 10) for _ in range(5))
    streamed = [r.accepted for r in ingest.StreamHits(requests, timeout=10)]
    assert streamed == [10] * 5, streamed
    accepted += sum(streamed)

    # A rejected request gets INVALID_ARGUMENT with a message that names the problem.
    try:
        ingest.RecordHit(pb.RecordHitRequest(key=""), timeout=5)
        raise AssertionError("an empty key was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        rejected = error.details()

    # Acknowledged hits are visible within a second.
    expected = {home: 3, cart: 55}
    deadline = time.monotonic() + 2
    while True:
        many = query.GetHitsMany(pb.GetHitsManyRequest(keys=[home, cart], window_seconds=60), timeout=5)
        counts = {r.key: r.count for r in many.results}
        if counts == expected or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    single = query.GetHits(pb.GetHitsRequest(key=cart), timeout=5)
    now_ms = int(time.time() * 1000)
    series = query.GetSeries(
        pb.GetSeriesRequest(key=cart, from_ms=now_ms - 60_000, to_ms=now_ms + 1000, step_seconds=10),
        timeout=5,
    )
    top = query.TopKeys(pb.TopKeysRequest(window_seconds=60, limit=2, prefix=args.prefix), timeout=5)

    summary = {
        "accepted": accepted,
        "counts": counts,
        "get_hits": {"key": single.key, "count": single.count, "window_seconds": single.window_seconds},
        "series_total": sum(p.count for p in series.points),
        "series_points": len(series.points),
        "top": [[k.key, k.count] for k in top.keys],
        "rejected": rejected,
    }
    print(json.dumps(summary))
    ok = (
        counts == expected
        and accepted == sum(expected.values())
        and single.count == 55
        and single.window_seconds == 300
        and summary["series_total"] == 55
        and summary["top"] == [[cart, 55], [home, 3]]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
