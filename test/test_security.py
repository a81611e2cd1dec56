"""
The secure cloud link: TLS, mutual TLS, bearer tokens, the per-client limit, explicit plaintext.

Certificates are made here with ``cryptography`` (a CA, a second unrelated CA, a server
certificate for localhost / cloud.test / 127.0.0.1, client certificates); servers are real
``cloud_server`` processes on loopback.
"""
from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
import datetime
import hashlib
import ipaddress
import logging
from pathlib import Path
import re
import secrets
import time
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from hypothesis import given, strategies as st
import numpy as np
import pytest
from ros_harness import running, wait_until
from speculation_rig import camera_command, cloud_server, detector, free_port, observer
from speculative_av.cloud import codec
from speculative_av.cloud import detection_pb2
from speculative_av.cloud import detection_pb2_grpc
from speculative_av.cloud.client import CloudEndpoint
from speculative_av.cloud.reply import CloudReply
from speculative_av.cloud.security import (
    ChannelSecurity, client_identity, ConcurrencyLimiter, Denial, load_tokens, METHODS,
    SecurityError, SecurityInterceptor, ServerSecurity, TokenAuthority)
from speculative_av.cloud.server import parse_args
from speculative_av.detectors.torchvision_detector import coco_categories
from test_cloud import ServerProcess, STARTUP_TIMEOUT_S

SERVICE = 'speculative_av.v1.CloudDetector'
EXTRA_LATENCY_MS = 500.0  # Detect calls of the token server last at least this long


# --- certificates and tokens ----------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(common_name: str, key: ec.EllipticCurvePrivateKey,
                 issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
                 usage: ExtendedKeyUsageOID | None = None,
                 sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """Return a CA certificate (``usage`` None, self-signed if no issuer) or a leaf one."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (_name(common_name), key)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False)
    if usage is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """Files of a test deployment: CAs, server and client certificates, tokens."""

    directory: Path
    tokens: dict[str, str]  # vehicle id -> token

    def path(self, name: str) -> str:
        """Return the path of one of the files, e.g. 'ca.pem' or 'car-1.key'."""
        return str(self.directory / name)

    def token_file(self, token: str, name: str) -> str:
        """Write ``token`` into a vehicle token file (mode 600) and return its path."""
        path = self.directory / f'{name}.token'
        path.write_text(token + '\n')
        path.chmod(0o600)
        return str(path)


def _write(directory: Path, name: str, certificate: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> None:
    (directory / f'{name}.pem').write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f'{name}.key'
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


@pytest.fixture(scope='module')
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp('pki')
    authorities = {}
    for name in ('ca', 'other_ca'):
        key = ec.generate_private_key(ec.SECP256R1())
        authorities[name] = (_certificate(f'test {name}', key, None), key)
        _write(directory, name, *authorities[name])
    server_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory, 'server', _certificate(
        'cloud.test', server_key, authorities['ca'], ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName('localhost'), x509.DNSName('cloud.test'),
         x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), server_key)
    for name, authority in (('car-1', 'ca'), ('car-2', 'ca'), ('rogue', 'other_ca')):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, name, _certificate(name, key, authorities[authority],
                                             ExtendedKeyUsageOID.CLIENT_AUTH), key)
    tokens = {name: secrets.token_urlsafe(24) for name in ('car-1', 'car-2', 'monitor')}
    token_list = directory / 'tokens.txt'
    token_list.write_text('# vehicle_id token [methods]\n\n' + ''.join(
        f'{name} {token}{" GetModelInfo" if name == "monitor" else ""}\n'
        for name, token in tokens.items()))
    token_list.chmod(0o600)
    return Pki(directory, tokens)


def _tls_args(pki: Pki) -> tuple[str, ...]:
    return '--tls-cert', pki.path('server.pem'), '--tls-key', pki.path('server.key')


# --- units: tokens, limiter, identity, configuration ----------------------------------------

def test_token_file_keeps_digests_and_method_grants(pki: Pki) -> None:
    entries = load_tokens(pki.path('tokens.txt'))
    assert [(e.vehicle_id, e.methods) for e in entries] == [
        ('car-1', None), ('car-2', None), ('monitor', frozenset({'GetModelInfo'}))]
    assert METHODS == {'Detect', 'GetModelInfo', 'Offset', 'Upload'}  # cloud, collector
    assert all(pki.tokens['car-1'].encode() not in e.digest for e in entries)


def test_a_vehicle_may_hold_several_tokens_given_as_digests(tmp_path: Path) -> None:
    """Rotation: the old and the new token of a vehicle both work until one line is removed."""
    old, new = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    path = tmp_path / 'tokens.txt'
    path.write_text(f'car-1 {old}\ncar-1 sha256:{hashlib.sha256(new.encode()).hexdigest()}\n')
    authority = TokenAuthority(load_tokens(path))
    for token in (old, new):
        assert authority.authorize('Detect', [('authorization', f'Bearer {token}')]) == 'car-1'
    verdict = authority.authorize(
        'Detect', [('authorization', f'Bearer sha256:{hashlib.sha256(new.encode()).hexdigest()}')])
    assert isinstance(verdict, Denial)  # a digest is not a token


@pytest.mark.parametrize('text, message', [
    ('car-1\n', 'expected "vehicle_id token'),
    ('car-1 short\n', 'shorter than 16'),
    ('-car 0123456789abcdef\n', 'vehicle id'),
    ('car-1 0123456789abcdef Detect,Delete\n', "unknown methods ['Delete']"),
    ('car-1 0123456789abcdef\ncar-2 0123456789abcdef\n', 'the token of car-2 appears twice'),
    ('car-1 sha256:1234\n', 'shorter than 16'),
    ('# nobody\n', 'lists no vehicle'),
    ('', 'is empty'),
])
def test_bad_token_files_are_refused_without_echoing_tokens(tmp_path: Path, text: str,
                                                            message: str) -> None:
    path = tmp_path / 'tokens.txt'
    path.write_text(text)
    with pytest.raises(SecurityError, match=re.escape(message)) as info:
        load_tokens(path)
    assert '0123456789abcdef' not in str(info.value)


def test_token_authority_codes(pki: Pki) -> None:
    authority = TokenAuthority(load_tokens(pki.path('tokens.txt')))
    bearer = [('authorization', f'Bearer {pki.tokens["car-2"]}')]
    assert authority.authorize('Detect', bearer) == 'car-2'
    assert authority.authorize('Detect', [('authorization',
                                           f'bearer  {pki.tokens["car-2"]}')]) == 'car-2'
    unauthenticated = [[], [('authorization', 'Basic abc')], [('other', 'x')],
                       [('authorization', f'Bearer {pki.tokens["car-2"]}x')],
                       bearer + bearer]
    for metadata in unauthenticated:
        verdict = authority.authorize('Detect', metadata)
        assert isinstance(verdict, Denial), metadata
        assert verdict.code == grpc.StatusCode.UNAUTHENTICATED
    monitor = [('authorization', f'Bearer {pki.tokens["monitor"]}')]
    assert authority.authorize('GetModelInfo', monitor) == 'monitor'
    assert authority.authorize('Detect', monitor) == Denial(
        grpc.StatusCode.PERMISSION_DENIED, 'vehicle monitor may not call Detect')


@given(st.integers(1, 3), st.lists(st.tuples(st.sampled_from('abc'), st.booleans()),
                                   max_size=40))
def test_limiter_never_exceeds_its_limit_per_client(limit: int,
                                                    steps: list[tuple[str, bool]]) -> None:
    """Arbitrary interleavings of starts and ends: each client alone is capped at ``limit``."""
    limiter = ConcurrencyLimiter(limit)
    model = dict.fromkeys('abc', 0)
    for client, start in steps:
        if start:
            assert limiter.try_acquire(client) == (model[client] < limit)
            model[client] = min(model[client] + 1, limit)
        elif model[client]:
            limiter.release(client)
            model[client] -= 1
    for client, count in model.items():
        for _ in range(count):
            limiter.release(client)
        assert all(limiter.try_acquire(client) for _ in range(limit))
        assert not limiter.try_acquire(client)


class _FakeContext:
    def __init__(self, common_name: bytes | None, peer: str) -> None:
        self._auth = {'x509_common_name': [common_name]} if common_name else {}
        self._peer = peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return self._peer


def test_client_identity_prefers_vehicle_then_certificate_then_address() -> None:
    context = _FakeContext(b'car-9', 'ipv4:10.0.0.7:40001')
    assert client_identity(context, 'car-1') == 'vehicle:car-1'
    assert client_identity(context, None) == 'cert:car-9'
    assert client_identity(_FakeContext(None, 'ipv4:10.0.0.7:40001'), None) == 'peer:ipv4:10.0.0.7'
    assert client_identity(_FakeContext(None, 'ipv6:[::1]:5000'), None) == 'peer:ipv6:[::1]'


class _Aborted(Exception):
    pass


class _AbortingContext(_FakeContext):
    def __init__(self) -> None:
        super().__init__(None, 'ipv4:10.0.0.7:40001')
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


@dataclass(frozen=True)
class _CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def test_interceptor_guards_every_service_but_health_and_reflection(pki: Pki) -> None:
    interceptor = SecurityInterceptor(TokenAuthority(load_tokens(pki.path('tokens.txt'))),
                                      ConcurrencyLimiter(1))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: 'answered')
    for path in ('/grpc.health.v1.Health/Check',
                 '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo'):
        passed = interceptor.intercept_service(lambda details: handler, _CallDetails(path))
        assert passed is handler
    for path in (f'/{SERVICE}/Detect', '/speculative_av.v2.Added/Anything'):
        context = _AbortingContext()
        refusal = interceptor.intercept_service(lambda details: handler, _CallDetails(path))
        with pytest.raises(_Aborted):
            refusal.unary_unary(b'', context)
        assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, 'missing or malformed '
                                   '"authorization: Bearer <token>" metadata'), path
    bearer = (('authorization', f'Bearer {pki.tokens["car-1"]}'),)
    allowed = interceptor.intercept_service(lambda details: handler,
                                            _CallDetails('/speculative_av.v2.Added/Anything',
                                                         bearer))
    assert allowed is handler  # a token, and a method the limiter does not count
    assert interceptor.intercept_service(lambda details: None,
                                         _CallDetails(f'/{SERVICE}/Nothing', bearer)) is None


def test_server_security_options(pki: Pki) -> None:
    for argv, message in [
            ((), 'refusing to serve without TLS'),
            (('--tls-cert', pki.path('server.pem')), 'refusing to serve without TLS'),
            (('--insecure', '--tls-client-ca', pki.path('ca.pem')),
             '--insecure contradicts --tls-client-ca'),
            ((*_tls_args(pki), '--max-calls-per-client', '-1'), 'must be >= 0'),
            (('--tls-cert', pki.path('server.pem'), '--tls-key', pki.path('nothing.key')),
             'cannot read TLS key')]:
        with pytest.raises(SecurityError, match=message):
            ServerSecurity.from_args(parse_args(list(argv)))
    assert ServerSecurity.from_args(parse_args(['--insecure'])).interceptors == ()
    assert [parse_args(argv).insecure for argv in (
        [], ['--insecure'], ['--insecure', 'true'], ['--insecure', 'False'])] == [
            False, True, True, False]
    # What a launch file passes when nothing is configured: empty paths count as not given.
    with pytest.raises(SecurityError, match='refusing to serve without TLS'):
        ServerSecurity.from_args(parse_args([
            '--insecure', 'false', '--tls-cert', '', '--tls-key', '', '--tls-client-ca', '',
            '--tokens', '', '--max-calls-per-client', '0']))
    full = ServerSecurity.from_args(parse_args([
        *_tls_args(pki), '--tls-client-ca', pki.path('ca.pem'), '--tokens',
        pki.path('tokens.txt'), '--max-calls-per-client', '2']))
    assert full.credentials is not None and len(full.interceptors) == 1
    assert full.description == ('mutual TLS, bearer tokens of 3 vehicle(s), at most 2 '
                                'concurrent Detect calls per client')


def test_channel_security_settings(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    assert ChannelSecurity.from_settings(insecure=True).credentials is None
    with pytest.raises(SecurityError, match='contradicts token_file'):
        ChannelSecurity.from_settings(insecure=True, token_file=pki.path('tokens.txt'))
    with pytest.raises(SecurityError, match='needs both cert_file and key_file'):
        ChannelSecurity.from_settings(insecure=False, cert_file=pki.path('car-1.pem'))
    with pytest.raises(SecurityError, match='must hold one token'):
        ChannelSecurity.from_settings(insecure=False, token_file=pki.path('tokens.txt'))
    assert ChannelSecurity.from_settings(insecure=False).credentials is not None  # system roots
    loose = pki.directory / 'loose.token'
    loose.write_text(secrets.token_urlsafe(24))
    loose.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger='cloud_security'):
        ChannelSecurity.from_settings(insecure=False, token_file=str(loose))
    assert 'accessible by group or others (mode 644)' in caplog.text


def test_server_refuses_to_start_without_tls_or_insecure(tmp_path: Path) -> None:
    log = tmp_path / 'server.log'
    server = ServerProcess(log, security=())
    assert server.process.wait(STARTUP_TIMEOUT_S) == 2
    assert server.process.stdout is not None and server.process.stdout.read() == ''
    assert 'refusing to serve without TLS' in server.log()


# --- real servers ------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[dict[str, ServerProcess]]:
    """Start a TLS server with tokens and a per-client limit of 1, and a mutual-TLS server."""
    logs = tmp_path_factory.mktemp('secure_logs')
    started = {
        'token': ServerProcess(logs / 'token.log', '--log-level', 'DEBUG', '--extra-latency-ms',
                               str(EXTRA_LATENCY_MS), '--concurrency', '2', security=(
                                   *_tls_args(pki), '--tokens', pki.path('tokens.txt'),
                                   '--max-calls-per-client', '1')),
        'mtls': ServerProcess(logs / 'mtls.log', security=(
            *_tls_args(pki), '--tls-client-ca', pki.path('ca.pem'))),
    }
    try:
        for name, server in started.items():
            client = 'car-1' if name == 'mtls' else None
            with _channel(server.target, pki, client=client) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                wait_until(lambda: _health(stub) == 'SERVING', STARTUP_TIMEOUT_S,
                           f'the {name} server to serve; log:\n{server.log()}')
        yield started
    finally:
        for server in started.values():
            server.terminate()


def _channel(target: str, pki: Pki, *, ca: str = 'ca.pem', client: str | None = None,
             token: str | None = None, server_name: str = '') -> grpc.Channel:
    """Open a TLS channel as the node does (:class:`ChannelSecurity`)."""
    security = ChannelSecurity.from_settings(
        insecure=False, ca_file=pki.path(ca),
        cert_file=pki.path(f'{client}.pem') if client else '',
        key_file=pki.path(f'{client}.key') if client else '',
        token_file=pki.token_file(token, 'call') if token else '', server_name=server_name)
    return security.channel(target, [])


def _health(stub: health_pb2_grpc.HealthStub) -> str:
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2.0)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@pytest.fixture(scope='module')
def detect_request() -> detection_pb2.DetectRequest:
    frame = np.full((240, 320, 3), 90, np.uint8)
    frame[60:180, 100:220] = (200, 40, 40)
    return codec.build_request(codec.encode_frame(frame), 'cam', 0, 0)


def _detect_code(channel: grpc.Channel, request: detection_pb2.DetectRequest,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> str:
    try:
        detection_pb2_grpc.CloudDetectorStub(channel).Detect(request, timeout=30.0,
                                                             metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code().name
    return 'OK'


def test_tls_with_the_right_ca_and_token_serves(servers: dict[str, ServerProcess], pki: Pki,
                                                detect_request: detection_pb2.DetectRequest,
                                                ) -> None:
    target = servers['token'].target
    port = target.rsplit(':', 1)[1]
    for host, server_name in (('127.0.0.1', ''), ('localhost', ''), ('127.0.0.1', 'cloud.test')):
        with _channel(f'{host}:{port}', pki, token=pki.tokens['car-1'],
                      server_name=server_name) as channel:
            assert _detect_code(channel, detect_request) == 'OK', (host, server_name)
            info = detection_pb2_grpc.CloudDetectorStub(channel).GetModelInfo(
                detection_pb2.ModelInfoRequest(), timeout=10.0)
            assert info.model_name == 'ssdlite320_mobilenet_v3_large'


def test_wrong_ca_wrong_name_and_plaintext_clients_fail(
        servers: dict[str, ServerProcess], pki: Pki,
        detect_request: detection_pb2.DetectRequest) -> None:
    target = servers['token'].target
    token = pki.tokens['car-1']
    with _channel(target, pki, ca='other_ca.pem', token=token) as channel:
        assert _detect_code(channel, detect_request) == 'UNAVAILABLE'
    with _channel(target, pki, token=token, server_name='elsewhere.test') as channel:
        assert _detect_code(channel, detect_request) == 'UNAVAILABLE'
    with grpc.insecure_channel(target) as channel:
        assert _detect_code(channel, detect_request,
                            (('authorization', f'Bearer {token}'),)) == 'UNAVAILABLE'
        assert _health(health_pb2_grpc.HealthStub(channel)) == 'UNAVAILABLE'


def test_tokens_are_required_and_checked(servers: dict[str, ServerProcess], pki: Pki,
                                         detect_request: detection_pb2.DetectRequest) -> None:
    target = servers['token'].target
    with _channel(target, pki) as channel:
        assert _detect_code(channel, detect_request) == 'UNAUTHENTICATED'
        assert _detect_code(channel, detect_request,
                            (('authorization', 'Basic Y2FyOnB3'),)) == 'UNAUTHENTICATED'
        with pytest.raises(grpc.RpcError) as info:
            detection_pb2_grpc.CloudDetectorStub(channel).GetModelInfo(
                detection_pb2.ModelInfoRequest(), timeout=10.0)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _channel(target, pki, token=secrets.token_urlsafe(24)) as channel:
        assert _detect_code(channel, detect_request) == 'UNAUTHENTICATED'
    with _channel(target, pki, token=pki.tokens['monitor']) as channel:
        assert _detect_code(channel, detect_request) == 'PERMISSION_DENIED'
        stub = detection_pb2_grpc.CloudDetectorStub(channel)
        assert stub.GetModelInfo(detection_pb2.ModelInfoRequest(), timeout=10.0).model_name


def test_health_and_reflection_need_no_token(servers: dict[str, ServerProcess],
                                             pki: Pki) -> None:
    with _channel(servers['token'].target, pki) as channel:
        assert _health(health_pb2_grpc.HealthStub(channel)) == 'SERVING'
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {SERVICE, 'grpc.health.v1.Health'} <= services


def test_per_client_limit_refuses_at_once_and_spares_other_clients(
        servers: dict[str, ServerProcess], pki: Pki,
        detect_request: detection_pb2.DetectRequest) -> None:
    """Limit 1: car-1's second concurrent call is refused at once; car-2 still gets through."""
    target = servers['token'].target
    with _channel(target, pki, token=pki.tokens['car-1']) as car1, \
            _channel(target, pki, token=pki.tokens['car-2']) as car2, \
            futures.ThreadPoolExecutor(3) as pool:
        def timed(channel: grpc.Channel) -> tuple[str, float]:
            start = time.monotonic()
            return _detect_code(channel, detect_request), (time.monotonic() - start) * 1e3

        for channel in (car1, car2):  # connect first, so the calls below overlap for sure
            grpc.channel_ready_future(channel).result(timeout=10.0)
        calls = [pool.submit(timed, channel) for channel in (car1, car1, car2)]
        results = [call.result() for call in calls]
    codes = sorted(code for code, _ in results[:2])
    assert codes == ['OK', 'RESOURCE_EXHAUSTED'], results
    assert results[2][0] == 'OK', results
    refused_ms = next(ms for code, ms in results if code == 'RESOURCE_EXHAUSTED')
    assert refused_ms < EXTRA_LATENCY_MS, results  # refused at once, not queued
    with _channel(target, pki, token=pki.tokens['car-1']) as channel:
        assert _detect_code(channel, detect_request) == 'OK'  # the slot was released


def test_mutual_tls_requires_a_client_certificate_of_the_ca(
        servers: dict[str, ServerProcess], pki: Pki,
        detect_request: detection_pb2.DetectRequest) -> None:
    target = servers['mtls'].target
    for client in ('car-1', 'car-2'):
        with _channel(target, pki, client=client) as channel:
            assert _detect_code(channel, detect_request) == 'OK'
    for client in (None, 'rogue'):
        with _channel(target, pki, client=client) as channel:
            assert _detect_code(channel, detect_request) == 'UNAVAILABLE', client
            assert _health(health_pb2_grpc.HealthStub(channel)) == 'UNAVAILABLE'


def test_cloud_endpoint_over_tls_with_token_is_healthy_and_answers(
        servers: dict[str, ServerProcess], pki: Pki,
        detect_request: detection_pb2.DetectRequest) -> None:
    security = ChannelSecurity.from_settings(
        insecure=False, ca_file=pki.path('ca.pem'),
        token_file=pki.token_file(pki.tokens['car-2'], 'car-2'))
    frame = codec.encode_frame(codec.decode_request_image(detect_request))
    replies: list[CloudReply] = []
    with CloudEndpoint('secure', servers['token'].target, security=security,
                       categories=coco_categories()) as endpoint:
        wait_until(lambda: endpoint.healthy, 10.0, 'the secure endpoint to be healthy')
        info = endpoint.model_info(timeout_s=10.0)
        endpoint.submit(frame, 'f1', 1, 30.0, 0, replies.append)
        wait_until(lambda: replies, 30.0, 'the reply')
    assert info is not None and info.model_version == 'random'
    assert replies[0].ok and replies[0].round_trip_ms >= EXTRA_LATENCY_MS, replies[0]
    plaintext = ChannelSecurity.insecure()
    with CloudEndpoint('plain', servers['token'].target, security=plaintext,
                       categories=coco_categories(),
                       backoff_initial_s=0.05, backoff_max_s=0.2) as endpoint:
        wait_until(lambda: endpoint.health().consecutive_failures >= 2, 10.0, 'failed polls')
        assert not endpoint.healthy


def test_server_log_never_holds_a_token(servers: dict[str, ServerProcess], pki: Pki,
                                        detect_request: detection_pb2.DetectRequest) -> None:
    """The token server logs at DEBUG; refusals are logged, token values never."""
    target = servers['token'].target
    wrong = secrets.token_urlsafe(24)
    with _channel(target, pki, token=wrong) as channel:
        assert _detect_code(channel, detect_request) == 'UNAUTHENTICATED'
    with _channel(target, pki, token=pki.tokens['car-1']) as channel:
        assert _detect_code(channel, detect_request) == 'OK'
    log = servers['token'].log()
    assert 'refused: UNAUTHENTICATED' in log and 'bearer tokens of 3 vehicle(s)' in log
    for token in [wrong, *pki.tokens.values()]:
        assert token not in log


# --- the node over the secure link -------------------------------------------------------------

def test_node_wins_frames_over_mutual_tls_with_a_token(pki: Pki) -> None:
    port = free_port()
    security = (*_tls_args(pki), '--tls-client-ca', pki.path('ca.pem'), '--tokens',
                pki.path('tokens.txt'), '--max-calls-per-client', '4')
    parameters = {
        'deadline_ms': 1000.0, 'cloud.endpoints': f'["localhost:{port}"]',
        'cloud.insecure': False, 'cloud.tls.ca_file': pki.path('ca.pem'),
        'cloud.tls.cert_file': pki.path('car-1.pem'), 'cloud.tls.key_file': pki.path('car-1.key'),
        'cloud.token_file': pki.token_file(pki.tokens['car-1'], 'car-1')}
    with observer() as observed, cloud_server(port, security=security), \
            detector(**parameters), running(camera_command(rate_hz=3.0)):
        wait_until(lambda: observed.winners().count('cloud') >= 3, 90,
                   'three cloud wins over the secure link')
    refusals = [d['source.cloud'] for d, _ in observed.decisions
                if 'UNAUTHENTICATED' in d['source.cloud'] or 'PERMISSION' in d['source.cloud']]
    assert not refusals, '\n'.join(observed.outcomes())
