import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federation.packing import (
    is_packed,
    pack_arrays,
    pack_content,
    unpack_arrays,
    unpack_content,
)


def _record() -> ArrayRecord:
    return ArrayRecord(
        {
            "conv.weight": Array(torch.randn(4, 2, 3, 3)),
            "norm.bias": Array(np.arange(5, dtype=np.float16)),
            "steps": Array(np.array(7, dtype=np.int64)),
            "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        }
    )


def test_pack_is_one_array_and_unpacks_byte_for_byte_in_order():
    record = _record()
    packed = pack_arrays(record)
    assert is_packed(packed) and not is_packed(record)
    assert len(packed) == 1
    back = unpack_arrays(packed)
    assert list(back.keys()) == list(record.keys())
    for name, array in record.items():
        assert back[name].dtype == array.dtype
        assert back[name].shape == array.shape
        assert back[name].stype == array.stype
        assert back[name].data == array.data
    torch.testing.assert_close(
        back.to_torch_state_dict()["conv.weight"], record.to_torch_state_dict()["conv.weight"]
    )


def test_content_packs_only_array_records_and_round_trips():
    content = RecordDict(
        {
            "arrays": _record(),
            "config": ConfigRecord({"server-round": 3}),
            "metrics": MetricRecord({"loss": 0.5}),
        }
    )
    packed = pack_content(content)
    assert is_packed(packed.array_records["arrays"])
    assert packed.config_records["config"]["server-round"] == 3
    assert pack_content(packed).array_records["arrays"].object_id == (
        packed.array_records["arrays"].object_id
    )  # packing twice changes nothing
    back = unpack_content(packed)
    assert back.array_records["arrays"].object_id == content.array_records["arrays"].object_id
    assert unpack_content(back).array_records["arrays"].object_id == back["arrays"].object_id


@pytest.mark.parametrize(
    ("cut", "reason"), [(-3, "runs past the end"), (None, "bytes left over"), (4, "malformed")]
)
def test_damaged_packs_are_refused_with_the_reason(cut, reason):
    data = pack_arrays(_record())["packed"].data
    if cut is None:
        data = data + b"\0\0"
    else:
        data = data[:cut]
    damaged = ArrayRecord(
        {
            "packed": Array(
                dtype="uint8",
                shape=(len(data),),
                stype=pack_arrays(_record())["packed"].stype,
                data=data,
            )
        }
    )
    with pytest.raises(ValueError, match=reason):
        unpack_arrays(damaged)
