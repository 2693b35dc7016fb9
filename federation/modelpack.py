"""A trained model that carries all inference needs: weights, task, model and provenance.

The coordinator writes one package per run (`model.medfed.pt` in the run folder) and
registers it in MLflow as a model (`federation.tracking.RunTracker.register_model`).
A site reads it from a file, from a run folder, or from the registry
(`models:/NAME/VERSION` or `models:/NAME@ALIAS`) and needs nothing of the run's config:
the task section holds the preprocessing (HU window, image size, task parameters) and
the model section builds the network (`federation.models.build_model`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from federation import __version__
from federation.config import ModelConfig, TaskConfig
from federation.files import write_atomically
from federation.tracking import download_registered

__all__ = ["FORMAT", "PACKAGE_FILE", "ModelCard", "ModelPackage", "load_model"]

FORMAT = "medfed-model/1"
PACKAGE_FILE = "model.medfed.pt"


@dataclass(frozen=True)
class ModelCard:
    """Which model this is, as written into every result it produces.

    Attributes:
        name: Registered model name (e.g. medfed-seg2d), or the run's when unregistered.
        version: Registry version, "" for a package not (yet) read from the registry.
        run: The federated run that trained it.
        round: The round whose global model it is.
        config_sha256: Hash of the run's whole configuration.
        medfed: medfed version that trained it.
    """

    name: str
    version: str
    run: str
    round: int
    config_sha256: str
    medfed: str = __version__

    @property
    def title(self) -> str:
        """`NAME vVERSION` (or `NAME (run RUN)` before registration)."""
        return f"{self.name} v{self.version}" if self.version else f"{self.name} (run {self.run})"


@dataclass
class ModelPackage:
    """Weights plus the task and model sections they were trained with."""

    task: TaskConfig
    model: ModelConfig
    state: dict[str, torch.Tensor]
    card: ModelCard

    def save(self, path: Path) -> Path:
        """Write the package (tensors and JSON only: loaded with `weights_only`)."""
        payload = {
            "format": FORMAT,
            "task": json.dumps(asdict(self.task), sort_keys=True),
            "model": json.dumps(asdict(self.model), sort_keys=True),
            "card": json.dumps(asdict(self.card), sort_keys=True),
            "state": self.state,
        }
        write_atomically(path, lambda tmp: torch.save(payload, tmp))
        return path

    @classmethod
    def load(cls, path: Path) -> ModelPackage:
        """Read a package written by `save`.

        Raises:
            ValueError: The file is not a medfed model package (what it is instead).
        """
        try:
            raw: Any = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError) as err:
            raise ValueError(f"{path} is not a readable medfed model package: {err}") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(
                f"{path} is not a medfed model package ({FORMAT}; found {found!r}): a bare "
                "state dict carries no task or preprocessing. Use the run's "
                f"{PACKAGE_FILE}, the run's name, or a models:/ registry reference."
            )
        return cls(
            task=_section(raw["task"], TaskConfig),
            model=_section(raw["model"], ModelConfig),
            state=dict(raw["state"]),
            card=ModelCard(**json.loads(raw["card"])),
        )

    def with_version(self, name: str, version: str) -> ModelPackage:
        """The same package named as the registry knows it."""
        return dataclasses.replace(
            self, card=dataclasses.replace(self.card, name=name, version=version)
        )

    def build(self) -> nn.Module:
        """The network with these weights, in evaluation mode.

        Raises:
            ValueError: The weights do not fit the network the model section describes.
        """
        from federation.models import build_model

        network = build_model(self.model, seed=0)
        try:
            network.load_state_dict(self.state)
        except RuntimeError as err:
            raise ValueError(f"model {self.card.title}: weights do not fit: {err}") from err
        return network.eval()


def load_model(reference: str, *, tracking_uri: str, output_dir: Path) -> ModelPackage:
    """The model a reference names: a registry version, a run, or a package file.

    Args:
        reference: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, a run name (its
            package in `output_dir/RUN/`), or the path of a package file.
        tracking_uri: The MLflow store holding the registry.
        output_dir: Where runs keep their folders.

    Raises:
        ValueError: Nothing of that name, or not a medfed model package.
    """
    if reference.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="medfed-model-") as tmp:
            name, version, folder = download_registered(reference, tracking_uri, Path(tmp))
            found = sorted(folder.rglob(PACKAGE_FILE))
            if not found:
                raise ValueError(
                    f"{reference} (version {version}) holds no {PACKAGE_FILE}: it was "
                    "registered by an earlier medfed; register the run's model again"
                )
            return ModelPackage.load(found[0]).with_version(name, version)
    path = Path(reference)
    if path.is_file():
        return ModelPackage.load(path)
    run_package = output_dir / reference / PACKAGE_FILE
    if run_package.is_file():
        return ModelPackage.load(run_package)
    raise ValueError(
        f"no model {reference!r}: not a models:/NAME/VERSION or models:/NAME@ALIAS "
        f"reference, not a file, and no run folder {output_dir / reference} with "
        f"{PACKAGE_FILE}"
    )


def _section(text: str, schema: type[Any]) -> Any:
    """A config section from the JSON `ModelPackage.save` wrote (checked by its schema)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), json.loads(text)))
