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
import re
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


# settings that change what a run learns, named in the report's "setting" column when not at their default
DESCRIBED = ("rounds", "local_epochs", "batch_size", "optimizer", "lr", "weight_decay", "lr_schedule",
             "warmup_passes", "site_optimizer", "bn_stats", "fedbn", "neg_ratio", "augment", "augment_shift_mm",
             "augment_offsets", "augment_scanner", "arch", "norm", "image_size", "train_params")
DESCRIBED_WHEN = {"server_lr": lambda c: c.get("strategy") in ("fedavgm", "fedadam", "fedyogi"),
                  "server_momentum": lambda c: c.get("strategy") == "fedavgm",
                  "proximal_mu": lambda c: c.get("strategy") == "fedprox",
                  "alpha": lambda c: c.get("partition") == "dirichlet",
                  "augment_offset_mm": lambda c: bool(c.get("augment_offsets"))}


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

    @property
    def arm(self) -> str:
        """The label without its seed: runs of one arm differ only in ``--seed``."""
        return re.sub(r"\s*\(seed \d+\)$", "", self.label)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def operating_point(self) -> dict | None:
        return self.summary["test"].get("operating_point")

    def metric(self, key: str) -> float:
        return float(self.summary["test"]["metrics"].get(key, math.nan))

    def ci(self, key: str) -> list[float] | None:
        return self.summary["test"]["ci95"].get(key)

    def bytes_total(self) -> int:
        return int(sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in self.rounds))

    def describe(self) -> str:
        c = self.config
        changed = "".join(f", {o}" for o in self.changed_options())
        if not self.federated:
            return f"centralized, {c['rounds'] * c['local_epochs']} epochs on pooled data{changed}"
        dp = "" if c["dp"] == "off" else f", DP {c['dp']} eps {c['dp_epsilon'] or 'n/a'}"
        return f"{c['clients']} sites, {c['partition']}, {c['strategy']}{dp}{changed}"

    def changed_options(self) -> list[str]:
        """The training settings this run changed from their defaults, as ``sim/run.py`` options
        (``--lr-schedule cosine``, ``--fedbn``), so runs that differ in them can be told apart."""
        from common.config import RunConfig

        default, c = RunConfig(), self.config
        keys = list(DESCRIBED) + [k for k, when in DESCRIBED_WHEN.items() if when(c)]
        out = []
        for k in keys:
            if k in c and c[k] != getattr(default, k):
                flag = "--" + k.replace("_", "-")
                out.append(flag if c[k] is True else f"--no-{flag[2:]}" if c[k] is False else f"{flag} {c[k]}")
        return out


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


CLOSE = 0.01  # "as good as pooled": within this much test ROC-AUC of the centralized baseline


def auc_curve(run: Run) -> list[tuple[int, float]]:
    """(data passes, test ROC-AUC) of every evaluated round, from ``rounds.jsonl``, then the
    final model's from ``summary.json`` at the run's last pass: in a federated run its BatchNorm
    statistics may have been re-estimated at the sites after the last round's row."""
    curve = [(int(r["data_passes"]), float(r["test_roc_auc"])) for r in run.rounds
             if "test_roc_auc" in r and math.isfinite(float(r["test_roc_auc"]))]
    final = run.metric("roc_auc")
    if math.isfinite(final):
        curve.append((int(run.summary["data_passes"]), final))
    return curve


def passes_to_reach(run: Run, target: float) -> int | None:
    """The first evaluated number of data passes at which the run's test AUC is at least
    ``target``; None if it never got there within the run."""
    return next((p for p, auc in auc_curve(run) if auc >= target - 1e-12), None)


def central_for(run: Run, runs: list[Run]) -> Run | None:
    """The centralized run to compare ``run`` with: the one with the same seed, else the first."""
    central = [r for r in runs if not r.federated]
    return next((c for c in central if c.seed == run.seed), central[0] if central else None)


def catch_up(run: Run, central: Run) -> dict:
    """How many passes ``run`` needed to come within :data:`CLOSE` of ``central``'s final
    test AUC (read from both runs' learning curves), or the gap it ended with."""
    target = central.metric("roc_auc") - CLOSE
    passes = passes_to_reach(run, target)
    curve = auc_curve(run)
    best = max(curve, key=lambda pa: pa[1]) if curve else (None, math.nan)
    return {"target": target, "passes": passes, "run_passes": int(run.summary["data_passes"]),
            "central_passes": passes_to_reach(central, target), "final_gap": run.metric("roc_auc")
            - central.metric("roc_auc"), "best_auc": best[1], "best_at": best[0]}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value) of the finite values."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def pm(values: list[float]) -> str:
    m, sd = mean_sd(values)
    return f"{fmt(m)} ± {fmt(sd)}" if math.isfinite(sd) else fmt(m)


def pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def froc_result(run: Run) -> froc.FROCResult | None:
    d = run.summary["test"].get("froc")
    if not d:
        return None
    return froc.FROCResult(d["cpm"], tuple(d["sensitivities"]), np.array(d["fps_per_scan"]),
                           np.array(d["sensitivity"]), d["n_scans"], d["n_nodules"], d["n_marks"],
                           tuple(d["cpm_ci"]) if d["cpm_ci"] else None, None)


def explain_gap(run: Run, central: Run, auc: float, central_same_steps: float) -> str:
    """One sentence on ``run``'s gap to ``central``, chosen by the numbers (not fixed prose)."""
    gap = run.metric("roc_auc") - central.metric("roc_auc")
    fp, cp = run.summary["data_passes"], central.summary["data_passes"]
    passes = "equal data passes" if fp == cp else f"{fp} data passes against centralized's {cp}"
    if gap >= -CLOSE:
        return (f"- {run.label}: within {CLOSE} of centralized at {passes} (ΔAUC {fmt(gap)}); nothing "
                "to explain.")
    if not math.isfinite(central_same_steps):
        return (f"- {run.label}: {fmt(-gap)} below centralized at {passes}; its steps fall outside the centralized "
                "curve, so the step count cannot be compared.")
    d = auc - central_same_steps
    if abs(d) <= CLOSE:
        return (f"- {run.label}: {fmt(-gap)} below centralized at {passes}, but within {CLOSE} of centralized "
                f"after as many sequential steps ({fmt(auc)} vs {fmt(central_same_steps)}): the gap is optimization "
                "progress (fewer sequential steps), which more rounds close.")
    if d < 0:
        return (f"- {run.label}: {fmt(-gap)} below centralized at {passes} and {fmt(-d)} below it even after as "
                "many sequential steps: fewer steps do not explain all of the gap (client drift, non-IID sites or "
                "BatchNorm under averaging may).")
    return (f"- {run.label}: {fmt(-gap)} below centralized at {passes}, but {fmt(d)} above it after as many "
            "sequential steps: per step, averaging the sites' paths helps; the gap is the steps it has not taken.")


def figures(runs: list[Run], out: Path) -> tuple[dict[str, Path], dict[str, tuple[list[Path], dict]]]:
    """The report's plots (written into ``out``) by title, and each run's CAM figures and scores."""
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
    return images, cam_docs


def runs_table(runs: list[Run]) -> list[str]:
    """What each run was: setting, data passes, wall time, bytes."""
    md: list[str] = []
    md += ["## Runs", "", "| run | setting | data passes | wall time | bytes communicated | folder |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        md.append(f"| {r.label} | {r.describe()} | {r.summary['data_passes']} | {wall_time(r.summary)} | "
                  f"{r.bytes_total() / 2**30:.2f} GiB | `{r.path}` |")
    return md


def wall_time(summary: dict) -> str:
    """A run's wall time; a resumed run's summed over its sessions' rounds (earlier sessions'
    start-up and any round a crash cut short are not recorded: at least that long)."""
    wall = summary["wall_seconds"] / 60
    after = summary.get("resumed_after_round") or 0
    if not after:
        return f"{wall:.1f} min"
    return (f"at least {summary['wall_seconds_all_sessions'] / 60:.1f} min (resumed after round {after}; "
            f"this session {wall:.1f} min)")


def test_metrics(runs: list[Run]) -> list[str]:
    """Every run's test metrics with 95% CIs at the fixed 0.5."""
    md: list[str] = []
    ratio = runs[0].summary["test"].get("class_ratio", "")
    md += ["", "## Test metrics with 95% confidence intervals (bootstrap over patients)", "",
           f"Test split: {runs[0].summary['test']['test_scans']} held-out scans, "
           f"{runs[0].summary['test']['test_candidates']} candidates, class ratio {ratio}. Accuracy at the "
           "natural ratio is shown beside balanced accuracy and CPM: answering \"no nodule\" everywhere would "
           "already score the natural share of negatives.", "",
           "| run | " + " | ".join(name for _, name in SHOWN) + " |", "| --- |" + " --- |" * len(SHOWN)]
    for r in runs:
        md.append(f"| {r.label} | " + " | ".join(with_ci(r, k) for k, _ in SHOWN) + " |")
    return md


def operating_points(runs: list[Run]) -> list[str]:
    """Threshold metrics at the operating point each run chose without pooling data."""
    md: list[str] = []
    ops = [r for r in runs if r.operating_point]
    if ops:
        md += ["", "## At the operating point chosen without pooling data", "",
               "Beside the fixed 0.5: the threshold each run chose on validation data, never on the test split. "
               "A federated run's sites send only per-threshold counts of their validation positives and negatives "
               "scoring above each of a fixed grid of thresholds; the server adds them up and takes the threshold "
               "the rule names (recall90, the default: the highest threshold that keeps the summed validation recall "
               "at 0.90, a screening point; youden: the one that maximises recall + specificity - 1; f1: F1). "
               "The centralized baseline applies "
               "the same functions to its pooled validation split. Test figures at the natural class ratio, 95% CIs "
               "by bootstrap over patients.", "",
               "| run | threshold (rule, chosen from) | accuracy | recall | precision | at 0.5: accuracy / recall / "
               "precision |", "| --- | --- | --- | --- | --- | --- |"]
        for r in ops:
            op = r.operating_point
            cells = []
            for k in ("accuracy", "recall", "precision"):
                lo, hi = op["ci95"].get(k, (None, None))
                cells.append(f"{pct(op['metrics'][k])} [{pct(lo)}, {pct(hi)}]")
            md.append(f"| {r.label} | {op['threshold']:g} ({op['rule']}, {op['chosen_from']}) | " + " | ".join(cells)
                      + f" | {pct(r.metric('accuracy'))} / {pct(r.metric('recall'))} / {pct(r.metric('precision'))} |")
    return md


def arms_of(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by arm (the same setting with other seeds)."""
    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    return arms


def over_seeds(runs: list[Run], arms: dict[str, list[Run]]) -> list[str]:
    """Mean ± sd over seeds, each run's own CI beside it."""
    md: list[str] = []
    if any(len(v) > 1 for v in arms.values()):
        md += ["", "## Over seeds (mean ± sd across runs; each run's own 95% bootstrap CI beside it)", "",
               "| arm | seeds | ROC-AUC | CPM | accuracy / recall / precision at the operating point | each run: "
               "ROC-AUC [95% CI] |", "| --- | --- | --- | --- | --- | --- |"]
        for arm, group in arms.items():
            at = [[(g.operating_point or {}).get("metrics", {}).get(k, math.nan) for g in group]
                  for k in ("accuracy", "recall", "precision")]
            md.append(f"| {arm} | {', '.join(str(g.seed) for g in group)} | {pm([g.metric('roc_auc') for g in group])} "
                      f"| {pm([g.metric('cpm') for g in group])} | {' / '.join(pm(v) for v in at)} | "
                      + "; ".join(f"seed {g.seed}: {with_ci(g, 'roc_auc')}" for g in group) + " |")
    return md


def federation_cost(runs: list[Run], arms: dict[str, list[Run]]) -> list[str]:
    """Federated minus centralized: paired differences, passes to catch up, steps behind each model."""
    md: list[str] = []
    if next((r for r in runs if not r.federated), None) is not None:
        md += ["", "## What federation costs (test ROC-AUC minus centralized, paired bootstrap over patients)", "",
               "Each federated run is paired with the centralized run of its own seed (same test candidates).", "",
               "| run | seed | ΔAUC | 95% CI | ΔCPM |", "| --- | --- | --- | --- | --- |"]
        deltas: dict[str, list[float]] = {}
        for r in runs:
            c = central_for(r, runs)
            if not r.federated or c is None:
                continue
            d = paired_auc_difference(c, r)
            dcpm = r.metric("cpm") - c.metric("cpm")
            if d:
                deltas.setdefault(r.arm, []).append(d[0])
            md.append(f"| {r.label} | {r.seed} | {fmt(d[0]) if d else 'n/a'} | "
                      f"{f'[{fmt(d[1])}, {fmt(d[2])}]' if d else 'n/a'} | {fmt(dcpm)} |")
        if any(len(v) > 1 for v in deltas.values()):
            md += ["", "| arm | ΔAUC mean ± sd over seeds | seeds whose 95% CI excludes 0 |", "| --- | --- | --- |"]
            for arm, ds in deltas.items():
                group = [r for r in arms[arm] if central_for(r, runs) is not None]
                excl = sum(1 for r in group if (d := paired_auc_difference(central_for(r, runs), r))
                           and (d[1] > 0 or d[2] < 0))
                md.append(f"| {arm} | {pm(ds)} | {excl} of {len(group)} |")
        fed_runs = [r for r in runs if r.federated and central_for(r, runs) is not None]
        if fed_runs:
            md += ["", f"### Data passes to come within {CLOSE} of centralized (from the learning curves)", "",
                   f"Target: the centralized run's final test ROC-AUC minus {CLOSE} (same seed). Read from each "
                   "run's `rounds.jsonl` at the rounds it evaluated, and from its final model (`summary.json`, "
                   "BatchNorm statistics re-estimated at the sites where the run did so).", "",
                   "| run | target AUC | passes the federated run needed | passes the centralized run needed | "
                   "final ΔAUC | best AUC (at passes) |", "| --- | --- | --- | --- | --- | --- |"]
            lines = []
            for r in fed_runs:
                c = central_for(r, runs)
                cu = catch_up(r, c)
                got = (str(cu["passes"]) if cu["passes"] is not None
                       else f"not within its {cu['run_passes']} passes")
                cp = cu["central_passes"] if cu["central_passes"] is not None else "n/a"
                md.append(f"| {r.label} | {fmt(cu['target'])} | {got} | {cp} | "
                          f"{fmt(cu['final_gap'])} | {fmt(cu['best_auc'])} ({cu['best_at']}) |")
                if cu["passes"] is not None:
                    lines.append(f"- {r.label} came within {CLOSE} of centralized ({fmt(c.metric('roc_auc'))}) after "
                                 f"{cu['passes']} data passes (centralized: {cu['central_passes']}).")
                else:
                    lines.append(f"- {r.label} did not come within {CLOSE} of centralized ({fmt(c.metric('roc_auc'))}) "
                                 f"in its {cu['run_passes']} data passes: it ended {fmt(-cu['final_gap'])} below, "
                                 f"its best was {fmt(cu['best_auc'])} at {cu['best_at']} passes.")
            md += ["", *lines]
        fed = [(r, c, cc) for r in fed_runs if (c := sequential_steps(r))
               and (cc := sequential_steps(central_for(r, runs)))]
        if fed:
            md += ["", "### Optimizer steps behind the final model", "",
                   "At equal passes over the data, a federated global model has moved along one site's local "
                   "path per round (local epochs x the site's examples / batch); FedAvg averages sites side by "
                   "side, it does not chain them. The centralized model takes the pooled data's steps one after "
                   "another.", "",
                   "| run | steps behind the final model | its test AUC | centralized AUC after as many steps | "
                   "centralized steps |", "| --- | --- | --- | --- | --- |"]
            shown = set()
            why = []
            for r, c, cc in fed:
                cr = central_for(r, runs)
                if cr.label not in shown:
                    md.append(f"| {cr.label} | {cc[-1][0]:.0f} | {fmt(cc[-1][1])} | | |")
                    shown.add(cr.label)
                same = auc_at_steps(cc, c[-1][0])
                md.append(f"| {r.label} | {c[-1][0]:.0f} | {fmt(c[-1][1])} | {fmt(same)} | {cc[-1][0]:.0f} |")
                why.append(explain_gap(r, cr, c[-1][1], same))
            md += ["", *why]
    return md


def privacy_table(runs: list[Run]) -> list[str]:
    """Utility against privacy: epsilon, start, test AUC, the membership attack."""
    md: list[str] = []
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
    return md


def per_site(runs: list[Run]) -> list[str]:
    """Each federated run's sites on their own validation data."""
    md: list[str] = []
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
    return md


def cross_validation(folds: list[Run] | None) -> list[str]:
    """The centralized baseline once per LUNA16 test subset."""
    md: list[str] = []
    if folds:
        aucs = [f.metric("roc_auc") for f in folds]
        cpms = [f.metric("cpm") for f in folds]
        md += ["", "## LUNA16 cross-validation by subset (centralized baseline)", "",
               "| fold (test subset) | ROC-AUC | CPM |", "| --- | --- | --- |"]
        for f in folds:
            md.append(f"| {f.config['test_subsets']} | {fmt(f.metric('roc_auc'))} | {fmt(f.metric('cpm'))} |")
        md.append(f"| mean ± sd | {fmt(float(np.nanmean(aucs)))} ± {fmt(float(np.nanstd(aucs)))} | "
                  f"{fmt(float(np.nanmean(cpms)))} ± {fmt(float(np.nanstd(cpms)))} |")
    return md


HEADLINE_COLUMNS = (("shifted_true_positives", "shifted 0.8 R, called +"), ("random_true_positives",
                                                                              "random position, called +"),
                    ("random", "random position, all"), ("two_nodules_any", "two nodules: peak in one"),
                    ("two_nodules_each", "two nodules: a maximum in each"))


def cam_scores(cam_docs: dict[str, tuple[list[Path], dict]]) -> list[str]:
    """The pointing game with its controls, per run: first the scores where the nodule is away
    from the patch centre (each as model / best control), then the centred ones."""
    md: list[str] = []
    if cam_docs:
        md += ["", "## Where the model looks (Class Activation Maps)", "",
               "Pointing game: the share of test patches whose heatmap peak falls inside the annotated nodule, "
               "each beside the best of its controls (the patch centre as the peak, the same heatmap from an "
               "untrained model, the brightest spot of the patch). Candidates sit on their nodules, so the "
               "scores that mean something move the nodule away from the centre: 0.8 radii off (shifted), to a "
               "random position in the patch, or two nodules in one patch; 'called +' counts the patches the "
               "model still calls a nodule (analysis/cams/probes.py). Slice view: the classifier slid over whole "
               "axial slices through test nodules: the share of the nodules on those slices with a local maximum "
               "of its probability inside, and the other maxima per slice; beside it, how many of those "
               "nodules the model calls on a patch centred on them in the slice's plane (a nodule it misses "
               "there is the "
               "classifier's miss, not the map's) and how many of those the slide finds "
               "(analysis/cams/slices.py).", "",
               "| run | method / layer | " + " | ".join(t for _, t in HEADLINE_COLUMNS)
               + " | slice view: nodules found / false maxima per slice | centred true positives (centre control) |",
               "| --- | --- | " + " | ".join("---" for _ in HEADLINE_COLUMNS) + " | --- | --- |"]
        for label, (_, sc) in cam_docs.items():
            pg = sc.get("pointing_game", {})
            head, tp = pg.get("headline", {}), pg.get("true_positives", {})
            cells = [f"{fmt(head[k]['rate'])} / {fmt(head[k]['best_control'])} (n={head[k]['n']})" if k in head
                     else "n/a" for k, _ in HEADLINE_COLUMNS]
            sl = sc.get("slices", {})
            slice_cell = (f"{sl['found']}/{sl['nodules']} ({fmt(sl['rate'])}) / {sl['false_maxima_per_slice']:.1f}"
                          if sl.get("nodules") else "n/a")
            if sl.get("nodules") and "called_at_centre" in sl:  # cam.json files before 2026-12-07 lack it
                slice_cell += f"; called at centre {sl['called_at_centre']}, found of those {sl['found_of_called']}"
            md.append(f"| {label} | {pg.get('method')} {pg.get('layer')} | " + " | ".join(cells) + f" | {slice_cell}"
                      + f" | {fmt(tp.get('axial'))} ({fmt(tp.get('centre_baseline', {}).get('axial'))}) |")
    return md


def plots_section(images: dict[str, Path], cams: dict[str, list[Path]]) -> list[str]:
    """The plots, by title."""
    md: list[str] = []
    md += ["", "## Plots", ""]
    for title, path in images.items():
        md += [f"### {title}", "", f"![{title}]({path.name})", ""]
    for label, files in cams.items():
        for f in files:
            md += [f"### Where the model looks: {label} ({f.name})", "", f"![{label}]({f})", ""]
    return md


def build_report(runs: list[Run], out: Path, folds: list[Run] | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (with the plots) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    images, cam_docs = figures(runs, out)
    cams = {label: pngs for label, (pngs, _) in cam_docs.items()}
    arms = arms_of(runs)
    md: list[str] = ["# Centralized vs federated: lung-nodule classification", "", f"> {NOTICE}", ""]
    for section in (runs_table(runs), test_metrics(runs), operating_points(runs), over_seeds(runs, arms),
                    federation_cost(runs, arms), privacy_table(runs), per_site(runs), cross_validation(folds),
                    cam_scores(cam_docs), plots_section(images, cams)):
        md += section
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
