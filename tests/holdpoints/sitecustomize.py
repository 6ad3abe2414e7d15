"""Hold points for the deployment fault tests: test-only, never in an image or a run config.

The loopback harness (docker/loopback.py, ``Federation(..., holds=DIR)``) puts this folder
first on the PYTHONPATH of the SuperLink and SuperNodes it starts and sets
``LUNAFL_TEST_HOLDS=DIR``. Python imports ``sitecustomize`` at the start of every
interpreter, so the hook reaches every process those start (SuperExec, the ServerApp,
each ``flwr-clientapp``). Nothing in client/, common/ or server/ knows about it; a
deployed site has neither this folder nor the variable, and a coordinator's run
configuration cannot reach either.

A point is a name; the test arms it by creating ``DIR/<point>.arm``. The first process to
reach an armed point takes the file (a rename, so exactly one holds), writes
``DIR/<point>.reached`` with its pid, and blocks until ``DIR/<point>.release`` exists or
the process is killed. Unarmed points cost one failed rename. The points:

``<site>.train.<round>``   client.site.train_site, before the site trains
``<run-name>.server.aggregate.<round>``   server.guard.Guard.aggregate_train, once
                                      every reply of the round is in, before aggregating

``LUNAFL_TEST_HEARTBEAT=S`` also sets Flower's heartbeat interval to S seconds (Flower's
floor is 10; its default 30) in every process, so that a killed SuperNode is seen offline
after 2 x S seconds instead of a minute: the same detection, sooner.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.abc import MetaPathFinder
from pathlib import Path

HOLDS = os.environ.get("LUNAFL_TEST_HOLDS", "")
HEARTBEAT = os.environ.get("LUNAFL_TEST_HEARTBEAT", "")
MAX_HOLD_S = 900.0  # a test that died without releasing must not leave a process blocked forever


def hold(point: str) -> None:
    folder = Path(HOLDS)
    try:
        os.rename(folder / f"{point}.arm", folder / f"{point}.taken")
    except FileNotFoundError:
        return  # not armed, or another process holds it
    tmp = folder / f".{point}.reached.tmp"
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, folder / f"{point}.reached")
    print(f"[holdpoints] {point}: held (pid {os.getpid()})", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    while not (folder / f"{point}.release").exists():
        if time.monotonic() - t0 > MAX_HOLD_S:
            print(f"[holdpoints] {point}: never released; going on", file=sys.stderr, flush=True)
            return
        time.sleep(0.05)
    print(f"[holdpoints] {point}: released", file=sys.stderr, flush=True)


def _patch_site(module) -> None:
    original = module.train_site

    def train_site(cfg, data, arrays, server_round, **kwargs):
        hold(f"{data.name}.train.{server_round}")  # a site does not receive the run's name
        return original(cfg, data, arrays, server_round, **kwargs)

    module.train_site = train_site  # client.app imports the name after this module ran


def _patch_strategy(module) -> None:
    original = module.Guard.aggregate_train

    def aggregate_train(self, server_round, replies):
        replies = list(replies)  # every reply of the round is in before Flower calls this
        hold(f"{self.cfg.run_name}.server.aggregate.{self._round(server_round)}")
        return original(self, server_round, replies)

    module.Guard.aggregate_train = aggregate_train


def _patch_heartbeat(module) -> None:
    # before any Flower module imports the name (they copy it with ``from ... import``)
    module.HEARTBEAT_DEFAULT_INTERVAL = max(float(HEARTBEAT), module.HEARTBEAT_MIN_INTERVAL)


PATCHES = {"client.site": _patch_site, "server.guard": _patch_strategy}
if HEARTBEAT:
    PATCHES["flwr.common.constant"] = _patch_heartbeat


class _Finder(MetaPathFinder):
    """Runs the patch right after the target module executes, before anyone imports from it."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if HOLDS or HEARTBEAT:
    sys.meta_path.insert(0, _Finder())
