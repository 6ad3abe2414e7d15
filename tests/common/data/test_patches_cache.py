"""Candidate patches and the patch cache."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import common.data.cache as cache_mod
from common.data.cache import build_cache, cache_key, open_cache
from common.data.luna16 import DataError, load_luna16, read_scan
from common.data.patches import PAD_HU, PatchSpec, extract_hu


def _sphere_scan(tmp_path, direction, spacing=(0.7, 0.7, 2.0)):
    """A volume of lung (-850 HU) with a 10 mm solid nodule at a known world point."""
    shape = (40, 80, 80)  # z, y, x
    origin = np.array([-30.0, -25.0, -100.0])
    img = sitk.GetImageFromArray(np.full(shape, -850, dtype=np.int16))
    img.SetOrigin(origin.tolist())
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint((50.3, 30.7, 22.4)))
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    idx = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(float)
    d = np.array(direction, dtype=float).reshape(3, 3)
    world = origin + (idx * np.array(spacing)) @ d.T
    inside = np.linalg.norm(world - centre, axis=1) <= 5.0
    arr = np.full(shape, -850, dtype=np.int16).reshape(-1)
    arr[inside] = 40
    out = sitk.GetImageFromArray(arr.reshape(shape))
    out.CopyInformation(img)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "s.mhd"
    sitk.WriteImage(out, str(path), useCompression=False)
    return read_scan(path), centre


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (1, 0, 0, 0, 1, 0, 0, 0, -1)])
def test_patch_around_a_known_nodule_has_it_at_the_centre(tmp_path, direction):
    scan, centre = _sphere_scan(tmp_path, direction)
    spec = PatchSpec(size=33, fov_mm=33.0)
    patch = extract_hu(scan, centre[None], spec)[0]
    for plane in patch:
        bright = np.argwhere(plane > -400)
        assert len(bright) > 20
        np.testing.assert_allclose(bright.mean(axis=0), [16, 16], atol=0.8)
        # and the nodule's diameter in the plane is about 10 mm (10 px at 1 mm/px)
        assert 8 <= np.ptp(bright[:, 1]) + 1 <= 12


def test_identity_and_flipped_scans_give_the_same_patch(tmp_path):
    a, ca = _sphere_scan(tmp_path / "a", (1, 0, 0, 0, 1, 0, 0, 0, 1))
    b, cb = _sphere_scan(tmp_path / "b", (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    spec = PatchSpec(size=21, fov_mm=21.0)
    pa, pb = extract_hu(a, ca[None], spec)[0], extract_hu(b, cb[None], spec)[0]
    assert np.mean(np.abs(pa - pb)) < 40  # same anatomy; only interpolation differs


def test_candidate_at_the_volume_edge_is_padded_with_air(tmp_path):
    scan, _ = _sphere_scan(tmp_path, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    corner = scan.geometry.index_to_world(np.array([0.0, 0.0, 0.0]))
    patch = extract_hu(scan, corner[None], PatchSpec(size=16, fov_mm=32.0))[0]
    assert np.isfinite(patch).all()
    assert (patch == PAD_HU).mean() > 0.4  # the part outside the volume reads as air
    assert (patch == -850).any()  # the part inside is the scan


def test_cache_hit_reads_no_ct_file(tiny_root, tmp_path, monkeypatch):
    luna = load_luna16(tiny_root)
    spec = PatchSpec(size=16, fov_mm=32.0)
    first = build_cache(luna, spec, tmp_path, progress=False)

    def no_reading(*a, **k):
        raise AssertionError("the CT volume was read on a cache hit")

    monkeypatch.setattr(cache_mod, "read_scan", no_reading)
    again = build_cache(luna, spec, tmp_path, progress=False)
    assert again.path == first.path and len(again) == len(luna.candidates)
    np.testing.assert_array_equal(np.asarray(again.patches), np.asarray(first.patches))


def test_cache_is_keyed_by_preprocessing_settings(tiny_root):
    luna = load_luna16(tiny_root)
    base = cache_key(luna, PatchSpec(32, 48.0, -1000, 400))
    assert cache_key(luna, PatchSpec(32, 48.0, -1000, 400)) == base
    assert cache_key(luna, PatchSpec(64, 48.0, -1000, 400)) != base
    assert cache_key(luna, PatchSpec(32, 48.0, -1200, 600)) != base
    assert cache_key(luna, PatchSpec(32, 48.0, -1000, 400), max_neg_per_scan=5) != base


def test_a_cache_killed_mid_write_is_rebuilt(tiny_root, tmp_path):
    luna = load_luna16(tiny_root)
    spec = PatchSpec(size=16, fov_mm=32.0)
    good = build_cache(luna, spec, tmp_path, progress=False)
    reference = np.asarray(good.patches).copy()
    key = good.path.name
    # 1) an unfinished build of a dead process is never trusted and gets cleaned up
    shutil.rmtree(good.path)
    stale = tmp_path / f"{key}.tmp-999999"
    stale.mkdir()
    (stale / "patches.u8").write_bytes(b"\0" * 100)
    rebuilt = build_cache(luna, spec, tmp_path, progress=False)
    assert not stale.exists()
    np.testing.assert_array_equal(np.asarray(rebuilt.patches), reference)
    # 2) a final folder whose patch file was cut short is detected and rebuilt
    pfile = rebuilt.path / "patches.u8"
    del rebuilt
    with open(pfile, "r+b") as fh:
        fh.truncate(pfile.stat().st_size // 2)
    with pytest.raises(DataError, match="damaged"):
        open_cache(pfile.parent)
    again = build_cache(luna, spec, tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(again.patches), reference)
    # 3) a folder without a complete meta.json is not a cache
    meta = json.loads((again.path / "meta.json").read_text())
    meta["complete"] = False
    (again.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="incomplete"):
        open_cache(again.path)


def test_parallel_build_equals_serial_build(tiny_root, tmp_path):
    luna = load_luna16(tiny_root)
    spec = PatchSpec(size=16, fov_mm=32.0)
    serial = build_cache(luna, spec, tmp_path / "a", workers=1, progress=False)
    parallel = build_cache(luna, spec, tmp_path / "b", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(serial.patches), np.asarray(parallel.patches))
    np.testing.assert_array_equal(serial.label, parallel.label)


def test_bad_scan_is_skipped_and_reported_or_fails_the_run(tiny_root, tmp_path):
    root = tmp_path / "luna"
    shutil.copytree(tiny_root, root)
    victim = next((root / "subset2").glob("*.raw"))
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    luna = load_luna16(root)
    spec = PatchSpec(size=16, fov_mm=32.0)
    with pytest.raises(DataError, match=rf"{victim.stem}.*truncated"):
        build_cache(luna, spec, tmp_path / "c1", on_bad_scan="fail", progress=False)
    assert not any((tmp_path / "c1").glob("*/meta.json"))  # nothing half-written is left to trust
    cache = build_cache(luna, spec, tmp_path / "c2", on_bad_scan="skip", progress=False)
    assert victim.stem in cache.meta["skipped_scans"]
    assert "truncated" in cache.meta["skipped_scans"][victim.stem]
    assert victim.stem not in set(cache.seriesuid)  # never silently zero-filled
    assert len(cache) == int((luna.candidates.seriesuid != victim.stem).sum())


def test_negative_cap_keeps_every_positive(tiny_root, tmp_path):
    luna = load_luna16(tiny_root)
    cache = build_cache(luna, PatchSpec(size=16, fov_mm=32.0), tmp_path, max_neg_per_scan=3, progress=False)
    assert cache.label.sum() == luna.candidates.label.sum()
    for uid in set(cache.seriesuid):
        assert ((cache.seriesuid == uid) & (cache.label == 0)).sum() <= 3


def test_offset_copies_are_true_3d_cuts_of_every_positive_and_training_draws_among_them(tiny_root, tmp_path):
    """--augment-offsets: each positive is cut K more times at a seeded offset within the radius,
    its planes re-read from the volume (not the centred patch moved); training reads one of the
    K + 1 cuts at random, evaluation only the centred one, and without copies nothing changes."""
    from common.data.loaders import PatchDataset
    from common.data.patches import extract

    luna = load_luna16(tiny_root)
    spec = PatchSpec(size=16, fov_mm=32.0)
    plain = build_cache(luna, spec, tmp_path, progress=False)
    k, radius = 3, 2.5
    cache = build_cache(luna, spec, tmp_path, offset_copies=k, offset_mm=radius, progress=False)
    assert cache.path != plain.path and plain.copy_rows is None  # its own key; the plain cache kept its own
    assert cache_key(luna, spec) == plain.path.name and cache_key(luna, spec, offset_copies=k, offset_mm=radius) \
        == cache.path.name
    np.testing.assert_array_equal(cache.get(np.arange(len(cache))), plain.get(np.arange(len(plain))))
    n_copies = np.diff(cache.copy_start)
    assert (n_copies[cache.label == 1] == k).all() and (n_copies[cache.label == 0] == 0).all()
    assert cache.meta["copies_valid"] == k * int(cache.label.sum()) == len(cache.copy_rows)
    with open(cache.path / "copies.csv", newline="") as fh:
        copies = {int(r["row"]): r for r in csv.DictReader(fh)}
    pos = int(np.flatnonzero(cache.label == 1)[0])
    scan = read_scan(luna.scans[cache.seriesuid[pos]].path, cache.seriesuid[pos])
    rows = cache.copy_rows[cache.copy_start[pos]:cache.copy_start[pos + 1]]
    offsets = np.array([[float(copies[int(r)][c]) for c in ("dx", "dy", "dz")] for r in rows])
    assert (np.linalg.norm(offsets, axis=1) <= radius + 1e-3).all() and (np.abs(offsets) > 1e-3).any()
    want = extract(scan, cache.xyz[pos] + offsets, spec).astype(int)  # re-cut at the offset centres
    diff = np.abs(cache.read_rows(rows).astype(int) - want)  # index.csv keeps 4 decimals of the centre: rounding
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(cache.read_rows(rows[:1]), cache.get(np.array([pos])))
    # training draws among the cuts; evaluation and a cache without copies read the centred patch
    positions = np.flatnonzero(cache.label == 1)
    train = PatchDataset(cache, np.repeat(positions, 50), augment=True, seed=1)
    drawn = train.rows(train.positions)
    assert set(np.unique(drawn)) <= set(cache.row[positions]) | set(cache.copy_rows.tolist())
    share = np.isin(drawn, cache.copy_rows).mean()
    assert abs(share - k / (k + 1)) < 0.1
    items = train.__getitems__([0, 1, 2])  # what the training loader reads, batched and one by one
    assert len(items) == 3 and items[0][0].shape == train[0][0].shape == (3, 16, 16) and float(items[0][1]) == 1.0
    assert (PatchDataset(cache, positions).rows(positions) == cache.row[positions]).all()
    a, b = PatchDataset(plain, positions, augment=True, seed=4), PatchDataset(plain, positions, augment=True, seed=4)
    assert (a.rows(positions) == plain.row[positions]).all() and a.rng.random() == b.rng.random()  # no draw made
    # the key holds no run seed, so neither may the content: another seed builds the same copies
    other = build_cache(luna, spec, tmp_path / "other", seed=5, offset_copies=k, offset_mm=radius, progress=False)
    assert other.path.name == cache.path.name
    np.testing.assert_array_equal(np.asarray(other.patches), np.asarray(cache.patches))
    # a damaged copy list is refused, naming the file
    (cache.path / "copies.csv").write_text("row,of_row,dx,dy,dz\n")
    with pytest.raises(DataError, match="copies.csv"):
        open_cache(cache.path)


def test_offset_copies_settings_are_checked():
    from common.config import RunConfig

    with pytest.raises(ValueError, match="--augment-offsets must be in"):
        RunConfig(augment_offsets=-1)
    with pytest.raises(ValueError, match="--augment-offset-mm must be in"):
        RunConfig(augment_offsets=2, augment_offset_mm=0.0)
    assert RunConfig(augment_offsets=2).augment_offset_mm == 3.0
