"""A SecAgg+ consortium that records both sides of the protocol; run as a script by tests.

Each site records, per round, the global weights it received and the update it released
(before SecAgg+ masks it) as `<record dir>/<site>-r<round>.pt`; a `drop-N` site raises in
round 1 after the key-sharing stages, i.e. it drops out mid-protocol. The coordinator's
grid records every training reply it received as `<record dir>/server-<n>.pt`.

    python -m tests.server.secagg_sites RECORD_DIR [hydra overrides...]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from federation import keys
from server.grids import MeteredGrid
from tests.server._sites import simulate_with_mod


def make_mod(record_dir: Path, sites: list[str]):
    def record_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        config = msg.content.config_records[keys.CONFIG]
        server_round = int(config[keys.SERVER_ROUND])
        if site.startswith("drop-") and server_round == 1:
            raise RuntimeError(f"{site} lost its network connection")
        received = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
        reply = call_next(msg, context)
        arrays = reply.content.array_records.get(keys.ARRAYS)
        if arrays is not None:
            torch.save(
                {
                    "node": context.node_id,
                    "received": received,
                    "released": arrays.to_torch_state_dict(),
                    "weight": reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES],
                },
                record_dir / f"{site}-r{server_round}.pt",
            )
        return reply

    return record_mod


class RecordingGrid(MeteredGrid):
    """Keeps what the coordinator receives in the training stages."""

    def __init__(self, grid: Grid, record_dir: Path) -> None:
        super().__init__(grid)
        self.record_dir = record_dir
        self.count = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
                continue
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            masked = configs.get(Key.MASKED_PARAMETERS)
            torch.save(
                {
                    "node": reply.metadata.src_node_id,
                    "round": int(reply.metadata.group_id),
                    "masked": None if masked is None else [bytes_to_ndarray(b) for b in masked],
                    "arrays": {
                        name: [a.numpy() for a in record.values()]
                        for name, record in reply.content.array_records.items()
                    },
                },
                self.record_dir / f"server-{self.count}.pt",
            )
            self.count += 1
        return replies


def main(argv: list[str]) -> int:
    return simulate_with_mod(
        argv, lambda record, cfg: make_mod(record, cfg.federation.names()), wrap_grid=RecordingGrid
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
