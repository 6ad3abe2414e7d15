"""The slice-level view: the classifier slid over a whole axial slice, its nodule probability
drawn over the lung with the annotated nodules outlined (the reference workload's figure), and
scored.

For an axial slice through an annotated nodule's centre, a grid of points every ``stride_mm``
covers the slice's lung field (:func:`lung_mask`: air-dark voxels inside the body, holes filled
so that nodules and vessels within the lung count, the edge closed so that nodules on the
pleura count too).
At every point the model gets the same 2.5D patch the cache would hold for a candidate there
(:func:`common.data.patches.extract`), so the map is the model's probability of "a nodule
here" over the slice. A nodule on the slice (the plane cuts it: ``|z - z_n| < R``, in-plane
radius ``r = sqrt(R^2 - dz^2)``) is *found* when a local maximum of the map (the largest value
of its 3 x 3 grid neighbourhood, at least ``threshold``) lies within ``max(r, stride / sqrt(2))``
of its centre: the grid cannot place a maximum closer than half a cell diagonal. Every other
such maximum is a *false maximum*. Reported: the share of nodules found (95% Wilson interval)
and the false maxima per slice.

Each nodule is listed with why it was found or missed (:func:`nodule_details`), beside the
model's probability on a patch centred on the nodule's centre in the slice's plane (``p_at_centre``:
its x and y, the slice's z, the best point the slide could hit): a nodule the model does not
call even there is the classifier's miss, not the map's; the totals count both. And
how the model holds a nodule one grid step off the patch centre (``p_offset``: the median over
the four in-plane directions of a patch truly centred there, its planes re-cut from the volume)
against the centred patch moved the same step by the training's own shift (``p_rolled``:
:func:`common.data.loaders.shift_planes`, which moves all three planes alike): the grid's
points sit up to half a step off each nodule.

Research software on synthetic or public data; never for diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.loaders import shift_planes, to_float
from common.data.luna16 import CTScan, Nodule
from common.data.patches import PatchSpec, extract
from common.evaluation.metrics import sigmoid
from common.training.engine import predict

SLICES_PNG = "cam_slices.png"
CURVE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # the slice view's found / false-maxima trade-off
CLOSING_MM = 10.0  # the lung field's edge closed at this radius, for nodules attached to the chest wall


def slice_hu(scan: CTScan, z_mm: float, step_mm: float, extent: tuple[float, float, float, float] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial plane ``z = z_mm`` resampled on a world grid ``step_mm`` apart (trilinear): HU
    (rows along y, cols along x) and the grid's x and y coordinates. ``extent`` = (x0, x1, y0,
    y1) mm, default the scan's whole field."""
    if extent is None:
        corners = np.array([[i, j, k] for i in (0, scan.array.shape[2] - 1) for j in (0, scan.array.shape[1] - 1)
                            for k in (0, scan.array.shape[0] - 1)], dtype=np.float64)
        w = scan.geometry.index_to_world(corners)
        extent = (w[:, 0].min(), w[:, 0].max(), w[:, 1].min(), w[:, 1].max())
    xs = np.arange(extent[0], extent[1] + 1e-9, step_mm)
    ys = np.arange(extent[2], extent[3] + 1e-9, step_mm)
    gx, gy = np.meshgrid(xs, ys)
    world = np.stack([gx, gy, np.full_like(gx, z_mm)], axis=-1)
    idx = scan.geometry.world_to_index(world)
    coords = np.moveaxis(idx[..., ::-1], -1, 0)
    hu = ndimage.map_coordinates(scan.array.astype(np.float32), coords, order=1, mode="constant", cval=-1000.0,
                                 prefilter=False)
    return hu, xs, ys


def lung_mask(hu: np.ndarray, step_mm: float) -> np.ndarray:
    """Where the lungs are on an axial slice (bool, same grid): dark (< -400 HU) inside the body
    (> -500 HU, holes filled, the largest component), its own holes filled (nodules, vessels),
    then closed with a disk of ``CLOSING_MM`` (the "rolling ball": a nodule on the pleura is a
    notch in the lung's edge, and closing fills it without reaching into the chest wall)."""
    body = ndimage.binary_fill_holes(hu > -500)
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(body, lab, index=range(1, n + 1))
        body = lab == (int(np.argmax(sizes)) + 1)
    lung = ndimage.binary_fill_holes(body & (hu < -400))
    r = max(1, int(round(CLOSING_MM / step_mm)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = xx * xx + yy * yy <= r * r
    closed = ndimage.binary_closing(np.pad(lung, r + 1), structure=disk)[r + 1:-(r + 1), r + 1:-(r + 1)]
    return ndimage.binary_fill_holes(closed) & body


def nodules_on_slice(nodules: list[Nodule], z_mm: float) -> list[tuple[Nodule, float]]:
    """The nodules the plane ``z = z_mm`` cuts, each with its in-plane radius (mm)."""
    out = []
    for n in nodules:
        dz = abs(n.xyz[2] - z_mm)
        r = n.diameter_mm / 2
        if dz < r:
            out.append((n, math.sqrt(r * r - dz * dz)))
    return out


def grid_maxima(prob: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
    """(K, 2) grid cells (row, col) of local maxima: valid, at least ``threshold``, and the
    largest of their 3 x 3 neighbourhood (cells outside ``valid`` count as 0); touching cells of
    equal value are one maximum."""
    p = np.where(valid, np.nan_to_num(prob, nan=0.0), 0.0)
    is_max = (p == ndimage.maximum_filter(p, size=3, mode="constant", cval=0.0)) & valid & (p >= threshold)
    # a plateau (equal neighbours, e.g. a saturated probability) is one maximum: its cell nearest its centroid
    lab, n = ndimage.label(is_max, structure=np.ones((3, 3), bool))
    out = []
    for k in range(1, n + 1):
        cells = np.argwhere(lab == k)
        out.append(cells[np.argmin(np.hypot(*(cells - cells.mean(axis=0)).T))])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def score_slice(prob: np.ndarray, valid: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                on_slice: list[tuple[Nodule, float]], stride_mm: float, threshold: float) -> dict[str, Any]:
    """Found nodules and false maxima of one slice's probability grid (see the module docstring),
    and each nodule's distance to the nearest maximum (``nearest_mm``)."""
    cells = grid_maxima(prob, valid, threshold)
    pts = np.stack([xs[cells[:, 1]], ys[cells[:, 0]]], axis=1) if len(cells) else np.zeros((0, 2))
    slack = stride_mm / math.sqrt(2)
    claimed = np.zeros(len(pts), bool)
    found, nearest = [], []
    for n, r in on_slice:
        d = np.hypot(pts[:, 0] - n.xyz[0], pts[:, 1] - n.xyz[1]) if len(pts) else np.zeros(0)
        near = d <= max(r, slack)
        found.append(bool(near.any()))
        nearest.append(float(d.min()) if len(d) else math.inf)
        claimed |= near
    return {"nodules": len(on_slice), "found": int(sum(found)), "found_each": found, "nearest_mm": nearest,
            "maxima": int(len(pts)), "false_maxima": int((~claimed).sum()),
            "maxima_xy": pts.tolist(), "maxima_true": claimed.tolist()}


def probs_of(model: nn.Module, patches: np.ndarray, device: torch.device, batch: int = 64) -> np.ndarray:
    """The model's probability on uint8 patches (N, 3, S, S), through the one evaluation routine
    (:func:`common.training.engine.predict`), as for every test patch."""
    if not len(patches):
        return np.zeros(0, np.float64)
    x = torch.from_numpy(to_float(patches))
    logits, _ = predict(model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=batch), device)
    return sigmoid(logits)


def patch_probs(model: nn.Module, scan: CTScan, centres: np.ndarray, spec: PatchSpec, device: torch.device,
                batch: int = 64) -> np.ndarray:
    """The model's probability on the patch centred at each (N, 3) world point."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    return probs_of(model, extract(scan, centres, spec), device, batch) if len(centres) else np.zeros(0)


def offset_probs(model: nn.Module, scan: CTScan, centres: np.ndarray, spec: PatchSpec, step_mm: float,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per centre: the median probability over the four in-plane directions (+-x, +-y) of a
    patch whose centre is moved ``step_mm`` (re-cut from the volume), and of the centred patch
    moved by as many pixels with the training's shift (:func:`shift_planes`)."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    if not len(centres):
        return np.zeros(0), np.zeros(0)
    dirs = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=np.float64)
    true = patch_probs(model, scan, (centres[:, None, :] + step_mm * dirs[None]).reshape(-1, 3), spec, device)
    px = int(round(step_mm * spec.size / spec.fov_mm))
    # the same four moves in pixels (a symmetric set: the medians need no pairing with the directions)
    moves = [(0, px), (0, -px), (px, 0), (-px, 0)]
    rolled = np.stack([shift_planes(p.copy(), dy, dx) for p in extract(scan, centres, spec) for dy, dx in moves])
    return np.median(true.reshape(-1, 4), axis=1), np.median(probs_of(model, rolled, device).reshape(-1, 4), axis=1)


def slide(model: nn.Module, scan: CTScan, spec: PatchSpec, z_mm: float, stride_mm: float, device: torch.device,
          batch: int = 64, step_mm: float | None = None) -> dict[str, Any]:
    """The model slid over the lung field of axial slice ``z_mm``: HU of the slice on a fine grid
    (``step_mm``, default the patch's pixel size), the lung mask, and the probability on the
    coarse grid every ``stride_mm`` (NaN outside the lung)."""
    fine = step_mm or spec.fov_mm / spec.size
    hu, fx, fy = slice_hu(scan, z_mm, fine)
    lung = lung_mask(hu, fine)
    if not lung.any():
        raise ValueError(f"scan {scan.seriesuid}: no lung found on the axial slice z = {z_mm:.1f} mm")
    rows, cols = np.nonzero(lung)
    extent = (fx[cols.min()], fx[cols.max()], fy[rows.min()], fy[rows.max()])
    xs = np.arange(extent[0], extent[1] + 1e-9, stride_mm)
    ys = np.arange(extent[2], extent[3] + 1e-9, stride_mm)
    # a coarse cell is in the lung when the fine pixel nearest it is
    ci = np.clip(np.rint((xs - fx[0]) / fine).astype(int), 0, len(fx) - 1)
    ri = np.clip(np.rint((ys - fy[0]) / fine).astype(int), 0, len(fy) - 1)
    valid = lung[np.ix_(ri, ci)]
    gy, gx = np.nonzero(valid)
    centres = np.stack([xs[gx], ys[gy], np.full(len(gx), z_mm)], axis=1)
    probs = patch_probs(model, scan, centres, spec, device, batch)
    prob = np.full(valid.shape, np.nan, np.float32)
    prob[gy, gx] = probs
    return {"hu": hu, "fine_x": fx, "fine_y": fy, "lung": lung, "prob": prob, "valid": valid, "xs": xs, "ys": ys,
            "z_mm": z_mm, "patches": int(len(centres))}


@dataclass
class SliceView:
    """One scored slice, ready to draw."""

    seriesuid: str
    view: dict[str, Any]
    on_slice: list[tuple[Nodule, float]]
    score: dict[str, Any]


def nodule_details(sv: SliceView, stride_mm: float) -> list[dict[str, Any]]:
    """Why each nodule of a slice was found or missed: its diameter, the slice's distance from its
    centre (``dz_mm``) and in-plane radius, the nearest local maximum (mm), and the largest
    probability on the grid within its in-plane radius plus one grid step (``None`` for a slice
    without maxima), and the model's own calls that :func:`slice_views` measured (``p_at_centre``,
    ``p_offset``, ``p_rolled``: the module docstring)."""
    v = sv.view
    gx, gy = np.meshgrid(v["xs"], v["ys"])
    out = []
    for k, (n, r) in enumerate(sv.on_slice):
        around = np.hypot(gx - n.xyz[0], gy - n.xyz[1]) <= r + stride_mm
        p = np.nan_to_num(v["prob"], nan=0.0)[around]
        out.append({"diameter_mm": round(n.diameter_mm, 2), "dz_mm": round(abs(n.xyz[2] - v["z_mm"]), 2),
                    "radius_on_slice_mm": round(r, 2), "found": sv.score["found_each"][k],
                    "nearest_maximum_mm": round(d, 2) if math.isfinite(d := sv.score["nearest_mm"][k]) else None,
                    "max_prob_near": round(float(p.max()), 3) if p.size else None,
                    **{key: (round(float(sv.score[key][k]), 3) if key in sv.score else None)
                       for key in ("p_at_centre", "p_offset", "p_rolled")}})
    return out


def choose_slices(nodules: dict[str, list[Nodule]], n: int, seed: int = 0) -> list[tuple[str, float]]:
    """Up to ``n`` axial slices through annotated nodules' centres (scan, z), seeded, at most one
    per scan first (then a scan's other nodules)."""
    rng = np.random.default_rng(seed)
    uids = sorted(nodules)
    rng.shuffle(uids)
    picked: list[tuple[str, float]] = []
    for round_ in range(max((len(v) for v in nodules.values()), default=0)):
        for uid in uids:
            nods = sorted(nodules[uid], key=lambda m: m.xyz[2])
            if round_ < len(nods) and len(picked) < n:
                z = nods[round_].xyz[2]
                if all(u != uid or abs(z - zz) > 1e-6 for u, zz in picked):
                    picked.append((uid, z))
    return picked


def slice_views(model: nn.Module, scans: dict[str, CTScan], nodules: dict[str, list[Nodule]], spec: PatchSpec,
                picks: list[tuple[str, float]], *, stride_mm: float, threshold: float, device: torch.device,
                progress: bool = False) -> tuple[list[SliceView], dict[str, Any]]:
    """Slide, score and total the chosen slices. Totals: ``slices``, ``nodules``, ``found``,
    ``rate`` and ``ci95`` (the share found), ``false_maxima_per_slice``, ``patches``,
    ``by_threshold`` (found and false maxima per slice with maxima counted from each of
    ``CURVE_THRESHOLDS`` and ``threshold`` up: the view's trade-off, as a FROC curve is the
    detector's) and ``per_slice`` (each slice's counts and :func:`nodule_details`)."""
    from tqdm import tqdm

    from analysis.cams.pointing import wilson

    views = []
    for uid, z in tqdm(picks, desc="sliding over slices", unit="slice", disable=not progress, leave=False,
                       dynamic_ncols=True):
        v = slide(model, scans[uid], spec, z, stride_mm, device)
        on = nodules_on_slice(nodules.get(uid, []), z)
        score = score_slice(v["prob"], v["valid"], v["xs"], v["ys"], on, stride_mm, threshold)
        # each nodule's centre in the slice's plane: for a nodule the plane cuts off its centre, the best
        # point the slide could hit (its own 3D centre is not on the slice)
        centres = np.array([(n.xyz[0], n.xyz[1], z) for n, _ in on]).reshape(-1, 3)
        score["p_at_centre"] = patch_probs(model, scans[uid], centres, spec, device).tolist()
        off, rolled = offset_probs(model, scans[uid], centres, spec, stride_mm, device)
        score["p_offset"], score["p_rolled"] = off.tolist(), rolled.tolist()
        views.append(SliceView(uid, v, on, score))
    n_nod = sum(s.score["nodules"] for s in views)
    found = sum(s.score["found"] for s in views)
    curve = []
    for t in sorted({*CURVE_THRESHOLDS, threshold}):
        sc = [score_slice(s.view["prob"], s.view["valid"], s.view["xs"], s.view["ys"], s.on_slice, stride_mm, t)
              for s in views]
        n_found = sum(c["found"] for c in sc)
        curve.append({"threshold": t, "found": n_found, "rate": n_found / n_nod if n_nod else math.nan,
                      "ci95": wilson(n_found, n_nod),
                      "false_maxima_per_slice": float(np.mean([c["false_maxima"] for c in sc])) if sc else math.nan})
    called = [(p >= threshold, f) for s in views for p, f in zip(s.score["p_at_centre"], s.score["found_each"],
                                                                 strict=True)]
    totals = {"slices": len(views), "nodules": n_nod, "found": found,
              "rate": found / n_nod if n_nod else math.nan, "ci95": wilson(found, n_nod),
              "false_maxima_per_slice": float(np.mean([s.score["false_maxima"] for s in views])) if views
              else math.nan,
              # the classifier's own share: nodules it calls on a patch centred on them in the slice's plane,
              # and how many of those the slide finds (one not called there is the classifier's miss)
              "called_at_centre": int(sum(c for c, _ in called)),
              "found_of_called": int(sum(c and f for c, f in called)),
              "found_not_called": int(sum(f and not c for c, f in called)),
              # one grid step off the nodule: a patch truly centred there against the centred patch moved
              # by the training's shift (the median over four directions, called at >= threshold)
              "called_offset": int(sum(p >= threshold for s in views for p in s.score["p_offset"])),
              "called_rolled": int(sum(p >= threshold for s in views for p in s.score["p_rolled"])),
              "patches": int(sum(s.view["patches"] for s in views)), "stride_mm": stride_mm,
              "threshold": threshold, "by_threshold": curve,
              "per_slice": [{"seriesuid": s.seriesuid, "z_mm": s.view["z_mm"],
                             **{k: s.score[k] for k in ("nodules", "found", "maxima", "false_maxima")},
                             "each_nodule": nodule_details(s, stride_mm)}
                            for s in views]}
    return views, totals


def draw_slices(path, views: list[SliceView], title: str, hu_window: tuple[float, float] = (-1000.0, 400.0)) -> None:
    """One panel per slice: the slice (lung window), the probability over the lung (transparent
    where low), annotated nodules outlined (lime), local maxima (white +: on a nodule; red x: false)."""
    from matplotlib.patches import Circle

    from analysis.plots import new_figure, save_figure

    n = max(1, len(views))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    Figure = new_figure()
    fig = Figure(figsize=(3.4 * cols, 3.5 * rows + 0.9), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(views):]:
        ax.axis("off")
    for ax, sv in zip(axes, views, strict=False):
        v = sv.view
        fx, fy = v["fine_x"], v["fine_y"]
        ext = (fx[0], fx[-1], fy[-1], fy[0])  # y down, as radiologists view an axial slice
        ax.imshow(v["hu"], cmap="gray", vmin=hu_window[0], vmax=hu_window[1], extent=ext, interpolation="nearest")
        p = np.nan_to_num(v["prob"], nan=0.0)
        s = v["xs"][1] - v["xs"][0] if len(v["xs"]) > 1 else 1.0
        pext = (v["xs"][0] - s / 2, v["xs"][-1] + s / 2, v["ys"][-1] + s / 2, v["ys"][0] - s / 2)
        ax.imshow(p, cmap="jet", alpha=0.55 * np.clip(p, 0, 1), vmin=0, vmax=1, extent=pext, interpolation="bilinear")
        for nod, r in sv.on_slice:
            ax.add_patch(Circle((nod.xyz[0], nod.xyz[1]), r, fill=False, lw=1.2, color="lime"))
        for (x, y), true in zip(sv.score["maxima_xy"], sv.score["maxima_true"], strict=True):
            ax.plot(x, y, marker="+" if true else "x", color="white" if true else "red", ms=7, mew=1.5)
        ax.set_xlim(v["xs"][0] - 10, v["xs"][-1] + 10)
        ax.set_ylim(v["ys"][-1] + 10, v["ys"][0] - 10)
        ax.set_xticks([])
        ax.set_yticks([])
        sc = sv.score
        ax.set_title(f"..{sv.seriesuid[-6:]} z={v['z_mm']:.0f} mm: {sc['found']}/{sc['nodules']} found, "
                     f"{sc['false_maxima']} false", fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)
