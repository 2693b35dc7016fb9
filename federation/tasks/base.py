"""The task interface: what a learning task defines, and the DP training loop tasks share.

A task is one module `federation/tasks/<name>.py` defining `TASK`, an object with the
attributes and methods of `Task`, plus one file `conf/task/<name>.yaml`; the client, the
coordinator and the hold-out evaluation find it by `task.name` alone.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.config import ModelConfig, PrivacyConfig, TaskConfig
from federation.dicom.results import Segment
from federation.privacy import MechanismStep, make_private

__all__ = [
    "EvalOutcome",
    "Prediction",
    "Task",
    "TaskDataset",
    "TaskVolume",
    "TrainOutcome",
    "device",
    "private_train",
    "split_patients",
    "task_params",
]

P = TypeVar("P")


@runtime_checkable
class TaskVolume(Protocol):
    """The few fields of a prepared series that tasks read.

    Attributes:
        hu: Intensities in HU, (slices, rows, cols), sorted along the slice normal.
        spacing: (slice, row, column) spacing in mm.
        label: Binary mask on the same grid, or None for a series without one.
        patient_key: Site-local patient pseudonym; splits never separate a patient.
        series_uid: The series' SeriesInstanceUID.
        class_label: Series- or study-level class (from the site's labels CSV), or None.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    label: np.ndarray | None
    patient_key: str
    series_uid: str
    class_label: str | None


class TaskDataset(Protocol):
    """A site's prepared data: training examples and held-out examples."""

    @property
    def num_train(self) -> int:
        """Training examples (the DP dataset size)."""
        ...

    @property
    def num_val(self) -> int:
        """Held-out examples."""
        ...


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local training produced."""

    loss: float
    num_examples: int
    spent: list[MechanismStep]


@dataclass(frozen=True)
class EvalOutcome:
    """Held-out loss and the task's metrics (keys from `Task.metrics`) at one site."""

    loss: float
    metrics: dict[str, float]
    num_examples: int


@dataclass(frozen=True)
class Prediction:
    """A model's output for one series, on the series' own grid.

    Attributes:
        mask: Segmentation tasks: binary mask (slices, rows, cols) like the series' `hu`.
        probabilities: Classification tasks: probability of each class, by class name.
    """

    mask: np.ndarray | None = None
    probabilities: dict[str, float] | None = None


@runtime_checkable
class Task(Protocol):
    """What a learning task defines.

    Attributes:
        name: The task's `task.name` (and module name).
        primary_metric: Metric key that picks the best model (larger is better).
        metrics: Metric keys `evaluate` reports, the primary one first.
        needs_mask: Whether series need a mask label (segmentation) to be used.
        modality: The modality of the series the task takes (e.g. CT).
        segment: What the masks show (segmentation tasks); None for classification.
    """

    name: str
    primary_metric: str
    metrics: tuple[str, ...]
    needs_mask: bool
    modality: str
    segment: Segment | None

    def check(self, task: TaskConfig, model: ModelConfig) -> None:
        """Reject settings this task cannot run with, saying which value and why."""
        ...

    def prepare(self, volumes: Sequence[TaskVolume], cfg: TaskConfig, *, seed: int) -> Any:
        """Turn a site's volumes into training and held-out data (a `TaskDataset`).

        Raises:
            ValueError: The volumes cannot make a usable dataset (the site refuses).
        """
        ...

    def prepare_holdout(self, volumes: Sequence[TaskVolume], cfg: TaskConfig) -> Any:
        """All volumes as held-out data: the coordinator's own evaluation set."""
        ...

    def train(
        self,
        model: nn.Module,
        data: Any,
        task: TaskConfig,
        privacy: PrivacyConfig,
        *,
        seed: int,
        proximal_mu: float = 0.0,
        proximal_to: dict[str, torch.Tensor] | None = None,
    ) -> TrainOutcome:
        """Train `model` in place for one round (DP-SGD when `privacy.mode` says so)."""
        ...

    def evaluate(self, model: nn.Module, data: Any) -> EvalOutcome:
        """Held-out loss and metrics of `model`."""
        ...

    def infer(self, model: nn.Module, volume: TaskVolume, cfg: TaskConfig) -> Prediction:
        """The model's output for one new series, preprocessed as in training.

        Raises:
            ValueError: The series cannot be taken by this task (the reason is specific).
        """
        ...


def windowed(volume: TaskVolume, cfg: TaskConfig) -> torch.Tensor:
    """The volume in the task's CT window (`task.window_min`..`window_max` HU) as [0, 1].

    float32, slices first; `federation.dicom.volume.normalise` (MONAI) does the scaling.
    """
    from federation.dicom.volume import normalise

    hu = np.asarray(volume.hu, dtype=np.float32)
    return torch.from_numpy(normalise(hu, modality="CT", window=(cfg.window_min, cfg.window_max)))


def device() -> torch.device:
    """The site's GPU when it has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def task_params(cfg: TaskConfig, schema: type[P]) -> P:
    """The task-specific `task.params`, typed and checked against `schema` (a dataclass).

    Raises:
        ValueError: A parameter is unknown or has the wrong type.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), dict(cfg.params))
    except OmegaConfBaseException as err:
        raise ValueError(f"task.params of task {cfg.name!r}: {err}") from err
    out = OmegaConf.to_object(typed)
    assert isinstance(out, schema)
    return out


def split_patients(
    patients: Iterable[str], fraction: float, *, seed: int, minimum: int = 1
) -> set[str]:
    """Patients held out: a seeded, stable `fraction` (at least `minimum`, never all)."""
    ranked = sorted(set(patients), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_val = min(len(ranked) - 1, max(minimum, round(fraction * len(ranked))))
    return set(ranked[:n_val])


def private_train(
    model: nn.Module,
    dataset: Dataset[Any],
    criterion: nn.Module,
    task: TaskConfig,
    privacy: PrivacyConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    proximal_to: dict[str, torch.Tensor] | None = None,
    num_examples: int,
    reseed: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """Train `model` in place for `task.local_epochs` epochs, with DP-SGD if configured.

    `dataset` yields (input, target) pairs; `criterion` maps (logits, target) to a loss
    and honours `reduction` ("mean" or "none", which Opacus's ghost clipping sets).
    `proximal_mu` > 0 adds FedProx's pull towards the received weights as a proximal
    step after each optimiser step: data-independent, so it stays valid under DP-SGD.
    The pull is towards `proximal_to` (parameters by name) when given, as Ditto pulls a
    site's personal model towards the global one, else towards the starting weights.
    `seed` makes non-private training reproducible. Under DP the batch sampling, any
    random augmentation (`reseed` is called with the seed used) and the noise draw
    from a fresh secret seed instead: noise the coordinator could predict protects nothing.
    """
    run_seed = secrets.randbits(63) if privacy.mode == "dp-sgd" else seed
    torch.manual_seed(run_seed)
    if reseed is not None:
        reseed(run_seed % 2**32)
    dev = device()
    model.to(dev)
    loader = DataLoader(dataset, batch_size=task.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    with warnings.catch_warnings():
        # Opacus's fast (non-cryptographic) RNG is the documented default for training.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        private = make_private(model, optimizer, loader, criterion, privacy)
    private.model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [
        (proximal_to[n] if proximal_to is not None else p).detach().clone().to(p.device)
        for n, p in named
    ]

    def proximal_step() -> None:
        if proximal_mu > 0:
            with torch.no_grad():
                for p, a in zip(params, anchor, strict=True):
                    p.sub_(task.lr * proximal_mu * (p - a))

    total, batches = 0.0, 0
    for _ in range(task.local_epochs):
        for inputs, targets in private.loader:
            if len(inputs) == 0:  # Poisson sampling can draw an empty batch
                private.empty_step()
                proximal_step()
                continue
            inputs, targets = inputs.to(dev), targets.to(dev)
            private.optimizer.zero_grad(set_to_none=True)
            loss = private.forward_backward(inputs, targets)
            private.optimizer.step()
            proximal_step()
            total += float(loss.detach())
            batches += 1
    if private.engine is not None:
        # Drop Opacus's hooks so the plain model can be evaluated and serialised.
        private.model.to_standard_module()  # type: ignore[operator]
    model.to("cpu")
    return TrainOutcome(
        loss=total / max(batches, 1), num_examples=num_examples, spent=private.spent()
    )
