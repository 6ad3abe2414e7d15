"""Synthetic hospitals: chest CT in LUNA16's exact on-disk format, made from a seed.

What a CNN sees here should look like chest CT, not noise with bright balls: air around
a body with fat and muscle, ribs and spine, two lungs near -850 HU with texture, vessel
trees of branching tubes (the hard false-positive look-alikes: a vessel running along z is
a round blob in the axial plane), and nodules of 3-30 mm (solid, ground-glass and
part-solid, some touching the pleura). Everything is defined in world millimetres and
rasterised on each scan's own grid, so spacing, slice thickness and flipped direction
matrices change the voxels the way they do in real scans.

Scale: the chest is an adult's (276-320 mm wide), so that a 48 mm patch shows lung
parenchyma, vessels and at most a piece of chest wall, as a LUNA16 patch does. The default
scan keeps that small with a field of view fitted to the body (as a scanner's display FOV
is chosen per patient), in-plane spacing at the coarse end of LUNA16's 0.46-0.98 mm and a
56-72 mm slab of the chest: ~300-410 pixels across and 24-91 slices.

Each scan comes from one of four synthetic scanner models ("vendor-A".."vendor-D") with its
own noise, reconstruction kernel, slice spacing and HU calibration, recorded in
``scan_metadata.csv``; the ``scanner`` partition uses it to give sites a realistic feature
shift (FLamby splits LIDC-IDRI by scanner maker for the same reason).

The whole data set is a pure function of ``(n_scans, seed, full_size, test_scans, test_subset)``; the
first ``n_scans`` scans do not depend on ``test_scans``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.atomic import publish_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: adult-scale chests on a body-fitted field of view
VESSEL_TREES = 5  # per lung, from the hilum
MARKER = "synthetic.json"


@dataclass(frozen=True)
class Scanner:
    name: str
    share: float  # share of scans from this scanner
    noise_hu: float  # std of image noise
    kernel_mm: float  # in-plane blur of the reconstruction kernel (0 = sharp)
    slice_mm: tuple[float, float]  # slice spacing range
    pixel_mm: tuple[float, float]  # in-plane spacing range
    hu_scale: float  # calibration: stored = true * scale + offset
    hu_offset: float
    pad_value: int  # value outside the reconstruction circle (as real scanners write)


SCANNERS = (  # in-plane spacing coarse but inside LUNA16's 0.46-0.98 mm, to keep the default small
    Scanner("vendor-A", 0.35, 22.0, 0.0, (1.0, 1.25), (0.84, 0.94), 1.00, 0.0, -2048),
    Scanner("vendor-B", 0.30, 12.0, 0.7, (2.0, 2.5), (0.88, 0.98), 0.97, 18.0, -1024),
    Scanner("vendor-C", 0.20, 40.0, 0.3, (1.25, 1.5), (0.84, 0.96), 1.03, -15.0, -3024),
    Scanner("vendor-D", 0.15, 16.0, 0.4, (0.75, 1.0), (0.80, 0.90), 1.00, 6.0, -2000),
)


@dataclass(frozen=True)
class Finding:
    xyz: tuple[float, float, float]
    diameter_mm: float
    kind: str  # solid, ground-glass, part-solid, juxtapleural, small (excluded), scar (excluded)
    has_candidate: bool = True


@dataclass
class SyntheticScan:
    seriesuid: str
    subset: int
    scanner: str
    array: np.ndarray  # int16 [z, y, x]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    nodules: list[Finding]
    excluded: list[Finding]
    candidates: list[tuple[float, float, float, int]]


def series_uid(seed: int, index: int) -> str:
    digits = int(np.random.default_rng([seed, index, 7]).integers(10**11, 10**12))
    return f"1.3.6.1.4.1.14519.5.2.1.99999.{seed}.{index:04d}.{digits}"


def scan_plan(n_scans: int, seed: int) -> list[tuple[str, int, Scanner]]:
    """(seriesuid, subset, scanner) of every scan; subsets round-robin as LUNA16's ten folds."""
    rng = np.random.default_rng([seed, 1])
    shares = np.array([s.share for s in SCANNERS])
    picks = rng.choice(len(SCANNERS), size=n_scans, p=shares / shares.sum())
    return [(series_uid(seed, i), i % 10, SCANNERS[int(k)]) for i, k in enumerate(picks)]


# --------------------------------------------------------------------------------------
# One scan
# --------------------------------------------------------------------------------------
def make_scan(seed: int, index: int, full_size: bool = False, subset: int | None = None) -> SyntheticScan:
    """Make scan ``index`` of the data set with ``seed`` (deterministic).

    The chest is drawn at adult scale (276-320 mm wide, 180-235 mm front to back). The
    default reconstructs a field of view fitted to the body (as a scanner's display FOV is
    chosen per patient) on a pixel grid that is coarse but inside LUNA16's range (0.46-0.98
    mm), through a 56-72 mm slab of the chest: about 300-410 pixels across and a tenth of a
    512 x 512 x 300 mm scan's voxels. ``full_size`` writes 512 x 512 slices over 260-320 mm.
    ``subset`` overrides the round-robin LUNA16 fold (extra test-only scans go to one fold).
    """
    uid, plan_subset, sc = scan_plan(index + 1, seed)[index]
    subset = plan_subset if subset is None else int(subset)
    rng = np.random.default_rng([seed, index, 2])
    body_ax = float(rng.uniform(138.0, 160.0))  # half of the chest's width, mm
    body_ay = body_ax * float(rng.uniform(0.66, 0.74))
    sz = float(rng.uniform(*sc.slice_mm))
    if full_size:
        n_xy = 512
        px = max(float(rng.uniform(*sc.pixel_mm)), 2 * body_ax * 1.04 / n_xy)
        z_extent = float(rng.uniform(260, 320))
    else:
        px = float(rng.uniform(*sc.pixel_mm))
        n_xy = int(np.ceil(2 * body_ax * float(rng.uniform(1.03, 1.08)) / px))
        z_extent = float(rng.uniform(56, 72))
    n_z = max(16, int(round(z_extent / sz)))
    flip = rng.choice(["none", "xy", "z"], p=[0.75, 0.15, 0.10])
    d = {"none": (1, 1, 1), "xy": (-1, -1, 1), "z": (1, 1, -1)}[str(flip)]
    fov = n_xy * px
    # World coordinates of voxel centres along each axis (the direction matrix is diagonal).
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-200, -150), rng.uniform(-250, -100)])
    extent = np.array([fov, fov, n_z * sz])
    spacing = np.array([px, px, sz])
    dirs = np.array(d, dtype=float)
    origin = centre - dirs * (extent - spacing) / 2  # index 0 sits at the low or high end
    xs = origin[0] + dirs[0] * px * np.arange(n_xy)
    ys = origin[1] + dirs[1] * px * np.arange(n_xy)
    zs = origin[2] + dirs[2] * sz * np.arange(n_z)

    ph = _Phantom(rng, centre, body_ax, body_ay, z_extent)
    vol = ph.render(xs, ys, zs)
    vol = _scanner_effects(vol, rng, sc, spacing, xs, ys, centre)
    cands = ph.candidates(rng)
    return SyntheticScan(uid, subset, sc.name, vol, tuple(origin), tuple(spacing),
                         tuple(np.diag(dirs).ravel()), ph.nodules, ph.excluded, cands)


class _Phantom:
    """A chest in world mm at adult scale: body, lungs, bones, vessel trees, nodules."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, body_ax: float, body_ay: float,
                 z_extent: float) -> None:
        self.rng = rng
        self.c = centre
        self.body_ax, self.body_ay = body_ax, body_ay
        self.lung_c = [(self.c[0] + side * self.body_ax * 0.46, self.c[1] - self.body_ay * 0.02) for side in (-1, 1)]
        self.lung_ax = self.body_ax * rng.uniform(0.33, 0.37)
        self.lung_ay = self.body_ay * rng.uniform(0.68, 0.74)
        self.z0, self.z1 = self.c[2] - z_extent / 2, self.c[2] + z_extent / 2
        self.wobble = [[(k, rng.uniform(0.02, 0.06), rng.uniform(0, 6)) for k in (2, 3, 4)] for _ in range(2)]
        self.vessels: list[tuple[np.ndarray, np.ndarray, float]] = []
        for lc in self.lung_c:
            hilum = np.array([lc[0] - np.sign(lc[0] - self.c[0]) * self.lung_ax * 0.55, lc[1], self.c[2]])
            for _ in range(VESSEL_TREES):
                direction = rng.normal(size=3)
                direction[2] *= 1.6  # vessels run more cranio-caudally than across
                self._grow(hilum, direction / np.linalg.norm(direction), 4.2, 0)
        self.nodules: list[Finding] = []
        self.excluded: list[Finding] = []
        self._place_findings()

    # ---- geometry helpers ----
    def depth_at(self, p: np.ndarray) -> float:
        """:meth:`lung_depth` at one point, in plain floats (called thousands of times per scan)."""
        x, y, z = float(p[0]), float(p[1]), float(p[2])
        zt = min(abs(z - self.c[2]) / ((self.z1 - self.z0) * 0.5 + 60.0), 1.0)
        taper = max(math.sqrt(1 - zt * zt), 1e-3)
        cz, sz = math.cos(z * 0.02), math.sin(z * 0.02)
        best = -1e9
        for (lx, ly), wob in zip(self.lung_c, self.wobble, strict=True):
            theta = math.atan2(y - ly, x - lx)
            edge = 1.0 + sum(a * (math.sin(k * theta + ph) * cz + math.cos(k * theta + ph) * sz) for k, a, ph in wob)
            q = math.hypot((x - lx) / self.lung_ax, (y - ly) / self.lung_ay)
            best = max(best, (1 - q / (taper * edge)) * (min(self.lung_ax, self.lung_ay) * taper))
        return best

    def lung_depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, lungs: tuple[int, ...] = (0, 1)
                   ) -> np.ndarray:
        """Positive inside a lung: the margin (mm, approximately) to the lung boundary."""
        zt = np.clip(np.abs(z - self.c[2]) / ((self.z1 - self.z0) * 0.5 + 60.0), 0, 1)
        taper = np.maximum(np.sqrt(1 - zt**2), 1e-3)  # beyond the lungs' ends: far outside
        # The outline is an ellipse scaled by taper(z) with edge = 1 + sum_k a_k sin(k theta +
        # phase_k + 0.02 z), an irregular outline that drifts with z. Split by the angle sum,
        # edge = 1 + A cos(0.02 z) + B sin(0.02 z) with A, B functions of (y, x) alone: the
        # trigonometry runs on the plane, not on every voxel.
        cz, sz = np.cos(z * 0.02), np.sin(z * 0.02)
        best = np.full(np.broadcast(x, y, z).shape, -1e9, dtype=np.result_type(x, y, z, np.float32))
        for i in lungs:
            (lx, ly), wob = self.lung_c[i], self.wobble[i]
            theta = np.arctan2(y - ly, x - lx)
            a_sin = sum(a * np.sin(k * theta + ph) for k, a, ph in wob)
            a_cos = sum(a * np.cos(k * theta + ph) for k, a, ph in wob)
            q = np.sqrt(((x - lx) / self.lung_ax) ** 2 + ((y - ly) / self.lung_ay) ** 2)
            edge = 1.0 + a_sin * cz + a_cos * sz
            r = q / (taper * edge)
            best = np.maximum(best, (1 - r) * (min(self.lung_ax, self.lung_ay) * taper))
        return best

    def _grow(self, p0: np.ndarray, direction: np.ndarray, radius: float, gen: int) -> None:
        rng = self.rng
        if radius < 0.55 or gen > 7:
            return
        length = rng.uniform(7, 15) * (1.0 + radius / 4.0)
        p1 = p0 + direction * length
        if self.depth_at(p1) < radius and gen > 0:
            return
        self.vessels.append((p0, p1, radius))
        for _ in range(2):
            turn = rng.normal(size=3) * 0.55
            nd = direction + turn
            self._grow(p1, nd / np.linalg.norm(nd), radius * rng.uniform(0.68, 0.84), gen + 1)

    def _random_lung_point(self, margin: float) -> np.ndarray:
        for _ in range(500):
            lx, ly = self.lung_c[self.rng.integers(2)]
            p = np.array([lx + self.rng.uniform(-1, 1) * self.lung_ax, ly + self.rng.uniform(-1, 1) * self.lung_ay,
                          self.rng.uniform(self.z0 + 8, self.z1 - 8)])
            if self.depth_at(p) > margin:
                return p
        raise RuntimeError("no point found in the lungs (phantom too small)")

    def _place_findings(self) -> None:
        rng = self.rng
        max_d = 30.0
        for _i in range(int(rng.integers(2, 5))):
            # Most nodules are small; a few are large (log-uniform, 3-30 mm).
            dia = float(np.exp(rng.uniform(np.log(3.5), np.log(max_d))))
            kind = str(rng.choice(["solid", "ground-glass", "part-solid", "juxtapleural"], p=[0.5, 0.18, 0.12, 0.2]))
            if kind == "juxtapleural":
                p = self._near_wall_point(dia / 2)
            else:
                p = self._random_lung_point(dia / 2 + 1.0)
            if any(np.linalg.norm(p - np.array(n.xyz)) < (dia + n.diameter_mm) / 2 + 4 for n in self.nodules):
                continue
            self.nodules.append(Finding(tuple(p), round(dia, 2), kind, has_candidate=rng.random() > 0.08))
        for _ in range(int(rng.integers(0, 3))):
            p = self._random_lung_point(3.0)
            if rng.random() < 0.6:
                self.excluded.append(Finding(tuple(p), round(float(rng.uniform(2.0, 3.0)), 2), "small"))
            else:
                self.excluded.append(Finding(tuple(p), -1.0, "scar"))

    def _near_wall_point(self, r: float) -> np.ndarray:
        for _ in range(500):
            p = self._random_lung_point(0.5)
            depth = self.depth_at(p)
            if r * 0.5 < depth < r * 0.9:
                return p
        return self._random_lung_point(r + 1.0)

    # ---- rasterisation ----
    def render(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        rng = self.rng
        shape = (len(zs), len(ys), len(xs))
        # Body, heart, aorta and spine do not change along this slab: draw one (y, x) slice
        # and repeat it; lungs and their contents are drawn only inside the lungs' box.
        Y, X = ys[:, None], xs[None, :]
        base = np.full(shape[1:], -1000.0, dtype=np.float32)
        rb = np.sqrt(((X - self.c[0]) / self.body_ax) ** 2 + ((Y - self.c[1]) / self.body_ay) ** 2)
        base[rb < 1.0] = -95.0  # subcutaneous fat
        base[rb < 0.9] = 45.0  # muscle and mediastinum
        heart = ((X - self.c[0] - self.body_ax * 0.05) / (self.body_ax * 0.3)) ** 2 + \
            ((Y - self.c[1] + self.body_ay * 0.05) / (self.body_ay * 0.45)) ** 2
        base[heart < 1.0] = 60.0
        aorta = (X - self.c[0] + self.body_ax * 0.08) ** 2 + (Y - self.c[1] - self.body_ay * 0.35) ** 2
        base[aorta < (self.body_ay * 0.12) ** 2] = 160.0  # contrast-enhanced
        # spine (posterior, +y is posterior in LUNA16's LPS world) and ribs
        spine = np.sqrt((X - self.c[0]) ** 2 + (Y - (self.c[1] + self.body_ay * 0.62)) ** 2)
        r_sp = self.body_ay * 0.2
        base[spine < r_sp] = 300.0
        base[(spine < r_sp) & (spine > r_sp * 0.8)] = 750.0
        vol = np.repeat(base[None], len(zs), axis=0)
        n_ribs = 11
        half = np.array([5.0, 5.0, 4.0])
        for k in range(n_ribs):
            ang = np.pi * (0.1 + 0.8 * k / (n_ribs - 1)) + (np.pi if k % 2 else 0.0)
            for zc in np.arange(self.z0 - 40, self.z1 + 40, 34.0):
                rc = np.array([self.c[0] + 0.82 * self.body_ax * np.cos(ang),
                               self.c[1] + 0.82 * self.body_ay * np.sin(ang), zc + 12 * np.sin(ang)])  # ribs slope
                blk = self._block(xs, ys, zs, rc - half, rc + half)
                if blk is None:
                    continue
                idx, (bz, by, bx) = blk
                d = ((bx[None, None, :] - rc[0]) / half[0]) ** 2 + ((by[None, :, None] - rc[1]) / half[1]) ** 2 + \
                    ((bz[:, None, None] - rc[2]) / half[2]) ** 2
                vol[idx][d < 1.0] = 650.0
        # each lung in its own box: the outline's harmonics widen it by at most 18 %
        lung = np.zeros(shape, dtype=bool)
        f32 = np.float32
        for i, (lx, ly) in enumerate(self.lung_c):
            reach = np.array([self.lung_ax * 1.2, self.lung_ay * 1.2, np.inf])
            blk = self._block(xs, ys, zs, np.array([lx, ly, 0.0]) - reach, np.array([lx, ly, 0.0]) + reach)
            if blk is None:
                continue
            idx, (bz, by, bx) = blk
            depth = self.lung_depth(bx.astype(f32)[None, None, :], by.astype(f32)[None, :, None],
                                    bz.astype(f32)[:, None, None], lungs=(i,))
            inside = depth > 0
            lung[idx] |= inside
            # parenchyma: -850 HU with low-frequency texture (2.5 sigma: the tail adds nothing visible)
            texture = ndimage.gaussian_filter(rng.standard_normal(size=inside.shape, dtype=f32), sigma=2.0,
                                              truncate=2.5)
            sub = vol[idx]
            sub[inside] = -855.0 + 120.0 * texture[inside]
        # vessels
        for p0, p1, r in self.vessels:
            self._tube(vol, lung, xs, ys, zs, p0, p1, r, 40.0)
        # findings
        for f in self.nodules + self.excluded:
            self._nodule(vol, xs, ys, zs, f)
        return vol

    @staticmethod
    def _block(xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        sel = []
        idx = []
        for axis, a, b in ((zs, lo[2], hi[2]), (ys, lo[1], hi[1]), (xs, lo[0], hi[0])):
            hit = np.flatnonzero((axis >= a) & (axis <= b))
            if hit.size == 0:
                return None
            idx.append(slice(hit.min(), hit.max() + 1))
            sel.append(axis[hit.min(): hit.max() + 1])
        return tuple(idx), sel

    def _tube(self, vol, lung, xs, ys, zs, p0, p1, r, hu) -> None:
        pad = r + 1.5
        blk = self._block(xs, ys, zs, np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if blk is None:
            return
        idx, (bz, by, bx) = blk
        m = lung[idx]
        if not m.any():
            return
        # distance of every voxel of the block to the segment, one axis at a time (broadcast)
        seg = p1 - p0
        d = [(a - o).astype(np.float32) for a, o in ((bx[None, None, :], p0[0]), (by[None, :, None], p0[1]),
                                                      (bz[:, None, None], p0[2]))]
        t = np.clip((d[0] * seg[0] + d[1] * seg[1] + d[2] * seg[2]) / max(float(seg @ seg), 1e-9), 0, 1)
        dist = np.sqrt((d[0] - t * seg[0]) ** 2 + (d[1] - t * seg[1]) ** 2 + (d[2] - t * seg[2]) ** 2)
        w = (1.0 / (1.0 + np.exp((dist[m] - r) / 0.35))).astype(np.float32)  # partial volume at the wall
        sub = vol[idx]
        sub[m] = sub[m] * (1 - w) + hu * w

    def _nodule(self, vol, xs, ys, zs, f: Finding) -> None:
        rng = self.rng
        dia = f.diameter_mm if f.diameter_mm > 0 else 4.0
        r = dia / 2
        c = np.array(f.xyz)
        blk = self._block(xs, ys, zs, c - r * 1.5 - 2, c + r * 1.5 + 2)
        if blk is None:
            return
        idx, (bz, by, bx) = blk
        dx, dy, dz = bx[None, None, :] - c[0], by[None, :, None] - c[1], bz[:, None, None] - c[2]
        if f.kind == "scar":  # an elongated non-nodule
            dist = np.sqrt((dx / 2.5) ** 2 + (dy / 0.8) ** 2 + (dz / 0.8) ** 2) * 1.0
            r_eff = 1.0
        else:
            dist = np.sqrt(dx**2 + dy**2 + dz**2)
            # lobulated surface: radius modulated by a few low-order angular terms
            theta = np.arctan2(dy, dx)
            phi = np.arctan2(dz, np.sqrt(dx**2 + dy**2) + 1e-6)
            lob = 1.0 + sum(rng.uniform(0, 0.06) * np.sin(k * theta + rng.uniform(0, 6)) * np.cos(phi)
                            + rng.uniform(0, 0.04) * np.sin(k * phi + rng.uniform(0, 6)) for k in (2, 3, 5))
            r_eff = r * lob
        sub = vol[idx]
        if f.kind in ("ground-glass", "part-solid"):
            w = 1.0 / (1.0 + np.exp((dist - r_eff) / 0.9))
            ggo = -560.0 + rng.normal(0, 40, size=sub.shape)
            sub[...] = np.maximum(sub, sub * (1 - w) + ggo * w)
            if f.kind == "part-solid":
                w2 = 1.0 / (1.0 + np.exp((dist - r_eff * 0.4) / 0.3))
                sub[...] = sub * (1 - w2) + 30.0 * w2
        else:
            w = 1.0 / (1.0 + np.exp((dist - r_eff) / 0.3))
            hu = float(rng.uniform(10, 70))
            sub[...] = np.maximum(sub, sub * (1 - w) + hu * w)

    # ---- candidates ----
    def candidates(self, rng: np.random.Generator) -> list[tuple[float, float, float, int]]:
        out: list[tuple[float, float, float, int]] = []
        for n in self.nodules:
            if not n.has_candidate:
                continue
            for _ in range(int(rng.integers(1, 4))):
                off = rng.normal(size=3)
                off *= rng.uniform(0, 0.3 * n.diameter_mm / 2) / np.linalg.norm(off)
                out.append((*(np.array(n.xyz) + off), 1))
        centres = [np.array(n.xyz) for n in self.nodules]
        radii = [n.diameter_mm / 2 for n in self.nodules]

        def clear(p: np.ndarray) -> bool:
            return all(np.linalg.norm(p - c) > r + 3.0 for c, r in zip(centres, radii, strict=True))

        # vessels (favour thick ones and those running along z: blobs in the axial plane)
        weights = np.array([r * (0.3 + abs((p1 - p0)[2]) / (np.linalg.norm(p1 - p0) + 1e-9))
                            for p0, p1, r in self.vessels])
        n_vessel = int(rng.integers(18, 28))
        for k in rng.choice(len(self.vessels), size=n_vessel, p=weights / weights.sum()):
            p0, p1, _ = self.vessels[int(k)]
            p = p0 + rng.uniform(0.2, 1.0) * (p1 - p0)
            if clear(p) and self.z0 < p[2] < self.z1:
                out.append((*p, 0))
        for _ in range(int(rng.integers(8, 14))):  # parenchyma
            p = self._random_lung_point(2.0)
            if clear(p):
                out.append((*p, 0))
        for _ in range(int(rng.integers(5, 10))):  # pleura / chest wall
            p = self._near_wall_point(2.0)
            if clear(p):
                out.append((*p, 0))
        for e in self.excluded:  # the candidate detector also finds excluded findings (class 0)
            out.append((*e.xyz, 0))
        order = rng.permutation(len(out))
        return [tuple(float(v) for v in out[i][:3]) + (int(out[i][3]),) for i in order]  # type: ignore[misc]


def _scanner_effects(vol: np.ndarray, rng: np.random.Generator, sc: Scanner, spacing: np.ndarray,
                     xs: np.ndarray, ys: np.ndarray, centre: np.ndarray) -> np.ndarray:
    # slice thickness: partial volume along z; reconstruction kernel: in-plane blur
    sig_xy = sc.kernel_mm / spacing[0]
    vol = ndimage.gaussian_filter(vol, sigma=(0.45, sig_xy, sig_xy), truncate=3.0)
    # correlated noise: 3 taps per axis (a Gaussian of sigma 0.7 truncated at 1.4 sigma)
    noise = ndimage.gaussian_filter(rng.standard_normal(size=vol.shape, dtype=np.float32), sigma=(0.0, 0.7, 0.7),
                                    truncate=1.5)
    # the filter's gain on white noise, measured on a few slices (the whole volume adds nothing)
    noise *= sc.noise_hu / max(float(noise[:: max(1, len(noise) // 4)].std()), 1e-6)
    vol += noise
    vol *= sc.hu_scale
    vol += sc.hu_offset
    # outside the reconstruction circle scanners write a fixed pad value
    rr = (xs[None, :] - centre[0]) ** 2 + (ys[:, None] - centre[1]) ** 2
    outside = rr > (len(xs) * spacing[0] / 2) ** 2
    np.rint(vol, out=vol)
    np.clip(vol, -1024, 3071, out=vol)
    out = vol.astype(np.int16)
    out[:, outside] = sc.pad_value
    return out


# --------------------------------------------------------------------------------------
# Writing a data set
# --------------------------------------------------------------------------------------
def write_scan(scan: SyntheticScan, root: Path) -> None:
    import SimpleITK as sitk

    folder = root / f"subset{scan.subset}"
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(scan.array)
    img.SetOrigin(scan.origin)
    img.SetSpacing(scan.spacing)
    img.SetDirection(scan.direction)
    sitk.WriteImage(img, str(folder / f"{scan.seriesuid}.mhd"), useCompression=False)


def _make_and_write(args: tuple[int, int, bool, str, int | None]) -> dict:
    seed, index, full_size, root, subset = args
    scan = make_scan(seed, index, full_size, subset)
    write_scan(scan, Path(root))
    return {
        "seriesuid": scan.seriesuid, "subset": scan.subset, "scanner": scan.scanner,
        "spacing": scan.spacing, "direction": scan.direction, "shape": scan.array.shape,
        "nodules": [asdict(n) for n in scan.nodules], "excluded": [asdict(n) for n in scan.excluded],
        "candidates": scan.candidates,
    }


def _csv(rows: list[list], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def make_dataset(out: Path | str, n_scans: int, seed: int = 0, *, test_scans: int = 0, test_subset: int = 9,
                 full_size: bool = False, workers: int = 1,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a LUNA16-format data set to ``out`` (atomically: a complete folder or none).

    ``n_scans`` scans fill LUNA16's ten subsets round-robin; ``test_scans`` more (scan
    indices ``n_scans`` onwards) all go to ``test_subset``, so a held-out test split can
    grow without changing a single training scan. An existing folder made with the same
    settings is reused; any other existing, non-empty ``out`` is an error (nothing is
    overwritten).
    """
    out = Path(out)
    settings = {"version": GENERATOR_VERSION, "n_scans": n_scans, "seed": seed, "full_size": full_size,
                "test_scans": test_scans, "test_subset": test_subset}
    if n_scans < 1:
        raise ValueError(f"--scans must be at least 1, got {n_scans}")
    if test_scans < 0:
        raise ValueError(f"--test-scans must be at least 0, got {test_scans}")
    if not 0 <= test_subset <= 9:
        raise ValueError(f"--test-subset must be one of LUNA16's subsets 0..9, got {test_subset}")
    if (out / MARKER).exists():
        found = json.loads((out / MARKER).read_text())
        if {k: found.get(k) for k in settings} == settings:
            log.info("synthetic data already at %s", out)
            return out
        raise ValueError(f"{out} holds synthetic data made with {found}, not {settings}; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        jobs = [(seed, i, full_size, str(tmp), None if i < n_scans else test_subset)
                for i in range(n_scans + test_scans)]
        infos: list[dict] = []
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for info in pool.map(_make_and_write, jobs):
                    infos.append(info)
                    if progress:
                        progress(len(infos), len(jobs))
        else:
            for job in jobs:
                infos.append(_make_and_write(job))
                if progress:
                    progress(len(infos), len(jobs))
        _write_tables(tmp, infos)
        (tmp / MARKER).write_text(json.dumps({**settings, "scanners": [asdict(s) for s in SCANNERS]}, indent=2))
        (tmp / "README.txt").write_text(
            "Synthetic chest CT in LUNA16's format, made by sim/make_data.py. Not patient data; "
            "research and software testing only, never for diagnosis.\n")
        if not publish_dir(tmp, out):
            raise ValueError(f"{out} was filled by another process while this one made its data; choose another --out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tables(root: Path, infos: list[dict]) -> None:
    ann, exc, cand, meta = [], [], [], []
    for s in infos:
        uid = s["seriesuid"]
        for n in s["nodules"]:
            ann.append([uid, *(f"{v:.6f}" for v in n["xyz"]), f"{n['diameter_mm']:.4f}"])
        for n in s["excluded"]:
            exc.append([uid, *(f"{v:.6f}" for v in n["xyz"]), f"{n['diameter_mm']:.4f}"])
        for x, y, z, c in s["candidates"]:
            cand.append([uid, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", c])
        flipped = "yes" if min(s["direction"][0], s["direction"][4], s["direction"][8]) < 0 else "no"
        meta.append([uid, s["subset"], s["scanner"], f"{s['spacing'][0]:.4f}", f"{s['spacing'][2]:.4f}",
                     flipped, len(s["nodules"]), sum(1 for n in s["nodules"] if n["has_candidate"])])
    cols = ["seriesuid", "coordX", "coordY", "coordZ"]
    (root / "annotations.csv").write_text(_csv(ann, [*cols, "diameter_mm"]))
    (root / "annotations_excluded.csv").write_text(_csv(exc, [*cols, "diameter_mm"]))
    (root / "candidates_V2.csv").write_text(_csv(cand, [*cols, "class"]))
    (root / "seriesuids.csv").write_text("".join(f"{s['seriesuid']}\n" for s in infos))
    (root / "scan_metadata.csv").write_text(_csv(meta, ["seriesuid", "subset", "scanner", "pixel_mm", "slice_mm",
                                                        "flipped", "nodules", "nodules_with_candidate"]))
