"""
The shared decode limit, seen from both sides: the node's image conversion and the server's codec.

Images whose headers claim more than MAX_PIXELS must be refused from the header alone, before
any pixel is decoded; every decoder failure must surface as the caller's error type.
"""
from __future__ import annotations

import time
import tracemalloc

import cv2
from hostile_images import jpeg_claiming, png_claiming, progressive_jpeg
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.core import image_decoding
from speculative_av.core.image_decoding import (declared_size, decode_rgb, ImageDecodeError,
                                                MAX_ASPECT_RATIO, MAX_JPEG_SCANS, MAX_PIXELS,
                                                short_repr)
from speculative_av.ros.image_conversion import (compressed_msg_to_rgb, image_msg_to_rgb,
                                                 ImageConversionError)

LIMIT_SIDE = 8192
HUGE = (30000, 30000)


def compressed(fmt: str, data: bytes) -> CompressedImage:
    """Build a CompressedImage."""
    msg = CompressedImage()
    msg.format, msg.data = fmt, data
    return msg


def request(data: bytes, **fields: object) -> detection_pb2.DetectRequest:
    """Build a jpeg DetectRequest that is valid apart from what ``fields`` change."""
    values: dict = {'image': data, 'image_format': 'jpeg', 'original_width': 640,
                    'original_height': 480, 'frame_id': 'cam', 'stamp_ns': 1,
                    'deadline_unix_ns': 0}
    values.update(fields)
    return detection_pb2.DetectRequest(**values)


def test_the_limit_is_8192_squared_and_both_sides_use_it() -> None:
    assert MAX_PIXELS == LIMIT_SIDE * LIMIT_SIDE and MAX_ASPECT_RATIO == 64
    assert codec.check_size is image_decoding.check_size
    assert codec.decode_rgb is image_decoding.decode_rgb


@pytest.mark.parametrize('make, image_format', [(jpeg_claiming, 'jpeg'), (png_claiming, 'png')])
def test_declared_size_comes_from_the_header(make, image_format: str) -> None:
    assert declared_size(make(30000, 20000), image_format) == (30000, 20000)
    assert declared_size(memoryview(make(7, 5)), image_format) == (7, 5)


@pytest.mark.parametrize('width, height, error', [
    (LIMIT_SIDE, LIMIT_SIDE, None), (LIMIT_SIDE + 1, LIMIT_SIDE, 'claims 8193x8192 pixels'),
    (65536, 1024, None), (65536, 1025, 'claims'), (1, 1, None),
    (64, 1, None), (1, 65, 'is 1x65, more elongated than 64:1'), (6400, 99, 'elongated'),
    (0, 5, r'zero size \(0x5\)'), (5, 0, 'zero size')])
def test_check_size_boundaries(width: int, height: int, error: str | None) -> None:
    if error is None:
        image_decoding.check_size(width, height, 'x')
    else:
        with pytest.raises(ImageDecodeError, match=error):
            image_decoding.check_size(width, height, 'x')


def test_an_elongated_image_is_refused_on_both_sides() -> None:
    """A 1x8000 image makes torchvision's R-CNN transform raise; neither side decodes one."""
    data = codec.encode_frame(np.zeros((1, 8000, 3), np.uint8), image_format='png').data
    with pytest.raises(ImageConversionError, match='png header is 8000x1, more elongated'):
        compressed_msg_to_rgb(compressed('png', data))
    with pytest.raises(ValueError, match='png header is 8000x1, more elongated'):
        codec.decode_request_image(request(data, image_format='png'))
    with pytest.raises(ValueError, match='original_width/height is 8000x1, more elongated'):
        codec.decode_request_image(request(b'x', original_width=8000, original_height=1))


@pytest.mark.parametrize('make, image_format', [(jpeg_claiming, 'jpeg'), (png_claiming, 'png')])
def test_oversized_header_is_refused_before_decoding(make, image_format: str) -> None:
    data = make(*HUGE)
    with pytest.raises(ImageDecodeError, match=r'header claims 30000x30000 pixels'):
        decode_rgb(data, image_format)
    with pytest.raises(ImageConversionError, match=r'header claims 30000x30000 pixels'):
        compressed_msg_to_rgb(compressed(f'rgb8; {image_format} compressed bgr8', data))
    with pytest.raises(ValueError, match=r'header claims 30000x30000 pixels'):
        codec.decode_request_image(request(data, image_format=image_format))


def test_jpeg_bomb_costs_the_node_no_decoding() -> None:
    """The issue's 631-byte jpeg claiming 30000x30000 took 5.6 s and 2.5 GB; now a header read."""
    msg = compressed('jpeg', jpeg_claiming(*HUGE))
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageConversionError, match='claims'):
        compressed_msg_to_rgb(msg)
    elapsed_s = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
    assert elapsed_s < 0.5  # generous for a loaded CI machine; decoding took 5.6 s


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    """Each repeated progressive scan costs a full pass over the image for a few bytes."""
    assert MAX_JPEG_SCANS == 16
    assert decode_rgb(progressive_jpeg(), 'jpeg').shape == (64, 64, 3)
    with pytest.raises(ImageDecodeError, match='Inconsistent progression'):
        decode_rgb(progressive_jpeg(6), 'jpeg')  # 16 scans: decoded, then found invalid
    data = progressive_jpeg(7)
    with pytest.raises(ImageConversionError, match='jpeg has 17 scans, more than the 16'):
        compressed_msg_to_rgb(compressed('jpeg', data))
    with pytest.raises(ValueError, match='jpeg has 17 scans'):
        codec.decode_request_image(request(data))


def test_scan_markers_in_metadata_are_not_counted() -> None:
    data = progressive_jpeg()
    app15 = b'\xff\xef' + (2 + 200).to_bytes(2, 'big') + b'\xff\xda' * 100
    assert decode_rgb(data[:2] + app15 + data[2:], 'jpeg').shape == (64, 64, 3)


def test_scans_are_counted_past_fill_bytes_and_long_metadata_segments() -> None:
    """Header segments are skipped by their (two-byte) lengths wherever they are."""
    app15 = b'\xff\xef' + (2 + 300).to_bytes(2, 'big') + b'\xff\xda' * 150

    def hide(data: bytes) -> bytes:
        """Add a fill byte before the first marker and app15 just before the first scan."""
        first_scan = data.index(b'\xff\xda')
        return data[:2] + b'\xff' + data[2:first_scan] + app15 + data[first_scan:]

    assert decode_rgb(hide(progressive_jpeg()), 'jpeg').shape == (64, 64, 3)  # 10 scans
    with pytest.raises(ImageDecodeError, match='jpeg has 17 scans, more than the 16 allowed$'):
        decode_rgb(hide(progressive_jpeg(7)), 'jpeg')
    gray = cv2.imencode('.jpg', np.zeros((16, 16), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_decoding._jpeg_scans(gray[1].tobytes()) == 6


@pytest.mark.parametrize('data', [b'\xff\xd8\xff\xe0\xff\xda',
                                  b'\xff\xd8\xff\xe0\x00\x04\xff\xda'])
def test_a_header_cut_short_counts_no_scans(data: bytes) -> None:
    """A segment at the very end is skipped by its length, never read past the data's end."""
    assert image_decoding._jpeg_scans(data) == 0


def test_png_header_needs_the_ihdr_chunk_and_24_bytes() -> None:
    header = png_claiming(3_000_000_000, 2)[:24]
    assert declared_size(header, 'png') == (3_000_000_000, 2)  # unsigned, as png defines it
    with pytest.raises(ImageDecodeError, match='start with the png signature and IHDR chunk$'):
        declared_size(header[:23], 'png')
    with pytest.raises(ImageDecodeError, match='png signature and IHDR chunk'):
        declared_size(header[:12] + b'IDAT' + header[16:], 'png')


def test_long_values_are_cut_in_error_messages() -> None:
    assert short_repr('x' * 40) == repr('x' * 40)
    assert short_repr('x' * 41) == repr('x' * 40) + '... (41 chars)'
    with pytest.raises(ImageDecodeError, match=r"got 'gif'$"):
        decode_rgb(b'GIF89a', 'gif')


def test_a_truncated_image_within_the_limit_is_a_decode_error() -> None:
    with pytest.raises(ImageConversionError, match=r'cannot decode \d+ bytes as jpeg'):
        compressed_msg_to_rgb(compressed('jpeg', jpeg_claiming(64, 48)))
    with pytest.raises(ImageConversionError, match=r'cannot decode \d+ bytes as png'):
        compressed_msg_to_rgb(compressed('png', png_claiming(64, 48)))


@pytest.mark.parametrize('fmt', ['png', 'rgb8; png compressed bgr8', 'jpeg',
                                 'rgb8; jpeg compressed bgr8'])
@pytest.mark.parametrize('data', [b'', b'\x89PNG\r\n\x1a\n', b'\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0',
                                  b'\xff\xd8', b'\0' * 64])
def test_empty_or_junk_compressed_data_is_a_conversion_error(fmt: str, data: bytes) -> None:
    """Issue 7: empty png data raised cv2.error in the node's worker."""
    with pytest.raises(ImageConversionError, match='cannot decode'):
        compressed_msg_to_rgb(compressed(fmt, data))


def test_png_signature_is_required_so_opencv_uses_no_other_decoder() -> None:
    bmp = cv2.imencode('.bmp', np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    assert cv2.imdecode(np.frombuffer(bmp, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageConversionError, match='png signature'):
        compressed_msg_to_rgb(compressed('png', bmp))


def test_png_that_opencv_rejects_is_a_conversion_error() -> None:
    data = bytearray(cv2.imencode('.png', np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    data[-20:] = bytes(20)  # damage the image data and the IEND chunk
    with pytest.raises(ImageConversionError,
                       match=r'cannot decode \d+ bytes as png: OpenCV could not decode it'):
        compressed_msg_to_rgb(compressed('png', bytes(data)))


def test_raw_image_claiming_a_huge_size_is_refused_without_allocating() -> None:
    msg = Image(height=LIMIT_SIDE, width=LIMIT_SIDE, encoding='rgb8', step=3 * LIMIT_SIDE)
    msg.data = bytes(10)
    big = Image(height=60000, width=60000, encoding='rgb16', step=6 * 60000)
    big.data = bytes(10)
    tracemalloc.start()
    with pytest.raises(ImageConversionError, match=r'has 10 bytes, step 24576 x height 8192'):
        image_msg_to_rgb(msg)
    with pytest.raises(ImageConversionError, match=r'claims 60000x60000 pixels'):
        image_msg_to_rgb(big)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 10


@pytest.mark.parametrize('change, match', [
    ({'original_width': 0}, r'original_width/height has zero size \(0x480\)'),
    ({'original_height': 0}, r'zero size \(640x0\)'),
    ({'original_width': 60000, 'original_height': 60000}, r'claims 60000x60000 pixels'),
    ({'stamp_ns': -1}, r'stamp_ns \(-1\) and deadline_unix_ns \(0\) must not be negative'),
    ({'deadline_unix_ns': -5}, r'must not be negative'),
    ({'frame_id': 'f' * 257}, r'frame_id has 257 characters, more than 256'),
    ({'image_format': 'gif' * 1000}, r"got 'gifgif.*\.\.\. \(3000 chars\)$"),
    ({'image': b''}, r'no image bytes'),
])
def test_request_fields_are_checked(change: dict, match: str) -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)
    good = request(codec.encode_frame(rgb).data)
    assert codec.decode_request_image(good).shape == (48, 64, 3)
    with pytest.raises(ValueError, match=match):
        codec.decode_request_image(request(good.image, **change))
