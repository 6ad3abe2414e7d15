"""Real federations: Flower's simulation engine on Ray, through sim/run.py as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, rows, sim


def test_three_sites_train_with_fedyogi_and_a_nan_site_is_rejected(tmp_path, tiny_root):
    proc = sim(tmp_path, tiny_root, "--clients", "3", "--rounds", "2", "--local-epochs", "1", "--strategy", "fedyogi",
               "--inject", "site-2:nan", "--run-name", "r")
    run = tmp_path / "runs" / "r"
    rounds = rows(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["rejected_sites"] == ["site-2"] and r["sites_trained"] == 2
        assert 0.0 <= r["test_roc_auc"] <= 1.0 and np.isfinite(r["test_loss"])
        assert r["wall_seconds"] > 0 and r["site_train_seconds"] > 0
    events = rows(run / "events.jsonl")
    trained = {(e["round"], e["site"]) for e in events if e["kind"] == "train"}
    assert trained == {(1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1")}  # per-site metrics kept
    assert {e["site"] for e in events if e["kind"] == "evaluate"} == {"site-0", "site-1", "site-2"}
    assert any("site-2" in e["site"] and "NaN" in e["reason"] for e in events if e["kind"] == "rejected")
    assert "[site site-2] update rejected" in proc.stderr
    final = torch.load(run / "model_final.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    # FedYogi steps the weights; the aggregate's BatchNorm running statistics (the round's checkpoint,
    # before the sites re-estimate them) are averaged, never stepped: variances stay positive
    aggregate = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=True)["model"]
    assert all((v > 0).all() for k, v in aggregate.items() if k.endswith("running_var"))
    summary = json.loads((run / "summary.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "cpm"):
        assert key in summary["test"]["metrics"] and key in summary["test"]["ci95"]
    for name in ("config.json", "sites.json", "site_summary.csv", "submission.csv", "learning_curves.png",
                 "roc.png", "froc.png", "log.txt"):
        assert (run / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    assert "Results:" in proc.stdout and "never for diagnosis" in proc.stdout


def test_final_batchnorm_statistics_are_the_sites_re_estimates(finished_runs):
    """--bn-stats sites: the final model's running statistics are the
    patch-weighted mean of what each site computes for the final weights on its own
    training patches, recomputed here independently from the run's plan and cache."""
    from common.data.cache import open_cache
    from common.data.loaders import eval_loader
    from common.data.partition import SitePlan
    from common.training import model as model_lib
    from common.training.engine import bn_statistics

    run = finished_runs.runs / "fed"  # --bn-stats sites is the default
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bn_statistics"] == "re-estimated at the sites" and summary["bn_statistics_sites"] == [
        "site-0", "site-1"]
    final = torch.load(run / "model_final.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoints" / "round-0002.pt", weights_only=True)["model"]
    cfg = json.loads((run / "config.json").read_text())
    cache, plan = open_cache(Path(cfg["cache"])), SitePlan.load(run / "sites.json")
    model = model_lib.build_model("resnet10")
    model.load_state_dict(final)
    sums, total = {}, 0
    for site in plan.sites:
        rows = cache.rows_of(site.train)
        for k, v in bn_statistics(model, eval_loader(cache, rows), torch.device("cpu"),
                                 amp=cfg["config"]["amp"]).items():
            sums[k] = sums.get(k, 0) + v * len(rows)
        total += len(rows)
    assert len(sums) == 2 * sum(k.endswith("running_var") for k in final)
    for k, v in sums.items():
        np.testing.assert_allclose(final[k].numpy(), v / total, rtol=1e-4, atol=1e-6, err_msg=k)
    for k in final:  # the weights are the last round's aggregate, untouched
        if not k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(final[k], last[k], rtol=0, atol=0, msg=k)
    assert any(not torch.allclose(final[k], last[k]) for k in final if k.endswith("running_var"))


def test_ray_address_attaches_to_a_running_ray_cluster(tmp_path, tiny_root):
    """--ray-address: the federation runs on a Ray cluster started beforehand (`ray start --head`)."""
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--temp-dir", ray_tmp],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: stopped below, not with `ray stop`
    try:
        proc = sim(tmp_path, tiny_root, "--clients", "2", "--rounds", "1", "--local-epochs", "1",
                   "--ray-address", f"127.0.0.1:{port}", "--run-name", "attached", timeout=400)
        rs = rows(tmp_path / "runs" / "attached" / "rounds.jsonl")
        assert [r["round"] for r in rs] == [0, 1] and rs[1]["sites_trained"] == 2
        assert f"127.0.0.1:{port}" in proc.stderr + proc.stdout  # it says which cluster it joined
        assert head.poll() is None  # the cluster outlives the run that borrowed it
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


def test_fused_site_evaluation_gives_flowers_figures_with_one_model_download_less(tmp_path, tiny_root, finished_runs):
    sim(tmp_path, tiny_root, "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--site-eval", "separate",
        "--run-name", "sep")
    (tmp_path / "runs" / "fused").symlink_to(finished_runs.runs / "fed")  # the same settings, fused by default
    ev = {n: {(e["round"], e["site"]): e for e in rows(tmp_path / "runs" / n / "events.jsonl")
              if e["kind"] == "evaluate"} for n in ("sep", "fused")}
    assert ev["sep"].keys() == ev["fused"].keys() == {(r, s) for r in (1, 2) for s in ("site-0", "site-1")}
    for key, e in ev["sep"].items():  # the same model on the same patches, whichever message carried it
        for m in ("loss", "roc_auc", "accuracy", "num-examples"):
            assert e[m] == pytest.approx(ev["fused"][key][m], rel=1e-6, nan_ok=True), (key, m)
    sep, fused = rows(tmp_path / "runs" / "sep" / "rounds.jsonl"), rows(tmp_path / "runs" / "fused" / "rounds.jsonl")
    assert fused[1]["bytes_down"] * 2 == sep[1]["bytes_down"]  # round 1: the training download only
    assert fused[2]["bytes_down"] == sep[2]["bytes_down"]  # the last round's model: its own phase
    assert sep[1]["val_model_round"] == 1 and fused[2]["val_model_round"] == 2 and "val_roc_auc" not in fused[1]
    assert sep[2]["test_roc_auc"] == fused[2]["test_roc_auc"]  # training is untouched
    trains = [e for e in rows(tmp_path / "runs" / "fused" / "events.jsonl") if e["kind"] == "train"]
    assert all((e["val-seconds"] > 0) == (e["round"] == 2) for e in trains)


def test_fedprox_end_to_end_keeps_each_round_close_to_the_global_model(tmp_path, tiny_root):
    """FedProx through the real engine: with a strong proximal term (mu 100) the sites' local
    models, and so the global one, move far less in a round than FedAvg's do from the same data."""
    common = ("--clients", "2", "--rounds", "2", "--local-epochs", "1", "--no-augment")
    sim(tmp_path, tiny_root, *common, "--run-name", "avg")
    sim(tmp_path, tiny_root, *common, "--strategy", "fedprox", "--proximal-mu", "100", "--run-name", "prox")

    def moved(name: str) -> float:  # how far round 2 moved the global model from round 1's
        ck = tmp_path / "runs" / name / "checkpoints"
        a = torch.load(ck / "round-0001.pt", weights_only=True)["model"]
        b = torch.load(ck / "round-0002.pt", weights_only=True)["model"]
        return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a
                         if a[k].is_floating_point() and "running" not in k) ** 0.5)

    assert moved("prox") < 0.5 * moved("avg"), (moved("prox"), moved("avg"))
    rs = rows(tmp_path / "runs" / "prox" / "rounds.jsonl")
    assert [r["round"] for r in rs] == [0, 1, 2] and all(r["sites_trained"] == 2 for r in rs[1:])
