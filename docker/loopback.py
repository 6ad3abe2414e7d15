"""A whole federation as local processes on loopback: what docker-compose.yml starts,
without Docker. For a rehearsal on one machine, for measurements, and for the tests.

    python docker/loopback.py --out /tmp/fed --sites 2 --scans 8 --test-scans 10 \\
        --run-config 'arch="resnet10" image-size=32 rounds=2 local-epochs=1 batch-size=8 clients=2 workers=1'

Makes certificates and keys (make_certs.py), one synthetic LUNA16 folder per hospital and
one for the server's test set, then starts every role through docker/entrypoint.py, the
script the images run: a SuperLink with TLS, SuperNode authentication and a database;
`register`; one SuperNode per hospital; `run`. Prints the run's wall time and the bytes
per round and site, then stops every process it started. Synthetic data only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRY = DOCKER / "entrypoint.py"
CERTS = DOCKER / "make_certs.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**settings: str) -> dict[str, str]:
    """A container's environment: Flower's tools on PATH, no inherited LUNAFL_* or FLWR_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUNAFL_", "FLWR_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.update(settings)
    return env


def wait_for(what: str, ready: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
             log: Callable[[], str] = lambda: "") -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}:\n{log()[-4000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s\n{log()[-4000:]}")


class Processes:
    """Every process started, each in its own process group; ``stop_all`` ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def entry(self, name: str, role: str, env: dict[str, str]) -> subprocess.Popen:
        return self.start(name, [sys.executable, str(ENTRY), role], env)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """End the process, its group and every descendant: Flower starts SuperExec and the
        app processes in sessions of their own, which a group signal does not reach."""
        import psutil

        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in (proc, *children):
            try:
                p.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


class Federation:
    """Certificates, data and the processes of one loopback federation under ``root``."""

    def __init__(self, root: Path, sites: list[str], procs: Processes | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root, self.sites = root, sites
        self.procs = procs or Processes(root / "logs")
        self.extra_env = dict(extra_env or {})  # added to every process's environment (the tests' hold points)
        self.certs = root / "certs"
        self.state = root / "state"
        self.port = free_port()
        self.data = {site: root / "sites" / site for site in sites}
        self.test_data = root / "sites" / "server-test"

    # ---- preparation ----
    def make_certs(self) -> None:
        subprocess.run([sys.executable, str(CERTS), "federation", "--out", str(self.certs), "--server-name",
                        "superlink", *(a for s in self.sites for a in ("--site", s))], check=True, capture_output=True)

    def make_data(self, scans: int, test_scans: int, seed: int = 100) -> None:
        sys.path.insert(0, str(ROOT))
        from common.data.synthetic import make_dataset

        for i, site in enumerate(self.sites):
            make_dataset(self.data[site], scans, seed=seed + 1 + i, workers=1)
        if test_scans:
            make_dataset(self.test_data, test_scans, seed=seed, workers=1)  # subset9 = the server's test split

    # ---- environments: the settings compose gives each container ----
    def server_env(self, **extra: str) -> dict[str, str]:
        settings = dict(LUNAFL_CERTS=str(self.certs / "superlink"), LUNAFL_STATE=str(self.state),
                        LUNAFL_PORT=str(self.port), LUNAFL_KEYS=str(self.certs / "keys"), LUNAFL_APP=str(ROOT),
                        LUNAFL_TEST_DATA=str(self.test_data) if self.test_data.exists() else "",
                        FLWR_HOME=str(self.state / "flwr-home"))
        return base_env(**{**self.extra_env, **settings, **extra})

    def site_env(self, site: str, **extra: str) -> dict[str, str]:
        folder = self.certs / "sites" / site
        cache = self.root / f"cache-{site}"
        settings = dict(LUNAFL_SITE_NAME=site, LUNAFL_SUPERLINK=f"127.0.0.1:{self.port}",
                        LUNAFL_CA=str(folder / "ca.crt"), LUNAFL_AUTH_KEY=str(folder / "auth.key"),
                        LUNAFL_DATA=str(self.data.get(site, self.data[self.sites[0]])), LUNAFL_CACHE=str(cache),
                        LUNAFL_SUPERNODE_PORT=str(free_port()), FLWR_HOME=str(cache / "flwr-home"))
        return base_env(**{**self.extra_env, **settings, **extra})

    # ---- roles ----
    def health(self, target: str, env: dict[str, str]) -> int:
        return subprocess.run([sys.executable, str(ENTRY), "health", target], env=env, capture_output=True,
                              timeout=30).returncode

    def start_superlink(self) -> None:
        proc = self.procs.entry("superlink", "superlink", self.server_env())
        wait_for("SuperLink health check", lambda: self.health("superlink", self.server_env()) == 0, 90, proc,
                 lambda: self.procs.log("superlink"))

    def register(self, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ENTRY), "register"], env=self.server_env(**extra),
                              capture_output=True, text=True, timeout=120)

    def start_sites(self, *sites: str, connected: bool = False) -> None:
        """Start the hospitals' SuperNodes and wait until each serves its health check; with
        ``connected``, also until each has joined the SuperLink (its log names its node ID)."""
        joined = {site: self.procs.log(site).count("SuperNode ID:") for site in sites}  # logs are appended
        envs = {site: self.site_env(site) for site in sites}
        started = {site: self.procs.entry(site, "supernode", env) for site, env in envs.items()}
        for site, proc in started.items():
            wait_for(f"{site} health check", lambda env=envs[site]: self.health("supernode", env) == 0, 60, proc,
                     lambda site=site: self.procs.log(site))
            if connected:
                wait_for(f"{site} connected", lambda site=site: self.procs.log(site).count("SuperNode ID:")
                         > joined[site], 90, proc, lambda site=site: self.procs.log(site))

    def nodes(self) -> list[dict]:
        proc = subprocess.run(["flwr", "supernode", "ls", "luna", "--format", "json"], env=self.server_env(),
                              capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout)["nodes"]

    def online(self) -> int:
        return sum(n["status"] == "online" for n in self.nodes())

    def run(self, run_config: str, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ENTRY), "run"], env=self.server_env(LUNAFL_RUN_CONFIG=run_config),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        (self.procs.logs / "last-run.log").write_text(proc.stdout + proc.stderr)
        return proc, time.perf_counter() - t0

    def up(self) -> None:
        """SuperLink, registration, every hospital online (what `docker compose up` does)."""
        self.start_superlink()
        reg = self.register()
        if reg.returncode != 0:
            raise RuntimeError(f"register failed:\n{reg.stdout}\n{reg.stderr}")
        self.start_sites(*self.sites)
        wait_for("every hospital online", lambda: self.online() == len(self.sites), 90)

    @property
    def results(self) -> Path:
        return self.state / "runs" / "federation"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(fed: Federation, seconds: float) -> str:
    """The figures of a finished run: wall time and bytes per round and site."""
    rounds = [r for r in rows(fed.results / "rounds.jsonl") if r["round"] > 0]
    events = [e for e in rows(fed.results / "events.jsonl") if e["kind"] == "train"]
    lines = [f"`entrypoint.py run` wall time: {seconds:.1f}s (FAB upload, ServerApp start, data, handshake, "
             f"{len(rounds)} rounds, final evaluation)"]
    for r in rounds:
        sent = {e["site"]: int(e["bytes-sent"]) for e in events if e["round"] == r["round"]}
        lines.append(f"round {r['round']}: {r['wall_seconds']:.1f}s wall, site training {r['site_train_seconds']:.1f}s "
                     f"(sum), server -> sites {r['bytes_down']:,} B, sites -> server {r['bytes_up']:,} B; "
                     f"per site up: {', '.join(f'{s} {b:,} B' for s, b in sorted(sent.items()))}")
    run_id = re.findall(r"run (\d+) completed", (fed.root / "logs" / "last-run.log").read_text(errors="replace")
                        if (fed.root / "logs" / "last-run.log").exists() else "")
    if run_id:  # what Flower itself counted on the wire for the whole run
        proc = subprocess.run(["flwr", "ls", "luna", "--run-id", run_id[-1], "--format", "json"],
                              env=fed.server_env(), capture_output=True, text=True, timeout=60)
        try:
            traffic = json.loads(proc.stdout)["runs"][0]["network-traffic"]
            lines.append(f"Flower's count for run {run_id[-1]}: SuperLink out {traffic['outbound-bytes']:,} B, "
                         f"in {traffic['inbound-bytes']:,} B")
        except (ValueError, KeyError, IndexError):
            pass
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/loopback.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="an empty folder for certificates, data, state and logs")
    p.add_argument("--sites", type=int, default=2, help="number of hospitals (default 2)")
    p.add_argument("--scans", type=int, default=8, help="synthetic scans per hospital (default 8)")
    p.add_argument("--test-scans", type=int, default=10, help="scans of the server's test set (0 = none)")
    p.add_argument("--run-config", default="", help="run settings, 'key=value ...' ([tool.flwr.app.config])")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"loopback.py: error: --out {args.out} is not empty", file=sys.stderr)
        return 2
    sites = [f"hospital-{chr(ord('a') + i)}" for i in range(args.sites)]
    fed = Federation(args.out, sites)
    try:
        fed.make_certs()
        fed.make_data(args.scans, args.test_scans)
        fed.up()
        proc, seconds = fed.run(args.run_config)
        print(proc.stdout[-4000:])
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        print(report(fed, seconds))
        print(f"logs in {fed.procs.logs}; results in {fed.results}")
        return 0
    finally:
        fed.procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
