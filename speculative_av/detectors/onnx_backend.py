"""
Run a torchvision detection model through ONNX Runtime, exported once and cached on disk.

The whole model (resize/normalise transform, network, box decoding, NMS, rescale to the input
image) is exported with the TorchScript exporter (``dynamo=False``; the dynamo exporter fails
on these models). The trace fixes the input size, so one file and session exist per image
size. A file's name is a hash of everything that shapes the graph: the weights' bytes, the
model name, the input size, the candidate score threshold, the opset and the torch version; a
file therefore never has to be invalidated, and random weights (fixed seed) share a file
across processes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import hashlib
import logging
import os
from pathlib import Path
import tempfile
import time
from typing import Any, Iterator
import warnings

import numpy as np
import numpy.typing as npt
import torch

_LOG = logging.getLogger(__name__)

OPSET = 17
CPU_PROVIDER = 'CPUExecutionProvider'
CUDA_PROVIDER = 'CUDAExecutionProvider'
TENSORRT_PROVIDER = 'TensorrtExecutionProvider'
_GPU_PROVIDERS = (TENSORRT_PROVIDER, CUDA_PROVIDER)
# Attributes holding the score below which a model drops candidates before NMS.
_CANDIDATE_THRESHOLDS = ('score_thresh', 'roi_heads.score_thresh')

Outputs = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int64]]


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/speculative_av/onnx`` (``~/.cache/...`` by default)."""
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'speculative_av' / 'onnx'


@dataclass(frozen=True)
class OnnxSettings:
    """
    Where exported models live and how ONNX Runtime runs them.

    ``providers`` None picks, for a CUDA device, TensorRT then CUDA (those this onnxruntime
    build has) before the CPU, and for the CPU device the CPU provider alone. TensorRT builds
    FP16 engines (``fp16``) and keeps them in ``tensorrt_cache_dir`` (default: a ``tensorrt``
    folder in ``cache_dir``) so later starts skip the engine build.
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    providers: tuple[str, ...] | None = None
    tensorrt_cache_dir: Path | None = None
    fp16: bool = True


def import_onnxruntime() -> Any:
    """Import onnxruntime, or raise RuntimeError saying how to get it."""
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError(
            "backend 'onnxruntime' needs the onnxruntime package (pinned in "
            "tools/requirements.lock; on a Jetson, JetPack's onnxruntime-gpu wheel); it is not "
            f'importable: {exc}') from exc
    return onnxruntime


def weights_digest(net: torch.nn.Module) -> str:
    """Return a sha256 of the module's state (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{value.dtype}:{tuple(value.shape)};'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OnnxRuntimeModel:
    """A torchvision detection model answered by ONNX Runtime, one session per image size."""

    def __init__(self, net: torch.nn.Module, model_name: str, device: torch.device,
                 score_threshold: float, threads: int | None, settings: OnnxSettings) -> None:
        """Prepare to export ``net`` (in eval mode) lazily, per image size, into the cache."""
        self._ort = import_onnxruntime()
        self._net = net
        self._model_name = model_name
        self._settings = settings
        self._threads = threads
        self._providers = _provider_list(self._ort, device, settings)
        self._candidate_threshold = _raised_candidate_threshold(net, score_threshold)
        self._weights = weights_digest(net)
        self._sessions: dict[tuple[int, int], Any] = {}
        _LOG.info('onnxruntime %s providers %s, cache %s', self._ort.__version__,
                  [name for name, _ in self._providers], settings.cache_dir)

    @property
    def providers(self) -> list[str]:
        """Return the execution providers sessions are created with, in priority order."""
        return [name for name, _ in self._providers]

    def model_path(self, height: int, width: int) -> Path:
        """Return the cache file of the model exported for ``height`` x ``width`` images."""
        key = hashlib.sha256('|'.join(str(part) for part in (
            self._weights, self._model_name, height, width, self._candidate_threshold, OPSET,
            torch.__version__)).encode()).hexdigest()[:20]
        return self._settings.cache_dir / f'{self._model_name}-{height}x{width}-{key}.onnx'

    def run(self, rgb: npt.NDArray[np.uint8]) -> Outputs:
        """Return boxes, scores and labels for one (H, W, 3) uint8 RGB image."""
        height, width = rgb.shape[:2]
        session = self._sessions.get((height, width))
        if session is None:
            session = self._sessions[(height, width)] = self._open(height, width)
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        chw *= np.float32(1.0 / 255.0)
        boxes, scores, labels = session.run(None, {'image': chw})
        return (boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False),
                labels.astype(np.int64, copy=False))

    def _open(self, height: int, width: int) -> Any:
        """Load the cached model for this size, exporting it first when absent or unreadable."""
        path = self.model_path(height, width)
        if path.is_file():
            try:
                return self._session(path)
            except Exception as exc:  # onnxruntime raises its own types for a corrupt file
                _LOG.warning('cached model %s is unreadable (%s); exporting it again', path, exc)
        self._export(path, height, width)
        return self._session(path)

    def _session(self, path: Path) -> Any:
        """Create an inference session for ``path``."""
        options = self._ort.SessionOptions()
        if self._threads:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        return self._ort.InferenceSession(str(path), options, providers=self._providers)

    def _export(self, path: Path, height: int, width: int) -> None:
        """Export for one image size into a temporary file, then rename it into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        handle, temporary = tempfile.mkstemp(prefix=path.stem, suffix='.tmp', dir=path.parent)
        os.close(handle)
        try:
            with torch.no_grad(), self._candidates_above(), _quiet_export_warnings():
                example = torch.zeros(3, height, width, device=next(self._net.parameters()).device)
                torch.onnx.export(_OneImage(self._net), (example,), temporary,
                                  dynamo=False, opset_version=OPSET, input_names=['image'],
                                  output_names=['boxes', 'scores', 'labels'])
            os.replace(temporary, path)  # atomic: readers see no file or the whole file
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        _LOG.info('exported %s for %dx%d images in %.1f s: %s', self._model_name, width, height,
                  time.monotonic() - started, path)

    @contextlib.contextmanager
    def _candidates_above(self) -> Iterator[None]:
        """Trace with the raised candidate threshold, restoring the torch model afterwards."""
        saved = {name: _get(self._net, name) for name in _CANDIDATE_THRESHOLDS
                 if _get(self._net, name) is not None}
        for name in saved:
            _set(self._net, name, self._candidate_threshold)
        try:
            yield
        finally:
            for name, value in saved.items():
                _set(self._net, name, value)


class _OneImage(torch.nn.Module):
    """
    A detection model on one image tensor, returning (boxes, scores, labels) in that order.

    Models return their outputs in a dict whose order differs (SSD: boxes, scores, labels;
    Faster R-CNN: boxes, labels, scores); the export's outputs are positional.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        """Wrap ``net``."""
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detect in one (3, H, W) float image in [0, 1]."""
        found = self.net([image])[0]
        return found['boxes'], found['scores'], found['labels']


def _raised_candidate_threshold(net: torch.nn.Module, score_threshold: float) -> float | None:
    """
    Return the detector's threshold where it is above the model's own candidate threshold.

    Dropping candidates below the final threshold before NMS changes nothing above it (a box is
    only suppressed by a higher-scoring one, and the top-k cuts keep the highest scores), and it
    saves ONNX Runtime's NonMaxSuppression, which is quadratic in the candidates, most of its
    work. None for a model without such a threshold.
    """
    own = [value for name in _CANDIDATE_THRESHOLDS
           if (value := _get(net, name)) is not None]
    return max([float(score_threshold), *own]) if own else None


def _provider_list(ort: Any, device: torch.device,
                   settings: OnnxSettings) -> list[tuple[str, dict[str, Any]]]:
    """Return (provider, options) pairs for ``device``, checked against this onnxruntime build."""
    available = ort.get_available_providers()
    if settings.providers is not None:
        wanted = list(settings.providers)
        missing = [name for name in wanted if name not in available]
        if missing or not wanted:
            raise ValueError(f'execution providers {missing or wanted} are not available in '
                             f'this onnxruntime build; available: {", ".join(available)}')
    elif device.type == 'cuda':
        wanted = [name for name in _GPU_PROVIDERS if name in available]
        if not wanted:
            raise RuntimeError(f'device {device} requested but this onnxruntime build has no GPU '
                               f'provider (available: {", ".join(available)}); install '
                               'onnxruntime-gpu')
        wanted.append(CPU_PROVIDER)
    else:
        wanted = [CPU_PROVIDER]
    index = device.index or 0
    trt_cache = settings.tensorrt_cache_dir or settings.cache_dir / 'tensorrt'
    options: dict[str, dict[str, Any]] = {
        CUDA_PROVIDER: {'device_id': index},
        TENSORRT_PROVIDER: {'device_id': index, 'trt_fp16_enable': settings.fp16,
                            'trt_engine_cache_enable': True,
                            'trt_engine_cache_path': str(trt_cache)},
    }
    return [(name, options.get(name, {})) for name in wanted]


def _get(net: torch.nn.Module, dotted: str) -> float | None:
    """Return the float attribute at ``dotted`` under ``net``, or None where there is none."""
    owner: Any = net
    for part in dotted.split('.'):
        owner = getattr(owner, part, None)
    return float(owner) if isinstance(owner, (int, float)) else None


def _set(net: torch.nn.Module, dotted: str, value: float | None) -> None:
    """Set the attribute at ``dotted`` under ``net``."""
    *parents, name = dotted.split('.')
    owner: Any = net
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, value)


@contextlib.contextmanager
def _quiet_export_warnings() -> Iterator[None]:
    """Silence the tracer's warnings about sizes it records as constants (the size is keyed)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield
