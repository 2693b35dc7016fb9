"""The overhead benchmark's baseline: a plain Flower app training medfed's model.

Flower's Message API and FedAvg, nothing else: no validation, no privacy ledger, no
tracking, no packing, no checkpoint. Each site loads the same prepared data and trains
with the same task code as medfed does, so the difference in a round is the framework.
The same two objects run in Flower's simulation engine and, shipped as a Flower app
(`write_app`), on a SuperLink with SuperNodes. Settings come from the JSON file named by
`SETTINGS_ENV` in both engines (the simulation engine takes no run config); site `k`
(Flower's `partition-id`) trains on `DATA/site-{k+1}`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

__all__ = ["SETTINGS_ENV", "PlainSettings", "client", "server", "write_app"]

SETTINGS_ENV = "MEDFED_PLAIN_FLOWER_SETTINGS"

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plain-flower"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "medfed-bench"

[tool.flwr.app.components]
serverapp = "plain_flower:server"
clientapp = "plain_flower:client"

[tool.flwr.app.config]
"""


@dataclass(frozen=True)
class PlainSettings:
    """What both apps read: the consortium, the medfed config overrides, the output."""

    sites: int
    rounds: int
    data: str
    state: str
    overrides: list[str]
    cpus_per_site: float
    out: str

    def save(self, path: Path) -> None:
        """Write to `path` (JSON)."""
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def from_env(cls) -> PlainSettings:
        """Read the file `SETTINGS_ENV` names."""
        return cls(**json.loads(Path(os.environ[SETTINGS_ENV]).read_text()))


def write_app(folder: Path) -> Path:
    """Write this module as a Flower app (pyproject.toml beside it) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(_PYPROJECT)
    shutil.copy(Path(__file__), folder / "plain_flower.py")
    return folder


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this site's data; report the training's own time."""
    import torch

    from client.site import SiteIdentity, load_site_dataset, torch_threads
    from federation.compose import compose_config
    from federation.models import build_model
    from federation.tasks import get_task

    settings = PlainSettings.from_env()
    cfg = compose_config(settings.overrides)
    name = f"site-{int(context.node_config['partition-id']) + 1}"
    torch.set_num_threads(torch_threads(settings.cpus_per_site))
    task = get_task(cfg.task.name)
    site = SiteIdentity(name, Path(settings.data) / name, Path(settings.state) / name)
    dataset = load_site_dataset(site, task, cfg.task, seed=cfg.seed).data
    model = build_model(cfg.model)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    started_at = time.time()
    started = time.perf_counter()
    outcome = task.train(model, dataset, cfg.task, cfg.privacy, seed=cfg.seed)
    seconds = time.perf_counter() - started
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": outcome.num_examples,
        "train-seconds": seconds,
        "train-started": started_at,
        "train-finished": started_at + seconds,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every site; each round's training phase and sites' timing to `out`."""
    from flwr.serverapp.strategy import FedAvg

    from federation.compose import compose_config
    from federation.models import build_model

    settings = PlainSettings.from_env()
    cfg = compose_config(settings.overrides)
    n = settings.sites
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    arrays = ArrayRecord(build_model(cfg.model, seed=cfg.seed).state_dict())
    records = []
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = list(grid.send_and_receive(messages))
        new, _ = strategy.aggregate_train(server_round, replies)
        phase = time.perf_counter() - started
        if new is None:
            raise RuntimeError(f"round {server_round}: no site's update could be aggregated")
        arrays = new
        sites = [_timing(m) for m in replies]
        span = max(end for _, _, end in sites) - min(start for _, start, _ in sites)
        records.append({"phase": phase, "slowest": max(s for s, _, _ in sites), "span": span})
    Path(settings.out).write_text(json.dumps(records))


def _timing(reply: Message) -> tuple[float, float, float]:
    """A site's training seconds, start and end."""
    metrics = reply.content.metric_records["metrics"]
    keys = ("train-seconds", "train-started", "train-finished")
    seconds, started, finished = (float(metrics[k]) for k in keys)  # type: ignore[arg-type]
    return seconds, started, finished
