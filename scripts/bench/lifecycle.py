#!/usr/bin/env python3
"""A model's life cycle on a consortium with one clearly shifted site: per-site Dice.

The demo's three sites, with site-3 moved to another vendor's calibration, a darker and
compressed intensity scale and twice the noise. Every arm trains with the same DP-SGD
settings in its own `medfed run` with fresh site budgets:

- local-only: each site alone (a one-site run on its own data);
- FedAvg: the global model at each site, then personalised (each site fine-tunes the
  final global model, `strategy.personalise.local_epochs`) in the same run;
- FedBN: with cross-site validation (every site allows sharing), whose matrix is plotted;
- pretrained: FedAvg started (`model.init`) from a model trained on another, unshifted
  consortium (a stand-in for a public model; nothing is downloaded);
- rounds to reach 0.9 of the final Dice, from scratch vs from the pretrained model.

    python scripts/bench/lifecycle.py            # the demo's settings, 10 rounds
    python scripts/bench/lifecycle.py --quick    # 2 rounds on small images
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _runs import medfed_run

SITES = ["site-1", "site-2", "site-3"]
SHIFTED = "site-3"
QUICK = ["task.image_size=32", "task.local_epochs=1", "task.batch_size=8"]


def write_consortium(
    root: Path, *, patients: list[int], slices: int, seed: int, shift: bool
) -> None:
    """The demo's sites; with `shift`, site-3 acquires very differently."""
    from federation.dicom.synth import site_profiles, write_site

    for profile in site_profiles(SITES, patients, seed=seed):
        if shift and profile.name == SHIFTED:
            profile = dataclasses.replace(
                profile,
                manufacturer="Canon Medical Systems",
                model_name="Aquilion ONE",
                rescale_intercept=-1000.0,
                hu_scale=0.7,
                hu_offset=-90.0,
                noise_hu=2 * profile.noise_hu + 20.0,
            )
        write_site(profile, root / profile.name, slices=slices, seed=seed)


def per_site(history: dict[str, Any], key: str = "dice", round_index: int = -1) -> dict[str, float]:
    """Each site's held-out metric in a round of a run's history."""
    record = history["rounds"][round_index]["site_evaluate"]
    return {site: float(m[key]) for site, m in record.items() if key in m}


def rounds_to(history: dict[str, Any], share: float = 0.9) -> int | None:
    """The first round whose aggregated Dice reaches `share` of the final round's."""
    dice = [r["evaluate"].get("dice", float("nan")) for r in history["rounds"]]
    target = share * dice[-1]
    return next((r for r, d in enumerate(dice) if d >= target), None)


def allow_sharing(state: Path) -> None:
    """Each site of a run lets its model go to the others (cross-site validation)."""
    for site in SITES:
        subprocess.run(
            [
                sys.executable, "-m", "medfed.cli", "site", "policy", "--state",
                str(state / site), "--max-epsilon", "10", "--allow-model-sharing",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds on small images")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--plot", default="cross_site.png", help="where the matrix plot goes")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: temp)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    size = (
        {"patients": [3, 3, 4], "slices": 12}
        if args.quick
        else {"patients": [16, 12, 20], "slices": 24}
    )
    common = [f"rounds={rounds}", *(QUICK if args.quick else [])]
    personalise = "strategy.personalise.local_epochs=" + ("1" if args.quick else "2")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        data, public = work / "shifted", work / "public"
        if not data.exists():
            write_consortium(data, **size, seed=0, shift=True)
            write_consortium(public, **size, seed=11, shift=False)

        def run(name: str, *extra: str, root: Path = data) -> dict[str, Any]:
            history = medfed_run(name, work=work, data=root, overrides=[*common, *extra])
            print(f"{name}: {history['wall_seconds']:.0f} s", flush=True)
            return history

        local = {}
        for site in SITES:
            alone = [
                "federation.num_sites=1",
                f"federation.site_names=[{site}]",
                "federation.min_sites=1",
            ]
            local[site] = per_site(run(f"local-{site}", *alone))[site]
        fedavg = run("fedavg", personalise)
        allow_sharing(work / "site-state" / "fedbn")
        fedbn = run("fedbn", "strategy=fedbn")
        run("pretrain", root=public)
        package = work / "outputs" / "pretrain" / "model.medfed.pt"
        pretrained = run("pretrained", f"model.init={package}")
        matrix = json.loads((work / "outputs" / "fedbn" / "cross_site.json").read_text())
        shutil.copy(work / "outputs" / "fedbn" / "cross_site.png", args.plot)

    arms = {
        "local-only": local,
        "fedavg": per_site(fedavg),
        "fedbn": per_site(fedbn),
        "personalised": {s: m["personal-dice"] for s, m in fedavg["personalised"].items()},
        "pretrained": per_site(pretrained),
    }
    print(f"{'arm':14s}" + "".join(f"{s:>10s}" for s in SITES) + "   (site-3 shifted)")
    for arm, scores in arms.items():
        print(f"{arm:14s}" + "".join(f"{scores.get(s, float('nan')):10.3f}" for s in SITES))
    speed = {"scratch": rounds_to(fedavg), "pretrained": rounds_to(pretrained)}
    print(
        "rounds to 0.9 of the final Dice: from scratch "
        f"{speed['scratch']}, pretrained {speed['pretrained']}"
    )
    print(f"cross-site matrix: {Path(args.plot).resolve()}")
    print(
        json.dumps(
            {
                "benchmark": "lifecycle",
                "rounds": rounds,
                "quick": args.quick,
                "shifted_site": SHIFTED,
                "per_site_dice": arms,
                "pretrained_round0_dice": per_site(pretrained, round_index=0),
                "rounds_to_90pct": speed,
                "cross_site": {"scores": matrix["scores"], "refused": matrix["refused"]},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
