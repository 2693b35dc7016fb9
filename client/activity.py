"""What the site agent answered the coordinator, for the people at the site.

One JSON line per message handled: when, which run and round, what was asked, and the
refusal's reason if the site refused. The site console's status page reads it; nothing
in it leaves the site. The file keeps the most recent entries only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from pathlib import Path
from typing import Any

from federation.files import write_atomically

__all__ = ["ACTIVITY_FILE", "DATASETS_FILE", "SiteActivity"]

ACTIVITY_FILE = "activity.jsonl"
# Training examples of each dataset the site prepared (by fingerprint), the latest last:
# what a plan's privacy cost at this site depends on.
DATASETS_FILE = "datasets.json"
_KEEP = 500
_TRIM_BYTES = 2 * _KEEP * 200  # about twice the entries kept


class SiteActivity:
    """The site's recent answers to the coordinator."""

    def __init__(self, state_dir: Path) -> None:
        """Read and append `activity.jsonl` in the site's state folder."""
        self.path = state_dir / ACTIVITY_FILE
        self.datasets_path = state_dir / DATASETS_FILE

    def record(self, *, run: str, round: int, action: str, refused: str = "") -> None:
        """Append one answer (under a file lock), trimming the file to its recent entries."""
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run": run,
            "round": round,
            "action": action,
            "refused": refused,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(entry) + "\n")
            if fh.tell() > _TRIM_BYTES:  # read back only when it has grown past its bound
                fh.seek(0)
                lines = fh.readlines()
                fh.seek(0)
                fh.truncate()
                fh.writelines(lines[-_KEEP:])

    def recent(self, n: int = 50) -> list[dict[str, Any]]:
        """The latest `n` answers, newest first."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()[-n:]
        return [json.loads(line) for line in reversed(lines) if line.strip()]

    def note_dataset(self, fingerprint: str, num_train: int) -> None:
        """Remember a dataset's training examples (it becomes the latest)."""
        sizes = self.datasets()
        sizes.pop(fingerprint, None)
        sizes[fingerprint] = num_train
        write_atomically(self.datasets_path, json.dumps(sizes, indent=1))

    def datasets(self) -> dict[str, int]:
        """Training examples by dataset fingerprint, the latest last."""
        if not self.datasets_path.exists():
            return {}
        return {k: int(v) for k, v in json.loads(self.datasets_path.read_text()).items()}
