"""Study- or series-level class labels from a CSV keyed by Study/Series Instance UID."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["LABELS_CSV", "read_class_labels"]

# The labels CSV a site keeps at the top of its DICOM folder.
LABELS_CSV = "labels.csv"
_UID_COLUMNS = ("SeriesInstanceUID", "StudyInstanceUID")


def read_class_labels(path: Path) -> dict[str, str]:
    """UID -> class label, from a CSV with a `label` column and a UID column.

    A row may give a SeriesInstanceUID, a StudyInstanceUID or both; a series label wins
    over its study's when both are present.

    Raises:
        ValueError: The columns are missing, or one UID has two different labels.

    """
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        uid_columns = [c for c in _UID_COLUMNS if c in columns]
        if "label" not in columns or not uid_columns:
            raise ValueError(
                f"{path}: a labels CSV needs a 'label' column and a 'SeriesInstanceUID' or "
                f"'StudyInstanceUID' column; it has {sorted(columns)}."
            )
        labels: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip()
            for column in uid_columns:
                uid = (row.get(column) or "").strip()
                if not uid or not label:
                    continue
                if labels.get(uid, label) != label:
                    raise ValueError(
                        f"{path}:{line}: {column} {uid} is labelled both {labels[uid]!r} and "
                        f"{label!r}; keep one label per UID."
                    )
                labels[uid] = label
    return labels
