"""Learning tasks the consortium can train."""

from types import ModuleType

__all__ = ["get_task"]

_TASKS = {"seg2d": "federation.tasks.seg2d"}


def get_task(name: str) -> ModuleType:
    """Return the task module registered under `name`."""
    import importlib

    if name not in _TASKS:
        raise ValueError(f"task.name={name!r} is unknown; available tasks: {sorted(_TASKS)}.")
    return importlib.import_module(_TASKS[name])
