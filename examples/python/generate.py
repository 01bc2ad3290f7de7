"""Generates the Python gRPC stubs of hitcounter's public API from proto/ with grpcio-tools.

    python3 -m pip install grpcio grpcio-tools
    python3 examples/python/generate.py          # writes examples/python/generated/

The stubs land in `generated/hitcounter/v1/` (hitcounter_pb2.py, hitcounter_pb2_grpc.py);
put `generated/` on sys.path and `from hitcounter.v1 import hitcounter_pb2`.
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "hitcounter/v1/hitcounter.proto"


def generate(out_dir: pathlib.Path = HERE / "generated") -> pathlib.Path:
    """Runs protoc (bundled in grpcio-tools) on the public proto; returns the output directory."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    # grpcio-tools ships the well-known protos; include them like protoc would.
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            PROTO,
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    return out_dir


if __name__ == "__main__":
    print(generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "generated"))
