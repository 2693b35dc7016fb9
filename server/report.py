"""What a coordinator reads after a run: the round table and the round plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation import keys
from federation.config import MedfedConfig, resolve_path
from federation.logs import SITE_LOG_FILE
from server.central import COORDINATOR
from server.crosssite import CROSS_SITE_JSON, CrossSiteMatrix
from server.loop import RunHistory

__all__ = [
    "EVALUATION_TABLE",
    "RunResult",
    "evaluation_rows",
    "format_evaluation",
    "format_table",
    "plot_history",
    "run_summary",
]

EVALUATION_TABLE = "evaluation.json"  # MLflow table of an evaluation-only run


@dataclass(frozen=True)
class RunResult:
    """Where a finished run left its results."""

    run_name: str
    history: RunHistory
    output_dir: Path
    tracking_uri: str
    mlflow_run_id: str
    mlflow_experiment_id: str


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(history: RunHistory) -> str:
    """Per-round table: loss, the task's metric per site and aggregated, epsilon per site."""
    sites, metric = history.sites, history.metric
    central = any(keys.CENTRAL_EPSILON in r.train for r in history.rounds)
    header = [
        "round",
        "train loss",
        *(f"{metric} {s}" for s in sites),
        f"{metric} (all)",
        *(f"eps {s}" for s in sites),
        *(["eps client-level"] if central else []),
        "seconds",
    ]
    rows = []
    for r in history.rounds:
        rows.append(
            [
                str(r.round),
                _num(r.train.get(keys.TRAIN_LOSS)),
                *(_num(r.site_evaluate.get(s, {}).get(metric)) for s in sites),
                _num(r.evaluate.get(metric)),
                *(_num(r.site_train.get(s, {}).get(keys.EPSILON), 2) for s in sites),
                *([_num(r.train.get(keys.CENTRAL_EPSILON), 2)] if central else []),
                f"{r.seconds:.1f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def evaluation_rows(history: RunHistory) -> list[dict[str, Any]]:
    """One row per site of an evaluation-only run, then the aggregate: examples, metrics.

    A site that released no metrics has its reason in `refused`.
    """
    record = history.rounds[0]
    names = sorted({k for m in record.site_evaluate.values() for k in m} - {keys.NUM_EXAMPLES})
    rows: list[dict[str, Any]] = []
    for site in history.sites:
        metrics = record.site_evaluate.get(site, {})
        rows.append(
            {
                "site": site,
                "examples": int(metrics.get(keys.NUM_EXAMPLES, 0)),
                **{n: metrics.get(n) for n in names},
                "refused": record.failures.get(site, "" if metrics else "no reply"),
            }
        )
    rows.append(
        {
            "site": "all",
            "examples": sum(int(r["examples"]) for r in rows),
            **{n: record.evaluate.get(n) for n in names},
            "refused": "",
        }
    )
    return rows


def format_evaluation(history: RunHistory, model: str) -> str:
    """The table a coordinator reads after `medfed evaluate`."""
    rows = evaluation_rows(history)
    header = list(rows[0])
    cells = [
        [
            f"{v:.4f}" if isinstance(v, float) else str(v) if v not in (None, "") else "-"
            for v in r.values()
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [f"Evaluation of {model} (no training, no privacy budget spent):"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _personalised_lines(history: RunHistory) -> list[str]:
    """Each site's global vs personalised metric, when the run personalised."""
    if not history.personalised and not history.personalise_failures:
        return []
    metric = history.metric
    lines = [f"Personalised models (kept at each site), held-out {metric}: global -> own"]
    for site in history.sites:
        m = history.personalised.get(site)
        if m is None:
            reason = history.personalise_failures.get(site, "no reply")
            lines.append(f"  {site}: not personalised ({reason})")
            continue
        lines.append(
            f"  {site}: {_num(m.get(keys.GLOBAL_PREFIX + metric))} -> "
            f"{_num(m.get(keys.PERSONAL_PREFIX + metric))} (epsilon {_num(m.get(keys.EPSILON), 2)})"
        )
    return lines


def run_summary(result: RunResult, cfg: MedfedConfig) -> str:
    """What a coordinator reads at the end of a run: table, Dice, where things are."""
    rounds = result.history.rounds
    lines = [format_table(result.history), ""]
    metric = result.history.metric
    first, last = rounds[0].evaluate.get(metric), rounds[-1].evaluate.get(metric)
    if first is not None and last is not None:
        name = "Dice" if metric == keys.DICE else metric
        lines.append(
            f"Held-out {name}: {first:.3f} (initial model) -> {last:.3f} "
            f"(after round {rounds[-1].round})"
        )
    lines += _personalised_lines(result.history)
    if (result.output_dir / CROSS_SITE_JSON).exists():
        lines += [CrossSiteMatrix.load(result.output_dir / CROSS_SITE_JSON).format(), ""]
    lines.append(f"Model, history, plot and ledger copies: {result.output_dir}")
    if (result.output_dir / SITE_LOG_FILE).exists():
        lines.append(f"The simulated sites' log: {result.output_dir / SITE_LOG_FILE}")
    state = resolve_path(cfg.federation.site_state_root)
    if cfg.privacy.mode == "central":
        coordinator = resolve_path(cfg.output_dir) / COORDINATOR
        lines.append(f"Client-level DP ledger of the coordinator: {coordinator}/ledger.jsonl")
    elif cfg.privacy.mode == "dp-sgd":
        lines.append(
            f"Site ledgers: {state}/<site>/ledger.jsonl  (audit: .venv/bin/medfed audit "
            f"report {state}/*/ledger.jsonl --keys {state} --output audit)"
        )
    lines.append(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    lines.append(
        f"Open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}"
        "  (then http://127.0.0.1:5000)"
    )
    return "\n".join(lines)


def plot_history(history: RunHistory, path: Path) -> Path:
    """The task's metric per site and aggregated, and epsilon per site, over rounds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history.rounds]
    fig, (ax_dice, ax_eps) = plt.subplots(1, 2, figsize=(11, 4))
    for site in history.sites:
        dice = [r.site_evaluate.get(site, {}).get(history.metric) for r in history.rounds]
        ax_dice.plot(rounds, [float("nan") if d is None else d for d in dice], "o-", label=site)
        eps = [r.site_train.get(site, {}).get(keys.EPSILON) for r in history.rounds]
        ax_eps.plot(rounds, [float("nan") if e is None else e for e in eps], "o-", label=site)
    agg = [r.evaluate.get(history.metric, float("nan")) for r in history.rounds]
    ax_dice.plot(rounds, agg, "k--", linewidth=2, label="aggregated")
    label = "Dice" if history.metric == keys.DICE else history.metric
    ax_dice.set(title=f"Held-out {label}", xlabel="round", ylabel=label, ylim=(0, 1))
    ax_eps.set(title="Privacy spent per site", xlabel="round", ylabel="epsilon")
    for ax in (ax_dice, ax_eps):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"medfed run {history.run_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
