"""
The vehicle's side of one Open Inference Protocol (KServe v2) endpoint: Triton, KServe, MLServer.

v2 has no health stream, so a health session polls ``ServerReady`` and ``ModelReady`` (short
timeouts, every ``poll_interval_s``) until a poll fails; a connection that drops triggers a poll
at once. Each time the model turns ready, ``ModelMetadata`` must declare the tensor contract of
:mod:`speculative_av.cloud.oip_codec` before the endpoint is healthy. Replies name their classes;
names map to local label ids, and names unknown on the vehicle are dropped and counted.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import logging
import threading
from typing import Any

import grpc
import numpy as np
from speculative_av.cloud import oip_codec
from speculative_av.cloud import open_inference_pb2 as oip
from speculative_av.cloud import open_inference_pb2_grpc as oip_grpc
from speculative_av.cloud.codec import EncodedFrame
from speculative_av.cloud.endpoint import (Endpoint, error_text, failure_state, ModelChanged,
                                           NOT_SERVING, ReplyError, UNVERIFIED,
                                           VerificationError, VERIFY_TIMEOUT_S)
from speculative_av.cloud.reply import CloudReply
from speculative_av.core.detections import Detections

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OipModel:
    """A verified v2 model: its name and the versions the server listed."""

    name: str
    versions: frozenset[str]


# How Triton words the UNAVAILABLE of a request its queue policy dropped.
QUEUE_TIMEOUT_DETAILS = 'Request timeout expired'
QUEUE_FULL_DETAILS = 'Exceeds maximum queue size'


class OipEndpoint(Endpoint[OipModel]):
    """One v2 inference server whose model follows the detector's tensor contract."""

    def __init__(self, name: str, target: str, *, model: str = oip_codec.DEFAULT_MODEL,
                 poll_interval_s: float = 0.25, poll_timeout_s: float = 1.0,
                 **options: Any) -> None:
        """
        Connect to ``target`` ('host:port') and track ``model`` there.

        Readiness is polled every ``poll_interval_s``, each poll allowed ``poll_timeout_s``;
        ``options`` as :class:`Endpoint` takes them.
        """
        if not model:
            raise ValueError('a v2 endpoint needs a model name')
        if not (poll_interval_s > 0 and poll_timeout_s > 0):
            raise ValueError(f'poll_interval_s ({poll_interval_s}) and poll_timeout_s '
                             f'({poll_timeout_s}) must be positive')
        super().__init__(name, target, **options)
        self._model = model
        self._poll_interval_s = poll_interval_s
        self._poll_timeout_s = poll_timeout_s
        self._label_ids = {c: i for i, c in enumerate(self._categories)}
        self._unknown_labels: Counter[str] = Counter()
        self._poll_now = threading.Event()  # a session should poll (or see why it ends) now
        self._stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
        self._start()

    @property
    def model(self) -> str:
        """Return the name of the model this endpoint sends frames to."""
        return self._model

    def unknown_labels(self) -> dict[str, int]:
        """Return how many detections of each class name unknown locally were dropped."""
        with self._lock:
            return dict(self._unknown_labels)

    def _shed_load(self, call: grpc.Call) -> str:
        """Triton answers a request its queue timed out, or had no room for, with UNAVAILABLE."""
        details = call.details() or ''
        if call.code() != grpc.StatusCode.UNAVAILABLE:
            return ''
        if QUEUE_TIMEOUT_DETAILS in details:
            return 'DEADLINE_EXCEEDED: expired in the server queue'
        if QUEUE_FULL_DETAILS in details:
            return 'RESOURCE_EXHAUSTED: the server queue is full'
        return ''

    def _start_call(self, frame: EncodedFrame, frame_id: str, stamp_ns: int, timeout_s: float,
                    deadline_unix_ns: int) -> grpc.Future:
        request = oip_codec.build_infer_request(self._model, frame, timeout_s)
        return self._stub.ModelInfer.future(request, timeout=timeout_s)

    def _parse(self, response: oip.ModelInferResponse, model: OipModel, frame: EncodedFrame,
               frame_id: str, round_trip_ms: float) -> CloudReply:
        if response.model_name and response.model_name != model.name:
            raise ModelChanged(f'{response.model_name} answered, {model.name} was verified')
        if response.model_version and model.versions and (response.model_version
                                                          not in model.versions):
            raise ModelChanged(f'version {response.model_version} answered, versions '
                               f'{sorted(model.versions)} were verified')
        try:
            raw = oip_codec.parse_infer_response(response)
        except oip_codec.TensorError as exc:
            raise ReplyError(str(exc)) from None
        ids = np.array([self._label_ids.get(n, -1) for n in raw.labels], np.int64)
        self._count_unknown([n for n, i in zip(raw.labels, ids) if i < 0])
        keep = ids >= 0
        detections = Detections(raw.boxes[keep], raw.scores[keep], ids[keep]).scaled(
            frame.original_width / frame.width, frame.original_height / frame.height)
        return CloudReply(self._name, True, detections, model_name=response.model_name,
                          model_version=response.model_version, frame_id=frame_id,
                          round_trip_ms=round_trip_ms)

    def _count_unknown(self, names: list[str]) -> None:
        """Count dropped class names; log each name the first time it is seen."""
        if not names:
            return
        with self._lock:
            new = sorted({n for n in names if n not in self._unknown_labels})
            self._unknown_labels.update(names)
        if new:
            _LOG.warning('%s: dropping detections of classes unknown to the vehicle: %s',
                         self._name, new)

    def _verify(self) -> OipModel:
        """Check that the model declares the tensor contract."""
        try:
            metadata: oip.ModelMetadataResponse = self._stub.ModelMetadata(
                oip.ModelMetadataRequest(name=self._model), timeout=VERIFY_TIMEOUT_S)
            oip_codec.check_model_metadata(metadata)
        except grpc.RpcError as exc:
            raise VerificationError(f'ModelMetadata failed: {error_text(exc)}') from None
        except oip_codec.TensorError as exc:
            raise VerificationError(str(exc)) from None
        return OipModel(metadata.name or self._model, frozenset(metadata.versions))

    def _end_session(self) -> None:
        self._poll_now.set()

    def _on_channel_change(self, state: grpc.ChannelConnectivity) -> None:
        """Poll now when a connection dropped or failed, rather than at the next interval."""
        if state is not grpc.ChannelConnectivity.READY:
            self._poll_now.set()

    def _session(self) -> tuple[bool, str, str]:
        """Poll readiness until a poll fails, verification fails, or the session is ended."""
        served = False
        while True:
            self._poll_now.clear()
            if self._session_interrupted():
                return served, UNVERIFIED, 'interrupted'  # the interrupt's state replaces it
            try:
                server_ready = self._stub.ServerReady(
                    oip.ServerReadyRequest(), timeout=self._poll_timeout_s).ready
                model_ready = server_ready and self._stub.ModelReady(
                    oip.ModelReadyRequest(name=self._model), timeout=self._poll_timeout_s).ready
            except grpc.RpcError as exc:
                return served, failure_state(exc), error_text(exc)
            if model_ready:
                if not self._serving(self._poll_interval_s):
                    return served, UNVERIFIED, self.health().last_error
                served = True
            else:
                self._record(NOT_SERVING, f'model {self._model} not ready' if server_ready
                             else 'server not ready', self._poll_interval_s)
            self._poll_now.wait(self._poll_interval_s)
