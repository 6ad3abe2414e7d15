"""How the containers start Flower: the one place that holds the command lines.

    python docker/entrypoint.py superlink     # server: SuperLink; it runs each ServerApp as its subprocess
    python docker/entrypoint.py register      # server: register every site public key in $LUNAFL_KEYS
    python docker/entrypoint.py run           # server: start the federated run, or resume it
    python docker/entrypoint.py supernode     # hospital: SuperNode with its site-name/data-path/cache-path
    python docker/entrypoint.py prepare       # hospital: build the patch cache before the first run
    python docker/entrypoint.py health superlink|supernode   # container health checks
    python docker/entrypoint.py --print ROLE  # show the command instead of running it

The images (docker/Dockerfile), docker/docker-compose.yml and tests/docker/test_deployment.py
all call this script, so what the test runs is what a hospital runs. It needs only
the standard library and the Flower command-line tools on PATH (``prepare`` also
imports the project).

Secure by default: TLS everywhere, and only SuperNodes whose public key was registered
may join. ``--demo-insecure`` turns both off for a local look at synthetic data, as
processes on one machine; no image or compose file uses it. Never with patient data.

Settings are environment variables; the defaults are the paths inside the containers
(see SETTINGS below or ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

# name -> (default, help). Defaults are the layout inside the containers.
SETTINGS: dict[str, tuple[str, str]] = {
    # --- server (superlink, register, run) ---
    "LUNAFL_CERTS": ("/certs", "server: folder with server.crt, server.key and ca.crt (made by make_certs.py)"),
    "LUNAFL_STATE": ("/state", "server: writable volume: superlink.db, runs/<run-name>/, caches"),
    "LUNAFL_HOST": ("127.0.0.1", "server: address the SuperLink binds; keep it on loopback behind the gateway"),
    "LUNAFL_PORT": ("8000", "server: port of the SuperLink (Fleet, Control and Runtime APIs share it)"),
    "LUNAFL_KEYS": ("/keys", "server: folder of registered site public keys, <site>.pub"),
    "LUNAFL_APP": ("/app", "server: the Flower app folder (this repository) that `flwr run` submits"),
    "LUNAFL_RUN_NAME": ("federation", "server: results folder name under $LUNAFL_STATE/runs (fixed, so a "
                        "restarted run resumes)"),
    "LUNAFL_RUN_CONFIG": ("", "server: run settings as 'key=value ...' (the keys of [tool.flwr.app.config])"),
    "LUNAFL_TEST_DATA": ("", "server: LUNA16-format folder of the server's own held-out test set (empty = none)"),
    "LUNAFL_AUTO_RESUME": ("1", "server: 1 = continue $LUNAFL_RUN_NAME from its last checkpoint if it exists"),
    # --- hospital (supernode) ---
    "LUNAFL_SITE_NAME": ("", "hospital: the site's name in the federation (required)"),
    "LUNAFL_SUPERLINK": ("superlink:9092", "hospital: host:port of the federation's gateway"),
    "LUNAFL_CA": ("/certs/ca.crt", "hospital: the federation's CA certificate"),
    "LUNAFL_AUTH_KEY": ("/certs/auth.key", "hospital: the site's private key (its .pub is registered)"),
    "LUNAFL_DATA": ("/data", "hospital: the site's LUNA16-format folder (mounted read-only)"),
    "LUNAFL_CACHE": ("/cache", "hospital: writable volume for the patch cache and Flower's app folder"),
    "LUNAFL_SUPERNODE_PORT": ("9094", "hospital: loopback port of the SuperNode's own Runtime API"),
    "LUNAFL_PREPARE": ("", "hospital, role prepare: the run's patch settings, e.g. 'image-size=64' (others: "
                       "defaults)"),
    "LUNAFL_PIN": ("", "hospital: settings the site requires, e.g. 'dp=\"local\" image-size=64' (the server must "
                   "run with them)"),
}
ROLES = ("superlink", "register", "run", "supernode", "prepare", "health")
SERVER_OWNED = ("federation", "out", "run-name", "cache-dir", "resume", "data")  # set here, not by LUNAFL_RUN_CONFIG
CONNECTION = "luna"  # the SuperLink connection name in $FLWR_HOME/config.toml
# Flower's own key=value syntax (flwr.common.config.parse_config_args)
KV = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DeployError(RuntimeError):
    """A setting or file the container needs is missing or wrong; the message names it."""


class Settings:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def __getitem__(self, name: str) -> str:
        return self.env.get(name, SETTINGS[name][0])

    def path(self, name: str) -> Path:
        return Path(self[name])


# ---------------------------------------------------------------------------------------------
# the command lines


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


def key_values(name: str, text: str) -> list[tuple[str, str]]:
    """``key=value key="a string"`` as Flower parses it; anything else is an error naming ``name``."""
    pairs, end = [], 0
    for m in KV.finditer(text):
        if text[end:m.start()].strip():
            break
        pairs.append((m.group(1), m.group(2)))
        end = m.end()
    if text[end:].strip():
        raise DeployError(f"{name}={text!r}: expected 'key=value key=value' (strings in double quotes)")
    for key, value in pairs:
        try:
            tomllib.loads(f"{key} = {value}")
        except tomllib.TOMLDecodeError:
            raise DeployError(f"{name}: {key}={value} is not a TOML value; put strings in double quotes, "
                              f'e.g. {key}="{value}"') from None
    return pairs


def node_config(s: Settings) -> str:
    """``--node-config`` of a hospital's SuperNode (read by client/deploy.py)."""
    site = s["LUNAFL_SITE_NAME"].strip()
    if not SITE.match(site):
        raise DeployError(f"LUNAFL_SITE_NAME={site!r}: set the hospital's name (1-63 letters, digits, '.', '_', "
                          "'-'), the same as its registered key's file name")
    pairs = {"site-name": site, "data-path": s["LUNAFL_DATA"], "cache-path": s["LUNAFL_CACHE"]}
    for key, value in pairs.items():
        if '"' in value or "\\" in value:
            raise DeployError(f"{key} {value!r}: a path for the SuperNode's node config may not contain quotes "
                              "or backslashes")
    items = [f'{k}="{v}"' for k, v in pairs.items()]
    for key, value in key_values("LUNAFL_PIN", s["LUNAFL_PIN"]):
        from common.config import PINNABLE  # the settings a hospital may require (the handshake checks them)

        if key not in PINNABLE:
            raise DeployError(f"LUNAFL_PIN: {key!r} cannot be pinned; choose from {', '.join(PINNABLE)}")
        items.append(f"{key}={value}")
    return " ".join(items)


def supernode_command(s: Settings, demo_insecure: bool = False) -> list[str]:
    """A hospital's SuperNode: TLS to the SuperLink checked against the federation's CA,
    signed requests with the site's private key; the ClientApp runs as its subprocess."""
    cmd = ["flower-supernode", "--superlink", s["LUNAFL_SUPERLINK"], "--node-config", node_config(s),
           "--host", "127.0.0.1", "--port", s["LUNAFL_SUPERNODE_PORT"], "--isolation", "subprocess"]
    if demo_insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", s["LUNAFL_CA"], "--auth-supernode-private-key", s["LUNAFL_AUTH_KEY"]]


def flwr_config_toml(s: Settings, demo_insecure: bool = False) -> str:
    """The `flwr` CLI's connection to the SuperLink, from inside the server container."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps('127.0.0.1:' + s['LUNAFL_PORT'])}"]
    if demo_insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(s.path('LUNAFL_CERTS') / 'ca.crt'))}")
    return "\n".join(lines) + "\n"


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
    if not SITE.match(s["LUNAFL_RUN_NAME"]):
        raise DeployError(f"LUNAFL_RUN_NAME={s['LUNAFL_RUN_NAME']!r}: use letters, digits, '.', '_' or '-'")
    state = s.path("LUNAFL_STATE")
    fixed = {"federation": "deployment", "out": str(state / "runs"), "run-name": s["LUNAFL_RUN_NAME"],
             "cache-dir": str(state / "cache"), "data": s["LUNAFL_TEST_DATA"]}
    if s["LUNAFL_AUTO_RESUME"] == "1" and (results_dir(s) / "config.json").exists():
        fixed["resume"] = str(results_dir(s))
    return " ".join([*(f"{k}={v}" for k, v in pairs), *(f"{k}={json.dumps(v)}" for k, v in fixed.items())])


def run_command(s: Settings) -> list[str]:
    return ["flwr", "run", s["LUNAFL_APP"], CONNECTION, "--stream", "--run-config", run_config(s)]


def command(role: str, s: Settings, demo_insecure: bool = False) -> list[str]:
    """The command line of a long-running role (what ``--print`` shows)."""
    if role == "superlink":
        return superlink_command(s, demo_insecure)
    if role == "supernode":
        return supernode_command(s, demo_insecure)
    if role == "run":
        return run_command(s)
    raise DeployError(f"{role}: runs several commands; nothing to print")


# ---------------------------------------------------------------------------------------------
# checks before starting: fail at container start, naming the setting, not minutes later


def _readable_file(s: Settings, name: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise DeployError(f"{name}: {path} does not exist; mount {what}")
    if not os.access(path, os.R_OK):
        raise DeployError(f"{name}: {path} is not readable by uid {os.getuid()}; e.g. `chown {os.getuid()} "
                          f"{path.name}` on the host (keep it mode 0600)")


def _private_key(s: Settings, name: str, path: Path) -> None:
    _readable_file(s, name, path, "the private key made by docker/make_certs.py")
    if path.stat().st_mode & 0o077:
        raise DeployError(f"{name}: {path} is readable by group or others (mode {oct(path.stat().st_mode & 0o777)}); "
                          "chmod 600 it")


def _writable_dir(name: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeployError(f"{name}: cannot create {path} ({exc.strerror}); mount a writable volume there") from None
    if not os.access(path, os.W_OK):
        raise DeployError(f"{name}: {path} is not writable by uid {os.getuid()}; mount a writable volume there")


def check(role: str, s: Settings, demo_insecure: bool) -> None:
    if role == "run":
        run_config(s)  # the operator's settings first: the most likely mistake
    if role in ("superlink", "register", "run"):
        _writable_dir("LUNAFL_STATE", s.path("LUNAFL_STATE"))
        if not demo_insecure:
            certs = s.path("LUNAFL_CERTS")
            _readable_file(s, "LUNAFL_CERTS", certs / "ca.crt", "the CA certificate")
            if role == "superlink":
                _readable_file(s, "LUNAFL_CERTS", certs / "server.crt", "the server certificate")
                _private_key(s, "LUNAFL_CERTS", certs / "server.key")
    if role == "run":
        app = s.path("LUNAFL_APP")
        if not (app / "pyproject.toml").is_file():
            raise DeployError(f"LUNAFL_APP: {app} has no pyproject.toml; it must be the luna-fl app folder")
        data = s["LUNAFL_TEST_DATA"]
        if data and not Path(data).is_dir():
            raise DeployError(f"LUNAFL_TEST_DATA: {data} is not a folder; mount the server's test set there")
    if role in ("supernode", "prepare"):
        node_config(s)
        data = s.path("LUNAFL_DATA")
        if not data.is_dir():
            raise DeployError(f"LUNAFL_DATA: {data} is not a folder; mount the hospital's LUNA16 folder there")
        if not (data / "annotations.csv").is_file() and not (data / "candidates_V2.csv").is_file():
            raise DeployError(f"LUNAFL_DATA: {data} has neither annotations.csv nor candidates_V2.csv; is it a "
                              "LUNA16-format folder?")
        _writable_dir("LUNAFL_CACHE", s.path("LUNAFL_CACHE"))
        if role == "supernode" and not demo_insecure:
            _readable_file(s, "LUNAFL_CA", s.path("LUNAFL_CA"), "the federation's ca.crt")
            _private_key(s, "LUNAFL_AUTH_KEY", s.path("LUNAFL_AUTH_KEY"))


def flower_environment(role: str, s: Settings, env: dict[str, str]) -> dict[str, str]:
    """Environment of every Flower process: no runtime installs, no telemetry, writable homes."""
    out = dict(env)
    out["FLWR_TELEMETRY_ENABLED"] = "0"  # a hospital's node does not phone home
    out["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # the image's pinned packages, nothing fetched
    base = s.path("LUNAFL_CACHE") if role == "supernode" else s.path("LUNAFL_STATE")
    out.setdefault("FLWR_HOME", str(base / "flwr-home"))  # installed FABs, the CLI's config.toml
    out.setdefault("LUNAFL_HOME", str(base / "home"))
    out.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    return out


def write_flwr_config(s: Settings, env: Mapping[str, str], demo_insecure: bool) -> Path:
    from common.atomic import atomic_write_text

    path = Path(env["FLWR_HOME"]) / "config.toml"
    atomic_write_text(path, flwr_config_toml(s, demo_insecure))
    return path


# ---------------------------------------------------------------------------------------------
# the roles that do more than exec one command


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


def prepare_site(s: Settings) -> int:
    """Decode the hospital's CT into its patch cache now, through the ClientApp's own code
    (client/deploy.py), so the first run's handshake does not wait for it."""
    from client.deploy import deployed_site
    from common.config import RunConfig

    given = {k: tomllib.loads(f"v = {v}")["v"] for k, v in key_values("LUNAFL_PREPARE", s["LUNAFL_PREPARE"])}
    try:
        cfg = RunConfig.from_dict({**given, "federation": "deployment"})
    except ValueError as exc:
        raise DeployError(f"LUNAFL_PREPARE: {exc}") from None
    node = {"site-name": s["LUNAFL_SITE_NAME"].strip(), "data-path": s["LUNAFL_DATA"],
            "cache-path": s["LUNAFL_CACHE"]}
    t0 = time.perf_counter()
    site = deployed_site(cfg, node)
    print(f"[site {site.name}] patch cache ready in {time.perf_counter() - t0:.0f}s: {site.cache.path} "
          f"({len(site.train)} training and {len(site.val)} validation candidates)", flush=True)
    return 0


def health(target: str, s: Settings, demo_insecure: bool) -> int:
    """The Docker health check: the role's /health endpoint answers 200 on loopback."""
    if target == "superlink":
        scheme = "http" if demo_insecure else "https"
        url = f"{scheme}://127.0.0.1:{s['LUNAFL_PORT']}/health"
        ctx = None if demo_insecure else ssl.create_default_context(cafile=str(s.path("LUNAFL_CERTS") / "ca.crt"))
    elif target == "supernode":
        url, ctx = f"http://127.0.0.1:{s['LUNAFL_SUPERNODE_PORT']}/health", None  # its loopback Runtime API
    else:
        raise DeployError(f"health {target!r}: choose superlink or supernode")
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:  # noqa: S310 - fixed loopback URL
            ok = resp.status == 200
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    epilog = "settings (environment variables):\n" + "\n".join(
        f"  {k:<22} {h} (default: {d!r})" for k, (d, h) in SETTINGS.items())
    p = argparse.ArgumentParser(prog="docker/entrypoint.py", description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", action="store_true", help="print the command line instead of running it")
    p.add_argument("--demo-insecure", action="store_true",
                   help="no TLS, no SuperNode authentication: a local demo on synthetic data only")
    p.add_argument("role", choices=ROLES)
    p.add_argument("target", nargs="?", help="for health: superlink or supernode")
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    s = Settings(os.environ if env is None else env)
    try:
        if args.role == "health":
            return health(args.target or "", s, args.demo_insecure)
        if args.print:
            print(shlex.join(command(args.role, s, args.demo_insecure)))
            return 0
        check(args.role, s, args.demo_insecure)
        flower_env = flower_environment(args.role, s, dict(s.env))
        if args.demo_insecure:
            print("WARNING: --demo-insecure: no TLS and no SuperNode authentication; synthetic data only",
                  file=sys.stderr, flush=True)
        if args.role == "prepare":
            os.environ.update(flower_environment("supernode", s, dict(s.env)))  # LUNAFL_HOME, MPLCONFIGDIR
            return prepare_site(s)
        if args.role == "register" and args.demo_insecure:
            print("register: --demo-insecure runs without SuperNode authentication; nothing to register")
            return 0
        if args.role in ("register", "run"):
            write_flwr_config(s, flower_env, args.demo_insecure)
            return register(s, flower_env) if args.role == "register" else federated_run(s, flower_env)
        cmd = command(args.role, s, args.demo_insecure)
        print(f"exec {shlex.join(cmd)}", flush=True)
        os.execvpe(cmd[0], cmd, flower_env)  # Flower takes the process (signals go straight to it)
    except DeployError as exc:
        print(f"entrypoint.py {args.role}: error: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
