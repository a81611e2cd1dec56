"""
Decode jpeg and png images within one set of limits, shared by the vehicle node and the server.

Both sides receive images from outside: a 631-byte jpeg can claim 30000x30000 pixels, and
decoding it first and checking afterwards costs seconds and gigabytes. So the size an image
declares in its header (jpeg SOF, png IHDR) is checked against :data:`MAX_PIXELS` and
:data:`MAX_ASPECT_RATIO`, and a jpeg's scans against :data:`MAX_JPEG_SCANS`, before any pixel
is decoded; raw image sizes go through the same :func:`check_size`. Every decoder failure
comes out as :class:`ImageDecodeError`.
"""
from __future__ import annotations

import array
import struct
from typing import Union

import cv2
import numpy as np
import numpy.typing as npt
import simplejpeg

# 8192 x 8192: four times an 8K frame (7680x4320), far above any vehicle camera, and it caps
# one decoded RGB image at 192 MiB (a 632-byte jpeg claiming it decodes in ~70 ms here).
MAX_PIXELS = 8192 * 8192
# Panoramas are about 8:1. torchvision's R-CNN transform shrinks a 1x8000 image to zero rows
# and raises; no detector needs shapes beyond this.
MAX_ASPECT_RATIO = 64
# A progressive jpeg is decoded once per scan, and a repeated scan costs a few bytes: 100
# extra scans made an 8192x8192 jpeg of 400 kB take 8.7 s here. libjpeg's progressive
# script has 10 scans (6 for grayscale), a baseline jpeg 1 per component.
MAX_JPEG_SCANS = 16
FORMATS = ('jpeg', 'png')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SIGNATURE = b'\xff\xd8'

# What ROS messages (array.array), protobuf (bytes) and callers hand over.
ByteData = Union[bytes, bytearray, memoryview, 'array.array[int]']


class ImageDecodeError(ValueError):
    """Raised for an image that cannot or may not be decoded."""


def short_repr(text: str, limit: int = 40) -> str:
    """Return the repr of ``text`` cut to ``limit`` characters: error messages get logged."""
    return repr(text) if len(text) <= limit else f'{text[:limit]!r}... ({len(text)} chars)'


def check_size(width: int, height: int, what: str) -> None:
    """Refuse a zero size, more than :data:`MAX_PIXELS` or :data:`MAX_ASPECT_RATIO`, cheaply."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f'{what} has zero size ({width}x{height})')
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f'{what} claims {width}x{height} pixels, more than the '
                               f'{MAX_PIXELS} allowed')
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(f'{what} is {width}x{height}, more elongated than '
                               f'{MAX_ASPECT_RATIO}:1')


def declared_size(data: ByteData, image_format: str) -> tuple[int, int]:
    """Return (width, height) as the header of ``data`` declares it, without decoding pixels."""
    view = memoryview(data).cast('B')
    if image_format == 'jpeg':
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(view)
        except ValueError as exc:
            raise ImageDecodeError(f'cannot decode {len(view)} bytes as jpeg: {exc}') from None
        return int(width), int(height)
    if image_format == 'png':
        # The signature, then the IHDR chunk: length, type, width, height (big-endian).
        if (len(view) < 24 or bytes(view[:8]) != PNG_SIGNATURE
                or bytes(view[12:16]) != b'IHDR'):
            raise ImageDecodeError(f'cannot decode {len(view)} bytes as png: they do not start '
                                   'with the png signature and IHDR chunk')
        width, height = struct.unpack('>II', view[16:24])
        return width, height
    raise ImageDecodeError(
        f'image format must be one of {FORMATS}, got {short_repr(image_format)}')


def decode_rgb(data: ByteData, image_format: str) -> npt.NDArray[np.uint8]:
    """
    Decode a jpeg (simplejpeg, the fastest here) or png (OpenCV) image to (H, W, 3) uint8 RGB.

    The declared size and a jpeg's scan count are checked first; png data must start with
    the png signature, so OpenCV never picks one of its other decoders.
    """
    width, height = declared_size(data, image_format)
    check_size(width, height, f'{image_format} header')
    view = memoryview(data).cast('B')
    if image_format == 'jpeg':
        scans = _jpeg_scans(data if isinstance(data, bytes) else bytes(view))
        if scans > MAX_JPEG_SCANS:
            raise ImageDecodeError(f'jpeg has {scans} scans, more than the {MAX_JPEG_SCANS} '
                                   'allowed')
    try:
        if image_format == 'jpeg':
            rgb = simplejpeg.decode_jpeg(view, colorspace='RGB')
        else:
            bgr = cv2.imdecode(np.frombuffer(view, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError('OpenCV could not decode it')
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    except (ValueError, cv2.error) as exc:
        raise ImageDecodeError(f'cannot decode {len(view)} bytes as {image_format}: '
                               f'{exc}') from None
    return np.asarray(rgb, dtype=np.uint8)


def _jpeg_scans(data: bytes) -> int:
    """
    Count the start-of-scan markers of a jpeg whose header simplejpeg could read.

    The header segments are skipped by their lengths (metadata may hold any bytes); after
    the first scan, entropy-coded data stuffs every 0xff with 0x00, so 0xffda is a marker.
    """
    pos = len(JPEG_SIGNATURE)
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
        if data[pos + 1] == 0xFF:  # a fill byte before a marker
            pos += 1
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return data.count(b'\xff\xda', pos)
