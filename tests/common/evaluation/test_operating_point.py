"""The operating point: chosen from what sites send (per-threshold counts), never from pooled predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.evaluation.metrics import (
    THRESHOLDS,
    binary_metrics,
    choose_threshold,
    sigmoid,
    sum_counts,
    threshold_counts,
)


def _sites(seed: int, n_sites: int = 4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sites):
        y = (rng.random(int(rng.integers(30, 90))) < 0.2).astype(int)
        z = rng.normal(size=len(y)) + 2.0 * y  # an imperfect model
        out.append((y, z))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summed_site_counts_are_the_pooled_counts_and_pick_the_pooled_optimum(seed):
    sites = _sites(seed)
    y = np.concatenate([s[0] for s in sites])
    z = np.concatenate([s[1] for s in sites])
    summed = sum_counts([threshold_counts(*s) for s in sites])
    assert summed == threshold_counts(y, z)
    # brute force on the pooled predictions over the same grid: Youden's J maximal there
    p = sigmoid(z)
    j = np.array([np.mean(p[y == 1] >= t) - np.mean(p[y == 0] >= t) for t in THRESHOLDS])
    op = choose_threshold(summed, "youden")
    k = THRESHOLDS.index(op["threshold"])
    assert j[k] == pytest.approx(j.max())
    m = binary_metrics(y, z, op["threshold"])
    assert op["val_recall"] == pytest.approx(m["recall"]) and op["val_specificity"] == pytest.approx(m["specificity"])
    f1 = np.array([binary_metrics(y, z, t)["f1"] for t in THRESHOLDS])
    assert f1[THRESHOLDS.index(choose_threshold(summed, "f1")["threshold"])] == pytest.approx(np.nanmax(f1))
    # recall90: the highest threshold of the grid at which pooled recall is still >= 0.90
    recall = np.array([np.mean(p[y == 1] >= t) for t in THRESHOLDS])
    op = choose_threshold(summed, "recall90")
    assert op["threshold"] == max(t for t, r in zip(THRESHOLDS, recall, strict=True) if r >= 0.9)
    assert op["val_recall"] == pytest.approx(binary_metrics(y, z, op["threshold"])["recall"]) and op["score"] >= 0.9


def test_counts_hold_no_predictions_and_the_choice_follows_them():
    (y, z), *_ = _sites(5)
    c = threshold_counts(y, z)
    assert set(c) == {"op-positives", "op-negatives", "op-tp", "op-fp"}
    assert len(c["op-tp"]) == len(THRESHOLDS) and all(isinstance(v, int) for v in c["op-tp"] + c["op-fp"])
    assert c["op-tp"] == sorted(c["op-tp"], reverse=True)  # counts above a rising threshold only fall
    # a site with a perfect separation at 0.8 moves the federation's threshold there
    perfect = {"op-positives": 1000, "op-negatives": 1000, "op-tp": [1000 if t <= 0.8 else 0 for t in THRESHOLDS],
               "op-fp": [1000 if t <= 0.05 else 0 for t in THRESHOLDS]}
    assert 0.05 < choose_threshold(sum_counts([c, perfect]), "youden")["threshold"] <= 0.8
    assert choose_threshold({**c, "op-positives": 0}, "recall90") is None  # one class only: no operating point
    with pytest.raises(ValueError, match="thresholds"):
        sum_counts([c, {**c, "op-tp": c["op-tp"][:-1]}])
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(c, "accuracy")


def test_guard_keeps_each_sites_counts_and_the_server_sums_them():
    from flwr.supercore.task_identity import TaskIdentity

    from server.federation import operating_point, round_row
    from tests.helpers import GLOBAL, arrays, guard, reply

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    g = guard(rounds=3)
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2, 3, 4, 5]})()
    g.configure_train(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), grid)
    sites = _sites(9)
    replies = []
    for k, (y, z) in zip((1, 2, 3, 4), sites, strict=True):
        r = reply(k, arrays(k), 10)
        r.content["val"] = ConfigRecord({"roc_auc": 0.8, "loss": 0.4, "num-examples": float(len(y)),
                                         **threshold_counts(y, z)})
        replies.append(r)
    g.aggregate_train(2, replies)
    assert sorted(g.rounds[1].val_counts) == ["site-1", "site-2", "site-3", "site-4"]
    assert "op-tp" not in g.rounds[1].evaluate["site-1"]  # lists stay out of the metrics and the event log
    row = round_row(g, 2)
    expected = choose_threshold(sum_counts([threshold_counts(*s) for s in sites]), g.cfg.op_rule)
    assert row["op_threshold"] == expected["threshold"] and row["op_model_round"] == 1
    assert row["op_val_positives"] == sum(int(s[0].sum()) for s in sites)
    assert operating_point({}, "youden", 1) == {}


def test_federated_operating_point_equals_the_one_from_pooled_validation_predictions(finished_runs):
    """End to end through Flower: the threshold the federation picked from the sites' counts
    is the one the pooled validation predictions of the final model give."""
    import torch

    from common.config import RunConfig
    from common.data.cache import open_cache
    from common.data.loaders import eval_loader
    from common.data.partition import SitePlan
    from common.training import model as model_lib
    from common.training.engine import evaluate
    from tests.helpers import rows

    run, stdout = finished_runs.runs / "fed", finished_runs.stdout["fed"]  # 2 sites x 2 rounds, every default
    summary = json.loads((run / "summary.json").read_text())
    op = summary["test"]["operating_point"]
    last = rows(run / "rounds.jsonl")[-1]
    # the default --bn-stats sites changes the model after round 2: its threshold comes from the
    # sites' counts for the re-estimated model, the last row's from those for round 2's model
    assert summary["bn_statistics"] == "re-estimated at the sites"
    assert last["op_model_round"] == 2 and op["model"].startswith("final")
    assert {"test_op_accuracy", "test_op_recall", "test_op_precision"} <= set(last)
    assert "recall" in stdout and "at threshold" in stdout  # the run's final line
    # pooled predictions of the final model on every site's validation patches
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    cache = open_cache(json.loads((run / "config.json").read_text())["cache"])
    plan = SitePlan.load(run / "sites.json")
    model = model_lib.build_model(cfg.arch, cfg.norm)
    model.load_state_dict(torch.load(run / "model_final.pt", weights_only=False)["model"])
    val = cache.rows_of(sorted(s for site in plan.sites for s in site.val))
    _, logits, labels = evaluate(model, eval_loader(cache, val), torch.device("cpu"), cfg.amp)
    pooled_counts = threshold_counts(labels, logits)
    pooled = choose_threshold(pooled_counts, cfg.op_rule)
    assert pooled["threshold"] == op["threshold"]
    assert pooled["val_positives"] == op["validation"]["positives"]
    test = np.load(run / "test_predictions.npz")
    at = binary_metrics(test["labels"], test["logits"], op["threshold"])
    assert op["metrics"]["recall"] == pytest.approx(at["recall"])
    # every rule applied to the same summed counts: the chosen rule's row is the operating point
    assert set(op["by_rule"]) == {"youden", "f1", "recall90"}
    assert op["by_rule"][cfg.op_rule]["threshold"] == op["threshold"]
    for rule, r in op["by_rule"].items():
        assert r["threshold"] == choose_threshold(pooled_counts, rule)["threshold"], rule
        assert r["recall"] == pytest.approx(binary_metrics(test["labels"], test["logits"], r["threshold"])["recall"])
