"""
Generate the Python gRPC code of the ``protos/*.proto`` files into this package.

Run ``python -m speculative_av.cloud.generate_protos`` after editing a proto; the generated
files are committed, and a test checks they match a fresh generation byte for byte.
``detection.proto`` is the native protocol; ``open_inference.proto`` the subset of the Open
Inference Protocol (KServe v2) the vehicle speaks to Triton and other v2 servers;
``collector.proto`` the fleet's snippet upload (vehicle to collector).
"""
from __future__ import annotations

import argparse
from pathlib import Path
import subprocess
import sys

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parents[1] / 'protos'
PROTOS = ('detection.proto', 'open_inference.proto', 'collector.proto')
_MYPY_SKIP = '# mypy: ignore-errors\n'


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate the modules of every proto into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in PROTOS:
        stem = Path(proto).stem
        subprocess.run([sys.executable, '-m', 'grpc_tools.protoc', f'-I{proto_dir}',
                        f'--python_out={out_dir}', f'--pyi_out={out_dir}',
                        f'--grpc_python_out={out_dir}', str(proto_dir / proto)], check=True)
        grpc_module = out_dir / f'{stem}_pb2_grpc.py'
        text = grpc_module.read_text()
        absolute = f'import {stem}_pb2 as {stem.replace("_", "__")}__pb2'
        if absolute not in text:
            raise RuntimeError(f'{grpc_module} lacks the expected line {absolute!r}')
        grpc_module.write_text(text.replace(absolute, f'from . {absolute}', 1))
        # The grpc module is unannotated and the stub imports untyped protobuf: mypy skips both.
        for path in (grpc_module, out_dir / f'{stem}_pb2.pyi'):
            path.write_text(_MYPY_SKIP + path.read_text())
        written += [out_dir / f'{stem}{suffix}' for suffix in ('_pb2.py', '_pb2.pyi',
                                                               '_pb2_grpc.py')]
    return written


def main(argv: list[str] | None = None) -> int:
    """Regenerate the package's protobuf modules (or write them to ``--out-dir``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out-dir', type=Path, default=PACKAGE_DIR,
                        help='where to write the modules (default: this package)')
    args = parser.parse_args(argv)
    for path in generate(args.out_dir):
        print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
