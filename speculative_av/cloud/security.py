"""
Security of the vehicle-to-cloud link, which crosses the public internet.

Server side (:class:`ServerSecurity`): TLS with the server's certificate, optionally requiring
client certificates (mutual TLS); a bearer token per vehicle, checked by a server interceptor;
and a per-client limit on concurrent Detect calls, so one vehicle cannot take every inference
slot. Client side (:class:`ChannelSecurity`): how a cloud endpoint builds its channel.

Plaintext exists only when chosen explicitly. With tokens, every call needs one except those
of grpc.health.v1 and reflection, which stay open so load balancers and Kubernetes probes work
(failing closed: a service added later is guarded too). The server keeps SHA-256 digests of
the tokens, compares them in constant time, and never logs a token or an image.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
import hashlib
import hmac
import logging
from pathlib import Path
import re
import threading
import time
from typing import Any, Callable, Iterable

import grpc
from speculative_av.cloud import collector_pb2
from speculative_av.cloud import detection_pb2

_LOG = logging.getLogger('cloud_security')

OPEN_SERVICES = frozenset({'grpc.health.v1.Health', 'grpc.reflection.v1alpha.ServerReflection',
                           'grpc.reflection.v1.ServerReflection'})
# What a token file line may grant by name (a line without a list grants every method).
METHODS = frozenset(
    [*detection_pb2.DESCRIPTOR.services_by_name['CloudDetector'].methods_by_name,
     *collector_pb2.DESCRIPTOR.services_by_name['SnippetCollector'].methods_by_name])
LIMITED_METHODS = frozenset({'Detect'})  # the per-client limit counts these (they cost inference)
MIN_TOKEN_LENGTH = 16
DENIAL_LOG_INTERVAL_S = 1.0  # a flood of bad tokens must not flood the log
_VEHICLE_ID = re.compile(r'^[A-Za-z0-9][\w.-]*$')
_SHA256 = re.compile(r'^sha256:[0-9a-fA-F]{64}$')
_BEARER = re.compile(r'^bearer\s+(\S+)$', re.IGNORECASE)


class SecurityError(ValueError):
    """A security setting is missing, contradictory or unreadable (the message says which)."""


def _read(path: str | Path, what: str, *, secret: bool) -> bytes:
    """Read a credential file; warn if a secret is readable by group or others (as ssh does)."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityError(f'cannot read {what} {path}: {exc.strerror}') from None
    if not data.strip():
        raise SecurityError(f'{what} {path} is empty')
    if secret and mode & 0o077:
        _LOG.warning('%s %s is accessible by group or others (mode %o); chmod 600 it',
                     what, path, mode & 0o777)
    return data


# --- server: tokens ------------------------------------------------------------------------


@dataclass(frozen=True)
class VehicleToken:
    """One vehicle's credential as the server keeps it: the token's SHA-256, never the token."""

    vehicle_id: str
    digest: bytes
    methods: frozenset[str] | None  # None: every method


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str | Path) -> list[VehicleToken]:
    """
    Read a token file: ``vehicle_id token [Method,Method]`` lines.

    ``token`` is the token itself or ``sha256:<64 hex digits>``, its digest, so the server's
    disk need not hold tokens. A vehicle may have several lines (tokens), e.g. while a token
    is rotated. Without a method list a line grants every method (of CloudDetector and
    SnippetCollector: a server serves one of them). Blank lines and
    lines starting with ``#`` are ignored. Errors name the line, never the token.
    """
    entries: list[VehicleToken] = []
    for number, line in enumerate(_read(path, 'token file', secret=True).decode().splitlines(),
                                  1):
        fields = line.split()
        if not fields or fields[0].startswith('#'):
            continue
        where = f'{path}:{number}'
        if len(fields) not in (2, 3):
            raise SecurityError(f'{where}: expected "vehicle_id token [Method,...]"')
        vehicle_id, token = fields[:2]
        if not _VEHICLE_ID.match(vehicle_id):
            raise SecurityError(f'{where}: vehicle id {vehicle_id!r} is not [A-Za-z0-9][\\w.-]*')
        if _SHA256.match(token):
            digest = bytes.fromhex(token[len('sha256:'):])
        elif len(token) >= MIN_TOKEN_LENGTH:
            digest = _digest(token)
        else:
            raise SecurityError(f'{where}: the token of {vehicle_id} is shorter than '
                                f'{MIN_TOKEN_LENGTH} characters')
        methods = frozenset(fields[2].split(',')) if len(fields) == 3 else None
        if methods is not None and not methods <= METHODS:
            raise SecurityError(f'{where}: unknown methods {sorted(methods - METHODS)}; '
                                f'known: {sorted(METHODS)}')
        if any(e.digest == digest for e in entries):
            raise SecurityError(f'{where}: the token of {vehicle_id} appears twice')
        entries.append(VehicleToken(vehicle_id, digest, methods))
    if not entries:
        raise SecurityError(f'token file {path} lists no vehicle')
    return entries


@dataclass(frozen=True)
class Denial:
    """Why a call is refused: its status code and the details the client sees."""

    code: grpc.StatusCode
    details: str


class TokenAuthority:
    """Decide which vehicle a call's bearer token belongs to, and whether it may call."""

    def __init__(self, tokens: list[VehicleToken]) -> None:
        """Check calls against ``tokens`` (see :func:`load_tokens`)."""
        self._tokens = tokens

    def __len__(self) -> int:
        """Return the number of vehicles."""
        return len(self._tokens)

    def authorize(self, method: str, metadata: Iterable[tuple[str, Any]]) -> str | Denial:
        """
        Return the calling vehicle's id, or the :class:`Denial` of the call.

        No or malformed ``authorization`` metadata, or a token of no vehicle: UNAUTHENTICATED.
        A known vehicle calling a method its line does not grant: PERMISSION_DENIED.
        """
        values = [value for key, value in metadata if key == 'authorization']
        match = _BEARER.match(values[0]) if len(values) == 1 and isinstance(
            values[0], str) else None
        if match is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED,
                          'missing or malformed "authorization: Bearer <token>" metadata')
        digest = _digest(match[1])
        found: VehicleToken | None = None
        for entry in self._tokens:  # no early exit: the time taken does not depend on a match
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        if found is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED, 'invalid token')
        if found.methods is not None and method not in found.methods:
            return Denial(grpc.StatusCode.PERMISSION_DENIED,
                          f'vehicle {found.vehicle_id} may not call {method}')
        return found.vehicle_id


# --- server: per-client limit --------------------------------------------------------------


class ConcurrencyLimiter:
    """At most ``limit`` calls in flight per client; beyond that, refuse at once (no queue)."""

    def __init__(self, limit: int) -> None:
        """Allow ``limit`` (>= 1) concurrent calls per client."""
        if limit < 1:
            raise ValueError(f'limit must be at least 1, got {limit}')
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, client: str) -> bool:
        """Count a call of ``client`` and return True, or return False if it is at its limit."""
        with self._lock:
            count = self._in_flight.get(client, 0)
            if count >= self.limit:
                return False
            self._in_flight[client] = count + 1
            return True

    def release(self, client: str) -> None:
        """End a call counted by :meth:`try_acquire` (idle clients take no memory)."""
        with self._lock:
            count = self._in_flight[client] - 1
            if count:
                self._in_flight[client] = count
            else:
                del self._in_flight[client]


def client_identity(context: grpc.ServicerContext, vehicle_id: str | None) -> str:
    """
    Name the client a call counts against.

    The authenticated vehicle when tokens are used, else the client certificate's common name
    under mutual TLS, else the peer's address without its port (each connection has its own).
    """
    if vehicle_id is not None:
        return f'vehicle:{vehicle_id}'
    names = context.auth_context().get('x509_common_name')
    if names:
        return f'cert:{names[0].decode()}'
    return 'peer:' + str(context.peer()).rsplit(':', 1)[0]


class SecurityInterceptor(grpc.ServerInterceptor):
    """Check tokens and the per-client limit; health and reflection calls pass unchecked."""

    def __init__(self, tokens: TokenAuthority | None, limiter: ConcurrencyLimiter | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Guard with ``tokens`` and ``limiter`` (either may be None: that check is off)."""
        self._tokens = tokens
        self._limiter = limiter
        self._clock = clock
        self._lock = threading.Lock()
        self._last_denial_log = -DENIAL_LOG_INTERVAL_S
        self._denials = 0

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        """Return the method's handler, wrapped in the checks or replaced by a refusal."""
        handler = continuation(handler_call_details)
        service, _, method = str(handler_call_details.method).lstrip('/').rpartition('/')
        if handler is None or service in OPEN_SERVICES:
            return handler
        if handler.unary_unary is None and handler.stream_unary is None:
            return None  # fail closed (UNIMPLEMENTED): only these kinds are guarded here
        vehicle_id: str | None = None
        if self._tokens is not None:
            verdict = self._tokens.authorize(method, handler_call_details.invocation_metadata)
            if isinstance(verdict, Denial):
                return self._refusal(method, verdict, streaming=handler.unary_unary is None)
            vehicle_id = verdict
        limiter = self._limiter
        if limiter is None or method not in LIMITED_METHODS or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def limited(request: Any, context: grpc.ServicerContext) -> Any:
            client = client_identity(context, vehicle_id)
            if not limiter.try_acquire(client):
                _LOG.debug('%s: %s over its limit of %d', method, client, limiter.limit)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f'more than {limiter.limit} concurrent {method} calls from '
                              'this client')
            try:
                return behavior(request, context)
            finally:
                limiter.release(client)

        return grpc.unary_unary_rpc_method_handler(
            limited, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _refusal(self, method: str, denial: Denial, *, streaming: bool) -> Any:
        """Return a handler (of the method's kind) that logs and ends the call with ``denial``."""
        def deny(request: Any, context: grpc.ServicerContext) -> None:
            self._log_denial(method, str(context.peer()), denial)
            context.abort(denial.code, denial.details)

        if streaming:  # a client stream is refused before its first message is read
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)

    def _log_denial(self, method: str, peer: str, denial: Denial) -> None:
        """Log a refusal, at most once per interval, with the count since the last report."""
        now = self._clock()
        with self._lock:
            self._denials += 1
            report = now - self._last_denial_log >= DENIAL_LOG_INTERVAL_S
            if report:
                self._last_denial_log, count, self._denials = now, self._denials, 0
        if report:
            _LOG.warning('%s from %s refused: %s %s (%d refusal(s) since the last report)',
                         method, peer, denial.code.name, denial.details, count)


# --- server: configuration -----------------------------------------------------------------


def add_server_arguments(parser: argparse.ArgumentParser, *, call_limit: bool = True) -> None:
    """Add the server's security options to its command line (``call_limit``: Detect's)."""
    group = parser.add_argument_group(
        'security', 'TLS is required unless --insecure is given (README: Securing the cloud '
        'link)')
    group.add_argument('--tls-cert', default='', metavar='FILE',
                       help='PEM certificate chain of this server')
    group.add_argument('--tls-key', default='', metavar='FILE',
                       help='PEM private key of --tls-cert')
    group.add_argument('--tls-client-ca', default='', metavar='FILE',
                       help='PEM CA bundle; when given, clients must present a certificate it '
                       'signed (mutual TLS)')
    group.add_argument('--tokens', default='', metavar='FILE',
                       help="'vehicle_id token [Method,...]' lines; every call but health and "
                       'reflection then needs "authorization: Bearer <token>" metadata')
    group.add_argument('--insecure', nargs='?', const=True, default=False, type=_boolean,
                       metavar='true|false',
                       help='serve plaintext without TLS (loopback, a trusted network, or behind '
                       "a TLS-terminating proxy only); a value ('--insecure false') lets launch "
                       'files pass it like every other option')
    if not call_limit:
        parser.set_defaults(max_calls_per_client=0)
        return
    group.add_argument('--max-calls-per-client', type=int, default=0, metavar='N',
                       help='concurrent Detect calls one client (vehicle, certificate or '
                       'address) may have; more answer RESOURCE_EXHAUSTED at once (0 = no limit)')


def _boolean(text: str) -> bool:
    if text.lower() not in ('true', 'false'):
        raise argparse.ArgumentTypeError(f"expected 'true' or 'false', got {text!r}")
    return text.lower() == 'true'


@dataclass(frozen=True)
class ServerSecurity:
    """What the server listens with: credentials (None = plaintext) and interceptors."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple[grpc.ServerInterceptor, ...]
    description: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSecurity:
        """Load the files the options name; raise :class:`SecurityError` when they do not fit."""
        tls_given = [f'--{name.replace("_", "-")}' for name in
                     ('tls_cert', 'tls_key', 'tls_client_ca') if getattr(args, name)]
        if args.insecure and tls_given:
            raise SecurityError(f'--insecure contradicts {" ".join(tls_given)}')
        if not args.insecure and not (args.tls_cert and args.tls_key):
            raise SecurityError(
                'refusing to serve without TLS: pass --tls-cert and --tls-key (and '
                '--tls-client-ca for mutual TLS), or --insecure to serve plaintext explicitly')
        if args.max_calls_per_client < 0:
            raise SecurityError(
                f'--max-calls-per-client must be >= 0, got {args.max_calls_per_client}')
        tokens = TokenAuthority(load_tokens(args.tokens)) if args.tokens else None
        limiter = (ConcurrencyLimiter(args.max_calls_per_client)
                   if args.max_calls_per_client else None)
        parts = []
        if args.insecure:
            credentials = None
            parts.append('PLAINTEXT')
            _LOG.warning('serving PLAINTEXT (--insecure): frames, replies%s cross the network '
                         'unencrypted; use only on loopback, a trusted network or behind a '
                         'TLS-terminating proxy', ' and bearer tokens' if tokens else '')
        else:
            client_ca = (_read(args.tls_client_ca, 'client CA', secret=False)
                         if args.tls_client_ca else None)
            credentials = grpc.ssl_server_credentials(
                [(_read(args.tls_key, 'TLS key', secret=True),
                  _read(args.tls_cert, 'TLS certificate', secret=False))],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
            parts.append('mutual TLS' if client_ca else 'TLS')
        if tokens is not None:
            parts.append(f'bearer tokens of {len(tokens)} vehicle(s)')
        if limiter is not None:
            parts.append(f'at most {limiter.limit} concurrent Detect calls per client')
        interceptors = ((SecurityInterceptor(tokens, limiter),)
                        if tokens is not None or limiter is not None else ())
        return cls(credentials, interceptors, ', '.join(parts))


# --- client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client channel to the cloud is secured; ``credentials`` None means plaintext."""

    credentials: grpc.ChannelCredentials | None
    server_name: str = ''  # expected name in the server certificate, when it differs from host

    @classmethod
    def insecure(cls) -> ChannelSecurity:
        """Return plaintext, no token: only for a server on this machine or a trusted network."""
        return cls(None)

    @classmethod
    def from_settings(cls, *, insecure: bool, ca_file: str = '', cert_file: str = '',
                      key_file: str = '', token_file: str = '',
                      server_name: str = '') -> ChannelSecurity:
        """
        Build TLS credentials from files (paths; the secrets stay in the files).

        ``ca_file`` '' trusts the system's roots (a publicly signed server certificate);
        ``cert_file`` with ``key_file`` presents a client certificate (mutual TLS);
        ``token_file`` holds the vehicle's bearer token, sent with every call. A token never
        travels in plaintext: ``insecure`` with any of these files is an error.
        """
        given = [name for name, value in (('ca_file', ca_file), ('cert_file', cert_file),
                                          ('key_file', key_file), ('token_file', token_file),
                                          ('server_name', server_name)) if value]
        if insecure:
            if given:
                raise SecurityError(f'insecure (plaintext) contradicts {", ".join(given)}; a '
                                    'token or certificate is never sent without TLS')
            return cls.insecure()
        if bool(cert_file) != bool(key_file):
            raise SecurityError('a client certificate needs both cert_file and key_file')
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file, 'CA file', secret=False) if ca_file else None,
            private_key=_read(key_file, 'client key', secret=True) if key_file else None,
            certificate_chain=_read(cert_file, 'client certificate', secret=False)
            if cert_file else None)
        if token_file:
            token = _read(token_file, 'token file', secret=True).decode().strip()
            if len(token.split()) != 1:
                raise SecurityError(f'token file {token_file} must hold one token')
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token))
        return cls(credentials, server_name)

    def channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """Open a channel to ``target`` ('host:port') secured as configured."""
        if self.credentials is None:
            return grpc.insecure_channel(target, options=options)
        if self.server_name:
            options = [*options, ('grpc.ssl_target_name_override', self.server_name)]
        return grpc.secure_channel(target, self.credentials, options=options)
