import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation.compression import decode_update, encode_update, payload_bytes


def _record(**arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_fp16_delta_halves_the_bytes_and_decodes_to_the_weights():
    rng = np.random.default_rng(0)
    sent = _record(w=rng.normal(size=(64, 32)).astype(np.float32), steps=np.array([3]))
    trained_w = sent["w"].numpy() + rng.normal(scale=1e-2, size=(64, 32)).astype(np.float32)
    trained = _record(w=trained_w, steps=np.array([5]))

    encoded = encode_update(trained, sent, encoding="fp16-delta")
    assert encoded["w"].dtype == "float16"
    # Arrays travel as .npy bytes: the header stays, the data halves; int buffers as they are.
    assert len(encoded["w"].data) < 0.52 * len(trained["w"].data)
    assert len(encoded["steps"].data) == len(trained["steps"].data)
    assert payload_bytes(encoded) == len(encoded["w"].data) + len(encoded["steps"].data)
    decoded = decode_update(encoded, sent, encoding="fp16-delta")
    assert decoded["w"].dtype == "float32"
    np.testing.assert_allclose(decoded["w"].numpy(), trained_w, atol=1e-5)
    assert decoded["steps"].numpy().tolist() == [5]
    assert encode_update(trained, sent, encoding="full") is trained


def test_an_update_not_in_the_agreed_encoding_is_named():
    sent = _record(w=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="'w' is not an fp16 delta"):
        decode_update(_record(w=np.ones((2, 2), np.float32)), sent, encoding="fp16-delta")
    with pytest.raises(ValueError, match="shape"):
        decode_update(_record(w=np.ones((3,), np.float16)), sent, encoding="fp16-delta")
