"""LUNA16's candidate-detection metric: the FROC curve and the CPM score.

Follows the official ``noduleCADEvaluationLUNA16.py``:

* per scan, only the ``max_marks_per_scan`` most probable marks count (ties: input order);
* a mark *hits* a finding when its Euclidean distance to the centre is ``<=`` the radius
  (``diameter / 2``; compared as squared distances). The official script uses a strict
  ``<``; we use ``<=`` everywhere, so a mark exactly on the sphere hits;
* a nodule hit by one or more marks is detected once, with the highest probability among
  its hits; those marks are not false positives. A mark hitting two nodules counts for both;
* a mark hitting no nodule but an excluded finding (``annotations_excluded.csv``; diameter
  ``-1`` means 10 mm) is ignored; a mark hitting nothing is a false positive;
* the threshold sweeps all distinct probabilities: sensitivity = detected nodules / all
  nodules (missed ones included), FPs/scan = false positives / number of scans;
* CPM is the mean sensitivity at ``FP_RATES`` (see :func:`compute_froc` for interpolation).

Confidence intervals come from a bootstrap over scans (resampled with replacement).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from common.atomic import atomic_write

log = logging.getLogger(__name__)

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
FINDING_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000  # bootstrap rows x events per vectorised batch


@dataclass(frozen=True)
class Finding:
    """A nodule from ``annotations.csv`` or an excluded finding (world mm)."""

    seriesuid: str
    x: float
    y: float
    z: float
    diameter_mm: float  # excluded findings: -1 means unknown, treated as 10 mm


@dataclass(frozen=True)
class Mark:
    """A candidate and its predicted probability (a row of a LUNA16 submission)."""

    seriesuid: str
    x: float
    y: float
    z: float
    probability: float


@dataclass(frozen=True, eq=False)  # eq=False: array fields make value equality ambiguous
class FROCResult:
    """FROC curve, CPM and their bootstrap confidence intervals."""

    cpm: float
    sensitivities: tuple[float, ...]  # at each of FP_RATES
    fps_per_scan: np.ndarray  # curve x, non-decreasing, starts at 0
    sensitivity: np.ndarray  # curve y, non-decreasing, starts at 0
    n_scans: int
    n_nodules: int
    n_marks: int  # marks evaluated: in scan_ids and within the per-scan cap
    cpm_ci: tuple[float, float] | None
    sensitivities_ci: tuple[tuple[float, float], ...] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (plain lists and floats)."""
        return {
            "cpm": float(self.cpm),
            "fp_rates": list(FP_RATES),
            "sensitivities": [float(s) for s in self.sensitivities],
            "fps_per_scan": [float(v) for v in self.fps_per_scan],
            "sensitivity": [float(v) for v in self.sensitivity],
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_marks": self.n_marks,
            "cpm_ci": None if self.cpm_ci is None else [float(v) for v in self.cpm_ci],
            "sensitivities_ci": None if self.sensitivities_ci is None
            else [[float(lo), float(hi)] for lo, hi in self.sensitivities_ci],
        }


def _centres(items: Sequence[Finding] | Sequence[Mark]) -> np.ndarray:
    return np.array([(f.x, f.y, f.z) for f in items], dtype=np.float64).reshape(-1, 3)


def _hits(marks: np.ndarray, findings: Sequence[Finding], diameters: np.ndarray) -> np.ndarray:
    """Boolean (n_marks, n_findings): distance <= radius."""
    d2 = ((marks[:, None, :] - _centres(findings)[None, :, :]) ** 2).sum(axis=2)
    return d2 <= (diameters / 2.0) ** 2


def _group(items: Sequence[Any], scans: dict[str, int], what: str) -> list[list[Any]]:
    groups: list[list[Any]] = [[] for _ in scans]
    ignored = 0
    for item in items:
        idx = scans.get(item.seriesuid)
        if idx is None:
            ignored += 1
        else:
            groups[idx].append(item)
    if ignored:
        log.debug("ignoring %d %s of seriesuids not in scan_ids", ignored, what)
    return groups


def _curves(counts: np.ndarray, probs: np.ndarray, is_tp: np.ndarray, scan_of: np.ndarray,
            nodules_per_scan: np.ndarray, n_scans: int) -> tuple[np.ndarray, np.ndarray]:
    """FROC curves for scan multiplicities ``counts`` (B, S), one row per resample.

    Events (detected nodules and false-positive marks) are sorted by descending probability;
    the curve has one point per distinct probability, preceded by the origin (0, 0).
    Returns (fps, sens), each (B, T + 1). Rows with no nodules get NaN sensitivity.
    """
    order = np.argsort(-probs, kind="stable")
    p, tp, scan = probs[order], is_tp[order], scan_of[order]
    ends = np.flatnonzero(np.append(p[1:] != p[:-1], True)) if p.size else np.zeros(0, int)
    weights = counts[:, scan].astype(np.float64)  # (B, E)
    cum_tp = np.cumsum(weights * tp, axis=1)[:, ends]
    cum_fp = np.cumsum(weights * ~tp, axis=1)[:, ends]
    zero = np.zeros((counts.shape[0], 1))
    total = (counts @ nodules_per_scan).astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.hstack([zero, cum_tp]) / total
    return np.hstack([zero, cum_fp]) / n_scans, sens


def _interpolate(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float]) -> np.ndarray:
    """Sensitivity (B, len(rates)) at each FP rate; see :func:`compute_froc`."""
    last = fps.shape[1] - 1
    rows = np.arange(fps.shape[0])
    out = np.empty((fps.shape[0], len(rates)))
    for k, rate in enumerate(rates):
        i = (fps <= rate).sum(axis=1) - 1  # last point at or left of the rate (fps[:, 0] == 0)
        j = np.minimum(i + 1, last)
        f0, f1, s0, s1 = fps[rows, i], fps[rows, j], sens[rows, i], sens[rows, j]
        span = np.where(i < last, f1 - f0, 1.0)  # f1 > rate >= f0 whenever i < last
        out[:, k] = np.where(i < last, s0 + (s1 - s0) * (rate - f0) / span, s0)
    return out


def compute_froc(marks: Sequence[Mark], nodules: Sequence[Finding], scan_ids: Sequence[str],
                 excluded: Sequence[Finding] = (), *, max_marks_per_scan: int = 100,
                 n_bootstrap: int = 1000, seed: int = 0) -> FROCResult:
    """FROC curve and CPM of ``marks`` against ``nodules`` over the scans ``scan_ids``.

    Parameters
    ----------
    marks, nodules, excluded
        Candidates, reference nodules and excluded findings. Items of seriesuids not in
        ``scan_ids`` are ignored (logged at DEBUG level).
    scan_ids
        The evaluated scans (unique); FPs/scan divides by their number.
    max_marks_per_scan
        Per scan, only this many marks of highest probability count (ties: input order).
    n_bootstrap, seed
        Number of scan-level bootstrap resamples for the 95 % percentile CIs (0: no CIs),
        drawn by ``numpy.random.default_rng(seed)``.

    Returns
    -------
    FROCResult

    Notes
    -----
    Interpolation (as the official script's ``np.interp`` over the curve, which starts at
    the origin): the curve is the points (fps, sensitivity) per distinct threshold,
    preceded by (0, 0). At FP rate ``r``, take the last point with ``fps <= r`` (the highest
    sensitivity at that fps) and interpolate linearly towards the next point; if no point
    lies right of ``r``, the maximum sensitivity reached is used. So a step from 0 to 1 at
    fps = 2 gives 0 below 2 and 1 at 2 and beyond.

    Raises
    ------
    ValueError
        If there are no scans, duplicate scan ids, no nodules in ``scan_ids``, a non-positive
        nodule diameter, a non-finite probability, or invalid counts.
    """
    if max_marks_per_scan < 1 or n_bootstrap < 0:
        raise ValueError("max_marks_per_scan must be >= 1 and n_bootstrap >= 0")
    scans = {sid: i for i, sid in enumerate(scan_ids)}
    if not scans or len(scans) != len(scan_ids):
        raise ValueError("scan_ids must be non-empty and without duplicates")
    mark_groups = _group(marks, scans, "marks")
    nodule_groups = _group(nodules, scans, "nodules")
    excluded_groups = _group(excluded, scans, "excluded findings")
    n_nodules = sum(len(g) for g in nodule_groups)
    if n_nodules == 0:
        raise ValueError("no nodules in the evaluated scans: sensitivity is undefined")

    probs: list[np.ndarray] = []
    is_tp: list[np.ndarray] = []
    scan_of: list[np.ndarray] = []
    n_marks = 0
    for s, (scan_marks, scan_nodules, scan_excl) in enumerate(
            zip(mark_groups, nodule_groups, excluded_groups, strict=True)):
        p = np.array([m.probability for m in scan_marks], dtype=np.float64)
        if not np.isfinite(p).all():
            raise ValueError(f"non-finite probability among the marks of scan {scan_ids[s]}")
        keep = np.argsort(-p, kind="stable")[:max_marks_per_scan]
        if len(scan_marks) > max_marks_per_scan:
            log.debug("scan %s: keeping %d of %d marks", scan_ids[s], keep.size, p.size)
        p = p[keep]
        pos = _centres(scan_marks)[keep]
        n_marks += p.size
        nod_d = np.array([f.diameter_mm for f in scan_nodules], dtype=np.float64)
        if (nod_d <= 0).any():
            raise ValueError(f"non-positive nodule diameter in scan {scan_ids[s]}")
        exc_d = np.array([f.diameter_mm for f in scan_excl], dtype=np.float64)
        exc_d = np.where(exc_d < 0, EXCLUDED_UNKNOWN_DIAMETER_MM, exc_d)
        hit_nod = _hits(pos, scan_nodules, nod_d)
        hit_exc = _hits(pos, scan_excl, exc_d).any(axis=1)
        detected = hit_nod.any(axis=0)
        tp_p = np.where(hit_nod, p[:, None], -np.inf).max(axis=0, initial=-np.inf)[detected]
        fp_p = p[~hit_nod.any(axis=1) & ~hit_exc]
        probs += [tp_p, fp_p]
        is_tp += [np.ones(tp_p.size, bool), np.zeros(fp_p.size, bool)]
        scan_of.append(np.full(tp_p.size + fp_p.size, s))

    args = (np.concatenate(probs), np.concatenate(is_tp), np.concatenate(scan_of),
            np.array([len(g) for g in nodule_groups]), len(scans))
    fps, sens = _curves(np.ones((1, len(scans)), dtype=np.int64), *args)
    point = _interpolate(fps, sens, FP_RATES)[0]
    cpm_ci: tuple[float, float] | None = None
    sens_ci: tuple[tuple[float, float], ...] | None = None
    if n_bootstrap:
        cpm_ci, sens_ci = _bootstrap(lambda c: _curves(c, *args), len(scans), n_bootstrap,
                                     seed, args[0].size)
    return FROCResult(cpm=float(point.mean()), sensitivities=tuple(float(v) for v in point),
                      fps_per_scan=fps[0], sensitivity=sens[0], n_scans=len(scans),
                      n_nodules=n_nodules, n_marks=n_marks, cpm_ci=cpm_ci,
                      sensitivities_ci=sens_ci)


def _bootstrap(curves: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], n_scans: int,
               n_bootstrap: int, seed: int, n_events: int,
               ) -> tuple[tuple[float, float], tuple[tuple[float, float], ...]]:
    """95 % percentile CIs of CPM and the sensitivities, resampling scans with replacement."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(n_events, n_scans, 1))
    stats = []
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        # how often each scan is drawn in n_scans draws with replacement
        counts = rng.multinomial(n_scans, np.full(n_scans, 1.0 / n_scans), size=rows)
        stats.append(_interpolate(*curves(counts), FP_RATES))
    sens = np.vstack(stats)
    valid = ~np.isnan(sens).any(axis=1)  # resamples that drew no scan with a nodule
    if not valid.all():
        log.debug("bootstrap: %d of %d resamples had no nodules, skipped",
                  (~valid).sum(), n_bootstrap)
    sens = sens[valid]
    lo, hi = np.percentile(sens, [2.5, 97.5], axis=0)
    cpm_lo, cpm_hi = np.percentile(sens.mean(axis=1), [2.5, 97.5])
    return (float(cpm_lo), float(cpm_hi)), tuple(
        (float(a), float(b)) for a, b in zip(lo, hi, strict=True))


def write_submission(path: str | os.PathLike[str], marks: Sequence[Mark]) -> None:
    """Write ``marks`` as a LUNA16 submission CSV (floats in round-trip precision), atomically."""
    def write(fh: IO[Any]) -> None:
        writer = csv.writer(fh)
        writer.writerow(SUBMISSION_COLUMNS)
        writer.writerows((m.seriesuid, float(m.x), float(m.y), float(m.z), float(m.probability))
                         for m in marks)
    atomic_write(path, write)


def _read_rows(path: str | os.PathLike[str], columns: Sequence[str]
               ) -> list[tuple[int, str, list[float]]]:
    """(line number, seriesuid, floats of the other columns) per data row."""
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            try:
                if not row[columns[0]]:
                    raise ValueError(f"empty {columns[0]}")
                rows.append((reader.line_num, row[columns[0]],
                             [float(row[c]) for c in columns[1:]]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {reader.line_num}: {exc}") from None
    return rows


def read_submission(path: str | os.PathLike[str]) -> list[Mark]:
    """Read a LUNA16 submission CSV (``seriesuid,coordX,coordY,coordZ,probability``)."""
    return [Mark(uid, *vals) for _, uid, vals in _read_rows(path, SUBMISSION_COLUMNS)]


def read_findings(path: str | os.PathLike[str], *, excluded: bool = False) -> list[Finding]:
    """Read ``annotations.csv`` or (``excluded=True``) ``annotations_excluded.csv``.

    Diameters are kept as written; a negative diameter is allowed only for excluded
    findings (``-1``: unknown, treated as 10 mm by :func:`compute_froc`).
    """
    findings = []
    for line, uid, vals in _read_rows(path, FINDING_COLUMNS):
        if not excluded and vals[3] <= 0:
            raise ValueError(f"{path}, line {line}: diameter_mm must be > 0, got {vals[3]}")
        findings.append(Finding(uid, *vals))
    return findings


def plot_froc(results: Mapping[str, FROCResult], path: str | os.PathLike[str]) -> None:
    """Plot one FROC curve per run (log2 FPs/scan from 1/8 to 8) into a PNG, atomically."""
    if not results:
        raise ValueError("plot_froc: no results to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    ax = fig.add_subplot()
    for name, res in results.items():
        # extend to the right edge with the maximum sensitivity, as the interpolation does
        x = np.append(res.fps_per_scan, max(FP_RATES[-1], res.fps_per_scan[-1]))
        y = np.append(res.sensitivity, res.sensitivity[-1])
        shown = x > 0
        line, = ax.plot(x[shown], y[shown], label=f"{name} (CPM {res.cpm:.3f})")
        ax.plot(FP_RATES, res.sensitivities, "o", color=line.get_color(), markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_xticks(FP_RATES, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("average false positives per scan (log scale)")
    ax.set_ylabel("sensitivity (share of nodules found)")
    sizes = {(r.n_scans, r.n_nodules) for r in results.values()}
    scans, nodules = sizes.pop() if len(sizes) == 1 else (None, None)
    ax.set_title("FROC" + (f" on {scans} test scans, {nodules} nodules" if scans is not None else "")
                 + "; dots: the 7 CPM points", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"), binary=True)
