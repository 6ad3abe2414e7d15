"""Synthetic hospitals: chest CT in LUNA16's exact on-disk format, made from a seed.

What a CNN sees here should look like chest CT, not noise with bright balls: air around
a body with fat and muscle, ribs and spine, two lungs near -850 HU with texture, vessel
trees of branching tubes (the hard false-positive look-alikes: a vessel running along z is
a round blob in the axial plane), and nodules of 3-30 mm (solid, ground-glass and
part-solid, some touching the pleura). Everything is defined in world millimetres and
rasterised on each scan's own grid, so spacing, slice thickness and flipped direction
matrices change the voxels the way they do in real scans.

Each scan comes from one of four synthetic scanner models ("vendor-A".."vendor-D") with its
own noise, reconstruction kernel, slice spacing and HU calibration, recorded in
``scan_metadata.csv``; the ``scanner`` partition uses it to give sites a realistic feature
shift (FLamby splits LIDC-IDRI by scanner maker for the same reason).

The whole data set is a pure function of ``(n_scans, seed, full_size)``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
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


SCANNERS = (
    Scanner("vendor-A", 0.35, 22.0, 0.0, (1.0, 1.25), (0.62, 0.78), 1.00, 0.0, -2048),
    Scanner("vendor-B", 0.30, 12.0, 0.7, (2.0, 2.5), (0.70, 0.90), 0.97, 18.0, -1024),
    Scanner("vendor-C", 0.20, 40.0, 0.3, (1.25, 1.5), (0.66, 0.80), 1.03, -15.0, -3024),
    Scanner("vendor-D", 0.15, 16.0, 0.4, (0.6, 0.8), (0.50, 0.62), 1.00, 6.0, -2000),
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
def make_scan(seed: int, index: int, full_size: bool = False) -> SyntheticScan:
    """Make scan ``index`` of the data set with ``seed`` (deterministic)."""
    uid, subset, sc = scan_plan(index + 1, seed)[index]
    rng = np.random.default_rng([seed, index, 2])
    n_xy = 512 if full_size else 160
    px = float(rng.uniform(*sc.pixel_mm))
    sz = float(rng.uniform(*sc.slice_mm))
    z_extent = float(rng.uniform(260, 320)) if full_size else float(rng.uniform(56, 72))
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

    ph = _Phantom(rng, centre, fov, z_extent, full_size)
    vol = ph.render(xs, ys, zs)
    vol = _scanner_effects(vol, rng, sc, spacing, xs, ys, centre)
    cands = ph.candidates(rng)
    return SyntheticScan(uid, subset, sc.name, vol, tuple(origin), tuple(spacing),
                         tuple(np.diag(dirs).ravel()), ph.nodules, ph.excluded, cands)


class _Phantom:
    """A chest in world mm: body, lungs, bones, vessel trees, nodules."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, fov: float, z_extent: float,
                 full_size: bool) -> None:
        self.rng = rng
        self.c = centre
        # A real chest is ~320 mm wide; the small default scales the anatomy to its field
        # of view while nodules and vessels keep physical sizes (patches see a fixed FOV).
        self.scale = min(1.0, fov / 380.0)
        s = self.scale
        self.body_ax = (fov * 0.44 if not full_size else 165.0) * rng.uniform(0.92, 1.0)
        self.body_ay = self.body_ax * rng.uniform(0.66, 0.74)
        self.lung_c = [(self.c[0] + side * self.body_ax * 0.46, self.c[1] - self.body_ay * 0.02) for side in (-1, 1)]
        self.lung_ax = self.body_ax * rng.uniform(0.33, 0.37)
        self.lung_ay = self.body_ay * rng.uniform(0.68, 0.74)
        self.z0, self.z1 = self.c[2] - z_extent / 2, self.c[2] + z_extent / 2
        self.wobble = [[(k, rng.uniform(0.02, 0.06), rng.uniform(0, 6)) for k in (2, 3, 4)] for _ in range(2)]
        self.vessels: list[tuple[np.ndarray, np.ndarray, float]] = []
        for lc in self.lung_c:
            hilum = np.array([lc[0] - np.sign(lc[0] - self.c[0]) * self.lung_ax * 0.55, lc[1], self.c[2]])
            for _ in range(3):
                direction = rng.normal(size=3)
                direction[2] *= 1.6  # vessels run more cranio-caudally than across
                self._grow(hilum, direction / np.linalg.norm(direction), 4.2 * max(s, 0.55), 0)
        self.nodules: list[Finding] = []
        self.excluded: list[Finding] = []
        self._place_findings(full_size)

    # ---- geometry helpers ----
    def lung_depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Positive inside a lung: the margin (mm, approximately) to the lung boundary."""
        zt = np.clip(np.abs(z - self.c[2]) / ((self.z1 - self.z0) * 0.5 + 60.0), 0, 1)
        taper = np.sqrt(1 - zt**2)
        best = np.full(np.broadcast(x, y, z).shape, -1e9)
        for (lx, ly), wob in zip(self.lung_c, self.wobble, strict=True):
            ax, ay = self.lung_ax * taper, self.lung_ay * taper
            theta = np.arctan2(y - ly, x - lx)
            # an irregular outline: a few angular harmonics that drift with z
            edge = 1.0 + sum(a * np.sin(k * theta + ph + z * 0.02) for k, a, ph in wob)
            r = np.sqrt(((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2) / edge
            best = np.maximum(best, (1 - r) * np.minimum(ax, ay))
        return best

    def _grow(self, p0: np.ndarray, direction: np.ndarray, radius: float, gen: int) -> None:
        rng = self.rng
        if radius < 0.55 or gen > 7:
            return
        length = rng.uniform(7, 15) * (1.0 + radius / 4.0) * max(self.scale, 0.6)
        p1 = p0 + direction * length
        if self.lung_depth(*p1) < radius and gen > 0:
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
            if self.lung_depth(*p) > margin:
                return p
        raise RuntimeError("no point found in the lungs (phantom too small)")

    def _place_findings(self, full_size: bool) -> None:
        rng = self.rng
        max_d = 30.0 if full_size else min(30.0, self.lung_ax * 0.9)
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
            depth = self.lung_depth(*p)
            if r * 0.5 < depth < r * 0.9:
                return p
        return self._random_lung_point(r + 1.0)

    # ---- rasterisation ----
    def render(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        rng = self.rng
        Z, Y, X = zs[:, None, None], ys[None, :, None], xs[None, None, :]
        shape = (len(zs), len(ys), len(xs))
        vol = np.full(shape, -1000.0, dtype=np.float32)
        rb = np.sqrt(((X - self.c[0]) / self.body_ax) ** 2 + ((Y - self.c[1]) / self.body_ay) ** 2)
        rb = np.broadcast_to(rb, shape)
        vol[rb < 1.0] = -95.0  # subcutaneous fat
        vol[rb < 0.9] = 45.0  # muscle and mediastinum
        heart = ((X - self.c[0] - self.body_ax * 0.05) / (self.body_ax * 0.3)) ** 2 + \
            ((Y - self.c[1] + self.body_ay * 0.05) / (self.body_ay * 0.45)) ** 2
        vol[np.broadcast_to(heart < 1.0, shape)] = 60.0
        aorta = (X - self.c[0] + self.body_ax * 0.08) ** 2 + (Y - self.c[1] - self.body_ay * 0.35) ** 2
        vol[np.broadcast_to(aorta < (self.body_ay * 0.12) ** 2, shape)] = 160.0  # contrast-enhanced
        # spine (posterior, +y is posterior in LUNA16's LPS world) and ribs
        spine = np.sqrt((X - self.c[0]) ** 2 + (Y - (self.c[1] + self.body_ay * 0.62)) ** 2)
        spine = np.broadcast_to(spine, shape)
        r_sp = self.body_ay * 0.2
        vol[spine < r_sp] = 300.0
        vol[(spine < r_sp) & (spine > r_sp * 0.8)] = 750.0
        n_ribs = 11
        for k in range(n_ribs):
            ang = np.pi * (0.1 + 0.8 * k / (n_ribs - 1)) + (np.pi if k % 2 else 0.0)
            for zc in np.arange(self.z0 - 40, self.z1 + 40, 34.0 * max(self.scale, 0.5)):
                zc2 = zc + 12 * np.sin(ang)  # ribs slope
                rx = self.c[0] + 0.82 * self.body_ax * np.cos(ang)
                ry = self.c[1] + 0.82 * self.body_ay * np.sin(ang)
                d = ((X - rx) / 5.0) ** 2 + ((Y - ry) / 5.0) ** 2 + ((Z - zc2) / 4.0) ** 2
                vol[np.broadcast_to(d < 1.0, shape)] = 650.0
        depth = self.lung_depth(X, Y, Z)
        lung = np.broadcast_to(depth > 0, shape)
        # parenchyma: -850 HU with low-frequency texture
        texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=2.0) * 120.0
        vol[lung] = -855.0 + texture[lung]
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
        P = np.stack(np.broadcast_arrays(bx[None, None, :], by[None, :, None], bz[:, None, None]), axis=-1)
        seg = p1 - p0
        t = np.clip(((P - p0) @ seg) / max(seg @ seg, 1e-9), 0, 1)
        dist = np.linalg.norm(P - (p0 + t[..., None] * seg), axis=-1)
        w = 1.0 / (1.0 + np.exp((dist - r) / 0.35))  # partial volume at the wall
        sub = vol[idx]
        m = lung[idx]
        sub[m] = sub[m] * (1 - w[m]) + hu * w[m]

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
    vol = ndimage.gaussian_filter(vol, sigma=(0.45, sig_xy, sig_xy))
    noise = ndimage.gaussian_filter(rng.normal(size=vol.shape).astype(np.float32), sigma=(0.0, 0.7, 0.7))
    noise *= sc.noise_hu / max(float(noise.std()), 1e-6)
    vol = (vol + noise) * sc.hu_scale + sc.hu_offset
    # outside the reconstruction circle scanners write a fixed pad value
    rr = (xs[None, :] - centre[0]) ** 2 + (ys[:, None] - centre[1]) ** 2
    outside = rr > (len(xs) * spacing[0] / 2) ** 2
    out = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
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


def _make_and_write(args: tuple[int, int, bool, str]) -> dict:
    seed, index, full_size, root = args
    scan = make_scan(seed, index, full_size)
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


def make_dataset(out: Path | str, n_scans: int, seed: int = 0, *, full_size: bool = False, workers: int = 1,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a LUNA16-format data set to ``out`` (atomically: a complete folder or none).

    An existing folder made with the same settings is reused; any other existing,
    non-empty ``out`` is an error (nothing is overwritten).
    """
    out = Path(out)
    settings = {"version": GENERATOR_VERSION, "n_scans": n_scans, "seed": seed, "full_size": full_size}
    if n_scans < 1:
        raise ValueError(f"--scans must be at least 1, got {n_scans}")
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
        jobs = [(seed, i, full_size, str(tmp)) for i in range(n_scans)]
        infos: list[dict] = []
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for info in pool.map(_make_and_write, jobs):
                    infos.append(info)
                    if progress:
                        progress(len(infos), n_scans)
        else:
            for job in jobs:
                infos.append(_make_and_write(job))
                if progress:
                    progress(len(infos), n_scans)
        _write_tables(tmp, infos)
        (tmp / MARKER).write_text(json.dumps({**settings, "scanners": [asdict(s) for s in SCANNERS]}, indent=2))
        (tmp / "README.txt").write_text(
            "Synthetic chest CT in LUNA16's format, made by sim/make_data.py. Not patient data; "
            "research and software testing only, never for diagnosis.\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
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
