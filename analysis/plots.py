"""Plots a person looks at: learning curves on a shared axis of data passes, ROC curves."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic import atomic_write


def _figure():
    from matplotlib.figure import Figure  # Agg, no global pyplot state

    return Figure


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)


def learning_curves(runs: Mapping[str, Sequence[dict]], path: Path, note: str = "") -> None:
    """Test AUC, test loss, train loss and CPM against data passes, one line per run.

    ``runs`` maps a label to that run's ``rounds.jsonl`` rows.
    """
    Figure = _figure()
    fig = Figure(figsize=(12, 7.5))
    panels = [("test_roc_auc", "test ROC-AUC"), ("test_cpm", "test CPM (LUNA16)"),
              ("test_loss", "test loss (BCE)"), ("train_loss", "training loss (BCE)")]
    axes = fig.subplots(2, 2)
    for ax, (key, title) in zip(axes.ravel(), panels, strict=True):
        for label, rows in runs.items():
            pts = [(r["data_passes"], r[key]) for r in rows if r.get(key) is not None and np.isfinite(r[key])]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("passes over the training data")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if note:
        fig.suptitle(note, fontsize=9)
    _save(fig, path)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> list[str]:
    """One ROC curve per run; ``curves`` maps a label to (labels, logits). Returns the legend's lines."""
    from sklearn.metrics import roc_auc_score, roc_curve

    Figure = _figure()
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for label, (y, z) in curves.items():
        if not np.isfinite(z).all():  # a broken (e.g. poisoned) model: say so instead of a curve
            ax.plot([], [], ls="none", label=f"{label}: no curve, the model gives non-finite outputs")
        elif 0 < np.sum(y) < len(y):
            fpr, tpr, _ = roc_curve(y, z)
            ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y, z):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    legend = ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return [t.get_text() for t in legend.get_texts()]
