"""The site's privacy gate: de-identified files pass, the rest are quarantined or refused.

Files are judged against PS3.15's Basic Application Level Confidentiality Profile
(`federation.dicom.profile`). What a failure means is the site's choice (`on_phi`):
"quarantine" leaves out each offending series with its reasons and goes on with the rest;
"refuse" refuses the whole preparation. Reasons name attributes and rules, never values;
the coordinator hears only counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from federation.dicom.profile import PRIVATE, action
from federation.dicom.scan import Instance, Problem

__all__ = [
    "NOT_DEIDENTIFIED",
    "ON_PHI",
    "PRIVATE_TAGS",
    "DeidentificationRequired",
    "check_gate_choices",
    "deidentification_gate",
    "identifying_values",
]

ON_PHI = ("quarantine", "refuse")
PRIVATE_TAGS = ("remove", "keep")
NOT_DEIDENTIFIED = "not de-identified"


def identifying_values(ds: Dataset) -> set[str]:
    """Every value (4+ characters) of an attribute the profile acts on, at any depth.

    For scanning what a site sends: none of these may leave it.
    """
    values: set[str] = set()
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                values |= identifying_values(item)
        elif elem.tag != 0x7FE00010 and (elem.tag.is_private or action(elem.tag)):
            text = "" if isinstance(elem.value, bytes) else str(elem.value).strip()
            if len(text) >= 4:
                values.add(text)
    return values


class DeidentificationRequired(ValueError):
    """The site's policy refuses data that is not de-identified, and these files are not."""

    def __init__(self, files: Sequence[str], reasons: Sequence[str]) -> None:
        """Name the files and why each is not de-identified."""
        self.files = list(files)
        self.reasons = list(reasons)
        super().__init__(self.files, self.reasons)

    def __str__(self) -> str:
        shown = "; ".join(
            f"{f}: {r}" for f, r in list(zip(self.files, self.reasons, strict=True))[:5]
        )
        more = f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""
        return (
            f"the site policy requires de-identified data, but {len(self.files)} files are "
            f"not: {shown}{more}. De-identify them with `medfed site deidentify` (PS3.15 "
            "Basic Profile), or set on_phi: quarantine to leave such series out."
        )


def check_gate_choices(*, on_phi: str, private_tags: str) -> None:
    """Refuse an `on_phi` or `private_tags` the gate does not know.

    Raises:
        ValueError: Naming both settings and their choices.
    """
    if on_phi not in ON_PHI or private_tags not in PRIVATE_TAGS:
        raise ValueError(
            f"on_phi={on_phi!r}, private_tags={private_tags!r}: choose on_phi from "
            f"{', '.join(ON_PHI)} and private_tags from {', '.join(PRIVATE_TAGS)}"
        )


def deidentification_gate(
    instances: list[Instance], *, on_phi: str, private_tags: str = "remove"
) -> tuple[list[Instance], list[Problem]]:
    """The instances that pass, and a problem for each file left out with its series.

    A series with one file that fails is left out whole, with every label of it; a label
    that fails is left out alone.

    Args:
        instances: Scanned files, with their `deid_problems`.
        on_phi: "quarantine" or "refuse" (see the module).
        private_tags: "remove": private attributes fail, as the Basic Profile says;
            "keep": the site accepts them (it knows what its devices put there).

    Raises:
        DeidentificationRequired: `on_phi` is "refuse" and a file fails.
        ValueError: `on_phi` or `private_tags` is not one of its choices.
    """
    check_gate_choices(on_phi=on_phi, private_tags=private_tags)
    accepted = PRIVATE if private_tags == "keep" else None
    why = {
        i.path: [r for r in i.deid_problems if accepted is None or not r.startswith(accepted)]
        for i in instances
    }
    failed = [i for i in instances if why[i.path]]
    if not failed:
        return instances, []
    if on_phi == "refuse":
        raise DeidentificationRequired(
            [i.path for i in failed], ["; ".join(why[i.path]) for i in failed]
        )
    bad_series = {i.series_uid for i in failed if i.kind == "image"}
    kept: list[Instance] = []
    problems: list[Problem] = []
    for inst in instances:
        if why[inst.path]:
            problems.append(Problem(inst.path, f"{NOT_DEIDENTIFIED}: {'; '.join(why[inst.path])}"))
        elif inst.kind == "image" and inst.series_uid in bad_series:
            problems.append(
                Problem(inst.path, f"{NOT_DEIDENTIFIED}: another file of its series is not")
            )
        elif inst.kind != "image" and bad_series.intersection(inst.references):
            problems.append(
                Problem(inst.path, f"{NOT_DEIDENTIFIED}: it labels a series that is not")
            )
        else:
            kept.append(inst)
    return kept, problems
