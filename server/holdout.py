"""Server-side evaluation of the global model on the coordinator's own labelled data."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import ArrayRecord

from federation import keys
from federation.config import MedfedConfig
from federation.dicom.prepare import labelled_volumes
from federation.errors import FederationError
from federation.logs import context_logger
from federation.models import build_model
from federation.tasks import get_task

__all__ = ["Holdout"]


class Holdout:
    """A labelled DICOM folder at the coordinator, used whole as an evaluation set.

    Under FedBN the global model has no norm layers; they keep their initial values
    here, so the figure is that of the shared part alone.

    Raises:
        FederationError: The folder holds no usable labelled series.
    """

    def __init__(self, path: Path, cfg: MedfedConfig) -> None:
        self.cfg = cfg
        self.task = get_task(cfg.task.name)
        log = context_logger(run=cfg.run_name)
        with tempfile.TemporaryDirectory(prefix="medfed-holdout-") as cache:
            volumes, report = labelled_volumes(  # loaded into memory
                path, Path(cache), require_mask=self.task.needs_mask
            )
        problems = report.problems
        if not volumes:
            raise FederationError(
                f"evaluation.holdout={path}: no usable labelled series "
                f"({len(problems)} files or series not usable); point it at a folder of "
                "labelled DICOM or set evaluation.holdout=null."
            )
        try:
            self.data = self.task.prepare_holdout(volumes, cfg.task)
        except ValueError as err:
            raise FederationError(f"evaluation.holdout={path}: {err}") from err
        log.info("server hold-out: %d series from %s", len(volumes), path)

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """The task's metrics and loss of the global model on the hold-out set."""
        model = build_model(self.cfg.model, seed=self.cfg.seed)
        model.load_state_dict(arrays.to_torch_state_dict(), strict=not self.cfg.strategy.local_norm)
        outcome = self.task.evaluate(model, self.data)
        return {
            **outcome.metrics,
            keys.EVAL_LOSS: outcome.loss,
            keys.NUM_EXAMPLES: float(outcome.num_examples),
        }
