"""Files written whole or not at all."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(
    path: Path, data: bytes | str | Callable[[Path], object], *, mode: int | None = None
) -> None:
    """Write `path` through a temporary file beside it, renamed over it once complete.

    A crash mid-write leaves the previous file; concurrent writers (processes, threads)
    never share a temporary file.

    Args:
        path: The file to write; its folder is created if missing.
        data: The content (bytes or text), or a function that writes the temporary file
            it is given (e.g. `torch.save`, `numpy.save`, `Dataset.save_as`).
        mode: Permission bits of the new file (default: the process's umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
