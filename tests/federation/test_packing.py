import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.inflatable.inflatable_utils import iterate_object_tree

from federation.packing import PACKED_KEY, is_packed, pack_content, unpack_content


def _content() -> RecordDict:
    arrays = ArrayRecord(
        {
            "conv.weight": Array(torch.randn(4, 2, 3, 3)),
            "norm.bias": Array(np.arange(5, dtype=np.float16)),
            "steps": Array(np.array(7, dtype=np.int64)),
            "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        }
    )
    return RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"server-round": 3, "run": "demo"}),
            "metrics": MetricRecord({"loss": 0.5}),
        }
    )


def _objects(content: RecordDict) -> int:
    return sum(1 for _ in iterate_object_tree(get_object_tree(content)))


def test_content_travels_as_three_objects_and_unpacks_exactly():
    content = _content()
    packed = pack_content(content)
    assert is_packed(packed) and not is_packed(content)
    assert list(packed.keys()) == [PACKED_KEY]
    # The RecordDict and one ConfigRecord (plus the message: three requests a hop);
    # unpacked, every record, array and chunk is one more.
    assert _objects(packed) == 2 < _objects(content)
    back = unpack_content(packed)
    assert list(back.keys()) == list(content.keys())
    for name, array in content.array_records["arrays"].items():
        got = back.array_records["arrays"][name]
        assert (got.dtype, got.shape, got.stype, got.data) == (
            array.dtype,
            array.shape,
            array.stype,
            array.data,
        )
    assert back.object_id == content.object_id
    assert pack_content(packed).object_id == packed.object_id  # packing twice changes nothing
    assert unpack_content(back).object_id == back.object_id


def test_damaged_packs_are_refused_with_the_reason():
    data = pack_content(_content())[PACKED_KEY][PACKED_KEY]
    assert isinstance(data, bytes)
    damaged = RecordDict({PACKED_KEY: ConfigRecord({PACKED_KEY: data[:-7]})})
    with pytest.raises(ValueError, match="packed content is malformed"):
        unpack_content(damaged)
