"""Short waits between Flower's pulls of a message's parts (deployment engine, Flower 1.41).

A message travels as a tree of objects. Flower makes it visible before all its objects
have arrived, and whoever pulls it early (a SuperNode pulling from the SuperLink, a
ClientApp from its SuperNode, the ServerApp from the SuperLink) waits 1, 2, 4, ... s
between tries. On a round of a few seconds that is most of the time. medfed polls every
`PULL_BACKOFF[0]` s, backing off to at most `PULL_BACKOFF[1]` s.
"""

from __future__ import annotations

import functools
from types import ModuleType

__all__ = ["PULL_BACKOFF", "short_pull_backoff"]

PULL_BACKOFF = (0.05, 0.5)


def short_pull_backoff(module: ModuleType, name: str) -> None:
    """Rebind Flower's pull function `module.name` with medfed's short backoff (idempotent)."""
    pull = getattr(module, name)
    if isinstance(pull, functools.partial):
        return
    setattr(
        module,
        name,
        functools.partial(pull, initial_backoff=PULL_BACKOFF[0], backoff_cap=PULL_BACKOFF[1]),
    )
