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


def assert_history(client, run_id: str, key: str, by_step: dict[int, float]) -> None:
    """MLflow holds exactly one value per step for ``key``, equal to ``by_step``."""
    got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    assert [s for s, _ in got] == sorted(by_step), (key, got, by_step)
    assert [v for _, v in got] == pytest.approx([by_step[s] for s in sorted(by_step)], rel=1e-12), key


def assert_run_equals_folder(client, mr, folder: Path) -> None:
    """The MLflow run holds the folder's configuration, every round's figures once, each
    site's figures of every round (federated), the final figures and the files."""
    cfg = json.loads((folder / "config.json").read_text())["config"]
    params = {k: str(v) for k, v in cfg.items()}
    logged = dict(mr.data.params)
    changed = {k[len("resumed."):]: v for k, v in mr.data.tags.items() if k.startswith("resumed.")}
    assert {**logged, **changed} == params  # the whole resolved configuration (resume-time changes as tags)
    expected: dict[str, dict[int, float]] = {}
    for row in rows(folder / "rounds.jsonl"):
        for k, v in numeric(row).items():
            expected.setdefault(k, {})[row["round"]] = v
    assert {"test_roc_auc", "test_cpm", "test_loss", "train_loss", "wall_seconds"} <= set(expected)
    if cfg["mode"] == "federated":  # federation overhead, bytes, the sites' pooled validation
        assert {"overhead", "bytes_up", "bytes_down", "val_roc_auc"} <= set(expected)
        latest = {}
        for e in rows(folder / "events.jsonl"):  # a round redone after a resume: its last copy counts
            latest[(e["kind"], e["round"], e["site"])] = e
        for (kind, rnd, site), e in latest.items():  # every site's own curves, named <metric>/<site>
            if kind == "train":
                expected.setdefault(f"train_loss/{site}", {})[rnd] = e["train-loss"]
                if "dp-epsilon" in e:
                    expected.setdefault(f"dp_epsilon/{site}", {})[rnd] = e["dp-epsilon"]
            elif kind == "evaluate":  # at the round of the model the site evaluated
                expected.setdefault(f"val_loss/{site}", {})[rnd] = e["loss"]
        sites = {s for _, _, s in latest}
        assert sites and {f"train_loss/{s}" for s in sites} | {f"val_loss/{s}" for s in sites} <= set(expected)
    for key, by_round in expected.items():
        assert_history(client, mr.info.run_id, key, by_round)
    summary = json.loads((folder / "summary.json").read_text())
    assert client.get_run(mr.info.run_id).data.metrics["final_roc_auc"] == pytest.approx(
        summary["test"]["metrics"]["roc_auc"])
    names = {a.path for d in ("plots", "model", "results") for a in client.list_artifacts(mr.info.run_id, d)}
    assert {"plots/learning_curves.png", "plots/roc.png", "model/model_final.pt", "results/summary.json"} <= names
    assert mr.info.status == "FINISHED"


def runs_in(uri: str) -> dict:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("luna-fl")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def test_tracked_run_equals_its_results_folder_and_resume_continues_the_same_mlflow_run(tmp_path, tiny_root):
    fed = ("--clients", "2", "--rounds", "2", "--local-epochs", "1", "--tracking", "mlflow",
           "--dp", "local", "--norm", "group", "--dp-epsilon", "6", "--neg-ratio", "1")
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
    found = runs_in(uri)
    assert sorted(found) == ["central", "cut"]  # side by side in one experiment; the resume made no second run
    for name, mr in found.items():
        assert_run_equals_folder(client, mr, tmp_path / "runs" / name)
    assert rows(run / "rounds.jsonl")[-1]["round"] == 2
    eps = sorted((m.step, m.value) for m in client.get_metric_history(found["cut"].info.run_id, "dp_epsilon/site-0"))
    assert [s for s, _ in eps] == [1, 2] and eps[0][1] < eps[1][1] == pytest.approx(6.0, abs=0.05)  # cumulative

    # the comparison report goes to both tracked runs
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(run), str(tmp_path / "runs" / "central"),
                        "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for mr in found.values():
        assert {a.path for a in client.list_artifacts(mr.info.run_id, "report")} == {"report/report.md",
                                                                                     "report/report.html"}

    # resumed into a store that has never seen it: a new MLflow run there, filled from the folder
    other = f"sqlite:///{tmp_path / 'other.db'}"
    sim(tmp_path, tiny_root, "--resume", str(run), "--tracking-uri", other)
    assert json.loads((run / "mlflow.json").read_text())["tracking_uri"] == other
    assert list(runs_in(other)) == ["cut"]
    assert_run_equals_folder(mlflow.MlflowClient(other), runs_in(other)["cut"], run)
    assert list((tmp_path / "mlartifacts").iterdir())  # its files beside that store, not in ./mlruns


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


def test_a_store_that_fails_mid_run_is_a_warning_and_keeps_what_it_had(tmp_path, tiny_root):
    """The store takes every round, then cannot take the files (its artifact folder is a
    file): one warning, a complete run, and MLflow keeps the rounds it had."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlartifacts").write_text("not a folder")
    proc = sim(tmp_path, tiny_root, "--clients", "2", "--rounds", "1", "--local-epochs", "1", "--tracking", "mlflow",
               "--run-name", "broken")
    run = tmp_path / "runs" / "broken"
    assert "the run goes on without it" in proc.stderr and (run / "summary.json").exists()
    mr = runs_in(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")["broken"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert_history(client, mr.info.run_id, "test_roc_auc",
                   {r["round"]: r["test_roc_auc"] for r in rows(run / "rounds.jsonl")})


def test_site_names_become_metric_names_mlflow_accepts_and_a_uri_without_tracking_is_an_error():
    from mlflow.utils.validation import _validate_metric_name

    from common.config import RunConfig
    from experiment.mlflow_sink import site_metrics

    for site in ("site-3", "Hospital A", "uk/leeds:ct", "../x", "ä"):
        named = site_metrics("train", site, {"train-loss": 0.5, "dp-epsilon": 2.0, "started-at": 1.0})
        assert len(named) == 2 and all(k.startswith(("train_loss/", "dp_epsilon/")) for k in named)
        for key in named:
            _validate_metric_name(key)  # raises on a name MLflow refuses
    assert site_metrics("evaluate", "site-0", {"roc_auc": float("nan"), "loss": 0.25}) == {"val_loss/site-0": 0.25}
    with pytest.raises(ValueError, match="--tracking-uri .* --tracking mlflow"):
        RunConfig(tracking_uri="http://127.0.0.1:5000")
