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
    """Settings small enough for a test: 32 px patches, ResNet-10, 2 sites, 1 round."""
    from common.config import RunConfig

    return RunConfig(data=str(tiny_root), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"),
                     image_size=32, arch="resnet10", clients=2, rounds=1, local_epochs=1, batch_size=8,
                     workers=1, seed=3, node_timeout=60.0)
