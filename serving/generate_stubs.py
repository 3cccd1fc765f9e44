"""Regenerates the committed Python gRPC stubs in serving/protos/ from the .proto files there.

The stubs are committed so that serving needs only grpcio and protobuf at run time (grpcio-tools
is a test/build dependency); `--check` (run by tests/test_server_stubs.py) regenerates into a
temporary directory and fails when the committed stubs differ from what the protos produce.

    python -m serving.generate_stubs            # rewrite the stubs
    python -m serving.generate_stubs --check    # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path(__file__).resolve().parent / "protos"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def stub_names() -> list[str]:
    return [proto.stem + suffix for proto in proto_files() for suffix in STUB_SUFFIXES]


def generate(output_root: Path) -> None:
    """Writes the stubs under `output_root`/serving/protos (imports are rooted at the repo)."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={output_root}", f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}"]
    args += [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in proto_files()]}")


def stale_stubs() -> list[str]:
    """Names of committed stubs that are missing or differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PROTO_DIR.relative_to(REPO_ROOT)
        return [name for name in stub_names()
                if not (PROTO_DIR / name).is_file()
                or not filecmp.cmp(fresh / name, PROTO_DIR / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale gRPC stubs {stale}: run `python -m serving.generate_stubs`", file=sys.stderr)
            return 1
        return 0
    generate(REPO_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
