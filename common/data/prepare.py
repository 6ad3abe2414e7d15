"""From a run configuration to ready data: the LUNA16 root, the patch cache and the sites.

``prepare(cfg)`` is what ``sim/prepare.py``, ``sim/run.py`` (both modes) and the
ServerApp call; it is idempotent (the second call is a cache hit that reads no CT file).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig, default_home
from common.data.cache import PatchCache, build_cache
from common.data.luna16 import Luna16, load_luna16
from common.data.partition import ScanInfo, SitePlan, make_plan, scan_infos
from common.data.patches import PatchSpec

log = logging.getLogger(__name__)


def patch_spec(cfg: RunConfig) -> PatchSpec:
    return PatchSpec(cfg.image_size, cfg.fov_mm, cfg.hu_min, cfg.hu_max)


def synthetic_root(cfg: RunConfig) -> Path:
    """Folder of the default synthetic data set, named by everything that makes it."""
    from common.data.synthetic import GENERATOR_VERSION

    extra = f"+{cfg.synthetic_test_scans}test{cfg.test_subset_list()[0]}" if cfg.synthetic_test_scans else ""
    return default_home() / f"synthetic-v{GENERATOR_VERSION}-{cfg.synthetic_scans}{extra}-seed{cfg.seed}"


def resolve_root(cfg: RunConfig, progress: bool = True) -> Path:
    """``--data``, or the default synthetic data set (made on first use)."""
    if cfg.data:
        root = Path(cfg.data).expanduser()
        if not root.exists():
            raise ValueError(f"--data {root}: no such folder")
        return root
    from common.data.synthetic import make_dataset

    root = synthetic_root(cfg)
    if not (root / "synthetic.json").exists():
        total = cfg.synthetic_scans + cfg.synthetic_test_scans
        log.info("no --data given: making %d synthetic LUNA16-format scans (%d round-robin over subsets 0-9, %d more "
                 "test-only in subset %d) in %s (once)", total, cfg.synthetic_scans, cfg.synthetic_test_scans,
                 cfg.test_subset_list()[0], root)
        bar = _bar(total, "making synthetic scans", progress)
        make_dataset(root, cfg.synthetic_scans, cfg.seed, test_scans=cfg.synthetic_test_scans,
                     test_subset=cfg.test_subset_list()[0], workers=cfg.workers,
                     progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
    return root


@dataclass
class Prepared:
    root: Path
    luna: Luna16
    cache: PatchCache
    infos: list[ScanInfo]
    plan: SitePlan


def prepare(cfg: RunConfig, progress: bool = True) -> Prepared:
    """Data root, patch cache and site plan. In deployment the sites bring their own data;
    ``--data`` (if given) is then only the server's held-out test set."""
    root = resolve_root(cfg, progress)
    luna = load_luna16(root)
    cache = build_cache(luna, patch_spec(cfg), cfg.cache_root(), workers=cfg.workers, on_bad_scan=cfg.on_bad_scan,
                        max_neg_per_scan=cfg.max_neg_per_scan, seed=cfg.seed, offset_copies=cfg.augment_offsets,
                        offset_mm=cfg.augment_offset_mm, progress=progress)
    infos = scan_infos(cache.seriesuid, cache.subset, cache.label, luna.metadata)
    if cfg.federation == "deployment":
        tests = set(cfg.test_subset_list())
        plan = SitePlan("deployment", cfg.seed, [], sorted(s.seriesuid for s in infos if s.subset in tests))
        if not plan.test:
            raise ValueError(f"--data {root}: no scans in --test-subsets {cfg.test_subsets} for the server's test set")
    else:
        plan = make_plan(infos, cfg.clients, cfg.partition, seed=cfg.seed, alpha=cfg.alpha,
                         test_subsets=cfg.test_subset_list(), val_fraction=cfg.val_fraction)
    return Prepared(root, luna, cache, infos, plan)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="scan", disable=None if enabled else True, dynamic_ncols=True)
