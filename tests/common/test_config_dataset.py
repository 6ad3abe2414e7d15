"""The one config (CLI, Flower run config, pyproject) and the balanced training epochs."""

from __future__ import annotations

import argparse
import json
import tomllib

import numpy as np
import pytest

from common.config import RunConfig, add_arguments, from_args
from common.data.loaders import augment, balanced_positions, epoch_size, train_loader
from tests.helpers import ROOT


def test_pyproject_app_config_lists_every_setting_with_its_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    table.pop("resume")
    assert RunConfig.from_dict(table) == RunConfig()
    assert set(table) == set(RunConfig().to_flat())


def test_cli_round_trip_and_bad_values_are_named():
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = from_args(p.parse_args(["--clients", "3", "--no-augment", "--strategy", "fedprox", "--lr", "0.01"]))
    assert (cfg.clients, cfg.augment, cfg.strategy, cfg.lr) == (3, False, "fedprox", 0.01)
    assert RunConfig.from_json(cfg.to_json()) == cfg
    assert RunConfig.from_dict(cfg.to_flat()) == cfg
    with pytest.raises(ValueError, match="--hu-min"):
        RunConfig(hu_min=500, hu_max=400)
    with pytest.raises(ValueError, match="--dp local needs --norm group"):
        RunConfig(dp="local")
    with pytest.raises(ValueError, match="--momentum"):
        RunConfig(optimizer="sgd", momentum=1.0)
    with pytest.raises(ValueError, match="unknown setting"):
        RunConfig.from_dict({"learning-rate": 1})
    with pytest.raises(SystemExit):
        p.parse_args(["--strategy", "fedsgd"])


def test_balanced_epoch_draws_fresh_negatives(tiny_cfg):
    from common.data.prepare import prepare

    prep = prepare(tiny_cfg, progress=False)
    cache = prep.cache
    pos = cache.rows_of(prep.plan.sites[0].train)
    rng = np.random.default_rng(0)
    a = balanced_positions(cache, pos, 2.0, rng)
    b = balanced_positions(cache, pos, 2.0, rng)
    n_pos = int(cache.label[pos].sum())
    assert int(cache.label[a].sum()) == n_pos  # every positive, every epoch
    assert (cache.label[a] == 0).sum() == min(2 * n_pos, (cache.label[pos] == 0).sum())
    assert set(a[cache.label[a] == 0]) != set(b[cache.label[b] == 0])  # fresh negatives
    assert epoch_size(cache, pos, 2.0) == len(a)
    loader = train_loader(cache, pos, batch_size=4, neg_ratio=2.0, augment=True, seed=1)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype.is_floating_point
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_augmentation_keeps_shape_and_content():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, size=(6, 3, 16, 16), dtype=np.uint8)
    out = augment(batch, rng, max_shift=2)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    # flips and rotations keep the histogram; small shifts change it only at the border
    for a, b in zip(batch, out, strict=True):
        assert abs(float(a.mean()) - float(b.mean())) < 12


def test_augment_shift_mm_moves_a_centred_nodule_off_centre_but_keeps_it_in_the_patch():
    """--augment-shift-mm is millimetres on the cache's own scale: 3 mm is today's size // 16
    pixels at 48 mm; 12 mm moves a centred blob by up to 16 of 64 pixels, never out of the patch."""
    from common.data.loaders import shift_pixels
    from common.data.patches import PatchSpec

    spec = PatchSpec()
    assert spec.size == 64 and shift_pixels(spec, 3.0) == 4 == 64 // 16
    assert shift_pixels(spec, 12.0) == 16 and shift_pixels(spec, 0.0) == 0 and shift_pixels(spec, 0.1) == 1
    blob = np.zeros((1, 3, 64, 64), np.uint8)
    blob[:, :, 30:34, 30:34] = 255  # a 4-pixel nodule at the centre
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(300):
        out = augment(blob, rng, max_shift=shift_pixels(spec, 12.0))[0, 1]
        ys, xs = np.nonzero(out == 255)
        assert len(ys) == 16  # the whole nodule still in the patch, label still true
        offsets.append(max(abs(ys.mean() - 31.5), abs(xs.mean() - 31.5)))
    assert max(offsets) == 16 and np.mean(offsets) > 6  # off centre, by up to 12 mm
    with pytest.raises(ValueError, match="--augment-shift-mm must be in"):
        RunConfig(augment_shift_mm=24.0)


def test_augment_scanner_blurs_z_along_the_rows_of_coronal_and_sagittal_only_and_adds_noise():
    """--augment-scanner: a thicker slice blurs the rows (z) of the coronal and sagittal planes,
    never the axial plane or the columns; a softer kernel blurs in-plane; noise and calibration
    change the grey values; p = 0 leaves a patch as it was; a training loader with it draws
    different patches from the same seed, labels unchanged; it needs --augment."""
    from common.data.loaders import ScannerVariation
    from common.data.patches import PatchSpec

    spec = PatchSpec()
    rng = np.random.default_rng(0)
    rows = np.full((3, 64, 64), 40, np.uint8)
    rows[:, 32, :] = 200  # a line along the columns: only a blur along the rows spreads it
    cols = np.full((3, 64, 64), 40, np.uint8)
    cols[:, :, 32] = 200  # a line along the rows
    thick = ScannerVariation(p=1.0, kernel_mm=0.0, slice_mm=2.0, noise_hu=0.0, gain=0.0, offset_hu=0.0)
    spread = []
    for _ in range(20):
        out = thick.apply(rows, rng, spec)
        assert np.array_equal(out[0], rows[0])  # axial plane: no z in it
        spread.append(int(out[1, 31, 5]) - 40)  # the row next to the line
        assert out[1, 31, 5] == out[2, 31, 5] and out[1, 32, 5] <= 200
        assert np.array_equal(thick.apply(cols, rng, spec)[1:], cols[1:])  # columns are x or y
    assert min(spread) >= 0 and max(spread) > 20
    soft = ScannerVariation(p=1.0, kernel_mm=1.0, slice_mm=0.0, noise_hu=0.0, gain=0.0, offset_hu=0.0)
    assert max(int(soft.apply(cols, rng, spec)[0, 5, 31]) for _ in range(10)) > 60  # in-plane blur
    noisy = ScannerVariation(p=1.0, kernel_mm=0.0, slice_mm=0.0, noise_hu=30.0, gain=0.0, offset_hu=0.0)
    sds = [float(noisy.apply(rows, rng, spec)[:, :20].std()) * 1400 / 255 for _ in range(30)]
    assert 0 < min(sds) and max(sds) < 30.5 and max(sds) > 20  # noise up to 30 HU
    assert np.array_equal(ScannerVariation(p=0.0).apply(rows, rng, spec), rows)
    assert np.array_equal(augment(rows[None], np.random.default_rng(3), 0),
                          augment(rows[None], np.random.default_rng(3), 0, None))
    with pytest.raises(ValueError, match="--augment-scanner needs --augment"):
        RunConfig(augment=False, augment_scanner=True)


def test_a_loader_with_scanner_variation_changes_patches_not_labels(tiny_cfg):
    from common.data.loaders import ScannerVariation
    from common.data.prepare import prepare

    prep = prepare(tiny_cfg, progress=False)
    pos = prep.cache.rows_of(prep.plan.sites[0].train)
    plain = train_loader(prep.cache, pos, batch_size=8, neg_ratio=2.0, augment=True, seed=1)
    varied = train_loader(prep.cache, pos, batch_size=8, neg_ratio=2.0, augment=True, seed=1,
                          scanner=ScannerVariation(p=1.0))
    (xa, ya), (xb, yb) = next(iter(plain)), next(iter(varied))
    assert np.array_equal(ya.numpy(), yb.numpy())
    assert xa.shape == xb.shape and not np.array_equal(xa.numpy(), xb.numpy())


def test_every_setting_has_one_concern_and_a_hospital_reads_only_what_it_receives():
    import ast
    from dataclasses import fields

    from common.config import GROUPS, SITE_SETTINGS, RunConfig

    names = [f.name for f in fields(RunConfig)]
    grouped = [n for members in GROUPS.values() for n in members]
    assert sorted(grouped) == sorted(names)  # each setting in exactly one group
    # the code a hospital runs (client/ and the common/ modules it calls) reads no other setting
    hospital = [*ROOT.glob("client/*.py"), *ROOT.glob("common/training/*.py"), *ROOT.glob("common/privacy/*.py"),
                ROOT / "common/data/loaders.py", ROOT / "common/data/prepare.py"]
    read = set()
    for path in hospital:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg" \
                    and node.attr in names and path.name != "prepare.py":
                read.add((path.name, node.attr))
    outside = sorted((f, a) for f, a in read if a not in SITE_SETTINGS)
    assert not outside, outside
    cfg = RunConfig(inject="site-1:nan", tracking="mlflow", partition="scanner", lr=0.01)
    sent = json.loads(cfg.for_site())
    assert set(sent) == set(SITE_SETTINGS) and sent["lr"] == 0.01
    assert not {"inject", "fail_prob", "tracking", "partition", "data", "out"} & set(sent)


def test_sites_and_the_centralized_baseline_train_on_the_runs_own_epoch(tiny_cfg):
    """One builder of a training epoch from the run's settings (``training_epoch``): every
    augmentation setting reaches a site and the centralized baseline alike (a baseline that
    built its own loader once trained without --augment-scanner while the sites had it)."""
    import re

    from common.data.loaders import training_epoch
    from common.data.prepare import prepare
    from tests.helpers import ROOT

    prep = prepare(tiny_cfg, progress=False)
    pos = prep.cache.rows_of(prep.plan.sites[0].train)
    ds = training_epoch(tiny_cfg.replace(augment_scanner=True, augment_shift_mm=6.0), prep.cache, pos, 1).dataset
    assert ds.scanner is not None and ds.augment and ds.max_shift == 4  # 6 mm at 32 px over 48 mm
    assert training_epoch(tiny_cfg, prep.cache, pos, 1).dataset.scanner is None
    for path in ("client/site.py", "experiment/centralized.py"):
        src = (ROOT / path).read_text()
        assert "training_epoch(cfg" in src and not re.search(r"\btrain_loader\(", src), path
