"""Sites never share a patient, and no test patient trains anywhere."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.partition import ScanInfo, SitePlan, make_plan


def _scans(n: int, seed: int = 0) -> list[ScanInfo]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [ScanInfo(f"uid{i:04d}", i % 10, int(rng.integers(0, 9)), 40, f"vendor-{'ABCD'[i % 4]}")
            for i in range(n)]


def _all_train(plan: SitePlan) -> list[str]:
    return [u for s in plan.sites for u in s.train + s.val]


@settings(max_examples=60, deadline=None)
@given(n_scans=st.integers(40, 160), n_sites=st.integers(1, 12), seed=st.integers(0, 10_000),
       partition=st.sampled_from(["iid", "subset", "scanner", "dirichlet"]))
def test_partitions_never_leak_patients(n_scans, n_sites, seed, partition):
    scans = _scans(n_scans, seed)
    try:
        plan = make_plan(scans, n_sites, partition, seed=seed, alpha=1.0)
    except ValueError as exc:  # only for skew that cannot give every site two scans
        assert partition == "dirichlet" and "raise --alpha" in str(exc)
        return
    train = _all_train(plan)
    assert len(train) == len(set(train))  # no patient in two sites (or twice in one)
    assert not set(train) & set(plan.test)  # none in both train and test
    assert set(plan.test) == {s.seriesuid for s in scans if s.subset == 9}
    assert set(train) | set(plan.test) == {s.seriesuid for s in scans}  # nobody dropped
    assert len(plan.sites) == n_sites
    assert all(s.train for s in plan.sites)


def test_subset_partition_uses_luna16_subsets_as_sites():
    plan = make_plan(_scans(90), 9, "subset")
    for site in plan.sites:
        subsets = {int(u[3:]) % 10 for u in site.train + site.val}
        assert len(subsets) == 1  # one subset per site when sites == subsets


def test_subset_partition_splits_subsets_by_patient_when_there_are_more_sites():
    plan = make_plan(_scans(90), 18, "subset")
    assert len(plan.sites) == 18
    assert all(len({int(u[3:]) % 10 for u in s.train + s.val}) == 1 for s in plan.sites)


def test_scanner_partition_groups_by_scanner():
    plan = make_plan(_scans(80), 4, "scanner")
    by = {s.seriesuid: s.scanner for s in _scans(80)}
    for site in plan.sites:
        assert len({by[u] for u in site.train + site.val}) == 1


def test_scanner_partition_without_metadata_is_a_clear_error():
    scans = [ScanInfo(f"u{i}", i % 10, 1, 10) for i in range(30)]
    with pytest.raises(ValueError, match="scan_metadata.csv"):
        make_plan(scans, 2, "scanner")


def test_dirichlet_skews_labels_more_with_smaller_alpha():
    import numpy as np

    scans = _scans(400, 1)
    pos = {s.seriesuid: s.positives for s in scans}

    def spread(alpha: float) -> float:
        plan = make_plan(scans, 5, "dirichlet", alpha=alpha, seed=2)
        rates = [np.mean([pos[u] for u in s.train + s.val]) for s in plan.sites]
        return float(np.std(rates))

    assert spread(0.3) > spread(100.0)


def test_plan_is_deterministic_and_round_trips(tmp_path):
    a = make_plan(_scans(60), 4, "iid", seed=5)
    b = make_plan(_scans(60), 4, "iid", seed=5)
    assert a.to_json() == b.to_json()
    a.save(tmp_path / "sites.json")
    assert SitePlan.load(tmp_path / "sites.json").to_json() == a.to_json()


def test_too_many_sites_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot make 100 sites"):
        make_plan(_scans(40), 100, "iid")
