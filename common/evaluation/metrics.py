"""The one metrics module: what every run, site, baseline and report computes.

Threshold metrics use 0.5 on the predicted probability unless a threshold is given.
ROC-AUC and PR-AUC are threshold-free. Confidence intervals come from a bootstrap over
patients (scans), since candidates of one patient are not independent.

**Operating point without pooling data.** Beside 0.5, runs report accuracy, precision and
recall at a threshold chosen on validation data. A site never sends its predictions:
:func:`threshold_counts` reduces them to how many of its positives and of its negatives
score at or above each threshold of the fixed grid :data:`THRESHOLDS`; the server adds
the sites' counts (:func:`sum_counts`) and :func:`choose_threshold` picks the threshold
from the sums alone. The centralized baseline runs the same two functions on its pooled
validation split, so both kinds of run choose by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

METRICS = ("loss", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "roc_auc",
           "pr_auc")


# 0.01 steps, with finer steps near 0 and 1 where a rare class puts its thresholds
THRESHOLDS: tuple[float, ...] = (0.001, 0.002, 0.005, *(round(k / 100, 2) for k in range(1, 100)), 0.995, 0.998,
                                 0.999)
# how a threshold is chosen from (summed) validation counts: see choose_threshold
OPERATING_RULES = ("youden", "f1", "recall90")
SCREENING_RECALL = 0.90  # recall90: the validation recall a screening operating point must keep
COUNT_KEYS = ("op-positives", "op-negatives", "op-tp", "op-fp")
OP_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy")  # at the operating point


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
        "roc_auc": roc_auc(y, p) if both else math.nan,
        "pr_auc": average_precision(y, p) if both else math.nan,
        "n": float(len(y)),
        "positives": float(y.sum()),
        "prevalence": _div(float(y.sum()), len(y)),
    }
    return out


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count one half): the same number as
    ``sklearn.metrics.roc_auc_score``, without its input checks, which cost more than the
    sum itself in a 1000-resample bootstrap."""
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1  # each sorted value's tie group
    sizes = np.bincount(group)
    ends = np.cumsum(sizes)  # the last rank of each group
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = (ends - (sizes - 1) / 2.0)[group]
    return ranks


def distinct_threshold_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives with each distinct score taken as the threshold (``score >= t``
    is positive), from the highest score down."""
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last example at each distinct score
    tps = np.cumsum(y)[last]
    return tps, (last + 1) - tps


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's points (false-positive rates, true-positive rates), from (0, 0) to (1, 1),
    one per distinct score taken as the threshold, points on a straight line between their
    neighbours dropped: the points of ``sklearn.metrics.roc_curve``. Needs both classes."""
    tps, fps = distinct_threshold_counts(labels, scores)
    keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
    tps, fps = np.r_[0.0, tps[keep]], np.r_[0.0, fps[keep]]
    return fps / fps[-1], tps / tps[-1]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as ``sklearn.metrics.average_precision_score`` computes it: the sum over
    distinct thresholds of precision times the step in recall."""
    tps, fps = distinct_threshold_counts(labels, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def threshold_counts(labels: np.ndarray, logits: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS
                     ) -> dict[str, int | list[int]]:
    """What a site sends about its validation predictions: per threshold of the grid, how
    many positives (``op-tp``) and negatives (``op-fp``) score at or above it, and how many
    of each it has. No prediction, candidate or patient is in it."""
    y = np.asarray(labels).astype(int)
    p = sigmoid(logits)
    p = np.where(np.isfinite(p), p, -np.inf)  # a broken output never counts as above a threshold
    t = np.asarray(thresholds, dtype=np.float64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    return {"op-positives": int(len(pos)), "op-negatives": int(len(neg)),
            "op-tp": (len(pos) - np.searchsorted(pos, t, side="left")).astype(int).tolist(),
            "op-fp": (len(neg) - np.searchsorted(neg, t, side="left")).astype(int).tolist()}


def sum_counts(parts: list[dict], thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, int | list[int]]:
    """The federation's counts: the sites' :func:`threshold_counts`, added up."""
    if not parts:
        raise ValueError("no site sent threshold counts")
    tp, fp = np.zeros(len(thresholds), dtype=np.int64), np.zeros(len(thresholds), dtype=np.int64)
    n_pos = n_neg = 0
    for part in parts:
        a, b = np.asarray(part["op-tp"], dtype=np.int64), np.asarray(part["op-fp"], dtype=np.int64)
        if a.shape != tp.shape or b.shape != fp.shape:
            raise ValueError(f"threshold counts of {len(a)} thresholds, expected {len(thresholds)} "
                             "(site and server run different versions)")
        tp += a
        fp += b
        n_pos += int(part["op-positives"])
        n_neg += int(part["op-negatives"])
    return {"op-positives": n_pos, "op-negatives": n_neg, "op-tp": tp.tolist(), "op-fp": fp.tolist()}


def choose_threshold(counts: dict, rule: str, thresholds: tuple[float, ...] = THRESHOLDS
                     ) -> dict[str, float | str] | None:
    """The operating point from (summed) threshold counts; None without both classes.

    ``youden``: the threshold that maximises Youden's J = recall + specificity - 1 (it
    weighs a missed nodule and a false alarm by their class sizes, not by the class
    ratio, so a rare class is not sacrificed). ``f1``: the one that maximises F1. Where
    several thresholds tie (a plateau between two validation scores), the middle one of
    the plateau is taken, away from both scores. ``recall90``: a screening operating
    point, the highest threshold (fewest false alarms) at which validation recall is still
    at least :data:`SCREENING_RECALL`; where no threshold keeps it, the one of highest recall.
    """
    if rule not in OPERATING_RULES:
        raise ValueError(f"operating-point rule {rule!r}: choose one of {', '.join(OPERATING_RULES)}")
    n_pos, n_neg = int(counts["op-positives"]), int(counts["op-negatives"])
    if n_pos == 0 or n_neg == 0:
        return None
    tp, fp = np.asarray(counts["op-tp"], dtype=float), np.asarray(counts["op-fp"], dtype=float)
    recall, fpr = tp / n_pos, fp / n_neg
    if rule == "recall90":
        keeps = np.flatnonzero(recall >= SCREENING_RECALL - 1e-12)
        k = int(keeps[-1]) if len(keeps) else int(np.flatnonzero(recall >= recall.max() - 1e-12)[-1])
        return _chosen(thresholds, k, rule, float(recall[k]), recall, fpr, tp, fp, n_pos, n_neg)
    if rule == "youden":
        score = recall - fpr
    else:
        score = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1), 0.0)
    best = np.flatnonzero(score >= score.max() - 1e-12)
    k = int(best[(len(best) - 1) // 2])
    return _chosen(thresholds, k, rule, float(score[k]), recall, fpr, tp, fp, n_pos, n_neg)


def operating_point_fields(counts: dict, rule: str, model_round: int) -> dict[str, object]:
    """A round row's operating-point fields (``op_*``) for round ``model_round``'s model,
    chosen by ``rule`` from ``counts`` (the summed counts: what sites send, added up);
    empty without both classes. The counts themselves are kept (``op_counts``), so any
    other rule can be applied to a finished run afterwards."""
    op = choose_threshold(counts, rule)
    if op is None:
        return {}
    return {"op_threshold": op["threshold"], "op_rule": rule, "op_model_round": model_round,
            **{f"op_{k}": v for k, v in op.items() if k not in ("threshold", "rule")},
            "op_counts": {k: counts[k] for k in COUNT_KEYS}}


def _chosen(thresholds: tuple[float, ...], k: int, rule: str, score: float, recall: np.ndarray, fpr: np.ndarray,
            tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> dict[str, float | str]:
    return {"threshold": float(thresholds[k]), "rule": rule, "score": score,
            "val_recall": float(recall[k]), "val_specificity": float(1 - fpr[k]),
            "val_precision": _div(float(tp[k]), float(tp[k] + fp[k])),
            "val_positives": n_pos, "val_negatives": n_neg}


def bootstrap_ci(labels: np.ndarray, logits: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000,
                 seed: int = 0, names: tuple[str, ...] = METRICS, level: float = 0.95, threshold: float = 0.5
                 ) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``names`` (at ``threshold``) by resampling groups (patients) with replacement."""
    y, z = np.asarray(labels), np.asarray(logits)
    return bootstrap(lambda idx: binary_metrics(y[idx], z[idx], threshold), groups, names, n_boot=n_boot, seed=seed,
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
