"""World points and a patch's pixels: where a heatmap peak lies (the conventions of common.data.patches)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from common.data.luna16 import Nodule
from common.data.patches import PLANES, PatchSpec

log = logging.getLogger(__name__)


def project(spec: PatchSpec, centre_xyz: Sequence[float], point_xyz: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Where a world point falls in each plane of the patch centred at ``centre_xyz``.

    Returns
    -------
    rc
        (3 planes, 2) fractional pixel (row, col) of the point's orthogonal projection onto
        each plane (pixel ``i`` lies at ``(i - (size - 1) / 2) * fov_mm / size`` mm).
    normal_mm
        (3,) signed distance of the point from each plane along its normal.
    """
    d = np.asarray(point_xyz, dtype=np.float64) - np.asarray(centre_xyz, dtype=np.float64)
    step = spec.fov_mm / spec.size
    mid = (spec.size - 1) / 2
    rc = np.empty((3, 2))
    normal = np.empty(3)
    for k, (_, (col_axis, row_axis), (col_sign, row_sign)) in enumerate(PLANES):
        rc[k] = (row_sign * d[row_axis] / step + mid, col_sign * d[col_axis] / step + mid)
        normal[k] = d[3 - col_axis - row_axis]
    return rc, normal


def plane_hits(spec: PatchSpec, centre_xyz: Sequence[float], peak_rc: Sequence[float], nodule: Nodule
               ) -> np.ndarray:
    """Pointing-game hit per plane (3,) bool: the peak's world point in plane k lies within
    the nodule's radius of the nodule centre's projection onto plane k."""
    rc, _ = project(spec, centre_xyz, nodule.xyz)
    dist_mm = np.hypot(rc[:, 0] - peak_rc[0], rc[:, 1] - peak_rc[1]) * spec.fov_mm / spec.size
    return dist_mm <= nodule.diameter_mm / 2


def nearest_nodule(nodules: Sequence[Nodule], xyz: Sequence[float]) -> tuple[Nodule | None, float]:
    """The nodule nearest a world point and its distance in mm (None, inf when there is none)."""
    if not nodules:
        return None, math.inf
    d = np.linalg.norm(np.array([n.xyz for n in nodules]) - np.asarray(xyz), axis=1)
    i = int(d.argmin())
    return nodules[i], float(d[i])
