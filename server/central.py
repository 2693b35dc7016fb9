"""Client-level (central) DP at the coordinator: Flower's DP wrappers, and their ledger.

Each site's update is clipped (by the site, or adaptively by the coordinator) and the
coordinator adds Gaussian noise to the uniform average. The coordinator keeps its own
signed ledger of these releases, in the same format the sites use, so `medfed audit`
verifies both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    Strategy,
)

from federation.config import MedfedConfig
from federation.ledger import LedgerEntry, Mechanism, open_ledger
from server.checkpoint import restore_strategy_state, strategy_state

__all__ = [
    "COORDINATOR",
    "AdaptiveClipping",
    "CentralPrivacy",
    "FixedClientClipping",
    "with_central_dp",
]

COORDINATOR = "coordinator"
CLIENT_LEVEL_DATASET = "client-level"


def num_sampled(cfg: MedfedConfig) -> int:
    """Sites sampled per round, as the aggregation strategy samples them."""
    fed = cfg.federation
    return max(int(fed.num_sites * cfg.strategy.fraction_train), fed.min_sites)


class FixedClientClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper for clipping at the sites; the wrapped strategy's state is kept."""

    def __init__(self, strategy: Strategy, *args: Any, **kwargs: Any) -> None:
        super().__init__(strategy, *args, **kwargs)
        self.wrapped = strategy

    def state_dict(self) -> dict[str, Any]:
        """The wrapped strategy's state (`server.checkpoint`)."""
        return {"strategy": strategy_state(self.wrapped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        restore_strategy_state(self.wrapped, state["strategy"])


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's adaptive clipping at the coordinator, whose norm survives a restart."""

    def __init__(self, strategy: Strategy, *args: Any, **kwargs: Any) -> None:
        super().__init__(strategy, *args, **kwargs)
        self.wrapped = strategy

    def state_dict(self) -> dict[str, Any]:
        """The clipping norm it has adapted to, and the wrapped strategy's state."""
        return {
            "clipping_norm": float(self.clipping_norm),
            "strategy": strategy_state(self.wrapped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        self.clipping_norm = float(state["clipping_norm"])
        restore_strategy_state(self.wrapped, state["strategy"])


def with_central_dp(strategy: Strategy, cfg: MedfedConfig) -> Strategy:
    """Wrap `strategy` in Flower's client-level DP wrapper named by `privacy.clipping`."""
    p = cfg.privacy
    if p.clipping == "fixed-client":
        return FixedClientClipping(strategy, p.noise_multiplier, p.max_grad_norm, num_sampled(cfg))
    return AdaptiveClipping(
        strategy,
        p.noise_multiplier,
        num_sampled(cfg),
        initial_clipping_norm=p.max_grad_norm,
        clipped_count_stddev=p.clipped_count_stddev or p.noise_multiplier,
    )


class CentralPrivacy:
    """Accounts the coordinator's client-level releases in its own signed ledger."""

    def __init__(self, wrapper: Strategy, cfg: MedfedConfig, state_dir: Path) -> None:
        self.wrapper = wrapper
        self.cfg = cfg
        self.ledger = open_ledger(state_dir, COORDINATOR)
        self._clip_before = self.clipping_norm

    @property
    def clipping_norm(self) -> float:
        """The clipping norm the wrapper will apply next."""
        return float(self.wrapper.clipping_norm)  # type: ignore[attr-defined]

    def before_round(self) -> None:
        """Remember the norm this round's updates are clipped at."""
        self._clip_before = self.clipping_norm

    def effective_noise(self, delivered: int) -> float:
        """Noise multiplier of this round's release relative to its true sensitivity.

        Flower scales the noise to the sampled count and, with adaptive clipping, to the
        norm after its update; the sensitivity is the pre-update norm over the sites
        that delivered. The clipped-count query is composed in as a Gaussian too.
        """
        sampled = num_sampled(self.cfg)
        z = float(self.wrapper.noise_multiplier)  # type: ignore[attr-defined]
        z_update = z * (self.clipping_norm / self._clip_before) * (delivered / sampled)
        if self.cfg.privacy.clipping == "fixed-client":
            return z_update
        count_std = float(self.wrapper.clipped_count_stddev)  # type: ignore[attr-defined]
        return (z_update**-2 + (2 * count_std) ** -2) ** -0.5

    def record(self, *, run: str, server_round: int, delivered: int) -> LedgerEntry:
        """Sign and append this round's release."""
        p = self.cfg.privacy
        return self.ledger.append(
            run=run,
            server_round=server_round,
            dataset=CLIENT_LEVEL_DATASET,
            plan=f"central/{p.clipping}",
            mechanism=Mechanism(
                # Sites are drawn without replacement, not Poisson: claim no amplification.
                sample_rate=1.0,
                noise_multiplier=self.effective_noise(delivered),
                max_grad_norm=self._clip_before,
                steps=1,
                delta=p.delta,
            ),
            accountant=p.accountant,
            budget=p.target_epsilon if p.target_epsilon is not None else math.inf,
            grad_sample_mode="client-level",
        )
