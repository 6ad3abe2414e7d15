"""Experiment tracking: real tiny federations logged to a real MLflow store (SQLite), read
back with MLflow's own client and compared with the results folder, which stays the record."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, rows, sim, sim_killed_after_round

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is a dependency: pip install -e .")


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "time" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_history(client, run_id: str, key: str, by_step: dict[int, float]) -> None:
    """MLflow holds exactly one value per step for ``key``, equal to ``by_step``."""
    got = history(client, run_id, key)
    assert [s for s, _ in got] == sorted(by_step), (key, got, by_step)
    assert [v for _, v in got] == pytest.approx([by_step[s] for s in sorted(by_step)], rel=1e-12), key


def latest_events(run: Path) -> dict[tuple[str, int, str], dict]:
    out = {}
    for e in rows(run / "events.jsonl"):  # a round redone after a resume: its last copy counts
        out[(e["kind"], e["round"], e["site"])] = e
    return out


def test_tracked_run_equals_its_results_folder_and_resume_continues_the_same_mlflow_run(tmp_path, tiny_root):
    fed = ("--clients", "2", "--rounds", "3", "--local-epochs", "1", "--tracking", "mlflow",
           "--dp", "local", "--norm", "group", "--dp-epsilon", "6")
    # killed (SIGKILL) once round 1 is complete and the MLflow run exists, then resumed
    sim_killed_after_round(tmp_path, tiny_root, 1, "cut", *fed, and_file="mlflow.json")
    run = tmp_path / "runs" / "cut"
    first = json.loads((run / "mlflow.json").read_text())
    sim(tmp_path, tiny_root, "--resume", str(run))
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == first["run_id"]  # the same MLflow run
    sim(tmp_path, tiny_root, "--mode", "centralized", "--rounds", "2", "--local-epochs", "1", "--tracking", "mlflow",
        "--run-name", "central")

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # the default store: beside the results folders
    assert first["tracking_uri"] == uri
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("luna-fl")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(found) == ["central", "cut"]  # side by side in one experiment; the resume made no second run
    for name, mr in found.items():
        folder = tmp_path / "runs" / name
        assert mr.info.status == "FINISHED"
        cfg = json.loads((folder / "config.json").read_text())["config"]
        assert mr.data.params == {k: str(v) for k, v in cfg.items()}  # the whole resolved configuration
        # every figure of every round, once per round, equal to rounds.jsonl
        expected: dict[str, dict[int, float]] = {}
        for row in rows(folder / "rounds.jsonl"):
            for k, v in numeric(row).items():
                expected.setdefault(k, {})[row["round"]] = v
        assert {"test_roc_auc", "test_loss", "train_loss", "wall_seconds"} <= set(expected)
        if name == "cut":  # federation overhead, bytes, the sites' pooled validation, the largest epsilon
            assert {"overhead", "bytes_up", "bytes_down", "val_roc_auc", "dp_epsilon_max"} <= set(expected)
        for key, by_round in expected.items():
            assert_history(client, mr.info.run_id, key, by_round)
        names = {a.path for d in ("plots", "model", "results") for a in client.list_artifacts(mr.info.run_id, d)}
        assert {"plots/learning_curves.png", "plots/roc.png", "model/model_final.pt", "results/summary.json"} <= names
        summary = json.loads((folder / "summary.json").read_text())
        assert mr.data.metrics["final_roc_auc"] == pytest.approx(summary["test"]["metrics"]["roc_auc"])

    fed_id = found["cut"].info.run_id
    rs = rows(run / "rounds.jsonl")
    assert [r["round"] for r in rs] == [0, 1, 2, 3]
    assert history(client, fed_id, "bytes_up") == [(r["round"], r["bytes_up"]) for r in rs[1:]]
    # every site's own curves: training loss, cumulative epsilon, validation of each round's model
    per_site: dict[str, dict[int, float]] = {}
    for (kind, rnd, site), e in latest_events(run).items():
        if kind == "train":
            per_site.setdefault(f"train_loss/{site}", {})[rnd] = e["train-loss"]
            per_site.setdefault(f"dp_epsilon/{site}", {})[rnd] = e["dp-epsilon"]
        elif kind == "evaluate" and math.isfinite(e["loss"]):
            per_site.setdefault(f"val_loss/{site}", {})[rnd] = e["loss"]
    assert {f"{m}/site-{k}" for m in ("train_loss", "dp_epsilon", "val_loss") for k in (0, 1)} == set(per_site)
    for key, by_round in per_site.items():
        assert_history(client, fed_id, key, by_round)
    assert history(client, fed_id, "dp_epsilon/site-0")[-1][1] == pytest.approx(6.0, abs=0.05)

    # the comparison report goes to both tracked runs
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(run), str(tmp_path / "runs" / "central"),
                        "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for mr in found.values():
        assert {a.path for a in client.list_artifacts(mr.info.run_id, "report")} == {"report/report.md",
                                                                                     "report/report.html"}


def test_a_tracking_server_that_does_not_answer_is_a_warning_and_the_run_completes(tmp_path, tiny_root):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = sim(tmp_path, tiny_root, "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--tracking", "mlflow",
               "--tracking-uri", f"http://127.0.0.1:{port}", "--run-name", "dead")
    run = tmp_path / "runs" / "dead"
    warning = next(line for line in proc.stderr.splitlines() if f"MLflow tracking at http://127.0.0.1:{port}" in line)
    assert "WARNING" in warning and "the run goes on without it" in warning and str(run) in warning
    # MLflow's client would retry for minutes; bounded, a refused connection costs seconds
    assert float(re.search(r"failed after ([\d.]+) s", warning).group(1)) < 60
    assert [r["round"] for r in rows(run / "rounds.jsonl")] == [0, 1, 2]
    assert (run / "summary.json").exists() and (run / "model_final.pt").exists()
    assert not (run / "mlflow.json").exists()
