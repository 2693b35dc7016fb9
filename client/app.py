"""The site agent's Flower ClientApp: local (DP) training and evaluation on own DICOM.

Only weights, aggregate metrics and the privacy spend leave the site; a site that
cannot train answers with a refusal naming itself and the reason instead of crashing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import SiteIdentity, load_site_dataset, site_from_node_config
from federation import keys
from federation.config import ModelConfig, PrivacyConfig, TaskConfig, section_from_flat
from federation.errors import SiteDataError
from federation.logs import context_logger, setup_logging
from federation.models import build_model
from federation.privacy import PrivacyHistory
from federation.tasks import get_task

__all__ = ["app", "create_client_app"]

SiteResolver = Callable[[Context], SiteIdentity]


def _reply(
    msg: Message,
    site: str,
    *,
    refused: str = "",
    arrays: ArrayRecord | None = None,
    metrics: MetricRecord | None = None,
) -> Message:
    content = RecordDict({keys.STATUS: ConfigRecord({keys.SITE: site, keys.REFUSED: refused})})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    if metrics is not None:
        content[keys.METRICS] = metrics
    return Message(content=content, reply_to=msg)


class _Job:
    """One message's work at a site: configuration, model and data.

    Raises:
        SiteDataError: The site cannot be identified or its data is unusable.
    """

    def __init__(self, msg: Message, context: Context, resolve: SiteResolver) -> None:
        setup_logging()
        flat: dict[str, Any] = dict(msg.content.config_records[keys.CONFIG])
        self.round = int(flat.get(keys.SERVER_ROUND, 0))
        self.run = flat.get(keys.RUN_NAME)
        self.site = resolve(context)
        self.log = context_logger(run=self.run, site=self.site.name, round=self.round)
        self.task_cfg: TaskConfig = section_from_flat(flat, "task", TaskConfig)
        self.model_cfg: ModelConfig = section_from_flat(flat, "model", ModelConfig)
        self.privacy: PrivacyConfig = section_from_flat(flat, "privacy", PrivacyConfig)
        self.seed = int(flat.get(keys.SEED, 0))
        self.task = get_task(self.task_cfg.name)
        torch.set_num_threads(max(1, int(flat.get(keys.CPUS_PER_SITE, 1))))
        self.data = load_site_dataset(self.site, self.task, self.task_cfg, seed=self.seed)
        self.model = build_model(self.model_cfg)
        self.model.load_state_dict(msg.content.array_records[keys.ARRAYS].to_torch_state_dict())


def _refuse(msg: Message, err: SiteDataError, action: str) -> Message:
    """Log and answer a refusal that names the site, the path and the reason."""
    config = msg.content.config_records[keys.CONFIG]
    log = context_logger(
        run=config.get(keys.RUN_NAME), site=err.site, round=config.get(keys.SERVER_ROUND)
    )
    log.error("refusing to %s: %s", action, err)
    return _reply(msg, err.site, refused=str(err))


def create_client_app(resolve: SiteResolver = site_from_node_config) -> ClientApp:
    """Build the site's ClientApp.

    Args:
        resolve: Maps the node's context to the site's identity and data path; in
            deployment the SuperNode's node config, in simulation `SimulatedSites`.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            job = _Job(msg, context, resolve)
        except SiteDataError as err:
            return _refuse(msg, err, "train")
        history = PrivacyHistory()
        if keys.STATE_PRIVACY in context.state:
            history = PrivacyHistory.from_lists(
                dict(context.state.config_records[keys.STATE_PRIVACY])  # type: ignore[arg-type]
            )
        site_seed = job.seed + 1009 * job.round + zlib.crc32(job.site.name.encode())
        outcome = job.task.train(job.model, job.data, job.task_cfg, job.privacy, seed=site_seed)
        history.extend(outcome.spent)
        metrics = MetricRecord(
            {keys.NUM_EXAMPLES: outcome.num_examples, keys.TRAIN_LOSS: outcome.loss}
        )
        if job.privacy.mode != "none":
            context.state[keys.STATE_PRIVACY] = ConfigRecord(dict(history.to_lists()))
            eps = history.epsilon(delta=job.privacy.delta, accountant=job.privacy.accountant)
            metrics[keys.EPSILON] = eps
            metrics[keys.DP_STEPS] = sum(s.steps for s in outcome.spent)
            metrics[keys.SAMPLE_RATE] = outcome.spent[-1].sample_rate if outcome.spent else 0.0
            job.log.info("trained: loss %.4f, epsilon %.3f", outcome.loss, eps)
        else:
            job.log.info("trained without DP: loss %.4f", outcome.loss)
        return _reply(
            msg, job.site.name, arrays=ArrayRecord(job.model.state_dict()), metrics=metrics
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            job = _Job(msg, context, resolve)
        except SiteDataError as err:
            return _refuse(msg, err, "evaluate")
        outcome = job.task.evaluate(job.model, job.data)
        job.log.info("evaluated: dice %.4f, loss %.4f", outcome.dice, outcome.loss)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: outcome.num_examples,
                keys.EVAL_LOSS: outcome.loss,
                keys.DICE: outcome.dice,
            }
        )
        return _reply(msg, job.site.name, metrics=metrics)

    return app


app = create_client_app()
