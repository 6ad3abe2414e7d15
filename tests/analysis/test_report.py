"""The comparison report builds from small finished runs and agrees with their JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, tiny_args


def test_report_builds_and_its_numbers_equal_the_runs_json(finished_runs, tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(finished_runs.runs / "central"),
                        str(finished_runs.runs / "fed"), "--labels", "central", "fed", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in ("central", "fed"):
        summary = json.loads((finished_runs.runs / name / "summary.json").read_text())
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
    fed_cfg = json.loads((finished_runs.runs / "fed" / "config.json").read_text())["config"]
    trains = [e for e in map(json.loads, (finished_runs.runs / "fed" / "events.jsonl").read_text().splitlines())
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
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(finished_runs.runs / "central"), "--labels",
                        "central", "--folds", "0,9", "--runs-dir", str(tmp_path / "folds"), "--out",
                        str(tmp_path / "report"), "--data", str(tiny_root), "--cache-dir", str(tmp_path / "cache"),
                        *tiny_args(*TINY)],
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
    common = ["--data", str(tiny_root), "--cache-dir", str(tmp_path / "cache"), *tiny_args(*TINY)]
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


# ---- the report in a real browser: headless Chromium driven over the DevTools protocol ----
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1280,900")


class DevTools:
    """A minimal Chrome DevTools protocol client: commands and the events they cause."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv()))
        return next(e for e in self.events if e.get("method") == method)


def open_in_chromium(page: Path, screenshot: Path) -> tuple[dict, list[str]]:
    """Load ``page`` in headless Chromium; return what the page shows and every URL it requested."""
    import base64
    import shutil
    import tempfile
    import time
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    proc = subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, "Chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:  # loopback only
            target = next(t for t in json.load(r) if t["type"] == "page")
        cdp = DevTools(target["webSocketDebuggerUrl"])
        cdp.call("Network.enable")
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=page.resolve().as_uri())
        cdp.wait_for("Page.loadEventFired")
        shown = cdp.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            title: document.title, text: document.body.innerText.length,
            tables: document.querySelectorAll('table').length,
            images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                    h: i.naturalHeight, shown: i.getBoundingClientRect().width}))
        })""")["result"]["value"]
        size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        requested = [e["params"]["request"]["url"] for e in cdp.events
                     if e.get("method") == "Network.requestWillBeSent"]
        cdp.ws.close()
        return json.loads(shown), requested
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_report_renders_offline_in_a_real_browser_with_every_image(finished_runs, tmp_path):
    import shutil

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="websocket-client is a dev dependency: pip install -e '.[dev]'")
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "sim/compare.py", "--runs", str(finished_runs.runs / "central"),
                        str(finished_runs.runs / "fed"), "--labels", "central", "fed", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    page = out / "report.html"
    shown, requested = open_in_chromium(page, out / "report.png")
    assert shown["title"] == "luna-fl comparison report" and shown["tables"] >= 4 and shown["text"] > 2000
    embedded = page.read_text().count("<img ")
    assert len(shown["images"]) == embedded >= 4  # learning curves, per-site curves, ROC, FROC
    for img in shown["images"]:  # every image decoded and laid out
        assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
    # offline and self-contained: the page itself and its data: images, nothing else
    assert requested and requested[0] == page.resolve().as_uri()
    assert all(u.startswith(("file:", "data:")) for u in requested), requested
    assert [u for u in requested if u.startswith("file:")] == [page.resolve().as_uri()]
    assert (out / "report.png").stat().st_size > 20_000  # the screenshot, beside the report


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_explanation_and_operating_point_are_computed_from_the_runs(finished_runs, tmp_path):
    """The catch-up table and its sentences come from rounds.jsonl; the operating-point row from summary.json."""
    from analysis.report import CLOSE, Run, build_report

    central, fed = Run.load("central", finished_runs.runs / "central"), Run.load("fed", finished_runs.runs / "fed")
    md = build_report([central, fed], tmp_path / "r")[0].read_text().splitlines()
    c_auc = json.loads((finished_runs.runs / "central" / "summary.json").read_text())["test"]["metrics"]["roc_auc"]
    target = c_auc - CLOSE
    fed_summary = json.loads((finished_runs.runs / "fed" / "summary.json").read_text())
    # every round's aggregate, then the final model (its BatchNorm statistics re-estimated at the sites)
    curve = [(r["data_passes"], r["test_roc_auc"]) for r in _rows(finished_runs.runs / "fed" / "rounds.jsonl")
             if "test_roc_auc" in r] + [(fed_summary["data_passes"], fed_summary["test"]["metrics"]["roc_auc"])]
    needed = next((p for p, a in curve if a >= target), None)
    head = next(i for i, line in enumerate(md) if "passes the federated run needed" in line)
    row = next(line for line in md[head:] if line.startswith("| fed | "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == round(target, 3)
    if needed is None:
        assert cells[2] == f"not within its {fed_summary['data_passes']} passes"
        assert any(line.startswith("- fed did not come within") for line in md)
    else:
        assert cells[2] == str(needed)
        assert any(line.startswith(f"- fed came within {CLOSE} of centralized") for line in md)
    assert float(cells[4]) == round(fed_summary["test"]["metrics"]["roc_auc"] - c_auc, 3)
    # the steps sentence is chosen by the numbers: nothing to explain within CLOSE, else the gap named
    gap = fed_summary["test"]["metrics"]["roc_auc"] - c_auc
    sentence = next(line for line in md if line.startswith("- fed: "))
    if gap >= -CLOSE:
        assert "nothing to explain" in sentence
    else:
        assert sentence.startswith(f"- fed: {-gap:.3f} below centralized")
    assert fed_summary["data_passes"] == 2 and "at equal data passes" in sentence  # 2 x 1 epoch; 2 epochs
    # a federated run of more passes is not said to be at equal passes
    from analysis.report import explain_gap

    fed.summary = {**fed.summary, "data_passes": 4}
    for same_steps in (0.5, float("nan")):  # each sentence the numbers can choose
        assert "at 4 data passes against centralized's 2" in explain_gap(fed, central, 0.5, same_steps)
    for name in ("central", "fed"):
        op = json.loads((finished_runs.runs / name / "summary.json").read_text())["test"]["operating_point"]
        line = next(x for x in md if x.startswith(f"| {name} | {op['threshold']:g} ("))
        assert f"{100 * op['metrics']['recall']:.1f}%" in line.split("|")[4]
        assert f"{100 * op['metrics']['precision']:.1f}%" in line.split("|")[5]
    from common.config import RunConfig

    rule = RunConfig().op_rule
    assert "sites' summed validation counts" in next(x for x in md if x.startswith("| fed | ") and rule in x)
    assert "pooled validation split" in next(x for x in md if x.startswith("| central | ") and rule in x)


def test_seeds_run_every_arm_with_every_seed_and_the_report_gives_mean_sd(tiny_root, finished_runs, tmp_path):
    import os
    import shutil

    import numpy as np

    from common.evaluation.metrics import binary_metrics

    env = {**os.environ, "LUNAFL_HOME": str(tmp_path / "home")}
    # seed 3's two arms are the session's finished runs (the same settings): compare.py reads a
    # finished arm instead of running it again, and runs seed 4's
    for arm, name in (("centralized", "central"), ("fed-iid-fedavg", "fed")):
        shutil.copytree(finished_runs.runs / name, tmp_path / "runs" / f"{arm}-seed3")
    p = subprocess.run([sys.executable, "sim/compare.py", "--seeds", "3,4", "--arms", "centralized,fed-iid-fedavg",
                        "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--data",
                        str(tiny_root), "--cache-dir", str(tmp_path / "cache"),
                        *tiny_args("image_size", "arch", "batch_size", "workers", "clients", "local_epochs", rounds=2)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    for arm in ("centralized", "fed-iid-fedavg"):
        assert f"{arm}-seed3: finished earlier, reading it" in p.stdout
        assert f"{arm}-seed4: finished earlier" not in p.stdout
    runs = {}
    for arm in ("centralized", "fed-iid-fedavg"):
        for seed in (3, 4):
            path = tmp_path / "runs" / f"{arm}-seed{seed}"
            assert json.loads((path / "config.json").read_text())["config"]["seed"] == seed
            runs[arm, seed] = json.loads((path / "summary.json").read_text())
    md = (tmp_path / "report" / "report.md").read_text().splitlines()
    for arm, label in (("centralized", "centralized"), ("fed-iid-fedavg", "federated IID FedAvg")):
        aucs = [runs[arm, s]["test"]["metrics"]["roc_auc"] for s in (3, 4)]
        row = next(line for line in md if line.startswith(f"| {label} | 3, 4 | "))
        assert f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in row.split("|")[3]
        for s in (3, 4):
            lo, hi = runs[arm, s]["test"]["ci95"]["roc_auc"]
            assert f"seed {s}: {aucs[(3, 4).index(s)]:.3f} [{lo:.3f}, {hi:.3f}]" in row
    # the paired ΔAUC of each seed is against the centralized run of the same seed
    deltas = []
    for s in (3, 4):
        c = np.load(tmp_path / "runs" / f"centralized-seed{s}" / "test_predictions.npz")
        f = np.load(tmp_path / "runs" / f"fed-iid-fedavg-seed{s}" / "test_predictions.npz")
        d = binary_metrics(f["labels"], f["logits"])["roc_auc"] - binary_metrics(c["labels"], c["logits"])["roc_auc"]
        deltas.append(d)
        row = next(line for line in md if line.startswith(f"| federated IID FedAvg (seed {s}) | {s} | "))
        assert float(row.split("|")[3]) == round(d, 3)
    row = next(line for line in md if line.startswith("| federated IID FedAvg | ") and "of 2" in line)
    assert f"{np.mean(deltas):.3f} ± {np.std(deltas, ddof=1):.3f}" in row
    bad = subprocess.run([sys.executable, "sim/compare.py", "--arms", "nope", "--runs-dir", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown nope" in bad.stderr


def test_the_cam_section_leads_with_the_off_centre_scores_beside_their_best_control():
    from analysis.report import HEADLINE_COLUMNS, cam_scores

    head = {k: {"n": 7, "rate": 0.5 + i / 10, "best_control": 0.25, "ci95": [0, 1], "margin": 0.25 + i / 10}
            for i, (k, _) in enumerate(HEADLINE_COLUMNS) if k != "two_nodules_each"}
    doc = {"pointing_game": {"method": "gradcam", "layer": "layer2", "headline": head,
                             "true_positives": {"axial": 1.0, "centre_baseline": {"axial": 1.0}}}}
    slices = {"slices": 3, "nodules": 4, "found": 3, "rate": 0.75, "false_maxima_per_slice": 2.333}
    md = cam_scores({"fed": ([], doc), "central": ([], {**doc, "slices": slices})})
    row = next(line for line in md if line.startswith("| fed |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "gradcam layer2" and cells[2] == "0.500 / 0.250 (n=7)" and cells[3] == "0.600 / 0.250 (n=7)"
    assert cells[6] == "n/a" and cells[7] == "n/a" and cells[8] == "1.000 (1.000)"
    central = [c.strip() for c in next(line for line in md if line.startswith("| central |")).strip("|").split("|")]
    assert central[7] == "3/4 (0.750) / 2.3"
    # with the classifier's own calls at the nodules' centres (cam.json since 2026-12-07)
    newer = {**slices, "called_at_centre": 2, "found_of_called": 2, "found_not_called": 1}
    md = cam_scores({"central": ([], {**doc, "slices": newer})})
    row = next(line for line in md if line.startswith("| central |"))
    assert row.split("|")[8].strip() == "3/4 (0.750) / 2.3; called at centre 2, found of those 2"
    assert cam_scores({}) == []


def test_a_resumed_runs_wall_time_is_summed_over_its_sessions():
    from analysis.report import wall_time

    assert wall_time({"wall_seconds": 90.0}) == "1.5 min"  # a summary written before resumes were summed
    assert wall_time({"wall_seconds": 90.0, "resumed_after_round": 0, "wall_seconds_all_sessions": 90.0}) == "1.5 min"
    assert wall_time({"wall_seconds": 60.0, "resumed_after_round": 8, "wall_seconds_all_sessions": 780.0}) == (
        "at least 13.0 min (resumed after round 8; this session 1.0 min)")


def test_the_setting_column_names_every_training_option_changed_from_its_default():
    import dataclasses

    from analysis.report import Run
    from common.config import RunConfig

    def describe(**changes) -> str:
        cfg = dataclasses.asdict(RunConfig(**changes))
        return Run("x", Path("x"), cfg, {}, [], [], None, None).describe()

    assert describe() == "8 sites, iid, fedavgm"
    assert describe(partition="scanner", fedbn=True, lr_schedule="cosine", batch_size=8) == \
        "8 sites, scanner, fedavgm, --batch-size 8, --lr-schedule cosine, --fedbn"
    assert describe(mode="centralized", lr_schedule="cosine", rounds=16) == \
        "centralized, 48 epochs on pooled data, --rounds 16, --lr-schedule cosine"
    assert describe(augment=False) == "8 sites, iid, fedavgm, --no-augment"
    assert describe(partition="scanner", augment_scanner=True) == "8 sites, scanner, fedavgm, --augment-scanner"
    assert describe(augment_offsets=4, augment_offset_mm=2.0) == \
        "8 sites, iid, fedavgm, --augment-offsets 4, --augment-offset-mm 2.0"
    assert describe(augment_offset_mm=2.0) == "8 sites, iid, fedavgm"  # read only with copies
    # a strategy's own settings only where that strategy reads them
    assert describe(strategy="fedadam", server_lr=0.03) == "8 sites, iid, fedadam, --server-lr 0.03"
    assert describe(strategy="fedavg", server_lr=0.03) == "8 sites, iid, fedavg"
    assert describe(partition="dirichlet", alpha=0.1) == "8 sites, dirichlet, fedavgm, --alpha 0.1"
