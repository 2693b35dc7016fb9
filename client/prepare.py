"""Site-side preparation: the site's data policy and its prepared-data folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from federation.dicom.phi import check_gate_choices
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
        require_deidentified: Judge every file against PS3.15's Basic Profile (on unless
            the site turns it off).
        on_phi: What a file that fails means: "quarantine" (the default) leaves out its
            series, with the reasons in the site's quarantine list, and goes on with the
            rest; "refuse" refuses the round, naming the files in the site's log.
        private_tags: "remove" (the profile's rule: private attributes fail) or "keep"
            (the site accepts what its own devices write there).
    """

    require_deidentified: bool = True
    on_phi: str = "quarantine"
    private_tags: str = "remove"

    def __post_init__(self) -> None:
        check_gate_choices(on_phi=self.on_phi, private_tags=self.private_tags)

    def save(self, state_dir: Path) -> Path:
        """Write the policy into the site's state folder."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / DATA_POLICY_FILE
        path.write_text(yaml.safe_dump({"data": asdict(self)}, sort_keys=False))
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
        known = {f.name for f in fields(cls)}
        if (
            not isinstance(section, dict)
            or not isinstance(section.get("require_deidentified"), bool)
            or not set(section) <= known
        ):
            raise ValueError(
                f"{path}: expected 'data: {{require_deidentified: true|false, on_phi: "
                "quarantine|refuse, private_tags: remove|keep}'; rewrite it with "
                "medfed site data-policy"
            )
        return cls(**section)

    def options(self, *, progress: bool = False) -> PrepareOptions:
        """Preparation options that follow this policy."""
        return PrepareOptions(
            require_deidentified=self.require_deidentified,
            on_phi=self.on_phi,
            private_tags=self.private_tags,
            progress=progress,
        )


def prepared_dir(state_dir: Path) -> Path:
    """Where a site keeps its prepared-volume cache, manifest and quarantine report."""
    return state_dir / PREPARED_DIR


def prepare_options(state_dir: Path, *, progress: bool = False) -> PrepareOptions:
    """Preparation options that follow the site's data policy."""
    return DataPolicy.load(state_dir).options(progress=progress)
