"""Regenerate (or check) the committed protobuf modules from opamp/proto/*.proto.

    python -m opamp.codegen          # rewrite opamp/proto/*_pb2.py(i)
    python -m opamp.codegen --check  # exit 1 when the committed modules are stale

The generated modules are committed so that running the server needs no protoc; this
module is the one place that knows how they are produced. It needs grpcio-tools
(requirements-dev.txt), which bundles a protoc matching the pinned protobuf runtime.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTO_FILES = ("opamp/proto/anyvalue.proto", "opamp/proto/opamp.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def generate(output_root: Path) -> list[Path]:
    """Run protoc into `output_root` (mirroring the repository layout); return the files made."""
    from grpc_tools import protoc  # imported lazily: a dev-only dependency

    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(
        path for path in (output_root / "opamp" / "proto").iterdir() if path.name.endswith(GENERATED_SUFFIXES)
    )


def stale_modules() -> list[str]:
    """Names of generated modules whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PROTO_DIR / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    options = parser.parse_args(argv)
    if options.check:
        stale = stale_modules()
        if stale:
            print("stale generated protobuf modules: " + ", ".join(stale), file=sys.stderr)
            print("run: python -m opamp.codegen", file=sys.stderr)
            return 1
        print("generated protobuf modules are up to date")
        return 0
    generate(REPO_ROOT)
    print("regenerated " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in PROTO_DIR.glob("*_pb2.py*")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
