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
from federation.tasks.metrics import dice

__all__ = [
    "TASK",
    "EvalOutcome",
    "Seg2D",
    "SegmentationLoss",
    "SiteDataset",
    "TrainOutcome",
    "check_segmentation_model",
    "device",
    "evaluate",
    "infer",
    "prepare",
    "prepare_holdout",
    "train",
]


@dataclass
class SiteDataset:
    """A site's slices, split by patient into training slices and held-out volumes."""

    train_images: torch.Tensor  # (N, 1, S, S) in [0, 1]
    train_masks: torch.Tensor  # (N, 1, S, S) in {0, 1}
    val_volumes: list[tuple[torch.Tensor, torch.Tensor]]  # per held-out series

    @property
    def num_train(self) -> int:
        """Training slices (the DP dataset size)."""
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        """Held-out slices."""
        return sum(int(x.shape[0]) for x, _ in self.val_volumes)


def _to_slices(volume: TaskVolume, cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    image = windowed(volume, cfg).unsqueeze(1)
    assert volume.label is not None
    mask = torch.from_numpy(volume.label).float().unsqueeze(1)
    size = (cfg.image_size, cfg.image_size)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    mask = F.interpolate(mask, size=size, mode="nearest")
    return image, mask


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
        image, mask = _to_slices(volume, cfg)
        if volume.patient_key in held_out:
            val.append((image, mask))
        else:
            train_x.append(image)
            train_y.append(mask)
    return SiteDataset(torch.cat(train_x), torch.cat(train_y), val)


def prepare_holdout(volumes: Sequence[TaskVolume], cfg: TaskConfig) -> SiteDataset:
    """All labelled volumes as held-out data: the coordinator's own evaluation set."""
    empty = torch.zeros(0, 1, cfg.image_size, cfg.image_size)
    return SiteDataset(empty, empty.clone(), [_to_slices(v, cfg) for v in volumes])


class SegmentationLoss(nn.Module):
    """Soft Dice + binary cross-entropy, per sample.

    `reduction` is "mean" (a scalar) or "none" (one loss per sample), as Opacus's
    ghost clipping switches it.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.reduction = "mean"
        self.dice = DiceLoss(sigmoid=True, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of a batch of logits against binary masks."""
        dice = self.dice(logits, target).flatten(1).mean(1)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_sample = dice + bce.flatten(1).mean(1)
        return per_sample if self.reduction == "none" else per_sample.mean()


def train(
    model: nn.Module,
    data: SiteDataset,
    task: TaskConfig,
    privacy: PrivacyConfig,
    *,
    seed: int,
    proximal_mu: float = 0.0,
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
        num_examples=data.num_train,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: SiteDataset, *, batch_size: int = 32) -> EvalOutcome:
    """Loss per slice and Dice per held-out volume (slice predictions stacked)."""
    loss_fn = SegmentationLoss()
    dev = device()
    model.to(dev).eval()
    losses, dices = [], []
    for images, masks in data.val_volumes:
        images, masks = images.to(dev), masks.to(dev)
        preds = []
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            losses.append(float(loss_fn(logits, masks[start : start + batch_size])) * len(logits))
            preds.append(logits > 0)
        dices.append(dice(torch.cat(preds).cpu().numpy(), masks.cpu().numpy()))
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
    rows, cols = volume.hu.shape[1:]
    image = windowed(volume, cfg).unsqueeze(1)
    size = (cfg.image_size, cfg.image_size)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    dev = device()
    model.to(dev).eval()
    logits = torch.cat(
        [model(image[i : i + batch_size].to(dev)).cpu() for i in range(0, len(image), batch_size)]
    )
    # Back on the series' grid before thresholding: smoother than resizing the mask.
    logits = F.interpolate(logits, size=(rows, cols), mode="bilinear", align_corners=False)
    return Prediction(mask=(logits[:, 0] > 0).numpy().astype(np.uint8))


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


def check_segmentation_model(model: ModelConfig, *, spatial_dims: int, task: str) -> None:
    """Reject a model that cannot segment this task's binary masks.

    Raises:
        ValueError: Not a U-Net of `spatial_dims` with one input and one output channel.
    """
    if model.name != "unet" or model.spatial_dims != spatial_dims:
        raise ValueError(
            f"task {task!r} needs a {spatial_dims}D U-Net, but model.name={model.name!r} with "
            f"model.spatial_dims={model.spatial_dims}; drop the model override or choose "
            f"model=unet{spatial_dims}d."
        )
    if model.in_channels != 1 or model.out_channels != 1:
        raise ValueError(
            f"task {task!r} segments one CT channel into one binary mask: set "
            f"model.in_channels=1 and model.out_channels=1 (got {model.in_channels} and "
            f"{model.out_channels})."
        )


TASK = Seg2D()
