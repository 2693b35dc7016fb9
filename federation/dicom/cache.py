"""Content-addressed cache of prepared volumes, and the scan index that makes re-runs cheap.

Layout of a cache folder (site-local, under the site's state folder):
`index.json` (header facts and content hashes of every scanned file, by path),
`volumes/<key>.image.npy`, `<key>.label.npy` and `<key>.json` per prepared series.
Class labels are not part of a volume here: they come from the site's CSV on every run.
A key is a hash of the series' file contents, its label files and the preparation
options, so changed files (or options) give new keys and unchanged series are reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np

from federation.dicom.scan import Instance
from federation.dicom.volume import Volume
from federation.files import write_atomically

__all__ = ["PIPELINE_VERSION", "VolumeCache", "file_hash"]

PIPELINE_VERSION = "2"  # 2: int16 HU where exact, no class labels


def file_hash(inst: Instance) -> str:
    """The content hash of an instance's file, computed once and kept in the instance."""
    if not inst.content_hash:
        with open(inst.path, "rb") as fh:
            inst.content_hash = hashlib.sha256(fh.read()).hexdigest()[:32]
    return inst.content_hash


class VolumeCache:
    """Prepared volumes keyed by content hash, plus the scan index."""

    def __init__(self, root: Path) -> None:
        """Use (and create) the cache folder `root`."""
        self.root = root
        self.volumes = root / "volumes"
        self.volumes.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(image_hashes: list[str], label_hashes: list[str], options: str) -> str:
        """The cache key of a series from its contents and the preparation options."""
        text = "\n".join([PIPELINE_VERSION, options, *sorted(image_hashes), "|", *label_hashes])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load_index(self) -> dict[str, Instance]:
        """Instances of the last scan by path (empty when none or unreadable)."""
        path = self.root / "index.json"
        try:
            raw = json.loads(path.read_text())
            return {p: Instance.from_dict(d) for p, d in raw.items()}
        except (OSError, ValueError, TypeError):
            return {}

    def save_index(self, instances: list[Instance]) -> None:
        """Remember the scanned instances (with their content hashes) for the next run."""
        data = json.dumps({i.path: i.to_dict() for i in instances})
        write_atomically(self.root / "index.json", lambda p: p.write_text(data))

    def has(self, key: str) -> bool:
        """Whether a prepared volume with this key is stored."""
        return (self.volumes / f"{key}.json").exists()

    def put(self, key: str, volume: Volume) -> None:
        """Store a prepared volume (image, optional mask and geometry)."""
        write_atomically(self.volumes / f"{key}.image.npy", lambda p: _save(p, volume.hu))
        if volume.label is not None:
            label = volume.label
            write_atomically(self.volumes / f"{key}.label.npy", lambda p: _save(p, label))
        meta = {
            "series_uid": volume.series_uid,
            "study_uid": volume.study_uid,
            "patient_key": volume.patient_key,
            "manufacturer": volume.manufacturer,
            "modality": volume.modality,
            "spacing": list(volume.spacing),
            "origin": [float(v) for v in volume.origin],
            "direction": np.asarray(volume.direction).tolist(),
            "sop_uids": volume.sop_uids,
            "has_label": volume.label is not None,
        }
        write_atomically(self.volumes / f"{key}.json", lambda p: p.write_text(json.dumps(meta)))

    def prune(self, *, keep: set[str]) -> int:
        """Delete stored volumes whose key is not in `keep`; return how many."""
        stored = {p.name.split(".")[0] for p in self.volumes.iterdir() if p.name[0] != "."}
        stale = stored - keep  # hidden names are writes in progress
        for key in stale:
            for path in self.volumes.glob(f"{key}.*"):
                path.unlink(missing_ok=True)
        return len(stale)

    def get(self, key: str, *, mmap: bool = True) -> Volume:
        """Read a stored volume (memory-mapped by default); class labels are not cached.

        Memory-mapped arrays are copy-on-write: what a caller changes stays in its memory.

        Raises:
            FileNotFoundError: No volume has this key.

        """
        meta = json.loads((self.volumes / f"{key}.json").read_text())
        mode: Literal["c"] | None = "c" if mmap else None
        label = None
        if meta["has_label"]:
            label = np.load(self.volumes / f"{key}.label.npy", mmap_mode=mode)
        return Volume(
            series_uid=meta["series_uid"],
            patient_key=meta["patient_key"],
            manufacturer=meta["manufacturer"],
            hu=np.load(self.volumes / f"{key}.image.npy", mmap_mode=mode),
            spacing=(meta["spacing"][0], meta["spacing"][1], meta["spacing"][2]),
            origin=np.asarray(meta["origin"]),
            direction=np.asarray(meta["direction"]),
            sop_uids=meta["sop_uids"],
            modality=meta["modality"],
            label=label,
            study_uid=meta["study_uid"],
        )


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))
