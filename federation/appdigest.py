"""The identity of a Flower app's code: a digest over its files, and this release's own.

A FAB is a zip; its sha256 (Flower's FAB hash) changes with how the zip was compressed.
The *app digest* is a sha256 over each file's path and content hash, so the same code
gives the same digest wherever it was bundled. Sites trust apps by it
(`client.apptrust`), training-plan hashes include it, and the coordinator prints it for
each run it submits.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zipfile
from pathlib import Path

__all__ = ["app_digest", "release_digest", "source_digest", "source_files"]


def app_digest(fab: bytes) -> str:
    """sha256 over the FAB's files (path and content hash each), independent of compression.

    Raises:
        ValueError: The bytes are not a zip archive.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as err:
        raise ValueError(f"not a Flower app bundle: {err}") from err
    digest = hashlib.sha256()
    with archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


@functools.cache
def source_digest(*packages: str) -> str:
    """sha256 over the Python files of these folders of this install (path and content).

    Args:
        packages: Folders relative to the source root, such as "federation/dicom".
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in packages:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def source_files(root: Path) -> dict[str, Path]:
    """The files under `root` that Flower's FAB builder would look at.

    Flower walks and resolves every file (a virtual environment too: seconds), then
    drops what `.gitignore` names; folders `.gitignore` names are skipped here instead.
    """
    from flwr.cli.utils import build_pathspec  # the patterns as Flower reads them

    ignore_file = root / ".gitignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.is_file() else []
    ignored = build_pathspec([".git/", *lines])
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not ignored.match_file(f"{(here / d).as_posix()}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[(here / name).as_posix()] = path
    return files


@functools.lru_cache(maxsize=1)
def release_digest() -> str | None:
    """App digest of the medfed installed here (its source tree bundled as Flower would).

    None when medfed was not installed from a source tree (no pyproject.toml beside it).
    """
    from flwr.cli.build import build_fab_from_files

    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return None
    return app_digest(build_fab_from_files(source_files(root))[0])
