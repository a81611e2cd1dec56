"""
One triggered frame as one self-contained rosbag2 MCAP file: the unit that is stored and uploaded.

A snippet file holds four topics, each with one message stamped with the frame's stamp:
``/image`` (sensor_msgs/CompressedImage, jpeg), ``/detections/local`` and, when the cloud
answered, ``/detections/cloud`` (vision_msgs/Detection2DArray, class ids as decimal label ids
like the node's outputs), and ``/decision`` (diagnostic_msgs/DiagnosticStatus: winner, late,
reasons, both models, the label map). It is written with rosbags (message definitions and type
hashes of :mod:`speculative_av.tools.bag_types`), so rosbags' ``Reader`` opens the bare file and
rosbag2's mcap storage plugin can play it. Files come back from the fleet, so
:func:`read_snippet` trusts nothing: sizes are checked before anything is parsed or decoded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
import hashlib
import json
import os
from pathlib import Path
import shutil
import struct
import tempfile
import threading
from typing import Any
import uuid

import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.rosbag2.reader import Reader
from speculative_av.core.detections import Detections
from speculative_av.core.image_decoding import check_size, declared_size
from speculative_av.fleet.triggers import REASONS
from speculative_av.ros.messages import detections_from_msg
from speculative_av.tools.bag_types import typestore

IMAGE_TOPIC = '/image'
LOCAL_TOPIC = '/detections/local'
CLOUD_TOPIC = '/detections/cloud'
DECISION_TOPIC = '/decision'
TOPIC_TYPES = {IMAGE_TOPIC: 'sensor_msgs/msg/CompressedImage',
               LOCAL_TOPIC: 'vision_msgs/msg/Detection2DArray',
               CLOUD_TOPIC: 'vision_msgs/msg/Detection2DArray',
               DECISION_TOPIC: 'diagnostic_msgs/msg/DiagnosticStatus'}
REQUIRED_TOPICS = (IMAGE_TOPIC, LOCAL_TOPIC, DECISION_TOPIC)
# A 1080p jpeg at quality 90 is ~0.4 MB; 32 MiB leaves room for any vehicle camera.
MAX_SNIPPET_BYTES = 32 * 1024 * 1024
# Per message, checked before it is deserialized: ~100 bytes per detection, a label map ~2 kB.
MAX_DETECTIONS_BYTES = 4 * 1024 * 1024
MAX_DECISION_BYTES = 1024 * 1024
MAX_CATEGORIES = 10_000
DECISION_NAME = 'speculative_detector: snippet'
_MCAP_MAGIC = b'\x89MCAP0\r\n'
_CHUNK_OPCODE = 0x06


@dataclass(frozen=True)
class Snippet:
    """One triggered frame: its image, both answers, the decision and why it was kept."""

    camera: str
    stamp_ns: int
    frame_id: str
    jpeg: bytes
    local: Detections
    cloud: Detections | None  # None: no cloud answer arrived (not even late)
    winner: str  # the source whose result was published ('' if none)
    late: bool
    reasons: tuple[str, ...]
    local_model: str  # name:version of the vehicle's model
    cloud_model: str  # the endpoint that answered and its model, 'cloud name:version' ('' if none)
    categories: tuple[str, ...]  # the label map class ids index


def write_snippet(path: Path, snippet: Snippet) -> None:
    """
    Write ``snippet`` as one rosbag2 MCAP file at ``path`` (a new ``.mcap`` path).

    The bag is written in a temporary directory next to ``path`` and its one file renamed into
    place: a reader never sees half a snippet.
    """
    path = Path(path)
    if path.suffix != '.mcap':
        raise ValueError(f'a snippet file must end in .mcap, got {path.name!r}')
    if path.exists():
        raise FileExistsError(f'{path} exists already')
    store = typestore()
    messages = [(IMAGE_TOPIC, _image_msg(snippet)),
                (LOCAL_TOPIC, _detections_msg(snippet.local, snippet)),
                (DECISION_TOPIC, _decision_msg(snippet))]
    if snippet.cloud is not None:
        messages.insert(2, (CLOUD_TOPIC, _detections_msg(snippet.cloud, snippet)))
    work = Path(tempfile.mkdtemp(prefix='.tmp-', dir=path.parent))
    try:
        with Writer(work / 'bag', version=Writer.VERSION_LATEST,
                    storage_plugin=StoragePlugin.MCAP) as writer:
            for topic, msg in messages:
                connection = writer.add_connection(topic, TOPIC_TYPES[topic], typestore=store)
                writer.write(connection, snippet.stamp_ns,
                             store.serialize_cdr(msg, TOPIC_TYPES[topic]))
        os.replace(work / 'bag' / 'bag.mcap', path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_snippet(path: Path, max_bytes: int = MAX_SNIPPET_BYTES) -> Snippet:
    """
    Read and validate a snippet file; ValueError for anything :func:`write_snippet` never writes.

    Checked in order: the file's size, the MCAP records' layout (no compressed chunk, which could
    expand beyond any limit), the topics and their types, one message per topic, each message's
    size before it is deserialized, the jpeg's declared size (not decoded), the detections and
    the decision's fields.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f'{path.name}: {size} bytes, more than the {max_bytes} allowed')
    if path.suffix != '.mcap':
        raise ValueError(f'{path.name}: a snippet file must end in .mcap')
    _check_mcap_records(path.read_bytes(), path.name)
    try:
        raw = _read_messages(path)
    except ValueError:
        raise
    except Exception as error:  # noqa: B902 (rosbags raises many kinds for a broken file)
        raise ValueError(f'{path.name}: not a readable rosbag2 mcap file: {error!r}') from None
    return _snippet_from(raw, path.name)


def _read_messages(path: Path) -> dict[str, bytes]:
    """Return each topic's one serialized message, after checking topics, types and counts."""
    raw: dict[str, bytes] = {}
    with Reader(path) as reader:
        for connection in reader.connections:
            expected = TOPIC_TYPES.get(connection.topic)
            if expected is None:
                raise ValueError(f'{path.name}: unexpected topic {connection.topic[:80]!r}')
            if connection.msgtype != expected:
                raise ValueError(f'{path.name}: {connection.topic} has type '
                                 f'{connection.msgtype[:80]!r}, not {expected}')
        for connection, _, data in reader.messages():
            if connection.topic in raw:
                raise ValueError(f'{path.name}: more than one message on {connection.topic}')
            limit = {IMAGE_TOPIC: MAX_SNIPPET_BYTES, DECISION_TOPIC: MAX_DECISION_BYTES}.get(
                connection.topic, MAX_DETECTIONS_BYTES)
            if len(data) > limit:
                raise ValueError(f'{path.name}: a {len(data)}-byte message on '
                                 f'{connection.topic}, more than the {limit} allowed')
            raw[connection.topic] = bytes(data)
    missing = [t for t in REQUIRED_TOPICS if t not in raw]
    if missing:
        raise ValueError(f'{path.name}: no message on {missing}')
    return raw


def _snippet_from(raw: dict[str, bytes], name: str) -> Snippet:
    """Deserialize the size-checked messages and check that they describe one frame."""
    store = typestore()
    try:
        msgs: dict[str, Any] = {topic: store.deserialize_cdr(data, TOPIC_TYPES[topic])
                                for topic, data in raw.items()}
    except Exception as error:  # noqa: B902 (the deserializer raises many kinds for bad CDR)
        raise ValueError(f'{name}: a message does not deserialize: {error!r}') from None
    decision = _decision_values(msgs[DECISION_TOPIC], name)
    stamp_ns = _int(decision, 'stamp_ns', name)
    image: Any = msgs[IMAGE_TOPIC]
    for topic, msg in msgs.items():
        header = getattr(msg, 'header', None)
        if header is not None and (header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
                                   != stamp_ns or header.frame_id != image.header.frame_id):
            raise ValueError(f'{name}: {topic} is stamped for another frame than /decision')
    if image.format != 'jpeg':
        raise ValueError(f'{name}: the image format is {image.format[:40]!r}, not jpeg')
    jpeg = bytes(image.data)
    check_size(*declared_size(jpeg, 'jpeg'), f'{name}: the jpeg')
    categories = _categories(decision, name)
    late = decision.get('late')
    if late not in ('true', 'false'):
        raise ValueError(f'{name}: late must be true or false, got {str(late)[:40]!r}')
    reasons = tuple(r for r in decision.get('reasons', '').split(',') if r)
    if not reasons or not set(reasons) <= set(REASONS):
        raise ValueError(f'{name}: reasons must be some of {REASONS}, got {reasons[:10]}')
    return Snippet(
        camera=decision.get('camera', ''), stamp_ns=stamp_ns, frame_id=image.header.frame_id,
        jpeg=jpeg, local=_detections(msgs[LOCAL_TOPIC], categories, name),
        cloud=(_detections(msgs[CLOUD_TOPIC], categories, name) if CLOUD_TOPIC in msgs
               else None),
        winner=decision.get('winner', ''), late=late == 'true', reasons=reasons,
        local_model=decision.get('local_model', ''),
        cloud_model=decision.get('cloud_model', ''), categories=categories)


def _check_mcap_records(data: bytes, name: str) -> None:
    """Walk the MCAP file's top-level records: each inside the file, no chunk compressed."""
    if len(data) < 2 * len(_MCAP_MAGIC) or not (
            data.startswith(_MCAP_MAGIC) and data.endswith(_MCAP_MAGIC)):
        raise ValueError(f'{name}: not an mcap file (magic bytes missing)')
    pos, end = len(_MCAP_MAGIC), len(data) - len(_MCAP_MAGIC)
    while pos < end:
        if pos + 9 > end:
            raise ValueError(f'{name}: a record header is cut off at byte {pos}')
        opcode, length = data[pos], struct.unpack_from('<Q', data, pos + 1)[0]
        body = pos + 9
        if length > end - body:
            raise ValueError(f'{name}: a record at byte {pos} claims {length} bytes, past the end')
        if opcode == _CHUNK_OPCODE:
            # start time, end time, uncompressed size (3 x u64), crc (u32), compression (string)
            if length < 32:
                raise ValueError(f'{name}: a chunk record at byte {pos} is too short')
            compression_length = struct.unpack_from('<I', data, body + 28)[0]
            if compression_length:
                raise ValueError(f'{name}: a chunk at byte {pos} is compressed; snippets are not')
        pos = body + length


def _image_msg(snippet: Snippet) -> Any:
    types = typestore().types
    return types['sensor_msgs/msg/CompressedImage'](
        header=_header(snippet), format='jpeg', data=np.frombuffer(snippet.jpeg, np.uint8))


def _header(snippet: Snippet) -> Any:
    types = typestore().types
    sec, nanosec = divmod(snippet.stamp_ns, 1_000_000_000)
    return types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id=snippet.frame_id)


def _detections_msg(detections: Detections, snippet: Snippet) -> Any:
    """Return ``detections`` as a Detection2DArray laid out like the node's outputs."""
    t = typestore().types
    header = _header(snippet)
    items = []
    for (x1, y1, x2, y2), score, label in zip(
            detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist()):
        hypothesis = t['vision_msgs/msg/ObjectHypothesisWithPose'](
            hypothesis=t['vision_msgs/msg/ObjectHypothesis'](class_id=str(label), score=score),
            pose=t['geometry_msgs/msg/PoseWithCovariance'](
                pose=t['geometry_msgs/msg/Pose'](
                    position=t['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
                    orientation=t['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0)),
                covariance=np.zeros(36, np.float64)))
        bbox = t['vision_msgs/msg/BoundingBox2D'](
            center=t['vision_msgs/msg/Pose2D'](
                position=t['vision_msgs/msg/Point2D'](x=(x1 + x2) / 2, y=(y1 + y2) / 2),
                theta=0.0),
            size_x=x2 - x1, size_y=y2 - y1)
        items.append(t['vision_msgs/msg/Detection2D'](header=header, results=[hypothesis],
                                                      bbox=bbox, id=''))
    return t['vision_msgs/msg/Detection2DArray'](header=header, detections=items)


def _decision_msg(snippet: Snippet) -> Any:
    t = typestore().types
    values = {'camera': snippet.camera, 'stamp_ns': str(snippet.stamp_ns),
              'winner': snippet.winner, 'late': str(snippet.late).lower(),
              'reasons': ','.join(snippet.reasons), 'local_model': snippet.local_model,
              'cloud_model': snippet.cloud_model,
              'categories': json.dumps(list(snippet.categories))}
    return t['diagnostic_msgs/msg/DiagnosticStatus'](
        level=0, name=DECISION_NAME, message=', '.join(snippet.reasons),
        hardware_id=snippet.frame_id,
        values=[t['diagnostic_msgs/msg/KeyValue'](key=k, value=v) for k, v in values.items()])


def _decision_values(msg: Any, name: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in msg.values:
        if item.key in values:
            raise ValueError(f'{name}: /decision repeats the key {item.key[:40]!r}')
        values[item.key] = item.value
    return values


def _int(values: dict[str, str], key: str, name: str) -> int:
    text = values.get(key, '')
    if not (text.isdigit() and len(text) <= 20):
        raise ValueError(f'{name}: {key} must be a non-negative integer, got {text[:40]!r}')
    return int(text)


def _categories(values: dict[str, str], name: str) -> tuple[str, ...]:
    try:
        categories = json.loads(values.get('categories', ''))
    except ValueError:
        raise ValueError(f'{name}: categories is not JSON') from None
    if not (isinstance(categories, list) and 0 < len(categories) <= MAX_CATEGORIES
            and all(isinstance(c, str) for c in categories)):
        raise ValueError(f'{name}: categories must be a list of at most {MAX_CATEGORIES} names')
    return tuple(categories)


def _detections(msg: Any, categories: tuple[str, ...], name: str) -> Detections:
    """Return the boxes of a Detection2DArray; refuse labels off the map, non-finite numbers."""
    try:
        detections = detections_from_msg(msg)
    except ValueError as error:
        raise ValueError(f'{name}: detections do not parse: {error}') from None
    if not (np.isfinite(detections.boxes).all() and np.isfinite(detections.scores).all()):
        raise ValueError(f'{name}: detections hold non-finite numbers')
    if len(detections) and not (0 <= detections.labels.min()
                                and detections.labels.max() < len(categories)):
        raise ValueError(f'{name}: a class id is outside the label map of {len(categories)}')
    return detections


@dataclass(frozen=True)
class SnippetEntry:
    """A stored snippet as the index lists it; ``path`` is where the uploader reads it."""

    file: str  # the file's name in the store's directory
    path: Path
    sha256: str
    size: int  # bytes
    stamp_ns: int
    camera: str
    reasons: tuple[str, ...]
    local_model: str
    cloud_model: str
    uploaded: bool = False

    def to_json(self) -> str:
        """Return the entry as one index line (``bytes`` is the size, as the design names it)."""
        return json.dumps({'file': self.file, 'sha256': self.sha256, 'bytes': self.size,
                           'stamp_ns': self.stamp_ns, 'camera': self.camera,
                           'reasons': list(self.reasons), 'local_model': self.local_model,
                           'cloud_model': self.cloud_model, 'uploaded': self.uploaded})


class SnippetStore:
    """
    Snippet files in one directory within a disk budget, with an ``index.jsonl`` of them.

    Adding writes the file atomically, then rewrites the index atomically (temporary file and
    rename). When a new snippet would exceed the budget, stored ones go first: uploaded ones,
    oldest first, then the oldest not yet uploaded (both counted). Opening a directory adopts
    what a crash left between the two steps (a valid snippet file missing from the index) and
    removes temporary files, index entries without a file and files that are not snippets.
    Thread-safe: the recorder adds while the uploader lists and marks.
    """

    INDEX = 'index.jsonl'

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        """Open (or create) the store at ``directory``; drop the oldest beyond the budget."""
        if budget_bytes <= 0:
            raise ValueError(f'budget_bytes must be > 0, got {budget_bytes}')
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._entries: list[SnippetEntry] = []
        self.counters = {'evicted': 0, 'evicted_not_uploaded': 0, 'index_lines_dropped': 0,
                         'files_adopted': 0, 'files_removed': 0}
        self._load()
        with self._lock:
            self._make_room(0)
            self._write_index()

    @property
    def bytes_on_disk(self) -> int:
        """Return the stored snippets' total size."""
        with self._lock:
            return sum(e.size for e in self._entries)

    def entries(self) -> list[SnippetEntry]:
        """Return every stored snippet, oldest first."""
        with self._lock:
            return list(self._entries)

    def pending(self) -> list[SnippetEntry]:
        """Return the snippets not yet uploaded, oldest first."""
        with self._lock:
            return [e for e in self._entries if not e.uploaded]

    def mark_uploaded(self, entry: SnippetEntry) -> None:
        """Record that ``entry`` reached the cloud (no-op if it was dropped meanwhile)."""
        with self._lock:
            for i, stored in enumerate(self._entries):
                if stored.file == entry.file and not stored.uploaded:
                    self._entries[i] = replace(stored, uploaded=True)
                    self._write_index()
                    return

    def add(self, snippet: Snippet) -> SnippetEntry:
        """Store ``snippet``, dropping older ones to make room; ValueError if it cannot fit."""
        slug = ''.join(c if c.isalnum() or c in '_-' else '-' for c in snippet.camera) or 'image'
        name = f'{snippet.stamp_ns:019d}-{slug[:64]}-{uuid.uuid4().hex[:8]}.mcap'
        path = self.directory / name
        write_snippet(path, snippet)
        try:
            size, digest = _size_and_sha256(path)
            if size > self.budget_bytes:
                raise ValueError(f'a {size}-byte snippet exceeds the whole budget of '
                                 f'{self.budget_bytes} bytes')
            entry = SnippetEntry(name, path, digest, size, snippet.stamp_ns, snippet.camera,
                                 snippet.reasons, snippet.local_model, snippet.cloud_model)
            with self._lock:
                self._make_room(size)
                self._entries.append(entry)
                self._write_index()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return entry

    def _make_room(self, size: int) -> None:
        """Drop snippets, uploaded ones first, each oldest first, until ``size`` more fit."""
        total = sum(e.size for e in self._entries)
        for uploaded in (True, False):
            for entry in [e for e in self._entries if e.uploaded == uploaded]:
                if total + size <= self.budget_bytes:
                    return
                entry.path.unlink(missing_ok=True)
                self._entries.remove(entry)
                total -= entry.size
                self.counters['evicted'] += 1
                self.counters['evicted_not_uploaded'] += not uploaded

    def _write_index(self) -> None:
        temporary = self.directory / f'.{self.INDEX}.tmp'
        temporary.write_text(''.join(e.to_json() + '\n' for e in self._entries))
        os.replace(temporary, self.directory / self.INDEX)

    def _load(self) -> None:
        """Read the index, keeping entries whose file is there; reconcile with the directory."""
        index = self.directory / self.INDEX
        listed: dict[str, SnippetEntry] = {}
        for line in index.read_text().splitlines() if index.exists() else []:
            entry = self._parse_line(line)
            if entry is None or entry.file in listed or not entry.path.is_file():
                self.counters['index_lines_dropped'] += 1
            else:
                listed[entry.file] = entry
        for path in sorted(self.directory.iterdir()):
            if path.name in listed or path.name == self.INDEX:
                continue
            if path.is_dir() and path.name.startswith('.tmp-'):
                shutil.rmtree(path, ignore_errors=True)
                self.counters['files_removed'] += 1
            elif path.is_file():
                adopted = self._adopt(path)
                if adopted is None:
                    path.unlink()
                    self.counters['files_removed'] += 1
                else:
                    listed[path.name] = adopted
                    self.counters['files_adopted'] += 1
        self._entries = list(listed.values())

    def _parse_line(self, line: str) -> SnippetEntry | None:
        try:
            item = json.loads(line)
            name = item['file']
            if not (isinstance(name, str) and name.endswith('.mcap')
                    and Path(name).name == name and not name.startswith('.')):
                return None
            return SnippetEntry(name, self.directory / name, str(item['sha256']),
                                int(item['bytes']), int(item['stamp_ns']), str(item['camera']),
                                tuple(str(r) for r in item['reasons']),
                                str(item['local_model']), str(item['cloud_model']),
                                bool(item['uploaded']))
        except (ValueError, KeyError, TypeError):
            return None

    def _adopt(self, path: Path) -> SnippetEntry | None:
        """Return the entry of a valid snippet file the index lacks (None: not a snippet)."""
        if path.suffix != '.mcap' or path.name.startswith('.'):
            return None
        try:
            snippet = read_snippet(path)
        except (ValueError, OSError):
            return None
        size, digest = _size_and_sha256(path)
        return SnippetEntry(path.name, path, digest, size, snippet.stamp_ns, snippet.camera,
                            snippet.reasons, snippet.local_model, snippet.cloud_model)


def _size_and_sha256(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()
