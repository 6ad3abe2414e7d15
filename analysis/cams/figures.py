"""The grid figure of heatmaps, and a run's ``cam.json``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.cams.geometry import nearest_nodule, plane_hits, project
from analysis.cams.maps import METHODS, RESNET_STRIDES, UPSAMPLING, peaks, resolve_layer
from analysis.cams.pointing import compare_settings, pointing_game, pointing_set
from analysis.cams.probes import ProbeSet
from analysis.cams.runs import LoadedRun, load_run, maps_for, test_probabilities
from analysis.cams.slices import SLICES_PNG, choose_slices, draw_slices, slice_views
from common.atomic import atomic_write_json
from common.data.luna16 import Nodule
from common.data.patches import PLANES, PatchSpec

log = logging.getLogger(__name__)


GRID_PNG = "cam_grid.png"
CAM_JSON = "cam.json"
CATEGORIES = (("tp", "true positives"), ("fp", "false positives"), ("fn", "false negatives"))
PROBE_COLUMNS = (("random", "random position (probe)"), ("pairs", "two nodules (probe)"))


@dataclass
class Case:
    category: str  # tp, fp, fn; "tn" when a category had too few and the nearest below threshold fill it
    index: int  # into run.positions
    prob: float
    label: int


def select_cases(prob: np.ndarray, labels: np.ndarray, threshold: float, top_k: int,
                 group: np.ndarray | None = None) -> dict[str, list[Case]]:
    """The ``top_k`` most confident true positives and false positives (highest probability) and
    the most confidently missed positives (lowest probability), one case per ``group`` (e.g.
    per nodule: LUNA16 has several candidates on one nodule). When a run has fewer false
    positives than ``top_k`` the highest-scoring negatives below the threshold fill the column,
    marked ``tn``, so that a reader still sees what the model finds most nodule-like."""
    group = np.arange(len(prob)) if group is None else np.asarray(group)
    order = np.argsort(-prob, kind="stable")

    def first(ids) -> list[int]:
        seen: set = set()
        out: list[int] = []
        for i in ids:
            if group[i] not in seen and len(out) < top_k:
                seen.add(group[i])
                out.append(int(i))
        return out

    tp = first(i for i in order if labels[i] == 1 and prob[i] >= threshold)
    neg = first(i for i in order if labels[i] == 0)
    fn = first(i for i in order[::-1] if labels[i] == 1 and prob[i] < threshold)

    def cases(ids: list[int], cat: str) -> list[Case]:
        return [Case(cat if cat != "fp" or prob[i] >= threshold else "tn", i, float(prob[i]), int(labels[i]))
                for i in ids]

    return {"tp": cases(tp, "tp"), "fp": cases(neg, "fp"), "fn": cases(fn, "fn")}


def draw_grid(path: Path, spec: PatchSpec, columns: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Write the PNG: one column group (axial, coronal, sagittal) per category, one row per case.

    Each case dict holds ``patch`` (3, S, S) uint8, ``map`` (S, S), ``peak`` (row, col),
    ``outlines`` (per plane a list of (row, col, radius_px, cuts_plane)) and ``label`` (text).
    """
    from matplotlib import patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Circle

    from analysis.plots import new_figure, save_figure

    rows = max(1, max(len(v) for v in columns.values()))
    Figure = new_figure()
    # constrained layout keeps each case's label clear of the row below; a colour bar column
    fig = Figure(figsize=(1.55 * 3 * len(columns) + 1.2, 1.8 * rows + 1.3), layout="constrained")
    axes = np.asarray(fig.subplots(rows, 3 * len(columns), squeeze=False))
    ten_mm = 10.0 * spec.size / spec.fov_mm  # pixels per 10 mm: a scale bar on every case
    for g, (cat, cases) in enumerate(columns.items()):
        for r in range(rows):
            for k, (plane, _, _) in enumerate(PLANES):
                ax = axes[r, 3 * g + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    head = dict(CATEGORIES + PROBE_COLUMNS).get(cat, cat)
                    ax.set_title(f"{head}\n{plane}" if k == 1 else plane, fontsize=8)
                if r >= len(cases):
                    ax.axis("off")
                    if k == 1 and r == 0:
                        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                    continue
                c = cases[r]
                m = c["map"]
                span = float(m.max() - m.min())
                ax.imshow(c["patch"][k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                heat = (m - m.min()) / span if span > 0 else np.zeros_like(m)
                # transparent where there is little evidence, so the anatomy stays readable
                ax.imshow(heat, cmap="jet", alpha=0.6 * heat, vmin=0, vmax=1, interpolation="nearest")
                ax.plot(c["peak"][1], c["peak"][0], marker="+", color="white", ms=7, mew=1.5)
                for row_px, col_px, rad_px, cuts in c["outlines"][k]:
                    ax.add_patch(Circle((col_px, row_px), rad_px, fill=False, lw=1.1, color="lime",
                                        ls="-" if cuts else "--"))
                if k == 0:
                    y0, x0 = spec.size - 0.06 * spec.size, 0.06 * spec.size
                    halo = [patheffects.withStroke(linewidth=2.5, foreground="black")]  # readable on bone too
                    ax.plot([x0, x0 + ten_mm], [y0, y0], color="white", lw=2, solid_capstyle="butt",
                            path_effects=halo)
                    ax.text(x0 + ten_mm / 2, y0 - 0.03 * spec.size, "10 mm", color="white", fontsize=6,
                            ha="center", va="bottom", path_effects=halo)
                ax.set_xlim(-0.5, spec.size - 0.5)
                ax.set_ylim(spec.size - 0.5, -0.5)
                if k == 1:
                    ax.set_xlabel(c["label"], fontsize=7)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes[:, -1].tolist(), shrink=0.6,
                       aspect=30, pad=0.05)
    bar.set_label("heatmap, scaled per case (0 = none, 1 = its peak)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}\nPatches {spec.fov_mm:g} mm x {spec.fov_mm:g} mm ({spec.size} px), HU window "
                 f"{spec.hu_min:g}..{spec.hu_max:g}; p = the model's probability of a nodule.", fontsize=8)
    save_figure(fig, path)


def outlines(spec: PatchSpec, centre: Sequence[float], nodules: Sequence[Nodule], own: Nodule | None = None
             ) -> list[list[tuple]]:
    """Per plane, the outlines to draw: (row, col, radius_px, the plane cuts the nodule) of a
    circle of the annotated diameter at the projection of the nodule centre. Drawn are the
    nodules the plane cuts, and ``own`` (the candidate's nodule) in every plane."""
    out: list[list[tuple]] = [[], [], []]
    step = spec.fov_mm / spec.size
    for n in nodules:
        rc, normal = project(spec, centre, n.xyz)
        r_px = n.diameter_mm / 2 / step
        for k in range(3):
            cuts = bool(abs(normal[k]) < n.diameter_mm / 2)
            inside = -r_px <= rc[k, 0] <= spec.size + r_px and -r_px <= rc[k, 1] <= spec.size + r_px
            if inside and (cuts or n is own):
                out[k].append((float(rc[k, 0]), float(rc[k, 1]), float(r_px), cuts))
    return out


@dataclass
class CamReport:
    """What :func:`explain_run` wrote, and the scores (as in ``cam.json``)."""

    png: Path
    json: Path
    scores: dict[str, Any]


HEADLINE_SHORT = {"shifted_true_positives": "shifted (called +)", "random_true_positives": "random position (called +)",
                  "two_nodules_any": "two nodules"}


def slice_view(run: LoadedRun, slices: int, stride_mm: float, threshold: float, seed: int, progress: bool
               ) -> dict[str, Any]:
    """The model slid over ``slices`` axial slices through test nodules (analysis.cams.slices):
    writes ``cam_slices.png`` and returns the totals."""
    from common.data.luna16 import load_luna16, read_scan

    picks = choose_slices(run.nodules, slices, seed)
    if not picks:
        log.warning("no annotated nodule in the test split: no slice view")
        return {"slices": 0}
    luna = load_luna16(run.data_root)
    scans = {uid: read_scan(luna.scans[uid].path, uid) for uid in sorted({u for u, _ in picks})}
    log.info("sliding the model over %d axial slices through test nodules, every %g mm", len(picks), stride_mm)
    views, totals = slice_views(run.model, scans, run.nodules, run.spec, picks, stride_mm=stride_mm,
                                threshold=threshold, device=run.device, progress=progress)
    title = (f"{run.path.name}: the model's probability of a nodule, slid over the lung every {stride_mm:g} mm "
             f"(the same 2.5D patch at every point). Green: annotated nodules; + a local maximum on a nodule, "
             f"x a false one (p >= {threshold:g}).\nFound {totals['found']}/{totals['nodules']} nodules "
             f"({totals['rate']:.2f}), {totals['false_maxima_per_slice']:.1f} false maxima per slice. "
             "Research software, not for diagnosis.")
    draw_slices(run.path / SLICES_PNG, views, title, (run.spec.hu_min, run.spec.hu_max))
    return totals


def probe_columns(run: LoadedRun, probes: ProbeSet, method: str, layer: str, upsample_mode: str, top_k: int
                  ) -> dict[str, list[dict[str, Any]]]:
    """Grid columns of the first ``top_k`` random-position and two-nodule probes: the model's
    heatmap, its peak, and the nodules' outlines (every plane cuts them through the centre)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, patches, rc, radius, prob in (
            ("random", probes.random, probes.random_rc[:, None], probes.random_radius[:, None], probes.random_prob),
            ("pairs", probes.pairs, probes.pairs_rc, probes.pairs_radius, probes.pairs_prob)):
        k = min(top_k, len(patches))
        if not k:
            out[key] = []
            continue
        maps = maps_for(run.model, patches[:k], device=run.device, method=method, layer=layer,
                        upsample_mode=upsample_mode)
        pk, has = peaks(maps)
        cases = []
        for j in range(k):
            hit = has[j] and bool((np.hypot(*(pk[j] - rc[j]).T) <= radius[j]).any())
            rings = [(float(r[0]), float(r[1]), float(rad), True) for r, rad in zip(rc[j], radius[j], strict=True)]
            p = "" if prob is None else f"p={prob[j]:.2f} "
            cases.append({"patch": patches[j], "map": maps[j], "peak": pk[j], "label": f"{p}{'hit' if hit else 'miss'}",
                          "outlines": [rings] * 3})
        out[key] = cases
    return out


def _nodule_groups(run: LoadedRun) -> np.ndarray:
    """Per test patch, the nodule it lies in (uid and nodule index) or its own index."""
    out = np.empty(len(run.positions), dtype=object)
    for i, pos in enumerate(run.positions):
        uid = str(run.cache.seriesuid[pos])
        nods = run.nodules.get(uid, [])
        n, d = nearest_nodule(nods, run.cache.xyz[pos])
        out[i] = (uid, nods.index(n)) if n is not None and d <= n.diameter_mm / 2 else i
    return out


def explain_run(run_dir: str | Path, *, method: str = "gradcam", layer: str = "auto",
                upsample_mode: str = "aligned", top_k: int = 4, threshold: float = 0.5, shift: float = 0.8,
                seed: int = 0, device: str = "cpu", compare: bool = False, progress: bool = True,
                probes: bool = True, slices: int = 8, stride_mm: float = 3.0) -> CamReport:
    """Heatmap grid and localisation scores of a finished run, written into its folder.

    Writes ``RUN_DIR/cam_grid.png`` (the ``top_k`` most confident true positives, false
    positives and false negatives of the test split, all three planes, heatmap, peak and
    annotated nodule outlines: solid where the plane cuts the nodule, dashed where the
    nodule lies off the plane) and ``RUN_DIR/cam.json`` (settings, the cases shown, the
    pointing game of the chosen heatmap and of plain CAM, and with ``compare`` the table of
    :func:`compare_settings`). Options as in :func:`pointing_game`; ``device`` as ``--device``.

    Returns
    -------
    CamReport
        Paths of the PNG and JSON, and ``cam.json``'s content (key ``scores``:
        ``pointing_game``, ``pointing_game_cam``, optionally ``compare``).
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if layer != "auto" and layer not in RESNET_STRIDES:
        raise ValueError(f"--layer {layer!r}: choose auto or one of {', '.join(RESNET_STRIDES)}")
    if upsample_mode not in UPSAMPLING:
        raise ValueError(f"--upsample {upsample_mode!r}: choose one of {', '.join(UPSAMPLING)}")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if slices < 0:
        raise ValueError(f"--slices must be >= 0 (0 = no slice view), got {slices}")
    if not stride_mm > 0:
        raise ValueError(f"--stride-mm must be > 0, got {stride_mm}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"--shift must be in [0, 1) (a fraction of the nodule radius; 0 = no off-centre "
                         f"score), got {shift}")
    run = load_run(run_dir, device)
    layer = resolve_layer(layer, run.spec.size, method)
    log.info("%s: %s (norm=%s), %d test patches of %d px / %g mm; %s at %s (%s upsampling)", run.path,
             run.cfg.arch, run.cfg.norm, len(run.positions), run.spec.size, run.spec.fov_mm, method, layer,
             upsample_mode)
    prob, labels = test_probabilities(run)
    chosen = select_cases(prob, labels, threshold, top_k, group=_nodule_groups(run))
    flat = [c for cases in chosen.values() for c in cases]
    rows = run.positions[np.array([c.index for c in flat], dtype=np.int64)]
    patches = run.cache.get(rows)
    maps = maps_for(run.model, patches, device=run.device, method=method, layer=layer, upsample_mode=upsample_mode)
    rc, has_peak = peaks(maps) if len(maps) else (np.zeros((0, 2), int), np.zeros(0, bool))
    columns: dict[str, list[dict[str, Any]]] = {cat: [] for cat, _ in CATEGORIES}
    shown = []
    for j, (c, pos) in enumerate(zip(flat, rows, strict=True)):
        uid, centre = str(run.cache.seriesuid[pos]), run.cache.xyz[pos]
        scan_nodules = run.nodules.get(uid, [])
        nod, dist = nearest_nodule(scan_nodules, centre)
        if nod is not None and dist > nod.diameter_mm / 2:
            nod = None  # the candidate lies in no nodule: nothing to point at
        hits = plane_hits(run.spec, centre, rc[j], nod) & has_peak[j] if nod is not None else None
        text = f"{c.category.upper()} p={c.prob:.2f}\n..{uid[-6:]}"
        if hits is not None:
            text += " hit" if hits[0] else " miss"
        columns["fp" if c.category == "tn" else c.category].append(
            {"patch": patches[j], "map": maps[j], "peak": rc[j], "label": text,
             "outlines": outlines(run.spec, centre, scan_nodules, nod)})
        shown.append({"category": c.category, "seriesuid": uid, "xyz": centre.tolist(), "prob": c.prob,
                      "label": c.label, "peak_rc": rc[j].tolist(), "has_peak": bool(has_peak[j]),
                      "nodule": None if nod is None else {"xyz": list(nod.xyz), "diameter_mm": nod.diameter_mm,
                                                          "distance_mm": dist},
                      "hits_axial_coronal_sagittal": None if hits is None else hits.tolist()})
    ps = pointing_set(run, threshold=threshold, shift=shift, seed=seed, progress=progress, probs=(prob, labels),
                      probes=probes)
    log.info("pointing game over %d positives (%d true positives)%s", len(ps.nodules), int(ps.tp.sum()),
             f", also shifted {shift:g} R off-centre" if shift else "")
    scores: dict[str, Any] = {"pointing_game": pointing_game(run, method=method, layer=layer,
                                                             upsample_mode=upsample_mode, threshold=threshold,
                                                             seed=seed, pset=ps, progress=progress)}
    if method != "cam":
        scores["pointing_game_cam"] = pointing_game(run, method="cam", upsample_mode=upsample_mode,
                                                    threshold=threshold, seed=seed, pset=ps, progress=progress)
    if compare:
        scores["compare"] = compare_settings(run, threshold=threshold, seed=seed, pset=ps, progress=progress)
    pg = scores["pointing_game"]
    head = pg.get("headline", {})
    found = "; ".join(f"{HEADLINE_SHORT[k]} {head[k]['rate']:.2f} (best control {head[k]['best_control']:.2f})"
                      for k in HEADLINE_SHORT if k in head)
    title = (f"{run.path.name}: {method} at {layer} ({upsample_mode} upsampling), {run.cfg.arch} norm={run.cfg.norm}."
             f" Pointing game, nodule off the centre: {found or 'not scored'}; centred true positives "
             f"{pg['true_positives']['axial']:.2f}.\n"
             "One heatmap over the three planes; +: its peak; green: annotated nodules the plane cuts "
             "(dashed: the candidate's nodule, off this plane). Research software, not for diagnosis.")
    if ps.probes is not None:
        columns.update(probe_columns(run, ps.probes, method, layer, upsample_mode, top_k))
    png = run.path / GRID_PNG
    draw_grid(png, run.spec, columns, title)
    figures = {"grid": GRID_PNG}
    if slices:
        scores["slices"] = slice_view(run, slices, stride_mm, threshold, seed, progress)
        figures["slices"] = SLICES_PNG
    doc = {"settings": {"method": method, "layer": layer, "upsample": upsample_mode, "top_k": top_k,
                        "threshold": threshold, "shift": shift, "seed": seed, "arch": run.cfg.arch,
                        "norm": run.cfg.norm, "image_size": run.spec.size, "fov_mm": run.spec.fov_mm},
           "figures": figures, "cases": shown, "scores": scores,
           "test_patches": int(len(run.positions)), "test_positives": int(labels.sum())}
    atomic_write_json(run.path / CAM_JSON, doc)
    return CamReport(png, run.path / CAM_JSON, doc)


def cam_figures(run_dir: str | Path) -> tuple[list[Path], dict[str, Any]] | None:
    """For the comparison report: the run's CAM figure(s) and scores, or None when
    ``sim/explain.py`` has not been run on it (no ``cam.json``)."""
    path = Path(run_dir) / CAM_JSON
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    pngs = [Path(run_dir) / name for name in doc.get("figures", {}).values() if (Path(run_dir) / name).is_file()]
    return pngs, {"settings": doc.get("settings", {}), **doc.get("scores", {})}
