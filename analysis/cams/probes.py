"""Harder pointing games: every test nodule at a random position in the patch, and two nodules in one patch.

The cached test patches are centred on their candidates, so a heatmap that always peaks at
the centre "finds" every nodule. These probes take that away:

- ``random``: each positive's nodule is cut again from its CT scan, its three planes through
  the nodule's centre (the same planes the cache shows), on a wider field of the same pixel
  size; a window of the model's patch size is then cropped at a seeded random offset, so the
  nodule centre lands anywhere within ``±margin`` pixels of the patch centre (``margin`` =
  ``3/8`` of the patch size: the nodule centre stays at least 1/8 of the patch from the edge),
  at the same pixel in all three planes. A hit: the heatmap's peak within the nodule's radius
  of that pixel (every plane cuts the nodule through its centre, so one test serves all three).
- ``two_nodules``: two positives of the test split in one patch. Nodule A's window (cropped
  as above) receives nodule B's disk, cropped so that B lands at another random pixel at
  least ``R_A + R_B + 6`` pixels from A: inside ``R_B + 2`` pixels of B the patch takes the
  brighter of the two images, with a 2-pixel linear ramp beyond (nodules are brighter than
  the lung around them, so the maximum keeps both and leaves no seam in the parenchyma). The
  A patch keeps its own context; B brings only its disk. Scores: ``any`` (the peak lies
  inside one of the two nodules, not between them) and ``each`` (both nodules hold a local
  maximum of the map: :func:`local_maxima`).

Controls scored on the same patches (the best of them is the bar a heatmap must clear): the
patch centre as the peak, the same heatmap of a randomly initialised model, and the
brightest spot (:func:`analysis.cams.pointing.intensity_maps`). The probabilities the model
gives the probe patches are kept, so each score is also given over the probes the model
still calls positive (``*_true_positives``).

Research software on synthetic or public data; never for diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from analysis.cams.maps import peaks
from common.data.patches import PatchSpec

PAIR_GAP_PX = 6.0  # B's disk (R_B + 2 px, + 2 px ramp) stays clear of A's nodule
PEAK_WINDOW_PX = 7  # local maxima: the largest value in a 7 x 7 window ...
PEAK_FLOOR = 0.5  # ... and at least half the map's largest value


def margin_px(spec: PatchSpec) -> int:
    """How far (pixels) from the patch centre a probe may put a nodule centre: 3/8 of the patch."""
    return (3 * spec.size) // 8


def wide_spec(spec: PatchSpec, margin: int) -> PatchSpec:
    """The patch settings on a field ``margin`` pixels wider on every side, same pixel size."""
    size = spec.size + 2 * margin
    return PatchSpec(size=size, fov_mm=spec.fov_mm * size / spec.size, hu_min=spec.hu_min, hu_max=spec.hu_max)


def crop(wide: np.ndarray, spec: PatchSpec, margin: int, rc: np.ndarray) -> np.ndarray:
    """Windows (3, S, S) of a wide patch (3, S + 2m, S + 2m) centred on its nodule that put the
    nodule centre at pixel ``rc`` = ``mid + (dr, dc)``, integer offsets within ``±margin``."""
    mid = (spec.size - 1) / 2
    dr, dc = int(round(rc[0] - mid)), int(round(rc[1] - mid))
    if max(abs(dr), abs(dc)) > margin:
        raise ValueError(f"offset ({dr}, {dc}) beyond the margin {margin}")
    r0, c0 = margin - dr, margin - dc
    return wide[:, r0:r0 + spec.size, c0:c0 + spec.size]


def random_positions(n: int, spec: PatchSpec, margin: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) nodule-centre pixels, integer offsets uniform in ``[-margin, margin]`` from the centre."""
    mid = (spec.size - 1) / 2
    return mid + rng.integers(-margin, margin + 1, size=(n, 2)).astype(np.float64)


def pair_positions(ra: float, rb: float, spec: PatchSpec, margin: int, rng: np.random.Generator,
                   tries: int = 200) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels of two nodule centres at least ``ra + rb + PAIR_GAP_PX`` apart, or None when no
    draw of ``tries`` fits (two nodules too big for one patch)."""
    for _ in range(tries):
        a, b = random_positions(2, spec, margin, rng)
        if math.hypot(*(a - b)) >= ra + rb + PAIR_GAP_PX:
            return a, b
    return None


def paste_disk(base: np.ndarray, other: np.ndarray, rc: np.ndarray, radius_px: float) -> np.ndarray:
    """``base`` (3, S, S) uint8 with ``other``'s disk around ``rc`` blended in by the maximum:
    full within ``radius_px + 2``, a linear ramp over the next 2 pixels."""
    size = base.shape[-1]
    r, c = np.mgrid[:size, :size]
    d = np.hypot(r - rc[0], c - rc[1])
    w = np.clip((radius_px + 4.0 - d) / 2.0, 0.0, 1.0)[None]
    a = base.astype(np.float32)
    out = a + w * (np.maximum(a, other.astype(np.float32)) - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class ProbeSet:
    """The probe patches of a test split's positives (see the module docstring)."""

    spec: PatchSpec
    margin: int
    random: np.ndarray  # uint8 (N, 3, S, S)
    random_rc: np.ndarray  # (N, 2) the nodule centre's pixel
    random_radius: np.ndarray  # (N,) the nodule's radius in pixels
    pairs: np.ndarray  # uint8 (M, 3, S, S)
    pairs_rc: np.ndarray  # (M, 2, 2) the two nodule centres' pixels
    pairs_radius: np.ndarray  # (M, 2)
    pairs_skipped: int  # pairs with no room for both nodules
    random_prob: np.ndarray | None = None
    pairs_prob: np.ndarray | None = None


def build_probes(spec: PatchSpec, wide: np.ndarray, radius_mm: np.ndarray, seed: int = 0) -> ProbeSet:
    """Probe patches from wide patches (N, 3, S + 2m, S + 2m) centred on N nodules of radii
    ``radius_mm``: one random-position patch per nodule, and one pair per nodule (A = nodule i,
    B = the next nodule of a seeded permutation) where both fit."""
    margin = (wide.shape[-1] - spec.size) // 2
    if wide.shape[-1] != spec.size + 2 * margin or margin < 1:
        raise ValueError(f"wide patches of {wide.shape[-1]} px do not fit patches of {spec.size} px")
    rng = np.random.default_rng(seed)
    n = len(wide)
    radius = np.asarray(radius_mm, dtype=np.float64) / (spec.fov_mm / spec.size)
    rc = random_positions(n, spec, margin, rng)
    rand = np.stack([crop(w, spec, margin, p) for w, p in zip(wide, rc, strict=True)]) if n else \
        np.zeros((0, 3, spec.size, spec.size), np.uint8)
    pairs, pairs_rc, pairs_r, skipped = [], [], [], 0
    if n >= 2:
        partner = rng.permutation(n)
        partner = np.where(partner == np.arange(n), np.roll(partner, 1), partner)
        for i, j in enumerate(partner):
            where = pair_positions(radius[i], radius[j], spec, margin, rng)
            if where is None:
                skipped += 1
                continue
            a, b = where
            pairs.append(paste_disk(crop(wide[i], spec, margin, a), crop(wide[j], spec, margin, b), b, radius[j]))
            pairs_rc.append(np.stack([a, b]))
            pairs_r.append([radius[i], radius[j]])
    return ProbeSet(spec, margin, rand, rc, radius,
                    np.stack(pairs) if pairs else np.zeros((0, 3, spec.size, spec.size), np.uint8),
                    np.array(pairs_rc).reshape(-1, 2, 2), np.array(pairs_r).reshape(-1, 2), skipped)


def local_maxima(m: np.ndarray) -> np.ndarray:
    """(K, 2) pixels of a map's local maxima: the largest value in a ``PEAK_WINDOW_PX`` square
    window and at least ``PEAK_FLOOR`` of the map's largest value (a flat map has none)."""
    top, low = float(m.max()), float(m.min())
    if not top > low:
        return np.zeros((0, 2), dtype=np.int64)
    floor = low + PEAK_FLOOR * (top - low)
    is_max = (m == ndimage.maximum_filter(m, size=PEAK_WINDOW_PX, mode="nearest")) & (m >= floor)
    return np.argwhere(is_max)


def inside(points: np.ndarray, rc: np.ndarray, radius: float) -> bool:
    """Whether any of ``points`` (K, 2) lies within ``radius`` pixels of ``rc``."""
    return bool(len(points)) and bool((np.hypot(*(points - rc).T) <= radius).any())


def _rate(h: np.ndarray) -> dict[str, Any]:
    from analysis.cams.pointing import wilson

    n = len(h)
    return {"n": n, "rate": float(h.mean()) if n else math.nan, "ci95": wilson(int(h.sum()), n)}


def score_random(maps: np.ndarray, rc: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Hits (N,) bool: the peak of each map within its nodule's radius of the nodule's pixel."""
    if not len(maps):
        return np.zeros(0, bool)
    pk, has = peaks(maps)
    return has & (np.hypot(*(pk - rc).T) <= radius)


def score_pairs(maps: np.ndarray, rc: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair patch: ``any`` (the peak lies inside one of the two nodules) and ``each`` (each
    nodule holds a local maximum), both (M,) bool."""
    if not len(maps):
        return np.zeros(0, bool), np.zeros(0, bool)
    pk, has = peaks(maps)
    hit_any = has & ((np.hypot(*(pk - rc[:, 0]).T) <= radius[:, 0]) | (np.hypot(*(pk - rc[:, 1]).T) <= radius[:, 1]))
    each = np.array([inside(lm, p[0], r[0]) and inside(lm, p[1], r[1])
                     for lm, p, r in zip((local_maxima(m) for m in maps), rc, radius, strict=True)], dtype=bool)
    return hit_any, each


def centre_maps(n: int, size: int) -> np.ndarray:
    """Maps that peak at the patch centre (the pixel nearest it) and nowhere else."""
    m = np.zeros((n, size, size), np.float32)
    m[:, size // 2, size // 2] = 1.0
    return m


def score_probes(probes: ProbeSet, maps_of, threshold: float) -> dict[str, Any]:
    """Scores of one heatmap setting on the probes, with controls.

    ``maps_of(who, patches)`` gives heatmaps (N, S, S) for ``who`` in ``model``, ``random_init``
    (None there skips that control) and ``brightest``. Returns ``random``,
    ``random_true_positives``, ``two_nodules`` and ``two_nodules_true_positives``, each with the
    model's ``n``, ``rate`` and ``ci95`` (``two_nodules``: ``any`` and ``each``), and ``controls``
    (centre, random_init, brightest: their rates) and ``best_control``."""
    from analysis.cams.pointing import intensity_maps

    out: dict[str, Any] = {"margin_px": probes.margin, "pairs_skipped": probes.pairs_skipped}
    size = probes.spec.size
    sets = {"random": (probes.random, probes.random_rc, probes.random_radius, probes.random_prob, False),
            "two_nodules": (probes.pairs, probes.pairs_rc, probes.pairs_radius, probes.pairs_prob, True)}
    for name, (patches, rc, radius, prob, pair) in sets.items():
        maps = {"model": maps_of("model", patches), "random_init": maps_of("random_init", patches),
                "brightest": intensity_maps(patches) if len(patches) else np.zeros((0, size, size), np.float32),
                "centre": centre_maps(len(patches), size)}
        keep_tp = prob >= threshold if prob is not None else np.zeros(len(patches), bool)
        for part, keep in ((name, np.ones(len(patches), bool)), (f"{name}_true_positives", keep_tp)):
            res: dict[str, Any] = {"controls": {}}
            for who, m in maps.items():
                if m is None:
                    continue
                if pair:
                    hit_any, each = score_pairs(m[keep], rc[keep], radius[keep])
                    scored = {"any": _rate(hit_any), "each": _rate(each)}
                else:
                    scored = {"hit": _rate(score_random(m[keep], rc[keep], radius[keep]))}
                if who == "model":
                    res.update(scored)
                else:
                    res["controls"][who] = {k: v["rate"] for k, v in scored.items()}
            key = "any" if pair else "hit"
            res["n"] = int(keep.sum())
            rates = [c[key] for c in res["controls"].values() if not math.isnan(c[key])]
            res["best_control"] = max(rates) if rates else math.nan
            if prob is not None:
                res["mean_prob"] = float(prob[keep].mean()) if keep.any() else math.nan
            out[part] = res
    return out
