"""Replies are named by the key a node authenticated with, not by what they declare."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation import keys
from server.grids import PackingGrid
from server.members import MemberGrid, reply_site

TaskIdentity.task_id = 1  # messages are made as a ServerApp task would make them
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1


def _reply(node: int, declared: str) -> Message:
    asked = Message(RecordDict(), dst_node_id=node, message_type="train")
    asked.metadata.__dict__["_message_id"] = f"m{node}"  # as the grid assigns on sending
    content = RecordDict({keys.STATUS: ConfigRecord({keys.SITE: declared, keys.REFUSED: ""})})
    reply = Message(content, reply_to=asked)
    assert reply.metadata.src_node_id == node
    return reply


def test_the_registered_key_names_the_reply_and_impostors_are_refused():
    identities = {11: "site-1", 12: "site-2"}
    assert reply_site(_reply(11, "site-1"), identities) == ("site-1", None)
    site, refused = reply_site(_reply(12, "site-1"), identities)
    assert site == "site-2"
    expected = "node 12 authenticated with site site-2's key but declared itself 'site-1'"
    assert refused == f"{expected}: reply refused"
    site, refused = reply_site(_reply(13, "site-1"), identities)
    assert site == "node-13" and refused is not None and "not an enrolled site" in refused
    # Simulation: no keys, every site a thread of the coordinator's process.
    assert reply_site(_reply(12, "site-1"), {}) == ("site-1", None)


class _Nodes:
    """The sites' side in process: node 13 is connected with a key no site enrolled."""

    def __init__(self, declared: dict[int, str]) -> None:
        self.declared = declared

    def get_node_ids(self):
        return [*self.declared, 13]

    def send_and_receive(self, messages, *, timeout=None):
        return [
            _reply(m.metadata.dst_node_id, self.declared[m.metadata.dst_node_id]) for m in messages
        ]


def test_the_member_grid_asks_enrolled_nodes_only_and_drops_an_impostor_for_the_run():
    grid = MemberGrid(
        _Nodes({11: "site-1", 12: "site-1"}), {11: "site-1", 12: "site-2"}, run_name="t"
    )
    assert sorted(grid.get_node_ids()) == [11, 12]  # 13 is never asked
    asked = [
        Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(asked)
    assert len(replies) == 2  # the impostor's reply is left for the strategy to refuse
    assert list(grid.get_node_ids()) == [11]
    assert PackingGrid(grid).identities == {11: "site-1", 12: "site-2"}
