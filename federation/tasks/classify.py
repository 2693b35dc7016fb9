"""Series-level classification: a stack of slices per series -> DenseNet -> class.

Labels come from the site's labels CSV (keyed by Study/Series Instance UID). Each
series becomes `task.params.slices` slices resampled over its whole depth, used as
the input channels of a 2D network: cheap on a CPU, and a finding anywhere in the
series stays in the input. Class imbalance is handled by a class-weighted loss (a
weighted sampler would not survive DP-SGD's Poisson sampling).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from federation import keys
from federation.config import ModelConfig, PrivacyConfig, TaskConfig
from federation.tasks.base import (
    EvalOutcome,
    Prediction,
    TaskVolume,
    TrainOutcome,
    device,
    private_train,
    split_patients,
    task_params,
    windowed,
)
from federation.tasks.metrics import auroc, balanced_accuracy
from federation.tasks.store import stored

__all__ = ["TASK", "Classify", "ClassifyParams", "ClassifySite", "WeightedCrossEntropy"]


@dataclass
class ClassifyParams:
    """`task.params` of classify.

    Attributes:
        classes: Class labels as written in the labels CSV; with two, the second is the
            positive class of the AUROC.
        slices: Slices each series is resampled to (the model's input channels).
        class_weighting: "balanced" weighs each class by N / (K * n_class) of the
            site's training series; "none" weighs all alike.
    """

    classes: list[str] = field(default_factory=lambda: ["normal", "abnormal"])
    slices: int = 8
    class_weighting: str = "balanced"


@stored
@dataclass
class ClassifySite:
    """A site's series as slice stacks with class indices, split by patient."""

    train_x: torch.Tensor  # (N, slices, S, S) in [0, 1]
    train_y: torch.Tensor  # (N,) class index
    val_x: torch.Tensor
    val_y: torch.Tensor
    class_weights: torch.Tensor  # (K,)

    @property
    def num_train(self) -> int:
        """Training series (the DP dataset size)."""
        return int(self.train_y.shape[0])

    @property
    def num_val(self) -> int:
        """Held-out series."""
        return int(self.val_y.shape[0])


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy weighted by the target's class, per sample.

    Unlike `nn.CrossEntropyLoss(weight=...)`, the "mean" divides by the batch size, not
    by the sum of weights: each sample's loss depends on that sample alone, as DP-SGD's
    per-sample clipping assumes. `reduction` is "mean" or "none" (Opacus sets it).
    """

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.reduction = "mean"
        self.register_buffer("weights", weights.float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of a batch of logits against class indices."""
        weights: torch.Tensor = self.weights  # type: ignore[assignment]
        per_sample = F.cross_entropy(logits, target, reduction="none") * weights[target]
        return per_sample if self.reduction == "none" else per_sample.mean()


def _stack(volume: TaskVolume, cfg: TaskConfig, slices: int) -> torch.Tensor:
    image = windowed(volume, cfg)[None, None]
    size = (slices, cfg.image_size, cfg.image_size)
    return F.interpolate(image, size=size, mode="trilinear", align_corners=False)[0, 0]


def _labelled(volumes: Sequence[TaskVolume], classes: list[str]) -> list[tuple[TaskVolume, int]]:
    """Volumes with a class label, as (volume, class index).

    Raises:
        ValueError: No volume has a class label, or a label is not one of `classes`.
    """
    unknown = sorted({v.class_label for v in volumes if v.class_label} - set(classes))
    if unknown:
        raise ValueError(
            f"class labels {unknown} are not in task.params.classes={classes}; fix the labels "
            "CSV or list every class in task.params.classes."
        )
    found = [(v, classes.index(v.class_label)) for v in volumes if v.class_label is not None]
    if not found:
        raise ValueError(
            "no series has a class label: put labels.csv (StudyInstanceUID or "
            "SeriesInstanceUID, label) at the top of the site's DICOM folder."
        )
    return found


class Classify:
    """Series-level classification with AUROC and balanced accuracy (`base.Task`)."""

    name = "classify"
    primary_metric = keys.AUROC
    metrics = (keys.AUROC, keys.BALANCED_ACCURACY)
    needs_mask = False
    modality = "CT"
    segment = None

    def check(self, task: TaskConfig, model: ModelConfig) -> None:
        """The model must be a 2D classifier over the slice stack, one output per class."""
        p = task_params(task, ClassifyParams)
        if len(p.classes) < 2 or len(set(p.classes)) != len(p.classes):
            raise ValueError(
                f"task.params.classes={p.classes} needs at least two distinct class labels."
            )
        if p.class_weighting not in ("balanced", "none"):
            raise ValueError(
                f"task.params.class_weighting={p.class_weighting!r} is unknown; "
                "use balanced or none."
            )
        if model.name != "densenet" or model.spatial_dims != 2:
            raise ValueError(
                f"task 'classify' needs a 2D classifier, but model.name={model.name!r} with "
                f"model.spatial_dims={model.spatial_dims}; drop the model override or choose "
                "model=densenet."
            )
        if model.in_channels != p.slices or model.out_channels != len(p.classes):
            raise ValueError(
                f"task 'classify' feeds task.params.slices={p.slices} slices into "
                f"{len(p.classes)} classes: set model.in_channels={p.slices} and "
                f"model.out_channels={len(p.classes)} (got {model.in_channels} and "
                f"{model.out_channels})."
            )

    def prepare(self, volumes: Sequence[TaskVolume], cfg: TaskConfig, *, seed: int) -> ClassifySite:
        """Slice stacks of the labelled series, split by patient within each class.

        Raises:
            ValueError: No labelled series, an unknown label, or a class with fewer
                than two patients (one must train, one be held out).
        """
        p = task_params(cfg, ClassifyParams)
        found = _labelled(volumes, p.classes)
        patient_class = {v.patient_key: y for v, y in found}
        per_class = Counter(patient_class.values())
        short = [p.classes[k] for k in range(len(p.classes)) if per_class[k] < 2]
        if short:
            raise ValueError(
                f"classes {short} have fewer than 2 patients here ({dict(per_class)} by class "
                "index): each class needs one patient to train on and one to hold out."
            )
        held_out: set[str] = set()
        for k in range(len(p.classes)):
            members = [key for key, y in patient_class.items() if y == k]
            held_out |= split_patients(members, cfg.val_fraction, seed=seed)
        train = [(v, y) for v, y in found if v.patient_key not in held_out]
        val = [(v, y) for v, y in found if v.patient_key in held_out]
        counts = Counter(y for _, y in train)
        if p.class_weighting == "balanced":
            n, k = len(train), len(p.classes)
            weights = [n / (k * counts[c]) if counts[c] else 0.0 for c in range(k)]
        else:
            weights = [1.0] * len(p.classes)
        return ClassifySite(
            torch.stack([_stack(v, cfg, p.slices) for v, _ in train]),
            torch.tensor([y for _, y in train]),
            torch.stack([_stack(v, cfg, p.slices) for v, _ in val]),
            torch.tensor([y for _, y in val]),
            torch.tensor(weights),
        )

    def prepare_holdout(self, volumes: Sequence[TaskVolume], cfg: TaskConfig) -> ClassifySite:
        """All labelled series as held-out data."""
        p = task_params(cfg, ClassifyParams)
        found = _labelled(volumes, p.classes)
        empty = torch.zeros(0, p.slices, cfg.image_size, cfg.image_size)
        return ClassifySite(
            empty,
            torch.zeros(0, dtype=torch.long),
            torch.stack([_stack(v, cfg, p.slices) for v, _ in found]),
            torch.tensor([y for _, y in found]),
            torch.ones(len(p.classes)),
        )

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
        """One round with the class-weighted loss (see `base.private_train`)."""
        return private_train(
            model,
            TensorDataset(data.train_x, data.train_y),
            WeightedCrossEntropy(data.class_weights),
            task,
            privacy,
            seed=seed,
            proximal_mu=proximal_mu,
            proximal_to=proximal_to,
            num_examples=data.num_train,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any, *, batch_size: int = 32) -> EvalOutcome:
        """Cross-entropy, AUROC and balanced accuracy on the held-out series."""
        dev = device()
        model.to(dev).eval()
        batches = range(0, data.num_val, batch_size)
        logits = torch.cat(
            [model(data.val_x[i : i + batch_size].to(dev)).cpu() for i in batches]
            or [torch.zeros(0, int(data.class_weights.shape[0]))]
        )
        model.to("cpu").train()
        labels = data.val_y.numpy()
        probs = torch.softmax(logits, dim=1).numpy()
        scores = probs[:, 1] if probs.shape[1] == 2 else probs
        loss = float(F.cross_entropy(logits, data.val_y)) if data.num_val else float("nan")
        return EvalOutcome(
            loss=loss,
            metrics={
                keys.AUROC: auroc(scores, labels),
                keys.BALANCED_ACCURACY: balanced_accuracy(probs.argmax(1), labels),
            },
            num_examples=data.num_val,
        )

    @torch.no_grad()
    def infer(self, model: nn.Module, volume: TaskVolume, cfg: TaskConfig) -> Prediction:
        """Each class's probability for a new series (its slice stack as in training)."""
        p = task_params(cfg, ClassifyParams)
        dev = device()
        model.to(dev).eval()
        logits = model(_stack(volume, cfg, p.slices)[None].to(dev)).cpu()
        probs = torch.softmax(logits.double(), dim=1)[0].tolist()
        return Prediction(probabilities=dict(zip(p.classes, probs, strict=True)))


TASK = Classify()
