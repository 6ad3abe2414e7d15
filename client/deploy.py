"""A hospital's own data in deployment: the SuperNode's node config names it.

Node config keys (``flower-supernode --node-config "k=v k2=v2"``):

``site-name``  the hospital's name in the federation's logs and results (required)
``data-path``  its LUNA16-format folder (subset*/, annotations.csv, candidates); read only
``cache-path`` a writable folder for its patch cache (default: ``<LUNAFL_HOME>/site-cache``)
``on-bad-scan`` skip (default: the run's setting) or fail: what this hospital does with a
               scan it cannot read (skipped scans are reported by name at the handshake)
``state-path`` a writable folder for what outlives a round, e.g. the privacy ledger
               (default: ``<cache-path>/state``)

The ClientApp reads only these paths; there is no partition arithmetic. The site's own
patients are split into training and validation by patient (``--val-fraction``), with
the run's seed, the same way every round.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.config import RunConfig, default_home
from common.data.cache import build_cache
from common.data.luna16 import load_luna16
from common.data.prepare import patch_spec

from .site import WARM, SiteData, SiteError


def deployed_site(cfg: RunConfig, node: Mapping[str, object]) -> SiteData:
    """This SuperNode's site (built once per process and settings, then kept warm in :data:`client.site.WARM`)."""
    name = str(node.get("site-name", "")).strip()
    if not name:
        raise SiteError("node config lacks site-name (start the SuperNode with --node-config "
                        "\"site-name=<hospital> data-path=<folder>\")")
    data_path = Path(str(node["data-path"]))
    if not data_path.is_dir():
        raise SiteError(f"[site {name}] data-path {data_path} is not a folder on this node")
    cache_path = Path(str(node.get("cache-path", default_home() / "site-cache")))
    key = (name, str(data_path), str(cache_path), cfg.fingerprint("image_size", "fov_mm", "hu_min", "hu_max",
                                                                  "max_neg_per_scan", "seed", "val_fraction",
                                                                  "augment_offsets", "augment_offset_mm"))
    def build() -> SiteData:
        luna = load_luna16(data_path)
        on_bad = str(node.get("on-bad-scan", cfg.on_bad_scan))  # the hospital may decide for its own data
        cache = build_cache(luna, patch_spec(cfg), cache_path, workers=cfg.workers, on_bad_scan=on_bad,
                            max_neg_per_scan=cfg.max_neg_per_scan, seed=cfg.seed,
                            offset_copies=cfg.augment_offsets, offset_mm=cfg.augment_offset_mm, progress=False)
        train, val = split_site(cache.scan_ids(), cfg)
        state = Path(str(node.get("state-path", cache_path / "state")))
        return SiteData(name, cache, cache.rows_of(train), cache.rows_of(val), state,
                        dict(cache.meta.get("skipped_scans", {})))

    return WARM.get("site", key, build)


def split_site(scan_ids: list[str], cfg: RunConfig) -> tuple[list[str], list[str]]:
    """A hospital's own patients split into (training, validation) by patient, with the run's seed."""
    scans = np.array(scan_ids, dtype=object)
    rng = np.random.default_rng([cfg.seed, 17])
    rng.shuffle(scans)
    n_val = max(1, int(round(len(scans) * cfg.val_fraction))) if len(scans) >= 2 else 0
    return sorted(scans[n_val:]), sorted(scans[:n_val])
