"""The patch cache: decode every CT volume once, then read patches from a memory map.

Layout of one cache (a folder named by its key):
``patches.u8`` (raw uint8, N x 3 x S x S, memory-mappable), ``index.csv`` (row,
seriesuid, subset, coordX, coordY, coordZ, label) and ``meta.json`` (settings, counts,
skipped scans). The key hashes the preprocessing settings and the data set's identity,
so changing the window or the size makes a new cache.

Offset copies (``--augment-offsets K``): every positive candidate is also cut K times at a
true 3D offset (uniform in a ball of ``--augment-offset-mm``), its three planes re-read from the
volume, so training sees a nodule off the patch centre as a candidate detector's error leaves
it. The in-plane roll of the augmentation moves all three planes alike, which is no 3D shift: a
small nodule leaves the coronal and sagittal planes of a truly offset patch, never of a rolled
one. The copies sit after the candidates in ``patches.u8`` and are listed in ``copies.csv``
(row, of_row, dx, dy, dz); only training reads them (:mod:`common.data.loaders`).

Atomicity: a cache is built in ``<key>.tmp-<pid>`` and renamed into place only when
complete; a folder without a complete ``meta.json`` or with a patch file of the wrong
size is never trusted and gets rebuilt.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json, publish_dir
from common.data.luna16 import DataError, Luna16, read_scan
from common.data.patches import PatchSpec, extract

log = logging.getLogger(__name__)
INDEX_COLUMNS = ("row", "seriesuid", "subset", "coordX", "coordY", "coordZ", "label")
COPY_COLUMNS = ("row", "of_row", "dx", "dy", "dz")


@dataclass
class PatchCache:
    """An opened cache: the index as arrays, the patches as a read-only memory map."""

    path: Path
    spec: PatchSpec
    seriesuid: np.ndarray  # (N,) object
    subset: np.ndarray  # (N,) int16
    xyz: np.ndarray  # (N, 3) float64
    label: np.ndarray  # (N,) int8
    row: np.ndarray  # (N,) int64, row in the patch file
    patches: np.ndarray  # memmap (rows, 3, S, S) uint8
    meta: dict
    # offset copies of positives: for index position p, file rows copy_rows[copy_start[p]:copy_start[p + 1]]
    copy_rows: np.ndarray | None = None
    copy_start: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Patches at file rows (a copy; one sorted gather on the memory map)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.patches.shape[1:]), dtype=np.uint8)
        out[order] = self.patches[rows[order]]
        return out

    def rows_of(self, scan_ids: set[str] | list[str]) -> np.ndarray:
        """Positions (into the index) of every candidate of the given scans."""
        return np.flatnonzero(np.isin(self.seriesuid, np.array(sorted(scan_ids), dtype=object)))

    def get(self, positions: np.ndarray) -> np.ndarray:
        """Patches at index positions (a copy; sorted reads are faster on a memory map)."""
        return self.read_rows(self.row[positions])

    def scan_ids(self) -> list[str]:
        return sorted(set(self.seriesuid.tolist()))


def dataset_fingerprint(luna: Luna16) -> dict:
    """What identifies the data set's content cheaply: file names, sizes and mtimes."""
    h = hashlib.sha256()
    for uid in luna.scan_ids():
        ref = luna.scans[uid]
        raw = ref.path.with_suffix(".raw")
        st = (raw if raw.exists() else ref.path).stat()
        h.update(f"{uid}:{ref.subset}:{st.st_size}:{st.st_mtime_ns};".encode())
    assert luna.candidates_file is not None
    h.update(hashlib.sha256(luna.candidates_file.read_bytes()).digest())
    return {"root": str(luna.root.resolve()), "files": h.hexdigest()[:16], "scans": len(luna.scans)}


def cache_key(luna: Luna16, spec: PatchSpec, max_neg_per_scan: int = 0, seed: int = 0, offset_copies: int = 0,
              offset_mm: float = 3.0) -> str:
    d = {"data": dataset_fingerprint(luna), "spec": spec.key(), "max_neg": max_neg_per_scan,
         "seed": seed if max_neg_per_scan else 0}
    if offset_copies:  # a cache without copies keeps the key it always had
        d["offsets"] = [offset_copies, float(offset_mm)]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def open_cache(path: Path) -> PatchCache:
    """Open a complete cache; DataError if it is incomplete or damaged."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{path}: not a complete patch cache (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise DataError(f"{meta_path}: cache marked incomplete")
    spec = PatchSpec(**{k: meta["spec"][k] for k in ("size", "fov_mm", "hu_min", "hu_max")})
    rows_total = int(meta["rows_total"])
    shape = (rows_total, 3, spec.size, spec.size)
    pfile = path / "patches.u8"
    expected = int(np.prod(shape))
    if not pfile.exists() or pfile.stat().st_size != expected:
        got = pfile.stat().st_size if pfile.exists() else 0
        raise DataError(f"{pfile}: {got} bytes, expected {expected}; the cache is damaged")
    patches = np.memmap(pfile, dtype=np.uint8, mode="r", shape=shape)
    uids, subs, xyz, labels, rows = [], [], [], [], []
    with open(path / "index.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            rows.append(int(rec["row"]))
            uids.append(rec["seriesuid"])
            subs.append(int(rec["subset"]))
            xyz.append((float(rec["coordX"]), float(rec["coordY"]), float(rec["coordZ"])))
            labels.append(int(rec["label"]))
    if len(rows) != int(meta["rows_valid"]):
        raise DataError(f"{path / 'index.csv'}: {len(rows)} rows, meta.json says {meta['rows_valid']}")
    row = np.array(rows, dtype=np.int64)
    copy_rows = copy_start = None
    if meta.get("offset_copies"):
        copy_rows, copy_start = _open_copies(path, meta, row, rows_total)
    return PatchCache(path, spec, np.array(uids, dtype=object), np.array(subs, dtype=np.int16),
                      np.array(xyz, dtype=np.float64).reshape(-1, 3), np.array(labels, dtype=np.int8),
                      row, patches, meta, copy_rows, copy_start)


def _open_copies(path: Path, meta: dict, row: np.ndarray, rows_total: int) -> tuple[np.ndarray, np.ndarray]:
    """copies.csv as file rows grouped by index position (CSR: copy_rows, copy_start)."""
    of_pos = np.full(rows_total, -1, dtype=np.int64)
    of_pos[row] = np.arange(len(row))
    with open(path / "copies.csv", newline="") as fh:
        recs = [(int(r["row"]), int(r["of_row"])) for r in csv.DictReader(fh)]
    if len(recs) != int(meta["copies_valid"]):
        raise DataError(f"{path / 'copies.csv'}: {len(recs)} rows, meta.json says {meta['copies_valid']}")
    c_rows = np.array([r for r, _ in recs], dtype=np.int64)
    of_rows = np.array([o for _, o in recs], dtype=np.int64)
    if ((of_rows < 0) | (of_rows >= rows_total) | (c_rows < len(row)) | (c_rows >= rows_total)).any() or (
            of_pos[of_rows] < 0).any():
        raise DataError(f"{path / 'copies.csv'}: a copy names a row outside the cache; the cache is damaged")
    c_pos = of_pos[of_rows]
    order = np.argsort(c_pos, kind="stable")
    start = np.searchsorted(c_pos[order], np.arange(len(row) + 1))
    return c_rows[order], start.astype(np.int64)


def offsets_in_ball(rng: np.random.Generator, n: int, radius_mm: float) -> np.ndarray:
    """``n`` offsets (mm; x, y, z) uniform in a ball of ``radius_mm``."""
    v = rng.normal(size=(n, 3))
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v * radius_mm * rng.random((n, 1)) ** (1 / 3)


def _select_rows(luna: Luna16, max_neg_per_scan: int, seed: int) -> np.ndarray:
    """Candidate rows to cache: all, or all positives plus a seeded sample of negatives per scan."""
    if max_neg_per_scan <= 0:
        return np.arange(len(luna.candidates))
    keep = []
    rng = np.random.default_rng(seed)
    uids = luna.candidates.seriesuid
    order = np.argsort(uids, kind="stable")
    bounds = np.flatnonzero(np.r_[True, uids[order][1:] != uids[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[a:b]
        pos = rows[luna.candidates.label[rows] == 1]
        neg = rows[luna.candidates.label[rows] == 0]
        if len(neg) > max_neg_per_scan:
            neg = rng.choice(neg, max_neg_per_scan, replace=False)
        keep.extend(pos.tolist() + neg.tolist())
    return np.sort(np.array(keep, dtype=np.int64))


def _build_scan(job: tuple) -> tuple[str, str | None, int]:
    """Worker: read one scan and write its patches into the shared patch file."""
    uid, mhd, first_row, centres, pfile, shape, spec, copy_first, copy_centres = job
    try:
        scan = read_scan(Path(mhd), uid)
        patches = extract(scan, np.concatenate([centres, copy_centres]), spec)
    except DataError as exc:
        return uid, str(exc), 0
    except Exception as exc:  # noqa: BLE001 - reported per scan, by name, to the caller
        return uid, f"{mhd}: {type(exc).__name__}: {exc}", 0
    mm = np.memmap(pfile, dtype=np.uint8, mode="r+", shape=shape)
    mm[first_row: first_row + len(centres)] = patches[:len(centres)]
    mm[copy_first: copy_first + len(copy_centres)] = patches[len(centres):]
    mm.flush()
    del mm
    return uid, None, len(patches)


def _clean_stale(root: Path) -> None:
    for tmp in root.glob("*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            log.info("removing an unfinished cache build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def build_cache(luna: Luna16, spec: PatchSpec, cache_root: Path | str, *, workers: int = 1,
                on_bad_scan: str = "skip", max_neg_per_scan: int = 0, seed: int = 0, offset_copies: int = 0,
                offset_mm: float = 3.0, progress: bool = True) -> PatchCache:
    """Open the cache for these settings, building it first if needed; ``offset_copies`` K > 0
    also cuts every positive K times at a seeded offset within ``offset_mm`` (the module docstring)."""
    if on_bad_scan not in ("skip", "fail"):
        raise ValueError(f"--on-bad-scan {on_bad_scan!r}: choose skip or fail")
    if offset_copies < 0 or (offset_copies and offset_mm <= 0):
        raise ValueError(f"--augment-offsets {offset_copies} / --augment-offset-mm {offset_mm}: need K >= 0 and, "
                         "with copies, a radius > 0")
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    key = cache_key(luna, spec, max_neg_per_scan, seed, offset_copies, offset_mm)
    final = cache_root / key
    if final.exists():
        try:
            cache = open_cache(final)
            log.info("patch cache hit: %s (%d patches)", final, len(cache))
            return cache
        except DataError as exc:
            log.warning("%s; rebuilding it", exc)
            shutil.rmtree(final)
    _clean_stale(cache_root)

    rows = _select_rows(luna, max_neg_per_scan, seed)
    cand = luna.candidates
    uids = cand.seriesuid[rows]
    order = np.argsort(uids, kind="stable")
    rows = rows[order]  # grouped by scan: each scan writes one contiguous block
    tmp = cache_root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pfile = tmp / "patches.u8"
    # offset copies of the positives, after all candidates, grouped by scan in the same order
    copy_of = np.repeat(np.flatnonzero(cand.label[rows] == 1), offset_copies)  # file rows of the originals
    # drawn from K alone, not the run's seed: the key does not hold the seed, so the content must not depend on it
    copy_offsets = offsets_in_ball(np.random.default_rng([offset_copies, 20261207]), len(copy_of), offset_mm)
    shape = (len(rows) + len(copy_of), 3, spec.size, spec.size)
    with open(pfile, "wb") as fh:
        fh.truncate(int(np.prod(shape)))
    jobs, first = [], {}
    start = 0
    uids_sorted = cand.seriesuid[rows]
    boundaries = np.flatnonzero(np.r_[True, uids_sorted[1:] != uids_sorted[:-1], True])
    for a, b in zip(boundaries[:-1], boundaries[1:], strict=True):
        uid = uids_sorted[a]
        first[uid] = (a, b)
        ca, cb = np.searchsorted(copy_of, [a, b])  # this scan's copies
        centres = cand.xyz[rows[copy_of[ca:cb]]] + copy_offsets[ca:cb]
        jobs.append((uid, str(luna.scans[uid].path), int(a), cand.xyz[rows[a:b]], str(pfile), shape, spec,
                     len(rows) + int(ca), centres))
        start = b
    assert start == len(rows)

    t0 = time.time()
    bad: dict[str, str] = {}
    done = 0
    bar = _progress(len(jobs), progress, "caching patches")
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                futures = [pool.submit(_build_scan, j) for j in jobs]
                for fut in as_completed(futures):
                    uid, err, n = fut.result()
                    done += n
                    _after_scan(uid, err, bad, on_bad_scan, bar, done, t0)
        else:
            for j in jobs:
                uid, err, n = _build_scan(j)
                done += n
                _after_scan(uid, err, bad, on_bad_scan, bar, done, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    seconds = time.time() - t0

    with open(tmp / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        for pos, r in enumerate(rows):
            uid = cand.seriesuid[r]
            if uid in bad:
                continue
            x, y, z = cand.xyz[r]
            w.writerow([pos, uid, luna.scans[uid].subset, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", int(cand.label[r])])
    n_copies = 0
    if offset_copies:
        with open(tmp / "copies.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(COPY_COLUMNS)
            for k, (of, (dx, dy, dz)) in enumerate(zip(copy_of, copy_offsets, strict=True)):
                if cand.seriesuid[rows[of]] not in bad:
                    w.writerow([len(rows) + k, int(of), repr(float(dx)), repr(float(dy)), repr(float(dz))])
                    n_copies += 1
    n_valid = int(sum(b - a for uid, (a, b) in first.items() if uid not in bad))
    meta = {
        "complete": True, "key": key, "spec": spec.key(), "data": dataset_fingerprint(luna),
        "max_neg_per_scan": max_neg_per_scan, "rows_total": len(rows) + len(copy_of), "rows_valid": n_valid,
        "offset_copies": offset_copies, "offset_mm": float(offset_mm) if offset_copies else 0.0,
        "copies_valid": n_copies,
        "scans": len(jobs) - len(bad), "skipped_scans": bad, "build_seconds": round(seconds, 2),
        "patches_per_second": round(done / max(seconds, 1e-9), 1),
    }
    atomic_write_json(tmp / "meta.json", meta)
    publish_dir(tmp, final)  # False: another process finished the same cache first; use theirs
    log.info("patch cache built: %s (%d patches%s from %d scans in %.1fs, %.0f patches/s; %d scan(s) skipped)",
             final, n_valid, f" + {n_copies} offset copies of the positives" if offset_copies else "",
             len(jobs) - len(bad), seconds, meta["patches_per_second"], len(bad))
    return open_cache(final)


def _after_scan(uid: str, err: str | None, bad: dict[str, str], on_bad_scan: str, bar, done: int,
                t0: float) -> None:
    if err is not None:
        if on_bad_scan == "fail":
            raise DataError(f"scan {uid} cannot be used (--on-bad-scan fail): {err}")
        log.warning("skipping scan %s: %s", uid, err)
        bad[uid] = err
    bar.update(1)
    bar.set_postfix_str(f"{done / max(time.time() - t0, 1e-9):.0f} patches/s")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="scan", disable=None if enabled else True, dynamic_ncols=True)
