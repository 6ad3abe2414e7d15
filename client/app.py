"""The ClientApp: a thin Flower adapter around :mod:`client.site`.

Message in -> (config, weights, site data) -> ``common`` -> message out. The server
sends its whole run configuration in every message (``config["run-config"]``), so a
site never trains with settings the server did not log.

Where the site's data comes from:
- simulation: ``node_config["partition-id"]`` picks the site in the server's site plan
  (``config["plan-path"]``) and the shared patch cache (``config["cache-path"]``);
- deployment: ``node_config["data-path"]`` is this hospital's own LUNA16-format folder
  (see :mod:`client.deploy`); nothing else is read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import cast

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a hospital's node does not phone home

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from common import __version__  # noqa: E402
from common.config import PINNABLE, RunConfig  # noqa: E402
from common.training import model as model_lib  # noqa: E402
from common.training import wire  # noqa: E402
from common.training.memory import release_freed_memory  # noqa: E402

from .site import SiteData, SiteError, evaluate_site, simulated_site, site_bn_statistics, train_site  # noqa: E402

log = logging.getLogger(__name__)
app = ClientApp()


def _config(msg: Message, context: Context) -> tuple[RunConfig, ConfigRecord]:
    """The run configuration the server sent, checked before this site does anything with it.

    In deployment this code arrives in the server's app bundle, so the site's own release is
    the one its SuperNode was started with (``luna-fl-version`` in its node config, set by
    docker/entrypoint.py from the hospital's image); without it, this code's own.
    """
    rec = cast(ConfigRecord, msg.content["config"])  # RecordDict items are typed as any kind of record
    theirs = str(rec.get("luna-fl-version", "")) or "an unknown version (older than 0.1.0)"
    ours = str(context.node_config.get("luna-fl-version", "")) or __version__
    if theirs != ours:
        raise SiteError(f"the server runs luna-fl {theirs}, this site runs luna-fl {ours}: "
                        "both sides must run the same release")
    try:
        cfg = RunConfig.from_json(str(rec["run-config"]))
    except ValueError as exc:
        raise SiteError(f"the server's run configuration is not valid at this site: {exc}") from None
    asked = json.loads(str(rec["rehearsal"])) if "rehearsal" in rec else {}
    refuse_rehearsal({**asked, **cfg.rehearsal()})
    return cfg, rec


def refuse_rehearsal(asked: dict) -> None:
    """A hospital never rehearses faults: a run that sets a simulation-only setting is refused."""
    if asked:
        raise SiteError("this site refuses the run: it sets simulation-only fault-rehearsal setting(s) "
                        + ", ".join(f"{k}={v!r}" for k, v in asked.items())
                        + "; a hospital never fails or misbehaves on request (sim/faults.py rehearses that "
                        "in simulation only)")


def site_data(cfg: RunConfig, rec: ConfigRecord, context: Context) -> SiteData:
    node = context.node_config
    if "data-path" in node:
        from .deploy import deployed_site

        return deployed_site(cfg, node)
    if "partition-id" not in node:
        raise SiteError("this node has neither a data-path (deployment) nor a partition-id (simulation) "
                        "in its node config")
    return simulated_site(cfg, int(node["partition-id"]), str(rec["plan-path"]), str(rec["cache-path"]),
                          str(rec.get("state-path", "")))


def _arrays_in(msg: Message, cfg: RunConfig) -> dict:
    return wire.decode(wire.views(cast(ArrayRecord, msg.content["arrays"])), cfg.update_dtype)


def _validation(cfg: RunConfig, data: SiteData, arrays: dict, server_round: int) -> dict:
    """Round ``server_round``'s global model's metrics on this site's validation patches."""
    metrics = evaluate_site(cfg, data, arrays, server_round)
    metrics["num-examples"] = float(len(data.val))
    return metrics


def _reply(msg: Message, content: dict) -> Message:
    return Message(RecordDict(content), reply_to=msg)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """The handshake: who this site is and what it can train, checked before any round."""
    cfg, rec = _config(msg, context)
    data = site_data(cfg, rec, context)
    model = model_lib.build_model(cfg.arch, cfg.norm)
    node = context.node_config
    # A site may pin settings its hospital requires; the server refuses to start on a mismatch.
    pinned = {k: str(node[k]) for k in PINNABLE if k in node}
    info = ConfigRecord({
        "site": data.name,
        "skipped-scans": json.dumps(data.skipped),
        "model-signature": model_lib.signature(model),
        "patch-size": int(data.cache.spec.size),
        "pinned": ",".join(f"{k}={v}" for k, v in sorted(pinned.items())),
    })
    metrics = MetricRecord({"train-size": data.train_size(cfg), "val-size": len(data.val),
                            "train-positives": int(data.cache.label[data.train].sum())})
    return _reply(msg, {"site": info, "metrics": metrics})


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    cfg, rec = _config(msg, context)
    server_round = int(wire.scalar(rec["server-round"]))
    data = site_data(cfg, rec, context)
    deadline = float(wire.scalar(rec["deadline"])) if "deadline" in rec else None
    incoming = _arrays_in(msg, cfg)
    content, val_seconds = {}, 0.0
    if int(wire.scalar(rec.get("evaluate-first", 0))):  # --site-eval fused: the previous round's global model
        t_val = time.perf_counter()
        content["val"] = ConfigRecord(_validation(cfg, data, incoming, server_round - 1))
        val_seconds = time.perf_counter() - t_val
    arrays, metrics = train_site(cfg, data, incoming, server_round, deadline=deadline)
    metrics["val-seconds"] = val_seconds
    metrics["num-examples"] = float(data.train_size(cfg))
    metrics["unit-weight"] = 1.0  # equal weights, for client-level (central) DP accounting
    encoded = wire.encode(arrays, cfg.update_dtype)
    metrics["bytes-sent"] = float(wire.nbytes(encoded))
    record = wire.to_record(encoded)
    del arrays, encoded
    release_freed_memory()  # an idle site should not hold its training peak
    metrics["started-at"] = started  # with finished-at: where a round's time goes (sim/bench.py)
    metrics["finished-at"] = time.time()
    # Flower's MetricRecord takes a dict (invariant in its values), not a Mapping
    return _reply(msg, {"arrays": record, "metrics": MetricRecord(cast(dict[str, MetricRecordValues], metrics)),
                        "site": ConfigRecord({"site": data.name}), **content})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, rec = _config(msg, context)
    data = site_data(cfg, rec, context)
    metrics = _validation(cfg, data, _arrays_in(msg, cfg), int(wire.scalar(rec.get("server-round", 0))))
    metrics["unit-weight"] = 1.0
    release_freed_memory()
    return _reply(msg, {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": data.name})})


@app.evaluate("bnstats")
def bn_stats(msg: Message, context: Context) -> Message:
    """``--bn-stats sites``: the final global model's BatchNorm statistics on this site's
    training patches, with the number of patches as their weight."""
    cfg, rec = _config(msg, context)
    data = site_data(cfg, rec, context)
    stats = site_bn_statistics(cfg, data, _arrays_in(msg, cfg))
    release_freed_memory()
    return _reply(msg, {"stats": wire.to_record(stats),
                        "metrics": MetricRecord({"num-examples": float(len(data.train))}),
                        "site": ConfigRecord({"site": data.name})})
