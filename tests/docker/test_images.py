"""What goes into the images, checked without building them (docker/e2e.sh builds them).

- the hospital image's packages are the distributions client/ and common/ import, with the
  versions of pyproject.toml (docker/requirements.py reads them from there);
- no package-registry host is named anywhere in the repository: pip's configured index is
  the default, and another index is a build argument given at build time.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import ROOT, docker_script

req = docker_script("requirements")

# imported by common/ only inside a function a hospital never calls (the server's plots)
SERVER_ONLY = {"matplotlib": "common/evaluation/froc.py draws the FROC plot for the server's report"}


def imports(folder: Path) -> dict[str, set[str]]:
    """Top-level module -> the files importing it (every import, also those inside functions)."""
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                out.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return out


def top_level_imports(path: Path) -> set[str]:
    return {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
            for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [n])}


def test_the_hospital_image_installs_what_client_and_common_import():
    found = {**imports(ROOT / "common")}
    for name, files in imports(ROOT / "client").items():
        found.setdefault(name, set()).update(files)
    third_party = {m: f for m, f in found.items()
                   if m not in sys.stdlib_module_names and m not in ("client", "common", "__future__")}
    owners = importlib.metadata.packages_distributions()
    dists = {}
    for module, files in third_party.items():
        assert module in owners, f"{module} (imported by {sorted(files)}) belongs to no installed distribution"
        dists[req.canonical(owners[module][0])] = (module, files)
    hospital = {req.canonical(n) for n in req.hospital_names()}
    for module, why in SERVER_ONLY.items():
        files = third_party.pop(module, set())
        dists.pop(req.canonical(owners[module][0]), None)
        for f in files:  # never imported at module level: `import client.app` does not need it
            assert module not in top_level_imports(ROOT / f), f"{f} imports {module} at module level ({why})"
    assert set(dists) == hospital, (f"imported but not in [tool.luna-fl.images] hospital: "
                                    f"{sorted(set(dists) - hospital)}; listed but not imported: "
                                    f"{sorted(hospital - set(dists))}")


def test_the_hospital_requirements_carry_pyprojects_pins_and_nothing_of_the_server():
    pins = {req.canonical(n): v for n, _, v in req.pins().values()}
    lines = req.requirements("hospital")
    for line in lines:
        name, version = line.split("==")
        assert pins[req.canonical(name)] == version and "[" not in name, line
    names = {req.canonical(line.split("==")[0]) for line in lines}
    assert not names & {"ray", "matplotlib", "mlflow-skinny", "captum", "psutil", "dp-accounting"}
    assert not names & {"torch", "torchvision"}  # their own layer, same pins (tests/docker/test_deployment.py)
    assert {"flwr", "opacus", "simpleitk", "scipy"} <= names and "scikit-learn" not in names  # metrics: numpy only
    server = req.requirements("server")
    assert len(server) == len(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]) - 2
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "hospital"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split() == lines, out.stderr


def test_an_unpinned_or_unknown_hospital_package_is_refused(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    bad = tmp_path / "pyproject.toml"
    bad.write_text(text.replace('hospital = ["flwr",', 'hospital = ["requests", "flwr",'))
    try:
        req.requirements("hospital", bad)
    except ValueError as exc:
        assert "requests" in str(exc) and "does not pin" in str(exc)
    else:
        raise AssertionError("an unpinned hospital package was accepted")


# host names of package and image registries, split so that this file does not name them itself
REGISTRY_HOSTS = [".".join(parts) for parts in (
    ("pypi", "org"), ("pypi", "python", "org"), ("files", "pythonhosted", "org"), ("download", "pytorch", "org"),
    ("pytorch", "org"), ("deb", "debian", "org"), ("security", "debian", "org"), ("ftp", "debian", "org"),
    ("archive", "ubuntu", "com"), ("registry-1", "docker", "io"), ("docker", "io"), ("index", "docker", "io"),
    ("ghcr", "io"), ("quay", "io"), ("registry", "npmjs", "org"), ("conda", "anaconda", "org"),
    ("repo", "anaconda", "com"), ("nvcr", "io"), ("gcr", "io"))]


def repository_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [ROOT / p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def test_no_package_registry_host_is_named_in_the_repository():
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(h) for h in REGISTRY_HOSTS) + r")(?![\w-])",
                         re.IGNORECASE)
    files = repository_files()
    assert len(files) > 50
    hits = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for n, line in enumerate(text.splitlines(), 1):
            if m := pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(1)}")
    assert not hits, "package-registry host names (pip's configured index is the default; pass another " \
                     f"index as a build argument at build time): {hits}"


def test_the_end_to_end_script_uses_the_compose_file_as_it_is_but_for_the_gateway_image():
    import yaml

    from common.config import RunConfig

    override = yaml.safe_load((ROOT / "docker" / "e2e" / "compose.yml").read_text())["services"]
    assert set(override) == {"gateway"} and set(override["gateway"]) <= {"image", "entrypoint", "volumes"}
    assert all(v.endswith(":ro") for v in override["gateway"]["volumes"])
    for script, shell in (("docker/e2e.sh", "bash"), ("docker/e2e/gateway.sh", "sh")):
        assert subprocess.run([shell, "-n", str(ROOT / script)], timeout=30).returncode == 0, script
    e2e = docker_script("e2e/run")
    # the uids it gives each hospital's files are the compose file's defaults
    hospitals = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())["services"]
    for site, uid in e2e.SITES.items():
        assert re.search(rf":-{uid}\}}", hospitals[site]["user"]), (site, hospitals[site]["user"])
    # its run configuration is valid, and small
    ep = docker_script("entrypoint")
    cfg = RunConfig.from_dict({k.replace("-", "_"): tomllib.loads(f"v = {v}")["v"]
                               for k, v in ep.key_values("RUN_CONFIG", e2e.RUN_CONFIG)} | {"federation": "deployment"})
    assert cfg.rounds == 2 and cfg.clients == len(e2e.SITES) and cfg.arch == "resnet10" and not cfg.rehearsal()


def test_the_end_to_end_script_refuses_a_build_the_disk_cannot_hold(tmp_path):
    """A build that would run out of disk half-way is refused before it starts, naming the folder."""
    import shutil

    import pytest

    e2e = docker_script("e2e/run")
    run = e2e.E2E(tmp_path, tmp_path)
    free = shutil.disk_usage(tmp_path).free / 1e9
    missing = tmp_path / "not-yet" / "storage"  # podman's storage before its first image: its parent is measured
    run.check_space(free / 2, [missing, tmp_path])  # the same disk twice: measured once
    assert list(run.figures) == [f"free disk before the builds ({tmp_path})"]
    with pytest.raises(e2e.Failed, match=rf"GB free under {re.escape(str(tmp_path))} .*need about"):
        run.check_space(free * 2 + 1, [tmp_path])
