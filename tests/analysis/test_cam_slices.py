"""The slice-level view (analysis/cams/slices.py): the classifier slid over a real axial slice
of a CT volume finds a nodule where it is, and counts false maxima."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis.cams.slices import (
    choose_slices,
    grid_maxima,
    lung_mask,
    nodules_on_slice,
    offset_probs,
    patch_probs,
    score_slice,
    slide,
)
from common.data.luna16 import CTScan, Geometry, Nodule
from common.data.patches import PatchSpec


class CentreBrightness(nn.Module):
    """logit = 10 x (the axial plane's centre 2 x 2 pixels - 0.45): a nodule (about +50 HU, 0.5
    in the model's input range) gives p 0.62, soft tissue (-50 HU, 0.36) 0.29, lung 0.00."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1] // 2
        return 10.0 * (x[:, 0, s - 1:s + 1, s - 1:s + 1].mean(dim=(1, 2)) - 0.45)[:, None]


def chest(nodules: list[tuple[tuple[float, float, float], float]]) -> CTScan:
    """A 1 mm chest: a body ellipse of soft tissue (-50 HU) around two lungs (-850 HU), air outside, and
    bright balls (+50 HU) of the given centres and radii."""
    geometry = Geometry(np.array([-100.0, -80.0, -20.0]), np.array([1.0, 1.0, 1.0]), np.eye(3))
    zi, yi, xi = np.mgrid[:40, :160, :200]
    w = geometry.index_to_world(np.stack([xi, yi, zi], axis=-1))
    x, y = w[..., 0], w[..., 1]
    vol = np.full(x.shape, -1000.0)
    vol[(x / 90) ** 2 + (y / 70) ** 2 <= 1] = -50.0
    for cx in (-45.0, 45.0):
        vol[((x - cx) / 35) ** 2 + (y / 50) ** 2 <= 1] = -850.0
    for c, r in nodules:
        vol[np.linalg.norm(w - np.array(c), axis=-1) <= r] = 50.0
    return CTScan("s", vol.astype(np.int16), geometry, None)  # type: ignore[arg-type]


def test_lung_mask_covers_the_lungs_and_their_nodules_not_the_body_wall():
    scan = chest([((-45.0, 10.0, 0.0), 5.0)])
    from analysis.cams.slices import slice_hu

    hu, xs, ys = slice_hu(scan, 0.0, 1.0)
    lung = lung_mask(hu, 1.0)
    at = lambda x, y: lung[int(np.argmin(np.abs(ys - y))), int(np.argmin(np.abs(xs - x)))]  # noqa: E731
    assert at(-45, 10) and at(45, -20)  # the nodule (filled in) and the other lung
    assert not at(0, 65) and not at(-99, -79) and not at(-45, 57)  # the body wall, the air outside
    # a nodule on the pleura (half of it a notch in the lung's edge): its lung half is inside the closed field
    wall = chest([((-45.0, 50.0, 0.0), 5.0)])
    hu2, xs2, ys2 = slice_hu(wall, 0.0, 1.0)
    lung2 = lung_mask(hu2, 1.0)
    assert hu2[int(np.argmin(np.abs(ys2 - 47))), int(np.argmin(np.abs(xs2 + 45)))] > 0  # nodule, not lung
    assert lung2[int(np.argmin(np.abs(ys2 - 47))), int(np.argmin(np.abs(xs2 + 45)))]


def test_sliding_the_classifier_finds_the_nodule_on_its_slice_and_no_false_maximum():
    on, off = ((-40.0, 12.0, 0.0), 5.0), ((40.0, -10.0, 12.0), 4.0)  # the second is 12 mm above the slice
    scan = chest([on, off])
    nods = [Nodule("s", on[0], 10.0), Nodule("s", off[0], 8.0)]
    view = slide(CentreBrightness(), scan, PatchSpec(32, 24.0), 0.0, 3.0, torch.device("cpu"))
    on_slice = nodules_on_slice(nods, 0.0)
    assert [n for n, _ in on_slice] == [nods[0]] and on_slice[0][1] == pytest.approx(5.0)
    assert view["patches"] == int(view["valid"].sum()) > 100
    s = score_slice(view["prob"], view["valid"], view["xs"], view["ys"], on_slice, 3.0, 0.5)
    assert s == {**s, "nodules": 1, "found": 1, "false_maxima": 0, "maxima": 1}
    # at a lower threshold the soft tissue at the lung's edge (p 0.29) makes false maxima
    low = score_slice(view["prob"], view["valid"], view["xs"], view["ys"], on_slice, 3.0, 0.2)
    assert low["found"] == 1 and low["false_maxima"] > 0
    # and a slice through the other nodule finds it too
    up = slide(CentreBrightness(), scan, PatchSpec(32, 24.0), 12.0, 3.0, torch.device("cpu"))
    s_up = score_slice(up["prob"], up["valid"], up["xs"], up["ys"], nodules_on_slice(nods, 12.0), 3.0, 0.5)
    assert (s_up["nodules"], s_up["found"]) == (1, 1)


def test_the_models_own_call_on_a_patch_centred_on_a_nodule():
    """What splits a slice view's misses into the classifier's and the map's: the probability on
    the patch centred on the nodule itself (and on lung beside it)."""
    scan = chest([((-40.0, 12.0, 0.0), 5.0)])
    spec, cpu = PatchSpec(32, 24.0), torch.device("cpu")
    p = patch_probs(CentreBrightness(), scan, np.array([[-40.0, 12.0, 0.0], [-50.0, -20.0, 0.0]]), spec, cpu)
    assert p.shape == (2,) and p[0] == pytest.approx(0.62, abs=0.03) and p[1] < 0.01
    assert patch_probs(CentreBrightness(), scan, np.zeros((0, 3)), spec, cpu).shape == (0,)
    # one 3 mm step off a 5 mm ball, re-cut there or rolled, the centre pixels still sit on it; off a
    # 1.5 mm ball both leave it (this model looks only at the centre: it has learned no shift)
    off, rolled = offset_probs(CentreBrightness(), scan, np.array([[-40.0, 12.0, 0.0]]), spec, 3.0, cpu)
    assert off[0] > 0.5 and rolled[0] > 0.5
    small = chest([((-40.0, 12.0, 0.0), 1.5)])
    off, rolled = offset_probs(CentreBrightness(), small, np.array([[-40.0, 12.0, 0.0]]), spec, 3.0, cpu)
    assert off[0] < 0.1 and rolled[0] < 0.1


def test_grid_maxima_and_choose_slices():
    p = np.zeros((5, 5), np.float32)
    p[1, 1], p[1, 2], p[3, 3] = 0.9, 0.8, 0.6
    valid = np.ones_like(p, bool)
    assert grid_maxima(p, valid, 0.5).tolist() == [[1, 1], [3, 3]]
    flat = np.zeros((5, 5), np.float32)
    flat[1:4, 1:4] = 1.0  # a plateau is one maximum, at its centre
    assert grid_maxima(flat, np.ones_like(flat, bool), 0.5).tolist() == [[2, 2]]
    valid[3, 3] = False
    assert grid_maxima(p, valid, 0.5).tolist() == [[1, 1]]
    nods = {"a": [Nodule("a", (0, 0, 5.0), 6), Nodule("a", (0, 0, -5.0), 6)], "b": [Nodule("b", (0, 0, 1.0), 6)]}
    picks = choose_slices(nods, 3, seed=0)
    assert sorted(picks) == [("a", -5.0), ("a", 5.0), ("b", 1.0)]
    assert len(choose_slices(nods, 2, seed=0)) == 2 and {u for u, _ in choose_slices(nods, 2, seed=0)} == {"a", "b"}


def test_the_slice_views_found_and_false_maxima_at_each_threshold():
    """The view's trade-off (``by_threshold``): maxima counted from a lower threshold find as many
    nodules or more and make more false maxima; above the nodule's own probability (0.62) none."""
    from analysis.cams.slices import CURVE_THRESHOLDS, slice_views

    on = ((-40.0, 12.0, 0.0), 5.0)
    scan = chest([on])
    views, totals = slice_views(CentreBrightness(), {"s": scan}, {"s": [Nodule("s", on[0], 10.0)]},
                                PatchSpec(32, 24.0), [("s", 0.0)], stride_mm=3.0, threshold=0.55,
                                device=torch.device("cpu"))
    curve = {c["threshold"]: c for c in totals["by_threshold"]}
    assert sorted(curve) == sorted({*CURVE_THRESHOLDS, 0.55})
    assert (curve[0.55]["found"], curve[0.55]["false_maxima_per_slice"]) == (totals["found"], 0.0) == (1, 0.0)
    assert curve[0.2]["found"] == 1 and curve[0.2]["false_maxima_per_slice"] > 0
    assert curve[0.7]["found"] == 0 and curve[0.7]["false_maxima_per_slice"] == 0.0
    falses = [curve[t]["false_maxima_per_slice"] for t in sorted(curve)]
    assert falses == sorted(falses, reverse=True)
