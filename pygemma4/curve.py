"""CURVE key files: making them, and reading them for servers and clients.

A key pair is two files in ZeroMQ's certificate format: `NAME.key` (the public key, to give to
the other side) and `NAME.key_secret` (the public and the secret key, readable by its owner
only). A server takes its own secret file and a directory of the public files of the clients it
admits; a client takes its own secret file and the server's public file.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from pygemma4.errors import Gemma4Error


class CurveKeyError(Gemma4Error, ValueError):
    """A key file is missing or is not a CURVE key file of the kind needed."""


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new key pair as DIRECTORY/NAME.key and DIRECTORY/NAME.key_secret (refusing to
    overwrite either); returns their paths."""
    if not zmq.has("curve"):
        raise CurveKeyError("this ZeroMQ library was built without CURVE")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise CurveKeyError(f"{path} exists already; choose another name or directory")
    folder.mkdir(parents=True, exist_ok=True)
    # Created readable by the owner only, so the secret is never readable by others, even
    # for a moment; the public file is then opened up.
    umask = os.umask(0o077)
    try:
        created_public, created_secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(umask)
    os.chmod(created_public, 0o644)
    return Path(created_public), Path(created_secret)


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) key from a NAME.key_secret file."""
    public, secret = _load(path)
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key from a NAME.key (or NAME.key_secret) file."""
    return _load(path)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    if not Path(path).is_file():
        raise CurveKeyError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CurveKeyError(f"{path} is not a CURVE key file: {e}") from None
    if public is None or len(public) != 40:
        raise CurveKeyError(f"{path} is not a CURVE key file: no public key")
    return public, secret
