#!/usr/bin/env python3
"""Run medfed's benchmark suite and regenerate docs/benchmarks.md.

Each benchmark is a script in this folder that prints its figures as one JSON object on
its last line and may write a plot. The suite runs them one after the other (never in
parallel: they time things), writes every result to one JSON file, copies the plots
next to it and renders the tables, plots and the machine they were measured on.

    python scripts/bench/suite.py                  # full mode (tens of minutes on 2 cores)
    python scripts/bench/suite.py --quick          # smoke run, small and short
    python scripts/bench/suite.py --only quality scale --docs /tmp/docs

`--only` reruns the named benchmarks and keeps the other results of an earlier run in the
same mode.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_dp_overhead(r: dict[str, Any]) -> str:
    rows = [
        [m, v.get("time_ratio"), v.get("mem_ratio"), "yes" if v["ok"] else v.get("error", "")]
        for m, v in r["modes"].items()
    ]
    text = _table(["mode", "time vs non-private", "memory vs non-private", "ok"], rows)
    pairs = r.get("hooks_pair_ratios") or []
    if len(pairs) > 1:
        text += (
            "\n\nhooks over non-private in each of the pairs run back to back: "
            + ", ".join(_fmt(x) for x in pairs)
            + " (the table gives their median)."
        )
    frozen = r.get("frozen_encoder")
    if frozen:
        text += (
            f"\n\nhooks with the encoder frozen (`model.freeze=[encoder]`, "
            f"{frozen['trainable_share']:.0%} of the weights train): step time "
            f"x{_fmt(frozen['vs_hooks'])} of hooks, x{_fmt(frozen['time_ratio'])} of "
            "non-private."
        )
    parts = r.get("hooks_step_parts_s")
    if parts:
        text += (
            f"\n\nWhere the hooks step goes (s per step): per-sample gradients "
            f"{_fmt(parts['per_sample_gradients'])}, DP optimizer step (clipping, noise, Adam) "
            f"{_fmt(parts['dp_optimizer'])}, the rest of forward and backward "
            f"{_fmt(parts['forward_backward_rest'])}; the non-private step takes "
            f"{_fmt(parts['non_private_step'])} (its optimizer "
            f"{_fmt(parts['non_private_optimizer'])})."
        )
    return text


def render_strategies(r: dict[str, Any]) -> str:
    rows = [[s, r["final_dice"][s], r["best_dice"][s]] for s in r["final_dice"]]
    return f"{r['rounds']} rounds, DP-SGD (sigma 1.3).\n\n" + _table(
        ["strategy", "final Dice", "best Dice"], rows
    )


def render_quality(r: dict[str, Any]) -> str:
    rows = [["pooled (centralised)", r["pooled"]], ["best local-only", r["best_local"]]]
    rows += [[f"federated {s} (no DP)", v] for s, v in r["federated"].items()]
    utility = [[k, v] for k, v in r["privacy_utility"].items()]
    ratio = next((v for k, v in r.items() if k.startswith("dp_eps")), None)
    return (
        f"{r['sites']} sites, {r['rounds']} rounds; Dice on every site's held-out data.\n\n"
        + _table(["arm", "held-out Dice"], rows)
        + f"\n\nBest federated / pooled: {_fmt(r['federated_vs_pooled'])} (target >= 0.95); "
        f"better than the best local-only model: {r['federated_beats_best_local']}.\n\n"
        + _table(["target epsilon", "federated FedAvg Dice"], utility)
        + f"\n\nDP at the largest epsilon / no DP: {_fmt(ratio)} (target >= 0.9 at epsilon 8)."
    )


def render_scale(r: dict[str, Any]) -> str:
    rows = [
        [
            row["sites"],
            row["seconds_per_round"],
            row["seconds_per_round"] / row["sites"],
            row["peak_rss_mb"],
        ]
        for row in r["rows"]
    ]
    return _table(["sites", "s / round", "s / site-round", "peak memory (MiB)"], rows)


def render_communication(r: dict[str, Any]) -> str:
    rows = [
        [k, v["bytes_per_site_round"] / 1024, v["vs_float32_model"], v["final_dice"]]
        for k, v in r["encodings"].items()
    ]
    return (
        f"Model: {r['model_float32_bytes'] / 1024:.1f} KiB as float32; {r['rounds']} rounds.\n\n"
        + _table(["encoding", "KiB / site / round", "vs float32 model", "final Dice"], rows)
        + f"\n\nfp16 / full Dice: {_fmt(r['fp16_dice_ratio'])}."
    )


_APPS = (
    ("medfed", "medfed"),
    ("plain_flower", "plain Flower"),
    ("nvflare", "NVFlare (default)"),
    ("nvflare_tuned", "NVFlare (0.1 s polls)"),
)


def render_overhead(r: dict[str, Any]) -> str:
    rows = [
        [row["engine"], row["sites"], row["local_epochs"], label]
        + (
            ["failed", "-", "-", "-", "-", "-"]
            if "failed" in v
            else [
                v["phase_seconds"],
                v["slowest_site_seconds"],
                v["overhead_seconds"],
                v["overhead_share"],
                v["idle_share"],
                v.get("round_overhead_share", "-"),
            ]
        )
        for row in r["rows"]
        for key, label in _APPS
        if (v := row.get(key))
    ]
    failed = [
        f"{row['engine']}/{row['sites']} {label}: {v['failed']}"
        for row in r["rows"]
        for key, label in _APPS
        if "failed" in (v := row.get(key) or {})
    ]
    verdict = (
        f"\n\nmedfed's overhead and training phase at most NVFlare's best (default or 0.1 s "
        f"polls) in every row: {r.get('medfed_at_most_nvflare')}; medfed's share at most plain "
        f"Flower's in every row: {r['medfed_at_most_plain']}."
        + "".join(f"\n\nFailed: {line}" for line in failed)
    )
    return (
        f"Rounds after the first of {r['rounds']}; the same prepared tensors, model and "
        "training loop in every app. All sites train at once, each on its share of the "
        "cores. Deployment: medfed through its own commands (SuperLink behind its Fleet "
        "gate, one SuperNode per site, TLS on loopback); plain Flower on stock "
        "`flower-superlink`/`flower-supernode` with the same TLS certificate (a new "
        "ClientApp process per message; medfed runs a run's messages at a site in one "
        "warm process; plain Flower is not run at 30 sites, where a round would take "
        "minutes); NVFlare's PyTorch FedAvg recipe with a Client API "
        "script in its POC mode (mutual TLS), in its own venv. Simulation: Flower's "
        "simulation engine; NVFlare's simulator. NVFlare (0.1 s polls): its client task "
        "fetch interval and server task check period at 0.1 s instead of 0.5 s. Overhead: "
        "training phase minus the slowest site's training. No site training: share of the "
        "phase outside the span from the first site's start to the last site's end. Whole "
        "round: medfed's training, federated evaluation, tracking and checkpoint.\n\n"
        + _table(
            [
                "engine",
                "sites",
                "local epochs",
                "app",
                "training phase (s)",
                "slowest site (s)",
                "overhead (s)",
                "overhead share",
                "no site training",
                "whole-round share",
            ],
            rows,
        )
        + verdict
        + _where(r)
    )


def _where(r: dict[str, Any]) -> str:
    """Where medfed's deployment rounds spend their time (`overhead.where_time_goes`)."""
    found = [row for row in r["rows"] if "where" in row["medfed"]]
    if not found:
        return ""
    roles = sorted(
        {k for row in found for k in row["medfed"]["where"]["cpu_seconds_per_round"]},
        key=lambda k: (
            -max(row["medfed"]["where"]["cpu_seconds_per_round"].get(k, 0) for row in found)
        ),
    )
    cpu_rows = [
        [
            f"{row['sites']} sites, {row['local_epochs']} epochs",
            row["medfed"]["where"]["round_seconds"],
        ]
        + [row["medfed"]["where"]["cpu_seconds_per_round"].get(k, 0.0) for k in roles]
        for row in found
    ]
    site_rows = [
        [
            f"{row['sites']} sites, {row['local_epochs']} epochs",
            w["processes_per_site"],
            w["site_pss_mb"],
            w["coordinator_pss_mb"],
            w["fleet_requests_per_round"],
            w.get("fleet_connections_per_round", float("nan")),
            w["superlink_cpu_ms_per_fleet_request"],
            w.get("profiler_cpu_per_second", float("nan")),
            ", ".join(
                f"{path} {v['per_round']:.0f} ({v['mean_ms']:.0f} ms)"
                for path, v in w["fleet_requests"].items()
            ),
        ]
        for row in found
        if (w := row["medfed"]["where"])
    ]
    return (
        "\n\n### Where medfed's deployment time goes\n\nCPU seconds per round by process "
        "role, from round 2's training start to the last round's (training, evaluation and "
        "tracking). clientapp: each site's ClientApp process of the run (training and "
        "evaluation included); forkserver: each site's fork server, with the CPU of the "
        "processes it forked that ended.\n\n"
        + _table(["run", "round (s)", *roles], cpu_rows)
        + "\n\nProcesses per site (most at once: agent, SuperNode with its SuperExec thread, fork "
        "server and the run's ClientApp) and their memory (PSS), the coordinator's memory, "
        "and the sites' Fleet requests per round through the gate, with their mean time "
        "(the SuperLink's queue included), and the TLS connections the sites opened to it. "
        "SuperLink CPU per request: its CPU per round over the Fleet requests (the "
        "ServerApp's own requests are answered too). Profiler CPU: what sampling these "
        "processes cost (CPU-s per s, of the 2 cores; NVFlare's runs are not profiled).\n\n"
        + _table(
            [
                "run",
                "processes / site",
                "site PSS (MB)",
                "coordinator PSS (MB)",
                "Fleet requests / round",
                "TLS connections / round",
                "SuperLink CPU ms / request",
                "profiler CPU (s/s)",
                "requests / round (mean time)",
            ],
            site_rows,
        )
    )


def render_prepare_speed(r: dict[str, Any]) -> str:
    rows = [[k, v, 1e3 * v / r["files"]] for k, v in r["seconds"].items()]
    return (
        f"{r['files']} files ({r['series']} series, {r['rows']}x{r['rows']}).\n\n"
        + _table(["path", "seconds", "ms / file"], rows)
        + f"\n\nnaive / cold {_fmt(r['naive_over_cold'])}, MONAI / cold "
        f"{_fmt(r['monai_over_cold'])}, cold / bytes {_fmt(r['cold_over_bytes'])} "
        f"(from the disk: {_fmt(r.get('cold_over_bytes_disk'))}), "
        f"cold / warm {_fmt(r['cold_over_warm'])}; peak MB by series {r['peak_mb']}."
    )


def render_deid(r: dict[str, Any]) -> str:
    rows = [
        ["plain pydicom read", r["read_files_per_s"]],
        ["pydicom read and write, unchanged", r["copy_files_per_s"]],
        [f"medfed site deidentify ({r['profile']})", r["deid_files_per_s"]],
    ]
    return (
        f"{r['files']} files of an identified archive (CT series and their SEG).\n\n"
        + _table(["path", "files / s"], rows)
        + f"\n\nDe-identify / read time {_fmt(r['deid_vs_read_time'])}, de-identify / copy "
        f"time {_fmt(r['deid_vs_copy_time'])}; peak MB by files {r['peak_mb']} "
        f"(x{_fmt(r['memory_growth_4x'])} for 4x the files)."
    )


def render_deploy_rounds(r: dict[str, Any]) -> str:
    arms = (
        ("simulation", "simulation"),
        ("deployment over TLS, warm ClientApps (default)", "deployment_warm"),
        ("deployment over TLS, a new Python per message", "deployment_cold"),
    )
    rows = [[label, r[key]["round_s"], r[key]["overhead_share"]] for label, key in arms]
    return (
        f"{r['sites']} sites, {r['rounds']} rounds, DP-SGD on small images; medians of rounds "
        f"1 onwards (load average {r['load_avg_1min']} on {r['cpus']} cores).\n\n"
        + _table(["engine", "s / round", "overhead share"], rows)
        + f"\n\nWarm / cold ClientApps, round time: {_fmt(r['warm_over_cold_round'])}."
    )


def render_secagg(r: dict[str, Any]) -> str:
    rows = [
        [
            mode,
            r[mode]["train_seconds_per_round"],
            r[mode]["bytes_to_sites_per_round"] / 1024,
            r[mode]["bytes_from_sites_per_round"] / 1024,
        ]
        for mode in ("plain", "secaggplus")
    ]
    return (
        f"{r['sites']} sites, {r['rounds']} rounds, {r['image_size']} px; the training step "
        "of each round, all SecAgg+ stages included.\n\n"
        + _table(["aggregation", "train s / round", "KiB to sites", "KiB from sites"], rows)
        + f"\n\nSecAgg+ / plain: time {_fmt(r['time_ratio'])}, bytes {_fmt(r['bytes_ratio'])}."
    )


def render_predict(r: dict[str, Any]) -> str:
    rows = [[stage, share] for stage, share in r["shares"].items()]
    memory = ", ".join(f"{n} series {mb:.0f} MB" for n, mb in r["peak_rss_mb"].items())
    return (
        f"`medfed site predict` on {r['series']} series x {r['slices_per_series']} slices "
        f"(seg2d U-Net), stored to {r['stored_to']}: {_fmt(r['series_per_second'])} series/s, "
        f"{_fmt(r['ms_per_slice'])} ms/slice.\n\n"
        + _table(["stage", "share of the total"], rows)
        + f"\n\nPeak RSS: {memory} (x{_fmt(r['memory_ratio_4x_series'])} for 4x the series)."
    )


def render_lifecycle(r: dict[str, Any]) -> str:
    sites = sorted(next(iter(r["per_site_dice"].values())))
    rows = [[arm, *(d.get(s) for s in sites)] for arm, d in r["per_site_dice"].items()]
    speed = r["rounds_to_90pct"]
    return (
        f"{r['rounds']} rounds, DP-SGD (sigma 1.3); {r['shifted_site']} is shifted (another "
        "vendor, intensity scale and offset, twice the noise). Held-out Dice per site.\n\n"
        + _table(["arm", *sites], rows)
        + f"\n\nRounds to reach 0.9 of the final Dice: from scratch {speed['scratch']}, "
        f"from the pretrained model {speed['pretrained']} (its round-0 Dice per site: "
        + ", ".join(f"{s} {v:.3f}" for s, v in sorted(r["pretrained_round0_dice"].items()))
        + "). Cross-site matrix (FedBN, every site sharing): the plot."
    )


@dataclass(frozen=True)
class Benchmark:
    """A script of this folder, its arguments per mode and how its result reads."""

    script: str
    quick: list[str]
    render: Callable[[dict[str, Any]], str]
    full: list[str] = field(default_factory=list)
    plots: bool = False  # takes --plot PATH


BENCHMARKS = {
    "dp_overhead": Benchmark("dp_overhead.py", ["--quick"], render_dp_overhead),
    "strategies": Benchmark(
        "strategies.py",
        ["--quick", "--strategies", "fedavg", "fedbn", "fedmedian"],
        render_strategies,
        plots=True,
    ),
    "quality": Benchmark(
        "quality.py",
        ["--quick", "--strategies", "fedavg", "--epsilons", "8"],
        render_quality,
        plots=True,
    ),
    "scale": Benchmark("scale.py", ["--quick"], render_scale),
    "communication": Benchmark("communication.py", ["--quick"], render_communication),
    "overhead": Benchmark("overhead.py", ["--quick"], render_overhead),
    "prepare_speed": Benchmark("prepare_speed.py", ["--quick"], render_prepare_speed),
    "deid": Benchmark("deid.py", ["--quick"], render_deid),
    "secagg": Benchmark("secagg.py", ["--quick"], render_secagg),
    "deploy_rounds": Benchmark("deploy_rounds.py", ["--quick"], render_deploy_rounds),
    "predict": Benchmark("predict.py", ["--quick"], render_predict),
    "lifecycle": Benchmark("lifecycle.py", ["--quick"], render_lifecycle, plots=True),
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
    }


def run_one(name: str, *, quick: bool, docs: Path) -> dict[str, Any]:
    """Run one benchmark script; its JSON result, with its plot copied into `docs`."""
    bench = BENCHMARKS[name]
    args = [sys.executable, str(HERE / bench.script), *(bench.quick if quick else bench.full)]
    plot = docs / f"{name}.png"
    if bench.plots:
        args += ["--plot", str(plot)]
    started = time.perf_counter()
    print(f"[{name}] {' '.join(args[1:])}", flush=True)
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-40:]
        print(f"[{name}] failed after {seconds:.0f} s: {' / '.join(tail)}", flush=True)
        return {"ok": False, "error": tail, "seconds": seconds}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return {"ok": True, "seconds": seconds, "result": result, "plot": plot.exists()}


def render(results: dict[str, Any], info: dict[str, Any], quick: bool) -> str:
    """docs/benchmarks.md."""
    gpu = info["gpu"] or "none"
    parts = [
        "# medfed benchmarks",
        "",
        "Generated by `python scripts/bench/suite.py"
        + (" --quick" if quick else "")
        + "`; do not edit by hand. "
        + (
            "Quick (smoke) mode: small data, few rounds; not the figures to quote." if quick else ""
        ),
        "",
        f"Last run {info['date']} on {info['cpu']}, {info['cores']} cores, "
        f"{info['memory_gib']} GiB, GPU: {gpu}; Python {info['python']}, torch {info['torch']}. "
        "Each section names the day and CPU it was measured on.",
    ]
    for name, entry in results.items():
        parts += ["", f"## {name}", ""]
        if not entry["ok"]:
            parts.append(f"Failed: {' / '.join(entry['error'])}")
            continue
        parts.append(BENCHMARKS[name].render(entry["result"]))
        if entry["plot"]:
            parts += ["", f"![{name}]({name}.png)"]
        where = entry.get("machine") or info
        parts += ["", f"({entry['seconds']:.0f} s; {where['date']} on {where['cpu']})"]
    return "\n".join(parts) + "\n"


def _earlier_results(path: Path, *, quick: bool) -> dict[str, Any]:
    """Results of an earlier run in the same mode (kept when `--only` reruns a few).

    Each keeps the machine it was measured on.
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("quick") != quick:
        return {}
    results = dict(earlier["results"])
    if "machine" in earlier:
        for entry in results.values():
            entry.setdefault("machine", earlier["machine"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small and short")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results go")
    args = parser.parse_args()
    docs = Path(args.docs).resolve()
    docs.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = _earlier_results(docs / "benchmarks.json", quick=args.quick) if args.only else {}
    for name in args.only or BENCHMARKS:
        results[name] = {**run_one(name, quick=args.quick, docs=docs), "machine": info}
    results = {name: results[name] for name in BENCHMARKS if name in results}
    (docs / "benchmarks.json").write_text(
        json.dumps({"machine": info, "quick": args.quick, "results": results}, indent=2)
    )
    (docs / "benchmarks.md").write_text(render(results, info, args.quick))
    print(f"wrote {docs / 'benchmarks.md'} and {docs / 'benchmarks.json'}")
    ran = args.only or list(BENCHMARKS)
    summary = {
        "benchmark": "suite",
        "quick": args.quick,
        "ok": sorted(k for k in ran if results[k]["ok"]),
        "failed": sorted(k for k in ran if not results[k]["ok"]),
    }
    print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
