"""What many tests share: the repository root, the one tiny preset, and running sim/run.py.

The tiny preset (nanoGPT's "baby" config): ResNet-10 on 32 px patches, batch 8, one worker,
seed 3, two sites, one round of one local epoch. Every test that trains says only what it
changes from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {"image_size": 32, "arch": "resnet10", "batch_size": 8, "workers": 1, "seed": 3,
                        "clients": 2, "rounds": 1, "local_epochs": 1}
# the preset's model and data settings, which every tiny run keeps (sites and rounds vary)
TINY_MODEL = ("image_size", "arch", "batch_size", "workers", "seed")


def tiny_args(*names: str, **changes: Any) -> list[str]:
    """The preset as ``sim/run.py`` options: the ``names`` given (default: the model settings), changed."""
    chosen = {k: TINY[k] for k in (names or TINY_MODEL)} | changes
    return [a for k, v in chosen.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def tiny_run_config(**changes: Any) -> str:
    """The preset as a Flower run config (``flwr run --run-config`` / ``LUNAFL_RUN_CONFIG``)."""
    values = TINY | changes
    return " ".join(f'{k.replace("_", "-")}={json.dumps(v)}' for k, v in values.items())


def docker_script(name: str):
    """``docker/<name>.py`` as a module (the containers' scripts are files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"luna_docker_{name}", ROOT / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(path: Path) -> list[dict]:
    """The lines of a JSONL file (``rounds.jsonl``, ``events.jsonl``)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# One Ray actor serves every simulated site of a tiny run: each actor costs a process that imports
# torch (~5 CPU-seconds) while a tiny site trains in under one; a test that needs two sites to
# train at once (one held, one on time) says so with its own --max-parallel.
ONE_SLOT = ("--max-parallel", "1")


def sim_cmd(tmp_path: Path, tiny_root: Path, *args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "LUNAFL_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "sim" / "run.py"), "--data", str(tiny_root),
           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), *tiny_args(), *ONE_SLOT, *args]
    return cmd, env


def sim(tmp_path: Path, tiny_root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``sim/run.py`` on the tiny data with the tiny preset and ``args``; fails the test if it fails."""
    cmd, env = sim_cmd(tmp_path, tiny_root, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"sim/run.py failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def sim_killed_after_round(tmp_path: Path, tiny_root: Path, rnd: int, run: str, *args: str,
                           and_file: str = "") -> None:
    """Start a run and SIGKILL it (and its Ray processes) once round ``rnd`` is complete
    (and the results folder has ``and_file``, when named)."""
    import psutil

    cmd, env = sim_cmd(tmp_path, tiny_root, "--run-name", run, *args)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds_file = tmp_path / "runs" / run / "rounds.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if rounds_file.exists() and rnd in {json.loads(x)["round"] for x in rounds_file.read_text().splitlines()} \
                    and (not and_file or (rounds_file.parent / and_file).exists()):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError(f"round {rnd} never completed")
    finally:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)


# ---- the Guard on hand-made replies (no Ray, no network) ----
GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(0, np.int64)}


def reply(node: int, arrays: dict, n: float, error: str | None = None) -> Message:
    ask = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    if error:
        return Message(Error(code=1, reason=error), reply_to=ask)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5}),
                          "site": ConfigRecord({"site": f"site-{node}"})})
    return Message(content, reply_to=ask)


def guard(strategy="fedavg", limits=None, **cfg):
    """A Guard around ``strategy`` for 4 sampled of 5 joined sites, each allowed 1000 examples."""
    from common.config import RunConfig
    from server.guard import Guard
    from server.strategies import make_strategy

    c = RunConfig(strategy=strategy, clients=4, **cfg)
    sites = {k: f"site-{k}" for k in range(1, 6)}
    g = Guard(make_strategy(c, 4), c, GLOBAL, sites, limits or {s: 1000 for s in sites.values()})
    g._log(1).sampled = [f"site-{k}" for k in range(1, 5)]
    return g


def arrays(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
            "n": np.array(seed, np.int64)}
