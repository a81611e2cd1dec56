"""Signed model manifests: every forgery and accident is refused with a clear reason."""
import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
import pytest
from speculative_av.fleet.model_manifest import (load_public_keys, ManifestError, release,
                                                 signature_path, verify_manifest)
from speculative_av.tools import model_release

KEY = Ed25519PrivateKey.generate()
TRUSTED = [KEY.public_key()]


@pytest.fixture
def signed(tmp_path: Path) -> Path:
    weights = tmp_path / 'model.pt'
    weights.write_bytes(os.urandom(4096))
    return release(weights, name='local-ssdlite', version='2', architecture='ssdlite',
                   private_key=KEY)


def _resign(manifest: Path, data: dict | bytes, key: Ed25519PrivateKey = KEY) -> None:
    """Write ``data`` as the manifest with a valid signature: the signer made the mistake."""
    text = data if isinstance(data, bytes) else json.dumps(data).encode()
    manifest.write_bytes(text)
    signature_path(manifest).write_bytes(base64.b64encode(key.sign(text)))


def _refused(manifest: Path, reason: str, keys=TRUSTED) -> None:
    with pytest.raises(ManifestError, match=reason):
        verify_manifest(manifest, keys)


def test_a_signed_release_verifies_and_names_its_weights(signed):
    manifest = verify_manifest(signed, TRUSTED)
    assert manifest.label == 'local-ssdlite:2'
    assert manifest.weights == signed.parent / 'model.pt'
    assert manifest.size == 4096


def test_a_signature_by_an_untrusted_key_is_refused(signed):
    other = Ed25519PrivateKey.generate()
    _refused(signed, 'any trusted key', [other.public_key()])
    _refused(signed, 'no trusted public key', [])


def test_a_tampered_manifest_is_refused_before_it_is_parsed(signed):
    data = json.loads(signed.read_text())
    data['version'] = '3'
    signed.write_text(json.dumps(data))
    _refused(signed, 'does not verify')
    signed.write_bytes(b'{not json')
    _refused(signed, 'does not verify')  # the signature is checked first


@pytest.mark.parametrize('signature', [b'', b'!!! not base64 !!!', b'A' * 2000,
                                       base64.b64encode(b'x' * 64)])
def test_a_malformed_or_wrong_signature_is_refused(signed, signature):
    signature_path(signed).write_bytes(signature)
    _refused(signed, 'signature')


def test_a_missing_signature_is_refused(signed):
    signature_path(signed).unlink()
    _refused(signed, 'cannot read signature')


def test_tampered_weights_of_the_same_size_fail_the_digest(signed):
    weights = signed.parent / 'model.pt'
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    _refused(signed, 'sha256')


@pytest.mark.parametrize('size', [4095, 4097, 0])
def test_weights_of_another_size_are_refused_before_hashing(signed, size):
    (signed.parent / 'model.pt').write_bytes(b'x' * size)
    _refused(signed, 'bytes, the manifest says 4096')


@pytest.mark.parametrize('text', [b'{not json', b'[1, 2]', b'\xff\xfe', b'null',
                                  b'{"name": "a"}'])
def test_malformed_signed_json_is_refused(signed, text):
    _resign(signed, text)
    _refused(signed, 'not JSON|not an object|must be a')


@pytest.mark.parametrize('field, value, reason', [
    ('file', '../model.pt', 'plain file name'), ('file', '/etc/passwd', 'plain file name'),
    ('file', 'sub/model.pt', 'plain file name'), ('file', '..', 'plain file name'),
    ('file', '', 'plain file name'), ('file', 'a\\b', 'plain file name'),
    ('sha256', 'ABC', 'hex'), ('bytes', -1, 'out of'), ('bytes', True, 'must be a int'),
    ('bytes', 10 ** 20, 'out of'), ('version', 'a b', 'letters'), ('name', '', 'letters'),
    ('name', 'x' * 200, 'letters'), ('model_kwargs', [1], 'object'), ('extra', 1, 'unknown'),
])
def test_hostile_fields_are_refused_even_when_signed(signed, field, value, reason):
    data = json.loads(signed.read_text())
    data[field] = value
    _resign(signed, data)
    _refused(signed, reason)


def test_weights_reached_through_a_link_outside_the_directory_are_refused(signed, tmp_path):
    outside = tmp_path.parent / f'{tmp_path.name}-outside.pt'
    (signed.parent / 'model.pt').rename(outside)
    (signed.parent / 'model.pt').symlink_to(outside)
    try:
        _refused(signed, 'outside')
    finally:
        outside.unlink()


def test_a_missing_weights_file_or_an_oversized_manifest_is_refused(signed):
    (signed.parent / 'model.pt').unlink()
    _refused(signed, 'weights')
    signed.write_bytes(b' ' * (64 * 1024 + 1))
    _refused(signed, 'more than')


def test_the_cli_makes_keys_signs_and_verifies(tmp_path, capsys):
    private, public = tmp_path / 'release.key', tmp_path / 'release.pub'
    assert model_release.main(['keygen', '--private', str(private), '--public', str(public)]) == 0
    assert private.stat().st_mode & 0o077 == 0
    assert model_release.main(['keygen', '--private', str(private), '--public', str(public)]) == 1
    weights = tmp_path / 'w.pt'
    weights.write_bytes(b'weights')
    assert model_release.main(['sign', '--key', str(private), '--weights', str(weights),
                               '--name', 'local', '--version', '7']) == 0
    assert model_release.main(['verify', '--manifest', str(tmp_path / 'w.json'),
                               '--trusted', str(public)]) == 0
    assert 'verified local:7' in capsys.readouterr().out
    weights.write_bytes(b'weightz')
    assert model_release.main(['verify', '--manifest', str(tmp_path / 'w.json'),
                               '--trusted', str(public)]) == 1
    assert 'sha256' in capsys.readouterr().err
    with pytest.raises(ManifestError, match='not a PEM'):
        load_public_keys([private])
