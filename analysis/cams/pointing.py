"""The pointing game: does a heatmap's peak lie within the nodule? Scores and their controls."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.cams.geometry import nearest_nodule, plane_hits
from analysis.cams.maps import RESNET_STRIDES, UPSAMPLING, peaks, resolve_layer
from analysis.cams.probes import ProbeSet, build_probes, margin_px, score_probes, wide_spec
from analysis.cams.runs import LoadedRun, load_run, maps_for, test_probabilities
from common.data.loaders import to_float
from common.data.luna16 import Nodule, load_luna16, read_scan
from common.data.patches import PatchSpec, extract
from common.evaluation.metrics import sigmoid
from common.training.engine import predict
from common.training.model import build_model

log = logging.getLogger(__name__)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n ([nan, nan] when n = 0)."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def score_maps(spec: PatchSpec, maps: np.ndarray, centres: np.ndarray, nodules: Sequence[Nodule]) -> dict[str, Any]:
    """Pointing-game figures of heatmaps (N, S, S) of patches centred at ``centres`` (N, 3),
    each with its nodule: hit rates on the axial plane and on all three planes (with 95%
    Wilson intervals), the same for the patch centre as the peak, the number of maps with
    no peak, and (keys ``hits``, ``peaks``) the per-patch hits (N, 3) and peaks (N, 2)."""
    n = len(maps)
    rc, has_peak = peaks(maps) if n else (np.zeros((0, 2), int), np.zeros(0, bool))
    mid = (spec.size - 1) / 2  # the patch centre itself (the candidate), between pixels for even sizes
    hits = np.array([plane_hits(spec, c, p, nod) & h for c, p, nod, h in zip(centres, rc, nodules, has_peak,
                                                                                strict=True)]).reshape(-1, 3)
    centre_hits = np.array([plane_hits(spec, c, (mid, mid), nod) for c, nod in zip(centres, nodules, strict=True)]
                           ).reshape(-1, 3)
    out: dict[str, Any] = {"n": n, "no_peak": int((~has_peak).sum())}
    for name, h in (("axial", hits[:, 0]), ("all_planes", hits.all(axis=1))):
        out[name] = float(h.mean()) if n else math.nan
        out[f"{name}_ci95"] = wilson(int(h.sum()), n)
    out["centre_baseline"] = {"axial": float(centre_hits[:, 0].mean()) if n else math.nan,
                              "all_planes": float(centre_hits.all(axis=1).mean()) if n else math.nan}
    out["hits"] = hits
    out["peaks"] = rc
    return out


@dataclass
class PointingSet:
    """The test split's positives matched to their nodules, ready to score: the cached
    (centred) patches, and the same positives cut again off-centre."""

    spec: PatchSpec
    nodules: list[Nodule]
    prob: np.ndarray  # of the centred patches
    tp: np.ndarray  # bool: prob >= threshold
    patches: np.ndarray  # uint8 (N, 3, S, S)
    centres: np.ndarray  # (N, 3) world mm
    unmatched: int  # positives inside no annotated nodule (left out)
    shift: float  # fraction of the radius; 0 = no shifted set
    threshold: float = 0.5  # probability of a positive call (true positives, probes called positive)
    shifted: np.ndarray | None = None
    shifted_centres: np.ndarray | None = None
    shifted_prob: np.ndarray | None = None
    probes: ProbeSet | None = None  # random positions and two-nodule patches (analysis.cams.probes)


def shifted_centres(nodules: Sequence[Nodule], shift: float, seed: int = 0) -> np.ndarray:
    """Patch centres that put each nodule off-centre yet at the same pixel in all three planes.

    The centre moves to ``n - shift * R * s * (1, 1, -1)`` (``s`` = +1 or -1, seeded): the
    axial (x, y), coronal (x, -z) and sagittal (y, -z) planes then all show the nodule at
    pixel offset ``s * shift * R / step * (1, 1)`` from the centre, ``sqrt(2) * shift * R``
    away (1.13 R at shift 0.8: the centre is outside the nodule), and each plane cuts it
    ``shift * R`` from its centre (a cross-section of radius 0.6 R at 0.8). That is the
    picture the 2.5D model was trained on, moved; a shift within one plane would instead
    leave the other two planes without the nodule, which a 2.5D model rightly scores as
    "not a nodule here" (vessels are round in one plane only).
    """
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], size=len(nodules))
    n = np.array([nod.xyz for nod in nodules], dtype=np.float64).reshape(-1, 3)
    r = np.array([nod.diameter_mm / 2 for nod in nodules])
    return n - (shift * r * sign)[:, None] * np.array([1.0, 1.0, -1.0])


def cut_patches(run: LoadedRun, uids: np.ndarray, centres: np.ndarray, progress: bool = False,
                spec: PatchSpec | None = None) -> np.ndarray:
    """Patches (N, 3, S, S) uint8 cut from the run's CT scans around world centres (the
    preprocessing of the cache: :func:`common.data.patches.extract`; ``spec`` = another size
    and field, default the run's)."""
    return cut_many(run, uids, [(centres, spec or run.spec)], progress)[0]


def cut_many(run: LoadedRun, uids: np.ndarray, jobs: Sequence[tuple[np.ndarray, PatchSpec]],
             progress: bool = False) -> list[np.ndarray]:
    """Several sets of patches around the same scans' points (each scan read once): one array
    (N, 3, size, size) uint8 per ``(centres, spec)`` job, row i from scan ``uids[i]``."""
    from tqdm import tqdm

    outs = [np.empty((len(c), 3, sp.size, sp.size), dtype=np.uint8) for c, sp in jobs]
    luna = load_luna16(run.data_root)
    for uid in tqdm(sorted(set(uids.tolist())), desc="cutting probe patches", unit="scan",
                    disable=not progress, leave=False, dynamic_ncols=True):
        if uid not in luna.scans:
            raise ValueError(f"data_root {run.data_root}: scan {uid} of the test split is not there")
        sel = np.flatnonzero(uids == uid)
        scan = read_scan(luna.scans[uid].path, uid)
        for out, (centres, sp) in zip(outs, jobs, strict=True):
            out[sel] = extract(scan, centres[sel], sp)
    return outs


def pointing_set(run: LoadedRun, *, threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                 progress: bool = False, probs: tuple[np.ndarray, np.ndarray] | None = None,
                 probes: bool = True) -> PointingSet:
    """Match the test positives to their annotated nodules and cut their off-centre patches
    (``shift`` > 0) and the random-position and two-nodule probes (``probes``)."""
    prob, labels = probs if probs is not None else test_probabilities(run)
    idx, nods = [], []
    unmatched = 0
    for i in np.flatnonzero(labels == 1):
        n, d = nearest_nodule(run.nodules.get(str(run.cache.seriesuid[run.positions[i]]), []),
                              run.cache.xyz[run.positions[i]])
        if n is None or d > n.diameter_mm / 2:
            unmatched += 1
            continue
        idx.append(i)
        nods.append(n)
    if unmatched:
        log.warning("%d positive test candidate(s) lie in no annotated nodule; left out of the pointing game",
                    unmatched)
    rows = run.positions[np.array(idx, dtype=np.int64)]
    ps = PointingSet(run.spec, nods, prob[idx], prob[idx] >= threshold, run.cache.get(rows), run.cache.xyz[rows],
                     unmatched, shift, threshold)
    if not len(rows) or (shift <= 0 and not probes):
        return ps
    uids = run.cache.seriesuid[rows]
    jobs: list[tuple[np.ndarray, PatchSpec]] = []
    if shift > 0:
        ps.shifted_centres = shifted_centres(nods, shift, seed)
        jobs.append((ps.shifted_centres, run.spec))
    if probes:
        wide = wide_spec(run.spec, margin_px(run.spec))
        jobs.append((np.array([n.xyz for n in nods], dtype=np.float64).reshape(-1, 3), wide))
    cut = cut_many(run, uids, jobs, progress)
    if shift > 0:
        ps.shifted = cut.pop(0)
        ps.shifted_prob = _probabilities(run.model, ps.shifted, run.device)
    if probes:
        ps.probes = build_probes(run.spec, cut.pop(0), np.array([n.diameter_mm / 2 for n in nods]), seed)
        ps.probes.random_prob = _probabilities(run.model, ps.probes.random, run.device)
        ps.probes.pairs_prob = _probabilities(run.model, ps.probes.pairs, run.device)
    return ps


def _probabilities(model: nn.Module, patches: np.ndarray, device: torch.device) -> np.ndarray:
    if not len(patches):
        return np.zeros(0, np.float32)
    logits, _ = predict(model, _array_loader(patches), device)
    return sigmoid(logits)


def _array_loader(patches: np.ndarray, batch: int = 64):
    x = torch.from_numpy(to_float(patches))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=batch)


def intensity_maps(patches: np.ndarray, sigma_px: float = 2.0) -> np.ndarray:
    """The brightness control: the three planes' mean, Gaussian-smoothed (N, S, S). Its peak is
    the densest spot; a heatmap that localises only as well as this adds no knowledge."""
    from scipy import ndimage

    mean = patches.astype(np.float32).mean(axis=1)
    return ndimage.gaussian_filter(mean, sigma=(0, sigma_px, sigma_px), mode="nearest")


def random_init_model(run: LoadedRun, seed: int = 0) -> nn.Module:
    """The run's architecture with seeded random weights: the chance level of a score."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(run.cfg.arch, run.cfg.norm).to(run.device).eval()


def _public(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k not in ("hits", "peaks")}


def score_set(run: LoadedRun, ps: PointingSet, *, method: str, layer: str, upsample_mode: str = "aligned",
              random_model: nn.Module | None = None) -> dict[str, Any]:
    """Pointing-game figures of one heatmap setting on a :class:`PointingSet` (see :func:`pointing_game`)."""
    layer = resolve_layer(layer, run.spec.size, method)
    # each patch set's heatmaps are made once; a "true positives" part is a subset of its set's maps
    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {"positives": (ps.patches, ps.centres)}
    parts: dict[str, tuple[str, np.ndarray]] = {"true_positives": ("positives", ps.tp),
                                                "positives": ("positives", np.ones(len(ps.patches), bool))}
    if ps.shifted is not None and ps.shifted_centres is not None:
        assert ps.shifted_prob is not None
        sources["shifted"] = (ps.shifted, ps.shifted_centres)
        parts["shifted_true_positives"] = ("shifted", ps.shifted_prob >= ps.threshold)
        parts["shifted"] = ("shifted", np.ones(len(ps.shifted), bool))
    out: dict[str, Any] = {"method": method, "layer": layer, "upsample": upsample_mode,
                           "unmatched_positives": ps.unmatched}
    models = {"model": run.model, **({"random_init": random_model} if random_model is not None else {})}

    def maps_of(who: str, patches: np.ndarray) -> np.ndarray | None:
        if who not in models:
            return None
        if not len(patches):
            return np.zeros((0, ps.spec.size, ps.spec.size), np.float32)
        return maps_for(models[who], patches, device=run.device, method=method, layer=layer,
                        upsample_mode=upsample_mode)

    maps: dict[tuple[str, str], np.ndarray] = {}
    for src, (patches, _) in sources.items():
        for who in models:
            m = maps_of(who, patches)
            assert m is not None
            maps[src, who] = m
        maps[src, "brightest"] = intensity_maps(patches) if len(patches) else \
            np.zeros((0, ps.spec.size, ps.spec.size), np.float32)
    for part, (src, keep) in parts.items():
        centres = sources[src][1][keep]
        nodules = [n for n, k in zip(ps.nodules, keep, strict=True) if k]
        for who in models:
            s = _public(score_maps(ps.spec, maps[src, who][keep], centres, nodules))
            if who == "model":
                out[part] = s
            else:
                out[part]["random_init"] = {"axial": s["axial"], "all_planes": s["all_planes"]}
        bright = score_maps(ps.spec, maps[src, "brightest"][keep], centres, nodules) if keep.any() else \
            {"axial": math.nan, "all_planes": math.nan}
        out[part]["intensity_baseline"] = {"axial": bright["axial"], "all_planes": bright["all_planes"]}
    for part in ("shifted", "shifted_true_positives"):
        if part in out:
            assert ps.shifted_prob is not None
            called = ps.shifted_prob >= ps.threshold if part != "shifted" else np.ones(len(ps.shifted_prob), bool)
            out[part].update(shift=ps.shift, mean_prob=float(ps.shifted_prob[called].mean()) if called.any()
                             else math.nan, mean_prob_centred=float(ps.prob.mean()))
    if ps.probes is not None:
        out["probes"] = score_probes(ps.probes, maps_of, ps.threshold)
    out["headline"] = headline(out)
    return out


def _best_control(s: dict[str, Any]) -> float:
    rates = [s[k]["axial"] for k in ("centre_baseline", "random_init", "intensity_baseline")
             if k in s and not math.isnan(s[k]["axial"])]
    return max(rates) if rates else math.nan


def headline(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scores that need real localisation, each beside its best control: the shifted game
    (true positives, all positives), random positions (true positives, all) and two nodules
    (the peak in either; each nodule a local maximum). Per entry: ``n``, ``rate``, ``ci95``,
    ``best_control`` and ``margin`` (rate minus best control)."""
    out: dict[str, dict[str, Any]] = {}
    for part in ("shifted_true_positives", "shifted"):
        if part in scores:
            s = scores[part]
            out[part] = {"n": s["n"], "rate": s["axial"], "ci95": s["axial_ci95"], "best_control": _best_control(s)}
    probes = scores.get("probes", {})
    for part, key in (("random_true_positives", "hit"), ("random", "hit"), ("two_nodules", "any"),
                      ("two_nodules", "each")):
        if part in probes and key in probes[part]:
            s = probes[part]
            ctrl = [c[key] for c in s["controls"].values() if key in c and not math.isnan(c[key])]
            name = part if key == "hit" else f"{part}_{key}"
            out[name] = {"n": s[key]["n"], "rate": s[key]["rate"], "ci95": s[key]["ci95"],
                         "best_control": max(ctrl) if ctrl else math.nan}
    for v in out.values():
        v["margin"] = v["rate"] - v["best_control"]
    return out


def pointing_game(run: LoadedRun | str | Path, *, method: str = "gradcam", layer: str = "auto",
                  upsample_mode: str = "aligned", threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                  progress: bool = True, pset: PointingSet | None = None) -> dict[str, Any]:
    """The pointing-game hit rates of a run's model on its test split (see the module docstring).

    Parameters
    ----------
    run
        A results folder (or one opened with :func:`load_run`).
    method, layer, upsample_mode
        Which heatmap (:func:`heatmaps`); ``method="cam"`` always explains ``layer4``;
        ``layer="auto"`` is :func:`resolve_layer`'s choice.
    threshold
        Probability from which a positive counts as a true positive.
    shift
        Off-centre distance of the ``shifted`` score as a fraction of each nodule's radius
        (:func:`shifted_centres`; 0 = skip it).
    seed
        Seeds the shift directions and the random-init control model.

    Returns
    -------
    dict
        ``true_positives`` and ``positives`` (the cached, centred patches) and ``shifted``
        (all positives, off-centre): each with ``n``, ``axial``, ``all_planes``, their
        ``*_ci95``, ``no_peak``, and three controls: ``centre_baseline`` (the patch centre
        as the peak), ``random_init`` (the same heatmap of a randomly initialised model of
        the run's architecture) and ``intensity_baseline`` (:func:`intensity_maps`);
        ``shifted`` adds ``shift`` and the mean probability of the shifted and centred
        patches (``mean_prob``, ``mean_prob_centred``); plus the settings and
        ``unmatched_positives``.
    """
    run = run if isinstance(run, LoadedRun) else load_run(run)
    ps = pset if pset is not None else pointing_set(run, threshold=threshold, shift=shift, seed=seed,
                                                    progress=progress)
    out = score_set(run, ps, method=method, layer=layer, upsample_mode=upsample_mode,
                    random_model=random_init_model(run, seed))
    out["threshold"] = threshold
    return out


def compare_settings(run: LoadedRun | str | Path, *, threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                     progress: bool = True, pset: PointingSet | None = None) -> list[dict[str, Any]]:
    """Pointing game of Grad-CAM at every ResNet stage and of CAM, each with both upsamplings
    (the measurements the default rests on). One flat row per setting: method, layer,
    upsample, cells (the map's side at the run's patch size) and, for ``tp`` (true
    positives), ``pos`` (positives), ``shifted_tp`` and ``shifted``: ``n``, ``axial``,
    ``all_planes``, ``centre``, ``random`` and ``bright`` (axial hit rates of the three
    controls); for the probes ``random_tp``, ``random_pos``, ``pair_any`` and ``pair_each``:
    ``n``, the rate and ``best_control``."""
    from tqdm import tqdm

    run = run if isinstance(run, LoadedRun) else load_run(run)
    ps = pset if pset is not None else pointing_set(run, threshold=threshold, shift=shift, seed=seed,
                                                    progress=progress)
    rand = random_init_model(run, seed)
    settings = [(m, layer, u) for m, layer in [*(("gradcam", k) for k in RESNET_STRIDES), ("cam", "layer4")]
                for u in UPSAMPLING]
    rows = []
    for method, layer, mode in tqdm(settings, desc="comparing settings", disable=not progress, leave=False,
                                    dynamic_ncols=True):
        s = score_set(run, ps, method=method, layer=layer, upsample_mode=mode, random_model=rand)
        row: dict[str, Any] = {"method": method, "layer": layer, "upsample": mode,
                               "cells": math.ceil(run.spec.size / RESNET_STRIDES[layer])}
        for part, short in (("true_positives", "tp"), ("positives", "pos"), ("shifted_true_positives", "shifted_tp"),
                            ("shifted", "shifted")):
            if part in s:
                row.update({f"{short}_n": s[part]["n"], f"{short}_axial": s[part]["axial"],
                            f"{short}_all_planes": s[part]["all_planes"],
                            f"{short}_centre": s[part]["centre_baseline"]["axial"],
                            f"{short}_random": s[part]["random_init"]["axial"],
                            f"{short}_bright": s[part]["intensity_baseline"]["axial"]})
        for name, short in (("random_true_positives", "random_tp"), ("random", "random_pos"),
                            ("two_nodules_any", "pair_any"), ("two_nodules_each", "pair_each")):
            if name in s["headline"]:
                h = s["headline"][name]
                row.update({f"{short}_n": h["n"], short: h["rate"], f"{short}_best_control": h["best_control"]})
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`compare_settings` as a fixed-width text table."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r.get(k):.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    width = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, width, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, width, strict=True)) for line in cells]
    return "\n".join(lines)
