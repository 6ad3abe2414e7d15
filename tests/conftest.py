"""Shared fixtures: the tiny synthetic LUNA16 data set and two finished tiny runs, each made
once per test session, and the order tests are handed to pytest-xdist's workers.

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml; ``-n 0`` runs it in one
process). What the session makes once is made once for all workers: the first worker to need it
makes it under a file lock in the folder the workers share, the others wait and read it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one compute thread per process (and per process it starts), else
    # the threads of both workers' torch spin against each other (a 4 s test took 35 s)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

TINY_SCANS = 20  # two per LUNA16 subset: subset 9 (the test split) gets two

# The longest test files first (pytest-xdist hands each worker whole files, in this order), so
# that no long file starts last on one worker while the other idles. Seconds: one worker, idle
# 2-core machine, 2026-12-06. The other files follow in pytest's order.
SLOW_FIRST = (
    "tests/docker/test_deployment.py",  # ~300: one loopback federation shared by the module
    "tests/sim/test_faults.py",  # ~210, of which ~50 waiting out a slow site's deadlines
    "tests/sim/test_resume.py",  # ~210
    "tests/analysis/test_report.py",  # ~180
    "tests/sim/test_simulation.py",  # ~170
    "tests/experiment/test_tracking.py",  # ~140
    "tests/sim/test_bench.py",  # ~120
    "tests/sim/test_flwr_run.py",  # ~30
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: pytest's order within a file and among the rest


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this session sees (the session's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def made_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """``(folder, exists)`` under a lock held across workers: make the folder when it does not exist."""
    from filelock import FileLock

    folder = shared_dir(tmp_path_factory) / name
    with FileLock(str(folder) + ".lock"):
        yield folder, (folder / ".done").exists()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from common.data.synthetic import make_dataset

    with made_once(tmp_path_factory, "data") as (folder, done):
        if not done:
            make_dataset(folder / "luna", TINY_SCANS, seed=3, workers=2)
            (folder / ".done").touch()
    return folder / "luna"


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path):
    """The tiny preset (tests/helpers.py) as a RunConfig on the tiny data."""
    from common.config import RunConfig
    from tests.helpers import TINY

    return RunConfig(data=str(tiny_root), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"),
                     node_timeout=60.0, **TINY)


@pytest.fixture(scope="session")
def finished_runs(tiny_root, tmp_path_factory) -> SimpleNamespace:
    """Two finished runs of the tiny preset with every other setting at its default, as a user
    makes them: ``fed`` (2 sites x 2 rounds of 1 local epoch) and ``central`` (the pooled
    baseline, 2 epochs). Many tests read them; none may write into them (copy first).

    ``.runs`` is their ``--out`` folder; ``.stdout[name]`` / ``.stderr[name]`` what each printed.
    """
    from tests.helpers import sim

    with made_once(tmp_path_factory, "finished") as (tmp, done):
        if not done:
            for name, extra in (("central", ["--mode", "centralized"]), ("fed", [])):
                p = sim(tmp, tiny_root, "--clients", "2", "--local-epochs", "1", "--rounds", "2", *extra,
                        "--run-name", name, timeout=900)
                (tmp / f"{name}.stdout").write_text(p.stdout)
                (tmp / f"{name}.stderr").write_text(p.stderr)
            (tmp / ".done").touch()
    names = ("central", "fed")
    return SimpleNamespace(runs=tmp / "runs", stdout={n: (tmp / f"{n}.stdout").read_text() for n in names},
                           stderr={n: (tmp / f"{n}.stderr").read_text() for n in names})
