"""The background model updater: failures keep the current model, the newest request wins."""
from __future__ import annotations

import sys
import threading

import numpy as np
from ros_harness import wait_until
from speculative_av.core.detections import Detections
from speculative_av.fleet.model_manifest import ManifestError, ModelManifest
from speculative_av.fleet.model_updater import ModelUpdater


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    warning = error = info


class Model:
    """A detector that records its warm-up inference."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.warmed = 0

    def detect(self, rgb: np.ndarray) -> Detections:
        self.warmed += 1
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64))

    def detect_batch(self, images):
        return [self.detect(i) for i in images]


def manifest(path: str) -> ModelManifest:
    if path.startswith('bad'):
        raise ManifestError(f'{path}: the signature does not verify')
    return ModelManifest(path, '1', 'ssd', 'w.pt', '0' * 64, 1, '')


def test_an_update_is_verified_loaded_warmed_up_then_installed_and_failures_keep_the_model():
    installed: list[tuple[Model, str]] = []
    gate, loading = threading.Event(), threading.Event()
    paced_in: dict[str, bool] = {}

    def load(m: ModelManifest) -> Model:
        paced_in['load'] = sys.getprofile() is not None
        loading.set()
        gate.wait(10)
        if m.name == 'unloadable':
            raise RuntimeError('not a checkpoint')
        return Model(m.name)

    def install(detector: Model, m: ModelManifest) -> None:
        paced_in['install'] = sys.getprofile() is not None
        installed.append((detector, m.label))

    updater = ModelUpdater(manifest, load, install, Log())
    try:
        updater.request('first')  # taken at once; blocks in load until the gate opens
        assert loading.wait(10)
        updater.request('bad-signature')
        updater.request('second')  # replaces bad-signature, which never runs
        gate.set()
        wait_until(updater.idle, 10, 'the updates')
        updater.request('bad-signature')
        wait_until(updater.idle, 10, 'the refusal')
        updater.request('unloadable')
        wait_until(updater.idle, 10, 'the refusal')
    finally:
        updater.close()
    assert [(d.name, d.warmed, label) for d, label in installed] == [
        ('first', 1, 'first:1'), ('second', 1, 'second:1')]
    assert updater.counters == {'requested': 5, 'superseded': 1, 'installed': 2, 'failed': 2}
    assert 'not a checkpoint' in updater.last_error
    # Preparing yields the GIL to the frames' worker; installing (under the engine's lock) not.
    assert paced_in == {'load': True, 'install': False}
