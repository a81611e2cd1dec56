"""
Serve the torchvision detector from NVIDIA Triton over the Open Inference Protocol (KServe v2).

    triton_server --model ssdlite320_mobilenet_v3_large --weights models/road.pt --grpc-port 8001

Triton comes from ``nvidia-pytriton`` (its ``tritonserver`` binary and Python backend), which
needs its own environment (``make triton-env``). This launcher writes a model repository (one
Python-backend model, :mod:`speculative_av.cloud.triton_model`, with Triton's dynamic batcher and
a queue policy that rejects requests whose ``timeout`` passes while queued), runs
``tritonserver`` on it as a child process, prints one line once the model is ready::

    triton_server ready grpc=HOST:PORT http=HOST:PORT metrics=HOST:PORT model=NAME

and on SIGTERM or SIGINT stops it (exit 0), removing its workspace and shared memory. Run from
an environment without pytriton (the main one), it re-executes itself with the Triton
environment's Python.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import importlib.util
import logging
import os
from pathlib import Path
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, NamedTuple, Sequence
import urllib.error
import urllib.request

_LOG = logging.getLogger('triton_server')

DEFAULT_MODEL_NAME = 'speculative_detector'
TRITON_VENV_VARIABLE = 'SPECULATIVE_AV_TRITON_VENV'
PORT_ATTEMPTS = 5  # a free port picked here may be taken before tritonserver binds it
STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]

_CONFIG_TEMPLATE = """name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "BOXES" data_type: TYPE_FP32 dims: [ -1, 4 ] }},
  {{ name: "SCORES" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "LABELS" data_type: TYPE_STRING dims: [ -1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT default_timeout_microseconds: {queue_timeout_us}
    allow_timeout_override: true max_queue_size: {max_queue_size}
  }}
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters [
  {{ key: "model" value: {{ string_value: "{model}" }} }},
  {{ key: "weights" value: {{ string_value: "{weights}" }} }},
  {{ key: "device" value: {{ string_value: "{device}" }} }},
  {{ key: "score_threshold" value: {{ string_value: "{score_threshold}" }} }},
  {{ key: "threads" value: {{ string_value: "{threads}" }} }}
]
"""
_MODEL_PY = 'from speculative_av.cloud.triton_model import TritonPythonModel  # noqa: F401\n'


def triton_venv() -> Path:
    """Return the Triton environment's directory (``make triton-env`` builds it)."""
    default = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return Path(os.environ.get(TRITON_VENV_VARIABLE)
                or default / 'speculative_av' / 'triton-venv')


def triton_python() -> Path:
    """Return the Triton environment's Python, which runs this module with pytriton."""
    return triton_venv() / 'bin' / 'python'


class Ports(NamedTuple):
    """The three ports tritonserver listens on."""

    grpc: int
    http: int
    metrics: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; every flag is documented in the README."""
    parser = argparse.ArgumentParser(prog='triton_server', description=__doc__.split('\n')[1])
    parser.add_argument('--model', default='ssdlite320_mobilenet_v3_large',
                        help='torchvision detection builder name')
    parser.add_argument('--weights', default='DEFAULT',
                        help="'DEFAULT', 'random' (tests only) or a checkpoint path")
    parser.add_argument('--device', default='cpu', help="torch device: 'cpu', 'cuda', 'cuda:N'")
    parser.add_argument('--score-threshold', type=float, default=0.3)
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads of the model (0: torch default)')
    parser.add_argument('--model-name', default=DEFAULT_MODEL_NAME,
                        help='the name clients address in the v2 protocol')
    parser.add_argument('--host', default='0.0.0.0', help='address all three endpoints bind to')
    parser.add_argument('--grpc-port', type=_port, default=8001, help='0: a free port')
    parser.add_argument('--http-port', type=_port, default=8000, help='0: a free port')
    parser.add_argument('--metrics-port', type=_port, default=8002, help='0: a free port')
    parser.add_argument('--max-batch-size', type=_positive, default=8)
    parser.add_argument('--max-queue-delay-ms', type=float, default=2.0,
                        help='how long the dynamic batcher waits to fill a batch')
    parser.add_argument('--queue-timeout-ms', type=float, default=10000.0,
                        help='a request still queued after this is rejected; the "timeout" '
                        'parameter (microseconds) of a request can only shorten it')
    parser.add_argument('--max-queue-size', type=int, default=0,
                        help='requests waiting in the batcher; beyond, rejected at once '
                        '(0: unbounded, as Triton defaults)')
    parser.add_argument('--startup-timeout', type=float, default=180.0,
                        help='seconds to wait for the model to be ready')
    args = parser.parse_args(argv)
    if args.max_queue_delay_ms < 0:
        parser.error('--max-queue-delay-ms must be >= 0')
    if args.max_queue_size < 0:
        parser.error('--max-queue-size must be >= 0')
    if args.queue_timeout_ms <= 0:
        parser.error('--queue-timeout-ms must be > 0 (Triton ignores request timeouts without it)')
    if args.weights not in ('DEFAULT', 'random'):
        args.weights = str(Path(args.weights).resolve())
    for text in (args.model, args.weights, args.device, args.model_name):
        if '"' in text or '\\' in text or '\n' in text:
            parser.error(f'{text!r} may not contain quotes, backslashes or newlines')
    return args


def _port(text: str) -> int:
    """Parse a TCP port number, 0 meaning a free one."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f'port must be 0..65535, got {port}')
    return port


def _positive(text: str) -> int:
    """Parse an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def write_model_repository(root: Path, args: argparse.Namespace) -> Path:
    """Write the model repository tritonserver loads: config.pbtxt and a one-line model.py."""
    model_dir = root / 'models' / args.model_name
    (model_dir / '1').mkdir(parents=True)
    (model_dir / 'config.pbtxt').write_text(_CONFIG_TEMPLATE.format(
        name=args.model_name, max_batch_size=args.max_batch_size,
        queue_delay_us=round(args.max_queue_delay_ms * 1000),
        queue_timeout_us=round(args.queue_timeout_ms * 1000),
        max_queue_size=args.max_queue_size, model=args.model,
        weights=args.weights, device=args.device, score_threshold=args.score_threshold,
        threads=args.threads))
    (model_dir / '1' / 'model.py').write_text(_MODEL_PY)
    return root / 'models'


def write_backend_directory(root: Path, pytriton_dir: Path) -> Path:
    """Link pytriton's Python backend and the stub built for this Python into a backend dir."""
    python_backend = root / 'backends' / 'python'
    python_backend.mkdir(parents=True)
    shipped = pytriton_dir / 'tritonserver'
    for name in ('libtriton_python.so', 'triton_python_backend_utils.py'):
        (python_backend / name).symlink_to(shipped / 'backends' / 'python' / name)
    version = f'{sys.version_info.major}.{sys.version_info.minor}'
    (python_backend / 'triton_python_backend_stub').symlink_to(
        shipped / 'python_backend_stubs' / version / 'triton_python_backend_stub')
    return root / 'backends'


def choose_ports(host: str, wanted: Ports) -> Ports:
    """Replace each 0 in ``wanted`` by a port that is free on ``host`` now."""
    with contextlib.ExitStack() as stack:
        chosen = []
        for port in wanted:
            if port == 0:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((host, 0))  # kept bound until all are picked: three distinct ports
                port = sock.getsockname()[1]
            chosen.append(port)
        return Ports(*chosen)


def _die_with_parent() -> None:
    """Make the child get SIGKILL when this process dies, however it dies."""
    libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonProcess:
    """One tritonserver child on a workspace; :meth:`stop` ends it and removes what it left."""

    def __init__(self, args: argparse.Namespace, ports: Ports, workspace: Path,
                 pytriton_dir: Path) -> None:
        """Start tritonserver; its output goes to this process's stderr."""
        self.ports = ports
        self._shm_prefix = f'speculative_av_triton_{os.getpid()}_{secrets.token_hex(4)}_'
        env = dict(os.environ)
        env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
        libs = pytriton_dir.parent / 'nvidia_pytriton.libs'
        env['LD_LIBRARY_PATH'] = os.pathsep.join(
            p for p in (str(libs), env.get('LD_LIBRARY_PATH', '')) if p)
        # The backend stub embeds libpython and finds this environment through PATH's python.
        env['PATH'] = os.pathsep.join((str(Path(sys.executable).parent), env.get('PATH', '')))
        env['PYTHONPATH'] = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), env.get('PYTHONPATH', '')) if p)
        command = [
            str(pytriton_dir / 'tritonserver' / 'bin' / 'tritonserver'),
            f'--model-repository={write_model_repository(workspace, args)}',
            f'--backend-directory={write_backend_directory(workspace, pytriton_dir)}',
            f'--cache-directory={pytriton_dir / "tritonserver" / "caches"}',
            f'--backend-config=python,shm-region-prefix-name={self._shm_prefix}',
            f'--grpc-address={args.host}', f'--grpc-port={ports.grpc}',
            f'--http-address={args.host}', f'--http-port={ports.http}',
            f'--metrics-address={args.host}', f'--metrics-port={ports.metrics}',
            '--allow-metrics=true', '--allow-gpu-metrics=false', '--exit-timeout-secs=5',
            '--strict-readiness=true', '--log-verbose=0',
        ]
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                         stdout=sys.stderr.fileno(), preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        """Return the tritonserver process id."""
        return self._process.pid

    def poll(self) -> int | None:
        """Return tritonserver's exit status, or None while it runs."""
        return self._process.poll()

    def wait(self) -> int:
        """Block until tritonserver exits; return its status."""
        return self._process.wait()

    def stop(self) -> None:
        """Ask tritonserver to exit (SIGINT), kill it after a grace period, clear its memory."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _LOG.warning('tritonserver did not stop in %.0f s; killing it', STOP_TIMEOUT_S)
                self._process.kill()
                self._process.wait()
        for leftover in Path('/dev/shm').glob(self._shm_prefix + '*'):
            leftover.unlink(missing_ok=True)


def wait_until_ready(process: TritonProcess, host: str, model_name: str,
                     timeout_s: float, stop: threading.Event) -> bool:
    """Poll the v2 health and model-ready endpoints until both answer 200; False if stopped."""
    local = '127.0.0.1' if host in ('0.0.0.0', '') else '::1' if host == '::' else host
    base = f'http://{_join(local, process.ports.http)}/v2'
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if process.poll() is not None:
            raise RuntimeError(f'tritonserver exited with status {process.poll()} before it was '
                               'ready (its log is above)')
        if (_answers_200(f'{base}/health/ready')
                and _answers_200(f'{base}/models/{model_name}/ready')):
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f'tritonserver was not ready after {timeout_s:.0f} s')
        stop.wait(0.2)
    return False


def _answers_200(url: str) -> bool:
    """Return whether ``url`` answers a GET with status 200."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _join(host: str, port: int) -> str:
    """Return host:port, bracketing an IPv6 address."""
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM and SIGINT while inside the block."""
    handler = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler[0])
        signal.signal(signal.SIGINT, handler[1])


def serve(args: argparse.Namespace, pytriton_dir: Path) -> int:
    """Run tritonserver until a signal (0) or its own exit (1); retry ports another took."""
    stop = threading.Event()
    wanted = Ports(args.grpc_port, args.http_port, args.metrics_port)
    with _stop_on_signals(stop), tempfile.TemporaryDirectory(prefix='triton_server_') as tmp:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            workspace = Path(tmp) / str(attempt)
            process = TritonProcess(args, choose_ports(args.host, wanted), workspace, pytriton_dir)
            try:
                if not wait_until_ready(process, args.host, args.model_name,
                                        args.startup_timeout, stop):
                    return 0
            except RuntimeError as exc:
                process.stop()
                if 0 in wanted and attempt < PORT_ATTEMPTS:
                    _LOG.warning('%s; retrying with other free ports', exc)
                    continue
                _LOG.error('%s', exc)
                return 1
            except BaseException:
                process.stop()
                raise
            break
        ports = process.ports
        print(f'triton_server ready grpc={_join(args.host, ports.grpc)} '
              f'http={_join(args.host, ports.http)} metrics={_join(args.host, ports.metrics)} '
              f'model={args.model_name}', flush=True)

        def watch() -> None:
            process.wait()
            stop.set()

        watcher = threading.Thread(target=watch, name='tritonserver-watch', daemon=True)
        watcher.start()
        stop.wait()
        died = process.poll()
        process.stop()
        if died is not None:
            _LOG.error('tritonserver exited with status %d', died)
            return 1
        _LOG.info('stopped')
        return 0


def _reexec_in_triton_venv(argv: Sequence[str]) -> None:
    """Replace this process by the module run with the Triton environment's Python."""
    python = triton_python()
    if not python.exists():
        sys.exit(f'triton_server: pytriton is not importable here and {python} does not exist; '
                 f'build the Triton environment with `make triton-env` (or set '
                 f'{TRITON_VENV_VARIABLE})')
    env = dict(os.environ)
    env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(_PACKAGE_ROOT), env.get('PYTHONPATH', '')) if p)
    os.execve(python, [str(python), '-m', __name__ if __name__ != '__main__'
                       else 'speculative_av.cloud.triton_server', *argv], env)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``triton_server`` executable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[triton_server] %(levelname)s %(message)s')
    spec = importlib.util.find_spec('pytriton')
    if spec is None or spec.origin is None:
        _reexec_in_triton_venv(argv)
        return
    try:
        sys.exit(serve(args, Path(spec.origin).parent))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sys.exit(f'triton_server: {exc}')


if __name__ == '__main__':
    main()
