"""2.5D candidate patches: three orthogonal planes through the candidate, in world space.

Why orthogonal planes rather than three adjacent axial slices: the classic false
positive is a vessel, which is a round blob in the plane across it and a line in the
planes along it, whereas a nodule is round in all three. Three orthogonal planes put
that cue into the three channels directly. Adjacent axial slices repeat nearly the same
picture on thin-slice scans and jump 5 mm on 2.5 mm ones, so they would mean different
things at different hospitals.

Each plane is sampled on a fixed physical grid (``fov_mm`` across, ``size`` pixels) with
trilinear interpolation through the scan's direction matrix, so scans of any spacing or
orientation give comparable patches. Samples outside the volume read as air
(``PAD_HU``), so candidates at the edge are padded, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.data.luna16 import CTScan

PAD_HU = -1000.0
# Channel order and the two world axes (x=0, y=1, z=2) spanning each plane's
# (column, row) directions. Rows of the coronal and sagittal planes run along -z so that
# the head is up, as radiologists view them.
PLANES = (("axial", (0, 1), (1.0, 1.0)), ("coronal", (0, 2), (1.0, -1.0)), ("sagittal", (1, 2), (1.0, -1.0)))


@dataclass(frozen=True)
class PatchSpec:
    """Preprocessing settings; the patch cache is keyed by these."""

    size: int = 64
    fov_mm: float = 48.0
    hu_min: float = -1000.0
    hu_max: float = 400.0

    def key(self) -> dict[str, float | int | str]:
        return {"size": self.size, "fov_mm": self.fov_mm, "hu_min": self.hu_min, "hu_max": self.hu_max,
                "planes": "axial,coronal,sagittal", "pad_hu": PAD_HU, "version": 1}


def plane_offsets(spec: PatchSpec) -> np.ndarray:
    """World offsets (mm) of every sample, shape (3 planes, size, size, 3 xyz)."""
    step = spec.fov_mm / spec.size
    t = (np.arange(spec.size) - (spec.size - 1) / 2) * step
    out = np.zeros((3, spec.size, spec.size, 3))
    for k, (_, (col_axis, row_axis), (col_sign, row_sign)) in enumerate(PLANES):
        out[k, :, :, col_axis] = col_sign * t[None, :]
        out[k, :, :, row_axis] = row_sign * t[:, None]
    return out


def extract_hu(scan: CTScan, centres_xyz: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """HU patches (N, 3, size, size) float32 around world centres (N, 3)."""
    centres_xyz = np.asarray(centres_xyz, dtype=np.float64).reshape(-1, 3)
    offsets = plane_offsets(spec)
    out = np.empty((len(centres_xyz), 3, spec.size, spec.size), dtype=np.float32)
    vol = scan.array
    for i, c in enumerate(centres_xyz):
        idx = scan.geometry.world_to_index(offsets + c)  # (3, S, S, 3) in x, y, z order
        coords = np.moveaxis(idx[..., ::-1], -1, 0)  # (z, y, x) first, as the array is stored
        out[i] = ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=PAD_HU, prefilter=False)
    return out


def window_u8(hu: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """HU window to uint8 (0 = hu_min, 255 = hu_max); a step of about 5.5 HU for the lung
    window, below CT noise, and a quarter of float32's size in the cache."""
    scaled = (hu - spec.hu_min) / (spec.hu_max - spec.hu_min)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def extract(scan: CTScan, centres_xyz: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Windowed uint8 patches (N, 3, size, size), as stored in the cache."""
    return window_u8(extract_hu(scan, centres_xyz, spec), spec)
