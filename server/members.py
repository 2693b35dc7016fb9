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
    """Deployment: only nodes whose key the coordinator registered for a site are asked.

    A node whose reply declares another site's name is logged and not asked again in
    this run (the data-quality query before round 1 finds it before any training, which
    matters under SecAgg+, where a masked update cannot be taken out of the sum).
    """

    def __init__(self, inner: Grid, identities: Mapping[int, str], *, run_name: str) -> None:
        super().__init__(inner)
        self._identities = dict(identities)
        self._strangers: set[int] = set()
        self._impostors: set[int] = set()
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
        return [n for n in connected if n in self._identities and n not in self._impostors]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate, watching the replies for impostors."""
        return self._watch(self.inner.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegate, watching the replies for impostors."""
        return self._watch(self.inner.send_and_receive(messages, timeout=timeout))

    def _watch(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            node = reply.metadata.src_node_id
            site, refused = reply_site(reply, self._identities)
            if refused and node not in self._impostors:
                self._impostors.add(node)
                self.log.error("%s; site %s is not asked again in this run", refused, site)
        return replies
