"""
The detector's tensor contract over the Open Inference Protocol (KServe v2), as pure functions.

A v2 model serving this project's detector (``speculative_detector`` by default) batches along
a leading dimension and exchanges one image per request:

* input ``IMAGE``, BYTES [1, 1]: one encoded image (JPEG or PNG), possibly downscaled;
* output ``BOXES``, FP32 [1, n, 4]: x1, y1, x2, y2 in the pixels of the image as sent;
* output ``SCORES``, FP32 [1, n];
* output ``LABELS``, BYTES [1, n]: UTF-8 class names; an empty name marks a padding row.

Tensors travel as raw bytes (``raw_input_contents`` / ``raw_output_contents``): FP32 little
endian, and each BYTES element as a 4-byte little-endian length followed by its bytes, as Triton
expects. Replies in typed ``contents`` are accepted too. Anything else is a :class:`TensorError`.
"""
from __future__ import annotations

from dataclasses import dataclass
import struct
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
from speculative_av.cloud import open_inference_pb2 as oip
from speculative_av.cloud.codec import EncodedFrame

DEFAULT_MODEL = 'speculative_detector'
IMAGE, BOXES, SCORES, LABELS = 'IMAGE', 'BOXES', 'SCORES', 'LABELS'
INPUTS = {IMAGE: 'BYTES'}
OUTPUTS = {BOXES: 'FP32', SCORES: 'FP32', LABELS: 'BYTES'}
MAX_LABEL_BYTES = 256  # a class name longer than this is not one
_LENGTH = struct.Struct('<I')


class TensorError(ValueError):
    """A tensor that does not fit the contract (the message says how)."""


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """Return BYTES tensor elements in the raw format: length-prefixed, concatenated."""
    return b''.join(_LENGTH.pack(len(e)) + e for e in elements)


def decode_bytes_elements(data: bytes, count: int) -> list[bytes]:
    """Split a raw BYTES tensor into exactly ``count`` elements; it must hold nothing else."""
    elements: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + _LENGTH.size > len(data):
            raise TensorError(f'a BYTES tensor of {count} elements ends after {len(elements)}')
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise TensorError(f'BYTES element {len(elements)} claims {size} bytes, '
                              f'{len(data) - offset} are left')
        elements.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise TensorError(f'{len(data) - offset} bytes follow the {count} BYTES elements')
    return elements


def build_infer_request(model: str, frame: EncodedFrame, timeout_s: float,
                        request_id: str = '') -> oip.ModelInferRequest:
    """
    Return the ModelInfer request for one frame.

    ``timeout_s`` also travels as the ``timeout`` parameter (int64 microseconds), so a server
    queue policy (Triton's) can drop the request once its time has passed in the queue.
    """
    request = oip.ModelInferRequest(
        model_name=model, id=request_id,
        inputs=[oip.ModelInferRequest.InferInputTensor(
            name=IMAGE, datatype='BYTES', shape=[1, 1])],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in OUTPUTS],
        raw_input_contents=[encode_bytes_elements([frame.data])])
    request.parameters['timeout'].int64_param = max(1, round(timeout_s * 1e6))
    return request


def check_model_metadata(metadata: oip.ModelMetadataResponse) -> None:
    """Raise :class:`TensorError` unless the model declares the contract's tensors and types."""
    for kind, declared, wanted in (('input', metadata.inputs, INPUTS),
                                   ('output', metadata.outputs, OUTPUTS)):
        types = {t.name: t.datatype for t in declared}
        for name, datatype in wanted.items():
            if types.get(name) != datatype:
                raise TensorError(
                    f'model {metadata.name!r} declares {kind} {name} as '
                    f'{types.get(name, "missing")}, the contract needs {datatype}')
    boxes = next(t for t in metadata.outputs if t.name == BOXES)
    if boxes.shape and boxes.shape[-1] not in (4, -1):
        raise TensorError(f'model {metadata.name!r} declares BOXES of shape '
                          f'{list(boxes.shape)}; the contract needs [batch, n, 4]')


@dataclass(frozen=True)
class RawDetections:
    """A reply's detections before their labels are mapped: boxes in the sent image's pixels."""

    boxes: npt.NDArray[np.float32]  # (n, 4)
    scores: npt.NDArray[np.float32]  # (n,)
    labels: list[str]  # (n,), no padding rows


def parse_infer_response(response: oip.ModelInferResponse) -> RawDetections:
    """Read BOXES, SCORES and LABELS of a one-image reply; drop padding rows (empty label)."""
    outputs = _outputs_by_name(response)
    boxes_tensor, boxes_raw = outputs[BOXES]
    shape = _shape(boxes_tensor, 3)
    if shape[0] != 1 or shape[2] != 4:
        raise TensorError(f'BOXES has shape {shape}; the contract needs [1, n, 4]')
    count = shape[1]
    boxes = _fp32(boxes_tensor, boxes_raw, count * 4).reshape(count, 4)
    scores_tensor, scores_raw = outputs[SCORES]
    _expect_shape(scores_tensor, [1, count])
    scores = _fp32(scores_tensor, scores_raw, count)
    labels_tensor, labels_raw = outputs[LABELS]
    _expect_shape(labels_tensor, [1, count])
    names = _labels(labels_tensor, labels_raw, count)
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise TensorError('BOXES or SCORES holds a value that is not finite')
    keep = [i for i, name in enumerate(names) if name]
    return RawDetections(boxes[keep], scores[keep], [names[i] for i in keep])


def _outputs_by_name(response: oip.ModelInferResponse) -> dict[str, tuple[Any, bytes | None]]:
    """Return each contract output with its raw contents (None: typed contents are used)."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise TensorError(f'{len(raw)} raw_output_contents for {len(response.outputs)} outputs')
    found: dict[str, tuple[Any, bytes | None]] = {}
    for index, tensor in enumerate(response.outputs):
        if tensor.name in found:
            raise TensorError(f'output {tensor.name} appears twice')
        found[tensor.name] = (tensor, raw[index] if raw else None)
    for name, datatype in OUTPUTS.items():
        if name not in found:
            raise TensorError(f'the reply lacks output {name}')
        if found[name][0].datatype != datatype:
            raise TensorError(f'output {name} is {found[name][0].datatype or "untyped"}, the '
                              f'contract needs {datatype}')
    return found


def _shape(tensor: Any, rank: int) -> list[int]:
    shape = list(tensor.shape)
    if len(shape) != rank or any(d < 0 for d in shape):
        raise TensorError(f'{tensor.name} has shape {shape}; expected {rank} dimensions >= 0')
    return shape


def _expect_shape(tensor: Any, shape: list[int]) -> None:
    if list(tensor.shape) != shape:
        raise TensorError(f'{tensor.name} has shape {list(tensor.shape)}, expected {shape}')


def _fp32(tensor: Any, raw: bytes | None, count: int) -> npt.NDArray[np.float32]:
    """Return ``count`` FP32 elements from raw little-endian bytes or typed contents."""
    if raw is None:
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise TensorError(f'{tensor.name} holds {len(values)} values, its shape {count}')
        return np.array(values, np.float32)
    if len(raw) != 4 * count:
        raise TensorError(f'{tensor.name} holds {len(raw)} bytes, its shape needs {4 * count}')
    return np.frombuffer(raw, '<f4').astype(np.float32)


def _labels(tensor: Any, raw: bytes | None, count: int) -> list[str]:
    """Return ``count`` class names ('' for padding) from raw or typed BYTES contents."""
    if raw is None:
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise TensorError(f'{tensor.name} holds {len(elements)} values, its shape {count}')
    else:
        elements = decode_bytes_elements(raw, count)
    names = []
    for element in elements:
        if len(element) > MAX_LABEL_BYTES:
            raise TensorError(f'a label of {len(element)} bytes is longer than '
                              f'{MAX_LABEL_BYTES}')
        try:
            names.append(element.decode('utf-8'))
        except UnicodeDecodeError:
            raise TensorError(f'label {element[:32]!r} is not UTF-8') from None
    return names
