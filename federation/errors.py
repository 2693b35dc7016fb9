"""Errors that name who failed and what to do about it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FederationError", "SiteDataError", "SiteRefusal"]


class SiteRefusal(Exception):
    """A site declines a round; the reason travels to the coordinator."""

    def __init__(self, site: str, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"site {site!r}: {reason}")


class SiteDataError(SiteRefusal):
    """A site cannot train: its data folder is missing or holds no usable series."""

    def __init__(self, site: str, path: Path | str, reason: str) -> None:
        self.path = str(path)
        super().__init__(site, f"{reason} (data path: {self.path})")


class FederationError(RuntimeError):
    """A federated run cannot go on (e.g. too few sites delivered a round)."""
