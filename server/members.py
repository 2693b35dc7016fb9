"""Who a reply is from: the site whose registered key the node authenticated with.

In deployment the SuperLink admits a node only with a key the coordinator registered,
and `server.deploy` records which site's key got which node id. `MemberGrid` asks only
those nodes, and `reply_site` names every reply by that record, never by the name the
node declares: a node that declares another site's name is refused. In simulation there
are no keys (every site is a thread of this process) and the declared name is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from federation import keys
from federation.logs import context_logger
from server.grids import DelegatingGrid

__all__ = ["MemberGrid", "reply_site", "site_identities"]


def site_identities(grid: Grid) -> dict[int, str]:
    """The registered site of each node id, if the grid knows them (deployment); else {}."""
    return dict(getattr(grid, "identities", {}))


def reply_site(msg: Message, identities: Mapping[int, str]) -> tuple[str, str | None]:
    """The site a reply is from, and why it must be refused (or None).

    With `identities`, the name is the one the node's key was registered for; a reply
    that declares another name, or comes from an unregistered node, is refused.
    """
    node = msg.metadata.src_node_id
    status = msg.content.config_records.get(keys.STATUS) if msg.has_content() else None
    declared = str(status.get(keys.SITE, "")) if status is not None else ""
    if not identities:
        return declared or f"node-{node}", None
    site = identities.get(node)
    if site is None:
        return f"node-{node}", f"node {node} is not an enrolled site's key: reply refused"
    if declared and declared != site:
        return site, (
            f"node {node} authenticated with site {site}'s key but declared itself "
            f"{declared!r}: reply refused"
        )
    return site, None


class MemberGrid(DelegatingGrid):
    """Deployment: only nodes whose key the coordinator registered for a site are asked."""

    def __init__(self, inner: Grid, identities: Mapping[int, str], *, run_name: str) -> None:
        super().__init__(inner)
        self._identities = dict(identities)
        self._strangers: set[int] = set()
        self.log = context_logger(run=run_name)

    @property
    def identities(self) -> dict[int, str]:
        """The registered site of each node id."""
        return dict(self._identities)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes that are enrolled sites; others are logged once, never asked."""
        connected = list(self.inner.get_node_ids())
        for node in connected:
            if node not in self._identities and node not in self._strangers:
                self._strangers.add(node)
                self.log.warning(
                    "node %d is connected but its key is no enrolled site's: it is never asked",
                    node,
                )
        return [n for n in connected if n in self._identities]
