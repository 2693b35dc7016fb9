#!/usr/bin/env python3
"""DP-SGD overhead of the shipped segmentation model, per Opacus per-sample-gradient mode.

Each configuration runs in its own process (so peak memory is its own). The headline,
hooks mode over the non-private step, is the median of `--pairs` ratios, each of a
non-private run and a hooks run back to back (one process's step time moves by up to a
fifth from run to run on this machine); the other modes are measured once, against the
non-private runs' median. Prints a table and, on its last line, one JSON object with the
headline figures.

    python scripts/bench/dp_overhead.py            # batch 16, 128x128 slices
    python scripts/bench/dp_overhead.py --quick    # fewer timed steps
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

MODES = ("hooks", "functorch", "ew", "ghost")
# hooks with the U-Net's encoder frozen (model.freeze=[encoder]): no per-sample gradients
# for it, as when a pretrained encoder is fine-tuned
FROZEN = "hooks:encoder"


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(mode: str, *, batch: int, size: int, steps: int, warmup: int) -> dict[str, object]:
    """Time training steps of one configuration and measure its peak memory."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from federation.config import ModelConfig, PrivacyConfig
    from federation.models import build_model
    from federation.privacy import make_private
    from federation.tasks.segmentation import SegmentationLoss

    warnings.simplefilter("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    mode, _, frozen = mode.partition(":")
    model = build_model(ModelConfig(freeze=[frozen] if frozen else []), seed=0).to(device)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
    images = torch.rand(batch * 4, 1, size, size)
    masks = (images > 0.8).float()
    loader = DataLoader(TensorDataset(images, masks), batch_size=batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    privacy = PrivacyConfig(mode="none" if mode == "none" else "dp-sgd", grad_sample_mode=mode)
    private = make_private(model, optimizer, loader, SegmentationLoss(), privacy)
    # Where a step's time goes: the per-sample gradients (Opacus's grad samplers, timed
    # in place) and the optimizer step (clipping, noise and Adam under DP).
    spent = {"per_sample": 0.0, "optimizer": 0.0}
    if mode != "none":
        from opacus.grad_sample import GradSampleModule

        def timed(sampler: Any) -> Any:
            def run(*a: Any, **k: Any) -> Any:
                start = time.perf_counter()
                try:
                    return sampler(*a, **k)
                finally:
                    spent["per_sample"] += time.perf_counter() - start

            return run

        samplers = GradSampleModule.GRAD_SAMPLERS
        for layer, sampler in list(samplers.items()):
            samplers[layer] = timed(sampler)
    # Fixed full batches: the step cost, not Poisson's varying batch size, is measured.
    x, y = images[:batch].to(device), masks[:batch].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mb = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb()
    times, parts = [], []
    for i in range(warmup + steps):
        spent.update(per_sample=0.0, optimizer=0.0)
        start = time.perf_counter()
        private.optimizer.zero_grad(set_to_none=True)
        private.forward_backward(x, y)  # as `private_train` steps
        stepped = time.perf_counter()
        private.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent["optimizer"] = time.perf_counter() - stepped
        if i >= warmup:
            times.append(time.perf_counter() - start)
            parts.append(dict(spent))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_mb
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb
    return {
        "mode": mode,
        "step_s": statistics.median(times),
        "peak_mb": peak,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "trainable_share": trainable,
        "per_sample_s": statistics.median(p["per_sample"] for p in parts),
        "optimizer_s": statistics.median(p["optimizer"] for p in parts),
    }


def _run_worker(mode: str, args: argparse.Namespace) -> dict[str, object]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"mode": mode, "error": reason[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median step time of `runs` (an error when none of them ran)."""
    ran = sorted((r for r in runs if "error" not in r), key=lambda r: float(r["step_s"]))
    return ran[(len(ran) - 1) // 2] if ran else runs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 30, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--pairs", type=int, default=0, help="non-private and hooks runs (default 3, quick 1)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.quick else 30)
    args.pairs = args.pairs or (1 if args.quick else 3)
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker,
                    batch=args.batch,
                    size=args.size,
                    steps=args.steps,
                    warmup=args.warmup,
                )
            )
        )
        return 0

    print(f"DP overhead: batch {args.batch}, {args.size}x{args.size}, {args.steps} timed steps")
    pairs = [(_run_worker("none", args), _run_worker("hooks", args)) for _ in range(args.pairs)]
    bases = [base for base, _ in pairs]
    failed = [r["error"] for r in bases if "error" in r]
    if failed:
        print(f"baseline failed: {failed[0]}", file=sys.stderr)
        return 1
    pair_ratios = [float(h["step_s"]) / float(b["step_s"]) for b, h in pairs if "error" not in h]
    results = {"hooks": _median_run([h for _, h in pairs])}
    results.update({mode: _run_worker(mode, args) for mode in MODES if mode != "hooks"})
    frozen = _run_worker(FROZEN, args)
    base = _median_run(bases)
    base_t, base_m = float(base["step_s"]), float(base["peak_mb"])
    print(f"{'mode':10} {'step s':>8} {'time x':>7} {'peak MB':>8} {'mem x':>6}")
    print(f"{'none':10} {base_t:8.3f} {1:7.2f} {base_m:8.0f} {1:6.2f}")
    summary: dict[str, object] = {}
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:10} unsupported: {r['error']}")
            summary[mode] = {"ok": False, "error": r["error"]}
            continue
        t, m = float(r["step_s"]), float(r["peak_mb"])
        ratio = statistics.median(pair_ratios) if mode == "hooks" else t / base_t
        summary[mode] = {
            "ok": True,
            "step_s": round(t, 4),
            "time_ratio": round(ratio, 3),
            "peak_mb": round(m, 1),
            "mem_ratio": round(m / base_m, 3),
        }
        print(f"{mode:10} {t:8.3f} {ratio:7.2f} {m:8.0f} {m / base_m:6.2f}")
    if len(pair_ratios) > 1:
        print("hooks over non-private, run by run: " + ", ".join(f"{r:.2f}" for r in pair_ratios))
    frozen_summary = None
    if "error" not in frozen and summary["hooks"].get("ok"):  # type: ignore[union-attr]
        t = float(frozen["step_s"])
        frozen_summary = {
            "step_s": round(t, 4),
            "time_ratio": round(t / base_t, 3),
            "vs_hooks": round(t / float(results["hooks"]["step_s"]), 3),
            "trainable_share": round(float(frozen["trainable_share"]), 3),
        }
        print(
            f"hooks, encoder frozen ({frozen_summary['trainable_share']:.0%} of the weights "
            f"train): {t:.3f} s/step, x{frozen_summary['vs_hooks']:.2f} of hooks"
        )
    where = None
    if summary["hooks"].get("ok"):  # type: ignore[union-attr]
        hooks = results["hooks"]
        # The hooks step over the non-private one, part by part (s per step).
        where = {
            "non_private_step": round(base_t, 4),
            "non_private_optimizer": round(float(base["optimizer_s"]), 4),
            "per_sample_gradients": round(float(hooks["per_sample_s"]), 4),
            "dp_optimizer": round(float(hooks["optimizer_s"]), 4),
            "forward_backward_rest": round(
                float(hooks["step_s"]) - float(hooks["per_sample_s"]) - float(hooks["optimizer_s"]),
                4,
            ),
        }
        print(
            "hooks step: per-sample gradients {per_sample_gradients:.3f} s, DP optimizer "
            "(clip, noise, Adam) {dp_optimizer:.3f} s, the rest of forward and backward "
            "{forward_backward_rest:.3f} s; non-private step {non_private_step:.3f} s "
            "(optimizer {non_private_optimizer:.3f} s)".format(**where)
        )
    ok = {k: v for k, v in summary.items() if isinstance(v, dict) and v["ok"]}
    fastest = min(ok, key=lambda k: ok[k]["time_ratio"]) if ok else None
    print(
        json.dumps(
            {
                "benchmark": "dp_overhead",
                "device": base["device"],
                "batch": args.batch,
                "size": args.size,
                "baseline_step_s": round(base_t, 4),
                "baseline_peak_mb": round(base_m, 1),
                "fastest_mode": fastest,
                "time_ratio": ok[fastest]["time_ratio"] if fastest else None,
                "mem_ratio": ok[fastest]["mem_ratio"] if fastest else None,
                "modes": summary,
                "hooks_pair_ratios": [round(r, 3) for r in pair_ratios],
                "frozen_encoder": frozen_summary,
                "hooks_step_parts_s": where,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
