"""The data commands as a user types them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def run(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "LUNAFL_HOME": str(env_home)})


def test_make_data_then_prepare(tmp_path):
    out = tmp_path / "luna"
    p = run("sim/make_data.py", "--out", str(out), "--scans", "12", "--seed", "5", env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (out / "candidates_V2.csv").exists() and (out / "seriesuids.csv").exists()
    again = run("sim/make_data.py", "--out", str(out), "--scans", "12", "--seed", "5", env_home=tmp_path)
    assert again.returncode == 0  # same settings: reused, not remade
    clash = run("sim/make_data.py", "--out", str(out), "--scans", "13", "--seed", "5", env_home=tmp_path)
    assert clash.returncode == 2 and "choose another --out" in clash.stderr
    p = run("sim/prepare.py", "--data", str(out), "--cache", str(tmp_path / "cache"), "--workers", "2",
            "--clients", "2", "--image-size", "16", env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "site-0" in p.stdout and "site-1" in p.stdout and "held out" in p.stdout
    assert "patches/s" in p.stdout


def test_prepare_names_a_bad_data_folder(tmp_path):
    p = run("sim/prepare.py", "--data", str(tmp_path), "--cache", str(tmp_path / "c"), env_home=tmp_path)
    assert p.returncode == 2 and "no subset*/<seriesuid>.mhd files found" in p.stderr
    p = run("sim/run.py", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), env_home=tmp_path)
    assert p.returncode == 2 and "no such folder" in p.stderr
    p = run("sim/run.py", "--strategy", "fedsgd", env_home=tmp_path)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_a_hospital_checks_its_own_folder_which_has_no_test_split(tmp_path):
    out = tmp_path / "ours"
    assert run("sim/make_data.py", "--out", str(out), "--scans", "8", "--seed", "6", env_home=tmp_path).returncode == 0
    assert not list(out.glob("subset9/*.mhd"))  # eight scans: subsets 0-7, no test split
    common = ("--data", str(out), "--cache", str(tmp_path / "cache"), "--image-size", "16", "--workers", "1")
    p = run("sim/prepare.py", *common, env_home=tmp_path)
    assert p.returncode == 2 and "no scans in the test subset(s) [9]" in p.stderr and "--site" in p.stderr
    p = run("sim/prepare.py", *common, "--site", "hospital-a", env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "site:  hospital-a" in p.stdout
    train = int(p.stdout.split("training: ")[1].split(" scans")[0])
    val = int(p.stdout.split("validation: ")[1].split(" scans")[0])
    assert (train, val) == (6, 2)  # eight patients, --val-fraction 0.2, split by patient


def test_a_run_without_ray_address_starts_its_own_ray_instead_of_joining_one_left_running():
    """Plain ray.init() joins the cluster that the last `ray start` on this machine left running;
    sim/run.py asks for a new local instance unless --ray-address names one."""
    from common.config import RunConfig
    from sim.run import backend_config

    own, slots = backend_config(RunConfig(clients=3, max_parallel=1), verbose=False)
    assert own["init_args"]["address"] == "local" and own["init_args"]["num_cpus"] == 1 and slots == 1
    assert own["client_resources"] == {"num_cpus": 1, "num_gpus": 0}
    assert own["init_args"]["_system_config"] == {"worker_niceness": 0}  # the sites at the user's priority


def test_simulated_sites_run_at_the_users_priority():
    """Ray's default runs workers at niceness 15: beside any other work of the same login session
    (a second run, the other test worker) the sites starved. The local instance sim/run.py starts
    runs them at niceness 0; checked on a real actor of that instance."""
    import ray

    from common.config import RunConfig
    from sim.run import backend_config

    backend, _ = backend_config(RunConfig(clients=2, max_parallel=1), verbose=False)
    ray.init(**backend["init_args"])
    try:
        @ray.remote(**backend["client_resources"])
        class Site:
            def niceness(self) -> int:
                return os.nice(0)

        assert ray.get(Site.remote().niceness.remote(), timeout=120) == os.nice(0)  # this process's own, 0 as a rule
    finally:
        ray.shutdown()
