"""3D segmentation: CT volumes -> random patches -> 3D U-Net; sliding-window evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

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
    task_params,
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

__all__ = ["TASK", "PatchDataset", "Seg3D", "Seg3DParams", "Seg3DSite"]


@stored
@dataclass
class Seg3DParams:
    """`task.params` of seg3d.

    Attributes:
        depth: Slices every volume is resampled to (in-plane: `task.image_size`).
        patch_size: Training patch and sliding-window size (slices, rows, cols).
        patches_per_volume: Patches drawn from each training volume per epoch.
        pos_fraction: Share of patches centred on a labelled voxel.
        overlap: Sliding-window overlap at evaluation.
    """

    depth: int = 16
    patch_size: list[int] = field(default_factory=lambda: [16, 32, 32])
    patches_per_volume: int = 8
    pos_fraction: float = 0.5
    overlap: float = 0.25


@stored
@dataclass
class Seg3DSite:
    """A site's volumes, resampled to one grid and split by patient."""

    train: list[tuple[torch.Tensor, torch.Tensor]]  # (1, D, S, S) image and mask
    val: list[HeldOutVolume]
    params: Seg3DParams

    @property
    def num_train(self) -> int:
        """Training patches per epoch (the DP dataset size)."""
        return len(self.train) * self.params.patches_per_volume

    @property
    def num_val(self) -> int:
        """Held-out volumes."""
        return len(self.val)


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random patches of the training volumes, foreground-centred at `pos_fraction`."""

    def __init__(self, site: Seg3DSite) -> None:
        from monai.transforms import RandCropByPosNegLabel

        p = site.params
        self.volumes = site.train
        self.per_volume = p.patches_per_volume
        self.crop = RandCropByPosNegLabel(
            spatial_size=tuple(p.patch_size),
            pos=p.pos_fraction,
            neg=1.0 - p.pos_fraction,
            num_samples=1,
            allow_smaller=True,
        )

    def reseed(self, seed: int) -> None:
        """Seed the patch positions."""
        self.crop.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.volumes) * self.per_volume

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.volumes[index // self.per_volume]
        self.crop.randomize(mask)
        image_patch = self.crop(image, label=mask, randomize=False)[0]
        mask_patch = self.crop(mask, label=mask, randomize=False)[0]
        return torch.as_tensor(image_patch), torch.as_tensor(mask_patch)


def _resampled(volume: TaskVolume, cfg: TaskConfig, depth: int) -> torch.Tensor:
    """The windowed volume (1, 1, D, S, S) on the training grid."""
    image = windowed(volume, cfg)[None, None]
    size = (depth, cfg.image_size, cfg.image_size)
    return F.interpolate(image, size=size, mode="trilinear", align_corners=False)


def _labelled(volume: TaskVolume, cfg: TaskConfig, depth: int) -> HeldOutVolume:
    """Image and mask (1, D, S, S) on the training grid, and the label on the series' grid."""
    if volume.label is None:
        raise ValueError(f"series {volume.series_uid} has no mask label; seg3d needs one")
    label = np.asarray(volume.label, dtype=np.uint8)
    mask = torch.from_numpy(label.astype(np.float32))[None, None]
    mask = F.interpolate(mask, size=(depth, cfg.image_size, cfg.image_size), mode="nearest")
    return HeldOutVolume(_resampled(volume, cfg, depth)[0], mask[0], label)


def _window_logits(model: nn.Module, image: torch.Tensor, p: Seg3DParams) -> torch.Tensor:
    """Sliding-window logits (1, 1, D, S, S) of one resampled volume."""
    from monai.inferers import sliding_window_inference

    logits = sliding_window_inference(
        image.to(device()),
        roi_size=tuple(p.patch_size),
        sw_batch_size=4,
        predictor=model,
        overlap=p.overlap,
    )
    assert isinstance(logits, torch.Tensor)
    return logits.cpu()


class Seg3D:
    """3D segmentation on patches with a 3D U-Net (`federation.tasks.base.Task`)."""

    name = "seg3d"
    primary_metric = keys.DICE
    metrics = (keys.DICE,)
    needs_mask = True
    modality = "CT"
    segment = LESION

    def check(self, task: TaskConfig, model: ModelConfig) -> None:
        """Patches must fit the resampled grid and be divisible by the U-Net's strides."""
        check_segmentation_model(model, spatial_dims=3, task=self.name)
        p = task_params(task, Seg3DParams)
        grid = [p.depth, task.image_size, task.image_size]
        factor = int(np.prod(model.strides))
        if len(p.patch_size) != 3 or any(s < 1 or s % factor for s in p.patch_size):
            raise ValueError(
                f"task.params.patch_size={p.patch_size} needs 3 sizes, each a multiple of "
                f"{factor} (the product of model.strides={model.strides})."
            )
        if any(s > g for s, g in zip(p.patch_size, grid, strict=True)):
            raise ValueError(
                f"task.params.patch_size={p.patch_size} is larger than the resampled volume "
                f"{grid} (task.params.depth, task.image_size); use a smaller patch."
            )
        if p.patches_per_volume < 1 or not 0 <= p.pos_fraction <= 1:
            raise ValueError(
                "task.params.patches_per_volume must be >= 1 and task.params.pos_fraction "
                f"in [0, 1] (got {p.patches_per_volume} and {p.pos_fraction})."
            )

    def prepare(self, volumes: Sequence[TaskVolume], cfg: TaskConfig, *, seed: int) -> Seg3DSite:
        """Resample the site's labelled volumes to one grid and split them by patient.

        Raises:
            ValueError: Fewer than two patients, so nothing can be held out.
        """
        p = task_params(cfg, Seg3DParams)
        patients = {v.patient_key for v in volumes}
        if len(patients) < 2:
            raise ValueError(
                "needs labelled series of at least 2 patients to hold one out, "
                f"found {len(patients)}"
            )
        held_out = split_patients(patients, cfg.val_fraction, seed=seed)
        train: list[tuple[torch.Tensor, torch.Tensor]] = []
        val: list[HeldOutVolume] = []
        for volume in volumes:
            labelled = _labelled(volume, cfg, p.depth)
            if volume.patient_key in held_out:
                val.append(labelled)
            else:
                train.append((labelled.image, labelled.mask))
        return Seg3DSite(train, val, p)

    def prepare_holdout(self, volumes: Sequence[TaskVolume], cfg: TaskConfig) -> Seg3DSite:
        """All labelled volumes as held-out data."""
        p = task_params(cfg, Seg3DParams)
        return Seg3DSite([], [_labelled(v, cfg, p.depth) for v in volumes], p)

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
        """One round on random patches (see `federation.tasks.base.private_train`)."""
        dataset = PatchDataset(data)
        return private_train(
            model,
            dataset,
            SegmentationLoss(),
            task,
            privacy,
            seed=seed,
            proximal_mu=proximal_mu,
            proximal_to=proximal_to,
            num_examples=data.num_train,
            reseed=dataset.reseed,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any) -> EvalOutcome:
        """Loss on the training grid and Dice on the series' grid, per held-out volume."""
        loss_fn = SegmentationLoss()
        model.to(device()).eval()
        losses, dices = [], []
        for held in data.val:
            logits = _window_logits(model, held.image[None], data.params)
            losses.append(float(loss_fn(logits, held.mask[None])))
            dices.append(dice_on_grid(logits, held.label))
        model.to("cpu").train()
        return EvalOutcome(
            loss=float(np.mean(losses)) if losses else float("nan"),
            metrics={keys.DICE: float(np.mean(dices)) if dices else float("nan")},
            num_examples=data.num_val,
        )

    @torch.no_grad()
    def infer(self, model: nn.Module, volume: TaskVolume, cfg: TaskConfig) -> Prediction:
        """The lesion mask of a new series: on the training grid by sliding window, back."""
        p = task_params(cfg, Seg3DParams)
        model.to(device()).eval()
        logits = _window_logits(model, _resampled(volume, cfg, p.depth), p)
        return Prediction(mask=mask_on_grid(logits, tuple(volume.hu.shape)))


TASK = Seg3D()
