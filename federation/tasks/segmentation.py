"""What the segmentation tasks share: loss, model check, held-out volumes, masks on a grid."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from federation.config import ModelConfig
from federation.tasks.metrics import dice
from federation.tasks.store import stored

__all__ = [
    "HeldOutVolume",
    "SegmentationLoss",
    "check_segmentation_model",
    "dice_on_grid",
    "mask_on_grid",
]


@stored
class HeldOutVolume(NamedTuple):
    """A held-out series: image and mask on the training grid, its label on its own grid."""

    image: torch.Tensor
    mask: torch.Tensor
    label: np.ndarray


def mask_on_grid(logits: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """The binary mask of training-grid logits on a series' own grid (slices, rows, cols).

    The logits are resampled before thresholding, which draws smoother edges than
    resampling a mask. They are slices (N, 1, H, W) or one volume (1, 1, D, H, W).
    """
    size = shape[1:] if logits.dim() == 4 else shape
    mode = "bilinear" if logits.dim() == 4 else "trilinear"
    grid = F.interpolate(logits.detach().float().cpu(), size=size, mode=mode, align_corners=False)
    return (grid > 0).numpy().reshape(shape).astype(np.uint8)


def dice_on_grid(logits: torch.Tensor, label: np.ndarray) -> float:
    """Dice of the predicted mask against a series' label, on the series' own grid.

    This is what a site's written SEG scores against its ground truth, so the run's
    figure and the clinic's agree.
    """
    return dice(mask_on_grid(logits, tuple(label.shape)), label)


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
