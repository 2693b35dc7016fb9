"""The site's side of Flower's SecAgg+ (legacy API): masks its update before it leaves.

Under `federation.secure_aggregation=secaggplus` the coordinator runs Flower's
`SecAggPlusWorkflow`, which speaks the legacy FitIns/FitRes records in four stages. The
`secure_aggregation_mod` hands those messages to Flower's `secaggplus_mod` and, in the
stage that trains, adapts the legacy FitIns into the medfed train message, so the same
training, DP-SGD budget check, governance and ledger code runs; the trained weights then
leave the site only quantised and masked. The site's status, metrics and signed ledger
entry travel in the FitRes metrics (they are released in the clear, as on the plain path).

A site that refuses (budget, policy, unapproved plan) or fails raises, so the workflow
treats it as dropped out and unmasks the sum of the others from their key shares.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextvars import ContextVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from federation import keys
from federation.config import ModelConfig, section_from_flat
from federation.errors import SiteRefusal
from federation.models import build_model

__all__ = [
    "SECAGGPLUS",
    "secure_aggregation_mod",
    "shared_keys",
    "status_metrics",
    "under_secure_aggregation",
]

SECAGGPLUS = "secaggplus"
_ACTIVE: ContextVar[bool] = ContextVar("medfed_secure_aggregation", default=False)
_P = keys.SECAGG_STATUS_PREFIX


def under_secure_aggregation() -> bool:
    """True while training runs inside this site's SecAgg+ protocol."""
    return _ACTIVE.get()


def shared_keys(model_cfg: ModelConfig) -> list[str]:
    """The order in which the model's weights travel as legacy `Parameters`."""
    return list(build_model(model_cfg).state_dict().keys())


def status_metrics(site: str, dataset: str, entry: str) -> dict[str, str]:
    """The site's status as FitRes metrics (strings), beside its numeric metrics."""
    return {f"{_P}{keys.SITE}": site, f"{_P}{keys.DATASET}": dataset, f"{_P}{keys.LEDGER}": entry}


def _train_legacy(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run medfed training on a SecAgg+ FitIns and answer with a (to be masked) FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    flat = json.loads(str(fitins.config[keys.SITE_CONFIG_JSON]))
    names = shared_keys(section_from_flat(flat, "model", ModelConfig))
    weights = parameters_to_ndarrays(fitins.parameters)
    if len(weights) != len(names):
        raise ValueError(
            f"the coordinator sent {len(weights)} weight arrays, the model has {len(names)}"
        )
    msg.content[keys.CONFIG] = ConfigRecord(flat)
    msg.content[keys.ARRAYS] = ArrayRecord(
        OrderedDict((n, Array(w)) for n, w in zip(names, weights, strict=True))
    )
    token = _ACTIVE.set(True)
    try:
        reply = call_next(msg, context)
    finally:
        _ACTIVE.reset(token)
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")
    status = reply.content.config_records[keys.STATUS]
    site = str(status[keys.SITE])
    if refused := str(status[keys.REFUSED]):
        # Dropping out: the workflow removes this site's masks from its neighbours' shares.
        raise SiteRefusal(site, refused)
    arrays = reply.content.array_records[keys.ARRAYS]
    metrics = dict(reply.content.metric_records[keys.METRICS])
    ledger = reply.content.config_records.get(keys.LEDGER)
    entry = str(ledger[keys.LEDGER_ENTRY]) if ledger is not None else ""
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(
            [np.asarray(arrays[name].numpy(), dtype=np.float64) for name in names]
        ),
        num_examples=int(metrics[keys.NUM_EXAMPLES]),  # type: ignore[arg-type]
        metrics={**metrics, **status_metrics(site, str(status[keys.DATASET]), entry)},  # type: ignore[dict-item]
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ messages through Flower's `secaggplus_mod`; others pass unchanged."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _train_legacy(m, c, call_next))
