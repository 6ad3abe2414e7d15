"""The patch cache: build rate on full-size scans, read rate against the training rate."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_cache(cfg, n_full: int, workdir: Path, train_rate: float | None, full_size: bool = True) -> dict:
    """Build rate on full-size synthetic scans; read rate through the training loader."""
    import numpy as np

    from common.data.cache import build_cache
    from common.data.loaders import train_loader
    from common.data.luna16 import load_luna16
    from common.data.patches import PatchSpec
    from common.data.synthetic import make_dataset

    root = make_dataset(workdir / f"scans-{n_full}-{full_size}", n_full, seed=11, full_size=full_size, workers=2)
    luna = load_luna16(root)
    out: dict = {"scans": n_full, "full_size": full_size, "candidates": len(luna.candidates)}
    for size in sorted({cfg.image_size, 224}):
        spec = PatchSpec(size, cfg.fov_mm, cfg.hu_min, cfg.hu_max)
        t0 = time.time()
        cache = build_cache(luna, spec, workdir / f"cache-{size}", workers=cfg.workers, progress=False)
        secs = time.time() - t0
        out[f"build_patches_per_s_{size}px"] = len(cache) / secs
        positions = np.arange(len(cache))
        t0, n = time.time(), 0
        for _ in range(3):
            for x, _y in train_loader(cache, positions, batch_size=cfg.batch_size, neg_ratio=1e9, augment=True,
                                      seed=0):
                n += len(x)
        out[f"read_images_per_s_{size}px"] = n / (time.time() - t0)
        out[f"cache_mib_{size}px"] = (cache.path / "patches.u8").stat().st_size / 2**20
    if train_rate:
        out["read_vs_train_ratio"] = out[f"read_images_per_s_{cfg.image_size}px"] / train_rate
    return out
