"""
The vehicle's side of one native cloud detector endpoint (``speculative_av.v1.CloudDetector``).

Health is event-driven: each health session keeps a grpc.health.v1 ``Watch`` stream open, so the
server pushes every change of its serving status the moment it happens. When the stream breaks
(the server died, the network is gone) the endpoint is unreachable, and a new session starts as
soon as the channel reports it is connected again (see :mod:`speculative_av.cloud.endpoint`).
Each time the server turns SERVING, ``GetModelInfo`` tells its categories; they are mapped onto
the vehicle's by name (classes unknown on the vehicle are dropped) before the endpoint is
healthy, and every reply must name the model that was verified.
"""
from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
import numpy as np
import numpy.typing as npt
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud.endpoint import (Endpoint, error_text, failure_state, ModelChanged,
                                           NOT_SERVING, UNKNOWN, UNREACHABLE, UNVERIFIED,
                                           VerificationError, VERIFY_TIMEOUT_S)
from speculative_av.cloud.reply import CloudReply
from speculative_av.core.detections import label_mapping

_LOG = logging.getLogger(__name__)

SERVICE_NAME = detection_pb2.DESCRIPTOR.services_by_name['CloudDetector'].full_name


@dataclass(frozen=True)
class NativeModel:
    """A verified native model: who it is, and its label id -> local label id (-1: dropped)."""

    name: str
    version: str
    mapping: npt.NDArray[np.int64]


class CloudEndpoint(Endpoint[NativeModel]):
    """One native gRPC cloud detector the vehicle can send frames to."""

    def __init__(self, name: str, target: str, **options: Any) -> None:
        """Connect to ``target`` ('host:port'); ``options`` as :class:`Endpoint` takes them."""
        super().__init__(name, target, **options)
        self._stub = detection_pb2_grpc.CloudDetectorStub(self._channel)
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)
        self._watch: Any = None  # the open Watch call, cancelled by _end_session()
        self._start()

    def model_info(self, timeout_s: float) -> detection_pb2.ModelInfo | None:
        """Return the served model's description, or None if the call fails."""
        try:
            info: detection_pb2.ModelInfo = self._stub.GetModelInfo(
                detection_pb2.ModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            _LOG.debug('%s: GetModelInfo failed: %s', self._name, error_text(exc))
            return None
        return info

    def _start_call(self, frame: codec.EncodedFrame, frame_id: str, stamp_ns: int,
                    timeout_s: float, deadline_unix_ns: int) -> grpc.Future:
        request = codec.build_request(frame, frame_id, stamp_ns, deadline_unix_ns)
        return self._stub.Detect.future(request, timeout=timeout_s)

    def _parse(self, response: detection_pb2.DetectResponse, model: NativeModel,
               frame: codec.EncodedFrame, frame_id: str, round_trip_ms: float) -> CloudReply:
        if (response.model_name, response.model_version) != (model.name, model.version):
            raise ModelChanged(f'{response.model_name} {response.model_version} answered, '
                               f'{model.name} {model.version} was verified')
        return CloudReply(
            self._name, True, codec.response_to_detections(response).relabeled(model.mapping),
            server_inference_ms=response.inference_ms, server_queue_ms=response.queue_ms,
            model_name=response.model_name, model_version=response.model_version,
            frame_id=frame_id, round_trip_ms=round_trip_ms)

    def _verify(self) -> NativeModel:
        """Map the served model's categories onto the local ones by name."""
        try:
            info: detection_pb2.ModelInfo = self._stub.GetModelInfo(
                detection_pb2.ModelInfoRequest(), timeout=VERIFY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise VerificationError(f'GetModelInfo failed: {error_text(exc)}') from None
        categories = list(info.categories)
        # Equal lists map id to id, also classes that share a name (COCO's ten 'N/A').
        mapping = (np.arange(len(categories)) if categories == self._categories
                   else label_mapping(categories, self._categories))
        if not (mapping >= 0).any():
            raise VerificationError(
                f'{info.model_name} {info.model_version}: none of its {len(categories)} '
                'categories is a local one')
        unknown = [c for c, m in zip(categories, mapping) if m < 0]
        if categories != self._categories:
            _LOG.warning('%s: %s %s uses another label map; its labels are translated by name, '
                         'and these classes are dropped: %s', self._name, info.model_name,
                         info.model_version, unknown)
        return NativeModel(info.model_name, info.model_version, mapping)

    def _end_session(self) -> None:
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()

    def _session(self) -> tuple[bool, str, str]:
        """Follow the server's health stream until it ends."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        served = False
        with self._lock:
            if self._stop.is_set() or self._interrupted is not None:
                return served, UNKNOWN, 'interrupted'
            watch = self._watch = self._health_stub.Watch(request)
        try:
            for response in watch:
                if response.status != health_pb2.HealthCheckResponse.SERVING:
                    self._record(NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(
                        response.status), 0.0)
                elif not self._serving(0.0):
                    return served, UNVERIFIED, self.health().last_error
                else:
                    served = True
            return served, UNREACHABLE, 'the health stream ended'
        except grpc.RpcError as exc:
            return served, failure_state(exc), error_text(exc)
        finally:
            watch.cancel()
            with self._lock:
                self._watch = None
