"""The benchmark script runs on a tiny setting and writes every field (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_bench_quick_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "sim/bench.py", "--quick", "--out", str(out), "--workdir",
                           str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    t = r["throughput"]
    assert t["clientapp_images_per_s"] > 0 and t["plain_loop_images_per_s"] > 0
    # the same model on the same examples: the ClientApp's step is neither far slower nor faster
    assert 0.2 < t["ratio"] < 5 and f"{t['ratio']:.3f}" in proc.stdout
    # --quick: the 3-site scale run sends float16 updates and is the wire section's float16 run
    assert [o["label"] for o in r["overhead"]] == ["demo workload", "3 sites (float16 updates)"]
    for o in r["overhead"]:
        assert 0 <= o["overhead_mean"] < 1 and o["memory"]["peak_pss_gib"] > 0.1
        assert o["bytes_up_per_site_per_round"] > 0 and o["memory"]["per_site_gib"] > 0
    w = r["wire"]
    assert w["float16"]["bytes_up_per_site_per_round"] < 0.6 * w["float32"]["bytes_up_per_site_per_round"]
    assert set(w) == {"float32", "float16"}  # --quick leaves bfloat16 out
    assert w["float16"]["final_test_auc"] == r["overhead"][1]["final_test_auc"]
    assert all(0 <= v["final_test_auc"] <= 1 for v in w.values())
    d = r["dp"]
    for k in ("nodp_fp32", "nodp_amp", "dp_ghost", "dp_hooks", "ratio_dp_ghost_vs_nodp_fp32"):
        assert d[k] > 0
    s = r["dpsignal"]
    assert s["noise_multiplier"] > 0 and s["steps_per_site"] > 0
    for which in ("all", "norms+head"):
        v = s[which]
        assert 0 < v["signal"] <= s["clip"] + 1e-6 and 0 <= v["share_clipped"] <= 1
        assert 0 < v["snr_step"] < v["snr_run"]  # a run of many steps can add up more than one step
    assert s["norms+head"]["weights_trained"] < s["all"]["weights_trained"]
    assert s["norms+head"]["noise"] < s["all"]["noise"]  # noise grows with the weights trained
    c = r["cache"]
    assert c["build_patches_per_s_32px"] > 0 and c["read_vs_train_ratio"] > 0
    assert "available" in r["gpu"]
    assert "ClientApp training step" in proc.stdout
