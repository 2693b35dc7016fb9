"""The coordinator's SuperLink: `python -m server.superlink ARGS` is `flower-superlink ARGS`.

With two changes of Flower 1.41 (by `federation.flowerpatch`):

- Fleet requests, the sites' polls, pulls and pushes, skip the six middleware layers
  that have nothing to do for them (`flowerpatch.lean_fleet_middleware`), which cost
  the SuperLink about 2 ms of CPU per request on a 2-core machine; the layers that
  remain run their own code directly for Fleet and runtime requests, without
  Starlette's streaming between layers (`flowerpatch._Direct`).
  `MEDFED_SUPERLINK_FULL_MIDDLEWARE=1` keeps all of them, as Flower runs them.
- A site's empty poll is held until a message for it comes, up to `POLL_HOLD` seconds
  (`flowerpatch.held_fleet_polls`), instead of being answered at once and asked again.
  `MEDFED_SUPERLINK_POLL_HOLD=0` answers at once, as Flower does.
"""

from __future__ import annotations

import os
import sys

from federation import flowerpatch

__all__ = ["FULL_MIDDLEWARE_ENV", "POLL_HOLD", "POLL_HOLD_ENV"]

FULL_MIDDLEWARE_ENV = "MEDFED_SUPERLINK_FULL_MIDDLEWARE"
POLL_HOLD_ENV = "MEDFED_SUPERLINK_POLL_HOLD"
# Longest a site's empty poll is held (s): well inside the SuperNode's 30 s request
# timeout, and short enough that a stopping SuperLink waits little for held polls.
POLL_HOLD = 10.0


def _main(argv: list[str]) -> None:
    try:
        hold = float(os.environ.get(POLL_HOLD_ENV, POLL_HOLD))
    except ValueError:
        sys.exit(f"medfed: {POLL_HOLD_ENV} must be a number of seconds (0: answer at once)")
    try:
        if os.environ.get(FULL_MIDDLEWARE_ENV) != "1":
            flowerpatch.lean_fleet_middleware()
        if hold > 0:
            flowerpatch.held_fleet_polls(hold)
    except flowerpatch.FlowerVersionError as err:
        sys.exit(f"medfed: {err}")
    flowerpatch.run_superlink(argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
