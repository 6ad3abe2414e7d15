"""Faults and attacks through the real simulation engine (Flower on Ray)."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.helpers import rows, sim


def rejected(tmp_path, name) -> dict[str, str]:
    return {e["site"]: e["reason"] for e in rows(tmp_path / "runs" / name / "events.jsonl") if e["kind"] == "rejected"}


def final(tmp_path, name):
    return torch.load(tmp_path / "runs" / name / "model_final.pt", weights_only=True)["model"]


def test_bad_updates_are_rejected_and_the_global_model_is_the_honest_aggregate(tmp_path, tiny_root):
    base = ("--clients", "6", "--rounds", "1", "--local-epochs", "1", "--min-fit-clients", "2")
    bad = {"site-2": "nan", "site-3": "shape", "site-4": "missing", "site-5": "inflate"}
    sim(tmp_path, tiny_root, *base, "--inject", ",".join(f"{s}:{k}" for s, k in bad.items()), "--run-name", "bad")
    # the reference: the same four sites simply crash, so only site-0 and site-1 count
    sim(tmp_path, tiny_root, *base, "--inject", ",".join(f"{s}:crash" for s in bad), "--run-name", "ref")
    ref, got = final(tmp_path, "ref"), final(tmp_path, "bad")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    r = rows(tmp_path / "runs" / "bad" / "rounds.jsonl")[1]
    assert r["rejected_sites"] == sorted(bad) and r["sites_trained"] == 2
    reasons = rejected(tmp_path, "bad")
    assert "NaN or Inf" in reasons["site-2"] and "shape" in reasons["site-3"]
    assert "missing" in reasons["site-4"] and "exceeds the site's training partition" in reasons["site-5"]


ROUND_S = 25  # the honest sites train a tiny model in a few seconds, also on a loaded machine


def test_a_slow_site_is_left_out_of_the_round_and_stops_at_the_deadline(tmp_path, tiny_root):
    proc = sim(tmp_path, tiny_root, "--clients", "3", "--rounds", "2", "--local-epochs", "1",
               "--inject", "site-1:slow", "--round-timeout", str(ROUND_S), "--run-name", "slow",
               "--max-parallel", "2")  # the honest sites train beside the stalled one
    rs = rows(tmp_path / "runs" / "slow" / "rounds.jsonl")
    assert [r["round"] for r in rs] == [0, 1, 2]
    for r in rs[1:]:
        assert r["failed_sites"] == ["site-1"] and r["sites_trained"] == 2
        # the round closed at its timeout: site-1 cannot finish before it (it stalls until the
        # deadline has passed), and had it run on it would still be training
        assert r["train_phase_seconds"] < ROUND_S + 18
    assert "[site site-1] did not reply in time" in proc.stderr or "passed the round deadline" in proc.stderr


def test_random_failures_are_named_and_the_federation_completes(tmp_path, tiny_root):
    sim(tmp_path, tiny_root, "--clients", "4", "--rounds", "3", "--local-epochs", "1", "--fail-prob", "0.3",
        "--min-fit-clients", "1", "--run-name", "flaky")
    run = tmp_path / "runs" / "flaky"
    rs = rows(run / "rounds.jsonl")
    assert [r["round"] for r in rs] == [0, 1, 2, 3]
    failures = [e for e in rows(run / "events.jsonl") if e["kind"] == "failure"]
    assert failures and all("simulated failure" in e["reason"] for e in failures)
    assert sum(len(r["failed_sites"]) for r in rs[1:]) == len([e for e in failures if e["phase"] == "train"])
    assert np.isfinite(json.loads((run / "summary.json").read_text())["test"]["metrics"]["roc_auc"])


def test_poisoning_hurts_fedavg_and_the_median_resists(tmp_path, tiny_root):
    # the aggregate as the strategy made it, running statistics included: no re-estimation at the sites;
    # one round of four sites, one of them attacking
    base = ("--clients", "4", "--rounds", "1", "--local-epochs", "1", "--bn-stats", "averaged")
    sim(tmp_path, tiny_root, *base, "--run-name", "clean")
    sim(tmp_path, tiny_root, *base, "--inject", "site-3:signflip", "--run-name", "avg")
    sim(tmp_path, tiny_root, *base, "--inject", "site-3:signflip", "--strategy", "fedmedian", "--run-name", "med")

    def dist(name):  # how far the attacked global model is from the clean one
        a, b = final(tmp_path, "clean"), final(tmp_path, name)
        return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)

    assert dist("med") < 0.5 * dist("avg")
    loss = {n: rows(tmp_path / "runs" / n / "rounds.jsonl")[-1]["test_loss"] for n in ("clean", "avg", "med")}
    # the averaged model's test loss is higher, or not even finite (one attacker of four, x10)
    assert np.isfinite(loss["clean"]) and np.isfinite(loss["med"]) and not loss["avg"] <= loss["med"]


def test_the_rehearsal_app_serves_every_message_the_hospitals_app_serves():
    """sim/run.py runs sim/faults.py's app: a handler missing there would fail in simulation only."""
    from client.app import app as hospital
    from sim.faults import app as rehearsal

    def handlers(app):
        return set(app._registered_funcs)  # Flower 1.41 keeps the handlers by message type

    assert handlers(rehearsal) == handlers(hospital) and "evaluate.bnstats" in handlers(hospital)
