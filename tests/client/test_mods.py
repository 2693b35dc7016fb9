import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.mods import central_clipping_mod, packed_content_mod
from federation import keys
from federation.packing import is_packed, pack_content, unpack_content

# Messages are made outside a Flower runtime here: give them the identity one would.
TaskIdentity.task_id = 1
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1


def _train_msg(config):
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord([np.zeros(4, dtype=np.float32)]),
            keys.CONFIG: ConfigRecord(config),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _reply_with(msg, update):
    def call_next(m, _ctx):
        return Message(
            RecordDict(
                {
                    keys.ARRAYS: ArrayRecord([np.asarray(update, dtype=np.float32)]),
                    keys.STATUS: ConfigRecord({keys.SITE: "s", keys.REFUSED: ""}),
                }
            ),
            reply_to=m,
        )

    return call_next


def test_update_is_clipped_when_the_coordinator_sends_a_norm():
    msg = _train_msg({KEY_CLIPPING_NORM: 1.0})
    msg.metadata.__dict__["_message_id"] = "m1"
    out = central_clipping_mod(msg, _context(), _reply_with(msg, [3.0, 4.0, 0.0, 0.0]))
    clipped = out.content.array_records[keys.ARRAYS].to_numpy_ndarrays()[0]
    np.testing.assert_allclose(clipped, [0.6, 0.8, 0.0, 0.0], rtol=1e-5)


def test_without_a_norm_or_on_refusal_the_reply_passes_unchanged():
    msg = _train_msg({})
    msg.metadata.__dict__["_message_id"] = "m2"
    out = central_clipping_mod(msg, _context(), _reply_with(msg, [3.0, 4.0, 0.0, 0.0]))
    np.testing.assert_allclose(
        out.content.array_records[keys.ARRAYS].to_numpy_ndarrays()[0], [3.0, 4.0, 0.0, 0.0]
    )
    msg = _train_msg({KEY_CLIPPING_NORM: 1.0})
    msg.metadata.__dict__["_message_id"] = "m3"

    def refuse(m, _ctx):
        status = ConfigRecord({keys.SITE: "s", keys.REFUSED: "privacy budget"})
        return Message(RecordDict({keys.STATUS: status}), reply_to=m)

    out = central_clipping_mod(msg, _context(), refuse)
    assert out.content.config_records[keys.STATUS][keys.REFUSED] == "privacy budget"


def test_packed_messages_are_unpacked_for_the_site_and_the_reply_packed():
    msg = _train_msg({})
    msg.metadata.__dict__["_message_id"] = "m4"
    plain = msg.content.array_records[keys.ARRAYS].object_id
    msg.content = pack_content(msg.content)
    seen = []

    def handler(m, ctx):
        seen.append(m.content.array_records[keys.ARRAYS])
        return _reply_with(m, [1.0, 2.0, 3.0, 4.0])(m, ctx)

    out = packed_content_mod(msg, _context(), handler)
    assert seen[0].object_id == plain
    assert is_packed(out.content)
    update = unpack_content(out.content).array_records[keys.ARRAYS].to_numpy_ndarrays()[0]
    np.testing.assert_allclose(update, [1.0, 2.0, 3.0, 4.0])


def test_unpacked_messages_get_unpacked_replies():
    msg = _train_msg({})
    msg.metadata.__dict__["_message_id"] = "m5"
    out = packed_content_mod(msg, _context(), _reply_with(msg, [1.0, 2.0, 3.0, 4.0]))
    assert not is_packed(out.content)
    assert keys.ARRAYS in out.content.array_records
