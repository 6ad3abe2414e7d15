"""Experiment tracking in MLflow: a run's configuration, every round's row and every site's
figures, its plots and final model, logged from a background thread after the results folder
has them; a tracker that fails is a warning, never the end of a run."""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.atomic import atomic_write_json
from common.config import RunConfig
from experiment.results import NOTICE, RunDir

log = logging.getLogger(__name__)


MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MLFLOW_FILE = "mlflow.json"  # in the results folder: where the run is tracked (for --resume)
# per-site metric names: <metric>/<site>, so the MLflow UI groups one metric of every site
TRAIN_KEYS = {"train-loss": "train_loss", "train-examples": "train_examples", "train-seconds": "train_seconds",
              "images-per-s": "images_per_s", "bytes-sent": "bytes_up", "dp-epsilon": "dp_epsilon"}
ARTIFACTS = (("learning_curves.png", "plots"), ("site_curves.png", "plots"), ("roc.png", "plots"),
             ("froc.png", "plots"), ("summary.json", "results"), ("config.json", "results"),
             ("site_summary.csv", "results"), ("handshake.json", "results"), ("model_final.pt", "model"))


def mlflow_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric keys replaced by ``_``."""
    return re.sub(r"[^\w.\- ]", "_", name).strip(".") or "_"


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A ``rounds.jsonl`` row as MLflow metrics: every finite number under its own key, the
    failed and rejected site lists as counts (per-site figures come from the events)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "time":
            continue
        if k in ("failed_sites", "rejected_sites") and isinstance(v, list):
            v = len(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def site_metrics(kind: str, site: str, data: dict[str, Any]) -> dict[str, float]:
    """One site event as MLflow metrics: ``train_loss/site-0``, ``val_roc_auc/site-0``, ..."""
    if kind == "train":
        named = {TRAIN_KEYS[k]: v for k, v in data.items() if k in TRAIN_KEYS}
    elif kind == "evaluate":
        named = {"val_" + k.replace("-", "_"): v for k, v in data.items()}
    elif kind in ("failure", "rejected"):
        named = {kind: 1.0}
    else:
        return {}
    s = mlflow_key(site)
    return {f"{k}/{s}": float(v) for k, v in named.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flushed_in(kind: str, rnd: int, cfg: RunConfig) -> int:
    """The round whose end sends an event of round ``rnd`` to the tracker: the round it
    arrives in. Under --site-eval fused a site evaluates round r's model inside round r+1's
    training call (the last round's model in its own phase, before that round ends)."""
    if kind == "evaluate" and cfg.site_eval == "fused" and rnd < cfg.rounds:
        return rnd + 1
    return rnd


def _redact(uri: str) -> str:
    """A tracking URI fit for a log line: no user name or password."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    return uri


def default_tracking_uri(results_parent: Path) -> str:
    return f"sqlite:///{results_parent.resolve() / 'mlflow.db'}"


class MlflowSink:
    """Logs one run to MLflow from a background thread; a failure is a warning, never an error.

    Every call only queues work. The first operation that fails (after MLflow's own bounded
    retries) is logged as a warning naming the server, and the sink drops everything after
    it: the results folder has it all, and a later ``--resume`` catches the tracker up.
    On ``--resume`` the run id in ``mlflow.json`` is continued, and the rounds the tracker
    does not have yet (up to ``done_round``) are sent from ``rounds.jsonl`` and
    ``events.jsonl`` first; a run the store does not know (another ``--tracking-uri``,
    tracking switched on later) gets a new MLflow run filled the same way.
    """

    def __init__(self, cfg: RunConfig, run: RunDir, done_round: int = 0, attach: dict | None = None) -> None:
        """``attach``: the ``mlflow.json`` of a finished run, to add files to it (reports)."""
        for k, v in MLFLOW_HTTP_BOUNDS.items():
            os.environ.setdefault(k, v)
        self.cfg, self.run = cfg, run
        self.local = not cfg.tracking_uri
        self.uri = cfg.tracking_uri or default_tracking_uri(run.path.parent)
        if attach is not None and not (cfg.tracking_uri and _redact(cfg.tracking_uri) == attach["tracking_uri"]):
            self.uri = attach["tracking_uri"]  # where it was logged (the config may hold credentials)
        self.client: Any = None
        self.run_id: str | None = None
        self.failed = False
        self.dropped = 0
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self.thread.start()
        if attach is None:
            self._put(self._open, done_round)
        else:
            self.run_id = attach["run_id"]
            self._put(self._connect)

    # ---- the public, non-blocking calls ----
    def log_round(self, row: dict[str, Any], events: Iterable[tuple[str, int, str, dict]]) -> None:
        self._put(self._log_round, dict(row), list(events))

    def log_files(self, files: Iterable[tuple[Path, str]]) -> None:
        self._put(self._log_files, list(files))

    def finish(self, summary: dict[str, Any] | None = None, timeout: float = 120.0) -> None:
        """Send the final figures and files, close the run and wait for the queue (bounded)."""
        if summary is not None and "test" in summary:
            self._put(self._log_final, summary)
        self.log_files((self.run.path / name, where) for name, where in ARTIFACTS)
        self.close("FINISHED", timeout)

    def close(self, status: str, timeout: float) -> None:
        self._put(self._terminate, status)
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("MLflow tracking at %s is still busy after %.0f s; the run ends without waiting for it "
                        "(its results folder %s has everything)", _redact(self.uri), timeout, self.run.path)
        elif self.dropped:
            log.warning("MLflow: %d update(s) were not sent to %s after the failure above; %s has them",
                        self.dropped, _redact(self.uri), self.run.path)

    # ---- the worker ----
    def _put(self, fn: Callable[..., None], *args: Any) -> None:
        self.queue.put((fn, args))

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            fn, args = item
            if self.failed:
                self.dropped += fn is not self._terminate
                continue
            t0 = time.monotonic()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - the tracker must never stop a federation
                self.failed = True
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("MLflow tracking at %s failed after %.1f s (%s: %s); the run goes on without it and "
                            "its results folder %s stays the record", _redact(self.uri), time.monotonic() - t0,
                            type(exc).__name__, first[:300], self.run.path)

    def _connect(self) -> None:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # MLflow 3.17's SQL store on SQLAlchemy 2.1 (flwr's pin) warns about its own mapper options
        warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
        from mlflow import MlflowClient

        self.client = MlflowClient(self.uri)

    def _artifact_root(self) -> str | None:
        """Files beside a local SQLite store (MLflow's own default is ./mlruns in whatever
        folder the run started from); a server decides for itself."""
        if self.local:
            return (self.run.path.parent / "mlartifacts").resolve().as_uri()
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        return None

    def _open(self, done_round: int) -> None:
        from mlflow.entities import Param

        self._connect()
        c = self.client
        exp = c.get_experiment_by_name(self.cfg.tracking_experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            exp_id = c.create_experiment(self.cfg.tracking_experiment, artifact_location=self._artifact_root())
        saved = _read_json(self.run.path / MLFLOW_FILE)
        existing = None
        if saved and saved.get("tracking_uri") == _redact(self.uri) and saved.get("run_id"):
            try:
                existing = c.get_run(saved["run_id"])
            except Exception:  # noqa: BLE001 - deleted there: start a new run and fill it
                log.warning("MLflow: run %s is not in %s any more; logging to a new run", saved["run_id"],
                            _redact(self.uri))
        params = {k: str(v) for k, v in self.cfg.to_dict().items()}
        if existing is not None:
            self.run_id = existing.info.run_id
            c.update_run(self.run_id, status="RUNNING")
            old = existing.data.params
            for k, v in params.items():
                if k in old and old[k] != v:  # a setting --resume may change (e.g. --rounds): MLflow
                    c.set_tag(self.run_id, f"resumed.{k}", v)  # params are write-once
            new = [Param(k, v) for k, v in params.items() if k not in old]
            logged_upto = int(existing.data.metrics.get("round", -1))
            log.info("MLflow: continuing run %s in %s", self.run_id, _redact(self.uri))
        else:
            tags = {"mlflow.note.content": NOTICE, "luna_fl.mode": self.cfg.mode,
                    "luna_fl.results_folder": str(self.run.path.resolve()), "mlflow.source.name": "luna-fl"}
            r = c.create_run(exp_id, run_name=self.run.path.name, tags=tags)
            self.run_id = r.info.run_id
            new = [Param(k, v) for k, v in params.items()]
            logged_upto = -1
            atomic_write_json(self.run.path / MLFLOW_FILE, {
                "tracking_uri": _redact(self.uri), "experiment": self.cfg.tracking_experiment,
                "experiment_id": exp_id, "run_id": self.run_id})
            log.info("MLflow: run %s in %s (experiment %s)", self.run_id, _redact(self.uri),
                     self.cfg.tracking_experiment)
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(self.run_id, params=new[i:i + 100])
        if done_round > 0 and logged_upto < done_round:  # (a run resumed at round 0 redoes round 0 live)
            self._catch_up(logged_upto, done_round)

    def _catch_up(self, after: int, upto: int) -> None:
        """Send rounds ``after+1..upto`` from the results folder (what a live run would have sent)."""
        latest: dict[tuple[str, int, str], dict] = {}  # a round repeated after a resume: its last copy
        for e in self.run.events():
            latest[(e["kind"], int(e["round"]), e["site"])] = e
        by_round: dict[int, list[tuple[str, int, str, dict]]] = {}
        for (kind, rnd, site), e in latest.items():
            by_round.setdefault(flushed_in(kind, rnd, self.cfg), []).append((kind, rnd, site, e))
        for row in self.run.rounds():
            if after < int(row["round"]) <= upto:
                self._log_round(row, by_round.get(int(row["round"]), []))

    def _log_round(self, row: dict[str, Any], events: list[tuple[str, int, str, dict]]) -> None:
        from mlflow.entities import Metric

        step, ts = int(row["round"]), int(row.get("time", time.time()) * 1000)
        values: dict[tuple[str, int], float] = {}
        for kind, rnd, site, data in events:
            for k, v in site_metrics(kind, site, data).items():
                values[(k, int(rnd))] = v
        for k, v in row_metrics(row).items():
            values[(k, step)] = v
        # "round" last: once it is stored, the whole round is (a resume reads it back)
        items = sorted(values.items(), key=lambda kv: kv[0][0] == "round")
        metrics = [Metric(k, v, ts, s) for (k, s), v in items]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _log_final(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(summary.get("rounds", 0))
        vals = {f"final_{k}": v for k, v in summary["test"].get("metrics", {}).items()}
        for k, (lo, hi) in ((k, ci) for k, ci in summary["test"].get("ci95", {}).items() if ci):
            vals[f"final_{k}_ci95_low"], vals[f"final_{k}_ci95_high"] = lo, hi
        metrics = [Metric(mlflow_key(k), float(v), ts, step) for k, v in vals.items()
                   if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _log_files(self, files: list[tuple[Path, str]]) -> None:
        for path, where in files:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path), where)

    def _terminate(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_report_to_runs(run_dirs: Iterable[Path], files: Iterable[Path], timeout: float = 60.0) -> None:
    """Attach a comparison report's files to every compared run that is tracked in MLflow
    (its results folder has ``mlflow.json``); a failure is a warning."""
    files = [Path(f) for f in files]
    for d in map(Path, run_dirs):
        saved = _read_json(d / MLFLOW_FILE)
        config = _read_json(d / "config.json")
        if not saved or not config:
            continue
        sink = MlflowSink(RunConfig.from_dict(config["config"]), RunDir(d), attach=saved)
        sink.log_files((f, "report") for f in files)
        sink.queue.put(None)
        sink.thread.join(timeout)
