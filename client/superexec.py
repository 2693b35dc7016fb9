"""Warm ClientApps for a site's SuperNode: each message runs in a fork of a warm process.

Flower's SuperExec starts a new `flwr-clientapp` process for every message a site
receives, and each one imports torch, MONAI and Opacus again: seconds of CPU per message,
most of a deployment round's fixed cost. Run as `python -m client.superexec
FLOWER-SUPEREXEC-ARGS`, this is `flower-superexec` (Flower 1.41) whose ClientApp tasks are
started from a fork server that imported the medfed ClientApp once: every task is still
its own process (one message, own memory, own exit), but starts warm.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["PRELOAD", "STARTED"]

# Imported once by the fork server; every ClientApp process is forked with them loaded
# (medfed imports its heavy dependencies where they are used, so they are named here).
PRELOAD = [
    "client.app",
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


STARTED = "Start warm ClientApp process"  # logged by each, like Flower's own start line


def _run_clientapp(spec: Any) -> None:
    """Body of one ClientApp process (what `flwr-clientapp --token ...` would run)."""
    from logging import INFO

    from flwr.supercore import log
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    from federation.flowerpull import short_pull_backoff

    if spec.suppress_output:  # as Flower's executor does for such tasks
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    log(INFO, "%s (task %d)", STARTED, spec.task_id)
    # A warm ClientApp asks for its message at once, often before the SuperNode holds
    # all of it: poll for the rest briefly.
    short_pull_backoff(sys.modules[run_clientapp.__module__], "pull_and_inflate_object_from_tree")
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def _executor_class() -> type:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor

    from client.apptrust import SITE_STATE_ENV, is_release_fab
    from client.superexec import _run_clientapp as target  # by module name, not __main__

    class WarmExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with ClientApp tasks forked warm."""

        def __init__(self) -> None:
            super().__init__()
            self._state = Path(os.environ.get(SITE_STATE_ENV, "."))
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(PRELOAD)
            from multiprocessing import forkserver

            forkserver.ensure_running()  # import now, not when the first message arrives

        def launch(self, spec: Any) -> Any:
            # The fork server preloaded the site's own release: any other app the site
            # approved starts cold, from its own code.
            if spec.task_type != TaskType.CLIENT_APP or not is_release_fab(
                self._state, spec.fab_hash
            ):
                return super().launch(spec)
            try:
                self._ctx.Process(target=target, args=(spec,), daemon=False).start()
            except OSError as err:
                return LaunchResult.failed(f"cannot fork a warm ClientApp: {err}")
            self.reconcile()
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            multiprocessing.active_children()  # reaps finished ClientApps

    return WarmExecutor


def _main(argv: list[str]) -> None:
    """`flower-superexec` with warm ClientApp processes."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec.executor import factory

    factory.SubprocessExecutor = _executor_class()  # type: ignore[misc,assignment]
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


if __name__ == "__main__":
    _main(sys.argv[1:])
