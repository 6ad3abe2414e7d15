"""The server's roles: the SuperLink, key registration and the federated run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .settings import SITE_NAME, DeployError, Settings, key_values, private_key, readable_file, writable_dir

SERVER_OWNED = ("federation", "out", "run-name", "cache-dir", "resume", "data")  # set here, not by LUNAFL_RUN_CONFIG
CONNECTION = "luna"  # the SuperLink connection name in $FLWR_HOME/config.toml


def superlink_command(s: Settings, demo_insecure: bool = False) -> list[str]:
    """SuperLink with TLS, SuperNode authentication and its state in a database file.

    ``--isolation subprocess``: the SuperLink starts a SuperExec that runs each ServerApp as
    a subprocess in the same container (with the project's torch), reaching the Runtime API
    on loopback.
    """
    cmd = ["flower-superlink", "--host", s["LUNAFL_HOST"], "--port", s["LUNAFL_PORT"],
           "--database", str(s.path("LUNAFL_STATE") / "superlink.db"), "--isolation", "subprocess",
           "--disable-runtime-dependency-installation"]
    if demo_insecure:
        return [*cmd, "--insecure"]
    certs = s.path("LUNAFL_CERTS")
    return [*cmd, "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--enable-supernode-auth"]


def flwr_config_toml(s: Settings, demo_insecure: bool = False) -> str:
    """The `flwr` CLI's connection to the SuperLink, from inside the server container."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps('127.0.0.1:' + s['LUNAFL_PORT'])}"]
    if demo_insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(s.path('LUNAFL_CERTS') / 'ca.crt'))}")
    return "\n".join(lines) + "\n"


def write_flwr_config(s: Settings, env: Mapping[str, str], demo_insecure: bool) -> Path:
    from common.atomic import atomic_write_text

    path = Path(env["FLWR_HOME"]) / "config.toml"
    atomic_write_text(path, flwr_config_toml(s, demo_insecure))
    return path


def register_command(public_key: Path) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key), CONNECTION, "--name", public_key.stem,
            "--format", "json"]


def results_dir(s: Settings) -> Path:
    return s.path("LUNAFL_STATE") / "runs" / s["LUNAFL_RUN_NAME"]


def run_config(s: Settings) -> str:
    """The run's settings: the operator's LUNAFL_RUN_CONFIG plus what this deployment fixes
    (deployment mode, where results and caches go, auto-resume)."""
    pairs = key_values("LUNAFL_RUN_CONFIG", s["LUNAFL_RUN_CONFIG"])
    for key, _ in pairs:
        if key in SERVER_OWNED:
            raise DeployError(f"LUNAFL_RUN_CONFIG sets {key!r}, which the server container fixes; use "
                              f"{'LUNAFL_TEST_DATA' if key == 'data' else 'LUNAFL_RUN_NAME/LUNAFL_STATE'} instead")
    if not SITE_NAME.match(s["LUNAFL_RUN_NAME"]):
        raise DeployError(f"LUNAFL_RUN_NAME={s['LUNAFL_RUN_NAME']!r}: use letters, digits, '.', '_' or '-'")
    state = s.path("LUNAFL_STATE")
    fixed = {"federation": "deployment", "out": str(state / "runs"), "run-name": s["LUNAFL_RUN_NAME"],
             "cache-dir": str(state / "cache"), "data": s["LUNAFL_TEST_DATA"]}
    if s["LUNAFL_AUTO_RESUME"] == "1" and (results_dir(s) / "config.json").exists():
        fixed["resume"] = str(results_dir(s))
    return " ".join([*(f"{k}={v}" for k, v in pairs), *(f"{k}={json.dumps(v)}" for k, v in fixed.items())])


def run_command(s: Settings) -> list[str]:
    return ["flwr", "run", s["LUNAFL_APP"], CONNECTION, "--stream", "--run-config", run_config(s)]


def check(role: str, s: Settings, demo_insecure: bool) -> None:
    """The server roles' settings and mounts (superlink, register, run)."""
    if role == "run":
        run_config(s)  # the operator's settings first: the most likely mistake
    writable_dir("LUNAFL_STATE", s.path("LUNAFL_STATE"))
    if not demo_insecure:
        certs = s.path("LUNAFL_CERTS")
        readable_file("LUNAFL_CERTS", certs / "ca.crt", "the CA certificate")
        if role == "superlink":
            readable_file("LUNAFL_CERTS", certs / "server.crt", "the server certificate")
            private_key("LUNAFL_CERTS", certs / "server.key")
    if role == "run":
        app = s.path("LUNAFL_APP")
        if not (app / "pyproject.toml").is_file():
            raise DeployError(f"LUNAFL_APP: {app} has no pyproject.toml; it must be the luna-fl app folder")
        data = s["LUNAFL_TEST_DATA"]
        if data and not Path(data).is_dir():
            raise DeployError(f"LUNAFL_TEST_DATA: {data} is not a folder; mount the server's test set there")


def register(s: Settings, env: dict[str, str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Register every ``$LUNAFL_KEYS/<site>.pub`` with the SuperLink (idempotent; kept in its database)."""
    keys = sorted(s.path("LUNAFL_KEYS").glob("*.pub")) if s.path("LUNAFL_KEYS").is_dir() else []
    if not keys:
        raise DeployError(f"LUNAFL_KEYS: no <site>.pub files in {s['LUNAFL_KEYS']}; mount the sites' public keys")
    failed = []
    for key in keys:
        proc = run(register_command(key), env=env, capture_output=True, text=True, timeout=60)
        try:
            reply = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            reply = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()[-800:]}
        if reply.get("success"):
            print(f"[site {key.stem}] registered as SuperNode {reply.get('node-id')}", flush=True)
        elif "already in use" in str(reply.get("error-message", "")):
            print(f"[site {key.stem}] already registered", flush=True)
        else:
            failed.append(key)
            print(f"[site {key.stem}] {key}: registration failed: {reply.get('error-message')}", file=sys.stderr)
    return 1 if failed else 0


def federated_run(s: Settings, env: dict[str, str]) -> int:
    """``flwr run`` (log streamed), then the run's final status from the SuperLink: `flwr run
    --stream` itself exits 0 even when the ServerApp failed."""
    cmd = run_command(s)
    resumed = "resume=" in cmd[-1]
    print(f"{'resuming' if resumed else 'starting'} {results_dir(s)}: {shlex.join(cmd)}", flush=True)
    run_id = None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (m := re.search(r"started run (\d+)", line)):
                run_id = m.group(1)
    if proc.returncode != 0 or run_id is None:
        print(f"run: `flwr run` failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode or 1
    status = run_status(run_id, env)
    if status != "finished:completed":
        print(f"run: run {run_id} ended as {status}; the log above says why. Fix it and start `run` again: "
              f"it resumes {results_dir(s)} from its last checkpoint", file=sys.stderr)
        return 1
    print(f"run {run_id} completed; results in {results_dir(s)}", flush=True)
    return 0


def run_status(run_id: str, env: Mapping[str, str]) -> str:
    for _ in range(10):  # the status may lag the end of the log stream by a moment
        proc = subprocess.run(["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=60)
        try:
            status = json.loads(proc.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            status = f"unknown ({(proc.stdout + proc.stderr).strip()[-300:]})"
        if status.startswith("finished"):
            return status
        time.sleep(1.0)
    return status
