"""
Over-the-air model updates in the background: verify, load, warm up, then hand over.

A request names a signed manifest. One supervised thread takes requests one at a time (a newer
request replaces one still waiting, counted as ``superseded``), verifies the manifest, loads the
model, runs one inference to pay its first-pass cost, and only then hands it to ``install`` (the
engine's swap between frames). Verifying, loading and warming up run paced
(:mod:`speculative_av.core.gil_pacing`): that Python work would otherwise hold the GIL half the
time and stretch a concurrent inference of the frames' worker. Any failure on the way is logged,
counted and leaves the current model in place; the thread goes on with the next request.
ROS-free, like the engine.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
import threading
import time
from typing import Callable, Generic, TypeVar

import numpy as np
from speculative_av.core.gil_pacing import GilPacing, paced
from speculative_av.engine.engine import LocalDetector, Logger
from speculative_av.fleet.model_manifest import ModelManifest

Detector = TypeVar('Detector', bound=LocalDetector)
WARM_UP_SHAPE = (480, 640, 3)
UPDATE_PACING = GilPacing(run_s=0.0005, pause_s=0.005)  # measured: README, "Over-the-air ..."


@dataclass(frozen=True)
class UpdateTimes:
    """How long the last successful update took, stage by stage (ms)."""

    verify_ms: float = 0.0
    load_ms: float = 0.0
    warm_up_ms: float = 0.0


class ModelUpdater(Generic[Detector]):
    """Prepare requested models on one background thread; install each that is ready."""

    def __init__(self, verify: Callable[[str], ModelManifest],
                 load: Callable[[ModelManifest], Detector],
                 install: Callable[[Detector, ModelManifest], None], logger: Logger, *,
                 timer: Callable[[], float] = time.perf_counter,
                 pacing: GilPacing | None = UPDATE_PACING) -> None:
        """
        Start the thread.

        ``verify`` checks a manifest path (raising ValueError or OSError), ``load`` builds its
        detector (raising on weights that do not load or do not fit), ``install`` swaps it in
        (never paced: it may hold the engine's lock). ``pacing`` None runs the preparation flat
        out.
        """
        self._verify = verify
        self._load = load
        self._install = install
        self._log = logger
        self._timer = timer
        self._pacing = pacing
        self._condition = threading.Condition()
        self._pending: str | None = None
        self._busy = False
        self._closed = False
        self.counters = {'requested': 0, 'superseded': 0, 'installed': 0, 'failed': 0}
        self.last_error = ''
        self.times = UpdateTimes()
        self._thread = threading.Thread(target=self._run, name='model-updater', daemon=True)
        self._thread.start()

    def request(self, manifest: str) -> None:
        """Ask for the model of ``manifest``; it replaces a request not yet started."""
        with self._condition:
            self.counters['requested'] += 1
            if self._pending is not None:
                self.counters['superseded'] += 1
            self._pending = manifest
            self._condition.notify()

    def idle(self) -> bool:
        """Return whether no request is waiting or being prepared."""
        with self._condition:
            return self._pending is None and not self._busy

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the request in progress (a pending one is dropped)."""
        with self._condition:
            self._closed = True
            self._pending = None
            self._condition.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._pending is None and not self._closed:
                    self._condition.wait()
                manifest = self._pending
                if self._closed or manifest is None:
                    return
                self._pending, self._busy = None, True
            try:
                self._update(manifest)
            except Exception as error:  # noqa: B902 (a bad update must never end the thread)
                with self._condition:
                    self.counters['failed'] += 1
                    self.last_error = f'{manifest}: {error}'
                self._log.error(f'model update from {manifest} refused; the current model '
                                f'stays: {error}')
            finally:
                with self._condition:
                    self._busy = False

    def _update(self, path: str) -> None:
        with paced(self._pacing) if self._pacing is not None else nullcontext():
            began = self._timer()
            manifest = self._verify(path)
            verified = self._timer()
            detector = self._load(manifest)
            loaded = self._timer()
            detector.detect(np.zeros(WARM_UP_SHAPE, np.uint8))
            warm = self._timer()
        self._install(detector, manifest)
        with self._condition:
            self.counters['installed'] += 1
            self.times = UpdateTimes((verified - began) * 1e3, (loaded - verified) * 1e3,
                                     (warm - loaded) * 1e3)
            self.last_error = ''
        self._log.info(f'model {manifest.label} installed: verified in '
                       f'{self.times.verify_ms:.0f} ms, loaded in {self.times.load_ms:.0f} ms, '
                       f'warmed up in {self.times.warm_up_ms:.0f} ms')
