"""A consortium in which some sites send malformed updates; run as a script by the tests.

Sites named `<kind>-N` corrupt their reply in that way, `crash-N` sites raise and
`slow-N` sites answer after the round's timeout; `good-N` sites record their update
(as `<record dir>/<site>.pt`) so the test can recompute the honest aggregate.

    python -m tests.server.faulty_sites RECORD_DIR [hydra overrides...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from federation import keys
from tests.server._sites import simulate_with_mod


def _map(record: ArrayRecord, fn: Callable[[str, np.ndarray], np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(fn(k, v.numpy())) for k, v in record.items()})


def _first(record: ArrayRecord) -> str:
    return next(iter(record.keys()))


CORRUPT: dict[str, Callable[[ArrayRecord], ArrayRecord]] = {
    "keys": lambda r: ArrayRecord(
        {("renamed." + k if k == _first(r) else k): v for k, v in r.items()}
    ),
    "shape": lambda r: _map(r, lambda k, v: v[..., :1] if k == _first(r) else v),
    "dtype": lambda r: _map(r, lambda k, v: v.astype(np.float64) if k == _first(r) else v),
    "nan": lambda r: _map(r, lambda k, v: np.full_like(v, np.nan) if k == _first(r) else v),
    "inf": lambda r: _map(r, lambda k, v: np.full_like(v, np.inf) if k == _first(r) else v),
    "norm": lambda r: _map(r, lambda k, v: v * 1000.0 if v.dtype.kind == "f" else v),
}


SLOW_SECONDS = 40.0


def make_mod(record_dir: Path, sites: list[str]):
    def corrupt_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        if site.startswith("crash-"):
            raise RuntimeError(f"{site} lost its GPU")
        if site.startswith("slow-"):
            time.sleep(SLOW_SECONDS)
        reply = call_next(msg, context)
        site = str(reply.content.config_records[keys.STATUS][keys.SITE])
        kind = site.split("-")[0]
        arrays = reply.content.array_records.get(keys.ARRAYS)
        if arrays is None:
            return reply
        if kind in CORRUPT:
            reply.content[keys.ARRAYS] = CORRUPT[kind](arrays)
        elif kind == "good":
            weight = reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES]
            torch.save(
                {"weight": weight, "state": arrays.to_torch_state_dict()}, record_dir / f"{site}.pt"
            )
        return reply

    return corrupt_mod


def main(argv: list[str]) -> int:
    return simulate_with_mod(argv, lambda record, cfg: make_mod(record, cfg.federation.names()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
