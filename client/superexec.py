"""Warm ClientApps for a site's SuperNode: each message runs in a fork of a warm process.

Flower's SuperExec starts a new `flwr-clientapp` process for every message a site
receives, and each one imports torch, MONAI and Opacus again: seconds of CPU per message,
most of a deployment round's fixed cost. Run as `python -m client.superexec
FLOWER-SUPEREXEC-ARGS`, this is `flower-superexec` (Flower 1.41) whose ClientApp tasks are
started from a fork server that imported the medfed ClientApp once: every task is still
its own process (one message, own memory, own exit), but starts warm.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from client.apptrust import SITE_STATE_ENV, is_release_fab
from federation import flowerpatch
from federation.flowerpatch import STARTED

__all__ = ["PRELOAD", "STARTED"]

# Imported once by the fork server; every ClientApp process is forked with them loaded
# (medfed imports its heavy dependencies where they are used, so they are named here).
PRELOAD = [
    "client.app",
    "federation.flowerpatch",
    "federation.tasks.seg2d",
    "federation.tasks.seg3d",
    "federation.tasks.classify",
    "monai.networks.nets",
    "monai.losses",
    "monai.transforms",
    "monai.inferers",
    "opacus",
    "opacus.accountants",
    "opacus.validators",
    "flwr.supernode.runtime.run_clientapp",
    # Imported lazily on first use, so each ClientApp would import them again:
    "httpcore",  # httpx's transport (the connection to the SuperNode)
    "h11",
    "torch._dynamo",  # by every torch optimizer's constructor (~1 s of each round's training)
    "highdicom",  # the data check (quality query)
    "sqlite3",
]


def _main(argv: list[str]) -> None:
    """`flower-superexec` whose ClientApps of the site's own release start warm.

    The fork server preloaded the site's own release: any other app the site approved
    starts cold, from its own code.
    """
    state = Path(os.environ.get(SITE_STATE_ENV, "."))
    try:
        flowerpatch.superexec_wakes_on_signal()
        flowerpatch.forked_clientapp_executor(
            preload=PRELOAD, warm=lambda fab_hash: is_release_fab(state, fab_hash)
        )
    except flowerpatch.FlowerVersionError as err:
        sys.exit(f"medfed: {err}")
    flowerpatch.run_superexec(argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
