"""Replies are named by the key a node authenticated with, not by what they declare."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation import keys
from server.members import reply_site

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
