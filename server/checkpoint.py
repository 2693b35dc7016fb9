"""Coordinator checkpoints: what a run needs to continue after its coordinator died.

After every completed round the coordinator writes the global model, the mutable state
of its strategy (server optimiser moments, adaptive clipping norm), the round history,
the best round so far and its MLflow run, atomically, to `<run dir>/checkpoint.pt`.
The privacy state needs no copy here: the sites' ledgers and the coordinator's own are
on disk, and a site asked again for a round it trained answers from its stored reply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from federation.compose import compose_config, config_from_json
from federation.config import MedfedConfig, resolve_path
from federation.files import write_atomically
from federation.tracking import default_tracking_uri

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "RUN_DIR_TAG",
    "Checkpoint",
    "Resumable",
    "check_run_dir",
    "find_run_dir",
    "restore_strategy_state",
    "resume_config",
    "strategy_state",
    "to_arrays",
    "to_tensors",
]

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"  # the run's exact configuration, read back on resume
RUN_DIR_TAG = "medfed.run_dir"  # MLflow tag: where the run's checkpoint lives

# Overrides `--resume` accepts: they only say where the run is.
_LOCATING = ("output_dir", "tracking.uri")


@dataclass
class Checkpoint:
    """State of a run after its last completed round."""

    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    history: dict[str, Any]
    mlflow_run_id: str
    best_round: int = -1
    best_value: float = float("-inf")

    def save(self, run_dir: Path) -> Path:
        """Write the checkpoint atomically (a crash mid-write keeps the previous one)."""
        path = run_dir / CHECKPOINT_FILE
        write_atomically(path, lambda tmp: torch.save(self.__dict__, tmp))
        return path

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        """Read the checkpoint of the run in `run_dir`.

        Raises:
            FileNotFoundError: The run has no checkpoint (it never completed a round).
        """
        path = run_dir / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"no checkpoint at {path}: the run did not complete a round, so there is "
                "nothing to resume; start it again instead."
            )
        # Plain tensors, numbers and strings only: nothing executable is unpickled.
        saved = torch.load(path, weights_only=True)
        saved.pop("extra", None)  # an unused field in checkpoints of earlier versions
        return cls(**saved)


@runtime_checkable
class Resumable(Protocol):
    """A strategy whose state changes from round to round and is kept in checkpoints.

    A strategy without it (FedAvg, FedProx, Krum, ...) has none; a wrapper that has it
    includes its inner strategy's state in its own.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state, as tensors, numbers and strings (loaded with `weights_only`)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned on an identically built strategy."""
        ...


_DIFFERENT = (
    "the checkpoint was written by a differently configured strategy; resume with the "
    "run's own configuration (medfed run --resume NAME, no overrides)."
)


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The round-to-round state of a strategy (empty for a stateless one)."""
    return strategy.state_dict() if isinstance(strategy, Resumable) else {}


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back state saved by `strategy_state` into an identically built strategy.

    Raises:
        ValueError: The strategy is built differently from the checkpointed one.
    """
    if not isinstance(state, dict):
        raise ValueError(
            "the checkpoint keeps its strategy state in the format of an earlier medfed, "
            "which this one cannot resume; start the run again under a new run_name"
        )
    if not isinstance(strategy, Resumable):
        if state:
            raise ValueError(_DIFFERENT)
        return
    if set(state) != set(strategy.state_dict()):
        raise ValueError(_DIFFERENT)
    strategy.load_state_dict(state)


def to_tensors(arrays: dict[str, NDArray[Any]] | None) -> dict[str, torch.Tensor] | None:
    """NumPy arrays as tensors, for a checkpoint."""
    return None if arrays is None else {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def to_arrays(tensors: dict[str, torch.Tensor] | None) -> dict[str, NDArray[Any]] | None:
    """Tensors read from a checkpoint as NumPy arrays."""
    return None if tensors is None else {k: v.numpy() for k, v in tensors.items()}


def check_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Refuse to start a run over an existing one, or to resume one that never started.

    Raises:
        FileExistsError: A new run would reuse an existing run's name.
        FileNotFoundError: There is nothing to resume.
    """
    exists = (run_dir / CHECKPOINT_FILE).exists()
    if exists and not resume:
        raise FileExistsError(
            f"run {run_dir.name!r} already exists in {run_dir}; continue it with "
            f"`medfed run --resume {run_dir.name}` or give the new run another run_name."
        )
    if resume and not exists:
        Checkpoint.load(run_dir)  # raises, saying why


def find_run_dir(run: str, *, output_dir: Path, tracking_uri: str) -> Path:
    """The folder of a run, given its name (under `output_dir`) or its MLflow run id.

    Raises:
        FileNotFoundError: Neither names a run with a saved configuration.
    """
    candidate = output_dir / run
    if not (candidate / CONFIG_FILE).exists():
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            tag = MlflowClient(tracking_uri).get_run(run).data.tags.get(RUN_DIR_TAG)
        except MlflowException:
            tag = None
        if tag is None:
            raise FileNotFoundError(
                f"no run {run!r}: neither {candidate / CONFIG_FILE} exists nor is it an MLflow "
                f"run id in {tracking_uri}; pass the run name with output_dir=... or the "
                "MLflow run id with tracking.uri=..."
            )
        candidate = Path(tag)
    return candidate


def resume_config(run: str, overrides: list[str]) -> MedfedConfig:
    """The saved configuration of `run` (its name or MLflow run id), set to resume.

    Raises:
        ValueError: An override would change the run rather than locate it.
        FileNotFoundError: No such run.
    """
    changing = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _LOCATING]
    if changing:
        raise ValueError(
            f"--resume continues a run with its own configuration; only {', '.join(_LOCATING)} "
            f"may be given (to find it), not {' '.join(changing)}"
        )
    where = compose_config(overrides)
    run_dir = find_run_dir(
        run,
        output_dir=resolve_path(where.output_dir),
        tracking_uri=where.tracking.uri or default_tracking_uri(),
    )
    saved = config_from_json((run_dir / CONFIG_FILE).read_text())
    return dataclasses.replace(saved, resume=True)
