"""Differential privacy at the site: Opacus DP-SGD and epsilon accounting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from federation.config import PrivacyConfig

__all__ = [
    "MechanismStep",
    "PrivacyHistory",
    "PrivateTraining",
    "format_epsilon",
    "make_private",
]

_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class MechanismStep:
    """A run of identical subsampled-Gaussian steps: the unit accountants compose."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyHistory:
    """Every DP-SGD step a site has taken on a dataset, in order."""

    steps: list[MechanismStep] = field(default_factory=list)

    def extend(self, more: list[MechanismStep]) -> None:
        """Append steps, merging with the last entry when the mechanism is the same."""
        for step in more:
            last = self.steps[-1] if self.steps else None
            if last and (last.noise_multiplier, last.sample_rate) == (
                step.noise_multiplier,
                step.sample_rate,
            ):
                self.steps[-1] = MechanismStep(
                    last.noise_multiplier, last.sample_rate, last.steps + step.steps
                )
            else:
                self.steps.append(step)

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent at `delta` over the whole history (0 when nothing was spent)."""
        if accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant={accountant!r} is unknown; use one of {_ACCOUNTANTS}.")
        if not self.steps:
            return 0.0
        from opacus.accountants import create_accountant

        acc = create_accountant(accountant)
        acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.steps]
        return float(acc.get_epsilon(delta=delta))

    def to_lists(self) -> dict[str, list[float] | list[int]]:
        """Columns for a Flower ConfigRecord."""
        return {
            "noise": [s.noise_multiplier for s in self.steps],
            "rate": [s.sample_rate for s in self.steps],
            "steps": [s.steps for s in self.steps],
        }

    @classmethod
    def from_lists(cls, cols: dict[str, list[float] | list[int]]) -> PrivacyHistory:
        """Inverse of `to_lists`."""
        return cls(
            [
                MechanismStep(float(n), float(q), int(t))
                for n, q, t in zip(cols["noise"], cols["rate"], cols["steps"], strict=True)
            ]
        )


@dataclass
class PrivateTraining:
    """A model, optimizer and loader made private, and what they have spent so far."""

    model: nn.Module
    optimizer: Optimizer
    loader: DataLoader
    engine: object | None

    def empty_step(self) -> None:
        """Take the step of an empty Poisson batch: noise only under DP, nothing without.

        Skipping it would leak whether the batch was empty and under-count the spend.
        """
        if self.engine is None:
            return
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        for param in self.optimizer.params:  # type: ignore[attr-defined]
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
        self.optimizer.step()

    def spent(self) -> list[MechanismStep]:
        """Mechanism steps taken since `make_private` (empty without DP)."""
        if self.engine is None:
            return []
        history = self.engine.accountant.history  # type: ignore[attr-defined]
        return [MechanismStep(float(n), float(q), int(t)) for n, q, t in history]


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    cfg: PrivacyConfig,
) -> PrivateTraining:
    """Wrap training in Opacus DP-SGD (Poisson sampling, per-sample clipping, noise).

    The noise is never seeded: predictable noise would void the guarantee. With
    `cfg.mode == "none"` the inputs are returned unchanged.
    """
    if cfg.mode == "none":
        return PrivateTraining(model, optimizer, loader, None)
    if cfg.accountant not in _ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={cfg.accountant!r} is unknown; use rdp or prv.")
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=cfg.accountant)
    p_model, p_opt, p_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=cfg.grad_sample_mode,
    )
    return PrivateTraining(p_model, p_opt, p_loader, engine)


def format_epsilon(eps: float) -> str:
    """Epsilon for tables: `inf` without DP."""
    return "inf" if math.isinf(eps) else f"{eps:.2f}"
