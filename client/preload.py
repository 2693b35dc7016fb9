"""What a site's fork server imports once, so that every ClientApp forked from it starts warm.

`client.superexec` names this module as the fork server's only preload: importing it
imports `MODULES`. medfed imports its heavy dependencies where they are used, so they
are named here. MONAI imports all its subpackages at once, MLflow, matplotlib, pandas and
scikit-learn among them (for its training handlers, plots, CSV datasets and ROC metrics,
which a ClientApp never uses): they are left out of the fork server (about 90 MB less in
each site's memory); a ClientApp that needs one imports it itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["LEFT_OUT", "MODULES", "load"]

MODULES = (
    "client.supernode",  # the SuperNode's main module, which each fork runs again
    "client.app",
    "federation.flowerpatch",
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
)
LEFT_OUT = ("mlflow", "matplotlib", "pandas", "sklearn")


class _Refused(importlib.abc.Loader):
    """Fails to load, as a package that is not installed does."""

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        raise ModuleNotFoundError(
            f"{spec.name} is left out of the ClientApps' fork server", name=spec.name
        )

    def exec_module(self, module: ModuleType) -> None:  # never reached: create_module fails
        raise AssertionError(module.__name__)


class _LeftOut(importlib.abc.MetaPathFinder):
    """Refuses `LEFT_OUT` packages, as if they were not installed.

    A spec without an origin, whose loading fails: an import fails as it would for a
    missing package, and `importlib.util.find_spec` (torch's dynamo asks it for pandas
    and scikit-learn) still answers instead of raising.
    """

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in LEFT_OUT:
            return ModuleSpec(name, _Refused())
        return None


def load() -> None:
    """Import `MODULES` without `LEFT_OUT`; later imports of those work as usual."""
    finder = _LeftOut()
    sys.meta_path.insert(0, finder)
    try:
        for name in MODULES:
            importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)


load()
