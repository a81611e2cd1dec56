"""Small encoded images whose headers lie about their size, for decoder-limit tests."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import simplejpeg


def jpeg_claiming(width: int, height: int) -> bytes:
    """Return a ~630-byte jpeg of 16x16 pixels whose SOF header claims ``width`` x ``height``."""
    data = bytearray(simplejpeg.encode_jpeg(np.full((16, 16, 3), 128, np.uint8), quality=80,
                                            colorspace='RGB'))
    sof = data.index(b'\xff\xc0')  # baseline SOF0: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    """Return a png signature and an IHDR chunk claiming ``width`` x ``height``, then no pixels."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = struct.pack('>I', len(ihdr)) + b'IHDR' + ihdr
    return (b'\x89PNG\r\n\x1a\n' + chunk
            + struct.pack('>I', zlib.crc32(b'IHDR' + ihdr)) + b'\0\0\0\0IEND\xaeB`\x82')


def progressive_jpeg(extra_scans: int = 0, side: int = 64) -> bytes:
    """Return a progressive jpeg (10 scans) with its last scan repeated ``extra_scans`` times."""
    rgb = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = cv2.imencode('.jpg', rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    last_scan = data[data.rfind(b'\xff\xda'):-2]  # up to the end-of-image marker
    return data[:-2] + last_scan * extra_scans + data[-2:]
