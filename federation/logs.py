"""Logging that says which run, which site and which round."""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

__all__ = ["context_logger", "setup_logging"]

LOGGER_NAME = "medfed"
VERBOSE_ENV = "MEDFED_VERBOSE"


class _ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        tags = "".join(f"[{k} {v}]" for k, v in extra.items() if v is not None)
        return (f"{tags} {msg}" if tags else msg), kwargs


def context_logger(**context: object) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose lines start with e.g. `[run demo][site site-2][round 3]`."""
    return _ContextAdapter(logging.getLogger(LOGGER_NAME), context)


_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(*, verbose: bool | None = None) -> None:
    """Log medfed at INFO to stderr; Flower, Ray and MLflow only warnings unless verbose.

    Idempotent, so every process (CLI, ServerApp, each ClientApp) can call it.
    `verbose=None` reads `MEDFED_VERBOSE=1` from the environment, which child
    processes (simulated sites) inherit from the CLI.
    """
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    else:
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    import flwr.supercore.logger  # noqa: F401  (Flower sets its logger up on import)

    ours = logging.getLogger(LOGGER_NAME)
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    root = logging.getLogger()
    if not root.handlers:
        # Claim the root logger first: some libraries call basicConfig on import
        # (Opacus does), which would print Flower's DEBUG records a second time.
        fallback = logging.StreamHandler()
        fallback.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        fallback.setLevel(logging.WARNING)
        root.addHandler(fallback)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("flwr", "ray", "mlflow", "alembic", "opacus"):
            logging.getLogger(name).setLevel(logging.WARNING)
