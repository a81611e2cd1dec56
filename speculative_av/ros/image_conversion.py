"""
Convert between ROS image messages and (H, W, 3) uint8 RGB numpy arrays.

This is the part of cv_bridge the project needs (cv_bridge itself is not installable here).
Every detector takes RGB, so every decoder returns RGB. Decoding avoids copies where it can:
an ``rgb8`` image comes back as a strided view of the message buffer, other encodings are
converted in one OpenCV call straight from such a view. Encoding assigns ``bytes`` to
``msg.data`` because rclpy converts a numpy array element by element (~450 ms at 1080p).
"""
from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
from sensor_msgs.msg import CompressedImage, Image
import simplejpeg
from speculative_av.core.image_decoding import (check_size, decode_rgb, ImageDecodeError,
                                                JPEG_SIGNATURE, PNG_SIGNATURE, short_repr)
from std_msgs.msg import Header

RgbArray = npt.NDArray[np.uint8]


class ImageConversionError(ValueError):
    """Raised when a message cannot be turned into an RGB array, or an array into a message."""


# encoding -> (bytes per pixel, OpenCV conversion to RGB or None when already RGB).
# OpenCV names Bayer codes after the second row's pattern, so ROS bayer_rggb8 is BayerBG in
# OpenCV (the mapping cv_bridge uses); test_bayer_demosaic_colors proves it.
_DECODE_8BIT: dict[str, tuple[int, int | None]] = {
    'rgb8': (3, None),
    'bgr8': (3, cv2.COLOR_BGR2RGB),
    'rgba8': (4, cv2.COLOR_RGBA2RGB),
    'bgra8': (4, cv2.COLOR_BGRA2RGB),
    'mono8': (1, cv2.COLOR_GRAY2RGB),
    # ROS 'yuv422' is UYVY byte order; 'yuv422_yuy2' is YUYV.
    'yuv422': (2, cv2.COLOR_YUV2RGB_UYVY),
    'uyvy': (2, cv2.COLOR_YUV2RGB_UYVY),
    'yuv422_yuy2': (2, cv2.COLOR_YUV2RGB_YUYV),
    'yuyv': (2, cv2.COLOR_YUV2RGB_YUYV),
    'bayer_rggb8': (1, cv2.COLOR_BayerBG2RGB),
    'bayer_bggr8': (1, cv2.COLOR_BayerRG2RGB),
    'bayer_gbrg8': (1, cv2.COLOR_BayerGR2RGB),
    'bayer_grbg8': (1, cv2.COLOR_BayerGB2RGB),
}

# 16-bit encodings are reduced to their most significant byte, then decoded as this encoding.
_EIGHT_BIT_OF_16BIT = {
    'rgb16': 'rgb8', 'bgr16': 'bgr8', 'rgba16': 'rgba8', 'bgra16': 'bgra8', 'mono16': 'mono8',
}

_YUV422 = frozenset({'yuv422', 'uyvy', 'yuv422_yuy2', 'yuyv'})
_BAYER = frozenset({'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8'})

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_DECODE_8BIT) | frozenset(_EIGHT_BIT_OF_16BIT)

_ENCODE_CHANNELS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1}


def _pixel_bytes(msg: Image, bytes_per_pixel: int) -> RgbArray:
    """
    View the message data as (H, W, bytes_per_pixel) uint8, skipping row padding, no copy.

    Sizes are checked in Python integers before numpy sees them, so a message claiming a huge
    size with little data is refused without allocating anything.
    """
    height, width, step = msg.height, msg.width, msg.step
    try:
        check_size(width, height, f'{msg.encoding} image')
    except ImageDecodeError as error:
        raise ImageConversionError(str(error)) from None
    row_bytes = width * bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            f'{msg.encoding} image step {step} is smaller than width {width} x '
            f'{bytes_per_pixel} bytes per pixel = {row_bytes}')
    needed = step * height
    if len(msg.data) < needed:
        raise ImageConversionError(
            f'{msg.encoding} image data has {len(msg.data)} bytes, step {step} x height '
            f'{height} needs {needed}')
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=needed).reshape(height, step)
    return rows[:, :row_bytes].reshape(height, width, bytes_per_pixel)


def _convert(pixels: RgbArray, code: int | None) -> RgbArray:
    """Apply one OpenCV conversion to RGB; single-channel inputs are passed to OpenCV as 2-D."""
    if code is None:
        return pixels
    if pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return np.asarray(cv2.cvtColor(pixels, code), dtype=np.uint8)


def image_msg_to_rgb(msg: Image) -> RgbArray:
    """
    Return the image as (H, W, 3) uint8 RGB; for rgb8 a view of ``msg.data``, not a copy.

    The rgb8 result shares memory with the message (read-only when ``msg.data`` is ``bytes``):
    copy it before writing in place. Every other encoding returns a new contiguous array.
    16-bit encodings keep their high byte (value >> 8), honouring ``is_bigendian``.
    """
    encoding = msg.encoding
    if encoding not in SUPPORTED_ENCODINGS:
        raise ImageConversionError(
            f'unsupported image encoding {short_repr(encoding)}; supported: '
            f'{", ".join(sorted(SUPPORTED_ENCODINGS))}')
    if encoding in _EIGHT_BIT_OF_16BIT:
        channels, code = _DECODE_8BIT[_EIGHT_BIT_OF_16BIT[encoding]]
        pixels = _pixel_bytes(msg, 2 * channels)
        high_byte = 0 if msg.is_bigendian else 1
        return np.ascontiguousarray(_convert(pixels[:, :, high_byte::2], code))
    if encoding in _YUV422 and msg.width % 2:
        raise ImageConversionError(
            f'{encoding} image width {msg.width} is odd; 4:2:2 pixels come in pairs')
    if encoding in _BAYER and (msg.width < 2 or msg.height < 2):
        raise ImageConversionError(
            f'{encoding} image is {msg.width}x{msg.height}; demosaicing needs at least 2x2')
    bytes_per_pixel, code = _DECODE_8BIT[encoding]
    return _convert(_pixel_bytes(msg, bytes_per_pixel), code)


def _compressed_codec(msg: CompressedImage) -> str:
    """Name the codec ('jpeg' or 'png') from the format string, else from the magic bytes."""
    fmt = msg.format.lower()
    if 'compresseddepth' in fmt:
        raise ImageConversionError(
            f'compressed depth images are not supported ({short_repr(msg.format)})')
    if 'png' in fmt:
        return 'png'
    if 'jpeg' in fmt or 'jpg' in fmt:
        return 'jpeg'
    head = bytes(msg.data[:8])
    if head.startswith(JPEG_SIGNATURE):
        return 'jpeg'
    if head == PNG_SIGNATURE:
        return 'png'
    raise ImageConversionError(
        f'unsupported compressed image format {short_repr(msg.format)}: data is neither jpeg '
        'nor png')


def compressed_msg_to_rgb(msg: CompressedImage) -> RgbArray:
    """Decode a jpeg or png message into (H, W, 3) uint8 RGB, refusing oversized headers."""
    try:
        return decode_rgb(msg.data, _compressed_codec(msg))
    except ImageDecodeError as error:
        raise ImageConversionError(str(error)) from None


def _check_rgb(rgb: RgbArray) -> None:
    """Reject anything but a non-empty (H, W, 3) uint8 array before encoding it."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ImageConversionError(
            f'expected a non-empty (H, W, 3) uint8 RGB array, got shape {rgb.shape} '
            f'dtype {rgb.dtype}')


def rgb_to_image_msg(
        rgb: RgbArray, header: Header | None = None, encoding: str = 'rgb8') -> Image:
    """Build an rgb8, bgr8 or mono8 Image message from an (H, W, 3) uint8 RGB array."""
    _check_rgb(rgb)
    if encoding not in _ENCODE_CHANNELS:
        raise ImageConversionError(
            f'cannot encode to {encoding!r}; supported: {", ".join(sorted(_ENCODE_CHANNELS))}')
    if encoding == 'bgr8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif encoding == 'mono8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        pixels = rgb
    height, width = rgb.shape[:2]
    msg = Image()
    msg.header = header if header is not None else Header()
    msg.height = height
    msg.width = width
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = width * _ENCODE_CHANNELS[encoding]
    # bytes, not the array: rclpy copies a numpy array one element at a time.
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return msg


def rgb_to_compressed_msg(
        rgb: RgbArray, header: Header | None = None, fmt: str = 'jpeg',
        quality: int = 80) -> CompressedImage:
    """
    Build a jpeg (simplejpeg) or png (OpenCV) CompressedImage from (H, W, 3) uint8 RGB.

    ``quality`` (1-100) applies to jpeg only. ``format`` follows image_transport's
    'rgb8; jpeg compressed bgr8' convention so its compressed subscriber decodes to rgb8.
    """
    _check_rgb(rgb)
    codec = fmt.lower()
    if codec in ('jpeg', 'jpg'):
        if not 1 <= quality <= 100:
            raise ImageConversionError(f'jpeg quality must be in 1..100, got {quality}')
        data = simplejpeg.encode_jpeg(
            np.ascontiguousarray(rgb), quality=quality, colorspace='RGB', colorsubsampling='420')
        codec = 'jpeg'
    elif codec == 'png':
        ok, encoded = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ImageConversionError(f'OpenCV failed to png-encode a {rgb.shape} image')
        data = encoded.tobytes()
    else:
        raise ImageConversionError(f'unsupported compressed format {fmt!r}; use jpeg or png')
    msg = CompressedImage()
    msg.header = header if header is not None else Header()
    msg.format = f'rgb8; {codec} compressed bgr8'
    msg.data = data
    return msg
