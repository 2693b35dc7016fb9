"""2D slice segmentation: CT volumes with SEG labels -> slices -> U-Net with Dice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from federation import keys
from federation.config import ModelConfig, PrivacyConfig, TaskConfig
from federation.dicom.results import LESION
from federation.tasks.base import (
    EvalOutcome,
    Prediction,
    TaskVolume,
    TrainOutcome,
    device,
    private_train,
    split_patients,
    windowed,
)
from federation.tasks.segmentation import (
    HeldOutVolume,
    SegmentationLoss,
    check_segmentation_model,
    dice_on_grid,
    mask_on_grid,
)
from federation.tasks.store import stored

__all__ = [
    "TASK",
    "EvalOutcome",
    "Seg2D",
    "SiteDataset",
    "TrainOutcome",
    "device",
    "evaluate",
    "infer",
    "prepare",
    "prepare_holdout",
    "train",
]


@stored
@dataclass
class SiteDataset:
    """A site's slices, split by patient into training slices and held-out volumes."""

    train_images: torch.Tensor  # (N, 1, S, S) in [0, 1]
    train_masks: torch.Tensor  # (N, 1, S, S) in {0, 1}
    val_volumes: list[HeldOutVolume]  # per held-out series

    @property
    def num_train(self) -> int:
        """Training slices (the DP dataset size)."""
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        """Held-out slices."""
        return sum(int(v.image.shape[0]) for v in self.val_volumes)


def _slices(volume: TaskVolume, cfg: TaskConfig) -> torch.Tensor:
    """The series' windowed slices (N, 1, S, S), resized to the training grid."""
    image = windowed(volume, cfg).unsqueeze(1)
    size = (cfg.image_size, cfg.image_size)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def _labelled(volume: TaskVolume, cfg: TaskConfig) -> HeldOutVolume:
    if volume.label is None:
        raise ValueError(f"series {volume.series_uid} has no mask label; seg2d needs one")
    mask = torch.from_numpy(np.asarray(volume.label, dtype=np.float32)).unsqueeze(1)
    mask = F.interpolate(mask, size=(cfg.image_size, cfg.image_size), mode="nearest")
    return HeldOutVolume(_slices(volume, cfg), mask, np.asarray(volume.label, dtype=np.uint8))


def prepare(volumes: Sequence[TaskVolume], cfg: TaskConfig, *, seed: int) -> SiteDataset:
    """Normalise, resize and split a site's labelled volumes by patient.

    Raises:
        ValueError: Fewer than two patients, so nothing can be held out.

    """
    patients = sorted({v.patient_key for v in volumes})
    if len(patients) < 2:
        raise ValueError(
            f"needs labelled series of at least 2 patients to hold one out, found {len(patients)}"
        )
    held_out = split_patients(patients, cfg.val_fraction, seed=seed)
    train_x, train_y, val = [], [], []
    for volume in volumes:
        labelled = _labelled(volume, cfg)
        if volume.patient_key in held_out:
            val.append(labelled)
        else:
            train_x.append(labelled.image)
            train_y.append(labelled.mask)
    return SiteDataset(torch.cat(train_x), torch.cat(train_y), val)


def prepare_holdout(volumes: Sequence[TaskVolume], cfg: TaskConfig) -> SiteDataset:
    """All labelled volumes as held-out data: the coordinator's own evaluation set."""
    empty = torch.zeros(0, 1, cfg.image_size, cfg.image_size)
    return SiteDataset(empty, empty.clone(), [_labelled(v, cfg) for v in volumes])


def train(
    model: nn.Module,
    data: SiteDataset,
    task: TaskConfig,
    privacy: PrivacyConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    proximal_to: dict[str, torch.Tensor] | None = None,
) -> TrainOutcome:
    """Train `model` in place on slices for `task.local_epochs` epochs (see `private_train`)."""
    return private_train(
        model,
        TensorDataset(data.train_images, data.train_masks),
        SegmentationLoss(),
        task,
        privacy,
        seed=seed,
        proximal_mu=proximal_mu,
        proximal_to=proximal_to,
        num_examples=data.num_train,
    )


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = device()
    return torch.cat(
        [model(images[i : i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: SiteDataset, *, batch_size: int = 32) -> EvalOutcome:
    """Loss per slice on the training grid; Dice per held-out volume on the series' grid."""
    loss_fn = SegmentationLoss()
    model.to(device()).eval()
    losses, dices = [], []
    for held in data.val_volumes:
        logits = _logits(model, held.image, batch_size)
        losses.append(float(loss_fn(logits, held.mask)) * len(logits))
        dices.append(dice_on_grid(logits, held.label))
    model.to("cpu").train()
    return EvalOutcome(
        loss=sum(losses) / max(data.num_val, 1),
        metrics={keys.DICE: float(np.mean(dices))},
        num_examples=data.num_val,
    )


@torch.no_grad()
def infer(
    model: nn.Module, volume: TaskVolume, cfg: TaskConfig, *, batch_size: int = 32
) -> Prediction:
    """The lesion mask of a new series: slices resized as in training, back to its grid."""
    model.to(device()).eval()
    logits = _logits(model, _slices(volume, cfg), batch_size)
    return Prediction(mask=mask_on_grid(logits, tuple(volume.hu.shape)))


class Seg2D:
    """2D slice segmentation on the task interface (`federation.tasks.base.Task`)."""

    name = "seg2d"
    primary_metric = keys.DICE
    metrics = (keys.DICE,)
    needs_mask = True
    modality = "CT"
    segment = LESION

    def check(self, task: TaskConfig, model: ModelConfig) -> None:
        """Slices need a 2D segmentation network with one input and one output channel."""
        check_segmentation_model(model, spatial_dims=2, task=self.name)
        if task.params:
            raise ValueError(f"task {self.name!r} has no task.params; got {sorted(task.params)}.")

    prepare = staticmethod(prepare)
    prepare_holdout = staticmethod(prepare_holdout)
    train = staticmethod(train)
    evaluate = staticmethod(evaluate)
    infer = staticmethod(infer)


TASK = Seg2D()
