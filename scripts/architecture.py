"""Draw the package layers from the import contracts, with the imports measured in the code.

    python scripts/architecture.py [--output docs/architecture.png]

The layers come from the `layers` contract in pyproject.toml's `[tool.importlinter]`
(the same one `make lint` checks); the arrows are the imports between the top-level
packages that grimp (import-linter's graph builder) finds, labelled with their count.
The last line is JSON: the packages, the import counts between them, and whether any
import goes against the layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layers_of(pyproject: Path) -> tuple[list[list[str]], list[str]]:
    """The `layers` contract's layers, top first (siblings split), and the root packages."""
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers = [[p.strip() for p in layer.split("|")] for layer in contract["layers"]]
    return layers, list(config["root_packages"])


def package_imports(packages: list[str]) -> dict[tuple[str, str], int]:
    """Imports from one top-level package into another, counted per importing line."""
    import grimp

    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*packages)
    counts: dict[tuple[str, str], int] = {}
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            src, dst = importer.split(".")[0], imported.split(".")[0]
            if src != dst and dst in packages:
                details = graph.get_import_details(importer=importer, imported=imported)
                counts[(src, dst)] = counts.get((src, dst), 0) + max(len(details), 1)
    return counts


def draw(layers: list[list[str]], counts: dict[tuple[str, str], int], output: Path) -> None:
    """Boxes per layer (top layer on top), arrows for the measured imports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    place: dict[str, tuple[float, float]] = {}
    for row, layer in enumerate(layers):
        y = len(layers) - 1 - row
        for col, package in enumerate(layer):
            x = (col + 0.5) / len(layer)
            place[package] = (x, y)
            ax.add_patch(plt.Rectangle((x - 0.14, y - 0.18), 0.28, 0.36, fc="#e8f0fb", ec="#335"))
            ax.text(x, y, f"{package}/", ha="center", va="center", fontsize=12, weight="bold")
    for (src, dst), n in sorted(counts.items()):
        (x0, y0), (x1, y1) = place[src], place[dst]
        ax.annotate(
            "",
            xy=(x1, y1 + 0.18 if y1 < y0 else y1),
            xytext=(x0, y0 - 0.18 if y1 < y0 else y0),
            arrowprops={"arrowstyle": "->", "color": "#555", "lw": 1 + n / 40},
        )
        ax.text((x0 + x1) / 2 + 0.02, (y0 + y1) / 2, str(n), fontsize=9, color="#333")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, len(layers) - 0.5)
    ax.axis("off")
    ax.set_title("medfed's layers (import-linter contracts); arrows: imports measured")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "architecture.png"))
    args = parser.parse_args()
    layers, packages = layers_of(ROOT / "pyproject.toml")
    counts = package_imports(packages)
    rank = {p: i for i, layer in enumerate(layers) for p in layer}
    upward = [f"{s} -> {d}" for (s, d) in counts if rank[s] >= rank[d]]
    draw(layers, counts, Path(args.output))
    print(f"wrote {args.output}")
    print(
        json.dumps(
            {
                "layers": layers,
                "imports": {f"{s} -> {d}": n for (s, d), n in sorted(counts.items())},
                "against_layers": upward,
            }
        )
    )


if __name__ == "__main__":
    main()
