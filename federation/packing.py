"""Packed content: a message's whole content travels as one Flower object.

Flower ships a message as a tree of objects: the message, its RecordDict, one per
record, and per ArrayRecord one per array plus one per chunk. In deployment every
object is a request of its own on each hop (ServerApp -> SuperLink -> SuperNode ->
ClientApp and back), and on the SuperLink every request is a database transaction.
Packing serialises the RecordDict with Flower's own protobuf serde into a single
ConfigRecord entry, so a message is three objects whatever it holds; unpacking restores
the RecordDict exactly. The coordinator packs what it sends and unpacks what it receives
(`server.grids.PackingGrid`); a site does the same with `client.mods.packed_content_mod`,
answering packed only what came packed.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

__all__ = ["PACKED_KEY", "is_packed", "pack_content", "unpack_content"]

PACKED_KEY = "medfed.packed-content/1"  # the single record, and its single entry


def is_packed(content: RecordDict) -> bool:
    """Whether `content` was made by `pack_content`."""
    if list(content.keys()) != [PACKED_KEY]:
        return False
    record = content[PACKED_KEY]
    return isinstance(record, ConfigRecord) and isinstance(record.get(PACKED_KEY), bytes)


def pack_content(content: RecordDict) -> RecordDict:
    """`content` as one ConfigRecord holding its serialised RecordDict (packed stays)."""
    if is_packed(content):
        return content
    data = recorddict_to_proto(content).SerializeToString()
    return RecordDict({PACKED_KEY: ConfigRecord({PACKED_KEY: data})})


def unpack_content(content: RecordDict) -> RecordDict:
    """The RecordDict `pack_content` packed; anything else unchanged.

    Raises:
        ValueError: The packed bytes are not a serialised RecordDict (truncated or altered).
    """
    if not is_packed(content):
        return content
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(content[PACKED_KEY][PACKED_KEY])
        return recorddict_from_proto(proto)
    except (DecodeError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"packed content is malformed: {err}") from err
