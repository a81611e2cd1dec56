# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectRequest(_message.Message):
    __slots__ = ("image", "image_format", "original_width", "original_height", "frame_id", "stamp_ns", "deadline_unix_ns")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    STAMP_NS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    image_format: str
    original_width: int
    original_height: int
    frame_id: str
    stamp_ns: int
    deadline_unix_ns: int
    def __init__(self, image: _Optional[bytes] = ..., image_format: _Optional[str] = ..., original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., frame_id: _Optional[str] = ..., stamp_ns: _Optional[int] = ..., deadline_unix_ns: _Optional[int] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "score", "label")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: int
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., score: _Optional[float] = ..., label: _Optional[int] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("detections", "model_name", "model_version", "server_receive_unix_ns", "queue_ms", "decode_ms", "inference_ms", "batch_size")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_RECEIVE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    model_name: str
    model_version: str
    server_receive_unix_ns: int
    queue_ms: float
    decode_ms: float
    inference_ms: float
    batch_size: int
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., server_receive_unix_ns: _Optional[int] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "categories", "device", "score_threshold")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    device: str
    score_threshold: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., score_threshold: _Optional[float] = ...) -> None: ...
