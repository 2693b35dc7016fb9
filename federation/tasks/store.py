"""A task's prepared dataset on disk: tensors read memory-mapped, no pickled code.

Preparing a site's volumes for a task (windowing, resizing, splitting) costs a tenth of
a second or more of CPU each time a ClientApp starts, and each message of a deployment
starts one. Stored once, a dataset loads memory-mapped in milliseconds, and processes
that load the same file share its pages.

Only tensors, NumPy arrays, plain values and the dataset types the tasks register
(`stored`) are written; loading uses `torch.load(weights_only=True)`, so a file can hold
no code, and a type that is not registered is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from federation.appdigest import source_digest
from federation.files import write_atomically

__all__ = ["DatasetStore", "StoredDatasetError", "code_fingerprint", "stored"]

T = TypeVar("T", bound=type)

_TYPES: dict[str, type] = {}
# Markers of what is not a tensor, list or plain value in a stored file.
_TYPE, _FIELDS, _ARRAY = "__type__", "__fields__", "__ndarray__"
_TUPLE, _DICT = "__tuple__", "__dict__"
# The code whose output a stored dataset is: a change to any of it makes new files.
_CODE = ("federation/tasks", "federation/dicom")
_TASKS = "federation.tasks."


class StoredDatasetError(ValueError):
    """A stored dataset holds something that cannot be stored or loaded."""


def stored(cls: T) -> T:
    """Register a dataset type (a dataclass or NamedTuple) that may be stored."""
    _TYPES[f"{cls.__module__}:{cls.__qualname__}"] = cls
    return cls


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().contiguous()
    if isinstance(value, np.ndarray):
        return {_ARRAY: torch.from_numpy(np.ascontiguousarray(value))}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    name = f"{type(value).__module__}:{type(value).__qualname__}"
    if name in _TYPES:
        if dataclasses.is_dataclass(value):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        else:  # a NamedTuple
            fields = value._asdict()
        return {_TYPE: name, _FIELDS: {k: _encode(v) for k, v in fields.items()}}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {_DICT: {k: _encode(v) for k, v in value.items()}}
    raise StoredDatasetError(
        f"a dataset holding {name} cannot be stored: register the type with "
        "federation.tasks.store.stored, or hold tensors, arrays, lists and plain values"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if _ARRAY in value:
        return value[_ARRAY].numpy()
    if _TUPLE in value:
        return tuple(_decode(v) for v in value[_TUPLE])
    if _DICT in value:
        return {k: _decode(v) for k, v in value[_DICT].items()}
    name = value[_TYPE]
    module = name.split(":", 1)[0]
    if name not in _TYPES and module.startswith(_TASKS):  # registered when it is imported
        importlib.import_module(module)
    if name not in _TYPES:
        raise StoredDatasetError(f"stored dataset type {name} is not registered")
    return _TYPES[name](**{k: _decode(v) for k, v in value[_FIELDS].items()})


def code_fingerprint() -> str:
    """Hash of the preparation code (the tasks and the DICOM pipeline) of this install."""
    return source_digest(*_CODE)


class DatasetStore:
    """Prepared datasets in a folder, one file per key; the most recent `keep` are kept."""

    def __init__(self, folder: Path, *, keep: int = 4) -> None:
        self.folder = folder
        self.keep = keep

    @staticmethod
    def key(*parts: object) -> str:
        """A file key for a dataset made from `parts` by this install's code."""
        digest = hashlib.sha256(code_fingerprint().encode())
        for part in parts:
            digest.update(b"\0" + repr(part).encode())
        return digest.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> Any | None:
        """The dataset stored under `key` (its tensors memory-mapped), or None.

        A file that cannot be read is removed and reported as missing.
        """
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            raw = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            dataset = _decode(raw)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.PickleError):
            path.unlink(missing_ok=True)  # unreadable or of an unknown type: prepare again
            return None
        with contextlib.suppress(OSError):
            path.touch()  # most recently used
        return dataset

    def save(self, key: str, dataset: Any) -> None:
        """Store `dataset` under `key`, dropping the least recently used beyond `keep`."""
        encoded = _encode(dataset)
        write_atomically(self._path(key), lambda tmp: torch.save(encoded, tmp))
        files = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[self.keep :]:
            old.unlink(missing_ok=True)

    def load_or_prepare(self, key: str, prepare: Callable[[], Any]) -> Any:
        """The stored dataset, or `prepare()`'s, stored and loaded back memory-mapped."""
        dataset = self.load(key)
        if dataset is None:
            prepared = prepare()
            self.save(key, prepared)
            dataset = self.load(key)
            return prepared if dataset is None else dataset
        return dataset
