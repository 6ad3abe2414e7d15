"""The comparison report: centralized vs federated, per metric and per hospital.

Builds one Markdown file and one self-contained HTML page (PNGs embedded) from finished
results folders. Every number is read from the runs' own files (``summary.json``,
``rounds.jsonl``, ``events.jsonl``, ``test_predictions.npz``, ``audit.json``), so the
report can be rebuilt at any time and always agrees with them.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.plots import learning_curves, roc_curves, site_curves
from common.atomic import atomic_write_text
from common.evaluation import froc
from common.evaluation.metrics import binary_metrics
from experiment.results import NOTICE, RunDir

log = logging.getLogger(__name__)

SHOWN = [("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("cpm", "CPM"), ("accuracy", "accuracy (natural ratio)"),
         ("balanced_accuracy", "balanced accuracy"), ("precision", "precision"), ("recall", "recall"),
         ("specificity", "specificity"), ("f1", "F1")]


@dataclass
class Run:
    label: str
    path: Path
    config: dict
    summary: dict
    rounds: list[dict]
    events: list[dict]
    predictions: dict | None
    audit: dict | None

    @classmethod
    def load(cls, label: str, path: Path | str) -> Run:
        rd = RunDir.open(path, "run", needs=("summary.json",))
        preds = rd.load_predictions() if (rd.path / "test_predictions.npz").exists() else None
        return cls(label, rd.path, rd.saved()["config"], rd.summary(), rd.rounds(), rd.events(), preds,
                   rd.optional_json("audit.json"))

    @property
    def federated(self) -> bool:
        return self.config["mode"] == "federated"

    def metric(self, key: str) -> float:
        return float(self.summary["test"]["metrics"].get(key, math.nan))

    def ci(self, key: str) -> list[float] | None:
        return self.summary["test"]["ci95"].get(key)

    def bytes_total(self) -> int:
        return int(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in self.rounds))

    def describe(self) -> str:
        c = self.config
        if not self.federated:
            return f"centralized, {c['rounds'] * c['local_epochs']} epochs on pooled data"
        dp = "" if c["dp"] == "off" else f", DP {c['dp']} eps {c['dp_epsilon'] or 'n/a'}"
        return f"{c['clients']} sites, {c['partition']}, {c['strategy']}{dp}"


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def with_ci(run: Run, key: str) -> str:
    ci = run.ci(key)
    point = fmt(run.metric(key))
    return f"{point} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and all(c is not None for c in ci) else point


def paired_auc_difference(a: Run, b: Run, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float] | None:
    """AUC(b) - AUC(a) on the same test candidates, with a 95% CI from a paired bootstrap over patients."""
    if a.predictions is None or b.predictions is None:
        return None
    pa, pb = a.predictions, b.predictions
    if len(pa["labels"]) != len(pb["labels"]) or not np.array_equal(pa["seriesuid"], pb["seriesuid"]):
        return None
    y = pa["labels"]
    uniq, inv = np.unique(pa["seriesuid"], return_inverse=True)
    groups = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        if 0 < y[idx].sum() < len(idx):
            diffs.append(binary_metrics(y[idx], pb["logits"][idx])["roc_auc"]
                         - binary_metrics(y[idx], pa["logits"][idx])["roc_auc"])
    point = binary_metrics(y, pb["logits"])["roc_auc"] - binary_metrics(y, pa["logits"])["roc_auc"]
    return point, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def site_table(run: Run) -> list[dict]:
    """Each site's figures in the last round it reported: is any hospital left behind?"""
    last: dict[str, dict] = {}
    trained: dict[str, dict] = {}
    failures: dict[str, int] = {}
    for e in run.events:
        if e["kind"] == "evaluate":
            last[e["site"]] = e
        elif e["kind"] == "train":
            trained[e["site"]] = e
        elif e["kind"] in ("failure", "rejected"):
            failures[e["site"]] = failures.get(e["site"], 0) + 1
    rows = []
    for site in sorted(set(last) | set(trained)):
        ev, tr = last.get(site, {}), trained.get(site, {})
        rows.append({"site": site, "val_candidates": ev.get("num-examples"), "val_roc_auc": ev.get("roc_auc"),
                     "val_accuracy": ev.get("accuracy"), "val_recall": ev.get("recall"), "val_loss": ev.get("loss"),
                     "train_examples_per_epoch": tr.get("num-examples"), "failed_or_rejected": failures.get(site, 0),
                     "dp_epsilon": tr.get("dp-epsilon")})
    return rows


def sequential_steps(run: Run) -> list[tuple[float, float]]:
    """(optimizer steps behind the global model, test ROC-AUC) after each evaluated round.

    A federated round moves the global model by one site's local path (about
    ``local_epochs x site examples / batch`` steps; averaging sites runs them side by side,
    not one after another); a centralized epoch is ``pooled examples / batch`` steps.
    """
    b = int(run.config["batch_size"])
    if run.federated:
        per_round: dict[int, list[float]] = {}
        for e in run.events:
            if e["kind"] == "train" and e.get("train-examples") and e.get("num-examples"):
                epochs = round(float(e["train-examples"]) / float(e["num-examples"]))
                per_round.setdefault(int(e["round"]), []).append(epochs * math.ceil(float(e["num-examples"]) / b))
        steps, out = 0.0, []
        for r in run.rounds:
            steps += float(np.mean(per_round[r["round"]])) if r["round"] in per_round else 0.0
            if "test_roc_auc" in r:
                out.append((steps, float(r["test_roc_auc"])))
        return out
    steps, out = 0.0, []
    for r in run.rounds:
        seen = r.get("train_examples", r.get("images_per_s", 0.0) * r.get("train_seconds", 0.0))
        steps += float(seen) / b
        if "test_roc_auc" in r:
            out.append((steps, float(r["test_roc_auc"])))
    return out


def auc_at_steps(curve: list[tuple[float, float]], steps: float) -> float:
    """The curve's AUC after ``steps`` optimizer steps (linear between evaluated points)."""
    if not curve or steps < curve[0][0] or steps > curve[-1][0]:
        return math.nan
    xs, ys = zip(*curve, strict=True)
    return float(np.interp(steps, xs, ys))


def froc_result(run: Run) -> froc.FROCResult | None:
    d = run.summary["test"].get("froc")
    if not d:
        return None
    return froc.FROCResult(d["cpm"], tuple(d["sensitivities"]), np.array(d["fps_per_scan"]),
                           np.array(d["sensitivity"]), d["n_scans"], d["n_nodules"], d["n_marks"],
                           tuple(d["cpm_ci"]) if d["cpm_ci"] else None, None)


def build_report(runs: list[Run], out: Path, folds: list[Run] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (with the plots) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    learning_curves({r.label: r.rounds for r in runs}, out / "learning_curves.png", NOTICE)
    images["Learning curves (x: passes over the training data)"] = out / "learning_curves.png"
    rocs = {r.label: (r.predictions["labels"], r.predictions["logits"]) for r in runs if r.predictions is not None}
    if rocs:
        roc_curves(rocs, out / "roc.png")
        images["ROC curves on the test split"] = out / "roc.png"
    frocs = {r.label: f for r in runs if (f := froc_result(r)) is not None}
    if frocs:
        froc.plot_froc(frocs, out / "froc.png")
        images["FROC curves (LUNA16 candidate metric)"] = out / "froc.png"
    for k, r in enumerate(x for x in runs if x.federated and x.events):
        site_curves(r.rounds, r.events, out / f"site_curves-{k}.png", r.label)
        images[f"Each site beside the global model: {r.label}"] = out / f"site_curves-{k}.png"
    from analysis.cams import cam_figures

    cam_docs = {r.label: doc for r in runs if (doc := cam_figures(r.path)) is not None}
    cams = {label: pngs for label, (pngs, _) in cam_docs.items()}

    central = next((r for r in runs if not r.federated), None)
    md: list[str] = ["# Centralized vs federated: lung-nodule classification", "", f"> {NOTICE}", ""]
    md += ["## Runs", "", "| run | setting | data passes | wall time | bytes communicated | folder |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        md.append(f"| {r.label} | {r.describe()} | {r.summary['data_passes']} | "
                  f"{r.summary['wall_seconds'] / 60:.1f} min | {r.bytes_total() / 2**30:.2f} GiB | `{r.path}` |")
    ratio = runs[0].summary["test"].get("class_ratio", "")
    md += ["", "## Test metrics with 95% confidence intervals (bootstrap over patients)", "",
           f"Test split: {runs[0].summary['test']['test_scans']} held-out scans, "
           f"{runs[0].summary['test']['test_candidates']} candidates, class ratio {ratio}. Accuracy at the "
           "natural ratio is shown beside balanced accuracy and CPM: answering \"no nodule\" everywhere would "
           "already score the natural share of negatives.", "",
           "| run | " + " | ".join(name for _, name in SHOWN) + " |", "| --- |" + " --- |" * len(SHOWN)]
    for r in runs:
        md.append(f"| {r.label} | " + " | ".join(with_ci(r, k) for k, _ in SHOWN) + " |")
    if central is not None:
        md += ["", "## What federation costs (test ROC-AUC minus centralized, paired bootstrap over patients)", "",
               "| run | ΔAUC | 95% CI | ΔCPM |", "| --- | --- | --- | --- |"]
        for r in runs:
            if r is central:
                continue
            d = paired_auc_difference(central, r)
            dcpm = r.metric("cpm") - central.metric("cpm")
            md.append(f"| {r.label} | {fmt(d[0]) if d else 'n/a'} | "
                      f"{f'[{fmt(d[1])}, {fmt(d[2])}]' if d else 'n/a'} | {fmt(dcpm)} |")
        central_curve = sequential_steps(central)
        fed = [(r, c) for r in runs if r.federated and (c := sequential_steps(r))]
        if central_curve and fed:
            md += ["", "### Why: optimizer steps behind the final model", "",
                   "At equal passes over the data, a federated global model has moved along one site's local "
                   "path per round (local epochs x the site's examples / batch); FedAvg averages sites side by "
                   "side, it does not chain them. The centralized model takes the pooled data's steps one after "
                   "another. Where the federated AUC equals the centralized AUC after as many steps, the gap is "
                   "optimization progress (more rounds close it), not client drift or BatchNorm averaging.", "",
                   "| run | steps behind the final model | its test AUC | centralized AUC after as many steps | "
                   "centralized steps |", "| --- | --- | --- | --- | --- |"]
            md.append(f"| {central.label} | {central_curve[-1][0]:.0f} | {fmt(central_curve[-1][1])} | | |")
            for r, c in fed:
                md.append(f"| {r.label} | {c[-1][0]:.0f} | {fmt(c[-1][1])} | "
                          f"{fmt(auc_at_steps(central_curve, c[-1][0]))} | "
                          f"{central_curve[-1][0]:.0f} |")
    priv = [r for r in runs if r.audit is not None or r.config["dp"] != "off"]
    if priv:
        md += ["", "## Utility against privacy", "",
               "Membership inference: a loss-threshold attack on the final global model (members: the sites' "
               "training patches; non-members: test patches). Attack AUC 0.5 = no better than a coin. The privacy "
               "unit of local DP is one CT patch; a patient contributes many patches, so a patient's protection is "
               "weaker than the patch-level epsilon.", "",
               "A run that starts from given weights (`--weights`, e.g. a model trained on public data) shows "
               "their test ROC-AUC before any round: what the sites' private training added is the difference.", "",
               "| run | DP | epsilon (max over sites) | start (test ROC-AUC) | test ROC-AUC | attack AUC "
               "| attack TPR at 1% FPR |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in priv:
            p = r.summary.get("privacy", {})
            eps = p.get("epsilon_max", p.get("epsilon"))
            a = r.audit or {}
            start0 = [x.get("test_roc_auc") for x in r.rounds if x.get("round") == 0]
            w = Path(r.config.get("weights") or "")
            start = f"{w.parent.name}/{w.name} ({fmt(start0[0] if start0 else None)})" if w.name else "random"
            md.append(f"| {r.label} | {r.config['dp']} | {fmt(eps, 2)} | {start} | {fmt(r.metric('roc_auc'))} | "
                      f"{fmt(a.get('attack_auc'))} | {fmt(a.get('tpr_at_1pct_fpr'))} |")
    for r in runs:
        if not r.federated:
            continue
        rows = site_table(r)
        if not rows:
            continue
        md += ["", f"## Per site: {r.label}", "", "Each site's validation figures for the final global model "
               "(the last round it reported), its training examples per epoch, and how often it failed or was "
               "rejected.", "",
               "| site | val candidates | val ROC-AUC | val accuracy | val recall | val loss | train examples/epoch "
               "| failed/rejected |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in rows:
            md.append(f"| {s['site']} | {fmt(s['val_candidates'], 0)} | {fmt(s['val_roc_auc'])} | "
                      f"{fmt(s['val_accuracy'])} | {fmt(s['val_recall'])} | {fmt(s['val_loss'])} | "
                      f"{fmt(s['train_examples_per_epoch'], 0)} | {s['failed_or_rejected']} |")
    if folds:
        aucs = [f.metric("roc_auc") for f in folds]
        cpms = [f.metric("cpm") for f in folds]
        md += ["", "## LUNA16 cross-validation by subset (centralized baseline)", "",
               "| fold (test subset) | ROC-AUC | CPM |", "| --- | --- | --- |"]
        for f in folds:
            md.append(f"| {f.config['test_subsets']} | {fmt(f.metric('roc_auc'))} | {fmt(f.metric('cpm'))} |")
        md.append(f"| mean ± sd | {fmt(float(np.nanmean(aucs)))} ± {fmt(float(np.nanstd(aucs)))} | "
                  f"{fmt(float(np.nanmean(cpms)))} ± {fmt(float(np.nanstd(cpms)))} |")
    if cam_docs:
        md += ["", "## Where the model looks (Class Activation Maps)", "",
               "Pointing game: the share of test patches whose heatmap peak falls inside the annotated nodule "
               "(axial plane), with the controls that make it meaningful: the patch centre as the peak, the same "
               "heatmap from an untrained model, and the brightest spot of the patch. 'Off-centre' moves each "
               "nodule 0.8 radii away from the patch centre, so pointing at the centre no longer scores.", "",
               "| run | method / layer | true positives | all positives | off-centre | untrained model (all "
               "positives) | patch centre (off-centre) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, (_, sc) in cam_docs.items():
            pg = sc.get("pointing_game", {})
            tp, pos, sh = pg.get("true_positives", {}), pg.get("positives", {}), pg.get("shifted", {})
            md.append(f"| {label} | {pg.get('method')} {pg.get('layer')} | {fmt(tp.get('axial'))} (n={tp.get('n')}) "
                      f"| {fmt(pos.get('axial'))} (n={pos.get('n')}) | {fmt(sh.get('axial'))} | "
                      f"{fmt(pos.get('random_init', {}).get('axial'))} | "
                      f"{fmt(sh.get('centre_baseline', {}).get('axial'))} |")
    md += ["", "## Plots", ""]
    for title, path in images.items():
        md += [f"### {title}", "", f"![{title}]({path.name})", ""]
    for label, files in cams.items():
        for f in files:
            md += [f"### Where the model looks: {label} ({f.name})", "", f"![{label}]({f})", ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    html_path = out / "report.html"
    atomic_write_text(html_path, to_html(md, images, cams))
    return md_path, html_path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def to_html(md: list[str], images: dict[str, Path], cams: dict[str, list[Path]]) -> str:
    """A small Markdown-to-HTML for what the report uses: headings, tables, quotes, images."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                  for row in rest) + "</table>")
            table.clear()

    paths = {p.name: p for p in images.values()} | {str(f): f for fs in cams.values() for f in fs}
    for line in md:
        if line.startswith("|"):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if not all(set(c) <= set("- ") for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{html.escape(line[2:])}</blockquote>")
        elif line.startswith("!["):
            target = line[line.index("](") + 2:-1]
            if target in paths:
                body.append(f'<img alt="{html.escape(target)}" src="{_data_uri(paths[target])}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "th{background:#f4f4f4}img{max-width:100%}blockquote{background:#fff4e5;padding:8px;"
             "border-left:4px solid #e69500}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>luna-fl comparison report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
