"""The `medfed` command: one subcommand per role, Hydra overrides after it.

medfed demo                                   # local 3-hospital consortium, DP, MLflow
medfed run federation.num_sites=5 privacy.noise_multiplier=1.1 rounds=3
medfed generate --output consortium --sites 3
medfed site check --data consortium/site-1
medfed config privacy=none
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from federation.config import compose_config

    print(OmegaConf.to_yaml(OmegaConf.structured(compose_config(args.overrides))), end="")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from federation.config import compose_config
    from federation.dicom.synth import generate_consortium

    cfg = compose_config(args.overrides)
    names = [f"site-{i + 1}" for i in range(args.sites)] if args.sites else cfg.federation.names()
    generate_consortium(
        Path(args.output),
        site_names=names,
        patients_per_site=cfg.data.patients_per_site,
        slices=cfg.data.slices,
        seed=cfg.seed,
        progress=print,
    )
    print(f"wrote {len(names)} sites under {Path(args.output).resolve()}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from federation import keys
    from federation.config import compose_config
    from server.launch import run_simulation
    from server.report import format_table

    cfg = compose_config(args.overrides)
    if cfg.federation.engine != "simulation":
        raise ValueError(
            f"federation.engine={cfg.federation.engine!r} is not available yet; "
            "use the simulation engine (federation=local)."
        )
    result = run_simulation(cfg)
    rounds = result.history.rounds
    print()
    print(format_table(result.history))
    first, last = rounds[0].evaluate.get(keys.DICE), rounds[-1].evaluate.get(keys.DICE)
    if first is not None and last is not None:
        print(
            f"\nHeld-out Dice: {first:.3f} (initial model) -> {last:.3f} "
            f"(after round {rounds[-1].round})"
        )
    print(f"Model, history and plot: {result.output_dir}")
    print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    print(
        f"Open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}"
        "  (then http://127.0.0.1:5000)"
    )
    return 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    from federation.dicom.series import load_labelled_volumes

    path = Path(args.data)
    if not path.is_dir():
        print(f"error: data folder {path} does not exist or is not a folder", file=sys.stderr)
        return 2
    volumes, problems = load_labelled_volumes(path)
    for problem in problems:
        print(f"not used: {problem.path}: {problem.reason}")
    vendors = sorted({v.manufacturer for v in volumes})
    print(
        f"{path}: {len(volumes)} labelled series usable, {len(problems)} not used; "
        f"vendors: {', '.join(vendors) or '-'}"
    )
    return 0 if volumes else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfed", description="Federated learning for hospital consortia."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_overrides(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "overrides", nargs="*", help="Hydra overrides, e.g. privacy.noise_multiplier=1.1"
        )
        return p

    for name, text in (
        ("demo", "run the local consortium demo on embedded defaults"),
        ("run", "run a federated training (coordinator)"),
    ):
        with_overrides(sub.add_parser(name, help=text)).set_defaults(func=_cmd_run)
    with_overrides(sub.add_parser("config", help="print the resolved configuration")).set_defaults(
        func=_cmd_config
    )
    gen = with_overrides(sub.add_parser("generate", help="write a synthetic DICOM consortium"))
    gen.add_argument("--output", required=True, help="output folder (one sub-folder per site)")
    gen.add_argument("--sites", type=int, default=0, help="number of sites (default: config)")
    gen.set_defaults(func=_cmd_generate)

    site = sub.add_parser("site", help="site (hospital) commands").add_subparsers(
        dest="site_command", required=True
    )
    check = site.add_parser("check", help="check that a site folder holds usable labelled DICOM")
    check.add_argument("--data", required=True, help="the site's DICOM folder")
    check.set_defaults(func=_cmd_site_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medfed` console script."""
    args = _parser().parse_args(argv)
    from federation.errors import FederationError, SiteDataError
    from federation.logs import setup_logging

    setup_logging(verbose=args.verbose)
    try:
        return int(args.func(args))
    except (ValueError, FederationError, SiteDataError) as err:
        print(f"medfed: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
