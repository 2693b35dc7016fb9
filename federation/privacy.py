"""Differential privacy at the site: Opacus DP-SGD and epsilon accounting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from federation.config import PrivacyConfig

if TYPE_CHECKING:  # torch is imported where training happens, not by the ledger's readers
    from opacus import PrivacyEngine
    from torch import Tensor, nn
    from torch.optim import Optimizer
    from torch.utils.data import DataLoader

__all__ = [
    "GRAD_SAMPLE_MODES",
    "MechanismStep",
    "PrivacyHistory",
    "PrivateTraining",
    "calibrate_noise",
    "make_private",
    "plan_round",
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
        history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.steps]
        acc.load_state_dict({"history": history, "mechanism": acc.mechanism()})
        return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivateTraining:
    """Model, optimizer, loader and loss made private, and what they have spent so far.

    In Opacus's ghost-clipping mode the loss is a wrapper whose `backward()` runs the
    two passes of fast gradient clipping; use `criterion` in every mode.
    """

    model: nn.Module
    optimizer: Optimizer
    loader: DataLoader
    criterion: nn.Module
    engine: PrivacyEngine | None
    grad_sample_mode: str = "hooks"

    def forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One batch's loss, backpropagated; the optimizer's step is the caller's.

        Under DP-SGD in hooks mode Opacus's hooks compute each weight's per-sample
        gradients from the layer's input and output gradient, and its optimizer sets the
        weight's gradient to their clipped, noised sum: autograd's own weight gradients
        would be thrown away. Backpropagating to the batch's input instead still brings
        every layer its output gradient (so every hook fires, as before) without
        computing them. Clipping, noise and accounting are Opacus's, unchanged. A model
        with frozen layers backpropagates as usual: the gradient would otherwise go on
        through the layers autograd stops at.
        """
        import warnings

        to_input = (
            self.engine is not None
            and self.grad_sample_mode == "hooks"
            and all(p.requires_grad for p in self.model.parameters())
        )
        if to_input:
            inputs = inputs.detach().requires_grad_(True)
        loss = self.criterion(self.model(inputs), targets)
        with warnings.catch_warnings():
            # Opacus hooks fire on the first layer, whose input needs no grad: expected.
            warnings.filterwarnings("ignore", message="Full backward hook")
            if to_input:
                loss.backward(inputs=[inputs])
            else:  # ghost clipping's loss runs its own two passes
                loss.backward()
        return loss

    def empty_step(self) -> None:
        """Take the step of an empty Poisson batch: noise only under DP, nothing without.

        Skipping it would leak whether the batch was empty and under-count the spend.
        """
        if self.engine is None:
            return
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        for param in self.optimizer.params:  # type: ignore[attr-defined]
            # No samples: a zero clipped sum (ghost clipping), or no per-sample
            # gradients (other modes); the optimizer then adds the noise alone.
            if self.grad_sample_mode == "ghost":
                param.grad = torch.zeros_like(param)
            else:
                param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
        self.optimizer.step()

    def spent(self) -> list[MechanismStep]:
        """Mechanism steps taken since `make_private` (empty without DP)."""
        if self.engine is None:
            return []
        history = self.engine.accountant.state_dict()["history"]
        return [MechanismStep(float(n), float(q), int(t)) for n, q, t in history]


GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    criterion: nn.Module,
    cfg: PrivacyConfig,
) -> PrivateTraining:
    """Wrap training in Opacus DP-SGD (Poisson sampling, per-sample clipping, noise).

    The noise is never seeded here: the caller seeds torch from a secret under DP.
    Without example-level DP (modes `none` and `central`) the inputs are returned as
    they are.

    Raises:
        ValueError: Unknown accountant or per-sample-gradient mode.
    """
    if cfg.mode != "dp-sgd":
        return PrivateTraining(model, optimizer, loader, criterion, None)
    if cfg.accountant not in _ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={cfg.accountant!r} is unknown; use rdp or prv.")
    if cfg.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"privacy.grad_sample_mode={cfg.grad_sample_mode!r} is unknown; "
            f"use one of {GRAD_SAMPLE_MODES}."
        )
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=cfg.accountant)
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=cfg.grad_sample_mode,
    )
    if cfg.grad_sample_mode == "ghost":
        p_model, p_opt, p_criterion, p_loader = made
    else:
        (p_model, p_opt, p_loader), p_criterion = made, criterion
    return PrivateTraining(p_model, p_opt, p_loader, p_criterion, engine, cfg.grad_sample_mode)


def plan_round(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and DP steps of one round, as Opacus's Poisson loader takes them."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, epochs * batches


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Noise multiplier that spends `target_epsilon` at `delta` over `steps` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )
