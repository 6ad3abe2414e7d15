"""The server's side of a federated run, shared by ``sim/run.py`` and ``flwr run``.

``setup`` makes (or reopens, for ``--resume``) the results folder and prepares the data;
``federate`` does the handshake with every site, then hands the rounds to the chosen
Flower strategy (inside :class:`server.guard.Guard`) with an ``evaluate_fn`` that
tests the global model, checkpoints it and reports progress after every round.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import __version__
from common.config import RunConfig
from common.data.loaders import epoch_size
from common.data.partition import format_summary, save_summary, summary_rows
from common.data.prepare import Prepared, prepare
from common.evaluation.holdout import TestSplit
from common.evaluation.metrics import COUNT_KEYS, operating_point_fields, sum_counts
from common.training import model as model_lib
from common.training import wire
from common.training.memory import release_freed_memory
from experiment.results import RunDir, starting_model
from experiment.tracker import RunTracker

from .guard import Guard, quorum, short_reason, wait_for_nodes
from .strategies import export_state, import_state, make_strategy, weighted_average

log = logging.getLogger("luna_fl")


class HandshakeError(RuntimeError):
    """Sites and server disagree on what they are about to train; nothing was trained."""


@dataclass
class ServerRun:
    cfg: RunConfig
    run: RunDir
    prepared: Prepared | None
    checkpoint: dict | None = None
    slots: int = 0  # sites training at once (simulation); 0 = one per site

    @property
    def start_round(self) -> int:
        return int(self.checkpoint["round"]) if self.checkpoint else 0


def setup(cfg: RunConfig, resume: str = "", progress: bool = True) -> ServerRun:
    """Create or reopen the results folder, prepare data and sites, save the plan."""
    checkpoint = None
    if resume:
        run, saved = RunDir.open_for_resume(resume)
        RunDir.check_same(saved, cfg)
        checkpoint = run.latest_checkpoint()
        done = int(checkpoint["round"]) if checkpoint else 0
        run.truncate_after(done)
        if checkpoint and checkpoint.get("row") and done not in {r["round"] for r in run.rounds()}:
            run.round_row(checkpoint["row"])  # the process died between checkpoint and row
        log.info("resuming %s after round %d of %d", run.path, done, cfg.rounds)
    else:
        run = RunDir.create(cfg)
    # In deployment the server needs data only for its own held-out test set.
    with_data = cfg.federation == "simulation" or bool(cfg.data)
    prepared = prepare(cfg, progress=progress) if with_data else None
    extra: dict[str, Any] = {}
    if prepared is not None:
        prepared.plan.save(run.path / "sites.json")
        rows = summary_rows(prepared.plan, prepared.infos)
        save_summary(rows, run.path / "site_summary.csv")
        log.info("sites (%s partition, whole patients; test split held out):\n%s",
                 cfg.partition, format_summary(rows))
        extra = {"data_root": str(prepared.root), "cache": str(prepared.cache.path),
                 "cache_meta": {k: prepared.cache.meta[k] for k in ("key", "rows_valid", "skipped_scans")}}
    run.write_config(cfg, resumed_from_round=checkpoint["round"] if checkpoint else None, **extra)
    return ServerRun(cfg, run, prepared, checkpoint)


def base_config(sr: ServerRun) -> ConfigRecord:
    """What every message to a site carries: the settings a site receives
    (:meth:`RunConfig.for_site`) and, in simulation, where the shared cache and the site
    plan are (and any fault rehearsal, which only sim/faults.py reads)."""
    rec: dict[str, Any] = {"run-config": sr.cfg.for_site(), "luna-fl-version": __version__}
    if sr.cfg.rehearsal():  # for sim/faults.py; a deployed hospital refuses the run, naming the setting
        rec["rehearsal"] = json.dumps(sr.cfg.rehearsal())
    if sr.prepared is not None and sr.cfg.federation == "simulation":
        rec["plan-path"] = str(sr.run.path / "sites.json")
        rec["cache-path"] = str(sr.prepared.cache.path)
        rec["state-path"] = str(sr.run.path / "site_state")
    return ConfigRecord(rec)


def handshake(grid: Grid, sr: ServerRun, server_signature: str
              ) -> tuple[dict[int, str], dict[str, dict], dict[int, str]]:
    """Ask every site who it is and what it trains.

    A disagreement (model, input size, a setting a site requires) stops the run before
    any training, naming both values. A site that cannot take part at all (its data
    cannot be read, its node config is incomplete) is named and left out, and the
    federation goes on if enough sites remain (``--min-fit-clients``). Returns
    ``(node -> site, site -> info, excluded node -> reason)``.
    """
    cfg = sr.cfg
    nodes = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    msgs = [Message(RecordDict({"config": base_config(sr)}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.node_timeout))
    node_sites: dict[int, str] = {}
    info: dict[str, dict] = {}
    excluded: dict[int, str] = {}
    problems = []
    for r in replies:
        node = r.metadata.src_node_id
        if r.has_error():
            excluded[node] = short_reason(cast(str, r.error.reason), 600)  # Flower types it str | None
            log.warning("node %d cannot take part and is left out of this run: %s", node, excluded[node])
            continue
        rec = cast(ConfigRecord, r.content["site"])  # the site's reply: a ConfigRecord and a MetricRecord
        site = str(rec["site"])
        if site in info:
            problems.append(f"two nodes call themselves {site}")
        node_sites[node] = site
        metrics = {k: float(wire.scalar(v)) for k, v in cast(MetricRecord, r.content["metrics"]).items()}
        skipped = json.loads(str(rec.get("skipped-scans", "{}")))
        info[site] = {"node": node, **metrics, "skipped_scans": skipped}
        for uid, why in sorted(skipped.items()):
            log.warning("[site %s] skipped scan %s: %s", site, uid, why)
        if rec["model-signature"] != server_signature:
            problems.append(f"{site} builds a different model (signature {rec['model-signature']!s}) than the "
                            f"server (signature {server_signature}, --arch {cfg.arch} --norm {cfg.norm})")
        if int(wire.scalar(rec["patch-size"])) != cfg.image_size:
            problems.append(f"{site} has patches of {rec['patch-size']!s} px, the server uses --image-size "
                            f"{cfg.image_size}")
        for pin in filter(None, str(rec["pinned"]).split(",")):
            key, value = pin.split("=", 1)
            ours = str(cfg.to_flat()[key])
            if value != ours:
                problems.append(f"{site} requires {key}={value}, the server runs {key}={ours}")
    if len(replies) < len(nodes):
        problems.append(f"{len(nodes) - len(replies)} node(s) did not answer within --node-timeout")
    if problems:
        raise HandshakeError("sites and server disagree; nothing was trained:\n  " + "\n  ".join(problems))
    need = quorum(cfg, cfg.clients)
    if len(node_sites) < need:
        raise HandshakeError(f"only {len(node_sites)} of {len(nodes)} sites can take part, at least {need} needed "
                             "(--min-fit-clients):\n  " + "\n  ".join(f"node {n}: {why}"
                                                                      for n, why in excluded.items()))
    for site, d in sorted(info.items()):
        log.info("[site %s] joined (node %d): %d training examples per epoch, %d validation candidates",
                 site, d["node"], d["train-size"], d["val-size"])
    return node_sites, info, excluded


def site_limits(sr: ServerRun, info: dict[str, dict]) -> dict[str, int]:
    """The most examples each site may claim: from the server's own plan where it has one
    (simulation), else what the site declared at the handshake (fixed for the run)."""
    limits = {site: int(d["train-size"]) for site, d in info.items()}
    if sr.prepared is not None:
        cache = sr.prepared.cache
        for s in sr.prepared.plan.sites:
            if s.name in limits:
                limits[s.name] = epoch_size(cache, cache.rows_of(s.train), sr.cfg.neg_ratio)
    return limits


def federate(grid: Grid, sr: ServerRun) -> dict[str, Any]:
    """Run the remaining rounds; returns the run's summary."""
    cfg, run = sr.cfg, sr.run
    device = model_lib.resolve_device(cfg.device)
    model = starting_model(cfg, sr.checkpoint).to(device)
    reference = model_lib.get_arrays(model)
    node_sites, info, excluded = handshake(grid, sr, model_lib.signature(reference))
    run.write_json("handshake.json", {**info, **({"excluded_nodes": excluded} if excluded else {})})

    strategy = make_strategy(cfg, len(node_sites))
    if sr.checkpoint and sr.checkpoint.get("strategy"):
        import_state(strategy, sr.checkpoint["strategy"])
    tester = TestSplit.from_prepared(sr.prepared) if sr.prepared is not None else None
    tracker = RunTracker(cfg, run, tester, device, sr.start_round)
    guard = Guard(strategy, cfg, reference, node_sites, site_limits(sr, info), round_offset=sr.start_round,
                  on_event=tracker.event, excluded=set(excluded))
    slots = sr.slots or len(node_sites)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + sr.start_round
        if server_round == 0 and sr.start_round > 0:
            return None  # the resumed model was evaluated before the interruption
        model_lib.set_arrays(model, wire.views(arrays))
        row = round_row(guard, rnd) if rnd > 0 else {}
        spent = getattr(strategy, "privacy_spent", lambda: None)()
        if spent is not None and rnd > 0:
            row["dp_central_epsilon"], row["dp_central_delta"] = spent.epsilon, spent.delta
        save = run.snapshot(cfg, model, strategy=export_state(strategy)) if rnd > 0 else None
        test = tracker.end_round(rnd, model, row, save, finalize=lambda: round_times(guard, rnd, slots))
        release_freed_memory()  # the round's replies are gone; keep the server's footprint flat
        return MetricRecord({k: float(v) for k, v in test.items() if np.isfinite(v)})

    train_cfg, eval_cfg = base_config(sr), base_config(sr)
    remaining = cfg.rounds - sr.start_round
    try:
        if remaining > 0:
            guard.start(grid, ArrayRecord(model.state_dict()), num_rounds=remaining, timeout=cfg.round_timeout,
                        train_config=train_cfg, evaluate_config=eval_cfg, evaluate_fn=evaluate_fn)
        else:
            log.info("all %d rounds are already done", cfg.rounds)
        bn: dict[str, Any] = {"bn_statistics": "averaged"}
        if cfg.bn_stats == "sites" and any(k.endswith("running_var") for k in reference):
            bn = site_bn_statistics(grid, sr, node_sites, excluded, model)
            tracker.model_changed()  # the final test sees the re-estimated statistics
        final_op = bn.pop("final_operating_point", None)
        summary = tracker.finish(model, {"sites": info, "slots": slots, "mode": "federated",
                                         "privacy": privacy_summary(sr, strategy), **bn}, operating_point=final_op)
    except BaseException:
        tracker.abandon()
        raise
    log.info("results in %s", run.path)
    return summary


def site_bn_statistics(grid: Grid, sr: ServerRun, node_sites: dict[int, str], excluded: dict[int, str],
                       model: torch.nn.Module) -> dict[str, Any]:
    """``--bn-stats sites``: every site re-estimates the final model's BatchNorm statistics on
    its training patches; the model takes their patch-weighted mean (sites in name order,
    so the sum is the same whatever order replies arrive in). Sites that fail are named
    and left out; with none left the averaged statistics stay."""
    cfg = sr.cfg
    t0 = time.time()
    record = wire.to_record(wire.encode(model_lib.get_arrays(model), cfg.update_dtype))
    nodes = sorted((n for n in node_sites if n not in excluded), key=lambda n: node_sites[n])
    msgs = [Message(RecordDict({"arrays": record, "config": base_config(sr)}), dst_node_id=n,
                    message_type=f"{MessageType.EVALUATE}.bnstats") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
    ok = []
    for r in replies:
        site = node_sites.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")
        if r.has_error():
            log.warning("[site %s] could not re-estimate BatchNorm statistics: %s", site, short_reason(r.error.reason))
            continue
        ok.append((site, r.content))
    if not ok:
        log.warning("no site re-estimated the BatchNorm statistics; the final model keeps the averaged ones")
        return {"bn_statistics": "averaged (no site could re-estimate them)"}
    ok.sort(key=lambda sc: sc[0])
    mean = weighted_average([c for _, c in ok], "num-examples")
    model_lib.set_arrays(model, wire.views(mean))
    seconds = time.time() - t0
    log.info("BatchNorm statistics of the final model re-estimated at %d sites (%.1fs)", len(ok), seconds)
    out: dict[str, Any] = {"bn_statistics": "re-estimated at the sites", "bn_statistics_sites": [s for s, _ in ok],
                           "bn_statistics_seconds": seconds}
    out.update(final_operating_point(grid, sr, node_sites, nodes, model))
    return out


def final_operating_point(grid: Grid, sr: ServerRun, node_sites: dict[int, str], nodes: list[int],
                          model: torch.nn.Module) -> dict[str, Any]:
    """The operating point for the model as it leaves the federation (after
    :func:`site_bn_statistics` changed it): the sites evaluate it on their validation
    patches and send per-threshold counts, as in every round, and the server sums them.
    Without this the threshold would belong to the model before re-estimation."""
    cfg = sr.cfg
    record = wire.to_record(wire.encode(model_lib.get_arrays(model), cfg.update_dtype))
    config = base_config(sr)
    config["server-round"] = cfg.rounds
    msgs = [Message(RecordDict({"arrays": record, "config": config}), dst_node_id=n,
                    message_type=MessageType.EVALUATE) for n in nodes]
    counts: dict[str, dict] = {}
    aucs: list[tuple[float, float]] = []
    for r in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        site = node_sites.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}")
        if r.has_error():
            log.warning("[site %s] could not evaluate the final model: %s", site, short_reason(r.error.reason))
            continue
        m: dict[str, Any] = dict(r.content["metrics"])  # numbers, and the counts' lists
        if all(k in m for k in COUNT_KEYS):
            counts[site] = {k: (list(m[k]) if isinstance(m[k], list) else int(m[k])) for k in COUNT_KEYS}
        auc = float(m.get("roc_auc", float("nan")))
        if np.isfinite(auc):
            aucs.append((auc, float(m.get("num-examples", 1.0))))
    op = operating_point(counts, cfg.op_rule, cfg.rounds)
    if not op:
        log.warning("no site sent validation counts for the final model: no operating point for it")
        return {}
    op["op_model"] = "final (BatchNorm statistics re-estimated at the sites)"
    if aucs:
        op["val_roc_auc"] = float(np.average([a for a, _ in aucs], weights=[w for _, w in aucs]))
    return {"final_operating_point": op}


def privacy_summary(sr: ServerRun, strategy) -> dict[str, Any]:
    """How private the run was, as the field reports it (see common/privacy/dpsgd.py)."""
    from common.privacy.dpsgd import ACCOUNTANT, PRIVACY_UNIT, Ledger

    cfg = sr.cfg
    if cfg.dp == "off":
        return {"dp": "off", "note": "no differential privacy: weights trained on each site's patches leave it"}
    if cfg.dp == "local":
        ledgers = {p.name.split(".privacy")[0]: Ledger.load(p).report()
                   for p in sorted((sr.run.path / "site_state").glob("*.privacy.json"))}
        return {"dp": "local (sample-level DP-SGD at each site)", "unit": PRIVACY_UNIT, "accountant": ACCOUNTANT,
                "clip": cfg.dp_clip, "target_epsilon": cfg.dp_epsilon or None, "sites": ledgers,
                "epsilon_max": max((d["epsilon"] for d in ledgers.values()), default=None)}
    spent = strategy.privacy_spent()
    return {"dp": "central (client-level, Flower DifferentialPrivacyServerSideFixedClipping)",
            "unit": "one site's whole update per round (client-level)",
            "accountant": "RDP (Flower RdpAccountant via dp-accounting), no sampling amplification",
            "noise_multiplier": cfg.dp_noise, "clip": cfg.dp_clip,
            "epsilon": spent.epsilon if spent else None, "delta": spent.delta if spent else None,
            "releases": spent.num_releases if spent else None}


def round_times(guard: Guard, rnd: int, slots: int) -> dict[str, Any]:
    """The round's wall time (through the server's test evaluation) and the federation
    overhead: 1 - (the sites' training time spread over the parallel slots) / wall time."""
    lg = guard.rounds.get(rnd)
    if lg is None or not lg.started:
        return {}
    wall = time.time() - lg.started
    train_secs = [m.get("train-seconds", 0.0) for m in lg.train.values()]
    n_slots = max(1, min(slots, len(lg.sampled) or 1))
    busy = sum(train_secs) / n_slots
    return {"wall_seconds": wall, "site_train_seconds": sum(train_secs), "slots": n_slots,
            "overhead": 1 - busy / wall if wall > 0 else None,
            "server_phase_seconds": (time.time() - lg.evaluated) if lg.evaluated else None}


def round_row(guard: Guard, rnd: int) -> dict[str, Any]:
    """The round's sites, bytes and site-side metrics (times: :func:`round_times`)."""
    lg = guard.rounds.get(rnd)
    if lg is None:
        return {}
    row: dict[str, Any] = {
        # where the round's time went: training phase (dispatch, local training, replies,
        # aggregation), federated evaluation phase; the server phase is in round_times
        "train_phase_seconds": (lg.trained - lg.started) if lg.trained else None,
        "evaluate_phase_seconds": (lg.evaluated - lg.trained) if lg.evaluated and lg.trained else None,
        "sites_sampled": len(lg.sampled),
        "sites_trained": len(lg.train),
        "failed_sites": sorted(lg.failed),
        "rejected_sites": sorted(lg.rejected),
        "bytes_down": lg.bytes_down,
        "bytes_up": lg.bytes_up,
    }
    eps = {site: m["dp-epsilon"] for site, m in lg.train.items() if "dp-epsilon" in m}
    if eps:
        row["dp_epsilon_max"] = max(eps.values())  # the largest spend of any site so far
        row["dp_epsilon"] = eps
    if lg.train:
        w = np.array([m.get("num-examples", 1.0) for m in lg.train.values()])
        row["train_loss"] = float(np.average([m["train-loss"] for m in lg.train.values()], weights=w))
    # The sites' validation metrics of the newest model they evaluated: this round's
    # (separate phase, or the last round), else the previous round's (--site-eval fused).
    val_round = rnd if lg.evaluate else rnd - 1
    evaluated = guard.rounds[val_round].evaluate if val_round in guard.rounds else {}
    if evaluated:
        vals = [(m.get("roc_auc", float("nan")), m.get("num-examples", 1.0)) for m in evaluated.values()]
        finite = [(a, w) for a, w in vals if np.isfinite(a)]
        if finite:
            row["val_roc_auc"] = float(np.average([a for a, _ in finite], weights=[w for _, w in finite]))
        row["val_loss"] = float(np.average([m["loss"] for m in evaluated.values()],
                                           weights=[m.get("num-examples", 1.0) for m in evaluated.values()]))
        row["val_model_round"] = val_round
    row.update(operating_point(guard.rounds[val_round].val_counts if val_round in guard.rounds else {},
                               guard.cfg.op_rule, val_round))
    return row


def operating_point(site_counts: dict[str, dict], rule: str, model_round: int) -> dict[str, Any]:
    """The federation's operating point for round ``model_round``'s model, from nothing but
    the sites' per-threshold validation counts (their sum; see common.evaluation.metrics)."""
    if not site_counts:
        return {}
    op = operating_point_fields(sum_counts([site_counts[s] for s in sorted(site_counts)]), rule, model_round)
    return {**op, "op_sites": sorted(site_counts)} if op else {}


