"""The hospital containers for real: build the images, run the compose federation, check it.

    docker/e2e.sh                     # what CI runs (installs podman & co. when root, then this)
    python docker/e2e/run.py --work /var/tmp/luna-e2e --keep-work

With podman (runc runtime) and podman-compose: makes a Debian 12 base image locally
(mmdebstrap from this host's apt sources; no registry is reached), builds the server
image and the CPU hospital image from docker/Dockerfile (build arguments only), makes the
federation's certificates and keys with docker/make_certs.py, brings up
docker/docker-compose.yml (SuperLink, gateway, key registration, two hospitals, each with
its own synthetic LUNA16 folder owned by its own uid), trains 2 rounds of a small model,
and tears everything down (also on failure or Ctrl-C). Each check below fails the run:

- the run completed, with training and evaluation metrics from both hospitals;
- every container runs as a non-root uid, with a read-only root filesystem and no
  capabilities;
- from inside one hospital's container the other's data folder is absent, and with that
  folder mounted anyway its owner's permissions refuse the read;
- a hospital whose key is not registered is refused;
- a hospital container killed mid-round (its SuperNode SIGKILLed, a crash) is restarted
  by its restart policy and trains in the next round;
- no key, certificate, secret or scan is in any layer of any image;
- the hospital image imports client/ and common/, and not server/, sim/ or the report,
  plotting and tracking stack;
- a hospital refuses a run that sets a rehearsal setting (fail-prob), naming it, and a
  server of another release is named with both versions at the handshake.

It prints the figures: image sizes, build times, the federation's wall time and the bytes
per round and site. Run it as root on a host where nothing else uses the names
``luna-fl-e2e*``; it removes only containers, pods, networks and volumes of its own
compose project (images are kept for the next run unless --remove-images).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROJECT = "luna-fl-e2e"
BASE = "localhost/luna-fl-base:bookworm"
GATEWAY = "localhost/luna-fl-gateway-e2e:bookworm"
SERVER = "localhost/luna-fl-server:0.1.0"
HOSPITAL = "localhost/luna-fl-client:0.1.0-cpu"
SITES = {"hospital-a": 10011, "hospital-b": 10012}  # each hospital its own uid (docker-compose.yml's defaults)
SERVER_UID = 10001
VICTIM = "hospital-b"
# small and quick: ResNet-10 on 32 px patches, 2 rounds of 1 local epoch; min-fit-clients=1 lets
# round 1 close without the hospital that is killed in it
RUN_CONFIG = ('clients=2 rounds=2 arch="resnet10" image-size=32 local-epochs=1 batch-size=8 workers=1 '
              'min-fit-clients=1 node-timeout=240 round-timeout=300')
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SECRET_SUFFIXES = (".key", ".pem", ".crt", ".pub", ".p12", ".pfx", ".csr", ".der")
SCAN_SUFFIXES = (".mhd", ".raw", ".mha", ".nii", ".nii.gz", ".dcm")
# free disk a build of the two images needs: each is ~7 GB (PyPI's torch brings the CUDA
# libraries) and pip unpacks into the build container's layer before it is committed
BUILD_FREE_GB = 12.0


class Failed(RuntimeError):
    """A check failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class E2E:
    def __init__(self, work: Path, logs: Path) -> None:
        self.work, self.logs = work, logs
        self.env = dict(os.environ)
        self.figures: dict[str, str] = {}
        self.checks: list[tuple[str, bool, str]] = []

    # ---- running things ----
    def sh(self, args: list[str], *, check: bool = True, timeout: float = 1800, capture: bool = True,
           env: dict[str, str] | None = None, name: str | None = None) -> subprocess.CompletedProcess:
        """Run a command; its output goes to logs/<name>.log (and is returned)."""
        proc = subprocess.run(args, env=env or self.env, capture_output=capture, text=True, timeout=timeout,
                              cwd=ROOT)
        if name and capture:
            (self.logs / f"{name}.log").write_text(f"$ {shlex.join(args)}\n{proc.stdout}\n{proc.stderr}")
        if check and proc.returncode != 0:
            raise Failed(f"`{shlex.join(args)}` exited {proc.returncode}:\n{(proc.stdout or '')[-3000:]}\n"
                         f"{(proc.stderr or '')[-3000:]}")
        return proc

    def podman(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh(["podman", *args], **kw)

    def compose(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh(["podman-compose", "-p", PROJECT, "-f", str(DOCKER / "docker-compose.yml"),
                        "-f", str(DOCKER / "e2e" / "compose.yml"), *args], **kw)

    def container(self, service: str) -> str:
        return f"{PROJECT}_{service}_1"

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))
        log(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}")
        if not ok:
            raise Failed(f"{name}: {detail}")

    # ---- podman's configuration: our own file, never the host's ----
    def configure_podman(self) -> None:
        if "CONTAINERS_CONF" in os.environ:
            log(f"CONTAINERS_CONF={os.environ['CONTAINERS_CONF']} (yours; left as it is)")
            return
        conf = self.work / "containers.conf"
        # runc (crun fails here: "cgroups in hybrid mode not supported"); no default ulimits
        # (else "setrlimit RLIMIT_NOFILE: Operation not permitted")
        conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
        self.env["CONTAINERS_CONF"] = str(conf)

    # ---- images ----
    def image_exists(self, name: str) -> bool:
        return self.podman("image", "exists", name, check=False).returncode == 0

    def rootfs_image(self, name: str, packages: str, change: list[str]) -> float:
        """A Debian 12 image from this host's apt sources (mmdebstrap), imported into podman."""
        sources = next((p for p in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
                        if p.is_file() and p.read_text().strip()), None)
        if sources is None:
            raise Failed("no apt sources on this host (/etc/apt/sources.list.d/debian.sources or "
                         "/etc/apt/sources.list): mmdebstrap needs a Debian mirror")
        short = name.split("/")[-1].split(":")[0]
        tar = self.work / f"{short}.tar"
        t0 = time.perf_counter()
        self.sh(["mmdebstrap", "--variant=apt", f"--include={packages}",
                 '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
                 "bookworm", str(tar), str(sources)],
                name=f"mmdebstrap-{short}")
        args = [a for c in change for a in ("--change", c)]
        self.podman("import", *args, str(tar), name, name=f"import-{short}")
        tar.unlink()
        return time.perf_counter() - t0

    def pip_build_mounts(self) -> tuple[list[str], Path]:
        """pip's configuration of this host, for the builds: a pip.conf written from `pip config
        list`, and every local path it names (wheel folders, file:// indexes, constraints), all
        mounted read-only at build time only (nothing is baked into an image)."""
        proc = self.sh([sys.executable, "-m", "pip", "config", "list"], check=False)
        values: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            m = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
            if m:
                values[m.group(1)] = m.group(2)
        for key in ("find-links", "extra-index-url", "index-url", "constraint", "cert", "trusted-host",
                    "default-timeout"):
            var = "PIP_" + key.upper().replace("-", "_")
            if os.environ.get(var):
                values[key] = os.environ[var]
        values.pop("disable-pip-version-check", None)
        conf = configparser.ConfigParser()
        conf["global"] = values
        path = self.work / "pip.conf"
        with path.open("w") as fh:
            conf.write(fh)
        mounts = ["-v", f"{path}:/etc/pip.conf:ro"]
        paths = {CA_BUNDLE} if Path(CA_BUNDLE).is_file() else set()
        for value in values.values():
            for word in value.split():
                local = word[len("file://"):] if word.startswith("file://") else word
                if local.startswith("/") and Path(local).exists():
                    # a file:// index names files beside its simple/ folder: mount the folder above
                    paths.add(str(Path(local).parent) if local.rstrip("/").endswith("/simple") else local)
        for p in sorted(paths):
            mounts += ["-v", f"{p}:{p}:ro"]
        return mounts, path

    def image_id(self, name: str) -> str | None:
        proc = self.podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
        return (proc.stdout.strip() or None) if proc.returncode == 0 else None

    def build_folders(self) -> list[Path]:
        """Where a build writes: podman's image storage and the folder it stages builds in."""
        root = self.podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip() or "/var/lib/containers"
        return [Path(root), Path(os.environ.get("TMPDIR", "/var/tmp"))]

    def check_space(self, need_gb: float, folders: list[Path]) -> None:
        """Refuse to start a build that would fill the disk half-way (pip's "No space left on
        device" deep in a build log), naming the folder and what frees room."""
        seen: set[int] = set()
        for folder in folders:
            path = Path(folder)
            while not path.exists():
                path = path.parent
            dev = path.stat().st_dev
            if dev in seen:
                continue
            seen.add(dev)
            free = shutil.disk_usage(path).free / 1e9
            self.figures[f"free disk before the builds ({path})"] = f"{free:.1f} GB"
            if free < need_gb:
                raise Failed(f"only {free:.1f} GB free under {path} (podman's storage or build folder); the "
                             f"server and hospital builds need about {need_gb:.0f} GB. Free room first: "
                             "`podman image prune` removes superseded image versions, `podman rmi` old tags, "
                             "or set TMPDIR / podman's graphroot to a larger disk")

    def build(self, target: str, tag: str, mounts: list[str], extra: list[str]) -> float:
        t0 = time.perf_counter()
        old = self.image_id(tag)
        self.podman("build", "--format", "docker", "--network", "host", *mounts,
                    "--ignorefile", str(DOCKER / "Dockerfile.dockerignore"), "-f", str(DOCKER / "Dockerfile"),
                    "--target", target, "--build-arg", f"PYTHON_IMAGE={BASE}", *extra, "-t", tag, str(ROOT),
                    timeout=3600, name=f"build-{target}")
        new = self.image_id(tag)
        if old and old != new:
            # the tag's previous version is now untagged: left, every rebuild would keep ~7 GB more.
            # Not forced: podman keeps it if a container or another tag still uses it.
            gone = self.podman("rmi", old, check=False).returncode == 0
            log(f"{tag}: previous version {old[:12]} {'removed' if gone else 'kept (still in use)'}")
        return time.perf_counter() - t0

    def image_size(self, tag: str) -> int:
        return int(self.podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def images(self, rebuild: bool, build: bool = True) -> None:
        t_all = time.perf_counter()
        if rebuild or not self.image_exists(BASE):
            t = self.rootfs_image(BASE, "python3,python3-venv,ca-certificates", ['CMD ["python3"]'])
            self.figures["base image (mmdebstrap + import)"] = f"{t:.0f} s"
        if rebuild or not self.image_exists(GATEWAY):
            t = self.rootfs_image(GATEWAY, "nginx,gettext-base,wget,ca-certificates", ["USER 10001:10001"])
            self.figures["gateway image (mmdebstrap + import)"] = f"{t:.0f} s"
        if not build:
            self.figures["server and hospital images"] = "not built (--no-build)"
            return
        self.check_space(BUILD_FREE_GB, self.build_folders())
        mounts, _ = self.pip_build_mounts()
        extra = []
        if os.environ.get("LUNAFL_TORCH_INDEX_URL"):  # e.g. a CPU-only torch index, given at run time
            extra = ["--build-arg", f"TORCH_INDEX_URL={os.environ['LUNAFL_TORCH_INDEX_URL']}"]
        for target, tag in (("client", HOSPITAL), ("server", SERVER)):
            t = self.build(target, tag, mounts, extra)
            self.figures[f"build {target}"] = f"{t:.0f} s"
        self.figures["images, all builds"] = f"{time.perf_counter() - t_all:.0f} s"
        self.sizes()

    def sizes(self) -> None:
        for tag in (SERVER, HOSPITAL, BASE, GATEWAY):
            self.figures[f"size {tag}"] = f"{self.image_size(tag) / 1e9:.2f} GB ({self.image_size(tag):,} B)"

    # ---- what the images hold ----
    def check_hospital_image(self) -> None:
        def py(code: str) -> subprocess.CompletedProcess:
            return self.podman("run", "--rm", "--read-only", "--cap-drop", "ALL", "--network", "none",
                               "--entrypoint", "python", HOSPITAL, "-c", code, check=False)

        ok = py("import client.app, client.deploy, common.config; print('ok')")
        absent = py("import importlib.util as u; print([m for m in ('server', 'sim', 'analysis', 'experiment', "
                    "'matplotlib', 'mlflow', 'ray', 'captum', 'pandas') if u.find_spec(m)])")
        server_fails = py("import server")
        self.check("hospital image holds what a hospital runs",
                   ok.returncode == 0 and absent.stdout.strip() == "[]" and server_fails.returncode != 0,
                   f"`import client.app` -> {ok.stdout.strip() or ok.stderr.strip()[-300:]}; "
                   f"present of server/sim/analysis/experiment/matplotlib/mlflow/ray/captum/pandas: "
                   f"{absent.stdout.strip() or absent.stderr.strip()[-300:]}; `import server` exits "
                   f"{server_fails.returncode} ({server_fails.stderr.strip().splitlines()[-1:]})")

    def layer_dirs(self, tag: str) -> list[Path]:
        data = json.loads(self.podman("image", "inspect", "--format", "{{json .GraphDriver.Data}}", tag).stdout)
        dirs = [data["UpperDir"], *filter(None, data.get("LowerDir", "").split(":"))]
        return [Path(d) for d in dirs]

    def check_layers(self, forbidden: list[bytes]) -> None:
        """Every layer of every image: no key, certificate, secret or scan.

        Refused: a scan (.mhd/.raw/.mha/.nii) anywhere; a file in a folder the containers mount
        (/certs, /keys, /data, /test-data, /state, /cache: mount points stay empty); a results
        file or database of a run; a non-empty /etc/pip.conf (the build's pip configuration is a
        mount, never a file); a key or certificate file (by name) other than the public CA
        bundles Debian's ca-certificates and Python packages ship (certificates only); and a file
        holding a private key or any of this federation's key and certificate files, read in
        full for every key/certificate file and every file under /app, /etc, /tmp, /root and
        /home."""
        problems, scanned, read, allowed = [], 0, 0, set()
        mounted = ("/certs/", "/keys/", "/data/", "/test-data/", "/state/", "/cache/")
        results = {"superlink.db", "rounds.jsonl", "events.jsonl", "handshake.json", "summary.json", "model_final.pt"}
        for tag in (BASE, GATEWAY, SERVER, HOSPITAL):
            for layer in self.layer_dirs(tag):
                for dirpath, _dirs, files in os.walk(layer):
                    for f in files:
                        scanned += 1
                        path = Path(dirpath) / f
                        rel = "/" + str(path.relative_to(layer))
                        low = f.lower()
                        if low.endswith(SCAN_SUFFIXES) or f in results or re.fullmatch(r"round-\d+\.pt", f):
                            problems.append(f"{tag}: {rel} (a scan or a run's results)")
                            continue
                        if rel.startswith(mounted):
                            problems.append(f"{tag}: {rel} (in a folder the containers mount)")
                            continue
                        if not path.is_file() or path.is_symlink():
                            continue
                        if rel == "/etc/pip.conf":
                            if path.stat().st_size:
                                problems.append(f"{tag}: {rel} (the build's pip configuration, baked in)")
                            continue
                        named = low.endswith(SECRET_SUFFIXES)
                        if not (named or rel.startswith(("/app/", "/etc/", "/tmp/", "/root/", "/home/"))):
                            continue
                        body = path.read_bytes()
                        read += 1
                        if b"PRIVATE KEY" in body or any(x in body for x in forbidden):
                            problems.append(f"{tag}: {rel} (a private key or this federation's file)")
                        elif named and b"BEGIN CERTIFICATE" not in body:
                            problems.append(f"{tag}: {rel} (a key or certificate file)")
                        elif named:
                            allowed.add(rel)  # a public CA bundle (ca-certificates, certifi, grpc)
        self.check("no key, certificate, secret or scan in any image layer", not problems,
                   f"{scanned:,} files in the layers of 4 images, {read:,} read in full; public CA certificates "
                   f"left: {len(allowed)} ({', '.join(sorted(allowed)[:4])}, ...)"
                   + (f"; found: {problems[:20]}" if problems else ""))

    # ---- the federation's files ----
    def prepare(self) -> None:
        w = self.work
        self.sh([sys.executable, str(DOCKER / "make_certs.py"), "federation", "--out", str(w / "certs"),
                 "--server-name", "superlink", *(a for s in SITES for a in ("--site", s))], name="make-certs")
        self.sh([sys.executable, str(DOCKER / "make_certs.py"), "site-key", "--out", str(w / "rogue"),
                 "--site", "rogue"], name="make-certs-rogue")
        shutil.copy(w / "certs" / "superlink" / "ca.crt", w / "rogue" / "ca.crt")
        for i, site in enumerate(SITES):
            self.make_data(w / "data" / site, scans=6, seed=11 + i)
        self.make_data(w / "data" / "server-test", scans=10, seed=10)  # subset9 holds its test split
        self.make_data(w / "data" / "rogue", scans=2, seed=19)
        # ownership: the server's uid owns its certificates and test set; each hospital its own
        # key and its own data folder (0700), so no other uid can even list it
        self.chown(w / "certs" / "superlink", SERVER_UID)
        self.chown(w / "certs" / "keys", SERVER_UID)
        self.chown(w / "data" / "server-test", SERVER_UID)
        for site, uid in SITES.items():
            self.chown(w / "certs" / "sites" / site, uid)
            self.chown(w / "data" / site, uid)
            (w / "data" / site).chmod(0o700)
        self.chown(w / "rogue", 10019)
        self.chown(w / "data" / "rogue", 10019)
        self.compose_env = dict(self.env, LUNAFL_CERTS_DIR=str(w / "certs"),
                                LUNAFL_DATA_A=str(w / "data" / "hospital-a"),
                                LUNAFL_DATA_B=str(w / "data" / "hospital-b"),
                                LUNAFL_SERVER_TEST_DATA=str(w / "data" / "server-test"),
                                LUNAFL_RUN_CONFIG=RUN_CONFIG, LUNAFL_UID_A=str(SITES["hospital-a"]),
                                LUNAFL_UID_B=str(SITES["hospital-b"]))

    def make_data(self, out: Path, scans: int, seed: int) -> None:
        self.sh([sys.executable, str(ROOT / "sim" / "make_data.py"), "--out", str(out), "--scans", str(scans),
                 "--seed", str(seed), "--workers", "1"], name=f"make-data-{out.name}")

    @staticmethod
    def chown(path: Path, uid: int) -> None:
        for p in [path, *path.rglob("*")]:
            os.chown(p, uid, uid)

    # ---- bringing it up ----
    def up(self, *services: str, profile: str | None = None) -> None:
        args = (["--profile", profile] if profile else []) + ["up", "-d", "--no-deps", *services]
        self.compose(*args, env=self.compose_env, name=f"up-{'-'.join(services)}")

    def wait(self, what: str, ready: Callable[[], bool], timeout: float, every: float = 2.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if ready():
                return time.monotonic() - t0
            time.sleep(every)
        raise Failed(f"{what}: not within {timeout:.0f} s")

    def healthy(self, service: str) -> bool:
        return self.podman("healthcheck", "run", self.container(service), check=False).returncode == 0

    def state(self, service: str) -> dict:
        out = self.podman("inspect", "--format", "{{json .State}}", self.container(service), check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def server_exec(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.podman("exec", self.container("superlink"), *args, **kw)

    def online(self) -> dict[str, str]:
        out = self.server_exec("flwr", "supernode", "ls", "luna", "--format", "json", check=False)
        self.last_online = out.stdout[-1500:] + out.stderr[-1500:]
        try:
            return {str(n["node-id"]): n["status"] for n in json.loads(out.stdout)["nodes"]}
        except (ValueError, KeyError):
            return {}

    def volume_path(self, volume: str) -> Path:
        return Path(self.podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{PROJECT}_{volume}")
                    .stdout.strip())

    def start_federation(self) -> None:
        self.up("superlink")
        self.wait("superlink healthy", lambda: self.healthy("superlink"), 120)
        self.up("gateway")
        self.wait("gateway healthy", lambda: self.healthy("gateway"), 60)
        self.up("register")
        self.wait("register done", lambda: self.state("register").get("Status") == "exited", 120)
        reg = self.podman("logs", self.container("register"), name="register")
        if self.state("register").get("ExitCode") != 0 or reg.stdout.count("registered as SuperNode") < len(SITES):
            raise Failed(f"register failed: {reg.stdout[-2000:]}{reg.stderr[-2000:]}")
        self.up(*SITES)
        try:
            self.wait("both hospitals online", lambda: sum(s == "online" for s in self.online().values()) == 2, 180)
        except Failed as exc:
            raise Failed(f"{exc}; `flwr supernode ls`: {getattr(self, 'last_online', '')}") from None

    # ---- the checks on running containers ----
    def check_hardening(self, services: Iterable[str]) -> None:
        problems, seen = [], []
        for service in services:
            c = self.container(service)
            info = json.loads(self.podman("inspect", c).stdout)[0]
            user = info["Config"].get("User", "")
            ro = info["HostConfig"].get("ReadonlyRootfs")
            caps = info.get("EffectiveCaps") or []
            detail = f"{service}: user {user or 'unset'}, read-only {ro}, capabilities {caps or 'none'}"
            if info["State"].get("Running"):
                inside = self.podman("exec", c, "sh", "-c", "id -u; grep CapEff /proc/self/status; "
                                     "grep CapEff /proc/1/status; touch /probe 2>&1 || true", check=False).stdout
                lines = inside.splitlines()
                detail += f"; inside: uid {lines[0] if lines else '?'}, {' / '.join(lines[1:3])}, " \
                          f"write to /: {'refused' if 'Read-only file system' in inside else 'ALLOWED'}"
                if not lines or lines[0].strip() in ("0", "") or "Read-only file system" not in inside or \
                        any(not ln.strip().endswith("0000000000000000") for ln in lines[1:3]):
                    problems.append(detail)
            if user.split(":")[0] in ("", "0", "root") or not ro or caps:
                problems.append(detail)
            seen.append(detail)
        self.check("every container non-root, read-only root filesystem, no capabilities", not problems,
                   "; ".join(seen) + (f" -- problems: {problems}" if problems else ""))

    def check_isolation(self) -> None:
        a, b = "hospital-a", "hospital-b"
        b_host = self.work / "data" / b
        b_scans = sorted(p.name for p in b_host.rglob("*.mhd"))
        probe = ("import os, sys\n"
                 "other, names = sys.argv[1], set(sys.argv[2:])\n"
                 "mounts = [ln for ln in open('/proc/self/mountinfo') if other in ln]\n"
                 "found = [os.path.join(d, f) for top in ('/data', '/cache', '/certs', '/tmp', '/app') "
                 "for d, _, fs in os.walk(top) for f in fs if f in names]\n"
                 "try:\n    os.listdir(other); seen = 'LISTED'\n"
                 "except FileNotFoundError:\n    seen = 'absent'\n"
                 "except PermissionError:\n    seen = 'permission denied'\n"
                 "print(seen, len(mounts), len(found))\n")
        inside = self.podman("exec", self.container(a), "python", "-c", probe, str(b_host), *b_scans, check=False)
        words = inside.stdout.split()
        # the second wall: hospital-b's folder mounted into a container of hospital-a's uid anyway
        forced = self.podman("run", "--rm", "--read-only", "--cap-drop", "ALL", "--network", "none", "--user",
                             f"{SITES[a]}:{SITES[a]}", "-v", f"{b_host}:/other:ro", "--entrypoint", "python",
                             HOSPITAL, "-c", "import os\ntry:\n    os.listdir('/other'); print('LISTED')\n"
                             "except PermissionError as e:\n    print('permission denied:', e)", check=False)
        ok = words[:1] == ["absent"] and words[1:] == ["0", "0"] and forced.stdout.startswith("permission denied")
        self.check("the OS keeps the hospitals apart", ok,
                   f"inside {a}: {b}'s folder {b_host} is {' '.join(words[:1]) or inside.stderr[-300:]}, "
                   f"mounts naming it: {words[1:2]}, of its {len(b_scans)} scans found: {words[2:3]}; "
                   f"mounted anyway into a container of {a}'s uid {SITES[a]}: {forced.stdout.strip()[:200]}")

    def check_unregistered(self) -> None:
        name = f"{PROJECT}_rogue"
        proc = self.podman(
            "run", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--init",
            "--security-opt", "no-new-privileges:true", "--user", "10019:10019",
            "--network", f"{PROJECT}_federation", "-e", "LUNAFL_SITE_NAME=rogue", "-e",
            "LUNAFL_SUPERLINK=superlink:9092", "-v", f"{self.work / 'rogue'}:/certs:ro", "-v",
            f"{self.work / 'data' / 'rogue'}:/data:ro", "-v", f"{PROJECT}_rogue-cache:/cache", HOSPITAL,
            check=False, timeout=240, name="rogue")
        self.podman("rm", "-f", name, check=False)
        self.podman("volume", "rm", "-f", f"{PROJECT}_rogue-cache", check=False)
        text = proc.stdout + proc.stderr
        nodes = self.online()
        self.check("a hospital whose key is not registered is refused",
                   proc.returncode != 0 and "Failed to activate SuperNode" in text and len(nodes) == len(SITES),
                   f"exit {proc.returncode}; "
                   f"{next((ln.strip() for ln in text.splitlines() if 'Failed to activate' in ln), text[-300:])}; "
                   f"nodes the SuperLink knows: {len(nodes)} (the registered hospitals)")

    # ---- the run, with a hospital killed mid-round ----
    def supernode_pid(self, service: str) -> int | None:
        """The host pid of the container's flower-supernode process (a child of its init)."""
        top = self.podman("top", self.container(service), "hpid", "args", check=False).stdout.splitlines()
        for line in top[1:]:
            hpid, _, args = line.strip().partition(" ")
            if "flower-supernode" in args:
                return int(hpid)
        return None

    def training(self, service: str) -> bool:
        """The SuperNode has received a train message whole and started its ClientApp for it.

        Killed earlier (while the message still arrives), the SuperLink counts it delivered and
        a node back online never answers it: the round then waits for round-timeout."""
        logs = self.podman("logs", self.container(service), check=False)
        text = logs.stdout + logs.stderr
        at = text.rfind("Receiving: train message")
        if at < 0 or "Start `flwr-clientapp` process" not in text[at:]:
            return False
        return "flwr-clientapp" in self.podman("top", self.container(service), "args", check=False).stdout

    def run_federation(self) -> None:
        results = self.volume_path("server-state") / "runs" / "federation"
        restarts0 = self.podman("inspect", "--format", "{{.RestartCount}}", self.container(VICTIM)).stdout.strip()
        t0 = time.perf_counter()
        self.up("run", profile="run")
        # mid-round 1: the handshake is done (handshake.json) and the victim's ClientApp is training
        self.wait("handshake done", lambda: (results / "handshake.json").exists() or self.run_exited(), 900)
        if self.run_exited():
            raise Failed(f"run exited before round 1:\n{self.run_log()[-4000:]}")
        self.wait(f"{VICTIM} training round 1", lambda: self.training(VICTIM), 300, every=1.0)
        time.sleep(2)
        pid = self.supernode_pid(VICTIM)
        if pid is None:
            raise Failed(f"no flower-supernode process in {VICTIM}")
        os.kill(pid, signal.SIGKILL)  # a crash: not `podman stop`/`kill`, which count as stopped by the user
        log(f"killed {VICTIM}'s SuperNode (host pid {pid}) while it trained round 1")
        self.wait("run finished", self.run_exited, 1800, every=5)
        seconds = time.perf_counter() - t0
        text = self.run_log()
        (self.logs / "run.log").write_text(text)
        code = self.state("run").get("ExitCode")
        restarts = self.podman("inspect", "--format", "{{.RestartCount}}", self.container(VICTIM)).stdout.strip()
        rounds = rows(results / "rounds.jsonl")
        events = rows(results / "events.jsonl")
        trained = sorted({(e["round"], e["site"]) for e in events if e["kind"] == "train"})
        evaluated = sorted({e["site"] for e in events if e["kind"] == "evaluate"})
        self.check("the run completed with metrics from both hospitals",
                   code == 0 and re.search(r"run \d+ completed", text) is not None
                   and {s for _, s in trained} == set(SITES) and evaluated == sorted(SITES),
                   f"`run` exit {code}; trained (round, site): {trained}; evaluated: {evaluated}; "
                   f"test ROC-AUC per round: {[r.get('test_roc_auc') for r in rounds]}")
        r1 = next((r for r in rounds if r["round"] == 1), {})
        self.check("a hospital killed mid-round is restarted by its restart policy and trains in a later round",
                   int(restarts or 0) > int(restarts0 or 0) and VICTIM in (r1.get("failed_sites") or [])
                   and (2, VICTIM) in trained and (1, VICTIM) not in trained,
                   f"{VICTIM}: restarts {restarts0} -> {restarts} (a restarted SuperNode is refused while the "
                   f"SuperLink still counts its old instance online, so it restarts until that lapses); round 1: "
                   f"sites trained {r1.get('sites_trained')}, failed {r1.get('failed_sites')}; "
                   f"{VICTIM} trained in rounds {[r for r, s in trained if s == VICTIM]}")
        self.figures["federation: `run` wall time (2 rounds, one hospital killed in round 1)"] = f"{seconds:.0f} s"
        for r in (r for r in rounds if r["round"] > 0):
            sent = {e["site"]: int(e["bytes-sent"]) for e in events
                    if e["kind"] == "train" and e["round"] == r["round"]}
            self.figures[f"round {r['round']}"] = (
                f"{r['wall_seconds']:.0f} s wall; server -> sites {r['bytes_down']:,} B, sites -> server "
                f"{r['bytes_up']:,} B; per site up: {', '.join(f'{s} {b:,} B' for s, b in sorted(sent.items()))}")
        self.results, self.run_text = results, text

    def run_exited(self) -> bool:
        return self.state("run").get("Status") == "exited"

    def run_log(self) -> str:
        proc = self.podman("logs", self.container("run"), check=False)
        return proc.stdout + proc.stderr

    def network_bytes(self) -> dict[str, int]:
        """Bytes through each hospital container's network interface (its /proc/net/dev)."""
        out = {}
        for site in SITES:
            dev = self.podman("exec", self.container(site), "cat", "/proc/net/dev", check=False).stdout
            rx = tx = 0
            for line in dev.splitlines()[2:]:
                name, _, rest = line.partition(":")
                if name.strip() != "lo" and rest.split():
                    rx += int(rest.split()[0])
                    tx += int(rest.split()[8])
            out[site] = (rx, tx)
        return out

    # ---- what a hospital refuses ----
    def check_refusals(self) -> None:
        """Two more runs, each refused at the handshake by both hospitals."""
        runs = {}
        # a run that sets a rehearsal setting
        env = dict(self.compose_env, LUNAFL_RUN_CONFIG=RUN_CONFIG + " fail-prob=0.5", LUNAFL_RUN_NAME="rehearsal")
        runs["rehearsal"] = self.refused_run(env, "refuses the run", "fail-prob=0.5")
        # a server of another release: the app it submits says 0.0.9
        other = self.work / "app-0.0.9"
        def ignore(folder: str, names: list[str]) -> set[str]:
            top = {".git", ".venv", "tests", "runs", "data", "build"} if Path(folder) == ROOT else set()
            return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}

        shutil.copytree(ROOT, other, ignore=ignore)
        init = other / "common" / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.0.9"'))
        self.chown(other, SERVER_UID)
        env = dict(self.compose_env, LUNAFL_RUN_NAME="other-release")
        runs["release"] = self.refused_run(env, "the server runs luna-fl 0.0.9, this site runs luna-fl 0.1.0",
                                           app=other)
        for site in SITES:  # and the hospitals' own logs say it too
            logs = self.podman("logs", self.container(site), check=False)
            said = [ln for ln in (logs.stdout + logs.stderr).splitlines() if "refuses the run" in ln]
            runs["rehearsal"] = (runs["rehearsal"][0], runs["rehearsal"][1] + f"; {site}'s log: "
                                 f"{len(said)} line(s) saying it refuses the run")
        self.check("a hospital refuses a rehearsal setting, naming it", runs["rehearsal"][0], runs["rehearsal"][1])
        self.check("a server of another release is named with both versions", runs["release"][0], runs["release"][1])

    def refused_run(self, env: dict[str, str], *expect: str, app: Path | None = None) -> tuple[bool, str]:
        name = f"{PROJECT}_refused"
        pod = self.podman("inspect", "--format", "{{.Pod}}", self.container("superlink")).stdout.strip()
        args = ["run", "--name", name, *(["--pod", pod] if pod else []), "--user", f"{SERVER_UID}:{SERVER_UID}",
                "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--init",
                "--security-opt", "no-new-privileges:true", "--network", f"container:{self.container('superlink')}",
                "-e", f"LUNAFL_RUN_CONFIG={env['LUNAFL_RUN_CONFIG']}",
                "-e", f"LUNAFL_RUN_NAME={env['LUNAFL_RUN_NAME']}",
                "-e", "LUNAFL_TEST_DATA=/test-data", "-e", "FLWR_HOME=/state/flwr-home",
                "-v", f"{self.work / 'certs' / 'superlink'}:/certs:ro", "-v", f"{PROJECT}_server-state:/state",
                "-v", f"{self.work / 'data' / 'server-test'}:/test-data:ro"]
        if app is not None:
            args += ["-v", f"{app}:/other-app:ro", "-e", "LUNAFL_APP=/other-app"]
        proc = self.podman(*args, SERVER, "run", check=False, timeout=900, name=f"refused-{env['LUNAFL_RUN_NAME']}")
        self.podman("rm", "-f", name, check=False)
        text = proc.stdout + proc.stderr
        hit = next((ln.strip() for ln in text.splitlines() if all(x in ln for x in expect)), "")
        return (proc.returncode != 0 and bool(hit),
                f"`run` exit {proc.returncode}; {hit[:400] or 'not named: ' + text[-1500:]}")

    # ---- teardown ----
    def teardown(self) -> None:
        """Everything of this compose project goes: containers, pods, networks, volumes."""
        env = getattr(self, "compose_env", self.env)
        for c in self.podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"name={PROJECT}",
                             check=False).stdout.split():
            out = self.podman("logs", c, check=False)
            (self.logs / f"container-{c}.log").write_text(out.stdout + out.stderr)
        try:
            self.compose("--profile", "run", "down", "-v", "-t", "5", env=env, check=False, timeout=300,
                         name="down")
        except (subprocess.TimeoutExpired, FileNotFoundError) as exc:
            log(f"compose down: {exc}")
        for kind, flag in (("container", "--filter"), ("pod", "--filter"), ("volume", "--filter"),
                           ("network", "--filter")):
            ids = self.podman(kind, "ls" if kind != "container" else "ps", *(["-a"] if kind == "container" else []),
                              "-q", flag, f"name={PROJECT}", check=False).stdout.split()
            if ids:
                self.podman(kind, "rm", "-f", *ids, check=False)
        left = {kind: self.podman(kind, "ls" if kind != "container" else "ps",
                                  *(["-a"] if kind == "container" else []), "-q", "--filter", f"name={PROJECT}",
                                  check=False).stdout.split() for kind in ("container", "pod", "volume", "network")}
        left = {k: v for k, v in left.items() if v}
        log("teardown: nothing of ours is left" if not left else f"teardown: LEFT {left}")
        if left:
            self.checks.append(("teardown leaves nothing running", False, str(left)))


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/e2e/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="working folder (default: a new one under /var/tmp)")
    p.add_argument("--keep-work", action="store_true", help="keep the working folder (certificates, data, logs)")
    p.add_argument("--rebuild", action="store_true", help="make the base images again even if they exist")
    p.add_argument("--remove-images", action="store_true", help="remove the images at the end")
    p.add_argument("--no-build", action="store_true", help="use the images as they are (a rerun of the checks)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("e2e: run as root (rootful podman: each hospital's uid is the host's uid)", file=sys.stderr)
        return 2
    for tool in ("podman", "podman-compose", "mmdebstrap"):
        if not shutil.which(tool):
            print(f"e2e: {tool} not found (docker/e2e.sh installs it)", file=sys.stderr)
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="luna-fl-e2e-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    e = E2E(work, logs)
    e.configure_podman()

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    t0 = time.perf_counter()
    rc = 1
    try:
        e.teardown()  # what an interrupted earlier run may have left
        e.images(args.rebuild, build=not args.no_build)
        e.check_hospital_image()
        e.prepare()
        forbidden = [p.read_bytes().strip() for p in (work / "certs").rglob("*") if p.is_file()]
        forbidden += [p.read_bytes().strip() for p in (work / "rogue").glob("auth.*")]
        e.check_layers(forbidden)
        t_fed = time.perf_counter()
        e.start_federation()
        e.check_hardening(["superlink", "gateway", *SITES])
        e.check_isolation()
        e.check_unregistered()
        net0 = e.network_bytes()
        e.run_federation()
        net1 = e.network_bytes()
        for site in SITES:
            rx, tx = (net1[site][0] - net0[site][0], net1[site][1] - net0[site][1])
            e.figures[f"{site} network (eth0, during `run`: handshake, 2 rounds, final evaluation; the victim's "
                      "counters restart with its container)"] = f"received {rx:,} B, sent {tx:,} B"
        e.check_hardening(["register", "run"])
        e.check_refusals()
        e.figures["federation, all (up, checks, run, refusals)"] = f"{time.perf_counter() - t_fed:.0f} s"
        rc = 0
    except Failed as exc:
        log(f"FAILED: {exc}")
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc})")
    finally:
        e.teardown()
        if args.remove_images:
            e.podman("rmi", "-f", SERVER, HOSPITAL, GATEWAY, BASE, check=False)
            e.podman("image", "prune", "-f", check=False)  # the builds' intermediate layers
        e.figures["e2e wall time"] = f"{time.perf_counter() - t0:.0f} s"
        print("\n== figures ==")
        for k, v in e.figures.items():
            print(f"{k}: {v}")
        print("\n== checks ==")
        for name, ok, _detail in e.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        if any(not ok for _, ok, _ in e.checks):
            rc = 1
        print(f"\nlogs: {logs}")
        if not args.keep_work and rc == 0:
            shutil.rmtree(work, ignore_errors=True)
            print("(working folder removed; --keep-work keeps it)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
