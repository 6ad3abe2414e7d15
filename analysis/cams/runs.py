"""A finished results folder opened for explaining: its model, test patches and nodules."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from analysis.cams.maps import heatmaps
from common.config import RunConfig
from common.data.cache import PatchCache, open_cache
from common.data.loaders import eval_loader, to_float
from common.data.luna16 import DataError, Nodule, load_luna16
from common.data.patches import PatchSpec
from common.evaluation.metrics import sigmoid
from common.training.engine import predict
from common.training.model import resolve_device
from experiment.results import RunDir

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """What the explanations need from a results folder: model, test patches, annotations."""

    path: Path
    cfg: RunConfig
    model: nn.Module
    device: torch.device
    cache: PatchCache
    positions: np.ndarray  # test-split positions in the cache index
    data_root: Path
    nodules: dict[str, list[Nodule]]  # annotations of the test scans, by seriesuid

    @property
    def spec(self) -> PatchSpec:
        return self.cache.spec


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Open a finished results folder: ``config.json``, ``model_final.pt``, ``sites.json``, the
    patch cache and the data set it names. ValueError names the file or entry at fault."""
    run = RunDir.open(run_dir, needs=("model_final.pt", "sites.json"))
    path = run.path
    cfg = run.config()
    cache_path, data_root = Path(run.saved_entry("cache")), Path(run.saved_entry("data_root"))
    model = run.final_model(cfg)
    try:
        cache = open_cache(cache_path)
    except DataError as exc:
        raise ValueError(f"{path / 'config.json'}: its patch cache cannot be opened ({exc}); rebuild it with "
                         "sim/prepare.py and the run's settings") from None
    if cache.spec.size != cfg.image_size or cache.spec.fov_mm != cfg.fov_mm:
        raise ValueError(f"{path / 'config.json'}: cache {cache.path} has {cache.spec}, the run "
                         f"--image-size {cfg.image_size} --fov-mm {cfg.fov_mm}")
    test = run.plan().test
    positions = cache.rows_of(test)
    if not len(positions):
        raise ValueError(f"{path / 'sites.json'}: its test split has no patches in {cache.path}")
    try:
        luna = load_luna16(data_root)
    except DataError as exc:
        raise ValueError(f"{path / 'config.json'}: data_root {data_root} cannot be read ({exc})") from None
    keep = set(test)
    nodules: dict[str, list[Nodule]] = {}
    for n in luna.annotations:
        if n.seriesuid in keep:
            nodules.setdefault(n.seriesuid, []).append(n)
    dev = resolve_device(device)
    return LoadedRun(path, cfg, model.to(dev).eval(), dev, cache, positions, data_root, nodules)


def _batches(n: int, batch: int, desc: str, progress: bool):
    from tqdm import tqdm

    starts = range(0, n, batch)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress or n <= batch, leave=False, dynamic_ncols=True)


def maps_for(model: nn.Module, patches: np.ndarray, *, device: torch.device, method: str, layer: str,
             upsample_mode: str = "aligned", batch: int = 32, progress: bool = False) -> np.ndarray:
    """Heatmaps (N, S, S) of uint8 cache patches (N, 3, S, S), in batches."""
    out = np.empty((len(patches), patches.shape[-2], patches.shape[-1]), dtype=np.float32)
    for a in _batches(len(patches), batch, f"{method} {layer}", progress):
        x = torch.from_numpy(to_float(np.ascontiguousarray(patches[a:a + batch]))).to(device)
        out[a:a + batch] = heatmaps(model, x, method=method, layer=layer, upsample_mode=upsample_mode)
    return out


def test_probabilities(run: LoadedRun) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of every test patch (the engine's ``predict``, float32)."""
    logits, labels = predict(run.model, eval_loader(run.cache, run.positions), run.device, amp=False)
    return sigmoid(logits), labels.astype(np.int8)
