"""The site agent's Flower ClientApp: local (DP) training and evaluation on own DICOM.

Only weights, aggregate metrics and the signed privacy spend leave the site. A site
that cannot or may not train (bad data, exhausted budget) answers with a refusal naming
itself and the reason instead of crashing.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import nn

from client.activity import SiteActivity
from client.apptrust import running_app
from client.governance import RunRequest
from client.mods import central_clipping_mod, packed_content_mod
from client.quality import quality_reply
from client.secagg import secure_aggregation_mod, under_secure_aggregation
from client.site import SiteIdentity, load_site_dataset, site_from_node_config, torch_threads
from client.state import SiteState
from federation import keys
from federation.compression import encode_update
from federation.config import (
    ModelConfig,
    PrivacyConfig,
    TaskConfig,
    plan_hash,
    section_from_flat,
)
from federation.errors import SiteRefusal
from federation.ledger import BudgetExceeded, LedgerEntry, Mechanism
from federation.logs import context_logger, setup_logging
from federation.models import build_model, norm_state_keys, split_norm_state, weights_sha256
from federation.privacy import MechanismStep, PrivacyHistory, calibrate_noise, plan_round
from federation.tasks import get_task

__all__ = ["SiteRound", "app", "create_client_app"]

SiteResolver = Callable[[Context], SiteIdentity]


def _reply(
    msg: Message,
    site: str,
    *,
    refused: str = "",
    dataset: str = "",
    arrays: ArrayRecord | None = None,
    metrics: MetricRecord | None = None,
    entry: LedgerEntry | None = None,
) -> Message:
    status = ConfigRecord({keys.SITE: site, keys.REFUSED: refused, keys.DATASET: dataset})
    content = RecordDict({keys.STATUS: status})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    if metrics is not None:
        content[keys.METRICS] = metrics
    if entry is not None:
        content[keys.LEDGER] = ConfigRecord({keys.LEDGER_ENTRY: entry.to_json()})
    return Message(content=content, reply_to=msg)


class SiteRound:
    """One round's message at a site: its configuration, the received model, the site's data.

    Raises:
        SiteRefusal: The site cannot be identified or its data is unusable.
    """

    def __init__(self, msg: Message, context: Context, resolve: SiteResolver) -> None:
        setup_logging(site=True)
        self.flat: dict[str, Any] = dict(msg.content.config_records[keys.CONFIG])
        self.round = int(self.flat.get(keys.SERVER_ROUND, 0))
        self.run = str(self.flat.get(keys.RUN_NAME) or f"flwr-{msg.metadata.run_id}")
        self.site = resolve(context)
        self.log = context_logger(run=self.run, site=self.site.name, round=self.round)
        self.task_cfg: TaskConfig = section_from_flat(self.flat, "task", TaskConfig)
        if keys.PERSONALISE_EPOCHS in self.flat:  # the personalisation step after the run
            epochs = int(self.flat[keys.PERSONALISE_EPOCHS])
            self.task_cfg = dataclasses.replace(self.task_cfg, local_epochs=epochs)
        # Ditto: the site's personal model trains beside the global one, pulled towards it.
        self.ditto = float(self.flat.get(keys.DITTO_LAMBDA, 0.0))
        self.model_cfg: ModelConfig = section_from_flat(self.flat, "model", ModelConfig)
        self.privacy: PrivacyConfig = section_from_flat(self.flat, "privacy", PrivacyConfig)
        self.seed = int(self.flat.get(keys.SEED, 0))
        self.proximal_mu = float(self.flat.get(keys.PROXIMAL_MU, 0.0))
        # Reproducible shuffling without DP; under DP the task draws a secret seed.
        self.site_seed = self.seed + 1009 * self.round + zlib.crc32(self.site.name.encode())
        self.task = get_task(self.task_cfg.name)
        torch.set_num_threads(torch_threads(float(self.flat.get(keys.CPUS_PER_SITE, 1))))
        # rounds=0: an evaluation-only run (`medfed evaluate`); nothing trains.
        self.evaluation_only = int(self.flat.get(keys.ROUNDS, 1)) == 0
        self.prepared = load_site_dataset(
            self.site,
            self.task,
            self.task_cfg,
            seed=self.seed,
            all_data=bool(self.flat.get(keys.ALL_DATA, False)),
        )
        self.state = SiteState(self.site.state_dir, self.site.name)
        # The code this run executes here, as the SuperNode admitted it (client.apptrust).
        self.app = running_app(self.site.state_dir, msg.metadata.run_id)
        self.plan = plan_hash(self.flat, app=self.app)
        self.model = build_model(self.model_cfg, seed=self.seed)
        # FedBN: the norm layers are the site's own; the coordinator never sees them.
        self.local_keys = (
            norm_state_keys(self.model) if self.flat.get(keys.LOCAL_NORM, False) else frozenset()
        )
        self.received = msg.content.array_records[keys.ARRAYS]
        weights = self.received.to_torch_state_dict()
        # Cross-site validation sends another site's whole model: evaluated as it came.
        if self.local_keys and keys.CROSS_SITE_OWNER not in self.flat:
            own = self.state.local_layers(self.run)
            weights.update(own or split_norm_state(self.model.state_dict(), self.local_keys)[1])
        self.model.load_state_dict(weights)
        # The model as it starts this round at the site (received weights, own layers).
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # Secure aggregation the coordinator asked for; honoured only inside the protocol.
        self.secure_aggregation = str(self.flat.get(keys.SECURE_AGGREGATION, "") or "")
        # When the local training started (this clock) and how long it took; set by train.
        self.started_at: float | None = None
        self.train_seconds: float | None = None

    def train(self, privacy: PrivacyConfig) -> Any:
        """Train the model locally, timing it for `timing`."""
        self.started_at = time.time()
        started = time.perf_counter()
        outcome = self.task.train(
            self.model,
            self.prepared.data,
            self.task_cfg,
            privacy,
            seed=self.site_seed,
            proximal_mu=self.proximal_mu,
        )
        self.train_seconds = time.perf_counter() - started
        return outcome

    def train_personal(self, privacy: PrivacyConfig) -> Any:
        """Ditto: train the site's personal model, pulled towards this round's global one.

        It starts from the global model in the run's first round and is kept at the site.
        """
        personal = build_model(self.model_cfg, seed=self.seed)
        personal.load_state_dict(self.state.personal_model(self.run) or self.start)
        outcome = self.task.train(
            personal,
            self.prepared.data,
            self.task_cfg,
            privacy,
            seed=self.site_seed + 1,
            proximal_mu=self.ditto,
            proximal_to=self.start,
        )
        self.state.save_personal_model(self.run, personal.state_dict())
        return outcome

    def personal(self) -> nn.Module | None:
        """The site's personal model of this run, or None before it has one."""
        state = self.state.personal_model(self.run)
        if state is None:
            return None
        model = build_model(self.model_cfg, seed=self.seed)
        model.load_state_dict(state)
        return model

    def timing(self) -> dict[str, float]:
        """The local training's wall time, and when it started and finished (this clock).

        Raises:
            RuntimeError: Nothing was trained in this round yet.
        """
        if self.started_at is None or self.train_seconds is None:
            raise RuntimeError("timing() of a round at a site before its train()")
        return {
            keys.TRAIN_SECONDS: self.train_seconds,
            keys.TRAIN_STARTED: self.started_at,
            keys.TRAIN_FINISHED: self.started_at + self.train_seconds,
        }

    def reply(self, msg: Message, **content: Any) -> Message:
        """A reply naming this site and the dataset it used (noted for the site's console)."""
        SiteActivity(self.site.state_dir).record(
            run=self.run, round=self.round, action=msg.metadata.message_type
        )
        return _reply(msg, self.site.name, dataset=self.prepared.fingerprint, **content)

    def release(self) -> ArrayRecord:
        """The update the site sends, encoded; FedBN's norm layers are kept at the site."""
        shared, own = split_norm_state(self.model.state_dict(), self.local_keys)
        if self.local_keys:
            self.state.save_local_layers(self.run, own)
        encoding = str(self.flat.get(keys.UPDATE_ENCODING, "full"))
        return encode_update(ArrayRecord(shared), self.received, encoding=encoding)

    def plan_mechanism(self) -> Mechanism:
        """The DP mechanism this round will run: noise given, or calibrated to a target."""
        data, cfg, privacy = self.prepared.data, self.task_cfg, self.privacy
        sample_rate, steps = plan_round(data.num_train, cfg.batch_size, cfg.local_epochs)
        if self.ditto > 0:  # the personal model takes as many steps again on the same data
            steps *= 2
        noise = privacy.noise_multiplier
        if privacy.target_epsilon is not None:
            noise = calibrate_noise(
                target_epsilon=privacy.target_epsilon,
                delta=privacy.delta,
                sample_rate=sample_rate,
                steps=steps * int(self.flat.get(keys.ROUNDS, 1)),
                accountant=privacy.accountant,
            )
        return Mechanism(sample_rate, noise, privacy.max_grad_norm, steps, privacy.delta)


def _govern(job: SiteRound) -> None:
    """Train only on an approved plan within the site's policy limits.

    Raises:
        SiteRefusal: A limit is broken (named), or the plan is not approved (its hash
            named, and kept pending for the site to review).
    """
    if job.secure_aggregation and not under_secure_aggregation():
        raise SiteRefusal(
            job.site.name,
            f"the coordinator asks for secure aggregation {job.secure_aggregation!r} but "
            "sent a plain training message; the update would leave the site unmasked",
        )
    policy = job.state.governance()
    # The dataset's size, for the site console's estimate of what a plan would spend here.
    SiteActivity(job.site.state_dir).note_dataset(
        job.prepared.fingerprint, int(job.prepared.data.num_train)
    )
    dp_limits = policy.min_noise_multiplier is not None or policy.max_epsilon_per_run is not None
    planned = job.plan_mechanism() if dp_limits and job.privacy.mode == "dp-sgd" else None
    rounds = int(job.flat.get(keys.ROUNDS, 1))
    run_epsilon = None
    if planned is not None and policy.max_epsilon_per_run is not None:
        run_epsilon = PrivacyHistory(
            [MechanismStep(planned.noise_multiplier, planned.sample_rate, planned.steps * rounds)]
        ).epsilon(delta=job.privacy.delta, accountant=job.privacy.accountant)
    request = RunRequest(
        task=job.task_cfg.name,
        rounds=rounds,
        num_train=int(job.prepared.data.num_train),
        privacy_mode=job.privacy.mode,
        noise_multiplier=None if planned is None else planned.noise_multiplier,
        accountant=job.privacy.accountant,
        run_epsilon=run_epsilon,
    )
    if problems := policy.violations(request):
        raise SiteRefusal(job.site.name, f"site policy: {'; '.join(problems)}")
    if policy.require_plan_approval:
        _require_approved(job, job.flat, "training plan")


def _require_approved(job: SiteRound, flat: dict[str, Any], what: str) -> None:
    """Go on only if the plan of `flat` is approved; else keep it pending for review.

    Raises:
        SiteRefusal: The plan is not approved (its hash named).
    """
    plans = job.state.plans
    plan = plan_hash(flat, app=job.app)
    status = plans.status(plan)
    if status != "approved":
        plans.request(flat, run=job.run, app=job.app)
        raise SiteRefusal(
            job.site.name,
            f"{what} {plan} is not approved at this site ({status}); the site "
            f"reviews it with `medfed site plans show {plan} --state DIR` and approves "
            f"it with `medfed site plans approve {plan} --by NAME`",
        )


def _govern_evaluation(job: SiteRound) -> None:
    """Release metrics only on enough examples, and of an approved model if required.

    In an evaluation-only run the plan names the model and the digest of the weights
    received, so approving it approves those weights and no others.

    Raises:
        SiteRefusal: Too few examples, or the evaluation plan is not approved.
    """
    policy = job.state.governance()
    available = int(job.prepared.data.num_val)
    if policy.min_eval_examples is not None and available < policy.min_eval_examples:
        raise SiteRefusal(
            job.site.name,
            f"site policy: {available} evaluation examples, under the site's "
            f"min_eval_examples={policy.min_eval_examples}; no metrics are released",
        )
    if job.evaluation_only and policy.require_evaluation_approval:
        digest = weights_sha256(job.received.to_torch_state_dict())
        flat = {**job.flat, keys.WEIGHTS_SHA256: digest}
        _require_approved(job, flat, f"evaluation of model {job.model_cfg.init} ({digest[:12]})")


def _refuse(
    msg: Message, err: SiteRefusal, action: str, context: Context, resolve: SiteResolver
) -> Message:
    """Log and answer a refusal that names the site and the reason (and note it)."""
    config = msg.content.config_records[keys.CONFIG]
    run, server_round = config.get(keys.RUN_NAME), config.get(keys.SERVER_ROUND)
    context_logger(run=run, site=err.site, round=server_round).error(
        "refusing to %s: %s", action, err
    )
    try:
        state_dir = resolve(context).state_dir
    except (SiteRefusal, KeyError, ValueError):
        state_dir = None  # a site that cannot name itself has no state to note it in
    if state_dir is not None:
        SiteActivity(state_dir).record(
            run=str(run or ""), round=int(str(server_round or 0)), action=action, refused=str(err)
        )
    return _reply(msg, err.site, refused=str(err))


def _train_private(job: SiteRound, msg: Message, *, personalise: bool = False) -> Message:
    """Train under DP-SGD within the site's own budget, and sign the spend.

    With `personalise`, the trained model is the site's own: kept, compared with the
    global model on the held-out data, never sent.
    """
    replayed = _stored_reply(job, msg)
    if replayed is not None:
        return replayed
    planned = job.plan_mechanism()
    after, budget = job.state.check_budget(
        dataset=job.prepared.fingerprint, planned=planned, accountant=job.privacy.accountant
    )
    job.log.debug(
        "dataset %s: noise %.3f, %d steps at q=%.4f; epsilon after round %.3f of %g",
        job.prepared.fingerprint,
        planned.noise_multiplier,
        planned.steps,
        planned.sample_rate,
        after,
        budget,
    )
    privacy = dataclasses.replace(job.privacy, noise_multiplier=planned.noise_multiplier)
    before = job.task.evaluate(job.model, job.prepared.data) if personalise else None
    outcomes = [job.train(privacy)]
    if job.ditto > 0 and not personalise:
        outcomes.append(job.train_personal(privacy))
    entry, spent = _sign_spend(job, planned, [s for o in outcomes for s in o.spent], budget)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: outcomes[0].num_examples,
            keys.TRAIN_LOSS: outcomes[0].loss,
            **job.timing(),
            keys.EPSILON: entry.epsilon,
            keys.DP_STEPS: spent.steps,
            keys.SAMPLE_RATE: spent.sample_rate,
            keys.NOISE_MULTIPLIER: spent.noise_multiplier,
        }
    )
    arrays = None
    if before is not None:
        metrics.update(_keep_personal(job, before))
    else:
        arrays = job.release()
    job.state.store_reply(
        job.run,
        entry,
        {
            "state_dict": {} if arrays is None else arrays.to_torch_state_dict(),
            "metrics": dict(metrics),
        },
    )
    job.log.info(
        "%s: loss %.4f, epsilon %.3f (ledger entry %d)",
        "personalised" if personalise else "trained",
        outcomes[0].loss,
        entry.epsilon,
        entry.index,
    )
    return job.reply(msg, arrays=arrays, metrics=metrics, entry=entry)


def _stored_reply(job: SiteRound, msg: Message) -> Message | None:
    """The reply already signed for this round (a resent message spends nothing new)."""
    stored = job.state.stored_reply(job.run, job.round)
    if stored is None:
        return None
    entry, payload = stored
    job.log.warning("round already trained: answering with the stored reply, no new spend")
    return job.reply(
        msg,
        arrays=ArrayRecord(payload["state_dict"]) if payload["state_dict"] else None,
        metrics=MetricRecord(payload["metrics"]),
        entry=entry,
    )


def _sign_spend(
    job: SiteRound, planned: Mechanism, steps: list[Mechanism], budget: float
) -> tuple[LedgerEntry, Mechanism]:
    """Append what training spent (as planned, or nothing) to the site's signed ledger."""
    if {(s.noise_multiplier, s.sample_rate) for s in steps} != {
        (planned.noise_multiplier, planned.sample_rate)
    }:
        raise RuntimeError(f"training spent {steps}, not the planned {planned}")
    spent = dataclasses.replace(planned, steps=sum(s.steps for s in steps))
    try:
        entry = job.state.ledger.append(
            run=job.run,
            server_round=job.round,
            dataset=job.prepared.fingerprint,
            plan=job.plan,
            mechanism=spent,
            accountant=job.privacy.accountant,
            budget=budget,
            grad_sample_mode=job.privacy.grad_sample_mode,
            secure_aggregation=job.secure_aggregation,
        )
    except BudgetExceeded as err:  # another run spent this dataset meanwhile
        raise SiteRefusal(job.site.name, f"privacy budget: {err}") from err
    return entry, spent


def _keep_personal(job: SiteRound, before: Any) -> dict[str, float]:
    """Keep the fine-tuned model at the site; its metrics beside the global model's."""
    job.state.save_personal_model(job.run, job.model.state_dict())
    after = job.task.evaluate(job.model, job.prepared.data)
    shown = ", ".join(f"{k} {before.metrics[k]:.4f} -> {v:.4f}" for k, v in after.metrics.items())
    job.log.info("personal model kept at the site: %s (global -> personal)", shown)
    return {
        **{keys.GLOBAL_PREFIX + k: v for k, v in before.metrics.items()},
        **{keys.PERSONAL_PREFIX + k: v for k, v in after.metrics.items()},
    }


def _share_model(job: SiteRound, msg: Message) -> Message:
    """Reply with the site's own model (personal, else global with its own layers).

    Raises:
        SiteRefusal: The site's policy keeps its model at the site.
    """
    if not job.state.governance().allow_model_sharing:
        raise SiteRefusal(
            job.site.name,
            "site policy: allow_model_sharing is off, so the site's model stays at the site "
            "(`medfed site policy --allow-model-sharing` shares it)",
        )
    personal = job.personal()
    model = personal if personal is not None else job.model
    spent = [e for e in job.state.ledger.entries() if e.run == job.run]
    metrics = MetricRecord({keys.PERSONAL_PREFIX + "model": int(personal is not None)})
    if spent:  # the DP guarantee the model carries: this site's spend in the run
        metrics[keys.EPSILON] = spent[-1].epsilon
        metrics[keys.DELTA] = spent[-1].mechanism.delta
    job.state.plans.audit.append("model-shared", plan=job.plan, by="site policy", run=job.run)
    job.log.info("shared its %s model for cross-site validation", "personal" if personal else "own")
    return job.reply(msg, arrays=ArrayRecord(model.state_dict()), metrics=metrics)


def _train(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    """One round of training on the global model, under the run's privacy mode."""
    try:
        job = SiteRound(msg, context, resolve)
        _govern(job)
        if job.privacy.mode == "dp-sgd":
            return _train_private(job, msg)
    except SiteRefusal as err:
        return _refuse(msg, err, "train", context, resolve)
    outcome = job.train(job.privacy)
    if job.ditto > 0:
        job.train_personal(job.privacy)
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: outcome.num_examples, keys.TRAIN_LOSS: outcome.loss, **job.timing()}
    )
    if job.privacy.mode == "central":
        metrics[keys.UNIT_WEIGHT] = 1
        job.log.info("trained (client-level DP at the coordinator): loss %.4f", outcome.loss)
    else:
        job.log.info("trained without DP: loss %.4f", outcome.loss)
    return job.reply(msg, arrays=job.release(), metrics=metrics)


def _personalise(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    """Fine-tune the final global model into the site's own (DP within its budget)."""
    try:
        job = SiteRound(msg, context, resolve)
        _govern(job)
        if job.privacy.mode == "dp-sgd":
            return _train_private(job, msg, personalise=True)
    except SiteRefusal as err:
        return _refuse(msg, err, "personalise", context, resolve)
    before = job.task.evaluate(job.model, job.prepared.data)
    outcome = job.train(job.privacy)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: outcome.num_examples,
            keys.TRAIN_LOSS: outcome.loss,
            **_keep_personal(job, before),
        }
    )
    return job.reply(msg, metrics=metrics)


def _evaluate(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    """The sent model's metrics on the site's data (and, with Ditto, the site's own)."""
    try:
        job = SiteRound(msg, context, resolve)
        _govern_evaluation(job)
    except SiteRefusal as err:
        return _refuse(msg, err, "evaluate", context, resolve)
    outcome = job.task.evaluate(job.model, job.prepared.data)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
    job.log.info("evaluated: %s, loss %.4f", shown, outcome.loss)
    metrics = MetricRecord(
        {keys.NUM_EXAMPLES: outcome.num_examples, keys.EVAL_LOSS: outcome.loss, **outcome.metrics}
    )
    personal = job.personal() if job.ditto > 0 else None
    if personal is not None:  # Ditto: the site's own model beside the global one
        own = job.task.evaluate(personal, job.prepared.data)
        metrics.update({keys.PERSONAL_PREFIX + k: v for k, v in own.metrics.items()})
    if job.privacy.mode == "central":
        metrics[keys.UNIT_WEIGHT] = 1  # the coordinator averages sites uniformly
    return job.reply(msg, metrics=metrics)


def _site_model(msg: Message, context: Context, resolve: SiteResolver) -> Message:
    """The site's own model of the run, for cross-site validation, if its policy allows."""
    try:
        job = SiteRound(msg, context, resolve)
        return _share_model(job, msg)
    except SiteRefusal as err:
        return _refuse(msg, err, "share its model", context, resolve)


def create_client_app(
    resolve: SiteResolver = site_from_node_config,
    *,
    train_mods: Sequence[Mod] = (),
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """Build the site's ClientApp.

    Args:
        resolve: Maps the node's context to the site's identity and folders; in
            deployment the SuperNode's node config, in simulation `SimulatedSites`.
        train_mods: Extra Flower mods around training, outermost first.
        mods: Flower mods around every message (train, evaluate, query).
    """
    app = ClientApp(mods=[packed_content_mod, *mods])

    @app.train(mods=[secure_aggregation_mod, *train_mods, central_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        return _train(msg, context, resolve)

    @app.train(keys.PERSONALISE, mods=list(train_mods))
    def personalise(msg: Message, context: Context) -> Message:
        return _personalise(msg, context, resolve)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _evaluate(msg, context, resolve)

    @app.evaluate(keys.CROSS_SITE)  # another site's model, or the global one
    def cross_site(msg: Message, context: Context) -> Message:
        return _evaluate(msg, context, resolve)

    @app.query(keys.SITE_MODEL)
    def site_model(msg: Message, context: Context) -> Message:
        return _site_model(msg, context, resolve)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return quality_reply(msg, context, resolve)

    return app


app = create_client_app()
