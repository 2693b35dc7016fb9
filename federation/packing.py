"""Packed arrays: a whole ArrayRecord travels as one Flower object.

Flower ships a message as a tree of objects, one per array plus one per chunk, and in
deployment every object is a request of its own on each hop (ServerApp -> SuperLink ->
SuperNode -> ClientApp and back). A U-Net's ~60 tensors become ~120 requests per hop,
seconds per message on a busy machine. Packing puts an ArrayRecord's arrays, byte for
byte with their dtype, shape and serialisation, into one `Array`; unpacking restores the
record exactly. The coordinator packs what it sends and unpacks what it receives
(`server.grids.PackingGrid`); a site does the same with `client.mods.packed_arrays_mod`,
answering packed only what came packed.
"""

from __future__ import annotations

import json
import struct

from flwr.app import Array, ArrayRecord, RecordDict

__all__ = [
    "PACKED_STYPE",
    "is_packed",
    "pack_arrays",
    "pack_content",
    "unpack_arrays",
    "unpack_content",
]

PACKED_STYPE = "medfed.packed-arrays/1"
_KEY = "packed"  # the single entry of a packed ArrayRecord
_HEAD = struct.Struct("<Q")  # length of the JSON layout that precedes the bytes


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """One `Array` holding every array of `record` (layout, then the arrays' bytes)."""
    layout = [[name, a.dtype, list(a.shape), a.stype, len(a.data)] for name, a in record.items()]
    head = json.dumps(layout).encode()
    data = b"".join([_HEAD.pack(len(head)), head, *(a.data for a in record.values())])
    packed = Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)
    return ArrayRecord({_KEY: packed})


def is_packed(record: ArrayRecord) -> bool:
    """Whether `record` was made by `pack_arrays`."""
    return list(record.keys()) == [_KEY] and record[_KEY].stype == PACKED_STYPE


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord `pack_arrays` packed, in its order.

    Raises:
        ValueError: The packed bytes do not match their layout (truncated or altered).
    """
    data = memoryview(record[_KEY].data)
    try:
        (size,) = _HEAD.unpack_from(data)
        offset = _HEAD.size + size
        if offset > len(data):
            raise ValueError("the layout runs past the end of the packed bytes")
        layout = json.loads(bytes(data[_HEAD.size : offset]))
        arrays: dict[str, Array] = {}
        for name, dtype, shape, stype, nbytes in layout:
            end = offset + int(nbytes)
            if end > len(data):
                raise ValueError(f"array {name!r} runs past the end of the packed bytes")
            arrays[str(name)] = Array(
                dtype=str(dtype), shape=tuple(shape), stype=str(stype), data=bytes(data[offset:end])
            )
            offset = end
    except (struct.error, ValueError, TypeError) as err:
        raise ValueError(f"packed arrays are malformed: {err}") from err
    if offset != len(data):
        raise ValueError(f"packed arrays are malformed: {len(data) - offset} bytes left over")
    return ArrayRecord(arrays)


def _map_arrays(content: RecordDict, *, packing: bool) -> RecordDict:
    out = RecordDict()
    for name, value in content.items():
        if isinstance(value, ArrayRecord) and is_packed(value) != packing:
            value = pack_arrays(value) if packing else unpack_arrays(value)
        out[name] = value
    return out


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with each of its ArrayRecords packed."""
    return _map_arrays(content, packing=True)


def unpack_content(content: RecordDict) -> RecordDict:
    """`content` with each packed ArrayRecord unpacked."""
    return _map_arrays(content, packing=False)
