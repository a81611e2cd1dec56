"""Build the detector of a verified release, checking it is the release that was verified."""
from __future__ import annotations

from typing import Sequence

from speculative_av.detectors.torchvision_detector import TORCH_BACKEND, TorchvisionDetector
from speculative_av.fleet.model_manifest import ManifestError, ModelManifest


def load_released(manifest: ModelManifest, *, device: str = 'cpu', score_threshold: float = 0.3,
                  threads: int | None = None, backend: str = TORCH_BACKEND,
                  categories: Sequence[str] | None = None) -> TorchvisionDetector:
    """
    Load the checkpoint ``manifest`` names and verified; refuse one that does not fit.

    The loader hashes the bytes it read: a file replaced between verification and loading is
    refused. With ``categories`` (those of the model in use) the new model must keep the same
    label map, since label_info, the cloud endpoints' label mapping and every consumer of the
    class ids rely on it. Raises ManifestError (a ValueError) or what loading raises.
    """
    detector = TorchvisionDetector(manifest.architecture, str(manifest.weights), device,
                                   score_threshold, threads, backend=backend)
    if detector.model_version != manifest.sha256[:len(detector.model_version)]:
        raise ManifestError(f'{manifest.weights} changed after it was verified (sha256 '
                            f'{detector.model_version}... loaded)')
    kwargs = detector.metadata.get('model_kwargs', {})
    if manifest.model_kwargs and manifest.model_kwargs != kwargs:
        raise ManifestError(f'{manifest.label}: the checkpoint was built with {kwargs}, the '
                            f'manifest says {manifest.model_kwargs}')
    if categories is not None and list(detector.categories) != list(categories):
        raise ManifestError(f'{manifest.label} has another label map ({len(detector.categories)} '
                            f'categories) than the model in use ({len(categories)})')
    return detector
