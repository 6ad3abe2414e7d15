"""The containers' settings (environment variables) and the checks made before Flower
starts: a container fails at start, naming the setting, not minutes later."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
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
# Flower's own key=value syntax (flwr.common.config.parse_config_args)
KV = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
# A site's name (and a run's): it names files, the SuperNode and the registered key (make_certs.py uses it too)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class DeployError(RuntimeError):
    """A setting or file the container needs is missing or wrong; the message names it."""


class Settings:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def __getitem__(self, name: str) -> str:
        return self.env.get(name, SETTINGS[name][0])

    def path(self, name: str) -> Path:
        return Path(self[name])


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


# ---------------------------------------------------------------------------------------------
# the checks


def readable_file(name: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise DeployError(f"{name}: {path} does not exist; mount {what}")
    if not os.access(path, os.R_OK):
        raise DeployError(f"{name}: {path} is not readable by uid {os.getuid()}; e.g. `chown {os.getuid()} "
                          f"{path.name}` on the host (keep it mode 0600)")


def private_key(name: str, path: Path) -> None:
    readable_file(name, path, "the private key made by docker/make_certs.py")
    if path.stat().st_mode & 0o077:
        raise DeployError(f"{name}: {path} is readable by group or others (mode {oct(path.stat().st_mode & 0o777)}); "
                          "chmod 600 it")


def writable_dir(name: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeployError(f"{name}: cannot create {path} ({exc.strerror}); mount a writable volume there") from None
    if not os.access(path, os.W_OK):
        raise DeployError(f"{name}: {path} is not writable by uid {os.getuid()}; mount a writable volume there")
