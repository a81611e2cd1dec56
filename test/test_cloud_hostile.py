"""
Hostile and overwhelming clients against a real cloud server process on loopback.

Raw bytes go over a generic channel call, so the server sees exactly what a broken or malicious
client could send: every malformed request must be INVALID_ARGUMENT (never INTERNAL or UNKNOWN,
never a traceback in the log), invalid requests are logged at most about once a second, and a
burst of Detect calls is refused with RESOURCE_EXHAUSTED while health checks still answer.
"""
from __future__ import annotations

import time
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2_grpc
from hostile_images import jpeg_claiming, png_claiming, progressive_jpeg
from hypothesis import given, HealthCheck, settings, strategies as st
import numpy as np
import pytest
from ros_harness import wait_until
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from test_cloud import health_status, plain_and_slow_servers, ServerProcess, SERVICE

DETECT = f'/{SERVICE}/Detect'
MODEL_INFO = f'/{SERVICE}/GetModelInfo'
BURST_LATENCY_MS = 2000.0  # admitted calls stay in flight this long
BURST_CALLS = 32  # the old global limit was 8 RPCs of any kind
MAX_DETECT_CALLS = 17  # the server's default bound: a queue of 16 plus one inference
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope='module')
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Start a plain server for the fuzzing and a slow one for the burst."""
    with plain_and_slow_servers(tmp_path_factory.mktemp('hostile_logs'),
                                BURST_LATENCY_MS) as started:
        yield started


@pytest.fixture(scope='module')
def valid_request() -> bytes:
    """Return a serialized, valid Detect request of a small jpeg."""
    frame = codec.encode_frame(np.full((48, 64, 3), 90, np.uint8))
    return codec.build_request(frame, 'cam', 1, 0).SerializeToString()


def send_raw(channel: grpc.Channel, method: str, data: bytes,
             timeout: float = 10.0) -> grpc.StatusCode:
    """Send ``data`` as the request bytes of ``method``; return the status code."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(data, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Return one protobuf field with wire type 2 (bytes or string)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def junk_requests(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, damaged valid requests, bad UTF-8 strings, lying or costly images."""
    position = st.integers(0, len(valid))
    overwritten = st.tuples(position, st.binary(min_size=1, max_size=8)).map(
        lambda p: valid[:p[0]] + p[1] + valid[p[0] + len(p[1]):])
    bad_utf8 = st.tuples(st.sampled_from([2, 5]), st.binary(min_size=1, max_size=12).filter(
        lambda b: not _is_utf8(b))).map(lambda f: valid + length_delimited(*f))
    images = st.one_of(
        st.builds(jpeg_claiming, st.integers(1, 65535), st.integers(1, 65535)),
        st.builds(png_claiming, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        st.builds(progressive_jpeg, st.integers(0, 30), st.integers(1, 64)),
        st.just(detection_pb2.DetectRequest.FromString(valid).image))
    fields = st.builds(
        detection_pb2.DetectRequest, image=images,
        image_format=st.one_of(st.sampled_from(['jpeg', 'png']), st.text(max_size=8)),
        original_width=st.integers(0, 2**32 - 1), original_height=st.integers(0, 2**32 - 1),
        frame_id=st.text(max_size=300), stamp_ns=st.integers(-2**63, 2**63 - 1),
        deadline_unix_ns=st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1))).map(
            lambda r: r.SerializeToString())
    return st.one_of(st.binary(max_size=300), position.map(lambda end: valid[:end]),
                     overwritten, bad_utf8, fields)


def warnings_in(log: str) -> list[str]:
    """Return the log's WARNING lines."""
    return [line for line in log.splitlines() if ' WARNING ' in line]


def test_malformed_requests_are_invalid_argument_with_a_throttled_log(
        servers: dict[str, ServerProcess], valid_request: bytes) -> None:
    server = servers['plain']
    seen: dict[grpc.StatusCode, int] = {}
    start = time.monotonic()
    with grpc.insecure_channel(server.target) as channel:

        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(data=junk_requests(valid_request))
        def fuzz(data: bytes) -> None:
            code = send_raw(channel, DETECT, data)
            seen[code] = seen.get(code, 0) + 1
            assert code in EXPECTED, f'{code.name} for {data!r}'

        fuzz()
        for data in (b'\xff' * 9, length_delimited(1, b'\xff\xfe') + b'\x08'):
            assert send_raw(channel, MODEL_INFO, data) == grpc.StatusCode.INVALID_ARGUMENT
        assert send_raw(channel, DETECT, valid_request) == grpc.StatusCode.OK
        assert health_status(health_pb2_grpc.HealthStub(channel), SERVICE) == 'SERVING'
    elapsed_s = time.monotonic() - start
    assert seen[grpc.StatusCode.INVALID_ARGUMENT] > 100, seen
    log = server.log()
    assert 'Traceback' not in log and ' ERROR ' not in log, log
    invalid = [line for line in warnings_in(log) if 'INVALID_ARGUMENT' in line]
    assert len(invalid) <= elapsed_s + 2, log  # one a second, plus the edges


def test_suppressed_warnings_are_counted(servers: dict[str, ServerProcess]) -> None:
    server = servers['plain']

    def counted() -> list[str]:
        return [line for line in warnings_in(server.log()) if 'not logged' in line]
    before = len(counted())
    with grpc.insecure_channel(server.target) as channel:
        for _ in range(20):
            assert send_raw(channel, DETECT, b'\xff') == grpc.StatusCode.INVALID_ARGUMENT
        # The count of suppressed lines is logged with the next warning, a second later.
        wait_until(lambda: send_raw(channel, DETECT, b'\xff') == grpc.StatusCode.INVALID_ARGUMENT
                   and len(counted()) > before, 10.0, 'a warning that counts the suppressed ones')
    assert 'INVALID_ARGUMENT: malformed DetectRequest: Error parsing message' in counted()[-1]


def test_detect_burst_is_refused_while_health_checks_answer(
        servers: dict[str, ServerProcess], valid_request: bytes) -> None:
    target = servers['slow'].target
    request = detection_pb2.DetectRequest.FromString(valid_request)
    with grpc.insecure_channel(target) as channel:
        stub = detection_pb2_grpc.CloudDetectorStub(channel)
        # No call deadline: the scheduler's admission by predicted completion (which a slow
        # warm-up on a loaded machine can make pessimistic) must not answer any of them, so
        # only the bound on Detect calls decides.
        calls = [stub.Detect.future(request) for _ in range(BURST_CALLS)]
        wait_until(lambda: sum(c.done() for c in calls) >= BURST_CALLS - MAX_DETECT_CALLS,
                   30.0, 'the calls beyond the bound to end')
        early = [(c.code(), c.details()) for c in calls if c.done()]
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in early), early
        start = time.monotonic()
        health = health_status(health_pb2_grpc.HealthStub(channel), SERVICE)
        info = stub.GetModelInfo(detection_pb2.ModelInfoRequest(), timeout=1.0)
        answered_s = time.monotonic() - start
        in_flight = sum(not c.done() for c in calls)
        wait_until(lambda: all(c.done() for c in calls), 60.0, 'the admitted calls to end')
    assert health == 'SERVING' and info.model_name
    assert in_flight == MAX_DETECT_CALLS  # the burst was still being served meanwhile
    assert answered_s < 1.0
    codes = [c.code() for c in calls]
    assert codes.count(grpc.StatusCode.OK) == MAX_DETECT_CALLS
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == BURST_CALLS - MAX_DETECT_CALLS
    refusal = next(c for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refusal.details() == f'{MAX_DETECT_CALLS} Detect calls in progress'
