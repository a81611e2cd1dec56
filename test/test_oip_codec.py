"""The detector's Open Inference Protocol tensor contract: requests, replies, hostile tensors."""
from __future__ import annotations

import struct
from typing import Any, Callable

import numpy as np
import pytest
from speculative_av.cloud import open_inference_pb2 as oip
from speculative_av.cloud.codec import EncodedFrame
from speculative_av.cloud.oip_codec import (build_infer_request, check_model_metadata,
                                            decode_bytes_elements, encode_bytes_elements,
                                            parse_infer_response, TensorError)

Tensor = oip.ModelInferResponse.InferOutputTensor
BOXES = np.array([[1, 2, 30, 40], [0, 0, 0, 0], [5, 6, 7, 8]], np.float32)
SCORES = np.array([0.9, 0.0, 0.4], np.float32)
LABELS = [b'person', b'', 'caf\u00e9'.encode()]


def reply(boxes: np.ndarray = BOXES, scores: np.ndarray = SCORES,
          labels: list[bytes] = LABELS) -> oip.ModelInferResponse:
    """Return a well-formed raw reply: three rows, the second one padding."""
    n = len(labels)
    return oip.ModelInferResponse(
        model_name='speculative_detector', model_version='1',
        outputs=[Tensor(name='BOXES', datatype='FP32', shape=[1, n, 4]),
                 Tensor(name='SCORES', datatype='FP32', shape=[1, n]),
                 Tensor(name='LABELS', datatype='BYTES', shape=[1, n])],
        raw_output_contents=[boxes.astype('<f4').tobytes(), scores.astype('<f4').tobytes(),
                             encode_bytes_elements(labels)])


def test_request_carries_one_length_prefixed_image_and_the_timeout() -> None:
    frame = EncodedFrame(b'\xff\xd8jpeg', 'jpeg', 640, 480, 320, 240, 1.0)
    request = build_infer_request('speculative_detector', frame, 0.25)
    assert request.model_name == 'speculative_detector'
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ('IMAGE', 'BYTES', [1, 1])]
    assert list(request.raw_input_contents) == [struct.pack('<I', 6) + b'\xff\xd8jpeg']
    assert [t.name for t in request.outputs] == ['BOXES', 'SCORES', 'LABELS']
    assert request.parameters['timeout'].int64_param == 250_000
    assert decode_bytes_elements(request.raw_input_contents[0], 1) == [frame.data]


def test_raw_reply_is_parsed_and_padding_rows_dropped() -> None:
    parsed = parse_infer_response(reply())
    np.testing.assert_array_equal(parsed.boxes, BOXES[[0, 2]])
    np.testing.assert_array_equal(parsed.scores, SCORES[[0, 2]])
    assert parsed.labels == ['person', 'caf\u00e9']


def test_typed_contents_reply_is_parsed_too() -> None:
    response = reply()
    del response.raw_output_contents[:]
    response.outputs[0].contents.fp32_contents.extend(BOXES.ravel().tolist())
    response.outputs[1].contents.fp32_contents.extend(SCORES.tolist())
    response.outputs[2].contents.bytes_contents.extend(LABELS)
    parsed = parse_infer_response(response)
    assert parsed.labels == ['person', 'caf\u00e9'] and parsed.boxes.shape == (2, 4)


def test_empty_reply_has_no_detections() -> None:
    parsed = parse_infer_response(reply(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                        []))
    assert parsed.boxes.shape == (0, 4) and len(parsed.scores) == 0 and parsed.labels == []


def _set(index: int, **fields: Any) -> Callable[[oip.ModelInferResponse], None]:
    def change(response: oip.ModelInferResponse) -> None:
        tensor = response.outputs[index]
        for key, value in fields.items():
            if key == 'shape':
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)
    return change


def _raw(index: int, data: bytes) -> Callable[[oip.ModelInferResponse], None]:
    def change(response: oip.ModelInferResponse) -> None:
        response.raw_output_contents[index] = data
    return change


def _drop_output(index: int) -> Callable[[oip.ModelInferResponse], None]:
    def change(response: oip.ModelInferResponse) -> None:
        del response.outputs[index]
        del response.raw_output_contents[index]
    return change


def _drop_raw(response: oip.ModelInferResponse) -> None:
    del response.raw_output_contents[-1]


def _duplicate(response: oip.ModelInferResponse) -> None:
    response.outputs.add().CopyFrom(response.outputs[0])
    response.raw_output_contents.append(response.raw_output_contents[0])


def _typed_short(response: oip.ModelInferResponse) -> None:
    del response.raw_output_contents[:]
    response.outputs[0].contents.fp32_contents.extend([1.0] * 11)


LABEL_LENGTH = struct.pack('<I', 6)
HOSTILE = {
    'missing BOXES': (_drop_output(0), 'lacks output BOXES'),
    'missing LABELS': (_drop_output(2), 'lacks output LABELS'),
    'BOXES as INT64': (_set(0, datatype='INT64'), 'BOXES is INT64'),
    'LABELS as FP32': (_set(2, datatype='FP32'), 'LABELS is FP32'),
    'untyped SCORES': (_set(1, datatype=''), 'SCORES is untyped'),
    'BOXES rank 2': (_set(0, shape=[3, 4]), 'expected 3 dimensions'),
    'BOXES of 5 coordinates': (_set(0, shape=[1, 3, 5]), r'needs \[1, n, 4\]'),
    'BOXES batch of 2': (_set(0, shape=[2, 3, 4]), r'needs \[1, n, 4\]'),
    'negative dimension': (_set(0, shape=[1, -3, 4]), 'dimensions >= 0'),
    'huge dimension': (_set(0, shape=[1, 2 ** 62, 4]), 'its shape needs'),
    'SCORES shorter': (_set(1, shape=[1, 2]), r'expected \[1, 3\]'),
    'LABELS longer': (_set(2, shape=[1, 4]), r'expected \[1, 3\]'),
    'BOXES bytes short': (_raw(0, BOXES.tobytes()[:-1]), 'holds 47 bytes'),
    'SCORES bytes long': (_raw(1, SCORES.tobytes() + b'\0'), 'holds 13 bytes'),
    'NaN box': (_raw(0, np.full(12, np.nan, np.float32).tobytes()), 'not finite'),
    'infinite score': (_raw(1, np.array([np.inf, 0, 0], np.float32).tobytes()), 'not finite'),
    'label runs past the end': (_raw(2, struct.pack('<I', 1000) + b'person'), 'claims 1000'),
    'label length cut': (_raw(2, b'\x06\x00'), 'ends after 0'),
    'labels too few': (_raw(2, LABEL_LENGTH + b'person'), 'ends after 1'),
    'bytes after labels': (_raw(2, encode_bytes_elements(LABELS) + b'x'), '1 bytes follow'),
    'label not UTF-8': (_raw(2, encode_bytes_elements([b'\xff\xfe', b'', b''])), 'not UTF-8'),
    'label too long': (_raw(2, encode_bytes_elements([b'a' * 300, b'', b''])), 'longer than'),
    'raw for some outputs only': (_drop_raw, '2 raw_output_contents for 3 outputs'),
    'output twice': (_duplicate, 'appears twice'),
    'typed contents short': (_typed_short, 'holds 11 values'),
}


@pytest.mark.parametrize('case', HOSTILE)
def test_hostile_reply_is_a_tensor_error(case: str) -> None:
    change, message = HOSTILE[case]
    response = reply()
    change(response)
    with pytest.raises(TensorError, match=message):
        parse_infer_response(response)


def _metadata(**datatypes: str) -> oip.ModelMetadataResponse:
    tensor = oip.ModelMetadataResponse.TensorMetadata
    types = {'IMAGE': 'BYTES', 'BOXES': 'FP32', 'SCORES': 'FP32', 'LABELS': 'BYTES',
             **datatypes}
    return oip.ModelMetadataResponse(
        name='speculative_detector', versions=['1'],
        inputs=[tensor(name='IMAGE', datatype=types['IMAGE'], shape=[-1, 1])],
        outputs=[tensor(name=n, datatype=types[n], shape=s) for n, s in (
            ('BOXES', [-1, -1, 4]), ('SCORES', [-1, -1]), ('LABELS', [-1, -1]))
            if types[n]])


def test_model_metadata_must_declare_the_contract() -> None:
    check_model_metadata(_metadata())
    with pytest.raises(TensorError, match='input IMAGE as UINT8'):
        check_model_metadata(_metadata(IMAGE='UINT8'))
    with pytest.raises(TensorError, match='output LABELS as INT64'):
        check_model_metadata(_metadata(LABELS='INT64'))
    with pytest.raises(TensorError, match='output SCORES as missing'):
        check_model_metadata(_metadata(SCORES=''))
    wide = _metadata()
    wide.outputs[0].shape[-1] = 5
    with pytest.raises(TensorError, match='BOXES of shape'):
        check_model_metadata(wide)
