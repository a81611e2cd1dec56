"""
The project's torchvision detector as a Triton Python-backend model (the v2 tensor contract).

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` the requests it gathered; their
images go through one forward pass. Every request's ``IMAGE`` rows are encoded jpeg or png
bytes, size-checked before decoding; a request with a malformed image gets its own error
response while the rest of the batch is answered. Outputs per row: ``BOXES`` (N, 4) float32
x1, y1, x2, y2 in the pixels of the image as sent, ``SCORES`` (N,) float32 and ``LABELS`` (N,)
UTF-8 class names. A request with several rows pads its rows to the longest: padding has score 0
and the empty label b''.

This module runs inside Triton's Python-backend stub (``triton_python_backend_utils`` exists
only there); the tensor logic lives in functions that import nothing of Triton, to be tested.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.core.detections import Detections
from speculative_av.core.image_decoding import (decode_rgb, ImageDecodeError, JPEG_SIGNATURE,
                                                PNG_SIGNATURE)

_LOG = logging.getLogger(__name__)

INPUT_IMAGE = 'IMAGE'
OUTPUT_BOXES = 'BOXES'
OUTPUT_SCORES = 'SCORES'
OUTPUT_LABELS = 'LABELS'
PADDING_LABEL = b''
REJECT_LOG_INTERVAL_S = 10.0  # at most one log line per interval about malformed images

Outputs = dict[str, npt.NDArray[Any]]


def decode_image(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode one encoded image, its format told by its signature, within the project's limits."""
    if data.startswith(PNG_SIGNATURE):
        return decode_rgb(data, 'png')
    if data.startswith(JPEG_SIGNATURE):
        return decode_rgb(data, 'jpeg')
    raise ImageDecodeError(f'{len(data)} bytes are neither jpeg nor png (no known signature)')


def request_images(rows: npt.NDArray[Any]) -> list[npt.NDArray[np.uint8]]:
    """Decode the ``IMAGE`` tensor of one request, shape (rows, 1) of bytes objects."""
    if rows.ndim != 2 or rows.shape[1] != 1 or rows.shape[0] == 0:
        raise ImageDecodeError(f'{INPUT_IMAGE} must have shape [rows, 1], got {list(rows.shape)}')
    images = []
    for cell in rows[:, 0]:
        if not isinstance(cell, (bytes, bytearray)):
            raise ImageDecodeError(f'{INPUT_IMAGE} holds {type(cell).__name__}, not bytes')
        images.append(decode_image(bytes(cell)))
    return images


def request_outputs(detections: Sequence[Detections], categories: Sequence[bytes]) -> Outputs:
    """Stack one request's per-row detections into padded output tensors with a batch axis."""
    width = max((len(d.scores) for d in detections), default=0)
    rows = len(detections)
    boxes = np.zeros((rows, width, 4), np.float32)
    scores = np.zeros((rows, width), np.float32)
    labels = np.full((rows, width), PADDING_LABEL, dtype=object)
    for row, found in enumerate(detections):
        count = len(found.scores)
        boxes[row, :count] = found.boxes
        scores[row, :count] = found.scores
        labels[row, :count] = [_label_name(categories, label) for label in found.labels]
    return {OUTPUT_BOXES: boxes, OUTPUT_SCORES: scores, OUTPUT_LABELS: labels}


def _label_name(categories: Sequence[bytes], label: int) -> bytes:
    """Return the UTF-8 name of class id ``label`` (its number when the map has no such id)."""
    return categories[label] if 0 <= label < len(categories) else str(label).encode()


class BatchDetector:
    """
    Answer a dynamic batch: decode each request, detect all good images at once, split back.

    ``detect_images`` maps a list of RGB images to one :class:`Detections` each, in one
    forward pass where the detector offers it. Results are a list of outputs or the
    ImageDecodeError of each request, in request order.
    """

    def __init__(self, detect_images: Callable[[list[npt.NDArray[np.uint8]]], list[Detections]],
                 categories: Sequence[str], clock: Callable[[], float] = time.monotonic) -> None:
        """Keep the detection function and the label names (UTF-8) it reports ids of."""
        self._detect_images = detect_images
        self._categories = [name.encode() for name in categories]
        self._clock = clock
        self.rejected = 0
        self._rejected_unlogged = 0
        self._last_log = float('-inf')

    def answer(self, requests: Sequence[npt.NDArray[Any]]) -> list[Outputs | ImageDecodeError]:
        """Return the outputs or decode error of each request's ``IMAGE`` tensor."""
        decoded: list[list[npt.NDArray[np.uint8]] | ImageDecodeError] = []
        for rows in requests:
            try:
                decoded.append(request_images(rows))
            except ImageDecodeError as exc:
                self._count_rejected(exc)
                decoded.append(exc)
        images = [image for item in decoded if isinstance(item, list) for image in item]
        found = iter(self._detect_images(images) if images else [])
        return [item if isinstance(item, ImageDecodeError)
                else request_outputs([next(found) for _ in item], self._categories)
                for item in decoded]

    def _count_rejected(self, exc: ImageDecodeError) -> None:
        """Count a malformed request; log it, or how many since the last line, throttled."""
        self.rejected += 1
        self._rejected_unlogged += 1
        now = self._clock()
        if now - self._last_log >= REJECT_LOG_INTERVAL_S:
            _LOG.warning('refused %d malformed image request(s) (%d in all); latest: %s',
                         self._rejected_unlogged, self.rejected, exc)
            self._rejected_unlogged = 0
            self._last_log = now


class TritonPythonModel:
    """Triton's Python-backend interface: the detector is built from the model's parameters."""

    def initialize(self, args: dict[str, str]) -> None:
        """Build the detector named by the config's parameters (see triton_server)."""
        from speculative_av.detectors.torchvision_detector import TorchvisionDetector
        logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
        config = json.loads(args['model_config'])
        params = {key: value['string_value'] for key, value in config['parameters'].items()}
        threads = int(params['threads'])
        detector = TorchvisionDetector(params['model'], params['weights'], params['device'],
                                       float(params['score_threshold']),
                                       threads if threads > 0 else None)
        self._batch = BatchDetector(detector.detect_batch, detector.categories)
        _LOG.info('serving %s (weights %s) on %s', detector.model_name,
                  detector.model_version, detector.device)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer each request of the batch Triton gathered: outputs or its own error."""
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
        tensors = [pb_utils.get_input_tensor_by_name(r, INPUT_IMAGE).as_numpy() for r in requests]
        responses = []
        for result in self._batch.answer(tensors):
            if isinstance(result, ImageDecodeError):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
