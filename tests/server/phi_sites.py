"""A consortium whose sites record every reply they send; run as a script by the tests.

Each reply's config and metric records (and the names of its array records) are
appended as one JSON line to `<record dir>/sent.jsonl`.

    python -m tests.server.phi_sites RECORD_DIR [hydra overrides...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from tests.server._sites import simulate_with_mod


def make_recorder(path: Path):
    def record_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        content = reply.content
        line = {
            "type": msg.metadata.message_type,
            "configs": {k: dict(v) for k, v in content.config_records.items()},
            "metrics": {k: dict(v) for k, v in content.metric_records.items()},
            "arrays": {k: list(v.keys()) for k, v in content.array_records.items()},
        }
        with path.open("a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
        return reply

    return record_mod


def main(argv: list[str]) -> int:
    return simulate_with_mod(
        argv, lambda record, _: make_recorder(record / "sent.jsonl"), every_message=True
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
