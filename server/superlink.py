"""The coordinator's SuperLink: `python -m server.superlink ARGS` is `flower-superlink ARGS`.

With one change of Flower 1.41 (by `federation.flowerpatch`): Fleet requests, the sites'
polls, pulls and pushes, skip the six middleware layers that have nothing to do for them
(`flowerpatch.lean_fleet_middleware`), which cost the SuperLink about 2 ms of CPU per
request on a 2-core machine. `MEDFED_SUPERLINK_FULL_MIDDLEWARE=1` keeps all of them.
"""

from __future__ import annotations

import os
import sys

from federation import flowerpatch

__all__ = ["FULL_MIDDLEWARE_ENV"]

FULL_MIDDLEWARE_ENV = "MEDFED_SUPERLINK_FULL_MIDDLEWARE"


def _main(argv: list[str]) -> None:
    try:
        if os.environ.get(FULL_MIDDLEWARE_ENV) != "1":
            flowerpatch.lean_fleet_middleware()
    except flowerpatch.FlowerVersionError as err:
        sys.exit(f"medfed: {err}")
    flowerpatch.run_superlink(argv)


if __name__ == "__main__":
    _main(sys.argv[1:])
