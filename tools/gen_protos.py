"""Generates the Python protobuf and gRPC modules from protos/ into clients/python/kms/.

Run as `python tools/gen_protos.py [OUT_DIR]`. The generated tree is committed;
tests/test_generated_code.py regenerates it into a temporary directory and fails
when the committed copy is stale.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "python"


def generate(out_dir: Path) -> None:
    """Writes kms/**/*_pb2*.py(i) and package __init__.py files under out_dir."""
    package_root = out_dir / "kms"
    if package_root.exists():
        shutil.rmtree(package_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in [package_root, *package_root.rglob("*")]:
        if directory.is_dir():
            (directory / "__init__.py").touch()
    (package_root / "py.typed").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
