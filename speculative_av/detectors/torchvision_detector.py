"""
Run a torchvision detection architecture on RGB arrays.

Weights come from torchvision's pretrained default (downloaded once into the torch hub cache), a
local checkpoint file, or a fixed-seed random initialisation for tests. The model runs in eager
PyTorch (backend 'torch') or, exported to ONNX and cached, in ONNX Runtime (backend
'onnxruntime', :mod:`speculative_av.detectors.onnx_backend`).
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.detectors.onnx_backend import OnnxRuntimeModel, OnnxSettings, Outputs
import torch
import torchvision

_LOG = logging.getLogger(__name__)

DEFAULT_WEIGHTS = 'DEFAULT'
RANDOM_WEIGHTS = 'random'
RANDOM_SEED = 0
COCO_NUM_CLASSES = 91
_INT8_SCALE = '.int8_scale'  # state_dict key suffix of an int8-stored tensor's per-row scales
_INT8_MIN_SIZE = 4096  # smaller tensors stay float: they hardly add to the file size
TORCH_BACKEND = 'torch'
ONNXRUNTIME_BACKEND = 'onnxruntime'
BACKENDS = (TORCH_BACKEND, ONNXRUNTIME_BACKEND)


def detection_models() -> list[str]:
    """Return the names of torchvision's detection model builders."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def coco_categories() -> list[str]:
    """Return torchvision's 91 COCO category names (index = label id), downloading nothing."""
    weights = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT
    return list(weights.meta['categories'])


def save_checkpoint(model_module: torch.nn.Module, path: str | Path, *, num_classes: int,
                    categories: list[str], int8: bool = False, **metadata: Any) -> None:
    """
    Save ``model_module``'s weights in the checkpoint format TorchvisionDetector loads.

    ``metadata`` values must be plain data (str, numbers, lists, dicts) so the file loads with
    ``torch.load(weights_only=True)``; a ``model_kwargs`` dict is passed to the model builder
    on load. ``int8`` stores large weight tensors as int8 with one scale per output channel
    (about a quarter of the size; restored to float on load).
    """
    if len(categories) != num_classes:
        raise ValueError(f'{len(categories)} categories for {num_classes} classes')
    state = model_module.state_dict()
    torch.save({'model': _to_int8(state) if int8 else state, 'num_classes': num_classes,
                'categories': list(categories), **metadata}, str(path))


class _Loaded(NamedTuple):
    """A built model and what identifies its weights."""

    net: torch.nn.Module
    categories: list[str]
    version: str
    metadata: dict[str, Any]


class TorchvisionDetector:
    """A torchvision detector that maps an RGB image to :class:`Detections`."""

    def __init__(self, model: str, weights: str = DEFAULT_WEIGHTS, device: str = 'cpu',
                 score_threshold: float = 0.3, threads: int | None = None,
                 backend: str = TORCH_BACKEND, onnx: OnnxSettings | None = None) -> None:
        """
        Build ``model`` with ``weights`` on ``device``, run by ``backend``.

        ``weights`` is 'DEFAULT' (torchvision's pretrained weights), 'random' (tests only) or
        the path of a checkpoint file. ``backend`` is 'torch' (eager) or 'onnxruntime' (the
        model exported on first use of an image size, cached as ``onnx`` says). Raises
        ValueError for an unknown model, weights, device or backend name and RuntimeError when
        the pretrained weights cannot be downloaded, CUDA is unavailable or onnxruntime is
        missing.
        """
        if backend not in BACKENDS:
            raise ValueError(f'unknown backend {backend!r}; valid: {", ".join(BACKENDS)}')
        valid = detection_models()
        if model not in valid:
            raise ValueError(f'unknown torchvision detection model {model!r}; valid names: '
                             f'{", ".join(valid)}')
        self._device = _resolve_device(device)
        if threads is not None:
            torch.set_num_threads(threads)
        if weights == DEFAULT_WEIGHTS:
            loaded = _load_default(model)
        elif weights == RANDOM_WEIGHTS:
            _LOG.warning('%s uses random weights: its detections are meaningless (tests only)',
                         model)
            loaded = _Loaded(_build_random(model), coco_categories(), 'random', {})
        elif Path(weights).is_file():
            loaded = _load_checkpoint(model, Path(weights))
        else:
            raise ValueError(f"weights must be '{DEFAULT_WEIGHTS}', '{RANDOM_WEIGHTS}' or the "
                             f'path of an existing checkpoint file, got {weights!r}')
        self._model = loaded.net.eval().to(self._device)
        self._model_name = model
        self._categories = loaded.categories
        self._model_version = loaded.version
        self._metadata = loaded.metadata
        self._score_threshold = float(score_threshold)
        self._backend = backend
        self._onnx = None if backend == TORCH_BACKEND else OnnxRuntimeModel(
            self._model, model, self._device, self._score_threshold, threads,
            onnx or OnnxSettings())

    @property
    def backend(self) -> str:
        """Return what runs the model: 'torch' or 'onnxruntime'."""
        return self._backend

    @property
    def onnx_model(self) -> OnnxRuntimeModel | None:
        """Return the ONNX Runtime model of the 'onnxruntime' backend (None for 'torch')."""
        return self._onnx

    @property
    def categories(self) -> list[str]:
        """Return the class names, indexed by label id."""
        return list(self._categories)

    @property
    def model_name(self) -> str:
        """Return the torchvision builder name."""
        return self._model_name

    @property
    def model_version(self) -> str:
        """Return a checkpoint's sha256 prefix, 'torchvision-default' or 'random'."""
        return self._model_version

    @property
    def metadata(self) -> dict[str, Any]:
        """Return the checkpoint's extra entries (empty for DEFAULT and random weights)."""
        return dict(self._metadata)

    @property
    def device(self) -> str:
        """Return the torch device the model runs on."""
        return str(self._device)

    @property
    def score_threshold(self) -> float:
        """Return the score below which detections are dropped."""
        return self._score_threshold

    @property
    def module(self) -> torch.nn.Module:
        """Return the underlying torch module, in eval mode."""
        return self._model

    def detect(self, rgb: npt.NDArray[np.uint8]) -> Detections:
        """Detect objects in an (H, W, 3) uint8 RGB image; boxes are in its pixel coordinates."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[Detections]:
        """
        Detect objects in several (H, W, 3) uint8 RGB images with one forward pass.

        The images may differ in size (the model's transform resizes and pads them into one
        batch); each result's boxes are in its own image's pixel coordinates.
        """
        for rgb in images:
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f'expected (H, W, 3) uint8 RGB images, got {rgb.dtype} '
                                 f'{rgb.shape}')
        if not images:
            return []
        if self._onnx is not None:
            found = [self._onnx.run(rgb) for rgb in images]
        else:
            found = self._run_torch(images)
        results = []
        for rgb, (boxes, scores, labels) in zip(images, found):
            height, width = rgb.shape[:2]
            np.clip(boxes[:, 0::2], 0.0, width, out=boxes[:, 0::2])
            np.clip(boxes[:, 1::2], 0.0, height, out=boxes[:, 1::2])
            results.append(Detections(boxes, scores, labels).above(self._score_threshold))
        return results

    def _run_torch(self, images: Sequence[npt.NDArray[np.uint8]]) -> list[Outputs]:
        """Return boxes, scores and labels per image from one eager forward pass."""
        with torch.inference_mode():
            tensors = [torch.from_numpy(np.require(rgb, requirements=['C', 'W']))
                       .to(self._device).permute(2, 0, 1).float().div_(255.0)
                       for rgb in images]
            outputs = self._model(tensors)
            found = [(output['boxes'].float().cpu().numpy(),
                      output['scores'].float().cpu().numpy(), output['labels'].cpu().numpy())
                     for output in outputs]
        return found


def _load_default(model: str) -> _Loaded:
    """Build ``model`` with torchvision's pretrained default weights."""
    weights = torchvision.models.get_model_weights(model).DEFAULT
    try:
        net = torchvision.models.get_model(model, weights=weights)
    except OSError as exc:
        raise RuntimeError(
            f'could not download the pretrained {model} weights ({weights}) from '
            f'{weights.url}: {exc}. Without internet access pass a local checkpoint path as '
            f'weights instead') from exc
    return _Loaded(net, list(weights.meta['categories']), 'torchvision-default', {})


def _load_checkpoint(model: str, path: Path) -> _Loaded:
    """Build ``model`` from a checkpoint file: a state_dict or a dict with a 'model' entry."""
    data = path.read_bytes()
    # The bytes hashed below are the bytes loaded: a file replaced meanwhile cannot slip in.
    checkpoint = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a dict')
    metadata: dict[str, Any] = {}
    if isinstance(checkpoint.get('model'), dict):
        state = _from_int8(checkpoint.pop('model'))
        categories = checkpoint.pop('categories', None)
        num_classes = int(checkpoint.pop(
            'num_classes', len(categories) if categories else COCO_NUM_CLASSES))
        metadata = checkpoint
    else:
        state, categories, num_classes = checkpoint, None, COCO_NUM_CLASSES
    if categories is None:
        categories = [f'class_{i}' for i in range(num_classes)]
    if len(categories) != num_classes:
        raise ValueError(f'checkpoint {path} lists {len(categories)} categories for '
                         f'{num_classes} classes')
    net = build_model(model, num_classes, **metadata.get('model_kwargs', {}))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f'checkpoint {path} does not fit {model} with {num_classes} classes: '
                         f'{exc}') from exc
    return _Loaded(net, [str(c) for c in categories], hashlib.sha256(data).hexdigest()[:12],
                   metadata)


def _build_random(model: str) -> torch.nn.Module:
    """
    Build ``model`` with fixed-seed random weights whose outputs depend on the input.

    Some torchvision initialisations (SSDlite's small normal init) shrink activations to ~1e-20
    through the untrained network, so every image would get the same boxes and scores.
    Batch-norm statistics measured on fixed-seed noise keep activations near unit scale.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        net = build_model(model, COCO_NUM_CLASSES).eval()
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: the statistics of the noise batch
            norm.train()
        with torch.no_grad():
            net([torch.rand(3, 320, 320) for _ in range(2)])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        norm.eval()
    return net


def build_model(model: str, num_classes: int, **model_kwargs: Any) -> torch.nn.Module:
    """Build ``model`` with untrained weights, downloading nothing; kwargs go to the builder."""
    net: torch.nn.Module = torchvision.models.get_model(
        model, weights=None, weights_backbone=None, num_classes=num_classes, **model_kwargs)
    return net


def _to_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store large float tensors as int8 plus a float scale per output channel (row)."""
    packed = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() >= _INT8_MIN_SIZE:
            rows = tensor.detach().float().reshape(len(tensor), -1)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            packed[name] = torch.round(rows / scale[:, None]).to(torch.int8).reshape(tensor.shape)
            packed[name + _INT8_SCALE] = scale
        else:
            packed[name] = tensor
    return packed


def _from_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`_to_int8`; a plain state_dict passes through unchanged."""
    restored = {}
    for name, tensor in state.items():
        if name.endswith(_INT8_SCALE):
            continue
        scale = state.get(name + _INT8_SCALE)
        restored[name] = tensor if scale is None else (
            tensor.float() * scale.reshape(-1, *[1] * (tensor.dim() - 1)))
    return restored


def _resolve_device(device: str) -> torch.device:
    """Parse ``device`` and check that it exists on this machine."""
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError(f'device {device!r} requested but CUDA is not available here')
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f'device {device!r} requested but only '
                               f'{torch.cuda.device_count()} CUDA devices exist')
    elif resolved.type != 'cpu':
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return resolved
