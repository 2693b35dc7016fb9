"""Learning tasks the consortium can train, each a plug-in found by its name.

`task.name=NAME` loads the module `federation.tasks.NAME` and uses its `TASK` object
(see `federation.tasks.base.Task`); adding a task touches neither client nor server.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.tasks.base import Task

__all__ = ["available_tasks", "get_task"]

_NOT_TASKS = frozenset({"base", "metrics", "segmentation", "store"})


def available_tasks() -> list[str]:
    """Names of the task modules shipped under `federation/tasks/`."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS and not m.ispkg
    )


def get_task(name: str) -> Task:
    """The task registered under `name`: `federation.tasks.<name>.TASK`.

    Raises:
        ValueError: No such task module, or it defines no valid `TASK`.
    """
    from federation.tasks.base import Task

    if not name.isidentifier() or name in _NOT_TASKS or name not in available_tasks():
        raise ValueError(
            f"task.name={name!r} is unknown; available tasks: {available_tasks()}. A new task "
            "is a module federation/tasks/<name>.py defining TASK, plus conf/task/<name>.yaml."
        )
    module = importlib.import_module(f"{__name__}.{name}")
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task) or task.name != name:
        raise ValueError(
            f"federation/tasks/{name}.py must define TASK, an object with the attributes and "
            f"methods of federation.tasks.base.Task and name {name!r}; found {task!r}."
        )
    return task
