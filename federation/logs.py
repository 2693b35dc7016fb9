"""Logging that says which run, which site and which round."""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

__all__ = ["SITE_LOG_ENV", "SITE_LOG_FILE", "context_logger", "setup_logging"]

LOGGER_NAME = "medfed"
VERBOSE_ENV = "MEDFED_VERBOSE"
# Simulated sites write their lines to this file (set by the simulation launcher), so the
# terminal shows the coordinator's lines only; the run's summary names the file.
SITE_LOG_ENV = "MEDFED_SITE_LOG"
SITE_LOG_FILE = "sites.log"


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


class _NoDeprecationNotices(logging.Filter):
    """Drop Flower's notices about its own deprecated entry points (medfed chose them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def setup_logging(*, verbose: bool | None = None, site: bool = False) -> None:
    """Log medfed at INFO to stderr; Flower, Ray and MLflow only warnings unless verbose.

    Idempotent, so every process (CLI, ServerApp, each ClientApp) can call it. A site
    (`site=True`) also writes to the file `MEDFED_SITE_LOG` names, when set.
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
    site_log = os.environ.get(SITE_LOG_ENV)
    if site and site_log and not any(isinstance(h, logging.FileHandler) for h in ours.handlers):
        to_file = logging.FileHandler(site_log)
        to_file.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        ours.addHandler(to_file)
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Warnings only from Flower, Ray and Opacus; errors only from MLflow; no notices."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("flwr", "ray", "alembic", "opacus"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _NoDeprecationNotices) for f in flwr_logger.filters):
        flwr_logger.addFilter(_NoDeprecationNotices())
