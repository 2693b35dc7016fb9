#!/usr/bin/env python3
"""Learning quality and privacy-utility on a generated non-IID multi-vendor consortium.

Arms, all with the same total compute (rounds x local epochs over every training slice)
and scored the same way (Dice per held-out volume at every site, weighted by the site's
held-out slices, the figure the coordinator aggregates each round):

- pooled: one model trained on the union of the sites' training data (what federated
  learning stands in for; no hospital could do this);
- local: each site alone, scored on every site's held-out data; the best one is reported;
- federated: `medfed run` with each strategy, without DP (same compute as pooled);
- privacy-utility: federated FedAvg at each target epsilon (DP-SGD, delta 1e-5) vs no DP.

    python scripts/bench/quality.py                # 4 sites, 10 rounds, 64x64 slices
    python scripts/bench/quality.py --quick        # small and short
The last line is one JSON object with the figures and the ratios the targets ask for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from _runs import final_dice, medfed_run

SITES = ("site-1", "site-2", "site-3", "site-4")
FULL = {"rounds": 10, "patients": [16, 12, 20, 10], "slices": 24, "overrides": []}
QUICK = {
    "rounds": 2,
    "patients": [3, 3, 4, 3],
    "slices": 12,
    "overrides": ["task.image_size=32", "task.local_epochs=1", "task.batch_size=8"],
}


def _config(overrides: list[str]) -> Any:
    from federation.compose import compose_config

    return compose_config([*overrides, "privacy=none", f"federation.num_sites={len(SITES)}"])


def load_sites(root: Path, state: Path, cfg: Any) -> dict[str, Any]:
    """Each site's prepared dataset, split by patient exactly as in a federated run."""
    from client.site import SiteIdentity, load_site_dataset
    from federation.tasks import get_task

    task = get_task(cfg.task.name)
    return {
        name: load_site_dataset(
            SiteIdentity(name, root / name, state / name), task, cfg.task, seed=cfg.seed
        ).data
        for name in SITES
    }


def train_centrally(data: Any, cfg: Any, *, epochs: int) -> Any:
    """A model trained without DP for `epochs` epochs on one dataset."""
    import dataclasses

    from federation.models import build_model
    from federation.tasks import get_task

    model = build_model(cfg.model, seed=cfg.seed)
    task_cfg = dataclasses.replace(cfg.task, local_epochs=epochs)
    get_task(cfg.task.name).train(model, data, task_cfg, cfg.privacy, seed=cfg.seed)
    return model


def score(model: Any, sites: dict[str, Any], cfg: Any) -> float:
    """Held-out Dice over every site, weighted by held-out slices (as the coordinator does)."""
    from federation.tasks import get_task

    task = get_task(cfg.task.name)
    outcomes = [task.evaluate(model, data) for data in sites.values()]
    total = sum(o.num_examples for o in outcomes)
    return sum(o.metrics["dice"] * o.num_examples for o in outcomes) / total


def pooled_dataset(sites: dict[str, Any]) -> Any:
    """The union of the sites' training slices (held-out volumes stay per site)."""
    import dataclasses

    import torch

    first = next(iter(sites.values()))
    return dataclasses.replace(
        first,
        train_images=torch.cat([d.train_images for d in sites.values()]),
        train_masks=torch.cat([d.train_masks for d in sites.values()]),
    )


def federated(work: Path, root: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """One `medfed run` over all sites; its final aggregated held-out Dice."""
    history = medfed_run(
        name, work=work, data=root, overrides=[f"federation.num_sites={len(SITES)}", *overrides]
    )
    last = history["rounds"][-1]
    return {
        "dice": final_dice(history),
        "epsilon": last["train"].get("epsilon"),
        "seconds": history["wall_seconds"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars: pooled, best local, each strategy; and Dice against epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    arms = {"pooled": result["pooled"], "best local": result["best_local"]}
    arms.update({f"fed {k}": v for k, v in result["federated"].items()})
    left.bar(list(arms), list(arms.values()), color="tab:blue")
    left.set_ylabel("held-out Dice, all sites")
    left.set_ylim(0, 1)
    left.tick_params(axis="x", rotation=30)
    eps = sorted(float(k) for k in result["privacy_utility"] if k != "none")
    right.plot(eps, [result["privacy_utility"][_eps_key(e)] for e in eps], marker="o")
    right.axhline(result["privacy_utility"]["none"], color="grey", ls="--", label="no DP")
    right.set_xlabel("target epsilon (delta 1e-5)")
    right.set_ylabel("federated held-out Dice")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "fedbn"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--work", default=None, help="folder for data and runs (default: temp)")
    parser.add_argument("--plot", default="quality.png")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    setting = QUICK if args.quick else FULL
    rounds = int(setting["rounds"])  # type: ignore[call-overload]
    overrides = [*setting["overrides"], f"rounds={rounds}"]  # type: ignore[misc]
    from federation.dicom.synth import generate_consortium

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        root = work / "consortium"
        generate_consortium(
            root,
            site_names=SITES,
            patients_per_site=setting["patients"],  # type: ignore[arg-type]
            slices=int(setting["slices"]),  # type: ignore[call-overload]
            seed=7,
            skip_existing=True,
        )
        cfg = _config(overrides)
        sites = load_sites(root, work / "prepare", cfg)
        epochs = rounds * cfg.task.local_epochs
        print(f"pooled: {epochs} epochs on {sum(d.num_train for d in sites.values())} slices")
        pooled = score(train_centrally(pooled_dataset(sites), cfg, epochs=epochs), sites, cfg)
        local = {
            name: score(train_centrally(data, cfg, epochs=epochs), sites, cfg)
            for name, data in sites.items()
        }
        print(
            f"pooled {pooled:.3f}; local-only "
            + ", ".join(f"{k} {v:.3f}" for k, v in local.items())
        )
        fed = {
            s: federated(work, root, f"q-{s}", [*overrides, f"strategy={s}", "privacy=none"])
            for s in args.strategies
        }
        for s, r in fed.items():
            print(f"federated {s}: {r['dice']:.3f} ({r['seconds']:.0f} s)", flush=True)
        utility = (
            {"none": fed["fedavg"]["dice"]}
            if "fedavg" in fed
            else {"none": federated(work, root, "q-nodp", [*overrides, "privacy=none"])["dice"]}
        )
        for eps in args.epsilons:
            r = federated(
                work, root, f"q-eps{eps:g}", [*overrides, f"privacy.target_epsilon={eps}"]
            )
            utility[_eps_key(eps)] = r["dice"]
            print(f"federated fedavg at epsilon {eps:g}: {r['dice']:.3f}", flush=True)
    best_local = max(local.values())
    best_fed = max(r["dice"] for r in fed.values())
    result = {
        "benchmark": "quality",
        "quick": args.quick,
        "sites": len(SITES),
        "rounds": rounds,
        "pooled": pooled,
        "local": local,
        "best_local": best_local,
        "federated": {s: r["dice"] for s, r in fed.items()},
        "federated_vs_pooled": best_fed / pooled if pooled else None,
        "federated_beats_best_local": best_fed > best_local,
        "privacy_utility": utility,
    }
    top = _eps_key(max(args.epsilons))
    if utility["none"]:
        result[f"dp_eps{top}_vs_no_dp"] = utility[top] / utility["none"]
    plot(result, Path(args.plot))
    print(f"plot: {Path(args.plot).resolve()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
