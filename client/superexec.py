"""Warm ClientApps for a site's SuperNode: each message runs in a fork of a warm process.

Flower's SuperNode starts a SuperExec process, which starts a new `flwr-clientapp`
process for every message a site receives, and each one imports torch, MONAI and
Opacus again: seconds of CPU per message, most of a deployment round's fixed cost.
medfed's SuperNode runs its SuperExec as a thread instead and forks ClientApp tasks of
the site's own release from a fork server that imported the medfed ClientApp once
(`client.preload`): every task is still its own process (one message, own memory, own
exit), but starts warm. Any other app the site approved starts cold, from its own code.
"""

from __future__ import annotations

from pathlib import Path

from client.apptrust import is_release_fab
from federation import flowerpatch
from federation.flowerpatch import STARTED

__all__ = ["STARTED", "warm_clientapps"]


def warm_clientapps(state: Path) -> None:
    """This SuperNode forks ClientApps of the release of the site whose state is `state`.

    Raises:
        FlowerVersionError: The installed Flower is not the one medfed adapts.
    """
    flowerpatch.warm_clientapps(
        preload=["client.preload"], warm=lambda fab_hash: is_release_fab(state, fab_hash)
    )
