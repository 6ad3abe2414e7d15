"""A hospital's roles: its SuperNode, and building its patch cache before the first run."""

from __future__ import annotations

import time
import tomllib

from .settings import SITE_NAME, DeployError, Settings, key_values, private_key, readable_file, writable_dir


def node_config(s: Settings) -> str:
    """``--node-config`` of a hospital's SuperNode (read by client/deploy.py)."""
    site = s["LUNAFL_SITE_NAME"].strip()
    if not SITE_NAME.match(site):
        raise DeployError(f"LUNAFL_SITE_NAME={site!r}: set the hospital's name (1-63 letters, digits, '.', '_', "
                          "'-'), the same as its registered key's file name")
    pairs = {"site-name": site, "data-path": s["LUNAFL_DATA"], "cache-path": s["LUNAFL_CACHE"]}
    for key, value in pairs.items():
        if '"' in value or "\\" in value:
            raise DeployError(f"{key} {value!r}: a path for the SuperNode's node config may not contain quotes "
                              "or backslashes")
    items = [f'{k}="{v}"' for k, v in pairs.items()]
    from common import __version__  # this hospital's release: the handshake names it beside the server's

    items.append(f'luna-fl-version="{__version__}"')
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


def check(role: str, s: Settings, demo_insecure: bool) -> None:
    """The hospital roles' settings and mounts (supernode, prepare)."""
    node_config(s)
    data = s.path("LUNAFL_DATA")
    if not data.is_dir():
        raise DeployError(f"LUNAFL_DATA: {data} is not a folder; mount the hospital's LUNA16 folder there")
    if not (data / "annotations.csv").is_file() and not (data / "candidates_V2.csv").is_file():
        raise DeployError(f"LUNAFL_DATA: {data} has neither annotations.csv nor candidates_V2.csv; is it a "
                          "LUNA16-format folder?")
    writable_dir("LUNAFL_CACHE", s.path("LUNAFL_CACHE"))
    if role == "supernode" and not demo_insecure:
        readable_file("LUNAFL_CA", s.path("LUNAFL_CA"), "the federation's ca.crt")
        private_key("LUNAFL_AUTH_KEY", s.path("LUNAFL_AUTH_KEY"))


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
