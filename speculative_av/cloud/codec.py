"""
Wire format of the cloud detector: encoding frames and converting requests and replies.

The vehicle may downscale a frame before encoding it; requests carry the camera image size,
and the server answers with boxes in that size's pixel coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass
import time

import cv2
import numpy as np
import numpy.typing as npt
import simplejpeg
from speculative_av.cloud import detection_pb2
from speculative_av.core.detections import Detections
from speculative_av.core.image_decoding import check_size, decode_rgb, FORMATS

# Frame ids are echoed in error details, which travel in a size-limited gRPC trailer.
MAX_FRAME_ID_CHARS = 256


@dataclass(frozen=True)
class EncodedFrame:
    """An encoded camera frame, ready to send."""

    data: bytes
    image_format: str
    original_width: int
    original_height: int
    width: int
    height: int
    encode_ms: float

    @property
    def nbytes(self) -> int:
        """Return the encoded size in bytes."""
        return len(self.data)


def encode_frame(rgb: npt.NDArray[np.uint8], *, jpeg_quality: int = 80, max_image_side: int = 0,
                 image_format: str = 'jpeg') -> EncodedFrame:
    """
    Encode an (H, W, 3) uint8 RGB frame, first downscaling it if it is large.

    With ``max_image_side`` > 0 the frame is shrunk (area interpolation) so that its longer side
    is at most that many pixels. ``image_format`` is 'jpeg' (``jpeg_quality`` 1..100, 4:2:0
    chroma) or 'png' (lossless).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}')
    if image_format not in FORMATS:
        raise ValueError(f'image_format must be one of {FORMATS}, got {image_format!r}')
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f'jpeg_quality must be in 1..100, got {jpeg_quality}')
    start = time.perf_counter()
    height, width = rgb.shape[:2]
    image = rgb
    longer = max(height, width)
    if 0 < max_image_side < longer:
        scale = max_image_side / longer
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.uint8)
    image = np.ascontiguousarray(image)
    if image_format == 'jpeg':
        data = simplejpeg.encode_jpeg(image, quality=jpeg_quality, colorspace='RGB',
                                      colorsubsampling='420')
    else:
        ok, buffer = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f'could not encode a {image.shape} image as png')
        data = buffer.tobytes()
    return EncodedFrame(data, image_format, width, height, image.shape[1], image.shape[0],
                        (time.perf_counter() - start) * 1e3)


def build_request(frame: EncodedFrame, frame_id: str, stamp_ns: int,
                  deadline_unix_ns: int) -> detection_pb2.DetectRequest:
    """Return the Detect request for ``frame`` (``deadline_unix_ns`` 0 = no deadline)."""
    return detection_pb2.DetectRequest(
        image=frame.data, image_format=frame.image_format,
        original_width=frame.original_width, original_height=frame.original_height,
        frame_id=frame_id, stamp_ns=stamp_ns, deadline_unix_ns=deadline_unix_ns)


def decode_request_image(request: detection_pb2.DetectRequest) -> npt.NDArray[np.uint8]:
    """
    Check every field of the request, then decode its image to (H, W, 3) uint8 RGB.

    Raise ValueError, with a message of bounded length, for anything a well-behaved client
    never sends: an unknown format, no image, a zero or oversized image or camera size,
    negative times, an overlong frame id.
    """
    if not request.image:
        raise ValueError('the request carries no image bytes')
    check_size(request.original_width, request.original_height, 'original_width/height')
    if request.stamp_ns < 0 or request.deadline_unix_ns < 0:
        raise ValueError(f'stamp_ns ({request.stamp_ns}) and deadline_unix_ns '
                         f'({request.deadline_unix_ns}) must not be negative')
    if len(request.frame_id) > MAX_FRAME_ID_CHARS:
        raise ValueError(f'frame_id has {len(request.frame_id)} characters, more than '
                         f'{MAX_FRAME_ID_CHARS}')
    return decode_rgb(request.image, request.image_format)


def to_original_coordinates(detections: Detections, request: detection_pb2.DetectRequest,
                            decoded_width: int, decoded_height: int) -> Detections:
    """Map boxes found in the decoded image to the camera size of a checked request."""
    width, height = request.original_width, request.original_height
    if (width, height) == (decoded_width, decoded_height):
        return detections
    return detections.scaled(width / decoded_width, height / decoded_height)


def detections_to_response(detections: Detections, *, model_name: str, model_version: str,
                           server_receive_unix_ns: int, queue_ms: float, decode_ms: float,
                           inference_ms: float) -> detection_pb2.DetectResponse:
    """Return the Detect reply carrying ``detections`` (already in original coordinates)."""
    response = detection_pb2.DetectResponse(
        model_name=model_name, model_version=model_version,
        server_receive_unix_ns=server_receive_unix_ns, queue_ms=queue_ms, decode_ms=decode_ms,
        inference_ms=inference_ms)
    response.detections.extend(
        detection_pb2.Detection(x1=x1, y1=y1, x2=x2, y2=y2, score=score, label=label)
        for (x1, y1, x2, y2), score, label in zip(detections.boxes.tolist(),
                                                  detections.scores.tolist(),
                                                  detections.labels.tolist()))
    return response


def response_to_detections(response: detection_pb2.DetectResponse) -> Detections:
    """Return the detections of a Detect reply."""
    items = response.detections
    if not items:
        return Detections.empty()
    return Detections(np.array([(d.x1, d.y1, d.x2, d.y2) for d in items], np.float32),
                      np.array([d.score for d in items], np.float32),
                      np.array([d.label for d in items], np.int64))
