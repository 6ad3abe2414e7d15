"""Plots a person looks at: learning curves on a shared axis of data passes, ROC curves."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic import atomic_write
from common.evaluation.metrics import roc_auc, roc_curve


def new_figure():
    from matplotlib.figure import Figure  # Agg, no global pyplot state

    return Figure


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)


def _ratio(pos: float, n: float) -> str:
    """``positives:negatives`` as ``1:k`` (the class ratio a reader needs beside AUC and loss)."""
    pos, n = float(pos), float(n)
    if pos <= 0 or n <= pos:
        return f"{pos:.0f} positives of {n:.0f}"
    return f"1:{(n - pos) / pos:.0f}"


def _test_split(rows: Sequence[dict]) -> str:
    r = next((r for r in rows if r.get("test_n")), None)
    if r is None:
        return ""
    pos, n = r["test_positives"], r["test_n"]
    return f"{n:.0f} candidates, {pos:.0f} nodules, class ratio {_ratio(pos, n)}"


PASSES = "passes over the training data (rounds x local epochs)"
LOSS = "BCE loss (nats per patch)"


def learning_curves(runs: Mapping[str, Sequence[dict]], path: Path, note: str = "") -> None:
    """Test AUC, CPM, test loss and training loss against data passes, one line per run.

    ``runs`` maps a label to that run's ``rounds.jsonl`` rows. The test split's size and
    class ratio are in the titles: AUC and CPM are ratio-free, a loss is not.
    """
    Figure = new_figure()
    fig = Figure(figsize=(12, 8), layout="constrained")  # constrained: no label runs into a title
    split = next((t for rows in runs.values() if (t := _test_split(rows))), "")
    panels = [("test_roc_auc", "global model: test ROC-AUC", "ROC-AUC (0.5 = chance)"),
              ("test_cpm", "global model: test CPM (LUNA16 FROC score)", "CPM (mean sensitivity, 1/8-8 FP/scan)"),
              ("test_loss", "global model: test loss (natural class ratio)", LOSS),
              ("train_loss", "training loss (federated: the sites' weighted mean; balanced epochs)", LOSS)]
    axes = fig.subplots(2, 2)
    for ax, (key, title, ylabel) in zip(axes.ravel(), panels, strict=True):
        for label, rows in runs.items():
            pts = [(r["data_passes"], r[key]) for r in rows if r.get(key) is not None and np.isfinite(r[key])]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(PASSES, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].axhline(0.5, ls=":", c="grey", lw=0.8)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    lines = [note] if note else []
    if split:
        lines.append(f"Test split: {split} (the natural ratio; training epochs are balanced by --neg-ratio).")
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9)
    save_figure(fig, path)


def site_curves(rows: Sequence[dict], events: Sequence[dict], path: Path, label: str = "") -> None:
    """Each site's curves beside the global model's, for one federated run.

    Training loss per site and the sites' weighted mean; validation ROC-AUC and loss of the
    global model at each site beside the pooled validation figure and the test split's;
    under local DP each site's cumulative epsilon, else each site's local training time.
    ``rows``/``events``: the run's ``rounds.jsonl`` and ``events.jsonl``.
    """
    Figure = new_figure()
    passes = {int(r["round"]): r["data_passes"] for r in rows}
    per_round = (passes.get(1, 1) or 1)
    x_of = lambda rnd: passes.get(int(rnd), int(rnd) * per_round)  # noqa: E731
    train: dict[str, dict[int, dict]] = {}
    val: dict[str, dict[int, dict]] = {}
    for e in events:
        if e["kind"] == "train":
            train.setdefault(e["site"], {})[int(e["round"])] = e
        elif e["kind"] == "evaluate":
            val.setdefault(e["site"], {})[int(e["round"])] = e
    sites = sorted(set(train) | set(val))
    dp = any("dp-epsilon" in e for s in train.values() for e in s.values())
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    colors = {s: f"C{i % 10}" for i, s in enumerate(sites)}

    def site_lines(ax, table, key) -> None:
        for s in sites:
            pts = sorted((x_of(r), e[key]) for r, e in table.get(s, {}).items()
                         if e.get(key) is not None and np.isfinite(e[key]))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", ms=4, lw=1, alpha=0.75, color=colors[s],
                        label=s if len(sites) <= 12 else None)  # past 12 sites a legend hides the curves

    def global_line(ax, key, lbl, **kw) -> None:
        # a row's val_* figures are of model round val_model_round (the round before, under fused evaluation)
        at = (lambda r: x_of(r.get("val_model_round", r["round"]))) if key.startswith("val_") else \
            (lambda r: r["data_passes"])
        pts = [(at(r), r[key]) for r in rows if r.get(key) is not None and np.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts, strict=True), color="black", lw=2.2, marker="o", ms=4, label=lbl, **kw)

    ax = axes[0, 0]
    site_lines(ax, train, "train-loss")
    global_line(ax, "train_loss", "all sites (weighted mean)")
    ax.set_title("training loss at each site (balanced epochs)", fontsize=10)
    ax.set_ylabel(LOSS, fontsize=9)
    ax = axes[0, 1]
    site_lines(ax, val, "roc_auc")
    global_line(ax, "val_roc_auc", "all sites' validation (weighted mean)")
    global_line(ax, "test_roc_auc", "held-out test split", ls="--")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, ls=":", c="grey", lw=0.8)
    ax.set_title("global model: validation ROC-AUC at each site", fontsize=10)
    ax.set_ylabel("ROC-AUC (0.5 = chance)", fontsize=9)
    ax = axes[1, 0]
    site_lines(ax, val, "loss")
    global_line(ax, "val_loss", "all sites' validation (weighted mean)")
    global_line(ax, "test_loss", "held-out test split", ls="--")
    ax.set_title("global model: validation loss at each site (natural class ratio)", fontsize=10)
    ax.set_ylabel(LOSS, fontsize=9)
    ax = axes[1, 1]
    if dp:
        site_lines(ax, train, "dp-epsilon")
        ax.set_title("privacy spent: cumulative epsilon at each site (local DP)", fontsize=10)
        ax.set_ylabel("epsilon (per CT patch, RDP accountant)", fontsize=9)
        ax.set_ylim(bottom=0)
    else:
        site_lines(ax, train, "train-seconds")
        ax.set_title("local training time at each site per round", fontsize=10)
        ax.set_ylabel("seconds", fontsize=9)
        ax.set_ylim(bottom=0)
    for ax in axes.ravel():
        ax.set_xlabel(PASSES, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2 if len(sites) > 5 else 1)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    ratios = []
    for s in sites:
        last = val.get(s, {})
        if last:
            e = last[max(last)]
            if e.get("positives") is not None and e.get("n"):
                ratios.append(f"{s} {e['positives']:.0f}/{e['n']:.0f}")
    lines = [f"{label + ': ' if label else ''}{len(sites)} sites' curves (thin) beside the global model (black)"]
    if ratios and len(ratios) <= 12:
        lines.append("validation nodules / candidates: " + ", ".join(ratios))
    split = _test_split(rows)
    if split:
        lines.append(f"test split: {split}")
    fig.suptitle("\n".join(lines), fontsize=9)
    save_figure(fig, path)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> list[str]:
    """One ROC curve per run; ``curves`` maps a label to (labels, logits). Returns the legend's lines."""
    Figure = new_figure()
    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    ax = fig.subplots()
    counts = {(int(np.sum(y)), len(y)) for y, _ in curves.values()}
    for label, (y, z) in curves.items():
        if not np.isfinite(z).all():  # a broken (e.g. poisoned) model: say so instead of a curve
            ax.plot([], [], ls="none", label=f"{label}: no curve, the model gives non-finite outputs")
        elif 0 < np.sum(y) < len(y):
            fpr, tpr = roc_curve(y, z)
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(y, z):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    if len(counts) == 1:  # one test split: its size and class ratio on the axes
        pos, n = counts.pop()
        ax.set_xlabel(f"false positive rate (1 - specificity), of {n - pos} non-nodules")
        ax.set_ylabel(f"true positive rate (sensitivity), of {pos} nodules")
        ax.set_title(f"ROC on the test split: {n} candidates, class ratio {_ratio(pos, n)}", fontsize=10)
    else:
        ax.set_xlabel("false positive rate (1 - specificity)")
        ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    legend = ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return [t.get_text() for t in legend.get_texts()]
