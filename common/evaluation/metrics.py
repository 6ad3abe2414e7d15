"""The one metrics module: what every run, site, baseline and report computes.

Threshold metrics use 0.5 on the predicted probability. ROC-AUC and PR-AUC are
threshold-free. Confidence intervals come from a bootstrap over patients (scans), since
candidates of one patient are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRICS = ("loss", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "roc_auc",
           "pr_auc")


def bce_terms(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Each example's binary cross-entropy from its logit (numerically stable)."""
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def bce(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy from logits."""
    return float(np.mean(bce_terms(labels, logits))) if len(labels) else math.nan


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def binary_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """All metrics of :data:`METRICS` plus counts; NaN where undefined (e.g. AUC with one class)."""
    y = np.asarray(labels).astype(int)
    p = sigmoid(logits)
    if not np.isfinite(p).all():  # a broken model: say so in the numbers, do not crash the report
        return {k: math.nan for k in METRICS} | {"n": float(len(y)), "positives": float(y.sum()),
                                                 "prevalence": _div(float(y.sum()), len(y))}
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    specificity = _div(tn, tn + fp)
    both = 0 < y.sum() < len(y)
    out = {
        "loss": bce(y, logits),
        "accuracy": _div(tp + tn, len(y)),
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _div(2 * precision * recall, precision + recall) if tp else (0.0 if len(y) else math.nan),
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if both else math.nan,
        "n": float(len(y)),
        "positives": float(y.sum()),
        "prevalence": _div(float(y.sum()), len(y)),
    }
    return out


def bootstrap_ci(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000,
                 seed: int = 0, names: tuple[str, ...] = METRICS, level: float = 0.95
                 ) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``names`` by resampling groups (patients) with replacement."""
    y, z = np.asarray(labels), np.asarray(logits)
    return bootstrap(lambda idx: binary_metrics(y[idx], z[idx]), groups, names, n_boot=n_boot, seed=seed,
                     level=level)


def bootstrap(statistic: Callable[[np.ndarray], Mapping[str, float]], groups: np.ndarray, names: Sequence[str], *,
              n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``statistic(indices)[name]`` over resamples of whole groups.

    ``groups`` holds each example's group (a patient, or ``np.arange(n)`` for examples);
    every resample draws as many groups as there are, with replacement, and passes the
    indices of their examples. Undefined values (NaN, e.g. an AUC of one class) are left out.
    """
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        m = statistic(np.concatenate([members[k] for k in pick]))
        for n in names:
            samples[n].append(m[n])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for n, vals in samples.items():
        arr = np.array(vals, dtype=float)
        arr = arr[~np.isnan(arr)]
        out[n] = (float(np.percentile(arr, lo)), float(np.percentile(arr, hi))) if len(arr) else (math.nan, math.nan)
    return out
