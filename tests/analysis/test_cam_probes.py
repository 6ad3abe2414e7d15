"""The harder pointing games (analysis/cams/probes.py): nodules put where the probe says, the
scores counted right, and a blob detector's heatmap passes where the centre control fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.cams import heatmaps
from analysis.cams.probes import (
    build_probes,
    crop,
    local_maxima,
    paste_disk,
    score_pairs,
    score_probes,
    score_random,
    wide_spec,
)
from common.data.loaders import to_float
from common.data.patches import PatchSpec
from tests.analysis.test_cams import BlobNet

SPEC = PatchSpec(32, 24.0)  # 0.75 mm per pixel


def disks(n: int, size: int, radius_px: np.ndarray) -> np.ndarray:
    """Wide patches (n, 3, size, size) uint8: a bright disk of each radius at the patch centre on a dark field."""
    mid = (size - 1) / 2
    r, c = np.mgrid[:size, :size]
    out = np.full((n, 3, size, size), 10, np.uint8)
    for i, rad in enumerate(radius_px):
        out[i, :, np.hypot(r - mid, c - mid) <= rad] = 200
    return out


def centroid(img: np.ndarray, level: int = 100) -> np.ndarray:
    return np.argwhere(img >= level).mean(axis=0)


def test_wide_spec_keeps_the_pixel_size_and_crop_moves_the_nodule():
    wide = wide_spec(SPEC, 12)
    assert wide.size == 56 and wide.fov_mm / wide.size == pytest.approx(SPEC.fov_mm / SPEC.size)
    w = disks(1, 56, np.array([2.0]))[0]
    mid = (SPEC.size - 1) / 2
    for rc in (np.array([mid + 5, mid - 12]), np.array([mid - 12, mid + 12]), np.array([mid, mid])):
        win = crop(w, SPEC, 12, rc)
        assert win.shape == (3, 32, 32)
        np.testing.assert_allclose(centroid(win[0]), rc, atol=1e-9)
    with pytest.raises(ValueError, match="beyond the margin"):
        crop(w, SPEC, 12, np.array([mid + 13, mid]))


def test_build_probes_puts_each_nodule_at_its_pixel_and_pairs_apart():
    margin = 12
    radius_mm = np.array([1.5, 2.25, 3.0, 1.5, 2.25])
    rad_px = radius_mm / 0.75
    wide = disks(5, SPEC.size + 2 * margin, rad_px)
    pr = build_probes(SPEC, wide, radius_mm, seed=3)
    assert pr.random.shape == (5, 3, 32, 32) and pr.margin == margin
    np.testing.assert_allclose(pr.random_radius, rad_px)
    for img, rc in zip(pr.random, pr.random_rc, strict=True):
        np.testing.assert_allclose(centroid(img[0]), rc, atol=1e-9)
        assert np.all(np.abs(rc - 15.5) <= margin)
    assert len(pr.pairs) + pr.pairs_skipped == 5 and len(pr.pairs) >= 4
    for img, rc, rad in zip(pr.pairs, pr.pairs_rc, pr.pairs_radius, strict=True):
        assert np.hypot(*(rc[0] - rc[1])) >= rad.sum() + 6
        for p in rc:  # both disks are there, bright at their centres
            assert img[0, int(round(p[0] - 0.5)), int(round(p[1] - 0.5))] == 200
    # the seed decides the positions; another seed moves them
    again, other = build_probes(SPEC, wide, radius_mm, seed=3), build_probes(SPEC, wide, radius_mm, seed=4)
    np.testing.assert_array_equal(again.random_rc, pr.random_rc)
    assert not np.array_equal(other.random_rc, pr.random_rc)


def test_paste_disk_takes_the_brighter_image_only_near_the_disk():
    base = np.full((3, 32, 32), 50, np.uint8)
    other = np.full((3, 32, 32), 120, np.uint8)
    out = paste_disk(base, other, np.array([10.0, 20.0]), 3.0)
    assert out[0, 10, 20] == 120 and out[0, 10, 25] == 120  # within R + 2
    assert out[0, 10, 26] == 85  # the ramp: halfway at R + 3
    assert out[0, 25, 5] == 50  # far away: the base image
    dark = paste_disk(base, np.zeros_like(base), np.array([10.0, 20.0]), 3.0)
    np.testing.assert_array_equal(dark, base)  # never darker than the base


def test_random_and_pair_scores_by_hand():
    maps = np.zeros((3, 32, 32), np.float32)
    maps[0, 5, 5] = 1.0  # on the nodule at (6, 6), R = 2 px
    maps[1, 20, 20] = 1.0  # 14 px away
    rc = np.array([[6.0, 6.0]] * 3)
    assert score_random(maps, rc, np.array([2.0, 2.0, 2.0])).tolist() == [True, False, False]  # maps[2]: flat
    pair_rc = np.array([[[5.0, 5.0], [25.0, 25.0]]] * 3)
    rad = np.array([[2.0, 2.0]] * 3)
    two = np.zeros((3, 32, 32), np.float32)
    two[0, 5, 5], two[0, 25, 25] = 1.0, 0.8  # a local maximum in each
    two[1, 5, 5], two[1, 25, 25] = 1.0, 0.3  # the second below half of the top: not a maximum that counts
    two[2, 15, 15] = 1.0  # between them
    hit_any, each = score_pairs(two, pair_rc, rad)
    assert hit_any.tolist() == [True, True, False] and each.tolist() == [True, False, False]
    assert local_maxima(np.zeros((8, 8), np.float32)).shape == (0, 2)


def test_a_blob_detector_finds_probe_nodules_where_the_centre_does_not():
    """A heatmap that follows the evidence scores on the probes; the patch centre does not."""
    margin = 12
    radius_mm = np.full(12, 2.25)  # 3 px
    wide = disks(12, SPEC.size + 2 * margin, radius_mm / 0.75)
    pr = build_probes(SPEC, wide, radius_mm, seed=0)
    pr.random_prob = np.linspace(0, 1, len(pr.random))
    pr.pairs_prob = np.ones(len(pr.pairs))
    net = BlobNet().eval()

    def maps_of(who, patches):
        if who != "model":
            return None
        x = torch.from_numpy(to_float(patches))
        return heatmaps(net, x, method="gradcam", layer="body", stride=4, offset=1.5)

    s = score_probes(pr, maps_of, threshold=0.5)
    assert s["random"]["n"] == 12 and s["random_true_positives"]["n"] == 6
    assert s["random"]["hit"]["rate"] >= 0.9
    assert s["random"]["controls"]["centre"]["hit"] < 0.5 and "random_init" not in s["random"]["controls"]
    assert s["random"]["best_control"] == max(s["random"]["controls"]["centre"]["hit"],
                                              s["random"]["controls"]["brightest"]["hit"])
    assert s["two_nodules"]["any"]["rate"] >= 0.9 and s["two_nodules"]["each"]["rate"] >= 0.5
    assert s["two_nodules"]["controls"]["centre"]["each"] == 0.0  # one peak cannot be in both
