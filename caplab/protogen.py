"""Regenerate (or check) the committed Python code for proto/**/*.proto.

python -m caplab.protogen           # rewrite caplab/**/*_pb2*.py(i), harness/**/*_pb2*.py(i)
python -m caplab.protogen --check   # exit 1 if the committed code is stale

The output path follows the proto path: proto/caplab/v1/kv.proto -> caplab/v1/kv_pb2.py,
proto/harness/etcd/rpc.proto -> harness/etcd/rpc_pb2.py.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# the packages that hold generated code: proto/<package>/** -> <package>/**
GENERATED_PACKAGES = ("caplab", "harness")


def _protos() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _generate(out: Path) -> list[Path]:
    bindir = Path(sys.executable).parent
    protos = _protos()
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_DIR)) for p in protos],
    ]
    # mypy-protobuf prints "Writing mypy to ..." per file on stderr: shown only on failure.
    proc = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"protoc failed (exit {proc.returncode})")
    files = sorted(
        p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)
    )
    return files


def _committed() -> list[Path]:
    files = []
    for package in GENERATED_PACKAGES:
        for p in (ROOT / package).rglob("*"):
            if p.name.endswith(GENERATED_SUFFIXES):
                files.append(p.relative_to(ROOT))
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = _generate(out)
        if args.check:
            stale = [str(f) for f in generated if not (ROOT / f).exists()]
            stale += [
                str(f)
                for f in generated
                if (ROOT / f).exists() and not filecmp.cmp(out / f, ROOT / f, shallow=False)
            ]
            stale += [str(f) for f in _committed() if f not in generated]
            if stale:
                print(
                    "generated protobuf code is stale; run `make proto` and commit:",
                    file=sys.stderr,
                )
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print(f"generated protobuf code is fresh ({len(generated)} files)")
            return 0
        for old in _committed():
            if old not in generated:
                (ROOT / old).unlink()
        for rel in generated:
            dest = ROOT / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, dest)
            for pkg in [dest.parent, *dest.parent.parents]:
                if pkg == ROOT:
                    break
                init = pkg / "__init__.py"
                if not init.exists():
                    init.write_text("")
        print(f"wrote {len(generated)} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
