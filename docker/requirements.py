"""The pinned requirements of one image, read from pyproject.toml (the one place that pins them).

    python docker/requirements.py hospital   # what client/ and common/ import: a hospital's image
    python docker/requirements.py server     # every dependency of the project (the server image)

``[tool.luna-fl.images] hospital`` names the distributions a hospital needs, without
versions; the versions come from ``[project] dependencies``. Extras are dropped for the
hospital (``flwr[simulation]`` becomes ``flwr``: a SuperNode needs no Ray). torch and
torchvision are left out of both lists: the Dockerfile installs them in a layer of their
own (same pins, checked by tests/docker). Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TORCH = ("torch", "torchvision")  # their own layer (docker/Dockerfile)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(pyproject: Path = PYPROJECT) -> dict[str, tuple[str, str, str]]:
    """canonical name -> (name, extras, version) of every ``[project] dependencies`` entry."""
    out = {}
    for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        m = PIN.match(dep.strip())
        if not m:
            raise ValueError(f"{pyproject}: dependency {dep!r} is not pinned as name==version")
        out[canonical(m.group(1))] = (m.group(1), m.group(2) or "", m.group(3))
    return out


def hospital_names(pyproject: Path = PYPROJECT) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["tool"]["luna-fl"]["images"]["hospital"])


def requirements(image: str, pyproject: Path = PYPROJECT) -> list[str]:
    """``name==version`` lines of ``image`` (hospital or server), torch and torchvision excluded."""
    pinned = pins(pyproject)
    if image == "server":
        return [f"{n}{e}=={v}" for key, (n, e, v) in pinned.items() if key not in TORCH]
    if image != "hospital":
        raise ValueError(f"image {image!r}: choose hospital or server")
    lines = []
    for name in hospital_names(pyproject):
        key = canonical(name)
        if key not in pinned:
            raise ValueError(f"[tool.luna-fl.images] hospital names {name!r}, which [project] dependencies "
                             "does not pin; add it there first")
        if key not in TORCH:
            lines.append(f"{pinned[key][0]}=={pinned[key][2]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/requirements.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", choices=("hospital", "server"))
    p.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = p.parse_args(argv)
    try:
        print("\n".join(requirements(args.image, args.pyproject)))
    except (ValueError, KeyError) as exc:
        print(f"requirements.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
