"""
How much an over-the-air update delays the inference running beside it (``-m benchmark -s``).

One process, 1 torch thread: a worker thread infers back to back with models/local_ssdlite320.pt
(the model in use for each inference is whatever was installed last) while the real
ModelUpdater verifies a signed release of the same checkpoint, loads it, warms it up and
installs it, again and again. Per update, the worst extra delay is the slowest inference that
overlapped it (request to install) minus the median of the inferences that overlapped none.
Printed for updates run flat out and paced (the default), each followed by control windows as
long that hold no update: on a shared machine the worst inference of a long window is also
slowed by whatever else runs, and the control shows how much.
"""
from __future__ import annotations

from dataclasses import dataclass
import gc
import os
from pathlib import Path
import shutil
import statistics
import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.fleet.model_manifest import ModelManifest, release, verify_manifest
from speculative_av.fleet.model_updater import ModelUpdater, UPDATE_PACING
from speculative_av.fleet.released_model import load_released
import torch

pytestmark = pytest.mark.benchmark

CHECKPOINT = Path(__file__).resolve().parents[1] / 'models' / 'local_ssdlite320.pt'
ARCHITECTURE = 'ssdlite320_mobilenet_v3_large'
UPDATES = int(os.environ.get('STALL_UPDATES', '12'))
GAP_S = 0.3  # between updates: inferences outside every update give the baseline


class Log:
    def info(self, message: str) -> None:
        pass

    def error(self, message: str) -> None:
        raise AssertionError(message)

    warning = error


@dataclass
class Worker:
    """Infers back to back on the model installed last, recording (start, end) of each."""

    detector: TorchvisionDetector
    image: np.ndarray

    def __post_init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name='worker')

    def _run(self) -> None:
        while not self.stop.is_set():
            began = time.perf_counter()
            self.detector.detect(self.image)
            self.spans.append((began, time.perf_counter()))


Span = tuple[float, float]


def worst_extra_ms(spans: list[Span], windows: dict[str, list[Span]]
                   ) -> tuple[float, dict[str, list[float]]]:
    """
    Return the median inference outside every window (ms) and each window's worst extra.

    A window's worst extra is its slowest overlapping inference minus that median.
    """
    def overlaps(span: Span, window: Span) -> bool:
        return span[0] < window[1] and span[1] > window[0]

    every = [w for group in windows.values() for w in group]
    base = statistics.median(end - start for start, end in spans
                             if not any(overlaps((start, end), w) for w in every))

    def worst(window: Span) -> float:
        return max(end - start for start, end in spans if overlaps((start, end), window))

    return base * 1e3, {name: [(worst(w) - base) * 1e3 for w in group]
                        for name, group in windows.items()}


def test_the_inference_beside_an_update_is_delayed_less_when_the_update_is_paced(tmp_path):
    torch.set_num_threads(1)
    shutil.copy(CHECKPOINT, tmp_path / 'local.pt')
    key = Ed25519PrivateKey.generate()
    manifest = str(release(tmp_path / 'local.pt', name='local', version='2',
                           architecture=ARCHITECTURE, private_key=key))
    trusted = [key.public_key()]
    worker = Worker(TorchvisionDetector(ARCHITECTURE, str(CHECKPOINT), threads=1),
                    np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8))
    categories = worker.detector.categories

    installed: list[float] = []  # when each update was installed

    def install(detector: TorchvisionDetector, _: ModelManifest) -> None:
        worker.detector = detector
        installed.append(time.perf_counter())
        gc.freeze()  # as the node does: the new model's objects stay out of collections

    gc.collect()
    gc.freeze()  # as the node does after configure
    windows: dict[str, list[Span]] = {}
    worker.thread.start()
    try:
        for name, pacing in (('flat out (before)', None), ('paced (after)', UPDATE_PACING)):
            updater = ModelUpdater(lambda path: verify_manifest(path, trusted),
                                   lambda m: load_released(m, threads=1, categories=categories),
                                   install, Log(), pacing=pacing)
            windows[name] = []
            try:
                for _ in range(UPDATES):
                    time.sleep(GAP_S)
                    began = time.perf_counter()
                    updater.request(manifest)
                    wait_until(updater.idle, 60, 'the update')
                    windows[name].append((began, installed[-1]))
            finally:
                updater.close()
            assert updater.counters['installed'] == UPDATES
            # This shared machine's own stalls: windows as long, with no update in them.
            control_s = statistics.median(end - start for start, end in windows[name])
            control = windows[f'no update (control), {control_s * 1e3:.0f} ms windows'] = []
            for _ in range(UPDATES):
                time.sleep(GAP_S)
                began = time.perf_counter()
                time.sleep(control_s)
                control.append((began, time.perf_counter()))
    finally:
        worker.stop.set()
        worker.thread.join()
    base, extras = worst_extra_ms(worker.spans, windows)
    print(f'\nworst extra delay of a concurrent inference per update ({UPDATES} updates, 1 torch '
          f'thread, {ARCHITECTURE}, load average {os.getloadavg()[0]:.1f})')
    print(f'inference p50 outside the windows: {base:.0f} ms')
    print('| window | extra delay p50 ms | extra delay max ms | window p50 ms |')
    print('|---|---|---|---|')
    for name, spans in windows.items():
        print(f'| {name} | {statistics.median(extras[name]):.0f} | {max(extras[name]):.0f} | '
              f'{statistics.median(end - start for start, end in spans) * 1e3:.0f} |')
    print({name: [round(e) for e in sorted(group)] for name, group in extras.items()})
    assert (statistics.median(extras['paced (after)'])
            < statistics.median(extras['flat out (before)']))
