"""Update encodings: how a site's trained weights travel to the coordinator.

`full` sends the weights as they are. `fp16-delta` sends the change to the received
weights in half precision, halving the bytes; the coordinator adds it back to what it
sent, so aggregation and validation see full-precision weights.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["ENCODINGS", "decode_update", "encode_update", "payload_bytes"]

ENCODINGS = ("full", "fp16-delta")


def _is_float(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def encode_update(trained: ArrayRecord, received: ArrayRecord, *, encoding: str) -> ArrayRecord:
    """What the site sends for `trained`, given the weights it `received`."""
    if encoding == "full":
        return trained
    out = {}
    for key, array in trained.items():
        values = array.numpy()
        if _is_float(values) and key in received:
            delta = values.astype(np.float32) - received[key].numpy().astype(np.float32)
            values = delta.astype(np.float16)
        out[key] = Array(np.ascontiguousarray(values))
    return ArrayRecord(out)


def decode_update(update: ArrayRecord, sent: ArrayRecord, *, encoding: str) -> ArrayRecord:
    """Full-precision weights from a site's encoded update.

    Raises:
        ValueError: The update is not in the expected encoding (the reason names the key).
    """
    if encoding == "full":
        return update
    out = {}
    for key, array in update.items():
        values = array.numpy()
        reference = sent[key].numpy() if key in sent else None
        if reference is not None and _is_float(reference):
            if values.dtype != np.float16 or values.shape != reference.shape:
                raise ValueError(
                    f"{key!r} is not an fp16 delta of shape {list(reference.shape)} "
                    f"({values.dtype}, {list(values.shape)}); federation.update_encoding={encoding}"
                )
            values = (reference.astype(np.float32) + values.astype(np.float32)).astype(
                reference.dtype
            )
        out[key] = Array(np.ascontiguousarray(values))
    return ArrayRecord(out)


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the serialised arrays in a message."""
    return sum(len(array.data) for array in arrays.values())
