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
