"""CURVE key files: making them, and reading them for servers and clients.

A key pair is two files in ZeroMQ's certificate format: `NAME.key` (the public key, to give to
the other side) and `NAME.key_secret` (the public and the secret key, readable by its owner
only). A server takes its own secret file and a directory of the public files of the clients it
admits; a client takes its own secret file and the server's public file. A pair made for one
run only (the HTTP front end's, under `serve`) is a `KeyPair` held in memory instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    if not name or name.startswith(".") or Path(name).name != name:
        raise CurveKeyError(f"a key's name must be a plain file name, not {name!r}")
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


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair in memory, as Z85 text (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> KeyPair:
        """A fresh pair."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def text(self) -> str:
        """The pair as one line of text (`from_text` reads it back)."""
        return f"{self.public.decode()} {self.secret.decode()}"  # Z85 has no space

    @classmethod
    def from_text(cls, text: str) -> KeyPair:
        """The pair `text()` wrote; CurveKeyError for anything else."""
        public, _, secret = text.partition(" ")
        if len(public) != 40 or len(secret) != 40:
            raise CurveKeyError("not a CURVE key pair (two 40-character Z85 keys)")
        return cls(public.encode(), secret.encode())


def load_secret(path: str | os.PathLike[str] | KeyPair) -> tuple[bytes, bytes]:
    """(public, secret) key from a NAME.key_secret file (or of a pair in memory)."""
    if isinstance(path, KeyPair):
        return path.public, path.secret
    public, secret = _load(path)
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def admitted_keys(clients: str | os.PathLike[str]) -> set[bytes]:
    """The public keys (Z85) of the NAME.key files in the directory `clients`."""
    if not Path(clients).is_dir():
        raise CurveKeyError(f"{clients}: no directory of client public keys")
    return set(zmq.auth.load_certificates(clients))


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
