"""Synthetic LUNA16-format hospitals: format, determinism, and CT-like content."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from common.data.luna16 import load_luna16, read_scan
from common.data.synthetic import make_dataset, make_scan


def test_files_are_in_luna16_format(tiny_root):
    for name, cols in [("annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm"),
                       ("annotations_excluded.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm"),
                       ("candidates_V2.csv", "seriesuid,coordX,coordY,coordZ,class")]:
        assert (tiny_root / name).read_text().splitlines()[0] == cols
    assert len((tiny_root / "seriesuids.csv").read_text().split()) == 20
    assert sorted(p.name for p in tiny_root.glob("subset*")) == [f"subset{k}" for k in range(10)]
    mhd = next((tiny_root / "subset0").glob("*.mhd")).read_text()
    assert "ElementType = MET_SHORT" in mhd and "ElementDataFile" in mhd
    luna = load_luna16(tiny_root)
    assert len(luna.scans) == 20 and luna.candidates.label.sum() > 0


def test_same_seed_same_bytes_other_seed_other_data():
    a, b, c = make_scan(7, 3), make_scan(7, 3), make_scan(8, 3)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.candidates == b.candidates and a.seriesuid == b.seriesuid
    assert a.seriesuid != c.seriesuid


def test_scans_look_like_chest_ct(tiny_root):
    luna = load_luna16(tiny_root)
    meta = {r["seriesuid"]: r for r in csv.DictReader(open(tiny_root / "scan_metadata.csv"))}
    spacings, flipped = [], 0
    for uid, ref in luna.scans.items():
        scan = read_scan(ref.path)
        a = scan.array
        spacings.append(scan.geometry.spacing)
        flipped += int(np.any(np.diag(scan.geometry.direction) < 0))
        mid = a[a.shape[0] // 2]
        assert (mid < -950).mean() > 0.2  # air around the body
        assert ((mid > -200) & (mid < 200)).mean() > 0.1  # soft tissue
        lung = (mid > -950) & (mid < -700)
        assert lung.mean() > 0.05  # two lungs near -850 HU
        assert 5 < a[a.shape[0] // 2][lung].std() < 150  # with texture and noise, not flat
        assert meta[uid]["scanner"].startswith("vendor-")
    sp = np.array(spacings)
    assert sp[:, 0].min() >= 0.5 and sp[:, 0].max() <= 1.0
    assert sp[:, 2].min() >= 0.6 and sp[:, 2].max() <= 2.5
    assert len({m["scanner"] for m in meta.values()}) >= 3


def test_positive_candidates_sit_on_annotated_nodules(tiny_root):
    luna = load_luna16(tiny_root)
    nodules = {}
    for n in luna.annotations:
        nodules.setdefault(n.seriesuid, []).append(n)
    assert all(3.0 <= n.diameter_mm <= 30.0 for n in luna.annotations)
    pos = luna.candidates.label == 1
    for uid, xyz in zip(luna.candidates.seriesuid[pos], luna.candidates.xyz[pos], strict=True):
        d = min(np.linalg.norm(xyz - np.array(n.xyz)) / (n.diameter_mm / 2) for n in nodules[uid])
        assert d <= 1.0  # inside the nodule
    # nodules look like nodules: solid ones are dense at their centre
    scan = read_scan(luna.scans[luna.annotations[0].seriesuid].path)
    idx = np.rint(scan.geometry.world_to_index(np.array(luna.annotations[0].xyz))).astype(int)
    assert scan.array[idx[2], idx[1], idx[0]] > -700


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_dataset(tmp_path / "x", 2, seed=0)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_chests_are_adult_sized_and_inside_the_field_of_view(tiny_root):
    """An adult chest is about 300 mm wide: a 48 mm patch must see lung, not most of the body."""
    luna = load_luna16(tiny_root)
    widths, depths = [], []
    for ref in luna.scans.values():
        scan = read_scan(ref.path)
        mid = scan.array[scan.array.shape[0] // 2]
        px = scan.geometry.spacing[0]
        assert 0.46 <= px <= 0.98  # LUNA16's in-plane range
        body = mid > -500  # fat, muscle, bone (the lungs are inside it)
        cols, rows = np.flatnonzero(body.any(axis=0)), np.flatnonzero(body.any(axis=1))
        widths.append((cols.max() - cols.min() + 1) * px)
        depths.append((rows.max() - rows.min() + 1) * px)
        # the whole body lies inside the image: air at both lateral edges
        assert not body[:, 0].any() and not body[:, -1].any()
        # lungs span most of the width: a patch around a lung candidate is mostly lung
        lung = (mid > -950) & (mid < -700)
        lung_cols = np.flatnonzero(lung.sum(axis=0) > 3)
        assert (lung_cols.max() - lung_cols.min()) * px > 0.7 * widths[-1]
    assert 260 <= min(widths) and max(widths) <= 340, widths
    assert 170 <= min(depths) and max(depths) <= 260, depths


def test_test_only_scans_join_the_test_subset_and_leave_training_scans_alone(tmp_path):
    from common.data.partition import make_plan, scan_infos

    root = make_dataset(tmp_path / "d", 2, seed=4, test_scans=2, workers=1)
    luna = load_luna16(root)
    subsets = {uid: ref.subset for uid, ref in luna.scans.items()}
    first = [make_scan(4, i) for i in range(2)]
    assert [subsets[s.seriesuid] for s in first] == [0, 1]  # round-robin as without test scans
    assert sorted(subsets.values()) == [0, 1, 9, 9]
    np.testing.assert_array_equal(read_scan(luna.scans[first[1].seriesuid].path).array, first[1].array)
    # the test-only scans are the test split of a run
    cand = luna.candidates
    uniq = np.unique(cand.seriesuid)
    infos = scan_infos(uniq, np.array([subsets[u] for u in uniq]), np.zeros(len(uniq)), luna.metadata)
    plan = make_plan(infos, 1, "iid", seed=0, test_subsets=(9,))
    assert len(plan.test) == 2 and not set(plan.test) & {s.seriesuid for s in first}
    with pytest.raises(ValueError, match="test-subset"):
        make_dataset(tmp_path / "e", 2, seed=4, test_scans=1, test_subset=10)


def test_default_data_holds_a_test_split_of_100_scans():
    """The demo's default: 100 scans round-robin (10 in subset 9) plus 90 test-only ones."""
    from common.config import RunConfig
    from common.data.prepare import synthetic_root

    cfg = RunConfig()
    in_test = sum(1 for i in range(cfg.synthetic_scans) if i % 10 in cfg.test_subset_list())
    assert in_test + cfg.synthetic_test_scans == 100
    assert f"+{cfg.synthetic_test_scans}test9" in synthetic_root(cfg).name
    with pytest.raises(ValueError, match="synthetic-test-scans"):
        RunConfig(synthetic_test_scans=-1)
