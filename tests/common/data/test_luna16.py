"""Reading LUNA16: coordinates through the direction matrix, and every bad input named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.data.luna16 import DataError, check_mhd, load_luna16, read_scan


def _write(path: Path, array: np.ndarray, origin, spacing, direction) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=False)
    return path


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),        # identity
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),      # flipped in-plane, as some LUNA16 scans
    (1, 0, 0, 0, 1, 0, 0, 0, -1),       # flipped along z
])
def test_world_to_index_round_trip_matches_simpleitk(tmp_path, direction):
    vol = np.full((20, 30, 40), -800, dtype=np.int16)
    vol[5, 5, 5] = 100
    path = _write(tmp_path / "s.mhd", vol, (-120.5, 33.0, -310.25), (0.7, 0.8, 2.5), direction)
    scan = read_scan(path)
    image = sitk.ReadImage(str(path))
    rng = np.random.default_rng(0)
    for _ in range(20):
        world = np.array(image.TransformContinuousIndexToPhysicalPoint(rng.uniform(0, 19, size=3).tolist()))
        ours = scan.geometry.world_to_index(world)
        theirs = np.array(image.TransformPhysicalPointToContinuousIndex(world.tolist()))
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        np.testing.assert_allclose(scan.geometry.index_to_world(ours), world, atol=1e-6)
    assert scan.array.shape == (20, 30, 40) and scan.array.dtype == np.int16  # [z, y, x]


def test_array_is_z_y_x_and_flipped_geometry_places_a_voxel_right(tmp_path):
    vol = np.full((10, 12, 14), -900, dtype=np.int16)
    vol[2, 3, 4] = 500  # z=2, y=3, x=4
    direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    path = _write(tmp_path / "s.mhd", vol, (10.0, 20.0, 30.0), (1.0, 2.0, 3.0), direction)
    scan = read_scan(path)
    world = np.array([10.0 - 4 * 1.0, 20.0 - 3 * 2.0, 30.0 + 2 * 3.0])  # x and y run backwards
    idx = np.rint(scan.geometry.world_to_index(world)).astype(int)
    assert scan.array[idx[2], idx[1], idx[0]] == 500


def test_missing_raw_is_named(tiny_root, tmp_path):
    mhd = next((tiny_root / "subset0").glob("*.mhd"))
    shutil.copy(mhd, tmp_path / mhd.name)
    with pytest.raises(DataError, match=r"data file .*\.raw is missing"):
        read_scan(tmp_path / mhd.name)


def test_truncated_raw_is_named_with_sizes(tiny_root, tmp_path):
    mhd = next((tiny_root / "subset0").glob("*.mhd"))
    shutil.copy(mhd, tmp_path / mhd.name)
    raw = mhd.with_suffix(".raw").read_bytes()
    (tmp_path / mhd.with_suffix(".raw").name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"\.raw: truncated: \d+ bytes, but DimSize"):
        read_scan(tmp_path / mhd.name)


def test_dimsize_disagreeing_with_data_is_named(tiny_root, tmp_path):
    mhd = next((tiny_root / "subset0").glob("*.mhd"))
    shutil.copy(mhd.with_suffix(".raw"), tmp_path / mhd.with_suffix(".raw").name)
    text = mhd.read_text()
    dims = next(line for line in text.splitlines() if line.startswith("DimSize"))
    x, y, z = dims.split("=")[1].split()
    (tmp_path / mhd.name).write_text(text.replace(dims, f"DimSize = {x} {y} {int(z) - 1}"))
    with pytest.raises(DataError, match="longer than its header says"):
        check_mhd(tmp_path / mhd.name)


def test_random_bytes_are_not_ct(tiny_root, tmp_path):
    mhd = next((tiny_root / "subset0").glob("*.mhd"))
    shutil.copy(mhd, tmp_path / mhd.name)
    n = mhd.with_suffix(".raw").stat().st_size
    (tmp_path / mhd.with_suffix(".raw").name).write_bytes(np.random.default_rng(0).bytes(n))
    with pytest.raises(DataError, match="not CT in Hounsfield units"):
        read_scan(tmp_path / mhd.name)


def _copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_candidate_of_unknown_seriesuid_names_file_and_line(tiny_root, tmp_path):
    root = _copy_root(tiny_root, tmp_path / "luna")
    with open(root / "candidates_V2.csv", "a") as fh:
        fh.write("1.2.3.not.a.scan,1.0,2.0,3.0,0\n")
    n_lines = len((root / "candidates_V2.csv").read_text().splitlines())
    with pytest.raises(DataError, match=rf"candidates_V2.csv:{n_lines}: seriesuid 1.2.3.not.a.scan is not a scan"):
        load_luna16(root)


def test_listed_but_not_downloaded_scans_are_ignored(tiny_root, tmp_path):
    root = _copy_root(tiny_root, tmp_path / "luna")
    shutil.rmtree(root / "subset3")  # a user who has not downloaded subset 3
    luna = load_luna16(root)
    assert all(luna.scans[u].subset != 3 for u in luna.candidates.seriesuid)
    assert len(luna.scans) == 18


def test_csv_with_missing_columns_is_named(tiny_root, tmp_path):
    root = _copy_root(tiny_root, tmp_path / "luna")
    lines = (root / "annotations.csv").read_text().splitlines()
    (root / "annotations.csv").write_text("\n".join(",".join(ln.split(",")[:4]) for ln in lines) + "\n")
    with pytest.raises(DataError, match=r"annotations.csv: missing column\(s\) diameter_mm"):
        load_luna16(root)


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="no subset\\*/<seriesuid>.mhd files found"):
        load_luna16(tmp_path)


def test_older_candidates_file_is_used_when_v2_is_absent(tiny_root, tmp_path):
    root = _copy_root(tiny_root, tmp_path / "luna")
    (root / "candidates_V2.csv").rename(root / "candidates.csv")
    luna = load_luna16(root)
    assert luna.candidates_file.name == "candidates.csv" and len(luna.candidates) > 0
