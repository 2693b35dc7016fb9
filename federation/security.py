"""Site signing keys (Ed25519): created private to their owner, identified by fingerprint."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.files import write_atomically

__all__ = [
    "key_id",
    "load_or_create_secret",
    "load_or_create_signing_key",
    "load_public_key",
    "write_private_key",
]


def key_id(public_key: Ed25519PublicKey) -> str:
    """Fingerprint of a public key: sha256 of its raw bytes, first 16 hex digits."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a private key (PEM) readable by its owner only, and its public key beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_or_create_secret(path: Path, make: Callable[[], bytes], *, what: str) -> bytes:
    """A secret file's bytes, made by `make` (mode 0600) on first use.

    Raises:
        PermissionError: The file is readable by group or others (`what` names it).
    """
    if not path.exists():
        write_atomically(path, make(), mode=0o600)
    if path.stat().st_mode & 0o077:
        raise PermissionError(
            f"{what} {path} is readable by group or others; run `chmod 600 {path}`"
        )
    return path.read_bytes()


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, created (mode 0600) on first use.

    Raises:
        PermissionError: The key file is readable by others than its owner.
    """
    if not path.exists():
        write_private_key(Ed25519PrivateKey.generate(), path)
    if path.stat().st_mode & 0o077:
        raise PermissionError(
            f"signing key {path} is readable by group or others; run `chmod 600 {path}`"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM)."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
