"""
Test process: an Open Inference Protocol (KServe v2) gRPC server running a real detector.

    oip_server.py --port PORT [--model-name NAME] [--typed-contents] [--padding N]
                  [--broken-metadata]

A stand-in for Triton in unit tests only: it implements ``inference.GRPCInferenceService`` with
the project's generated stubs and answers ModelInfer with a real :class:`TorchvisionDetector`
(SSDlite, fixed-seed random weights, score threshold 0), following the tensor contract of
``speculative_av.cloud.oip_codec``. Replies carry ``--padding`` extra rows with empty labels, and
use typed ``contents`` instead of raw bytes with ``--typed-contents``; ``--broken-metadata``
declares LABELS as INT64, a model that breaks the contract. SIGUSR1 reloads the model
as its next version (as Triton does when a new version appears): metadata and replies name it.

Prints ``oip_server ready grpc=127.0.0.1:PORT model=NAME`` once serving; runs until SIGINT or
SIGTERM, then prints ``oip_server summary: requests=N`` to stderr and exits with 0.
"""
import argparse
from concurrent import futures
import signal
import sys
import threading

import grpc
import numpy as np
from speculative_av.cloud import open_inference_pb2 as oip
from speculative_av.cloud import open_inference_pb2_grpc as oip_grpc
from speculative_av.cloud.oip_codec import (decode_bytes_elements, encode_bytes_elements,
                                            TensorError)
from speculative_av.core.image_decoding import decode_rgb
from speculative_av.detectors.torchvision_detector import TorchvisionDetector

MODEL = 'ssdlite320_mobilenet_v3_large'
Tensor = oip.ModelInferResponse.InferOutputTensor
TensorMetadata = oip.ModelMetadataResponse.TensorMetadata


class InferenceService(oip_grpc.GRPCInferenceServiceServicer):
    """One model, served by a real detector."""

    def __init__(self, model_name: str, typed_contents: bool, padding: int,
                 broken_metadata: bool) -> None:
        """Load the detector (torch's default threads, as the test's local detector has)."""
        self._model_name = model_name
        self._labels_datatype = 'INT64' if broken_metadata else 'BYTES'
        self._typed = typed_contents
        self._padding = padding
        self._detector = TorchvisionDetector(MODEL, 'random', score_threshold=0.0)
        self._lock = threading.Lock()  # one inference at a time; guards version and requests
        self.version = 1
        self.requests = 0

    def ServerLive(self, request, context):  # noqa: N802 (the protocol's method names)
        """Answer live."""
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        """Answer ready."""
        return oip.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        """Answer whether the named model is this one."""
        return oip.ModelReadyResponse(ready=request.name == self._model_name)

    def ModelMetadata(self, request, context):  # noqa: N802
        """Declare the contract's tensors, with the batch dimension as Triton does."""
        if request.name != self._model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f'unknown model {request.name!r}')
        with self._lock:
            version = str(self.version)
        return oip.ModelMetadataResponse(
            name=self._model_name, versions=[version], platform='python',
            inputs=[TensorMetadata(name='IMAGE', datatype='BYTES', shape=[-1, 1])],
            outputs=[TensorMetadata(name='BOXES', datatype='FP32', shape=[-1, -1, 4]),
                     TensorMetadata(name='SCORES', datatype='FP32', shape=[-1, -1]),
                     TensorMetadata(name='LABELS', datatype=self._labels_datatype,
                                    shape=[-1, -1])])

    def ModelInfer(self, request, context):  # noqa: N802
        """Detect objects in the one image of the request."""
        if request.model_name != self._model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f'unknown model {request.model_name!r}')
        inputs = [(t.name, t.datatype, list(t.shape)) for t in request.inputs]
        if inputs != [('IMAGE', 'BYTES', [1, 1])] or len(request.raw_input_contents) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'expected IMAGE BYTES [1, 1], raw')
        try:
            (data,) = decode_bytes_elements(request.raw_input_contents[0], 1)
            rgb = decode_rgb(data, 'png' if data.startswith(b'\x89PNG') else 'jpeg')
        except (TensorError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.requests += 1
            version = str(self.version)
            detections = self._detector.detect(rgb)
        categories = self._detector.categories
        count = len(detections) + self._padding
        boxes = np.zeros((count, 4), '<f4')
        scores = np.zeros(count, '<f4')
        boxes[:len(detections)] = detections.boxes
        scores[:len(detections)] = detections.scores
        labels = [categories[i].encode() for i in detections.labels] + [b''] * self._padding
        response = oip.ModelInferResponse(
            model_name=self._model_name, model_version=version, id=request.id,
            outputs=[Tensor(name='BOXES', datatype='FP32', shape=[1, count, 4]),
                     Tensor(name='SCORES', datatype='FP32', shape=[1, count]),
                     Tensor(name='LABELS', datatype='BYTES', shape=[1, count])])
        if self._typed:
            response.outputs[0].contents.fp32_contents.extend(boxes.ravel().tolist())
            response.outputs[1].contents.fp32_contents.extend(scores.tolist())
            response.outputs[2].contents.bytes_contents.extend(labels)
        else:
            response.raw_output_contents.extend(
                [boxes.tobytes(), scores.tobytes(), encode_bytes_elements(labels)])
        return response

    def next_version(self) -> None:
        """Serve the model as its next version from now on."""
        with self._lock:
            self.version += 1


def main() -> int:
    """Serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--port', type=int, required=True)
    parser.add_argument('--model-name', default='speculative_detector')
    parser.add_argument('--typed-contents', action='store_true')
    parser.add_argument('--padding', type=int, default=0)
    parser.add_argument('--broken-metadata', action='store_true')
    options = parser.parse_args()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service = InferenceService(options.model_name, options.typed_contents, options.padding,
                               options.broken_metadata)
    signal.signal(signal.SIGUSR1, lambda *_: service.next_version())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f'127.0.0.1:{options.port}')
    server.start()
    print(f'oip_server ready grpc=127.0.0.1:{port} model={options.model_name}', flush=True)
    stop.wait()
    server.stop(0).wait()
    print(f'oip_server summary: requests={service.requests}', file=sys.stderr, flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
