"""The centralized baseline: the same model and engine on the pooled training data.

Pooled data = the training scans of every site (their validation scans stay out, as in
the federated run). One "round" here is ``local_epochs`` epochs, so round r of a
centralized run and round r of a federated run have made the same number of passes
over the training data (``rounds x local_epochs``): the learning curves share that axis.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from common.config import RunConfig
from common.data.loaders import epoch_size, eval_loader, training_epoch
from common.data.prepare import Prepared
from common.evaluation.holdout import TestSplit
from common.evaluation.metrics import operating_point_fields, threshold_counts
from common.training import model as model_lib
from common.training.engine import evaluate, prepare, train_one_epoch
from experiment.results import RunDir, starting_model
from experiment.tracker import RunTracker

log = logging.getLogger("luna_fl")


def run_centralized(cfg: RunConfig, run: RunDir, prepared: Prepared, checkpoint: dict | None = None,
                    progress: bool = True) -> dict[str, Any]:
    device = model_lib.resolve_device(cfg.device)
    model = starting_model(cfg, checkpoint)
    optimizer = model_lib.make_optimizer(model, cfg)
    start = int(checkpoint["round"]) if checkpoint else 0
    model = prepare(model, device, cfg.amp)
    if checkpoint and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    pooled = sorted(s for site in prepared.plan.sites for s in site.train)
    positions = prepared.cache.rows_of(pooled)
    log.info("centralized baseline: %d pooled training scans, %d examples per epoch, %d epochs",
             len(pooled), epoch_size(prepared.cache, positions, cfg.neg_ratio), cfg.rounds * cfg.local_epochs)
    tracker = RunTracker(cfg, run, TestSplit.from_prepared(prepared), device, start)
    # the sites' validation scans, pooled: where the baseline picks its operating point, by
    # the same counts and rule the federation uses on the sites' summed counts
    val_loader = eval_loader(prepared.cache, prepared.cache.rows_of(
        sorted(s for site in prepared.plan.sites for s in site.val)), 64)

    def operating_point(rnd: int) -> dict[str, Any]:
        if not tracker.due(rnd):
            return {}
        _, logits, labels = evaluate(model, val_loader, device, cfg.amp)
        return operating_point_fields(threshold_counts(labels, logits), cfg.op_rule, rnd)

    def train() -> dict[str, Any]:
        if start == 0:
            tracker.end_round(0, model, operating_point(0))
        for rnd in range(start + 1, cfg.rounds + 1):
            t0 = time.time()
            stats = []
            for e in range(cfg.local_epochs):
                epoch = (rnd - 1) * cfg.local_epochs + e
                model_lib.set_lr(optimizer, model_lib.lr_at(cfg, epoch))  # the sites' schedule, pass by pass
                loader = training_epoch(cfg, prepared.cache, positions, cfg.seed * 100_003 + epoch)
                stats.append(train_one_epoch(model, loader, optimizer, device, amp=cfg.amp, progress=progress,
                                             log_prefix=f"epoch {epoch + 1}/{cfg.rounds * cfg.local_epochs} "))
            seen = sum(s["examples"] for s in stats)
            secs = sum(s["seconds"] for s in stats)
            row = {"wall_seconds": time.time() - t0, "train_loss": sum(s["loss"] * s["examples"] for s in stats) / seen,
                   "train_seconds": secs, "images_per_s": seen / secs, "train_examples": seen,
                   **operating_point(rnd)}
            save = run.snapshot(cfg, model, optimizer=copy.deepcopy(optimizer.state_dict()))
            tracker.end_round(rnd, model, row, save)
        return tracker.finish(model, {"mode": "centralized", "pooled_scans": len(pooled)})

    try:
        summary = train()
    except BaseException:
        tracker.abandon()
        raise
    log.info("results in %s", run.path)
    return summary
