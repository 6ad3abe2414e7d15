"""Shared fixtures: a tiny synthetic LUNA16 data set made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

TINY_SCANS = 20  # two per LUNA16 subset: subset 9 (the test split) gets two


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from common.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("data") / "luna"
    make_dataset(root, TINY_SCANS, seed=3, workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("home")
    return home


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path):
    """The tiny preset (tests/helpers.py) as a RunConfig on the tiny data."""
    from common.config import RunConfig
    from tests.helpers import TINY

    return RunConfig(data=str(tiny_root), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"),
                     node_timeout=60.0, **TINY)
