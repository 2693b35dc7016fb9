"""Where a run's first global model comes from (`model.init`).

A registry version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`), an earlier run (its
best model), a medfed package or state-dict file, or a local MONAI bundle folder
(`configs/metadata.json` and `models/model.pt`; nothing is downloaded). The weights must
fit the configured network layer by layer; `check_fits` names the layers that do not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from federation.modelpack import FORMAT, ModelPackage, load_model

__all__ = ["InitialWeights", "check_fits", "load_initial_weights"]

_SHOWN = 8  # mismatching layers named in an error


@dataclass(frozen=True)
class InitialWeights:
    """Weights to start from, and what they are.

    Attributes:
        state: The state dict.
        source: What was loaded, resolved (registry name and version, run, file, bundle).
        package: The medfed package, when the weights came with one.
    """

    state: dict[str, torch.Tensor]
    source: str
    package: ModelPackage | None = None


def load_initial_weights(reference: str, *, tracking_uri: str, output_dir: Path) -> InitialWeights:
    """The weights `model.init` names.

    Raises:
        ValueError: Nothing of that name, or a file that holds no weights.
    """
    path = Path(reference)
    if path.is_dir() and (path / "configs" / "metadata.json").is_file():
        return _bundle(path)
    if path.is_file():
        raw: Any = torch.load(path, weights_only=True, map_location="cpu")
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            package = ModelPackage.load(path)
            return InitialWeights(package.state, f"file {path} ({package.card.title})", package)
        return InitialWeights(_state_dict(raw, path), f"file {path}")
    package = load_model(reference, tracking_uri=tracking_uri, output_dir=output_dir)
    if reference.startswith("models:/"):
        source = f"models:/{package.card.name}/{package.card.version}"
    else:
        source = f"run {package.card.run} (round {package.card.round})"
    return InitialWeights(package.state, source, package)


def _bundle(folder: Path) -> InitialWeights:
    """A MONAI bundle's weights (`models/model.pt`) and its name and version."""
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    weights = folder / "models" / "model.pt"
    if not weights.is_file():
        raise ValueError(
            f"MONAI bundle {folder} has no models/model.pt; medfed loads PyTorch weights "
            "(a TorchScript-only bundle cannot start a run)"
        )
    raw = torch.load(weights, weights_only=True, map_location="cpu")
    name = meta.get("name") or folder.name
    return InitialWeights(
        _state_dict(raw, weights), f"MONAI bundle {name} {meta.get('version', '')}".rstrip()
    )


def _state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: bare, under a `model`/`state_dict` key, or DataParallel's."""
    if isinstance(raw, dict):
        for key in ("model", "state_dict"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {type(raw).__name__})")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
    return dict(raw)


def check_fits(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, source: str
) -> None:
    """Refuse weights whose layers differ from the network's, naming them.

    Raises:
        ValueError: Missing, unexpected or differently shaped layers (the first few named).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_SHOWN])}" + (", ..." if items[_SHOWN:] else "")
        for label, items in (
            ("layers the network has but the weights lack", missing),
            ("layers the weights have but the network lacks", unexpected),
            ("layers of another shape (weights != network)", shapes),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"model.init {source} does not fit the configured model: "
            + "; ".join(problems)
            + ". Use the model section it was trained with (a registered model's is in its "
            "package), or another model.init."
        )
