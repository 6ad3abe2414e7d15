"""Tests of common.evaluation.froc: hand-made cases with answers worked out in the comments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.evaluation.froc import (
    FP_RATES,
    Finding,
    Mark,
    compute_froc,
    plot_froc,
    read_findings,
    read_submission,
    write_submission,
)


def nodule(sid: str, x: float, y: float = 0.0, z: float = 0.0, d: float = 6.0) -> Finding:
    return Finding(sid, x, y, z, d)


def mark(sid: str, x: float, p: float, y: float = 0.0, z: float = 0.0) -> Mark:
    return Mark(sid, x, y, z, p)


def froc(marks, nodules, scans, excluded=(), **kw):
    kw.setdefault("n_bootstrap", 0)
    return compute_froc(marks, nodules, scans, excluded, **kw)


def same(a, b) -> bool:
    return (a.sensitivities == b.sensitivities and np.array_equal(a.fps_per_scan, b.fps_per_scan)
            and np.array_equal(a.sensitivity, b.sensitivity))


def test_perfect_detector_scores_one():
    scans = ["a", "b", "c"]
    nods = [nodule("a", 0), nodule("a", 50), nodule("b", 10), nodule("c", -20)]
    res = froc([mark(n.seriesuid, n.x, 1.0) for n in nods], nods, scans)
    assert res.cpm == 1.0
    assert res.sensitivities == (1.0,) * 7
    assert (res.n_scans, res.n_nodules, res.n_marks) == (3, 4, 4)
    assert res.fps_per_scan.tolist() == [0.0, 0.0] and res.sensitivity.tolist() == [0.0, 1.0]


def test_false_positives_above_all_hits_give_a_step():
    # 4 scans, each: 1 nodule hit at p=0.5 and 2 FPs at p=0.9.
    # Curve: origin (0, 0); threshold 0.9 -> 8 FPs / 4 scans = 2 FPs/scan, sens 0;
    # threshold 0.5 -> still 2 FPs/scan, sens 1. Points: (0,0), (2,0), (2,1).
    # Rates 1/8..1: last point with fps <= r is (0,0), next is (2,0) -> 0.
    # Rate 2: last point with fps <= 2 is (2,1) and nothing lies right of it -> 1. 4, 8 -> 1.
    scans = ["s0", "s1", "s2", "s3"]
    nods = [nodule(s, 0) for s in scans]
    marks = [m for s in scans
             for m in (mark(s, 0, 0.5), mark(s, 100, 0.9), mark(s, -100, 0.9))]
    res = froc(marks, nods, scans)
    assert res.sensitivities == (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    assert res.cpm == pytest.approx(3 / 7)
    assert res.fps_per_scan.tolist() == [0.0, 2.0, 2.0]
    assert res.sensitivity.tolist() == [0.0, 0.0, 1.0]


def test_linear_interpolation_from_origin_and_missed_nodule_caps_sensitivity():
    # 2 scans, 2 nodules; nodule "b" is never hit. At the single threshold 0.8 one TP and
    # one FP enter together: points (0,0), (0.5 FPs/scan, 0.5). Linear from the origin:
    # r=1/8 -> 0.125, r=1/4 -> 0.25, r>=0.5 -> 0.5 (max reached; the missed nodule caps it).
    scans = ["a", "b"]
    nods = [nodule("a", 0), nodule("b", 0)]
    res = froc([mark("a", 0, 0.8), mark("a", 100, 0.8)], nods, scans)
    assert res.sensitivities == pytest.approx((0.125, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5))
    assert res.cpm == pytest.approx(2.875 / 7)


def test_excluded_findings_neither_hit_nor_count_as_false_positives():
    scans = ["a", "b"]
    nods = [nodule("a", 0), nodule("b", 0)]
    excl = [Finding("a", 200, 0, 0, -1.0), Finding("b", 300, 0, 0, 4.0)]
    base_marks = [mark("a", 0, 0.6), mark("b", 0, 0.4), mark("a", 100, 0.5)]
    base = froc(base_marks, nods, scans, excl)
    assert base.n_nodules == 2  # excluded findings are not nodules
    # -1 -> 10 mm: a mark exactly 5 mm from the centre is on the boundary and ignored,
    # as are marks well inside either excluded finding, at any probability.
    on_excluded = [mark("a", 205.0, 0.99), mark("a", 200, 0.7), mark("b", 302.0, 0.95)]
    assert same(froc(base_marks + on_excluded, nods, scans, excl), base)
    # Base curve: (0,0), p=.6 (0,.5), p=.5 (.5,.5), p=.4 (.5,1) -> (.5,.5,1,1,1,1,1).
    assert base.sensitivities == (0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0)
    # Just outside the 5 mm radius it is an ordinary false positive above every hit:
    # (0,0), p=.99 (.5,0), p=.6 (.5,.5), p=.5 (1,.5), p=.4 (1,1) -> (0,0,.5,1,1,1,1).
    outside = froc(base_marks + [mark("a", 205.001, 0.99)], nods, scans, excl)
    assert outside.sensitivities == (0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0)
    # Without the exclusion list, the marks on excluded findings are false positives.
    assert not same(froc(base_marks + on_excluded, nods, scans), base)


def test_duplicate_hits_count_once_with_highest_probability_and_are_not_fps():
    scans = ["a"]
    nods = [nodule("a", 0)]
    fp = mark("a", 100, 0.7)
    single = froc([mark("a", 0, 0.9), fp], nods, scans)
    triple = froc([mark("a", 0.5, 0.5), mark("a", 0, 0.9), mark("a", -1, 0.2), fp], nods, scans)
    assert same(single, triple)
    # Detected at 0.9, before the FP at 0.7: points (0,0), (0,1), (1,1) -> 1 everywhere.
    assert triple.sensitivities == (1.0,) * 7
    assert triple.fps_per_scan.tolist() == [0.0, 0.0, 1.0]  # only the one real FP


def test_mark_hitting_two_nodules_counts_for_both():
    nods = [nodule("a", 0, d=10), nodule("a", 6, d=10)]
    res = froc([mark("a", 3, 0.5)], nods, ["a"])
    assert res.cpm == 1.0 and res.n_nodules == 2


def test_mark_cap_keeps_the_most_probable_marks():
    nods = [nodule("a", 0)]
    fps = [mark("a", 100 + i, 0.5 + i / 1000) for i in range(100)]
    hit = mark("a", 0, 0.01)
    capped = froc(fps + [hit], nods, ["a"])
    assert capped.n_marks == 100 and capped.sensitivity.max() == 0.0 and capped.cpm == 0.0
    assert froc(fps + [hit], nods, ["a"], max_marks_per_scan=101).sensitivity.max() == 1.0
    # ties are broken by input order: the hit survives only when it comes first
    tied = [mark("a", 100 + i, 0.5) for i in range(100)]
    assert froc(tied + [mark("a", 0, 0.5)], nods, ["a"]).sensitivity.max() == 0.0
    assert froc([mark("a", 0, 0.5)] + tied, nods, ["a"]).sensitivity.max() == 1.0


@pytest.mark.parametrize(("offset", "hits"), [
    ((3.0, 0.0, 0.0), True),  # exactly on the 3 mm radius: <= counts as a hit
    ((2.999, 0.0, 0.0), True),
    ((3.001, 0.0, 0.0), False),
    ((0.0, 2.12, -2.12), True),  # |d| = 2.998
    ((0.0, 2.13, 2.13), False),  # |d| = 3.012
])
def test_radius_boundary(offset, hits):
    c = (1.0, 2.0, 3.0)
    m = Mark("a", c[0] + offset[0], c[1] + offset[1], c[2] + offset[2], 0.5)
    assert froc([m], [Finding("a", *c, 6.0)], ["a"]).cpm == (1.0 if hits else 0.0)


def test_items_outside_scan_ids_are_ignored_and_no_nodules_is_an_error():
    nods = [nodule("a", 0)]
    base = froc([mark("a", 0, 0.5), mark("a", 50, 0.6)], nods, ["a", "b"])
    other = froc([mark("a", 0, 0.5), mark("a", 50, 0.6), mark("z", 9, 0.99)],
                 nods + [nodule("z", 0)], ["a", "b"], [Finding("z", 50, 0, 0, -1)])
    assert same(base, other) and other.n_nodules == 1 and other.n_marks == 2
    assert base.fps_per_scan.max() == 0.5  # 1 FP over 2 scans, scan "b" has no marks
    with pytest.raises(ValueError, match="no nodules"):
        froc([mark("b", 0, 0.5)], nods, ["b"])
    with pytest.raises(ValueError, match="duplicates"):
        froc([], nods, ["a", "a"])


def test_matches_official_roc_curve_formulation():
    """Cross-check against the official script's recipe (sklearn roc_curve + np.interp)."""
    roc_curve = pytest.importorskip("sklearn.metrics").roc_curve
    rng = np.random.default_rng(3)
    scans = [f"s{i}" for i in range(20)]
    nods, marks = [], []
    for s in scans:
        for k in range(2):
            x = 100.0 * k
            nods.append(nodule(s, x, d=8))
            if rng.random() < 0.8:  # one mark per nodule at most: no duplicate handling needed
                marks.append(mark(s, x + rng.uniform(-3, 3), round(rng.uniform(0.3, 1), 2)))
        marks += [mark(s, 1000 + i, round(rng.uniform(0, 0.8), 2)) for i in range(15)]
    res = froc(marks, nods, scans)
    gt = np.array([abs(m.x) <= 4 or abs(m.x - 100) <= 4 for m in marks], dtype=int)
    fpr, tpr, _ = roc_curve(gt, [m.probability for m in marks])
    fps = fpr * (len(gt) - gt.sum()) / len(scans)
    sens = tpr * gt.sum() / len(nods)
    grid = np.linspace(0.125, 8, 10001)  # the official script's dense grid
    ref = np.interp(grid, fps, sens)
    expected = [ref[np.argmin(np.abs(grid - r))] for r in FP_RATES]
    assert res.sensitivities == pytest.approx(expected, abs=1e-3)


def _random_case(seed: int, n_scans: int = 30, n_marks: int = 30):
    rng = np.random.default_rng(seed)
    scans = [f"s{i}" for i in range(n_scans)]
    nods, marks = [], []
    for s in scans:
        for k in range(int(rng.integers(0, 3))):
            nods.append(nodule(s, 100.0 * k, d=8))
            marks.append(mark(s, 100.0 * k + rng.uniform(-3, 3), rng.uniform(0.2, 1)))
        marks += [mark(s, 1000.0 + i, rng.uniform(0, 0.9)) for i in range(n_marks)]
    return marks, nods, scans


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    marks, nods, scans = _random_case(0)
    a = compute_froc(marks, nods, scans, n_bootstrap=300, seed=7)
    b = compute_froc(marks, nods, scans, n_bootstrap=300, seed=7)
    c = compute_froc(marks, nods, scans, n_bootstrap=300, seed=8)
    assert a.cpm_ci is not None and a.sensitivities_ci is not None
    assert a.cpm_ci[0] <= a.cpm <= a.cpm_ci[1] and a.cpm_ci[0] < a.cpm_ci[1]
    for s, (lo, hi) in zip(a.sensitivities, a.sensitivities_ci, strict=True):
        assert lo <= s <= hi
    assert a.cpm_ci == b.cpm_ci and a.sensitivities_ci == b.sensitivities_ci
    assert a.cpm_ci != c.cpm_ci
    assert froc(marks, nods, scans).cpm_ci is None
    d = json.loads(json.dumps(a.to_dict()))
    assert d["cpm"] == a.cpm and len(d["sensitivities_ci"]) == 7
    assert d["fps_per_scan"] == a.fps_per_scan.tolist()


def test_submission_round_trip(tmp_path: Path):
    marks = [Mark("1.3.6.1.4.1.14519.5.2.1.6279", -100.123456789, 0.1 + 0.2, 1e-12, 0.987654321),
             Mark("uid2", 1.0, 2.0, 3.0, 0.0)]
    path = tmp_path / "sub.csv"
    write_submission(path, marks)
    assert path.read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert read_submission(path) == marks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]  # no temp file left


def test_csv_errors_name_file_and_line(tmp_path: Path):
    missing = tmp_path / "missing.csv"
    missing.write_text("seriesuid,coordX,coordY,probability\na,1,2,0.5\n")
    with pytest.raises(ValueError, match=r"missing\.csv.*coordZ"):
        read_submission(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,probability\na,1,2,3,0.5\na,1,x,3,0.5\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3"):
        read_submission(bad)


def test_read_findings(tmp_path: Path):
    path = tmp_path / "annotations_excluded.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,1,2,3,-1\nb,4,5,6,3.5\n")
    expected = [Finding("a", 1, 2, 3, -1), Finding("b", 4, 5, 6, 3.5)]
    assert read_findings(path, excluded=True) == expected
    with pytest.raises(ValueError, match=r"annotations_excluded\.csv, line 2"):
        read_findings(path)  # -1 is only allowed for excluded findings
    (tmp_path / "no_d.csv").write_text("seriesuid,coordX,coordY,coordZ\na,1,2,3\n")
    with pytest.raises(ValueError, match=r"no_d\.csv: missing column\(s\) diameter_mm"):
        read_findings(tmp_path / "no_d.csv")


def test_plot_froc_writes_png(tmp_path: Path):
    marks, nods, scans = _random_case(2, n_scans=5, n_marks=10)
    res = froc(marks, nods, scans)
    path = tmp_path / "froc.png"
    plot_froc({"run A": res, "run B": froc(marks[::2], nods, scans)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["froc.png"]


@st.composite
def cases(draw):
    n_scans = draw(st.integers(1, 3))
    scans = [f"s{i}" for i in range(n_scans)]
    coord = st.integers(0, 12).map(float)
    nods = draw(st.lists(st.builds(Finding, st.sampled_from(scans), coord, coord, coord,
                                   st.sampled_from([2.0, 4.0, 6.0])), min_size=1, max_size=5))
    prob = st.integers(0, 20).map(lambda k: k / 20)
    marks = draw(st.lists(st.builds(Mark, st.sampled_from(scans), coord, coord, coord, prob),
                          max_size=15))
    return marks, nods, scans


@settings(max_examples=60, deadline=None)
@given(cases())
def test_cpm_in_unit_interval_and_invariant_to_monotone_transform(case):
    marks, nods, scans = case
    res = froc(marks, nods, scans, max_marks_per_scan=4)
    assert 0.0 <= res.cpm <= 1.0
    assert all(0.0 <= s <= 1.0 for s in res.sensitivities)
    warped = [Mark(m.seriesuid, m.x, m.y, m.z, math.exp(3 * m.probability) - 5) for m in marks]
    other = froc(warped, nods, scans, max_marks_per_scan=4)
    assert other.cpm == pytest.approx(res.cpm)
    assert other.sensitivities == pytest.approx(res.sensitivities)
