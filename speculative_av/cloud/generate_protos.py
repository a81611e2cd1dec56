"""
Generate the Python gRPC code of ``protos/detection.proto`` into this package.

Run ``python -m speculative_av.cloud.generate_protos`` after editing the proto; the generated
files are committed, and a test checks they match a fresh generation byte for byte.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import subprocess
import sys

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parents[1] / 'protos'
PROTO = 'detection.proto'
GENERATED = ('detection_pb2.py', 'detection_pb2.pyi', 'detection_pb2_grpc.py')
_ABSOLUTE_IMPORT = 'import detection_pb2 as detection__pb2'
_RELATIVE_IMPORT = 'from . import detection_pb2 as detection__pb2'
_MYPY_SKIP = '# mypy: ignore-errors\n'


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate the modules into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, '-m', 'grpc_tools.protoc', f'-I{proto_dir}',
                    f'--python_out={out_dir}', f'--pyi_out={out_dir}',
                    f'--grpc_python_out={out_dir}', str(proto_dir / PROTO)], check=True)
    grpc_module = out_dir / 'detection_pb2_grpc.py'
    text = grpc_module.read_text()
    if _ABSOLUTE_IMPORT not in text:
        raise RuntimeError(f'{grpc_module} lacks the expected line {_ABSOLUTE_IMPORT!r}')
    grpc_module.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT, 1))
    # The grpc module is unannotated and the stub imports untyped protobuf: mypy skips both.
    for name in ('detection_pb2_grpc.py', 'detection_pb2.pyi'):
        path = out_dir / name
        path.write_text(_MYPY_SKIP + path.read_text())
    return [out_dir / name for name in GENERATED]


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
