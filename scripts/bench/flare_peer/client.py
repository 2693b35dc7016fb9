"""NVFlare Client API script: medfed's task loop on a site's exported tensors.

Runs inside NVFlare (in the NVFlare venv, medfed's checkout on PYTHONPATH). Each site
loads `WORKLOAD/SITE.pt` (its prepared training tensors, exported from medfed's own
data pipeline) and trains with `federation.tasks`' `train`, as medfed's ClientApp and the
plain Flower app do; the training's own wall-clock span goes to `WORKLOAD/timing/`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nvflare.client as flare
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    workload = Path(parser.parse_args().workload)
    from federation.models import build_model
    from federation.tasks import get_task

    spec = torch.load(workload / "spec.pt", weights_only=False)
    torch.set_num_threads(spec["threads"])
    flare.init()
    site = flare.get_site_name()
    data = torch.load(workload / f"{site}.pt", weights_only=False)
    task = get_task(spec["task"].name)
    model = build_model(spec["model"])
    timing = workload / "timing" / f"{site}.jsonl"
    timing.parent.mkdir(exist_ok=True)
    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        model.load_state_dict({k: torch.as_tensor(v) for k, v in incoming.params.items()})
        started_at = time.time()
        started = time.perf_counter()
        outcome = task.train(model, data, spec["task"], spec["privacy"], seed=spec["seed"])
        seconds = time.perf_counter() - started
        record = {
            "round": incoming.current_round,
            "seconds": seconds,
            "started": started_at,
            "finished": started_at + seconds,
        }
        with timing.open("a") as out:
            out.write(json.dumps(record) + "\n")
        flare.send(
            flare.FLModel(
                params=model.state_dict(),
                metrics={"train_seconds": seconds},
                meta={"NUM_STEPS_CURRENT_ROUND": outcome.num_examples},
            )
        )


if __name__ == "__main__":
    main()
