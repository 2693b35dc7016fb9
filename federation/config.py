"""Typed configuration: the sections of a run, each checked on its own, and transport.

`federation.compose` composes `conf/` with Hydra overrides and checks a whole run,
against its task too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from federation import __version__, keys
from federation.tracking import default_tracking_uri

__all__ = [
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "MedfedConfig",
    "ModelConfig",
    "PersonaliseConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrackingConfig",
    "anchor_paths",
    "config_sha256",
    "config_to_json",
    "flatten",
    "plan_hash",
    "resolve_path",
    "section_from_flat",
]


@dataclass
class TaskConfig:
    """What the sites learn and how they train locally."""

    name: str = "seg2d"
    image_size: int = 64
    window_min: float = -200.0
    window_max: float = 300.0
    val_fraction: float = 0.25
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    # Task-specific settings, checked by the task itself (see federation/tasks/base.py).
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Reject a section that cannot run, naming the value (the task checks `params`)."""
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"task.val_fraction={self.val_fraction} must lie in (0, 1).")


@dataclass
class ModelConfig:
    """The shared network, built by `federation.models.build_model`."""

    name: str = "unet"
    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    norm: str = "instance"
    # Learnable scale and shift in the norm layers (FedBN keeps them at each site).
    norm_affine: bool = True
    dropout: float = 0.0
    # DenseNet (model.name=densenet) only: initial features, growth rate, layers per block.
    init_features: int = 16
    growth_rate: int = 8
    block_config: list[int] = field(default_factory=lambda: [2, 2, 2])
    # Weights of the first global model (`federation.initweights`): models:/NAME/VERSION,
    # models:/NAME@ALIAS, a run name, a file, or a MONAI bundle folder; null: random.
    init: str | None = None
    # Parts trained by no one: parameter-name prefixes or globs, or `encoder`.
    freeze: list[str] = field(default_factory=list)


@dataclass
class PersonaliseConfig:
    """Models of each site's own, kept at the site (`strategy.personalise.*`)."""

    # After the last round each site fine-tunes the final global model for this many
    # local epochs (DP-SGD within its budget) and reports global vs personalised metrics.
    local_epochs: int = 0
    # Ditto: every round each site also trains its personal model, pulled towards the
    # global one with this weight (0: off); it costs a second DP-SGD pass per round.
    ditto_lambda: float = 0.0

    def validate(self) -> None:
        """Reject a section that cannot run, naming the value."""
        if self.local_epochs < 0 or self.ditto_lambda < 0:
            raise ValueError(
                "strategy.personalise.local_epochs and strategy.personalise.ditto_lambda must "
                f"be >= 0 (got {self.local_epochs} and {self.ditto_lambda})."
            )


@dataclass
class StrategyConfig:
    """How the coordinator samples sites and aggregates their updates."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    max_update_norm_ratio: float = 10.0
    # FedProx: weight of the proximal term pulling local weights to the global model.
    proximal_mu: float = 0.01
    # FedAdam / FedYogi: server learning rate and optimiser constants.
    server_lr: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    # Krum: number of sites assumed malicious.
    num_malicious: int = 0
    # FedBN: normalisation layers stay at each site, never sent nor averaged.
    local_norm: bool = False
    personalise: PersonaliseConfig = field(default_factory=PersonaliseConfig)

    def validate(self) -> None:
        """Reject a section that cannot run, naming the value."""
        self.personalise.validate()
        if self.name == "fedbn" and not self.local_norm:
            raise ValueError(
                "strategy.name=fedbn keeps normalisation layers local at each site; "
                "drop strategy.local_norm=false or choose another strategy."
            )


@dataclass
class PrivacyConfig:
    """Differential privacy applied at each site."""

    mode: str = "dp-sgd"
    target_epsilon: float | None = None
    noise_multiplier: float = 1.3
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    # Client-level (central) DP only: adaptive-server | fixed-client
    clipping: str = "adaptive-server"
    clipped_count_stddev: float | None = None

    def validate(self) -> None:
        """Reject a section that cannot run, naming the value."""
        if self.mode not in ("dp-sgd", "central", "none"):
            raise ValueError(
                f"privacy.mode={self.mode!r} is unknown; "
                "use privacy=dp_sgd, privacy=central or privacy=none."
            )
        if self.mode == "central" and self.clipping not in ("adaptive-server", "fixed-client"):
            raise ValueError(
                f"privacy.clipping={self.clipping!r} is unknown; "
                "use adaptive-server or fixed-client."
            )
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon} must be > 0.")
        if self.mode != "none" and (self.noise_multiplier <= 0 or self.max_grad_norm <= 0):
            raise ValueError(
                "DP needs privacy.noise_multiplier > 0 and privacy.max_grad_norm > 0; "
                "to train without DP choose privacy=none."
            )


@dataclass
class DataConfig:
    """Where simulated sites find their DICOM and how the generator sizes them."""

    root: str = "consortium"
    generate: bool = True
    patients_per_site: list[int] = field(default_factory=lambda: [16, 12, 20])
    slices: int = 24


@dataclass
class FederationConfig:
    """Which sites take part and how many must deliver each round."""

    engine: str = "simulation"
    num_sites: int = 3
    site_names: list[str] | None = None
    min_sites: int = 2
    round_timeout: float = 1800.0
    # Simulation: CPU share of one site (Ray resources); below 1 several sites share a
    # core and train at once, as separate hospitals do. Torch threads: its whole part, >= 1.
    cpus_per_site: float = 1.0
    site_state_root: str = "site-state"
    site_budget: float = 10.0
    # How sites send updates: full weights, or fp16 deltas to the received weights.
    update_encoding: str = "full"
    # Deployment: the coordinator kit written by `medfed provision`.
    kit: str | None = None
    # Deployment: the longest wait (s) between the coordinator's polls for the sites'
    # replies (the ServerApp asks its own SuperLink): 0.05 s after a reply, doubling.
    poll_interval: float = 0.25
    # Secure aggregation: "none", or "secaggplus" (Flower's SecAgg+: the coordinator only
    # ever holds the masked sum of the sites' updates).
    secure_aggregation: str = "none"
    # SecAgg+: fraction of the key shares needed to unmask (tolerates dropouts below it).
    secagg_threshold: float = 0.7
    # SecAgg+: weights are clipped to [-r, r] and quantised to this many levels.
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    # SecAgg+: upper bound of one site's training examples (its aggregation weight).
    secagg_max_weight: float = 1000.0

    def names(self) -> list[str]:
        """Site names, `site-1 ... site-N` unless given."""
        if self.site_names:
            return list(self.site_names)
        return [f"site-{i + 1}" for i in range(self.num_sites)]

    def validate(self) -> None:
        """Reject a section that cannot run, naming the value."""
        from federation.compression import ENCODINGS

        names = self.names()
        if self.site_names and len(self.site_names) != self.num_sites:
            raise ValueError(
                f"federation.site_names lists {len(self.site_names)} sites but "
                f"federation.num_sites={self.num_sites}; make them agree or drop site_names."
            )
        if len(set(names)) != len(names):
            raise ValueError(f"federation.site_names has duplicates: {names}")
        if not 1 <= self.min_sites <= self.num_sites:
            raise ValueError(
                f"federation.min_sites={self.min_sites} must be between 1 and "
                f"federation.num_sites={self.num_sites}."
            )
        if not self.cpus_per_site > 0:
            raise ValueError(
                f"federation.cpus_per_site={self.cpus_per_site} must be > 0 (0.5: two sites "
                "share a core)."
            )
        if self.engine not in ("simulation", "deployment"):
            raise ValueError(
                f"federation.engine={self.engine!r} is unknown; use federation=local "
                "(simulation) or federation=deploy (deployment)."
            )
        if self.update_encoding not in ENCODINGS:
            raise ValueError(
                f"federation.update_encoding={self.update_encoding!r} is unknown; use one of "
                f"{', '.join(ENCODINGS)}."
            )


@dataclass
class TrackingConfig:
    """MLflow tracking, written by the coordinator only."""

    uri: str | None = None
    experiment: str = "medfed"
    # Registry name of the best global model; null means `medfed-<task.name>`, "" none.
    registered_model: str | None = None


@dataclass
class EvaluationConfig:
    """How the coordinator judges the global model."""

    # A labelled DICOM folder at the coordinator, evaluated every round; null for none.
    holdout: str | None = None
    # Metric that picks the best round (server hold-out when set, else federated);
    # null: the task's primary metric (dice for segmentation, auroc for classification).
    select_metric: str | None = None
    # Sites evaluate on all their labelled data, not only their held-out patients (for
    # evaluation-only runs of a model none of them trained: `medfed evaluate --all-data`).
    all_data: bool = False
    # After a run that leaves models of the sites' own (FedBN, personalised, Ditto):
    # evaluate every site's model, and the global one, at every site.
    cross_site: bool = True


@dataclass
class MedfedConfig:
    """The whole resolved configuration of a federated run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    rounds: int = 10
    seed: int = 0
    run_name: str | None = None
    output_dir: str = "outputs"
    # Continue run `run_name` from its last checkpoint (set by `medfed run --resume`).
    resume: bool = False

    def validate(self) -> None:
        """Reject settings that cannot run, saying which value and why.

        Each section checks itself; what spans sections is checked here.
        """
        if self.rounds < 0 or (self.rounds == 0 and not self.model.init):
            raise ValueError(
                f"rounds={self.rounds}: a run needs at least one round; rounds=0 only "
                "evaluates the model that model.init names (medfed evaluate --model ...)."
            )
        if self.evaluation.all_data and self.rounds > 0:
            raise ValueError(
                "evaluation.all_data=true evaluates on the data the sites train on; it is "
                "for evaluation-only runs (rounds=0, medfed evaluate --all-data)."
            )
        for section in (self.federation, self.privacy, self.strategy, self.task):
            section.validate()
        fed = self.federation
        if (
            fed.update_encoding != "full"
            and self.privacy.mode == "central"
            and self.privacy.clipping == "fixed-client"
        ):
            raise ValueError(
                "privacy.clipping=fixed-client clips the weights a site sends, which an "
                f"encoded update ({fed.update_encoding}) is not; use "
                "federation.update_encoding=full or privacy.clipping=adaptive-server."
            )
        self._validate_secure_aggregation()
        if self.resume and not self.run_name:
            raise ValueError("resume=true needs the run_name of the run to continue.")

    def _validate_secure_aggregation(self) -> None:
        fed = self.federation
        if fed.secure_aggregation == "none":
            return
        if fed.secure_aggregation != "secaggplus":
            raise ValueError(
                f"federation.secure_aggregation={fed.secure_aggregation!r} is unknown; "
                "use none or secaggplus."
            )
        unsupported = {
            "strategy.name": self.strategy.name != "fedavg",
            "privacy.mode=central": self.privacy.mode == "central",
            "strategy.local_norm": self.strategy.local_norm,
            "resume": self.resume,
            "federation.update_encoding": fed.update_encoding != "full",
        }
        if bad := [name for name, on in unsupported.items() if on]:
            raise ValueError(
                f"federation.secure_aggregation=secaggplus cannot be combined with "
                f"{', '.join(bad)}: the coordinator only sees the sum of the updates, so it "
                "aggregates with FedAvg, adds no central noise (sites train with DP-SGD, "
                "privacy=dp_sgd), keeps every layer shared, masks full weights and cannot "
                "resume a run; drop these settings or set federation.secure_aggregation=none."
            )
        if fed.num_sites < 3:
            raise ValueError(
                f"federation.secure_aggregation=secaggplus needs at least 3 sites, "
                f"federation.num_sites={fed.num_sites}: with two, each learns the other's "
                "update from the sum."
            )
        if not 0 < fed.secagg_threshold <= 1:
            raise ValueError(
                f"federation.secagg_threshold={fed.secagg_threshold} must lie in (0, 1]."
            )


def config_to_json(cfg: MedfedConfig) -> str:
    """Serialise a config for transport in the Flower run config."""
    return json.dumps(asdict(cfg), sort_keys=True)


def config_sha256(cfg: MedfedConfig) -> str:
    """Stable hash of a run's whole configuration (the same when it is resumed)."""
    text = config_to_json(dataclasses.replace(cfg, resume=False))
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, dropping `None` values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = value
    return flat


def section_from_flat(flat: dict[str, Any], section: str, schema: type[Any]) -> Any:
    """Rebuild one typed section (e.g. `privacy`) from dotted keys."""
    prefix = f"{section}."
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith(prefix):
            *parents, leaf = key[len(prefix) :].split(".")
            node = values
            for part in parents:  # nested mappings such as task.params
                node = node.setdefault(part, {})
            node[leaf] = value
    typed = OmegaConf.merge(OmegaConf.structured(schema), values)
    return OmegaConf.to_object(typed)


def plan_hash(site_config: dict[str, Any], *, app: str) -> str:
    """Stable hash of what a run executes at a site: its code and its site config.

    Args:
        site_config: The config the coordinator sends the site.
        app: Digest of the code the run executes (`federation.appdigest`).

    Round number and run name are left out, so every round of a run has the same plan.
    """
    volatile = {keys.SERVER_ROUND, keys.RUN_NAME}
    plan = {k: v for k, v in site_config.items() if k not in volatile}
    body = {"medfed": __version__, "app": app, "config": plan}
    canonical = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def anchor_paths(cfg: MedfedConfig) -> MedfedConfig:
    """Make the config's paths absolute, so every process reads the same files."""
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(resolve_path(cfg.data.root))),
        federation=dataclasses.replace(
            cfg.federation, site_state_root=str(resolve_path(cfg.federation.site_state_root))
        ),
        output_dir=str(resolve_path(cfg.output_dir)),
        tracking=dataclasses.replace(cfg.tracking, uri=cfg.tracking.uri or default_tracking_uri()),
    )


def resolve_path(path: str, base: Path | None = None) -> Path:
    """Absolute path for a config path given relative to `base` (default: cwd)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base or Path.cwd()) / p
