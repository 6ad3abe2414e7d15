"""Fault and attack rehearsal: the hospital's ClientApp wrapped, for simulation only.

``--fail-prob`` and ``--inject SITE:KIND`` make simulated sites fail or misbehave, to
rehearse what the server does about it. None of this is in a hospital's code path:
``sim/run.py`` runs this ``app``, which wraps every handler of :data:`client.app.app`; the
wrapped handlers see the run configuration with every rehearsal setting cleared, and a
deployed ClientApp refuses any run that sets one (:func:`client.app.refuse_rehearsal`).

Kinds (what the site does in its training call):

``crash``     raises before training (the round goes on without it)
``slow``      replies only after the round's deadline (``--round-timeout``) has passed, so
              the server closes the round without it and its training stops at the deadline
``nan``       NaN and Inf in one weight tensor
``shape``     one weight tensor one row short
``missing``   one weight tensor left out
``inflate``   claims 100x its training examples (the weight of its update in FedAvg)
``signflip``  a scaled, sign-flipped update: ``w_g - 10 (w_local - w_g)``
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as hospital
from client.site import SiteError, site_seed
from common.config import RunConfig
from common.training import wire

app = ClientApp()


def _split(msg: Message) -> tuple[RunConfig, ConfigRecord]:
    """The run's configuration with its rehearsal settings, and the message's config record
    without them (what the hospital's handlers then see)."""
    rec = msg.content["config"]
    cfg = RunConfig.from_json(str(rec["run-config"]))
    asked = json.loads(str(rec["rehearsal"])) if "rehearsal" in rec else {}
    if "rehearsal" in rec:
        del rec["rehearsal"]
    return cfg.replace(**{k.replace("-", "_"): v for k, v in asked.items()}), rec


def _site_name(cfg: RunConfig, rec: ConfigRecord, context: Context) -> str:
    return hospital.site_data(cfg.without_rehearsal(), rec, context).name


def fails_at_random(cfg: RunConfig, site: str, server_round: int) -> bool:
    """``--fail-prob``: a reproducible coin flip per site and round."""
    if cfg.fail_prob <= 0:
        return False
    return bool(np.random.default_rng(site_seed(cfg, site, server_round, salt=99)).random() < cfg.fail_prob)


def misbehave(kind: str, local: dict[str, np.ndarray], global_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights a broken or malicious site sends instead of ``local`` (see the module doc)."""
    out = dict(local)
    name = next(k for k, v in out.items() if v.ndim >= 2)
    if kind == "nan":
        bad = out[name].copy()
        bad.flat[0] = np.nan
        bad.flat[-1] = np.inf
        out[name] = bad
    elif kind == "shape":
        out[name] = out[name][:-1]
    elif kind == "missing":
        del out[name]
    elif kind == "signflip":
        out = {k: (global_[k] - 10.0 * (v - global_[k])).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
               else v for k, v in out.items()}
    return out


@app.query()
def hello(msg: Message, context: Context) -> Message:
    _split(msg)
    return hospital.hello(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, rec = _split(msg)
    server_round = int(rec["server-round"])
    site = _site_name(cfg, rec, context)
    if fails_at_random(cfg, site, server_round):
        raise SiteError(f"[site {site}] simulated failure in round {server_round} (--fail-prob {cfg.fail_prob})")
    kind = cfg.injections().get(site)
    if kind == "crash":
        raise SiteError(f"[site {site}] injected crash in round {server_round} (--inject)")
    if kind == "slow":
        # Past the deadline for certain, whatever the machine's speed: the server has closed the
        # round without this site, and its training stops at its first step.
        time.sleep(max(0.0, float(rec["deadline"]) - time.time()) + 0.5)
        return hospital.train(msg, context)
    global_ = wire.decode(wire.views(msg.content["arrays"]), cfg.update_dtype) if kind == "signflip" else {}
    reply = hospital.train(msg, context)
    if kind is None or reply.has_error():
        return reply
    metrics = reply.content["metrics"]
    if kind == "inflate":
        metrics["num-examples"] = float(metrics["num-examples"]) * 100.0
        return reply
    local = wire.decode(wire.views(reply.content["arrays"]), cfg.update_dtype)
    encoded = wire.encode(misbehave(kind, local, global_), cfg.update_dtype)
    metrics["bytes-sent"] = float(wire.nbytes(encoded))
    reply.content["arrays"] = wire.to_record(encoded)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _split(msg)
    return hospital.evaluate(msg, context)


@app.evaluate("bnstats")
def bn_stats(msg: Message, context: Context) -> Message:
    _split(msg)
    return hospital.bn_stats(msg, context)
