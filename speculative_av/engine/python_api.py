"""
Speculative detection on numpy frames, without ROS: the engine the node runs, behind one call.

>>> with SpeculativeDetection(TorchvisionDetector('ssdlite320_mobilenet_v3_large', weights),
...                           ['127.0.0.1:50051'], deadline_ms=300.0, insecure=True) as fusion:
...     result = fusion.detect(rgb)       # blocks until the frame's fused result is final
...     result.detections, result.winner  # the cloud's if it came in time, else the local one
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
import logging
import threading
import time
from types import TracebackType
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.cloud.dispatch import CloudDispatcher
from speculative_av.cloud.endpoint import Endpoint
from speculative_av.cloud.endpoint_factory import open_endpoint
from speculative_av.cloud.endpoints import parse_endpoints
from speculative_av.cloud.security import ChannelSecurity
from speculative_av.core.arbiter import Decision, FrameRecord
from speculative_av.core.deadline import DeadlinePolicy
from speculative_av.core.detections import Detections
from speculative_av.detectors.torchvision_detector import TorchvisionDetector
from speculative_av.engine.engine import EngineSettings, Frame, SpeculativeEngine

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedResult:
    """A frame's fused result: what planning would get."""

    detections: Detections
    winner: str | None  # 'local', a cloud endpoint's name, or None if every source failed
    late: bool  # released after the deadline (only when the local detector was slower)
    latency_ms: float  # from the call to the result


def _checked(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError('expected a non-empty (H, W, 3) uint8 RGB image, got '
                         f'{getattr(rgb, "dtype", type(rgb).__name__)} '
                         f'{getattr(rgb, "shape", "")}')
    return rgb


class _Futures:
    """The engine's sink: resolves each frame's future with its fused decision."""

    def wants_image(self, camera: str) -> bool:
        return False

    def local(self, frame: Frame[Future[Decision]], detections: Detections) -> None:
        """Nothing to do: only the fused result is returned."""

    def cloud(self, frame: Frame[Future[Decision]], endpoint: str,
              detections: Detections) -> None:
        """Nothing to do: only the fused result is returned."""

    def fused(self, frame: Frame[Future[Decision]], decision: Decision) -> None:
        frame.context.set_result(decision)

    def settled(self, frame: Frame[Future[Decision]], record: FrameRecord) -> None:
        """Nothing to do: the account is in :attr:`SpeculativeDetection.engine` stats."""


class SpeculativeDetection:
    """Race ``local`` against cloud endpoints for each frame given to :meth:`detect`."""

    def __init__(self, local: TorchvisionDetector, endpoints: Sequence[str] = (), *,
                 deadline_ms: float = 150.0, jpeg_quality: int = 80, max_image_side: int = 0,
                 max_outstanding: int = 4, insecure: bool = False,
                 security: ChannelSecurity | None = None) -> None:
        """
        Connect to ``endpoints`` (``[name=]host:port[@priority]`` or ``kserve://...``).

        Without ``security`` the link uses TLS with the system roots, or plaintext with
        ``insecure`` (a server on this machine or a trusted network only).
        """
        specs = parse_endpoints(list(endpoints)) if endpoints else []
        security = security or ChannelSecurity.from_settings(insecure=insecure)
        self._health = threading.Condition()
        self._endpoints: list[Endpoint[Any]] = [
            open_endpoint(s, security=security, categories=local.categories,
                          on_health_change=self._health_changed) for s in specs]
        dispatcher = (CloudDispatcher(self._endpoints, {s.name: s.priority for s in specs},
                                      max_outstanding=max_outstanding) if specs else None)
        self._dispatcher = dispatcher
        self._lock = threading.Lock()  # one frame at a time: none replaces another
        self._pending: Future[Decision] | None = None
        self._last_stamp_ns = 0
        self.engine: SpeculativeEngine[npt.NDArray[np.uint8], Future[Decision]] = \
            SpeculativeEngine(local, _checked, _Futures(), cloud=dispatcher,
                              settings=EngineSettings(DeadlinePolicy.from_ms(deadline_ms),
                                                      jpeg_quality=jpeg_quality,
                                                      max_image_side=max_image_side),
                              logger=_LOG, on_fatal=self._engine_died, concurrent_send=True)
        self.engine.start()

    def _health_changed(self, endpoint: str, old: str, new: str, error: str) -> None:
        with self._health:
            self._health.notify_all()

    def _engine_died(self, reason: str) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.set_exception(RuntimeError(reason))

    def wait_until_serving(self, timeout_s: float) -> bool:
        """Wait until every endpoint serves a verified model; return whether all do."""
        with self._health:
            return self._health.wait_for(lambda: all(e.healthy for e in self._endpoints),
                                         timeout_s)

    def detect(self, rgb: npt.NDArray[np.uint8]) -> FusedResult:
        """Return the frame's fused result, as soon as it is final (at most the deadline)."""
        _checked(rgb)
        future: Future[Decision] = Future()
        with self._lock:
            self._pending = future
            if self.engine.fatal:
                raise RuntimeError(self.engine.fatal)
            started = time.monotonic_ns()
            # Stamps must grow, or the engine drops the frame as stale.
            self._last_stamp_ns = max(started, self._last_stamp_ns + 1)
            self.engine.submit('', rgb, self._last_stamp_ns, '', future)
            decision = future.result()
        return FusedResult(decision.detections, decision.winner, decision.late,
                           (time.monotonic_ns() - started) / 1e6)

    def close(self) -> None:
        """Stop the engine and close the cloud channels."""
        self.engine.stop('closed')
        if self._dispatcher is not None:
            self._dispatcher.stop()
        for endpoint in self._endpoints:
            endpoint.stop()

    def __enter__(self) -> SpeculativeDetection:
        """Use as a context manager that closes on exit."""
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        """Close."""
        self.close()
