"""Sites: whole scans (patients) assigned to N hospitals, plus a held-out test split.

No patient is in two sites, none in both training and test; each site keeps a share of
its own patients for local validation. Partitioners:

- ``subset``: LUNA16's ten subsets as natural sites (subset j -> site j mod N; with more
  sites than subsets a subset is split by patient);
- ``iid``: patients shuffled and dealt round-robin;
- ``dirichlet``: label and quantity skew; scans are binned by how many positive
  candidates they hold and each bin is spread over sites with Dirichlet(alpha) shares;
- ``scanner``: by the scanner that made the scan (``scan_metadata.csv``), the realistic
  feature shift between hospitals (merged or split to make N sites).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanInfo:
    seriesuid: str
    subset: int
    positives: int
    candidates: int
    scanner: str = ""


@dataclass
class Site:
    name: str
    train: list[str]
    val: list[str]
    group: str = ""  # the subset(s) or scanner behind the site, for the summary


@dataclass
class SitePlan:
    partition: str
    seed: int
    sites: list[Site]
    test: list[str]
    settings: dict = field(default_factory=dict)

    def site(self, partition_id: int) -> Site:
        if not 0 <= partition_id < len(self.sites):
            raise ValueError(f"partition-id {partition_id} is outside this plan's {len(self.sites)} sites")
        return self.sites[partition_id]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SitePlan:
        return cls(d["partition"], d["seed"], [Site(**s) for s in d["sites"]], list(d["test"]), d.get("settings", {}))

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> SitePlan:
        return cls.from_json(json.loads(Path(path).read_text()))

    def check(self) -> None:
        """Raise if any patient is in two sites or in a site and the test split."""
        seen: dict[str, str] = {}
        for s in self.sites:
            for uid in s.train + s.val:
                if uid in seen:
                    raise AssertionError(f"patient {uid} is in {seen[uid]} and {s.name}")
                seen[uid] = s.name
        leaked = set(seen) & set(self.test)
        if leaked:
            raise AssertionError(f"{len(leaked)} test patient(s) also train at a site, e.g. {sorted(leaked)[0]}")


def make_plan(scans: list[ScanInfo], n_sites: int, partition: str, *, seed: int = 0, alpha: float = 0.5,
              test_subsets: tuple[int, ...] = (9,), val_fraction: float = 0.2) -> SitePlan:
    """Assign every scan outside ``test_subsets`` to one of ``n_sites`` sites."""
    scans = sorted(scans, key=lambda s: s.seriesuid)
    test = [s.seriesuid for s in scans if s.subset in test_subsets]
    pool = [s for s in scans if s.subset not in test_subsets]
    if not test:
        raise ValueError(f"no scans in the test subset(s) {list(test_subsets)}; choose --test-subsets that exist "
                         "(a hospital checking its own folder needs no test split: sim/prepare.py --site NAME)")
    if len(pool) < n_sites:
        raise ValueError(f"{len(pool)} training scans cannot make {n_sites} sites; "
                         "lower --clients or add scans (--synthetic-scans)")
    rng = np.random.default_rng([seed, 11])
    if partition == "iid":
        groups = _iid(pool, n_sites, rng)
    elif partition == "subset":
        groups = _by_key(pool, n_sites, rng, lambda s: f"subset{s.subset}")
    elif partition == "scanner":
        missing = [s.seriesuid for s in pool if not s.scanner]
        if missing:
            raise ValueError(f"--partition scanner needs each scan's scanner from scan_metadata.csv "
                             f"(seriesuid,scanner columns) in the data root; {len(missing)} scan(s) have "
                             f"none, e.g. {missing[0]}")
        groups = _by_key(pool, n_sites, rng, lambda s: s.scanner)
    elif partition == "dirichlet":
        groups = _dirichlet(pool, n_sites, alpha, rng)
    else:
        raise ValueError(f"--partition {partition!r}: choose subset, iid, dirichlet or scanner")
    split = []
    for label, members in groups:
        uids = [s.seriesuid for s in members]
        rng.shuffle(uids)
        n_val = int(round(len(uids) * val_fraction)) if len(uids) >= 2 else 0
        n_val = max(1, n_val) if len(uids) >= 2 else 0
        split.append((label, sorted(uids[n_val:]), sorted(uids[:n_val])))
    # Largest training set first: the simulation engine hands sites to its workers in
    # partition order, so the longest jobs start first and the parallel slots finish
    # together (a balanced epoch's size follows the number of positives).
    pos = {s.seriesuid: s.positives for s in scans}
    split.sort(key=lambda t: (-sum(pos[u] for u in t[1]), -len(t[1])))
    sites = [Site(f"site-{k}", train, val, label) for k, (label, train, val) in enumerate(split)]
    plan = SitePlan(partition, seed, sites, test, {"alpha": alpha, "test_subsets": list(test_subsets),
                                                   "val_fraction": val_fraction})
    plan.check()
    return plan


def _iid(pool: list[ScanInfo], n: int, rng: np.random.Generator) -> list[tuple[str, list[ScanInfo]]]:
    order = rng.permutation(len(pool))
    return [("iid", [pool[i] for i in order[k::n]]) for k in range(n)]


def _by_key(pool: list[ScanInfo], n: int, rng: np.random.Generator, key) -> list[tuple[str, list[ScanInfo]]]:
    by: dict[str, list[ScanInfo]] = {}
    for s in pool:
        by.setdefault(key(s), []).append(s)
    names = sorted(by, key=lambda g: (-len(by[g]), g))
    if n <= len(names):
        # Merge groups: deal them, largest first, to the currently smallest site.
        sites: list[tuple[list[str], list[ScanInfo]]] = [([], []) for _ in range(n)]
        for g in names:
            tgt = min(range(n), key=lambda k: (len(sites[k][1]), k))
            sites[tgt][0].append(g)
            sites[tgt][1].extend(by[g])
        return [("+".join(sorted(labels)), members) for labels, members in sites]
    # Split groups: each group gets sites in proportion to its size (at least one).
    counts = {g: 1 for g in names}
    for _ in range(n - len(names)):
        g = max(names, key=lambda g: (len(by[g]) / counts[g], g))
        counts[g] += 1
    out = []
    for g in names:
        members = [by[g][i] for i in rng.permutation(len(by[g]))]
        if len(members) < counts[g]:
            raise ValueError(f"group {g} has {len(members)} scans but would be split over {counts[g]} sites; "
                             "lower --clients")
        for k in range(counts[g]):
            out.append((f"{g} ({k + 1}/{counts[g]})", members[k::counts[g]]))
    return out


def _dirichlet(pool: list[ScanInfo], n: int, alpha: float, rng: np.random.Generator
               ) -> list[tuple[str, list[ScanInfo]]]:
    bins = np.array([min(s.positives, 7) // 3 + (s.positives > 0) for s in pool])  # 0, 1-2, 3-5, 6+
    for _attempt in range(200):
        members: list[list[ScanInfo]] = [[] for _ in range(n)]
        for b in np.unique(bins):
            idx = rng.permutation(np.flatnonzero(bins == b))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                members[k].extend(pool[i] for i in part)
        if min(len(m) for m in members) >= 2:
            return [(f"dirichlet(alpha={alpha})", m) for m in members]
    raise ValueError(f"--alpha {alpha} with {n} sites leaves a site with fewer than 2 scans after 200 tries; "
                     "raise --alpha or lower --clients")


def scan_infos(seriesuid: np.ndarray, subset: np.ndarray, label: np.ndarray,
               metadata: dict[str, dict[str, str]] | None = None) -> list[ScanInfo]:
    """Per-scan counts from candidate arrays (cache index or candidate table)."""
    metadata = metadata or {}
    out = []
    uids, inverse = np.unique(seriesuid.astype(str), return_inverse=True)
    pos = np.bincount(inverse, weights=label.astype(float), minlength=len(uids)).astype(int)
    cnt = np.bincount(inverse, minlength=len(uids))
    sub = np.zeros(len(uids), dtype=int)
    sub[inverse] = subset
    for i, uid in enumerate(uids):
        out.append(ScanInfo(str(uid), int(sub[i]), int(pos[i]), int(cnt[i]), metadata.get(uid, {}).get("scanner", "")))
    return out


def summary_rows(plan: SitePlan, infos: list[ScanInfo]) -> list[dict]:
    by = {s.seriesuid: s for s in infos}

    def row(name: str, group: str, split: str, uids: list[str]) -> dict:
        pos = sum(by[u].positives for u in uids)
        cand = sum(by[u].candidates for u in uids)
        return {"site": name, "group": group, "split": split, "scans": len(uids), "candidates": cand,
                "positives": pos, "negatives": cand - pos}

    rows = []
    for s in plan.sites:
        rows.append(row(s.name, s.group, "train", s.train))
        rows.append(row(s.name, s.group, "val", s.val))
    rows.append(row("test", "held out", "test", plan.test))
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = ["site", "group", "split", "scans", "candidates", "positives", "negatives"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def save_summary(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
