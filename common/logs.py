"""Logging for the command-line tools: concise lines on the console, everything in the
results folder's ``log.txt``. Flower's and Ray's own chatter stays at WARNING unless
``--verbose``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"
OURS = ("luna_fl", "common", "client", "server", "sim")


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # sim/run.py uses the in-process run_simulation on purpose (see its docstring)
        return record.levelno >= logging.WARNING and "run_simulation` function is deprecated" not in str(record.msg)


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not any(getattr(h, "_luna_console", False) for h in root.handlers):
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        h._luna_console = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for name in ("ray", "filelock", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # Flower keeps its own console handler and logs at DEBUG; quiet it, don't echo it twice.
    import flwr.supercore.logger as _flwr_logger  # noqa: F401 - creates Flower's handler, which we then filter

    flwr = logging.getLogger("flwr")
    flwr.propagate = False
    for h in flwr.handlers:
        h.setLevel(logging.INFO if verbose else logging.WARNING)
        if not verbose and not any(isinstance(f, _WarningsOnly) for f in h.filters):
            h.addFilter(_WarningsOnly())  # Flower resets handler levels when a simulation starts
    for name in OURS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def log_to_file(path: Path) -> None:
    """Also write every log line to ``path`` (appending, so a resumed run keeps its history)."""
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_luna_file", None) == str(path):
            return
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    fh._luna_file = str(path)  # type: ignore[attr-defined]
    root.addHandler(fh)
    flwr = logging.getLogger("flwr")
    if not flwr.propagate:
        fh_flwr = logging.FileHandler(path)
        fh_flwr.setFormatter(fh.formatter)
        fh_flwr.setLevel(logging.INFO)
        flwr.addHandler(fh_flwr)
