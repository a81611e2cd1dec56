"""
Unit tests for speculative_av.ros.image_conversion.

Every input message is built byte by byte with numpy, independently of the module, so a wrong
channel order, byte order, Bayer mapping or padding rule shows up as wrong pixels.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from sensor_msgs.msg import CompressedImage, Image
from speculative_av.ros.image_conversion import (
    compressed_msg_to_rgb, image_msg_to_rgb, ImageConversionError, rgb_to_compressed_msg,
    rgb_to_image_msg, SUPPORTED_ENCODINGS)
from std_msgs.msg import Header

U8 = npt.NDArray[np.uint8]
PADDINGS = [0, 5]  # 5: odd, so 16-bit rows are also misaligned
FILL = 0xAB  # padding bytes; any that leak into the output show up as wrong pixels
# Distinct colours with R != B so swapped channels cannot pass.
COLORS = [(200, 100, 30), (20, 180, 90), (60, 40, 220), (240, 230, 10)]


def random_rgb(height: int = 6, width: int = 10, seed: int = 0) -> U8:
    """Return a reproducible random RGB image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def quadrants(size: int = 16) -> U8:
    """Return a (2*size, 2*size) RGB image of four flat COLORS quadrants."""
    rgb = np.empty((2 * size, 2 * size, 3), np.uint8)
    for index, color in enumerate(COLORS):
        row, col = divmod(index, 2)
        rgb[row * size:(row + 1) * size, col * size:(col + 1) * size] = color
    return rgb


def interiors(rgb: U8, margin: int, size: int = 16) -> U8:
    """Return the pixels of each quadrant at least ``margin`` pixels from its edges."""
    return np.stack([rgb[row * size + margin:(row + 1) * size - margin,
                         col * size + margin:(col + 1) * size - margin]
                     for row, col in ((0, 0), (0, 1), (1, 0), (1, 1))])


def make_image(encoding: str, pixels: U8, pad: int = 0, bigendian: int = 0) -> Image:
    """Build an Image from (H, W, bytes per pixel) uint8 pixel bytes plus ``pad`` bytes a row."""
    height, width, bytes_per_pixel = pixels.shape
    row_bytes = width * bytes_per_pixel
    rows = np.full((height, row_bytes + pad), FILL, np.uint8)
    rows[:, :row_bytes] = pixels.reshape(height, row_bytes)
    msg = Image()
    msg.height, msg.width, msg.encoding = height, width, encoding
    msg.is_bigendian, msg.step = bigendian, row_bytes + pad
    msg.data = rows.tobytes()
    return msg


def to_16bit(values8: U8, bigendian: bool) -> U8:
    """Return 16-bit pixel bytes whose high byte is ``values8`` and low byte is noise."""
    noise = np.random.default_rng(1).integers(0, 256, values8.shape, dtype=np.uint16)
    values16 = values8.astype(np.uint16) << 8 | noise
    ordered = values16.astype('>u2' if bigendian else '<u2')
    return ordered.view(np.uint8).reshape(*values8.shape[:2], -1)


def alpha(rgb: U8) -> U8:
    """Return a random alpha channel shaped like one channel of ``rgb``."""
    return random_rgb(*rgb.shape[:2], seed=2)[:, :, :1]


# encoding -> (pixel bytes made from an RGB image, the RGB the module must return)
PACKED: dict[str, tuple] = {
    'rgb8': (lambda rgb: rgb, lambda rgb: rgb),
    'bgr8': (lambda rgb: rgb[:, :, ::-1], lambda rgb: rgb),
    'rgba8': (lambda rgb: np.dstack([rgb, alpha(rgb)]), lambda rgb: rgb),
    'bgra8': (lambda rgb: np.dstack([rgb[:, :, ::-1], alpha(rgb)]), lambda rgb: rgb),
    'mono8': (lambda rgb: rgb[:, :, :1], lambda rgb: np.repeat(rgb[:, :, :1], 3, axis=2)),
}
PACKED_16BIT: dict[str, tuple] = {
    'rgb16': (lambda rgb: rgb, lambda rgb: rgb),
    'bgr16': (lambda rgb: rgb[:, :, ::-1], lambda rgb: rgb),
    'rgba16': (lambda rgb: np.dstack([rgb, alpha(rgb)]), lambda rgb: rgb),
    'bgra16': (lambda rgb: np.dstack([rgb[:, :, ::-1], alpha(rgb)]), lambda rgb: rgb),
    'mono16': (lambda rgb: rgb[:, :, :1], lambda rgb: np.repeat(rgb[:, :, :1], 3, axis=2)),
}
# Bayer encoding -> the filter colour at (0, 0), (0, 1), (1, 0), (1, 1).
BAYER = {
    'bayer_rggb8': 'rggb', 'bayer_bggr8': 'bggr', 'bayer_gbrg8': 'gbrg', 'bayer_grbg8': 'grbg',
}
UYVY = ['yuv422', 'uyvy']
YUYV = ['yuv422_yuy2', 'yuyv']


def test_every_supported_encoding_is_tested() -> None:
    assert set(PACKED) | set(PACKED_16BIT) | set(BAYER) | set(UYVY) | set(YUYV) == \
        SUPPORTED_ENCODINGS


@pytest.mark.parametrize('pad', PADDINGS)
@pytest.mark.parametrize('encoding', sorted(PACKED))
def test_packed_8bit_round_trip(encoding: str, pad: int) -> None:
    rgb = random_rgb()
    pack, expected = PACKED[encoding]
    out = image_msg_to_rgb(make_image(encoding, np.ascontiguousarray(pack(rgb)), pad))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, expected(rgb))


@pytest.mark.parametrize('bigendian', [0, 1])
@pytest.mark.parametrize('pad', PADDINGS)
@pytest.mark.parametrize('encoding', sorted(PACKED_16BIT))
def test_packed_16bit_keeps_high_byte(encoding: str, pad: int, bigendian: int) -> None:
    rgb = random_rgb()
    pack, expected = PACKED_16BIT[encoding]
    pixels = to_16bit(np.ascontiguousarray(pack(rgb)), bool(bigendian))
    out = image_msg_to_rgb(make_image(encoding, pixels, pad, bigendian))
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected(rgb))


@pytest.mark.parametrize('pad', PADDINGS)
def test_rgb8_is_a_view_of_the_message_buffer(pad: int) -> None:
    rgb = random_rgb()
    msg = make_image('rgb8', rgb, pad)
    out = image_msg_to_rgb(msg)
    buffer = np.frombuffer(msg.data, np.uint8)
    assert np.shares_memory(out, buffer)
    assert not out.flags.owndata
    assert out.strides[0] == msg.step
    msg.data[0] = 255 - msg.data[0]  # the same object on every access, so this writes through
    assert out[0, 0, 0] == 255 - rgb[0, 0, 0]


def test_rgb8_bytes_data_is_a_read_only_view() -> None:
    rgb = random_rgb()
    data = np.pad(rgb.reshape(6, 30), ((0, 0), (0, 2))).tobytes()
    msg = SimpleNamespace(height=6, width=10, step=32, encoding='rgb8', is_bigendian=0, data=data)
    out = image_msg_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(data, np.uint8))
    assert not out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


def mosaic(rgb: U8, pattern: str) -> U8:
    """Sample ``rgb`` through a Bayer colour filter, returning (H, W, 1) raw bytes."""
    raw = np.empty(rgb.shape[:2], np.uint8)
    for index, letter in enumerate(pattern):
        row, col = divmod(index, 2)
        raw[row::2, col::2] = rgb[row::2, col::2, 'rgb'.index(letter)]
    return raw[:, :, np.newaxis]


@pytest.mark.parametrize('pad', PADDINGS)
@pytest.mark.parametrize('encoding', sorted(BAYER))
def test_bayer_demosaic_colors(encoding: str, pad: int) -> None:
    rgb = quadrants()
    out = image_msg_to_rgb(make_image(encoding, mosaic(rgb, BAYER[encoding]), pad))
    assert out.shape == rgb.shape
    # Demosaicing blends colours near the quadrant edges; the interiors must be exact.
    np.testing.assert_allclose(interiors(out, margin=3), interiors(rgb, margin=3), atol=1)


def bt601_yuv(rgb: U8) -> tuple[U8, U8, U8]:
    """Return limited-range BT.601 Y per pixel and U, V averaged over each horizontal pair."""
    r, g, b = (rgb[:, :, i].astype(np.float64) for i in range(3))
    y = 16 + (65.738 * r + 129.057 * g + 25.064 * b) / 256
    u = 128 + (-37.945 * r - 74.494 * g + 112.439 * b) / 256
    v = 128 + (112.439 * r - 94.154 * g - 18.285 * b) / 256
    pairs = u.shape[1] // 2
    u = u.reshape(-1, pairs, 2).mean(axis=2)
    v = v.reshape(-1, pairs, 2).mean(axis=2)
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


def pack_422(rgb: U8, order: str) -> U8:
    """Pack ``rgb`` into 4:2:2 bytes, 'uyvy' or 'yuyv', as (H, W, 2)."""
    y, u, v = bt601_yuv(rgb)
    planes = {'y0': y[:, 0::2], 'y1': y[:, 1::2], 'u': u, 'v': v}
    names = ['u', 'y0', 'v', 'y1'] if order == 'uyvy' else ['y0', 'u', 'y1', 'v']
    quads = np.stack([planes[name] for name in names], axis=2)
    return quads.reshape(rgb.shape[0], rgb.shape[1], 2)


@pytest.mark.parametrize('pad', PADDINGS)
@pytest.mark.parametrize('encoding', UYVY + YUYV)
def test_yuv422_decodes_known_colors(encoding: str, pad: int) -> None:
    rgb = quadrants(size=8)
    order = 'uyvy' if encoding in UYVY else 'yuyv'
    out = image_msg_to_rgb(make_image(encoding, pack_422(rgb, order), pad))
    assert np.abs(out.astype(int) - rgb).max() <= 3


@pytest.mark.parametrize('encoding', UYVY + YUYV)
def test_yuv422_matches_opencv(encoding: str) -> None:
    rgb = np.repeat(random_rgb(12, 8), 2, axis=1)  # pixel pairs share a colour, hence chroma
    code = cv2.COLOR_RGB2YUV_UYVY if encoding in UYVY else cv2.COLOR_RGB2YUV_YUYV
    order = 'uyvy' if encoding in UYVY else 'yuyv'
    from_cv2 = cv2.cvtColor(rgb, code)
    assert np.abs(from_cv2.astype(int) - pack_422(rgb, order)).max() <= 1
    out = image_msg_to_rgb(make_image(encoding, from_cv2))
    assert np.abs(out.astype(int) - rgb).max() <= 3


def test_error_is_a_value_error() -> None:
    assert issubclass(ImageConversionError, ValueError)


@pytest.mark.parametrize('change, match', [
    ({'encoding': '32FC1'}, "unsupported image encoding '32FC1'; supported: bayer_bggr8"),
    ({'data': bytes(179)}, r'has 179 bytes, step 30 x height 6 needs 180'),
    ({'step': 29}, r'step 29 is smaller than width 10 x 3 bytes per pixel = 30'),
    ({'width': 0}, r'zero size \(0x6\)'),
    ({'height': 0}, r'zero size \(10x0\)'),
    ({'encoding': 'yuv422', 'width': 9, 'step': 18}, r'width 9 is odd'),
    ({'encoding': 'bayer_rggb8', 'height': 1, 'step': 10}, r'demosaicing needs at least 2x2'),
])
def test_bad_image_raises(change: dict, match: str) -> None:
    msg = make_image('rgb8', random_rgb())
    for field, value in change.items():
        setattr(msg, field, value)
    with pytest.raises(ImageConversionError, match=match):
        image_msg_to_rgb(msg)


def compressed(fmt: str, data: bytes) -> CompressedImage:
    """Build a CompressedImage."""
    msg = CompressedImage()
    msg.format, msg.data = fmt, data
    return msg


def smooth_rgb() -> U8:
    """Return a 32x48 image of gentle gradients, which jpeg keeps within a few levels."""
    rows, cols = np.mgrid[0:32, 0:48]
    return np.stack([rows * 6, cols * 4, 255 - rows * 3 - cols * 2], axis=2).astype(np.uint8)


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_compressed_round_trip(fmt: str) -> None:
    rgb = smooth_rgb()
    header = Header(frame_id='camera')
    msg = rgb_to_compressed_msg(rgb, header, fmt=fmt, quality=95)
    assert msg.format == f'rgb8; {fmt} compressed bgr8'
    assert msg.header.frame_id == 'camera'
    out = compressed_msg_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    if fmt == 'png':
        np.testing.assert_array_equal(out, rgb)
    else:
        assert np.abs(out.astype(int) - rgb).mean() < 2


@pytest.mark.parametrize('fmt, ext, tolerance', [
    ('jpeg', '.jpg', 4), ('rgb8; jpeg compressed bgr8', '.jpg', 4), ('', '.jpg', 4),
    ('png', '.png', 0), ('bgr8; png compressed bgr8', '.png', 0), ('', '.png', 0),
])
def test_decodes_opencv_encoded_data(fmt: str, ext: str, tolerance: int) -> None:
    rgb = quadrants()  # as image_transport would: OpenCV encodes a BGR image
    data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    out = compressed_msg_to_rgb(compressed(fmt, data))
    assert np.abs(interiors(out, margin=2).astype(int) - interiors(rgb, margin=2)).max() <= \
        tolerance  # jpeg chroma bleeds across the quadrant edges


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_decodes_grayscale_to_three_channels(ext: str) -> None:
    gray = np.full((16, 16), 90, np.uint8)
    out = compressed_msg_to_rgb(compressed('', cv2.imencode(ext, gray)[1].tobytes()))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - 90).max() <= 1


@pytest.mark.parametrize('fmt, data, match', [
    ('jpeg', b'\xff\xd8 not really a jpeg', r'cannot decode 20 bytes as jpeg'),
    ('png', b'\x89PNG not really a png', r'cannot decode 21 bytes as png'),
    ('tiff', b'II*\x00', r"unsupported compressed image format 'tiff'"),
    ('16UC1; compressedDepth png', b'\x89PNG', r'compressed depth images are not supported'),
])
def test_bad_compressed_raises(fmt: str, data: bytes, match: str) -> None:
    with pytest.raises(ImageConversionError, match=match):
        compressed_msg_to_rgb(compressed(fmt, data))


@pytest.mark.parametrize('encoding, channels', [('rgb8', 3), ('bgr8', 3), ('mono8', 1)])
def test_rgb_to_image_msg(encoding: str, channels: int) -> None:
    rgb = random_rgb()
    header = Header(frame_id='camera')
    header.stamp.sec = 7
    msg = rgb_to_image_msg(rgb, header, encoding)
    assert (msg.height, msg.width, msg.encoding) == (6, 10, encoding)
    assert msg.step == 10 * channels and msg.is_bigendian == 0
    assert memoryview(msg.data).nbytes == msg.step * msg.height  # bytes-like
    assert msg.header.frame_id == 'camera' and msg.header.stamp.sec == 7
    expected = rgb
    if encoding == 'mono8':
        expected = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, np.newaxis], 3, axis=2)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), expected)


def test_rgb_to_image_msg_copies_a_strided_view() -> None:
    rgb = random_rgb()
    msg = rgb_to_image_msg(rgb[:, ::-1])
    assert msg.header == Header()
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb[:, ::-1])


@pytest.mark.parametrize('call, match', [
    (lambda: rgb_to_image_msg(random_rgb(), encoding='yuv422'), r"cannot encode to 'yuv422'"),
    (lambda: rgb_to_image_msg(random_rgb()[:, :, :2]), r'got shape \(6, 10, 2\) dtype uint8'),
    (lambda: rgb_to_image_msg(random_rgb().astype(np.float32)), r'dtype float32'),
    (lambda: rgb_to_image_msg(np.zeros((0, 4, 3), np.uint8)), r'non-empty'),
    (lambda: rgb_to_compressed_msg(random_rgb(), fmt='webp'), r'unsupported compressed format'),
    (lambda: rgb_to_compressed_msg(random_rgb(), quality=0), r'quality must be in 1..100'),
])
def test_bad_array_raises(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ImageConversionError, match=match):
        call()
