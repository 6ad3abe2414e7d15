"""`flwr run .` with a local simulation federation: the Flower App as Flower's CLI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.helpers import ROOT, docker_script, tiny_run_config

free_port = docker_script("loopback").free_port


def test_flwr_run_with_a_local_simulation_federation(tmp_path, tiny_root):
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
        "options.backend.client-resources.num-gpus = 0.0\n")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": bindir + os.pathsep + os.environ["PATH"],
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "LUNAFL_HOME": str(tmp_path / "home"),
           "RAY_worker_niceness": "0"}  # as sim/run.py starts Ray (tests/sim/test_cli.py)
    out = tmp_path / "runs"
    overrides = (f'data="{tiny_root}" cache-dir="{tmp_path / "cache"}" out="{out}" run-name="flwr" '
                 + tiny_run_config(tracking="mlflow"))
    try:
        proc = subprocess.run([str(Path(bindir) / "flwr"), "run", ".", "local", "--stream", "--run-config",
                               overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "flwr" / "summary.json").read_text())
        assert summary["mode"] == "federated" and set(summary["sites"]) == {"site-0", "site-1"}
        rounds = [json.loads(x) for x in (out / "flwr" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["sites_trained"] == 2
        # tracking from the Flower app's run config: the same MLflow run as sim/run.py would write
        import mlflow

        tracked = json.loads((out / "flwr" / "mlflow.json").read_text())
        client = mlflow.MlflowClient(tracked["tracking_uri"])
        auc = sorted((m.step, m.value) for m in client.get_metric_history(tracked["run_id"], "test_roc_auc"))
        assert auc == [(r["round"], r["test_roc_auc"]) for r in rounds]
        assert client.get_run(tracked["run_id"]).info.status == "FINISHED"
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if str(home) in " ".join(p.info["cmdline"] or []):
                for q in [*p.children(recursive=True), p]:
                    try:
                        q.kill()
                    except psutil.NoSuchProcess:
                        pass


def test_the_app_bundle_carries_every_module_of_the_app():
    """Flower builds the FAB a SuperNode runs with its own exclusions (every test_*.py and
    *_test.py): an app module named like a test would be missing at the hospitals and fail
    there only (it happened to common/evaluation/test_split.py)."""
    from flwr.cli.utils import build_pathspec
    from flwr.common.constant import FAB_EXCLUDE_PATTERNS

    excluded = build_pathspec(FAB_EXCLUDE_PATTERNS)
    app = [p.relative_to(ROOT).as_posix() for pkg in ("common", "client", "server", "experiment", "analysis", "sim")
           for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(app) > 40 and not [f for f in app if excluded.match_file(f)]
    assert excluded.match_file("common/evaluation/test_split.py")  # the check sees what Flower leaves out
