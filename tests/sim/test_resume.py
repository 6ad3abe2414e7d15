"""Resume: a run killed (SIGKILL) after round k and resumed from its checkpoint gives the same
later rounds as an uninterrupted run, every state that must survive included; a resume that
changes the configuration is refused, naming the option."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, rows, sim, sim_killed_after_round


# Two runs carry every state that must survive a resume (each pair of runs costs about a minute):
# the server's optimiser state (FedAdam's moments; FedAvgM's momentum), the sites' privacy
# accountants, the learning-rate schedule, and the sites' own state (Adam's moments, FedBN layers);
# a third the centralized baseline's (its Adam moments, schedule and epoch seeds).
@pytest.mark.parametrize("variant", [("--strategy", "fedadam", "--dp", "local", "--norm", "group", "--dp-epsilon", "6",
                                      "--neg-ratio", "1"),  # DP-SGD's per-example work: fewer examples
                                     ("--strategy", "fedavgm", "--server-momentum", "0.9", "--lr-schedule", "cosine",
                                      "--warmup-passes", "1", "--site-optimizer", "kept", "--fedbn"),
                                     ("--mode", "centralized", "--lr-schedule", "cosine", "--warmup-passes", "1")],
                         ids=["fedadam-moments+dp-accountant", "fedavgm-momentum+schedule+site-state",
                              "centralized-adam+schedule"])
def test_resume_gives_the_same_rounds_as_an_uninterrupted_run(tmp_path, tiny_root, variant):
    common = ("--clients", "2", "--local-epochs", "1", "--rounds", "2", *variant)
    sim(tmp_path, tiny_root, *common, "--run-name", "whole")
    # killed (SIGKILL, no clean-up) once round 1 is complete, then resumed from its checkpoint
    # (FedAdam's moments, or every site's privacy accountant, included)
    sim_killed_after_round(tmp_path, tiny_root, 1, "cut", *common)
    sim(tmp_path, tiny_root, "--resume", str(tmp_path / "runs" / "cut"))
    a = torch.load(tmp_path / "runs" / "whole" / "model_final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "cut" / "model_final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = rows(tmp_path / "runs" / "whole" / "rounds.jsonl"), rows(tmp_path / "runs" / "cut" / "rounds.jsonl")
    assert [r["round"] for r in rb] == [0, 1, 2]  # no round skipped or counted twice
    assert ra[2]["test_roc_auc"] == rb[2]["test_roc_auc"]
    # the resumed run's wall time counts the round its first session completed
    sa, sb = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("whole", "cut"))
    assert sa["resumed_after_round"] == 0 and sa["wall_seconds_all_sessions"] == sa["wall_seconds"]
    assert sb["resumed_after_round"] == 1 and rb[1]["wall_seconds"] > 0
    assert sb["wall_seconds_all_sessions"] == pytest.approx(sb["wall_seconds"] + rb[1]["wall_seconds"])
    if "--dp" in variant:  # each site's accountant continued where it stopped: same spend, same steps
        for site in ("site-0", "site-1"):
            la = json.loads((tmp_path / "runs" / "whole" / "site_state" / f"{site}.privacy.json").read_text())
            lb = json.loads((tmp_path / "runs" / "cut" / "site_state" / f"{site}.privacy.json").read_text())
            assert la["history"] == lb["history"] and la["rounds"] == lb["rounds"] == [1, 2]
        assert rb[2]["dp_epsilon_max"] == pytest.approx(6.0, abs=0.05)
    if "--site-optimizer" in variant:  # each site read its round-1 state in round 2, in both runs
        for name in ("whole", "cut"):
            kept = sorted(p.name for p in (tmp_path / "runs" / name / "site_state").iterdir())
            assert kept == [f"{s}.round-{r:04d}.pt" for s in ("site-0", "site-1") for r in (1, 2)], kept
        st = torch.load(tmp_path / "runs" / "cut" / "site_state" / "site-0.round-0002.pt", weights_only=True)
        assert st["optimizer"]["state"] and "bn1.running_var" in st["norms"]
        # Adam's step count went on from round 1 instead of restarting at zero
        steps = {int(v["step"]) for v in st["optimizer"]["state"].values()}
        st1 = torch.load(tmp_path / "runs" / "cut" / "site_state" / "site-0.round-0001.pt", weights_only=True)
        assert steps == {2 * int(v["step"]) for v in st1["optimizer"]["state"].values()}


def test_resume_with_a_different_config_is_a_clear_error(tmp_path, finished_runs):
    run = tmp_path / "x"
    shutil.copytree(finished_runs.runs / "fed", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    env = {**os.environ, "LUNAFL_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(ROOT / "sim" / "run.py"), "--resume", str(run),
                           "--lr", "0.5"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "cannot resume with a different configuration" in proc.stderr and "--lr" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the folder is left as it was


def test_central_dp_accounts_each_round_resumes_its_accountant_and_the_run_can_be_audited(tmp_path, tiny_root):
    common = ("--clients", "2", "--local-epochs", "1", "--rounds", "2", "--strategy", "fedavg", "--dp", "central",
              "--norm", "group", "--dp-noise", "0.8", "--dp-clip", "5", "--dp-delta", "0.01")
    # killed once round 1 is complete, resumed: round 1's spend comes from the first session's
    # accountant, round 2's from the restored one (an accountant restarted at zero would give round
    # 2 the spend of one mechanism, below the bound of two)
    sim_killed_after_round(tmp_path, tiny_root, 1, "cut", *common)
    sim(tmp_path, tiny_root, "--resume", str(tmp_path / "runs" / "cut"))
    rb = rows(tmp_path / "runs" / "cut" / "rounds.jsonl")
    assert [r["round"] for r in rb] == [0, 1, 2]
    classic_of = {}
    for k in (1, 2):
        # client-level DP, every site in every round, no sampling: k Gaussian mechanisms of multiplier
        # 0.8, RDP k * a / (2 * 0.8^2) at order a; Balle et al.'s conversion (Flower searches fractional
        # orders too, so it may be a little lower) and the classic one (never exceeded)
        best = min(k * a / (2 * 0.8 ** 2) + math.log1p(-1 / a) - (math.log(0.01) + math.log(a)) / (a - 1)
                   for a in range(2, 256))
        classic = min(k * a / (2 * 0.8 ** 2) - math.log(0.01) / (a - 1) for a in range(2, 256))
        eps = rb[k]["dp_central_epsilon"]
        assert best * 0.9 <= eps <= classic * 1.0001, (k, eps, best, classic)
        classic_of[k] = classic
    # round 2 spent on top of round 1
    assert rb[1]["dp_central_epsilon"] <= classic_of[1] * 1.0001 < rb[2]["dp_central_epsilon"]
    privacy = json.loads((tmp_path / "runs" / "cut" / "summary.json").read_text())["privacy"]
    assert privacy["epsilon"] == pytest.approx(rb[2]["dp_central_epsilon"], rel=1e-9)
    # the membership-inference audit of the finished run, as a user runs it
    env = {**os.environ, "LUNAFL_HOME": str(tmp_path / "home")}
    audit = subprocess.run([sys.executable, str(ROOT / "sim" / "audit.py"), str(tmp_path / "runs" / "cut"),
                            "--max-per-group", "60"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert audit.returncode == 0, audit.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "cut" / "audit.json").read_text())
    assert 0.0 <= result["attack_auc_ci95"][0] <= result["attack_auc"] <= result["attack_auc_ci95"][1] <= 1.0
    assert result["n_members"] == result["n_non_members"] > 0
    assert f"attack ROC-AUC {result['attack_auc']:.3f}" in audit.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "sim" / "audit.py"), str(tmp_path / "nothing")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
