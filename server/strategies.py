"""The strategies by name: Flower's own, built from the run configuration, never copied.

:data:`BUILDERS` holds one builder per name of :data:`common.config.STRATEGY_SETTINGS` (the
registry the CLI, the config check and the docs read; a test keeps the two in step). The
subclasses here change only how a mean is taken: FedAvg's and FedProx's in place
(:func:`weighted_average`, byte-identical to Flower's), and the server optimisers' with
BatchNorm statistics averaged rather than stepped. :func:`export_state` and
:func:`import_state` carry a strategy's state (FedAdam's moments, FedAvgM's momentum)
through checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunConfig
from common.training import wire

log = logging.getLogger(__name__)


def nan_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of each metric, skipping sites where it is undefined (NaN).

    (A site with no positive in its validation split has no AUC; one such site must not
    turn the federation's AUC into NaN.)
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        m = next(iter(rec.metric_records.values()))
        w = float(m[weight_key])  # type: ignore[arg-type]
        for k, v in m.items():
            if k == weight_key or isinstance(v, list) or not math.isfinite(float(v)):
                continue
            sums[k] = sums.get(k, 0.0) + float(v) * w
            weights[k] = weights.get(k, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})


def weighted_average(records: list[RecordDict], weight_key: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (same float32 arithmetic, same result) reading
    each reply's weights in place instead of copying ~94 MB out of every message first."""
    weights = [float(wire.scalar(next(iter(r.metric_records.values()))[weight_key])) for r in records]
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for record, w in zip(records, weights, strict=True):
        for arrays in record.array_records.values():
            for k, v in arrays.items():
                part = wire.view(v) * (w / total)
                if k in out:
                    out[k] += part
                else:
                    out[k] = part
    return wire.to_record(out)


class _InPlaceMean:
    """FedAvg's (and FedProx's) aggregate_train with :func:`weighted_average`."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        return (weighted_average(contents, self.weighted_by_key),  # type: ignore[attr-defined]
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))  # type: ignore[attr-defined]


class _FedAvg(_InPlaceMean, FedAvg):
    pass


class _FedProx(_InPlaceMean, FedProx):
    pass


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class _AveragedStatistics:
    """A server optimiser (FedAvgM, FedAdam, FedYogi) steps the weights; BatchNorm's running
    statistics are estimates, not weights, and stay the sites' plain weighted average:
    momentum or an adaptive step on a running variance can take it below zero (seen with
    FedAvg under a sign-flipping attacker: a negative variance makes the model output NaN)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = [RecordDict({**{k: ArrayRecord({n: a for n, a in arr.items() if n.endswith(STATISTICS)})
                                for k, arr in m.content.array_records.items()},
                             **dict(m.content.metric_records)}) for m in replies if not m.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is None or not stats or not any(len(a) for r in stats for a in r.array_records.values()):
            return arrays, metrics
        mean = weighted_average(stats, self.weighted_by_key)  # type: ignore[attr-defined]
        for k, v in mean.items():
            arrays[k] = v
        current = getattr(self, "current_arrays", None)
        if isinstance(current, ArrayRecord):  # FedAvgM steps from its own copy of the global model
            for k, v in mean.items():
                current[k] = v
        return arrays, metrics


class _FedAvgM(_AveragedStatistics, FedAvgM):
    pass


class _FedAdam(_AveragedStatistics, FedAdam):
    pass


class _FedYogi(_AveragedStatistics, FedYogi):
    pass


# Flower's central-DP accountant accepts only FedAvg's own aggregate_train (it checks the
# class), so under --dp central the mean is Flower's, not our in-place one (same numbers).
def _central(cfg: RunConfig) -> bool:
    return cfg.dp == "central"


BUILDERS: dict[str, Callable[[RunConfig, dict[str, Any]], Strategy]] = {
    "fedavg": lambda cfg, kw: (FedAvg if _central(cfg) else _FedAvg)(**kw),
    "fedprox": lambda cfg, kw: (FedProx if _central(cfg) else _FedProx)(**kw, proximal_mu=cfg.proximal_mu),
    "fedavgm": lambda cfg, kw: _FedAvgM(**kw, server_learning_rate=cfg.server_lr_value(),
                                        server_momentum=cfg.server_momentum),
    "fedadam": lambda cfg, kw: _FedAdam(**kw, eta=cfg.server_lr_value(), eta_l=cfg.lr),
    "fedyogi": lambda cfg, kw: _FedYogi(**kw, eta=cfg.server_lr_value(), eta_l=cfg.lr),
    "fedmedian": lambda cfg, kw: FedMedian(**kw),
    "fedtrimmedavg": lambda cfg, kw: FedTrimmedAvg(**kw, beta=cfg.trim_beta),
    "krum": lambda cfg, kw: Krum(**kw, num_malicious_nodes=cfg.krum_malicious),
}


def make_strategy(cfg: RunConfig, n_sites: int) -> Strategy:
    """The Flower strategy named by ``cfg.strategy`` (optionally inside central DP)."""
    # Rounds go ahead with whoever is connected, down to the quorum; the handshake has
    # already waited for every site once, and the Guard names the ones that drop out.
    common: dict[str, Any]  # keyword arguments of differing types, for every strategy
    # The Guard waits for the sites (down to the quorum) and samples them (--fraction-fit,
    # --fraction-evaluate) with its own generator; the strategy takes every node it is shown.
    common = dict(fraction_train=1.0, fraction_evaluate=1.0,
                  min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
                  train_metrics_aggr_fn=nan_weighted_mean, evaluate_metrics_aggr_fn=nan_weighted_mean,
                  # client-level DP bounds each site's influence only with equal weights
                  weighted_by_key="unit-weight" if cfg.dp == "central" else "num-examples")
    if cfg.strategy not in BUILDERS:  # RunConfig validates names; this guards direct callers
        raise ValueError(f"strategy {cfg.strategy!r}: choose one of {', '.join(BUILDERS)}")
    strategy = BUILDERS[cfg.strategy](cfg, common)
    if cfg.dp == "central":
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, cfg.dp_noise, cfg.dp_clip, n_sites,
                                                              accountant=central_accountant(cfg, n_sites))
    return strategy


def central_accountant(cfg: RunConfig, n_sites: int):
    """Flower's RDP accountant for client-level DP: every site takes part in every round
    (no sampling amplification), updates are averaged with equal weights."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    if cfg.fraction_fit != 1.0:
        raise ValueError("--dp central accounts rounds where every site takes part; use --fraction-fit 1")
    conf = PrivacyConfig(target_delta=cfg.dp_delta or 1.0 / (10 * n_sites), population_size=n_sites,
                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                         sampling_method=SamplingMethod.NO_AMPLIFICATION,
                         max_epsilon=cfg.dp_epsilon or None)
    return RdpAccountant(conf)


# ---- strategy state, for checkpoints (FedAdam's moments, FedAvgM's momentum, ...) ----
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


def _to_saveable(value):
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: torch.from_numpy(v.numpy().copy()) for k, v in value.items()}}
    if isinstance(value, dict):
        return {"__dict__": {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}}
    if isinstance(value, list):
        return {"__list__": [torch.from_numpy(np.asarray(v).copy()) for v in value]}
    return None


def _from_saveable(value):
    if "__arrayrecord__" in value:
        return ArrayRecord({k: Array(v.numpy()) for k, v in value["__arrayrecord__"].items()})
    if "__dict__" in value:
        return {k: v.numpy() for k, v in value["__dict__"].items()}
    return [v.numpy() for v in value["__list__"]]


def export_state(strategy: Strategy) -> dict:
    """The mutable state of a strategy chain (wrappers included), as tensors for torch.save."""
    out: dict = {}
    depth = 0
    s: object = strategy
    while s is not None:
        for name in STATE_ATTRS:
            value = getattr(s, name, None)
            if value is not None and (saved := _to_saveable(value)) is not None:
                out[f"{depth}.{name}"] = saved
        accountant = getattr(s, "accountant", None)
        if accountant is not None and hasattr(accountant, "state_dict"):
            out[f"{depth}.accountant"] = json.dumps(accountant.state_dict())
        s = getattr(s, "strategy", None) or getattr(s, "inner", None)
        depth += 1
    return out


def import_state(strategy: Strategy, state: dict) -> None:
    depth = 0
    s: object = strategy
    while s is not None:
        for name in STATE_ATTRS:
            key = f"{depth}.{name}"
            if key in state:
                setattr(s, name, _from_saveable(state[key]))
        if f"{depth}.accountant" in state and getattr(s, "accountant", None) is not None:
            s.accountant.load_state_dict(json.loads(state[f"{depth}.accountant"]))  # type: ignore[attr-defined]
        s = getattr(s, "strategy", None) or getattr(s, "inner", None)
        depth += 1
