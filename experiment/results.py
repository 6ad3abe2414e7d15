"""One results folder per run, the same for federated and centralized runs.

``config.json``   the resolved configuration (and versions, sites), written at start
``events.jsonl``  one row per site event (train, evaluate, failure, rejected) per round
``rounds.jsonl``  one row per completed round: times, aggregated and test metrics
``summary.json``  the final figures (with 95% bootstrap CIs over patients)
``checkpoints/``  ``round-NNNN.pt`` global model + strategy state, the newest N kept
``submission.csv`` candidate probabilities of the test split, in LUNA16's format
``*.png``         learning curves, ROC and FROC

Everything is written atomically or appended line by line; a run killed at any point
leaves a folder that ``--resume`` continues from its last complete round.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write, atomic_write_json, atomic_write_text, json_default
from common.config import RunConfig

log = logging.getLogger(__name__)

# Settings that may differ on --resume: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ("rounds", "ray_address", "max_parallel", "cpus_per_client", "gpus_per_client", "workers",
                     "node_timeout", "round_timeout", "out", "run_name", "device", "keep_checkpoints",
                     "tracking", "tracking_uri", "tracking_experiment")
NOTICE = ("Research results on synthetic or public data (LUNA16). Not a medical device; "
          "never use these figures or models for diagnosis.")


def versions() -> dict[str, str]:
    import flwr
    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "flwr": flwr.__version__, "numpy": numpy.__version__}


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # ---- creation ----
    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        name = cfg.run_name or f"{cfg.mode}-{cfg.strategy if cfg.mode == 'federated' else 'pooled'}-" \
            f"{cfg.partition}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.out) / name
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"results folder {path} already exists; use --resume {path} to continue it "
                             "or choose another --run-name")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        return run

    @classmethod
    def open_for_resume(cls, path: Path | str) -> tuple[RunDir, RunConfig]:
        run = cls.open(path, "--resume")
        return run, run.config()

    # ---- reading: the one reader of a results folder (resume, report, CAMs, audit) ----
    @classmethod
    def open(cls, path: Path | str, what: str = "RUN_DIR", *, needs: tuple[str, ...] = ()) -> RunDir:
        """An existing results folder holding ``config.json`` and every file in ``needs``;
        ValueError names the folder (as ``what``, the option that gave it) and the file missing."""
        run = cls(path)
        if not run.path.is_dir():
            raise ValueError(f"{what} {run.path}: no such folder")
        for name in (*needs, "config.json"):  # "not finished" before "not a results folder"
            if not (run.path / name).is_file():
                hint = {"config.json": "; is it a results folder?",
                        "model_final.pt": " (the run has not finished)",
                        "summary.json": " (the run has not finished)"}.get(name, "")
                raise ValueError(f"{what} {run.path}: no {name}{hint}")
        return run

    def saved(self) -> dict[str, Any]:
        """``config.json`` as written at the start (config, versions, data root, cache)."""
        return json.loads(self.config_path.read_text())

    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.saved()["config"])

    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def optional_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file written by a later command (``audit.json``, ``cam.json``), or None."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def plan(self):
        """The site plan (``sites.json``): every site's patients and the test split."""
        from common.data.partition import SitePlan

        return SitePlan.load(self.path / "sites.json")

    def saved_entry(self, key: str) -> Any:
        """An entry of ``config.json`` a reader needs (``cache``, ``data_root``), or a clear error."""
        value = self.saved().get(key)
        if not value:
            raise ValueError(f"{self.config_path}: no {key!r} entry (was the run made without data, "
                             "e.g. a deployment server without --data?)")
        return value

    def final_model(self, cfg: RunConfig | None = None) -> torch.nn.Module:
        """The final global model, built from the run's own settings."""
        from common.training.model import build_model, strip_prefixes

        cfg = cfg or self.config()
        model = build_model(cfg.arch, cfg.norm)
        path = self.path / "model_final.pt"
        try:
            model.load_state_dict(strip_prefixes(torch.load(path, map_location="cpu", weights_only=True)["model"]))
        except Exception as exc:  # noqa: BLE001 - any unreadable or mismatching file gets the same clear message
            raise ValueError(f"{path}: cannot be loaded into {cfg.arch} (norm={cfg.norm}) from "
                             f"config.json: {exc}") from None
        return model

    @staticmethod
    def check_same(saved: RunConfig, new: RunConfig) -> None:
        diff = [f"--{k.replace('_', '-')}: run has {v!r}, now {new.to_dict()[k]!r}"
                for k, v in saved.to_dict().items() if k not in RESUMABLE_CHANGES and new.to_dict()[k] != v]
        if diff:
            raise ValueError("cannot resume with a different configuration:\n  " + "\n  ".join(diff))

    # ---- paths ----
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def rounds_path(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    # ---- writing ----
    def write_config(self, cfg: RunConfig, **extra: Any) -> None:
        atomic_write_json(self.config_path, {"config": cfg.to_dict(), "versions": versions(), "notice": NOTICE,
                                             "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})

    def append(self, path: Path, row: dict) -> None:
        line = json.dumps(row, sort_keys=True, default=json_default) + "\n"
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def event(self, kind: str, rnd: int, site: str, data: dict) -> None:
        self.append(self.events_path, {"kind": kind, "round": rnd, "site": site, **data})

    def round_row(self, row: dict) -> None:
        self.append(self.rounds_path, row)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    # ---- reading ----
    @staticmethod
    def read_jsonl(path: Path) -> list[dict]:
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                log.warning("%s: ignoring an incomplete line", path)
        return rows

    def rounds(self) -> list[dict]:
        return self.read_jsonl(self.rounds_path)

    def events(self) -> list[dict]:
        return self.read_jsonl(self.events_path)

    def truncate_after(self, rnd: int) -> None:
        """Drop rows of rounds after ``rnd`` (written before a crash, not checkpointed)."""
        for path in (self.events_path, self.rounds_path):
            rows = [r for r in self.read_jsonl(path) if r.get("round", 0) <= rnd]
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=json_default) + "\n" for r in rows))

    # ---- checkpoints ----
    def snapshot(self, cfg: RunConfig, model: torch.nn.Module, **state: Any) -> Callable[[int, dict], Path]:
        """Copy the model's weights now (and take ``state``, e.g. the strategy's or optimizer's);
        the returned writer saves them as round ``rnd``'s checkpoint later (in the background)."""
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return lambda rnd, row: self.save_checkpoint(rnd, weights, cfg, cfg.keep_checkpoints, row=row, **state)

    def save_checkpoint(self, rnd: int, model_state: dict[str, torch.Tensor], cfg: RunConfig,
                        keep: int, **extra: Any) -> Path:
        path = self.checkpoint_dir / f"round-{rnd:04d}.pt"
        obj = {"model": model_state, "round": rnd, "config": cfg.to_dict(), **extra}
        atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)
        for old in sorted(self.checkpoint_dir.glob("round-*.pt"))[:-keep]:
            old.unlink()
        return path

    def latest_checkpoint(self) -> dict | None:
        for path in sorted(self.checkpoint_dir.glob("round-*.pt"), reverse=True):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged file: fall back to the one before
                log.warning("checkpoint %s cannot be read (%s); trying an older one", path, exc)
        return None

    def save_predictions(self, seriesuid, xyz, labels, logits) -> None:
        """The test split's per-candidate labels and logits (for reports: ROC, bootstraps)."""
        import numpy as np

        def write(fh) -> None:
            np.savez(fh, seriesuid=np.asarray(seriesuid, dtype=str), xyz=xyz, labels=labels, logits=logits)

        atomic_write(self.path / "test_predictions.npz", write, binary=True)

    def load_predictions(self) -> dict:
        import numpy as np

        with np.load(self.path / "test_predictions.npz") as z:
            return {k: z[k] for k in z.files}

    def save_model(self, name: str, model_state: dict[str, torch.Tensor], cfg: RunConfig, **extra: Any) -> Path:
        path = self.path / name
        obj = {"model": model_state, "config": cfg.to_dict(), **extra}
        atomic_write(path, lambda fh: torch.save(obj, fh), binary=True)
        return path


def starting_model(cfg: RunConfig, checkpoint: dict | None = None) -> torch.nn.Module:
    """A run's model before its first (or, resumed, its next) round, the same for the server and
    the centralized baseline: built from the seed, then the checkpoint's weights when resuming,
    else ``--weights`` when given."""
    from common.training import model as model_lib

    torch.manual_seed(cfg.seed)
    model = model_lib.build_model(cfg.arch, cfg.norm)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    elif cfg.weights:
        model_lib.load_weights(model, cfg.weights)
    return model

