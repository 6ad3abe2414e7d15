"""Torch datasets over the patch cache: balanced training epochs and natural-ratio evaluation.

LUNA16 holds about one positive candidate per 484 negatives. A training epoch takes
every positive of the site and ``neg_ratio`` times as many negatives, drawn afresh each
epoch, so the model sees many different negatives over a run. Evaluation sets keep the
natural ratio (all candidates of the scans), and every report states it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from common.data.cache import PatchCache
from common.data.patches import PatchSpec

if TYPE_CHECKING:
    from common.config import RunConfig


def to_float(patches: np.ndarray) -> np.ndarray:
    """uint8 window values to the model's input range [-1, 1] (float32)."""
    return patches.astype(np.float32) * (2.0 / 255.0) - 1.0


@dataclass(frozen=True)
class ScannerVariation:
    """``--augment-scanner``: what a different CT scanner would have made of the same patch,
    drawn afresh for each training patch (with probability ``p``), before flips and rotations.

    The ranges are those between CT scanners and protocols in general (LUNA16 mixes
    reconstruction kernels from soft to sharp, slices of 0.6-2.5 mm and calibrations a few
    HU apart), not fitted to any data set: a softer reconstruction kernel (in-plane Gaussian
    blur of up to ``kernel_mm`` sigma), thicker slices (blur along z, the rows of the coronal
    and sagittal planes, up to ``slice_mm`` sigma: a 2.5 mm slice profile has about 1.1 mm),
    more image noise (white, up to ``noise_hu`` standard deviation) and calibration (gain
    within ``gain``, offset within ``offset_hu``). A site that sees one scanner then trains on
    the others' look too, as a pooled data set would.
    """

    p: float = 0.5
    kernel_mm: float = 1.0
    slice_mm: float = 1.1
    noise_hu: float = 30.0
    gain: float = 0.03
    offset_hu: float = 20.0

    def apply(self, patch: np.ndarray, rng: np.random.Generator, spec: PatchSpec) -> np.ndarray:
        """One (3, S, S) uint8 patch in the cache's orientation (plane 0 axial, rows y; planes
        1 and 2 coronal and sagittal, rows z) varied as one draw of another scanner."""
        if rng.random() >= self.p:
            return patch
        px_mm = spec.fov_mm / spec.size
        k, z = rng.uniform(0.0, self.kernel_mm) / px_mm, rng.uniform(0.0, self.slice_mm) / px_mm
        noise, gain = rng.uniform(0.0, self.noise_hu), 1.0 + rng.uniform(-self.gain, self.gain)
        offset = rng.uniform(-self.offset_hu, self.offset_hu)
        hu_per_step = (spec.hu_max - spec.hu_min) / 255.0
        hu = patch.astype(np.float32) * hu_per_step + spec.hu_min
        hu[0] = ndimage.gaussian_filter(hu[0], sigma=(k, k), truncate=3.0)
        for plane in (1, 2):
            hu[plane] = ndimage.gaussian_filter(hu[plane], sigma=(z, k), truncate=3.0)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * noise
        hu = hu * gain + offset
        return np.clip(np.rint((hu - spec.hu_min) / hu_per_step), 0, 255).astype(patch.dtype)


def augment(batch: np.ndarray, rng: np.random.Generator, max_shift: int,
            scanner: tuple[ScannerVariation, PatchSpec] | None = None) -> np.ndarray:
    """Flips, 90-degree rotations and small shifts, the same for all three planes of a patch;
    with ``scanner``, first another scanner's look (``ScannerVariation``).

    A nodule has no preferred orientation, so these keep the label; shifts mimic the
    candidate detector's few-millimetre error.
    """
    out = np.empty_like(batch)
    for i, p in enumerate(batch):
        if scanner is not None:
            p = scanner[0].apply(p, rng, scanner[1])
        if rng.random() < 0.5:
            p = p[:, :, ::-1]
        if rng.random() < 0.5:
            p = p[:, ::-1, :]
        p = np.rot90(p, int(rng.integers(4)), axes=(1, 2))
        if max_shift:
            dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
            p = shift_planes(p, int(dy), int(dx))
        out[i] = p
    return out


def shift_planes(p: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The augmentation's shift: all three planes of a (3, S, S) patch moved by the same (dy, dx)
    pixels, the vacated border filled with its nearest row or column (not the opposite edge)."""
    p = np.roll(p, (dy, dx), axis=(1, 2))
    if dy > 0:
        p[:, :dy] = p[:, dy:dy + 1]
    elif dy < 0:
        p[:, dy:] = p[:, dy - 1:dy]
    if dx > 0:
        p[:, :, :dx] = p[:, :, dx:dx + 1]
    elif dx < 0:
        p[:, :, dx:] = p[:, :, dx - 1:dx]
    return p


def shift_pixels(spec: PatchSpec, shift_mm: float) -> int:
    """The largest augmentation shift in pixels of ``spec``'s patches: 0 for none, else at least
    1 (3 mm is ``size // 16`` pixels at the default 48 mm field of view)."""
    return 0 if shift_mm == 0 else max(1, int(round(shift_mm * spec.size / spec.fov_mm)))


class PatchDataset(Dataset):
    """Patches at ``positions`` of the cache index (uint8 in the cache, float here). With
    ``augment`` and a cache holding offset copies (``--augment-offsets K``), a positive is read
    from one of its K + 1 cuts (the centred one or a copy at a true 3D offset), drawn uniformly
    each time; the flips, rotations and in-plane shifts then apply as to every patch."""

    def __init__(self, cache: PatchCache, positions: np.ndarray, *, augment: bool = False,
                 seed: int = 0, shift_mm: float = 3.0, scanner: ScannerVariation | None = None) -> None:
        self.cache = cache
        self.positions = np.asarray(positions, dtype=np.int64)
        self.labels = cache.label[self.positions].astype(np.float32)
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self.max_shift = shift_pixels(cache.spec, shift_mm)
        self.scanner = (scanner, cache.spec) if scanner is not None else None

    def __len__(self) -> int:
        return len(self.positions)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """File rows to read for these positions: their own, or (training with offset copies) a
        uniformly drawn one of each positive's cuts. Draws nothing from the generator when the
        cache has no copies, so runs without them are what they always were."""
        rows = self.cache.row[positions]
        if not self.augment or self.cache.copy_rows is None:
            return rows
        start, stop = self.cache.copy_start[positions], self.cache.copy_start[positions + 1]
        pick = self.rng.integers(0, stop - start + 1)  # 0 .. K: K = the centred cut itself
        use = pick < stop - start
        rows = rows.copy()
        rows[use] = self.cache.copy_rows[start[use] + pick[use]]
        return rows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.cache.read_rows(self.rows(self.positions[i:i + 1]))
        if self.augment:
            x = augment(x, self.rng, self.max_shift, self.scanner)
        return torch.from_numpy(to_float(np.ascontiguousarray(x[0]))), torch.tensor(self.labels[i])

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Batched read: one sorted memmap gather instead of one read per sample.
        x = self.cache.read_rows(self.rows(self.positions[np.asarray(idx)]))
        if self.augment:
            x = augment(x, self.rng, self.max_shift, self.scanner)
        x = to_float(np.ascontiguousarray(x))
        return [(torch.from_numpy(x[k]), torch.tensor(self.labels[j])) for k, j in enumerate(idx)]


def balanced_positions(cache: PatchCache, positions: np.ndarray, neg_ratio: float,
                       rng: np.random.Generator) -> np.ndarray:
    """All positives among ``positions`` plus ``neg_ratio`` x as many fresh random negatives."""
    positions = np.asarray(positions, dtype=np.int64)
    lab = cache.label[positions]
    pos = positions[lab == 1]
    neg = positions[lab == 0]
    n_neg = min(len(neg), int(round(max(len(pos), 1) * neg_ratio)))
    chosen = np.concatenate([pos, rng.choice(neg, n_neg, replace=False)]) if n_neg else pos
    return rng.permutation(chosen)


def epoch_size(cache: PatchCache, positions: np.ndarray, neg_ratio: float) -> int:
    """Examples in one balanced epoch (what a site reports as its ``num-examples``)."""
    lab = cache.label[np.asarray(positions, dtype=np.int64)]
    n_pos = int((lab == 1).sum())
    return n_pos + min(int((lab == 0).sum()), int(round(max(n_pos, 1) * neg_ratio)))


def train_loader(cache: PatchCache, positions: np.ndarray, *, batch_size: int, neg_ratio: float,
                 augment: bool, seed: int, shift_mm: float = 3.0,
                 scanner: ScannerVariation | None = None) -> DataLoader:
    """One balanced epoch's loader, reproducible from ``seed``; ``shift_mm``: the largest
    augmentation shift (``--augment-shift-mm``); ``scanner``: another scanner's look on top
    (``--augment-scanner``; only with ``augment``)."""
    rng = np.random.default_rng(seed)
    chosen = balanced_positions(cache, positions, neg_ratio, rng)
    ds = PatchDataset(cache, chosen, augment=augment, seed=seed + 1, shift_mm=shift_mm, scanner=scanner)
    # Order is already random; drop a last batch of one (BatchNorm cannot train on it).
    return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=len(chosen) % batch_size == 1)


def training_epoch(cfg: RunConfig, cache: PatchCache, positions: np.ndarray, seed: int) -> DataLoader:
    """The training epoch of a run's settings (batch size, negatives, every augmentation): what a
    site and the centralized baseline both train on, so one setting reaches both."""
    return train_loader(cache, positions, batch_size=cfg.batch_size, neg_ratio=cfg.neg_ratio, augment=cfg.augment,
                        seed=seed, shift_mm=cfg.augment_shift_mm,
                        scanner=ScannerVariation() if cfg.augment and cfg.augment_scanner else None)


def eval_loader(cache: PatchCache, positions: np.ndarray, batch_size: int = 64) -> DataLoader:
    return DataLoader(PatchDataset(cache, positions), batch_size=batch_size, shuffle=False)
