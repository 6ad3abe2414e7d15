"""A hospital's side of a round, free of Flower: its data, its model, its training.

The ClientApp is created anew for every message, but the process that runs it (a Ray
actor in simulation, a SuperNode's app process in deployment) lives on. Opening the
patch cache and building a ResNet-50 cost seconds, so both are kept warm per process
in :data:`WARM`; the weights are always overwritten from the message, so nothing of one
site or round leaks into the next.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from common.atomic import atomic_write
from common.config import RunConfig
from common.data.cache import PatchCache, open_cache
from common.data.loaders import epoch_size, eval_loader, training_epoch
from common.data.partition import SitePlan
from common.evaluation.metrics import threshold_counts
from common.privacy.dpsgd import LocalDP
from common.training import model as model_lib
from common.training.engine import bn_statistics, evaluate, prepare, proximal_term, train_one_epoch

log = logging.getLogger(__name__)
T = TypeVar("T")


class SiteError(RuntimeError):
    """A site cannot take part as configured; the message says why and how to fix it."""


@dataclass
class SiteData:
    name: str
    cache: PatchCache
    train: np.ndarray  # positions in the cache index
    val: np.ndarray
    state_dir: Path | None = None  # where the site keeps what must outlive a round (privacy ledger)
    skipped: dict[str, str] = field(default_factory=dict)  # its unreadable scans (deployment), by name

    def train_size(self, cfg: RunConfig) -> int:
        return epoch_size(self.cache, self.train, cfg.neg_ratio)


class Warm:
    """What one process keeps warm between messages, by kind (patch caches, site plans,
    models, deployed sites), each kind bounded: least recently used first out.

    The owner is the process that runs the ClientApp (a Ray actor in simulation, a
    SuperNode's app process in deployment): :data:`WARM` is its one instance. A
    long-lived SuperNode that serves run after run with other settings holds at most
    ``limit`` entries of each kind, not one per run it ever served.
    """

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._kinds: dict[str, OrderedDict[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable, make: Callable[[], T]) -> T:
        """The entry ``key`` of ``kind``, made by ``make()`` the first time (under the lock:
        two messages never build the same cache or model twice)."""
        with self._lock:
            entries = self._kinds.setdefault(kind, OrderedDict())
            if key in entries:
                entries.move_to_end(key)
            else:
                entries[key] = make()
                while len(entries) > self.limit:
                    entries.popitem(last=False)
            return entries[key]

    def size(self, kind: str) -> int:
        with self._lock:
            return len(self._kinds.get(kind, ()))

    def cache(self, path: str) -> PatchCache:
        return self.get("cache", path, lambda: open_cache(Path(path)))

    def plan(self, path: str) -> SitePlan:
        return self.get("plan", path, lambda: SitePlan.load(path))

    def model(self, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
        return self.get("model", (cfg.arch, cfg.norm, str(device), cfg.amp),
                        lambda: prepare(model_lib.build_model(cfg.arch, cfg.norm), device, cfg.amp))


WARM = Warm()


def simulated_site(cfg: RunConfig, partition_id: int, plan_path: str, cache_path: str, state_path: str = ""
                   ) -> SiteData:
    plan = WARM.plan(plan_path)
    site = plan.site(partition_id)
    cache = WARM.cache(cache_path)
    return SiteData(site.name, cache, cache.rows_of(site.train), cache.rows_of(site.val),
                    Path(state_path) if state_path else None)


class SiteState:
    """What a site keeps from one of its rounds to the next, in its state folder:
    Adam's moments (``--site-optimizer kept``) and its own normalisation layers (``--fedbn``).

    One file per round (``<site>.round-NNNN.pt``, written atomically); round r reads the
    newest one of an earlier round, and the previous one is kept beside the newest. So a
    run killed at any moment and resumed at round r reads what round r of an uninterrupted
    run read, even when this site had already saved round r before the kill.
    """

    def __init__(self, folder: Path, site: str) -> None:
        self.folder = folder
        self.site = site

    def _saved(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.folder.glob(f"{self.site}.round-*.pt"):
            try:
                out.append((int(p.name[len(self.site) + len(".round-"):-len(".pt")]), p))
            except ValueError:
                continue
        return sorted(out)

    def load_before(self, server_round: int) -> dict | None:
        """The state saved by this site's newest round before ``server_round`` (None: none yet)."""
        earlier = [p for r, p in self._saved() if r < server_round]
        if not earlier:
            return None
        try:
            return torch.load(earlier[-1], map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file is named, never silently replaced
            raise SiteError(f"[site {self.site}] cannot read its saved state {earlier[-1]}: {exc}") from None

    def save(self, server_round: int, state: dict) -> None:
        path = self.folder / f"{self.site}.round-{server_round:04d}.pt"
        atomic_write(path, lambda fh: torch.save(state, fh), binary=True)
        saved = self._saved()
        keep = {server_round, max((r for r, _ in saved if r < server_round), default=-1)}
        for r, p in saved:
            if r not in keep:
                p.unlink(missing_ok=True)


def site_state(cfg: RunConfig, data: SiteData) -> SiteState | None:
    """The site's state store when a setting needs one (``--site-optimizer kept``, ``--fedbn``)."""
    if cfg.site_optimizer != "kept" and not cfg.fedbn:
        return None
    if data.state_dir is None:
        raise SiteError(f"[site {data.name}] --site-optimizer kept and --fedbn need a state folder "
                        "(deployment: node config state-path)")
    return SiteState(data.state_dir, data.name)


def site_seed(cfg: RunConfig, site: str, server_round: int, salt: int = 0) -> int:
    """A seed for this site and round that does not depend on which process runs it."""
    digest = hashlib.sha256(f"{cfg.seed}:{site}:{server_round}:{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def train_site(cfg: RunConfig, data: SiteData, arrays: dict[str, np.ndarray], server_round: int, *,
               deadline: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Local training for one round: returns the new weights and the round's metrics.

    The weights are views of this process's warm model (no 94 MB copy): serialise or copy
    them before the next call.

    With ``--dp local`` the same engine runs on Opacus' wrapped model, optimizer, loss and
    Poisson-sampling loader (:mod:`common.privacy.dpsgd`); everything else is identical.
    """
    device = model_lib.resolve_device(cfg.device)
    seed = site_seed(cfg, data.name, server_round)
    model = WARM.model(cfg, device)
    model_lib.set_arrays(model, arrays)
    store = site_state(cfg, data)
    saved = store.load_before(server_round) if store is not None else None
    if cfg.fedbn and saved is not None:  # this site's own normalisation layers replace the average
        model_lib.set_arrays(model, {k: v.numpy() for k, v in saved["norms"].items()})
    # Seed after the (possibly first) model build, which draws from the same generator:
    # Opacus' Poisson sampler uses it, and a warm and a fresh process must draw alike.
    torch.manual_seed(seed)
    optimizer = model_lib.make_optimizer(model, cfg)
    if cfg.site_optimizer == "kept" and saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    extra = proximal_term(model, cfg.proximal_mu) if cfg.strategy == "fedprox" else None
    prefix = f"[site {data.name}] [round {server_round}] "

    def loader(epoch: int):
        return training_epoch(cfg, data.cache, data.train, seed + epoch)

    dp = local_dp(cfg, data, len(loader(0))) if cfg.dp == "local" else None
    if dp is not None:
        dp.check_budget(server_round)
    t0 = time.perf_counter()
    stats: list[dict[str, float]] = []
    train_model, criterion = model, None
    try:
        for epoch in range(cfg.local_epochs):
            model_lib.set_lr(optimizer, model_lib.lr_at(cfg, (server_round - 1) * cfg.local_epochs + epoch))
            epoch_loader = loader(epoch)
            if dp is not None and epoch == 0:
                train_model, optimizer, criterion, epoch_loader = dp.attach(model, optimizer, epoch_loader, seed)
            elif dp is not None:
                epoch_loader = dp.loader(epoch_loader, seed + epoch)
            st = train_one_epoch(train_model, epoch_loader, optimizer, device, amp=cfg.amp and dp is None,
                                 extra_loss=extra, deadline=deadline, log_prefix=prefix, criterion=criterion)
            stats.append(st)
            log.info("%sepoch %d/%d: loss %.4f, %d examples, %.1f img/s", prefix, epoch + 1, cfg.local_epochs,
                     st["loss"], st["examples"], st["images_per_s"])
    finally:
        privacy = dp.detach(server_round) if dp is not None else None  # steps taken are spent, even on error
    examples = sum(s["examples"] for s in stats)
    metrics = {
        "train-loss": float(np.average([s["loss"] for s in stats], weights=[s["examples"] or 1 for s in stats])),
        "train-seconds": time.perf_counter() - t0,
        "train-examples": float(examples),
        "images-per-s": examples / max(sum(s["seconds"] for s in stats), 1e-9),
    }
    if privacy is not None:
        metrics.update({"dp-epsilon": privacy["epsilon"], "dp-delta": privacy["delta"],
                        "dp-noise": privacy["noise_multiplier"], "dp-steps": float(privacy["steps"]),
                        "dp-sample-rate": privacy["sample_rate"]})
    if store is not None:  # after the clock stops: saving is the federation's cost, not training
        t_save = time.perf_counter()
        state: dict = {}
        if cfg.site_optimizer == "kept":
            state["optimizer"] = optimizer.state_dict()
        if cfg.fedbn:
            own = model.state_dict()
            state["norms"] = {k: own[k].detach().cpu().clone() for k in model_lib.norm_keys(model)}
        store.save(server_round, state)
        metrics["state-seconds"] = time.perf_counter() - t_save
    return model_lib.get_arrays(model, copy=False), metrics


def local_dp(cfg: RunConfig, data: SiteData, batches_per_epoch: int) -> LocalDP:
    if data.state_dir is None:
        raise SiteError(f"[site {data.name}] --dp local needs a state folder for the privacy ledger "
                        "(deployment: node config state-path)")
    return LocalDP(data.name, n_patches=len(data.train), batches_per_epoch=batches_per_epoch,
                   local_epochs=cfg.local_epochs, rounds=cfg.rounds, clip=cfg.dp_clip, noise=cfg.dp_noise,
                   target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, grad_sample_mode=cfg.dp_grad_sample_mode,
                   ledger_path=data.state_dir / f"{data.name}.privacy.json")


def evaluate_site(cfg: RunConfig, data: SiteData, arrays: dict[str, np.ndarray], server_round: int = 0
                  ) -> dict[str, float | list[int]]:
    """The model of round ``server_round`` on this site's validation patches (with ``--fedbn``
    through the site's own normalisation layers of that round): metrics, and per-threshold
    counts from which the server picks the operating point (the predictions stay here)."""
    device = model_lib.resolve_device(cfg.device)
    model = WARM.model(cfg, device)
    model_lib.set_arrays(model, arrays)
    store = site_state(cfg, data) if cfg.fedbn else None
    saved = store.load_before(server_round + 1) if store is not None else None
    if saved is not None:
        model_lib.set_arrays(model, {k: v.numpy() for k, v in saved["norms"].items()})
    metrics, logits, labels = evaluate(model, eval_loader(data.cache, data.val), device, cfg.amp)
    return {**metrics, **threshold_counts(labels, logits)}


def site_bn_statistics(cfg: RunConfig, data: SiteData, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BatchNorm statistics of the global weights ``arrays`` on this site's training patches
    (``--bn-stats sites``): means and variances only, never a patch, leave the site."""
    device = model_lib.resolve_device(cfg.device)
    model = WARM.model(cfg, device)
    model_lib.set_arrays(model, arrays)
    return bn_statistics(model, eval_loader(data.cache, data.train), device, cfg.amp)
