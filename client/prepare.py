"""Site-side preparation: the site's data policy and its prepared-data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from federation.dicom.prepare import PrepareOptions

__all__ = [
    "DATA_POLICY_FILE",
    "PREPARED_DIR",
    "DataPolicy",
    "prepare_options",
    "prepared_dir",
]

DATA_POLICY_FILE = "data-policy.yaml"
PREPARED_DIR = "prepared"


@dataclass(frozen=True)
class DataPolicy:
    """What the site allows its data pipeline to use.

    Attributes:
        require_deidentified: Refuse any file that is not de-identified
            (PatientIdentityRemoved=YES and no PHI attribute values), naming the files.
    """

    require_deidentified: bool = False

    def save(self, state_dir: Path) -> Path:
        """Write the policy into the site's state folder."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / DATA_POLICY_FILE
        path.write_text(
            yaml.safe_dump({"data": {"require_deidentified": self.require_deidentified}})
        )
        return path

    @classmethod
    def load(cls, state_dir: Path) -> DataPolicy:
        """The site's data policy (the default when it has none).

        Raises:
            ValueError: The file exists but is not a valid data policy.
        """
        path = state_dir / DATA_POLICY_FILE
        if not path.exists():
            return cls()
        raw = yaml.safe_load(path.read_text()) or {}
        section = raw.get("data") if isinstance(raw, dict) else None
        value = section.get("require_deidentified") if isinstance(section, dict) else None
        if not isinstance(value, bool):
            raise ValueError(
                f"{path}: expected 'data: {{require_deidentified: true|false}}'; "
                "rewrite it with medfed site data-policy"
            )
        return cls(require_deidentified=value)


def prepared_dir(state_dir: Path) -> Path:
    """Where a site keeps its prepared-volume cache, manifest and quarantine report."""
    return state_dir / PREPARED_DIR


def prepare_options(state_dir: Path, *, progress: bool = False) -> PrepareOptions:
    """Preparation options that follow the site's data policy."""
    policy = DataPolicy.load(state_dir)
    return PrepareOptions(require_deidentified=policy.require_deidentified, progress=progress)
