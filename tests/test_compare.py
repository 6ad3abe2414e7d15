"""The comparison report builds from small finished runs and agrees with their JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_runs(tiny_root, tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("cmp")
    env = {**os.environ, "LUNAFL_HOME": str(tmp / "home")}
    common = ["--data", str(tiny_root), "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "runs"),
              "--image-size", "32", "--arch", "resnet10", "--batch-size", "8", "--workers", "1", "--seed", "3",
              "--clients", "2", "--rounds", "2", "--local-epochs", "1"]
    for name, extra in (("central", ["--mode", "centralized"]), ("fed", [])):
        p = subprocess.run([sys.executable, "sim/run.py", *common, *extra, "--run-name", name], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "runs"


def test_report_builds_and_its_numbers_equal_the_runs_json(finished_runs, tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(finished_runs / "central"),
                        str(finished_runs / "fed"), "--labels", "central", "fed", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in ("central", "fed"):
        summary = json.loads((finished_runs / name / "summary.json").read_text())
        m = summary["test"]["metrics"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} | ") and "[" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        auc, cpm, acc = (float(re.match(r"[-\d.]+", cells[i]).group()) for i in (1, 3, 4))
        assert auc == round(m["roc_auc"], 3) and cpm == round(m["cpm"], 3) and acc == round(m["accuracy"], 3)
        lo, hi = summary["test"]["ci95"]["roc_auc"]
        assert f"[{lo:.3f}, {hi:.3f}]" in cells[1]
    assert "ΔAUC" in md and "Per site: fed" in md and "site-0" in md and "site-1" in md
    assert "never use these figures" in md and "accuracy (natural ratio)" in md
    assert page.count("data:image/png;base64,") >= 3  # learning curves, ROC, FROC embedded
    assert "<table>" in page and "src=\"learning_curves.png\"" not in page  # self-contained
    # the optimizer-steps evidence: a federated round moves the model by one site's local path
    fed_cfg = json.loads((finished_runs / "fed" / "config.json").read_text())["config"]
    trains = [e for e in map(json.loads, (finished_runs / "fed" / "events.jsonl").read_text().splitlines())
              if e["kind"] == "train"]
    per_round: dict[int, list[int]] = {}
    for e in trains:
        per_round.setdefault(e["round"], []).append(
            fed_cfg["local_epochs"] * -(-int(e["num-examples"]) // fed_cfg["batch_size"]))
    expected = sum(sum(v) / len(v) for v in per_round.values())
    why = next(line for line in md.splitlines()
               if line.startswith("| fed | ") and "[" not in line and "site" not in line and line.count("|") == 6)
    assert float(why.split("|")[2]) == pytest.approx(expected, abs=0.5)


def test_report_names_an_unfinished_folder(tmp_path):
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(tmp_path), "--out", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no summary.json" in p.stderr


def test_folds_run_the_baseline_once_per_test_subset(finished_runs, tiny_root, tmp_path):
    import csv
    import os

    env = {**os.environ, "LUNAFL_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(finished_runs / "central"), "--labels",
                        "central", "--folds", "0,9", "--runs-dir", str(tmp_path / "folds"), "--out",
                        str(tmp_path / "report"), "--data", str(tiny_root), "--cache-dir", str(tmp_path / "cache"),
                        "--image-size", "32", "--arch", "resnet10", "--batch-size", "8", "--workers", "1",
                        "--seed", "3", "--clients", "2", "--rounds", "1", "--local-epochs", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    subset_of = {f.stem: int(f.parent.name.removeprefix("subset")) for f in tiny_root.glob("subset*/*.mhd")}
    for k in (0, 9):
        run = tmp_path / "folds" / f"fold-{k}"
        cfg = json.loads((run / "config.json").read_text())["config"]
        assert cfg["mode"] == "centralized" and str(cfg["test_subsets"]) == str(k)
        test = json.loads((run / "sites.json").read_text())["test"]
        assert test and {subset_of[u] for u in test} == {k}  # fold k tests on subset k only
        with open(run / "submission.csv") as fh:
            assert {row["seriesuid"] for row in csv.DictReader(fh)} == set(test)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "LUNA16 cross-validation by subset" in md and "mean ± sd" in md


def test_roc_plot_of_a_model_with_non_finite_outputs_says_so_instead_of_failing(tmp_path):
    """A poisoned FedAvg model can output NaN (negative BatchNorm variances): its run must still finish."""
    import numpy as np

    from analysis.plots import roc_curves

    y = np.array([0, 1, 0, 1, 0], dtype=np.float32)
    legend = roc_curves({"poisoned": (y, np.full(5, np.nan, dtype=np.float32)),
                         "fine": (y, np.array([0.1, 0.9, 0.2, 0.7, 0.3], dtype=np.float32))}, tmp_path / "roc.png")
    assert legend == ["poisoned: no curve, the model gives non-finite outputs", "fine (AUC 1.000)"]
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_dp_from_public_pretraining_uses_other_data_and_the_report_shows_its_start(tiny_root, tmp_path,
                                                                                   monkeypatch):
    """compare --privacy's public-pretraining row, small: the public model trains without DP on
    synthetic scans of another seed (never the sites' scans), a real DP federation starts from
    it, and the privacy table shows that start's own test AUC beside the final one."""
    from analysis.report import Run, build_report
    from sim import compare

    monkeypatch.setenv("LUNAFL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(compare, "PUBLIC_SCANS", 12)
    monkeypatch.setattr(compare, "PUBLIC_EPOCHS", 3)
    common = ["--data", str(tiny_root), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--arch",
              "resnet10", "--batch-size", "8", "--workers", "1", "--seed", "3", "--clients", "2", "--rounds", "1",
              "--local-epochs", "1"]
    weights = compare.public_model("", 3, common, tmp_path / "runs")
    public_cfg = json.loads((weights.parent / "config.json").read_text())["config"]
    public_data = Path(public_cfg["data"])
    assert public_cfg["mode"] == "centralized" and public_cfg["norm"] == "group" and public_cfg["dp"] == "off"
    assert json.loads((public_data / "synthetic.json").read_text())["seed"] == 14
    uids = {f.stem for f in public_data.glob("subset*/*.mhd")}
    assert uids and not uids & {f.stem for f in tiny_root.glob("subset*/*.mhd")}

    label, name, extra = compare.public_dp_run(weights)
    run = Run.load(label, compare.run_one(name, extra, common, tmp_path / "runs"))
    assert run.config["weights"] == str(weights) and run.config["dp"] == "local"
    assert run.summary["privacy"]["epsilon_max"] <= 8.0 + 1e-6
    start = next(r["test_roc_auc"] for r in run.rounds if r["round"] == 0)
    md, _ = build_report([run], tmp_path / "report")
    row = next(line for line in md.read_text().splitlines() if line.startswith(f"| {label} | local |"))
    assert f"public-model/model_final.pt ({start:.3f})" in row
