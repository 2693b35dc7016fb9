import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation import keys
from federation.packing import PACKED_KEY, is_packed, pack_content
from server.grids import PackingGrid

TaskIdentity.task_id = 1
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1


class _Sites:
    """The sites' side of a grid, answering in process: replies carry what is given."""

    def __init__(self, answer):
        self.answer = answer
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent = list(messages)
        replies = []
        for i, msg in enumerate(self.sent):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            replies.append(Message(self.answer(msg), reply_to=msg))
        return replies


def _message():
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord([np.arange(6, dtype=np.float32).reshape(2, 3)]),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
        }
    )
    return Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN)


def test_messages_leave_packed_and_replies_arrive_unpacked():
    sites = _Sites(lambda msg: pack_content(RecordDict({keys.ARRAYS: ArrayRecord([np.ones(3)])})))
    (reply,) = PackingGrid(sites).send_and_receive([_message()])
    assert is_packed(sites.sent[0].content)
    np.testing.assert_array_equal(
        reply.content.array_records[keys.ARRAYS].to_numpy_ndarrays()[0], np.ones(3)
    )


def test_a_reply_whose_pack_is_damaged_becomes_an_error_reply():
    def damaged(msg):
        data = pack_content(RecordDict({keys.ARRAYS: ArrayRecord([np.ones(3)])}))[PACKED_KEY]
        return RecordDict({PACKED_KEY: ConfigRecord({PACKED_KEY: data[PACKED_KEY][:-5]})})

    (reply,) = PackingGrid(_Sites(damaged)).send_and_receive([_message()])
    assert reply.has_error()
    assert "rejected reply: packed content is malformed" in reply.error.reason


class _Slow:
    """A grid whose replies come at given polls (one list of message ids per poll)."""

    def __init__(self, ids, arrivals):
        self.ids, self.arrivals, self.polls = ids, list(arrivals), 0

    def push_messages(self, messages):
        return list(self.ids)

    def pull_messages(self, pending):
        self.polls += 1
        came = self.arrivals.pop(0) if self.arrivals else []
        replies = []
        for mid in came:
            reply = Message(RecordDict(), reply_to=_message())
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            replies.append(reply)
        return replies


def test_the_coordinator_polls_soon_after_a_reply_and_backs_off_while_none_comes(monkeypatch):
    import server.grids as grids

    waits = []
    monkeypatch.setattr(grids.time, "sleep", waits.append)
    inner = _Slow(["a", "b"], [[], [], [], [], ["a"], [], ["b"]])
    replies = list(grids.PollingGrid(inner, first=0.05, cap=0.25).send_and_receive([]))
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    # Doubling up to the cap while nothing came, back to the first wait after a reply.
    assert waits == [0.1, 0.2, 0.25, 0.25, 0.05, 0.1]
