"""Small encoded images whose headers lie about their size, for decoder-limit tests."""
from __future__ import annotations

import struct
import zlib

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
