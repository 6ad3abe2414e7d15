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
imports the project). This file is the command line; the roles live beside it in
docker/deployment/ (settings and checks, the server's roles, a hospital's roles).

Secure by default: TLS everywhere, and only SuperNodes whose public key was registered
may join. ``--demo-insecure`` turns both off for a local look at synthetic data, as
processes on one machine; no image or compose file uses it. Never with patient data.

Settings are environment variables; the defaults are the paths inside the containers
(see SETTINGS below or ``--help``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import ssl
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docker/deployment/, also when loaded by path

from deployment import hospital, server  # noqa: E402
from deployment.hospital import node_config, prepare_site, supernode_command  # noqa: E402,F401
from deployment.server import (  # noqa: E402,F401
    CONNECTION,
    SERVER_OWNED,
    federated_run,
    flwr_config_toml,
    register,
    register_command,
    results_dir,
    run_command,
    run_config,
    run_status,
    superlink_command,
    write_flwr_config,
)
from deployment.settings import KV, SETTINGS, DeployError, Settings, key_values  # noqa: E402,F401
from deployment.settings import SITE_NAME as SITE  # noqa: E402,F401

ROLES = ("superlink", "register", "run", "supernode", "prepare", "health")


def command(role: str, s: Settings, demo_insecure: bool = False) -> list[str]:
    """The command line of a long-running role (what ``--print`` shows)."""
    if role == "superlink":
        return superlink_command(s, demo_insecure)
    if role == "supernode":
        return supernode_command(s, demo_insecure)
    if role == "run":
        return run_command(s)
    raise DeployError(f"{role}: runs several commands; nothing to print")


def check(role: str, s: Settings, demo_insecure: bool) -> None:
    """Before starting: fail at container start, naming the setting, not minutes later."""
    if role in ("superlink", "register", "run"):
        server.check(role, s, demo_insecure)
    if role in ("supernode", "prepare"):
        hospital.check(role, s, demo_insecure)


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
