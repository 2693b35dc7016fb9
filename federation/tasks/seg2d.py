"""2D slice segmentation: CT volumes with SEG labels -> slices -> U-Net with Dice."""

from __future__ import annotations

import hashlib
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from federation.config import PrivacyConfig, TaskConfig
from federation.dicom.volume import Volume
from federation.privacy import MechanismStep, make_private

__all__ = [
    "EvalOutcome",
    "SegmentationLoss",
    "SiteDataset",
    "TrainOutcome",
    "device",
    "evaluate",
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


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local training produced."""

    loss: float
    num_examples: int
    spent: list[MechanismStep]


@dataclass(frozen=True)
class EvalOutcome:
    """Held-out metrics of a model at one site."""

    loss: float
    dice: float
    num_examples: int


def _to_slices(volume: Volume, cfg: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    hu = torch.from_numpy(volume.hu).float().unsqueeze(1)
    image = ((hu - cfg.window_min) / (cfg.window_max - cfg.window_min)).clamp_(0.0, 1.0)
    assert volume.label is not None
    mask = torch.from_numpy(volume.label).float().unsqueeze(1)
    size = (cfg.image_size, cfg.image_size)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    mask = F.interpolate(mask, size=size, mode="nearest")
    return image, mask


def prepare(volumes: list[Volume], cfg: TaskConfig, *, seed: int) -> SiteDataset:
    """Normalise, resize and split a site's labelled volumes by patient.

    Raises:
        ValueError: Fewer than two patients, so nothing can be held out.

    """
    patients = sorted({v.patient_key for v in volumes})
    if len(patients) < 2:
        raise ValueError(
            f"needs labelled series of at least 2 patients to hold one out, found {len(patients)}"
        )
    ranked = sorted(patients, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_val = min(len(patients) - 1, max(1, round(cfg.val_fraction * len(patients))))
    held_out = set(ranked[:n_val])
    train_x, train_y, val = [], [], []
    for volume in volumes:
        image, mask = _to_slices(volume, cfg)
        if volume.patient_key in held_out:
            val.append((image, mask))
        else:
            train_x.append(image)
            train_y.append(mask)
    return SiteDataset(torch.cat(train_x), torch.cat(train_y), val)


def prepare_holdout(volumes: list[Volume], cfg: TaskConfig) -> SiteDataset:
    """All labelled volumes as held-out data: the coordinator's own evaluation set."""
    empty = torch.zeros(0, 1, cfg.image_size, cfg.image_size)
    return SiteDataset(empty, empty.clone(), [_to_slices(v, cfg) for v in volumes])


def device() -> torch.device:
    """The site's GPU when it has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    """Train `model` in place for `task.local_epochs` epochs, with DP-SGD if configured.

    `proximal_mu` > 0 adds FedProx's pull towards the received weights as a proximal
    step after each optimiser step: data-independent, so it stays valid under DP-SGD.
    `seed` makes non-private training reproducible. Under DP the batch sampling and the
    noise draw from a fresh secret seed instead: the coordinator knows `seed`, and noise
    it could predict would protect nothing.
    """
    torch.manual_seed(secrets.randbits(63) if privacy.mode == "dp-sgd" else seed)
    dev = device()
    model.to(dev)
    loader = DataLoader(
        TensorDataset(data.train_images, data.train_masks),
        batch_size=task.batch_size,
        shuffle=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    with warnings.catch_warnings():
        # Opacus's fast (non-cryptographic) RNG is the documented default for training.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        private = make_private(model, optimizer, loader, SegmentationLoss(), privacy)
    private.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]

    def proximal_step() -> None:
        if proximal_mu > 0:
            with torch.no_grad():
                for p, a in zip(params, anchor, strict=True):
                    p.sub_(task.lr * proximal_mu * (p - a))

    total, batches = 0.0, 0
    for _ in range(task.local_epochs):
        for images, masks in private.loader:
            if len(images) == 0:  # Poisson sampling can draw an empty batch
                private.empty_step()
                proximal_step()
                continue
            images, masks = images.to(dev), masks.to(dev)
            private.optimizer.zero_grad(set_to_none=True)
            loss = private.criterion(private.model(images), masks)
            with warnings.catch_warnings():
                # Opacus hooks fire on the first layer, whose input needs no grad: expected.
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            private.optimizer.step()
            proximal_step()
            total += float(loss.detach())
            batches += 1
    if private.engine is not None:
        # Drop Opacus's hooks so the plain model can be evaluated and serialised.
        private.model._close()  # type: ignore[operator]
    model.to("cpu")
    return TrainOutcome(
        loss=total / max(batches, 1), num_examples=data.num_train, spent=private.spent()
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
        pred = torch.cat(preds)
        inter = float((pred * masks).sum())
        denom = float(pred.sum() + masks.sum())
        dices.append(1.0 if denom == 0 else 2.0 * inter / denom)
    model.to("cpu").train()
    return EvalOutcome(
        loss=sum(losses) / max(data.num_val, 1),
        dice=float(np.mean(dices)),
        num_examples=data.num_val,
    )
