"""Reading LUNA16 exactly as it lies on disk (and our synthetic data, which has the same format).

Layout: ``subset0..subset9/<seriesuid>.mhd|.raw`` (MetaImage, int16 HU),
``annotations.csv`` (seriesuid,coordX,coordY,coordZ,diameter_mm), ``candidates_V2.csv``
(or the older ``candidates.csv``; seriesuid,coordX,coordY,coordZ,class),
``annotations_excluded.csv`` and ``seriesuids.csv`` when present, ``seg-lungs-LUNA16/``
optional. Coordinates in the CSVs are world millimetres (x, y, z).

Arrays are [z, y, x] (``sitk.GetArrayFromImage``); origin, spacing and direction are
(x, y, z). World-to-voxel conversion uses the direction matrix: LUNA16 holds scans with
identity and with flipped TransformMatrix, and ``(world - origin) / spacing`` is only
right for the former.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUBSET_RE = re.compile(r"^subset(\d)$")
ELEMENT_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4,
                 "MET_INT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8}
# Real CT lies in about -1024..3071 HU; scanners pad outside the field of view with values
# down to -3024. Voxels far outside this range in bulk mean the file is not CT.
HU_PLAUSIBLE = (-3100.0, 5000.0)
HU_MAX_IMPLAUSIBLE_SHARE = 0.01

CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels lie in world space (all in x, y, z order)."""

    origin: np.ndarray  # (3,) mm
    spacing: np.ndarray  # (3,) mm
    direction: np.ndarray  # (3, 3), columns are the directions of the index axes

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) voxel index of world points ``(..., 3)``, direction-aware."""
        rel = np.asarray(world, dtype=np.float64) - self.origin
        # physical = origin + D @ (spacing * index)  =>  index = (D^-1 @ rel) / spacing
        return (rel @ np.linalg.inv(self.direction).T) / self.spacing

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """World (x, y, z) mm of continuous voxel indices ``(..., 3)`` in (x, y, z) order."""
        return self.origin + (np.asarray(index, dtype=np.float64) * self.spacing) @ self.direction.T


@dataclass(frozen=True)
class CTScan:
    seriesuid: str
    array: np.ndarray  # int16 HU, [z, y, x]
    geometry: Geometry
    path: Path


@dataclass(frozen=True)
class ScanRef:
    seriesuid: str
    subset: int
    path: Path  # the .mhd file


@dataclass
class CandidateTable:
    """Candidates as parallel arrays (754,975 rows for LUNA16: lists of objects would be slow)."""

    seriesuid: np.ndarray  # str
    xyz: np.ndarray  # (N, 3) float64 world mm
    label: np.ndarray  # (N,) int8

    def __len__(self) -> int:
        return len(self.label)

    def select(self, mask: np.ndarray) -> CandidateTable:
        return CandidateTable(self.seriesuid[mask], self.xyz[mask], self.label[mask])


@dataclass(frozen=True)
class Nodule:
    seriesuid: str
    xyz: tuple[float, float, float]
    diameter_mm: float


@dataclass
class Luna16:
    """Everything in a LUNA16 root except the voxels, which :func:`read_scan` loads on demand."""

    root: Path
    scans: dict[str, ScanRef]
    candidates: CandidateTable
    annotations: list[Nodule]
    excluded: list[Nodule]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # scan_metadata.csv rows
    candidates_file: Path | None = None

    def scan_ids(self) -> list[str]:
        return sorted(self.scans)


# --------------------------------------------------------------------------------------
# MetaImage headers and volumes
# --------------------------------------------------------------------------------------
def read_mhd_header(path: Path) -> dict[str, str]:
    """Parse a MetaImage header into ``{key: value}`` (a DataError names the file if malformed)."""
    path = Path(path)
    try:
        text = path.read_text(errors="strict")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a MetaImage header (binary content)") from None
    header: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise DataError(f"{path}:{lineno}: not a MetaImage header line: {line[:60]!r}")
        key, value = line.split("=", 1)
        header[key.strip()] = value.strip()
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise DataError(f"{path}: MetaImage header lacks {key}")
    return header


def check_mhd(path: Path) -> dict[str, str]:
    """Check that a ``.mhd`` header and its data file agree before SimpleITK reads them.

    SimpleITK reports a truncated ``.raw`` as "No such file or directory" and loads a
    too-long one silently; both are named here with the sizes involved.
    """
    path = Path(path)
    header = read_mhd_header(path)
    dims = [int(v) for v in header["DimSize"].split()]
    if len(dims) != int(header["NDims"]) or len(dims) != 3 or min(dims) < 1:
        raise DataError(f"{path}: DimSize {header['DimSize']!r} is not a 3-D size")
    etype = header["ElementType"]
    if etype not in ELEMENT_BYTES:
        raise DataError(f"{path}: unsupported ElementType {etype}")
    data_name = header["ElementDataFile"]
    if data_name == "LOCAL":
        return header
    data_path = path.parent / data_name
    if not data_path.exists():
        raise DataError(f"{path}: its data file {data_path.name} is missing (expected at {data_path})")
    compressed = header.get("CompressedData", "False").lower() == "true"
    if not compressed:
        expected = int(np.prod(dims)) * ELEMENT_BYTES[etype] + max(0, int(header.get("HeaderSize", "0")))
        actual = data_path.stat().st_size
        if actual != expected:
            what = "truncated" if actual < expected else "longer than its header says"
            raise DataError(f"{data_path}: {what}: {actual} bytes, but DimSize {header['DimSize']} "
                            f"of {etype} in {path.name} needs {expected}")
    return header


def read_scan(path: Path, seriesuid: str | None = None) -> CTScan:
    """Read one CT volume as int16 HU [z, y, x] with its geometry; DataError on bad input."""
    import SimpleITK as sitk

    path = Path(path)
    check_mhd(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DataError(f"{path}: SimpleITK cannot read it: {first}") from None
    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3-D volume, got {image.GetDimension()}-D")
    array = sitk.GetArrayFromImage(image)
    if array.dtype != np.int16:
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path}: voxel type {array.dtype} is not numeric")
        array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    geometry = Geometry(np.array(image.GetOrigin(), dtype=np.float64),
                        np.array(image.GetSpacing(), dtype=np.float64),
                        np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    if np.any(geometry.spacing <= 0):
        raise DataError(f"{path}: non-positive ElementSpacing {tuple(geometry.spacing)}")
    d = geometry.direction
    if not np.allclose(d @ d.T, np.eye(3), atol=1e-3):
        raise DataError(f"{path}: TransformMatrix {tuple(d.ravel())} is not orthonormal")
    check_hu(array, path)
    return CTScan(seriesuid or path.stem, array, geometry, path)


def check_hu(array: np.ndarray, path: Path) -> None:
    """Raise DataError when the voxel values cannot be CT in Hounsfield units."""
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    bad = np.mean((sample < HU_PLAUSIBLE[0]) | (sample > HU_PLAUSIBLE[1]))
    if bad > HU_MAX_IMPLAUSIBLE_SHARE:
        raise DataError(f"{path}: {bad:.0%} of voxels lie outside {HU_PLAUSIBLE[0]:.0f}..{HU_PLAUSIBLE[1]:.0f} "
                        "HU; this is not CT in Hounsfield units (corrupt or random data?)")
    if np.all(sample == sample[0]):
        raise DataError(f"{path}: every voxel has the value {sample[0]}; the volume is empty")


# --------------------------------------------------------------------------------------
# CSV files
# --------------------------------------------------------------------------------------
def read_csv_rows(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` after checking the header has ``columns``."""
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found "
                            f"{', '.join(found) or 'no header'}; expected {', '.join(columns)}")
        yield from enumerate(reader, 2)


def _float(path: Path, lineno: int, row: dict[str, str], key: str) -> float:
    try:
        value = float(row[key])
    except (TypeError, ValueError):
        raise DataError(f"{path}:{lineno}: {key} {row.get(key)!r} is not a number") from None
    if not np.isfinite(value):
        raise DataError(f"{path}:{lineno}: {key} is {value}")
    return value


def read_candidates(path: Path) -> CandidateTable:
    uids, xyz, labels = [], [], []
    for lineno, row in read_csv_rows(path, CANDIDATE_COLUMNS):
        uids.append(row["seriesuid"])
        xyz.append((_float(path, lineno, row, "coordX"), _float(path, lineno, row, "coordY"),
                    _float(path, lineno, row, "coordZ")))
        label = row["class"].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}:{lineno}: class {label!r} must be 0 or 1")
        labels.append(int(label))
    return CandidateTable(np.array(uids, dtype=object), np.array(xyz, dtype=np.float64).reshape(-1, 3),
                          np.array(labels, dtype=np.int8))


def read_nodules(path: Path) -> list[Nodule]:
    out = []
    for lineno, row in read_csv_rows(path, ANNOTATION_COLUMNS):
        xyz = tuple(_float(path, lineno, row, k) for k in ("coordX", "coordY", "coordZ"))
        out.append(Nodule(row["seriesuid"], xyz, _float(path, lineno, row, "diameter_mm")))  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------------------
# The whole data set
# --------------------------------------------------------------------------------------
def discover_scans(root: Path) -> dict[str, ScanRef]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a LUNA16 root with subset0..subset9/)")
    scans: dict[str, ScanRef] = {}
    for sub in sorted(root.iterdir()):
        m = SUBSET_RE.match(sub.name)
        if not (m and sub.is_dir()):
            continue
        for mhd in sorted(sub.glob("*.mhd")):
            uid = mhd.stem
            if uid in scans:
                raise DataError(f"{mhd}: seriesuid {uid} also lies in {scans[uid].path.parent}")
            scans[uid] = ScanRef(uid, int(m.group(1)), mhd)
    if not scans:
        raise DataError(f"{root}: no subset*/<seriesuid>.mhd files found; expected LUNA16's layout "
                        "(subset0..subset9 holding .mhd/.raw pairs). Make synthetic data with "
                        "`python sim/make_data.py --out DIR`.")
    return scans


def load_luna16(root: Path | str) -> Luna16:
    """Index a LUNA16 root: scans on disk, candidates, annotations; check they agree."""
    root = Path(root)
    scans = discover_scans(root)
    cand_path = root / "candidates_V2.csv"
    if not cand_path.exists():
        cand_path = root / "candidates.csv"
    if not cand_path.exists():
        raise DataError(f"{root}: neither candidates_V2.csv nor candidates.csv found")
    candidates = read_candidates(cand_path)
    ann_path = root / "annotations.csv"
    if not ann_path.exists():
        raise DataError(f"{root}: annotations.csv not found")
    annotations = read_nodules(ann_path)
    exc_path = root / "annotations_excluded.csv"
    excluded = read_nodules(exc_path) if exc_path.exists() else []

    listed: set[str] = set()
    uid_path = root / "seriesuids.csv"
    if uid_path.exists():
        with open(uid_path) as fh:
            listed = {line.strip().split(",")[0] for line in fh if line.strip()}
    on_disk = np.isin(candidates.seriesuid, np.array(list(scans), dtype=object))
    if not on_disk.all():
        unknown = sorted(set(candidates.seriesuid[~on_disk]))
        not_listed = [u for u in unknown if u not in listed]
        if not_listed:
            lineno = int(np.flatnonzero(candidates.seriesuid == not_listed[0])[0]) + 2
            raise DataError(f"{cand_path}:{lineno}: seriesuid {not_listed[0]} is not a scan under {root}"
                            f" ({len(not_listed)} such seriesuid(s)); candidates must refer to scans in "
                            "subset*/ (or to scans listed in seriesuids.csv that are not downloaded)")
        log.warning("%d scan(s) listed in seriesuids.csv are not on disk; their %d candidates are ignored",
                    len(unknown), int((~on_disk).sum()))
        candidates = candidates.select(on_disk)
    annotations = [a for a in annotations if a.seriesuid in scans]
    excluded = [a for a in excluded if a.seriesuid in scans]

    metadata: dict[str, dict[str, str]] = {}
    meta_path = root / "scan_metadata.csv"
    if meta_path.exists():
        for _, row in read_csv_rows(meta_path, ("seriesuid",)):
            metadata[row["seriesuid"]] = row
    log.info("LUNA16 at %s: %d scans, %d candidates (%d positive), %d nodules, %d excluded findings",
             root, len(scans), len(candidates), int(candidates.label.sum()), len(annotations), len(excluded))
    return Luna16(root, scans, candidates, annotations, excluded, metadata, cand_path)
