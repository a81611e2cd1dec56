"""
Release a model over the air: make a signing key pair, sign a checkpoint's manifest, verify one.

``model_release keygen --private release.key --public release.pub`` writes an Ed25519 key pair
(the private key only readable by its owner; vehicles and servers get the public one).
``model_release sign --key release.key --weights model.pt --name local --version 2`` writes
``model.json`` and ``model.json.sig`` beside the weights; ``model_release verify --manifest
model.json --trusted release.pub`` checks them as a vehicle would (exit code 1 if refused).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from speculative_av.fleet.model_manifest import (load_private_key, load_public_keys,
                                                 ManifestError, release, verify_manifest)


def keygen(private: Path, public: Path) -> None:
    """Write a new key pair; refuse to overwrite either file."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, 'wb') as stream:
        stream.write(private_pem)
    with public.open('xb') as stream:
        stream.write(public_pem)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description='sign and verify over-the-air model releases')
    commands = parser.add_subparsers(dest='command', required=True)
    generate = commands.add_parser('keygen', help='write a new Ed25519 signing key pair')
    generate.add_argument('--private', type=Path, required=True, help='private key (PEM) to write')
    generate.add_argument('--public', type=Path, required=True, help='public key (PEM) to write')
    sign = commands.add_parser('sign', help="write and sign a checkpoint's manifest")
    sign.add_argument('--key', type=Path, required=True, help='private key (PEM)')
    sign.add_argument('--weights', type=Path, required=True, help='the checkpoint file')
    sign.add_argument('--name', required=True, help='model name, e.g. local-ssdlite')
    sign.add_argument('--version', required=True, help='release version, e.g. 2026.11.30-1')
    sign.add_argument('--architecture', default='ssdlite320_mobilenet_v3_large',
                      help='torchvision detection builder the weights fit')
    sign.add_argument('--model-kwargs', default='{}', help='JSON object for the model builder')
    sign.add_argument('--manifest', type=Path, default=None,
                      help='manifest path (default: the weights with .json, same directory)')
    verify = commands.add_parser('verify', help='verify a manifest as a vehicle would')
    verify.add_argument('--manifest', type=Path, required=True)
    verify.add_argument('--trusted', type=Path, nargs='+', required=True,
                        help='trusted public keys (PEM)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one command; print errors to stderr and return 1 on a refusal."""
    args = parse_args(argv)
    try:
        if args.command == 'keygen':
            keygen(args.private, args.public)
            print(f'wrote {args.private} (keep it secret) and {args.public} (give it to vehicles)')
        elif args.command == 'sign':
            kwargs = json.loads(args.model_kwargs)
            if not isinstance(kwargs, dict):
                raise ManifestError('--model-kwargs must be a JSON object')
            path = release(args.weights, name=args.name, version=args.version,
                           architecture=args.architecture, model_kwargs=kwargs,
                           private_key=load_private_key(args.key), manifest=args.manifest)
            print(f'wrote {path} and {path}.sig')
        else:
            manifest = verify_manifest(args.manifest, load_public_keys(args.trusted))
            print(f'verified {manifest.label} ({manifest.architecture}, {manifest.size} bytes, '
                  f'sha256 {manifest.sha256})')
    except (ManifestError, OSError, ValueError) as error:
        print(f'model_release: {error}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
