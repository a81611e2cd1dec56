"""
Signed model manifests: the only way a model reaches a vehicle or server over the air.

A release is three files side by side: the weights (a checkpoint), ``<name>.json`` (the manifest:
name, version, architecture, the weights' file name, size and sha256) and ``<name>.json.sig`` (a
detached Ed25519 signature over the manifest's exact bytes, base64). :func:`verify_manifest`
checks them in the order that spends the least on a forgery: the signature first (a manifest no
trusted key signed is not even parsed), then the size of the weights (stat, nothing read), then
their sha256. Every refusal is a :class:`ManifestError` saying what was wrong.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import asdict, dataclass, field
import datetime
import hashlib
import json
import os
from pathlib import Path
import re
from typing import Any, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_SUFFIX = '.sig'
MAX_MANIFEST_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 1024
MAX_KEY_BYTES = 16 * 1024
MAX_MODEL_BYTES = 4 * 1024 ** 3
_HASH_CHUNK = 1024 * 1024
_SHA256 = re.compile(r'[0-9a-f]{64}')
_LABEL = re.compile(r'[A-Za-z0-9][A-Za-z0-9._+-]{0,127}')  # a name or version


class ManifestError(ValueError):
    """A manifest, its signature or its weights cannot be trusted (the message says why)."""


@dataclass(frozen=True)
class ModelManifest:
    """A verified release: what the model is and where its weights lie."""

    name: str
    version: str
    architecture: str
    file: str  # the weights' file name, in the manifest's directory
    sha256: str
    size: int  # 'bytes' in the JSON
    created: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    directory: Path = Path('.')  # where the manifest was read from (not part of the JSON)

    @property
    def weights(self) -> Path:
        """Return the path of the weights file."""
        return self.directory / self.file

    @property
    def label(self) -> str:
        """Return ``name:version``, how frames and replies name the model."""
        return f'{self.name}:{self.version}'


def manifest_json(manifest: ModelManifest) -> bytes:
    """Return the manifest's JSON bytes (what is signed)."""
    data = asdict(manifest)
    del data['directory']
    data['bytes'] = data.pop('size')
    return (json.dumps(data, indent=2, sort_keys=True) + '\n').encode()


def signature_path(manifest: str | Path) -> Path:
    """Return where the detached signature of ``manifest`` lies."""
    return Path(f'{manifest}{SIGNATURE_SUFFIX}')


def _read_small(path: Path, limit: int, what: str) -> bytes:
    """Read ``path`` if it is a regular file of at most ``limit`` bytes (size checked first)."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ManifestError(f'cannot read {what} {path}: {error.strerror or error}') from None
    if not path.is_file():
        raise ManifestError(f'{what} {path} is not a regular file')
    if size > limit:
        raise ManifestError(f'{what} {path} has {size} bytes, more than the {limit} allowed')
    try:
        with path.open('rb') as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise ManifestError(f'cannot read {what} {path}: {error.strerror or error}') from None
    if len(data) > limit:  # grew since the size check
        raise ManifestError(f'{what} {path} has more than the {limit} bytes allowed')
    return data


def load_public_keys(paths: Sequence[str | Path]) -> list[Ed25519PublicKey]:
    """Load the trusted Ed25519 public keys (PEM files); refuse any other kind of key."""
    keys = []
    for path in paths:
        data = _read_small(Path(path), MAX_KEY_BYTES, 'public key')
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as error:
            raise ManifestError(f'public key {path} is not a PEM public key: {error}') from None
        if not isinstance(key, Ed25519PublicKey):
            raise ManifestError(f'public key {path} is a {type(key).__name__}, not Ed25519')
        keys.append(key)
    return keys


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (unencrypted PEM, as ``model_release keygen`` writes it)."""
    data = _read_small(Path(path), MAX_KEY_BYTES, 'private key')
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ManifestError(f'private key {path} is not an unencrypted PEM key: {error}') from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f'private key {path} is a {type(key).__name__}, not Ed25519')
    return key


def verify_manifest(path: str | Path,
                    trusted_public_keys: Sequence[Ed25519PublicKey]) -> ModelManifest:
    """
    Return the manifest at ``path`` once its signature, weights size and sha256 check out.

    Raises :class:`ManifestError` for anything else: no trusted key, a signature that no trusted
    key made, malformed JSON or fields, a weights file outside the manifest's directory, a size
    or digest that differs.
    """
    path = Path(path)
    if not trusted_public_keys:
        raise ManifestError('no trusted public key: every manifest is refused')
    text = _read_small(path, MAX_MANIFEST_BYTES, 'manifest')
    encoded = _read_small(signature_path(path), MAX_SIGNATURE_BYTES, 'signature').strip()
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(f'signature {signature_path(path)} is not base64') from None
    if not any(_verifies(key, signature, text) for key in trusted_public_keys):
        raise ManifestError(f'manifest {path}: the signature does not verify with any trusted '
                            'key (tampered, or signed by a key this machine does not trust)')
    manifest = _parse(text, path)
    _check_weights(manifest)
    return manifest


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _parse(text: bytes, path: Path) -> ModelManifest:
    """Build the manifest from signed JSON, checking every field's type and form."""
    try:
        data = json.loads(text.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f'manifest {path} is not JSON: {error}') from None
    if not isinstance(data, dict):
        raise ManifestError(f'manifest {path} holds a {type(data).__name__}, not an object')
    fields = {'name': str, 'version': str, 'architecture': str, 'file': str, 'sha256': str,
              'bytes': int, 'created': str}
    for name, kind in fields.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(f'manifest {path}: {name!r} must be a {kind.__name__}, '
                                f'got {value!r}'[:300])
    kwargs = data.get('model_kwargs', {})
    if not isinstance(kwargs, dict):
        raise ManifestError(f'manifest {path}: model_kwargs must be an object')
    unknown = set(data) - set(fields) - {'model_kwargs'}
    if unknown:
        raise ManifestError(f'manifest {path}: unknown fields {sorted(unknown)}')
    for name in ('name', 'version', 'architecture'):
        if not _LABEL.fullmatch(data[name]):
            raise ManifestError(f'manifest {path}: {name} {data[name][:100]!r} is not 1-128 '
                                'letters, digits or ._+-')
    if not _SHA256.fullmatch(data['sha256']):
        raise ManifestError(f'manifest {path}: sha256 must be 64 lowercase hex digits')
    if not 0 < data['bytes'] <= MAX_MODEL_BYTES:
        raise ManifestError(f'manifest {path}: bytes {data["bytes"]} out of (0, '
                            f'{MAX_MODEL_BYTES}]')
    _check_file_name(data['file'], path)
    return ModelManifest(data['name'], data['version'], data['architecture'], data['file'],
                         data['sha256'], data['bytes'], data['created'], kwargs, path.parent)


def _check_file_name(name: str, path: Path) -> None:
    """Allow only a plain file name: weights lie beside their manifest, nowhere else."""
    if (not name or name in ('.', '..') or '/' in name or '\\' in name or '\0' in name
            or name != os.path.basename(name)):
        raise ManifestError(f'manifest {path}: file {name[:200]!r} must be a plain file name '
                            'in the manifest directory')


def _check_weights(manifest: ModelManifest) -> None:
    """Compare the weights' size (before reading anything), then their sha256."""
    weights = manifest.weights
    directory = manifest.directory.resolve()
    if weights.resolve().parent != directory:
        raise ManifestError(f'weights {weights} lead outside {directory} (a link)')
    try:
        size = weights.stat().st_size
    except OSError as error:
        raise ManifestError(f'weights {weights}: {error.strerror or error}') from None
    if not weights.is_file():
        raise ManifestError(f'weights {weights} is not a regular file')
    if size != manifest.size:
        raise ManifestError(f'weights {weights} have {size} bytes, the manifest says '
                            f'{manifest.size}')
    digest = file_sha256(weights, manifest.size)
    if digest != manifest.sha256:
        raise ManifestError(f'weights {weights} have sha256 {digest}, the manifest says '
                            f'{manifest.sha256}')


def file_sha256(path: Path, limit: int = MAX_MODEL_BYTES) -> str:
    """Return the sha256 of at most ``limit`` + 1 bytes of ``path`` (a grown file differs)."""
    digest = hashlib.sha256()
    left = limit + 1
    with path.open('rb') as stream:
        while left > 0 and (chunk := stream.read(min(_HASH_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def release(weights: str | Path, *, name: str, version: str, architecture: str,
            private_key: Ed25519PrivateKey, model_kwargs: dict[str, Any] | None = None,
            manifest: str | Path | None = None) -> Path:
    """
    Write and sign the manifest of ``weights`` (beside them); return the manifest's path.

    The manifest is ``<weights stem>.json`` unless ``manifest`` names another file in the same
    directory. The result is checked with the key's own public half before returning.
    """
    weights = Path(weights)
    size = weights.stat().st_size
    path = Path(manifest) if manifest is not None else weights.with_suffix('.json')
    if path.resolve().parent != weights.resolve().parent:
        raise ManifestError('the manifest must lie in the same directory as the weights')
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    text = manifest_json(ModelManifest(name, version, architecture, weights.name,
                                       file_sha256(weights, size), size, created,
                                       dict(model_kwargs or {})))
    _parse(text, path)  # refuse a name or version no vehicle would accept
    path.write_bytes(text)
    signature = base64.b64encode(private_key.sign(text)) + b'\n'
    signature_path(path).write_bytes(signature)
    verify_manifest(path, [private_key.public_key()])
    return path
