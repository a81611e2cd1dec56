"""
Property-based tests (hypothesis) of image conversion and the cloud wire format.

Whatever a camera driver or a client sends, conversion either returns an (H, W, 3) uint8 RGB
array or raises the module's error; well-formed images round-trip. Examples are few and
derandomized, so the suite stays fast and every run checks the same cases.
"""
from __future__ import annotations

import cv2
from hostile_images import jpeg_claiming, png_claiming, progressive_jpeg
from hypothesis import given, HealthCheck, settings, strategies as st
from hypothesis.extra.numpy import arrays
import numpy as np
import numpy.typing as npt
import pytest
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.core.detections import Detections
from speculative_av.ros.image_conversion import (
    compressed_msg_to_rgb, image_msg_to_rgb, ImageConversionError, rgb_to_compressed_msg,
    rgb_to_image_msg, SUPPORTED_ENCODINGS)
from test_image_conversion import make_image, PACKED, PACKED_16BIT, to_16bit

U8 = npt.NDArray[np.uint8]
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FORMAT_STRINGS = ['jpeg', 'png', 'jpg', 'rgb8; jpeg compressed bgr8',
                  'rgb8; png compressed bgr8', 'bgr8; png compressed bgr8', '',
                  '16UC1; compressedDepth png', 'tiff']


def rgb_images(max_side: int = 24) -> st.SearchStrategy[U8]:
    """Return RGB images of 1..max_side pixels a side, any content."""
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side), st.just(3))
    return arrays(np.uint8, shapes)


def assert_rgb(out: object, height: int | None = None, width: int | None = None) -> None:
    """Check ``out`` is an (H, W, 3) uint8 array, of the given size if one is given."""
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.ndim == 3 and out.shape[2] == 3 and 0 not in out.shape
    assert height is None or out.shape[:2] == (height, width)


@PROPERTY
@given(rgb=rgb_images(), encoding=st.sampled_from(['rgb8', 'bgr8', 'mono8']),
       pad=st.integers(0, 7), fill=st.integers(0, 255))
def test_rgb_to_image_msg_round_trips_with_any_padding(rgb: U8, encoding: str, pad: int,
                                                       fill: int) -> None:
    msg = rgb_to_image_msg(rgb, encoding=encoding)
    height, step = msg.height, msg.step
    rows = np.full((height, step + pad), fill, np.uint8)
    rows[:, :step] = np.frombuffer(msg.data, np.uint8).reshape(height, step)
    msg.step, msg.data = step + pad, rows.tobytes()
    expected = rgb
    if encoding == 'mono8':
        expected = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, np.newaxis], 3, axis=2)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), expected)


@PROPERTY
@given(rgb=rgb_images(), encoding=st.sampled_from(sorted(PACKED) + sorted(PACKED_16BIT)),
       pad=st.integers(0, 7), bigendian=st.integers(0, 1))
def test_packed_encodings_round_trip_with_any_padding(rgb: U8, encoding: str, pad: int,
                                                      bigendian: int) -> None:
    packers = PACKED_16BIT if encoding in PACKED_16BIT else PACKED
    pack, expected = packers[encoding]
    pixels = np.ascontiguousarray(pack(rgb))
    if encoding in PACKED_16BIT:
        pixels = to_16bit(pixels, bool(bigendian))
    out = image_msg_to_rgb(make_image(encoding, pixels, pad, bigendian))
    np.testing.assert_array_equal(out, expected(rgb))


def image_messages() -> st.SearchStrategy[Image]:
    """Return Image messages with arbitrary, mostly inconsistent fields."""
    sizes = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
    return st.builds(
        Image, height=sizes, width=sizes, step=st.one_of(st.integers(0, 200), sizes),
        is_bigendian=st.integers(0, 1),
        encoding=st.one_of(st.sampled_from(sorted(SUPPORTED_ENCODINGS)), st.text(max_size=12)),
        data=st.binary(max_size=4096))


@PROPERTY
@given(msg=image_messages())
def test_any_image_message_converts_or_raises_conversion_error(msg: Image) -> None:
    try:
        out = image_msg_to_rgb(msg)
    except ImageConversionError:
        return
    assert_rgb(out, msg.height, msg.width)


@pytest.mark.parametrize('encoding', sorted(SUPPORTED_ENCODINGS))
def test_every_encoding_survives_arbitrary_bytes(encoding: str) -> None:
    """Exercise each encoding's decoder (not only its size checks) on consistent junk."""
    @PROPERTY
    @given(height=st.integers(1, 12), width=st.integers(1, 12), pad=st.integers(0, 5),
           seed=st.integers(0, 2**32 - 1), bigendian=st.integers(0, 1))
    def check(height: int, width: int, pad: int, seed: int, bigendian: int) -> None:
        step = 8 * width + pad  # at least the widest pixel (rgba16) needs
        data = np.random.default_rng(seed).integers(0, 256, step * height, np.uint8)
        msg = Image(height=height, width=width, step=step, encoding=encoding,
                    is_bigendian=bigendian)
        msg.data = data.tobytes()
        try:
            out = image_msg_to_rgb(msg)
        except ImageConversionError:
            return
        assert_rgb(out, height, width)
    check()


def compressed_data() -> st.SearchStrategy[bytes]:
    """Return arbitrary bytes, valid images, damaged images, lying headers, many scans."""
    valid = st.builds(lambda rgb, fmt: bytes(rgb_to_compressed_msg(rgb, fmt=fmt).data),
                      rgb_images(12), st.sampled_from(['jpeg', 'png']))
    damaged = st.tuples(valid, st.integers(0, 2000), st.binary(min_size=1, max_size=6)).map(
        lambda v: v[0][:v[1]] + v[2] + v[0][v[1] + len(v[2]):])
    truncated = st.tuples(valid, st.integers(0, 2000)).map(lambda v: v[0][:v[1]])
    lying = st.one_of(st.builds(jpeg_claiming, st.integers(1, 65535), st.integers(1, 65535)),
                      st.builds(png_claiming, st.integers(0, 2**32 - 1),
                                st.integers(0, 2**32 - 1)),
                      st.builds(progressive_jpeg, st.integers(0, 30), st.integers(1, 16)))
    return st.one_of(st.binary(max_size=256), valid, damaged, truncated, lying)


@PROPERTY
@given(fmt=st.one_of(st.sampled_from(FORMAT_STRINGS), st.text(max_size=30)),
       data=compressed_data())
def test_any_compressed_message_converts_or_raises_conversion_error(fmt: str,
                                                                    data: bytes) -> None:
    msg = CompressedImage(format=fmt)
    msg.data = data
    try:
        out = compressed_msg_to_rgb(msg)
    except ImageConversionError:
        return
    assert_rgb(out)


@PROPERTY
@given(rgb=rgb_images(40), image_format=st.sampled_from(['jpeg', 'png']),
       quality=st.integers(1, 100), max_side=st.integers(0, 48))
def test_encode_decode_round_trip_shapes(rgb: U8, image_format: str, quality: int,
                                         max_side: int) -> None:
    frame = codec.encode_frame(rgb, jpeg_quality=quality, max_image_side=max_side,
                               image_format=image_format)
    height, width = rgb.shape[:2]
    assert (frame.original_width, frame.original_height) == (width, height)
    if 0 < max_side < max(height, width):
        assert max(frame.width, frame.height) <= max_side
    else:
        assert (frame.width, frame.height) == (width, height)
    decoded = codec.decode_request_image(codec.build_request(frame, 'cam', 0, 0))
    assert_rgb(decoded, frame.height, frame.width)
    if image_format == 'png' and (frame.width, frame.height) == (width, height):
        np.testing.assert_array_equal(decoded, rgb)


def detect_requests() -> st.SearchStrategy[detection_pb2.DetectRequest]:
    """Return Detect requests with arbitrary field values."""
    uint32 = st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1))
    int64 = st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1))
    return st.builds(
        detection_pb2.DetectRequest, image=compressed_data(),
        image_format=st.one_of(st.sampled_from(['jpeg', 'png']), st.text(max_size=8)),
        original_width=uint32, original_height=uint32, frame_id=st.text(max_size=300),
        stamp_ns=int64, deadline_unix_ns=int64)


@PROPERTY
@given(request=detect_requests())
def test_any_request_decodes_or_raises_value_error(
        request: detection_pb2.DetectRequest) -> None:
    try:
        out = codec.decode_request_image(request)
    except ValueError:
        return
    assert_rgb(out)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(rows=st.lists(st.tuples(st.tuples(finite32, finite32, finite32, finite32), finite32,
                               st.integers(-2**31, 2**31 - 1)), max_size=20))
def test_detections_round_trip_through_a_response(rows: list) -> None:
    detections = Detections(np.array([r[0] for r in rows], np.float32),
                            np.array([r[1] for r in rows], np.float32),
                            np.array([r[2] for r in rows], np.int64))
    response = codec.detections_to_response(
        detections, model_name='m', model_version='v', server_receive_unix_ns=1,
        queue_ms=0.0, decode_ms=0.0, inference_ms=0.0)
    back = codec.response_to_detections(
        detection_pb2.DetectResponse.FromString(response.SerializeToString()))
    np.testing.assert_array_equal(back.boxes, detections.boxes)
    np.testing.assert_array_equal(back.scores, detections.scores)
    np.testing.assert_array_equal(back.labels, detections.labels)
