"""A site's aggregate, non-identifying data-quality summary, and the side-by-side view.

The summary holds counts and histograms only: number of series, patients and slices,
vendor and modality mix, spacing and intensity histograms, label balance. No UIDs,
names, dates or per-series rows, so it may leave the site.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from federation.dicom.prepare import HU_BINS, SeriesEntry

__all__ = [
    "SLICE_SPACING_BINS",
    "format_table",
    "plot_summaries",
    "quality_summary",
]

SLICE_SPACING_BINS = [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0, 1000.0]
PIXEL_SPACING_BINS = [0.0, 0.5, 0.7, 0.9, 1.1, 1.5, 2.0, 3.0, 5.0, 100.0]
FOREGROUND_BINS = [0.0, 1e-6, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0001]


def _hist(values: Sequence[float], bins: Sequence[float]) -> list[int]:
    return [int(n) for n in np.histogram(np.asarray(values, dtype=float), bins=bins)[0]]


def quality_summary(entries: Sequence[SeriesEntry], *, quarantined: int) -> dict[str, Any]:
    """Aggregate a site's manifest into a summary that identifies nobody."""
    hu = np.zeros(len(HU_BINS) - 1, dtype=np.int64)
    for e in entries:
        hu += np.asarray(e.hu_histogram, dtype=np.int64)
    voxels = int(hu.sum())
    labelled = [e for e in entries if e.label != "none"]
    return {
        "series": len(entries),
        "patients": len({e.patient for e in entries}),
        "slices": int(sum(e.shape[0] for e in entries)),
        "quarantined_files": int(quarantined),
        "vendors": dict(Counter(e.manufacturer for e in entries)),
        "modalities": dict(Counter(e.modality for e in entries)),
        "labels": dict(Counter(e.label for e in entries)),
        "classes": dict(Counter(e.class_label for e in entries if e.class_label)),
        "slice_spacing_bins": SLICE_SPACING_BINS,
        "slice_spacing_hist": _hist([e.spacing[0] for e in entries], SLICE_SPACING_BINS),
        "pixel_spacing_bins": PIXEL_SPACING_BINS,
        "pixel_spacing_hist": _hist([e.spacing[1] for e in entries], PIXEL_SPACING_BINS),
        "intensity_bins": [float(b) for b in HU_BINS],
        "intensity_fraction": [round(float(n) / max(voxels, 1), 6) for n in hu],
        "foreground_bins": FOREGROUND_BINS,
        "foreground_hist": _hist([e.foreground_fraction for e in labelled], FOREGROUND_BINS),
        "foreground_mean": round(
            float(np.mean([e.foreground_fraction for e in labelled])) if labelled else 0.0, 6
        ),
    }


def _median_from_hist(fractions: Sequence[float], bins: Sequence[float]) -> float:
    cum = np.cumsum(fractions)
    if not len(cum) or cum[-1] <= 0:
        return float("nan")
    k = int(np.searchsorted(cum, cum[-1] / 2))
    return float((bins[k] + bins[k + 1]) / 2)


def _median_hu(summary: Mapping[str, Any]) -> float:
    return _median_from_hist(summary["intensity_fraction"], summary["intensity_bins"])


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Sites side by side, one column each, so domain shift is visible before training."""
    sites = sorted(summaries)

    def mix(counts: Mapping[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"

    rows: list[tuple[str, list[str]]] = [
        ("series", [str(summaries[s]["series"]) for s in sites]),
        ("patients", [str(summaries[s]["patients"]) for s in sites]),
        ("slices", [str(summaries[s]["slices"]) for s in sites]),
        ("quarantined files", [str(summaries[s]["quarantined_files"]) for s in sites]),
        ("vendors", [mix(summaries[s]["vendors"]) for s in sites]),
        ("modalities", [mix(summaries[s]["modalities"]) for s in sites]),
        ("labels", [mix(summaries[s]["labels"]) for s in sites]),
        ("median HU", [f"{_median_hu(summaries[s]):.0f}" for s in sites]),
        ("foreground mean", [f"{summaries[s]['foreground_mean']:.4f}" for s in sites]),
        (
            "slice spacing",
            [
                " ".join(
                    f"{b:g}:{n}"
                    for b, n in zip(
                        summaries[s]["slice_spacing_bins"],
                        summaries[s]["slice_spacing_hist"],
                        strict=False,
                    )
                    if n
                )
                or "-"
                for s in sites
            ],
        ),
    ]
    width = max(12, *(len(v) for _, vals in rows for v in vals), *(len(s) for s in sites))
    lines = [f"{'':18s}" + "".join(f"{s:>{width + 2}s}" for s in sites)]
    lines += [f"{name:18s}" + "".join(f"{v:>{width + 2}s}" for v in vals) for name, vals in rows]
    return "\n".join(lines)


def plot_summaries(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Intensity distributions, slice spacing and label balance per site, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for site in sorted(summaries):
        s = summaries[site]
        bins = np.asarray(s["intensity_bins"])
        axes[0].plot((bins[:-1] + bins[1:]) / 2, s["intensity_fraction"], label=site)
        axes[1].bar(
            [f"{b:g}" for b in s["slice_spacing_bins"][:-1]],
            s["slice_spacing_hist"],
            alpha=0.5,
            label=site,
        )
        axes[2].bar(site, s["foreground_mean"])
    axes[0].set(title="intensity (HU)", xlabel="HU", ylabel="fraction of voxels")
    axes[1].set(title="slice spacing (mm, bin start)", ylabel="series")
    axes[2].set(title="label balance (mean foreground fraction)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def to_json(summary: Mapping[str, Any]) -> str:
    """Wire form of a summary."""
    return json.dumps(summary, sort_keys=True)
