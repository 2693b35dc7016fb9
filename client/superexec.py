"""Warm ClientApps for a site's SuperNode: a run's messages run in one warm process.

Flower's SuperNode starts a SuperExec process, which starts a new `flwr-clientapp`
process for every message a site receives, and each one imports torch, MONAI and
Opacus again: seconds of CPU per message, most of a deployment round's fixed cost.
medfed's SuperNode runs its SuperExec as a thread instead and forks ClientApps of the
site's own release from a fork server that imported the medfed ClientApp once
(`client.preload`). One forked process serves a run's messages one after another (as
NVIDIA FLARE keeps a client process per job): from its second message on it trains
warm (allocator, kernels and caches in place), 0.4 against 0.5-0.7 CPU-s for an epoch.
Another run gets a process of its own. Any other app the site approved starts cold,
from its own code, one process per message.

glibc's malloc is told to keep what a ClientApp frees and grow its heap in large steps
(`CLIENTAPP_MALLOC`): by default it gives memory back and maps large tensors afresh, and
each training step pays the page faults again. In a 10-site deployment on a 2-core
machine the sites' training used 19% less CPU (6.6 against 8.1 CPU-s per round).

The ClientApp trains at niceness `CLIENTAPP_NICE` (`MEDFED_CLIENTAPP_NICE`), below the
site's SuperNode: training takes whatever CPU the machine has, but the node's traffic
with the coordinator (messages, replies, heartbeats) and whatever else the site's
machine runs come first. On one machine that hosts a whole test consortium, the
SuperLink, ServerApp and every SuperNode come before any site's training: each site gets
its model soon after the round starts instead of after the first sites' training.
"""

from __future__ import annotations

import os
from pathlib import Path

from client.apptrust import is_release_fab
from federation import flowerpatch
from federation.flowerpatch import STARTED

__all__ = ["CLIENTAPP_MALLOC", "CLIENTAPP_NICE", "NICE_ENV", "STARTED", "warm_clientapps"]

# glibc malloc settings of the fork server and so of its ClientApps (bytes): tensors up
# to 32 MB from the heap, freed memory kept until the process exits, 256 MB more heap
# at each growth (address space; memory only once used). A site's own values win.
CLIENTAPP_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
# Niceness of the warm ClientApps (0-19; higher yields more), unless the site sets NICE_ENV.
# The most: at 10, thirty sites training on one machine outweigh its SuperLink 3 to 1.
CLIENTAPP_NICE = 19
NICE_ENV = "MEDFED_CLIENTAPP_NICE"


def warm_clientapps(state: Path) -> None:
    """This SuperNode forks ClientApps of the release of the site whose state is `state`.

    Raises:
        FlowerVersionError: The installed Flower is not the one medfed adapts.
    """
    for name, value in CLIENTAPP_MALLOC.items():  # read when the fork server starts
        os.environ.setdefault(name, value)
    flowerpatch.warm_clientapps(
        preload=["client.preload"],
        warm=lambda fab_hash: is_release_fab(state, fab_hash),
        nice=int(os.environ.get(NICE_ENV, CLIENTAPP_NICE)),
    )
