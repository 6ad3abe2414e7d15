"""What happens at the end of every round (federated) or epoch (centralized).

Test evaluation when due, the round's row in ``rounds.jsonl``, the checkpoint, a
progress line with ETA; and at the end the summary with CIs, the plots and the final
model. Federated and centralized runs share it, so their folders compare one to one.

With ``--tracking mlflow`` the same rows, each site's events and the final files also go
to MLflow (:class:`MlflowSink`), from a background thread and only after the results
folder has them: the folder stays the record, and a tracking server that is slow, absent
or failing costs the run a warning, never a round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from analysis.plots import learning_curves, roc_curves, site_curves
from common.config import RunConfig
from common.evaluation import froc
from common.evaluation.holdout import TestSplit
from common.evaluation.metrics import OP_METRICS, binary_metrics
from experiment.mlflow_sink import MlflowSink
from experiment.results import NOTICE, RunDir

log = logging.getLogger("luna_fl")


class RunTracker:
    def __init__(self, cfg: RunConfig, run: RunDir, tester: TestSplit | None, device: torch.device,
                 start_round: int = 0) -> None:
        self.cfg = cfg
        self.run = run
        self.tester = tester
        self.device = device
        self.start_round = start_round
        self.t_start = time.time()
        self.last: tuple[np.ndarray, np.ndarray] | None = None  # test logits, labels of the newest eval
        self.last_round = -1
        self.history: dict[int, np.ndarray] = {}  # test logits of the newest evaluated rounds (operating point)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.pending: list[Future] = []
        self.sink = MlflowSink(cfg, run, start_round) if cfg.tracking == "mlflow" else None
        self._site_events: list[tuple[str, int, str, dict]] = []  # since the last round's row
        self._lock = threading.Lock()

    def event(self, kind: str, rnd: int, site: str, data: dict) -> None:
        """A site's event: into ``events.jsonl`` now, to the tracker with the round's row."""
        self.run.event(kind, rnd, site, data)
        if self.sink is not None:
            with self._lock:
                self._site_events.append((kind, rnd, site, data))

    def due(self, rnd: int) -> bool:
        return rnd == 0 or rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds

    def end_round(self, rnd: int, model: torch.nn.Module, row: dict[str, Any],
                  save_checkpoint: Callable[[int, dict], object] | None = None,
                  finalize: Callable[[], dict[str, Any]] | None = None) -> dict[str, float]:
        """Evaluate (if due), then save the checkpoint and write the round row; return test metrics.

        The checkpoint (about 100 MB for ResNet-50, fsynced) and the row are written by a
        background writer, in order, while the next round already runs; a row still means
        the round's checkpoint is complete. ``finalize`` adds figures measured after the
        test evaluation (the round's wall time).
        """
        self._raise_writer_error()
        test: dict[str, float] = {}
        if self.tester is not None and self.due(rnd):
            metrics, logits, labels = self.tester.run(model, self.device, self.cfg.amp)
            self.last, self.last_round = (logits, labels), rnd
            self.history = {r: z for r, z in self.history.items() if r >= rnd - 2} | {rnd: logits}
            test = metrics
        row = {"round": rnd, "data_passes": self.cfg.data_passes(rnd), "time": time.time(), **row,
               **{f"test_{k}": v for k, v in test.items()}}
        row.update(self._at_operating_point(row))
        if finalize is not None:
            row.update(finalize())
        with self._lock:
            events, self._site_events = self._site_events, []

        def write() -> None:
            if save_checkpoint is not None and rnd > 0:
                # before the row: a row means the round is complete and saved; the row also
                # travels in the checkpoint, so a crash between the two loses nothing
                save_checkpoint(rnd, row)
            self.run.round_row(row)
            if self.sink is not None:  # after the row: the tracker never has a round the folder lacks
                self.sink.log_round(row, events)
            self._progress(rnd, row)

        self.pending.append(self.writer.submit(write))
        return test

    def _at_operating_point(self, row: dict[str, Any]) -> dict[str, float]:
        """Test metrics of the model the operating point was chosen for (round ``op_model_round``:
        with fused site evaluation the previous round's), at that threshold."""
        rnd = row.get("op_model_round")
        if "op_threshold" not in row or rnd not in self.history or self.last is None:
            return {}
        m = binary_metrics(self.last[1], self.history[rnd], row["op_threshold"])
        return {f"test_op_{k}": m[k] for k in OP_METRICS}

    def _raise_writer_error(self, wait: bool = False) -> None:
        still = []
        for fut in self.pending:
            if wait or fut.done():
                fut.result()  # re-raises a failed checkpoint or row write here, in the round loop
            else:
                still.append(fut)
        self.pending = still

    def _progress(self, rnd: int, row: dict[str, Any]) -> None:
        if rnd == 0:
            if "test_roc_auc" in row:
                log.info("[round 0/%d] initial model: test ROC-AUC %.3f", self.cfg.rounds, row["test_roc_auc"])
            return
        done = rnd - self.start_round
        per_round = (time.time() - self.t_start) / max(done, 1)
        eta = per_round * (self.cfg.rounds - rnd)
        parts = [f"[round {rnd}/{self.cfg.rounds}] {row.get('wall_seconds', per_round):.1f}s",
                 f"ETA {_hms(eta)}"]
        if "train_loss" in row:
            parts.append(f"train loss {row['train_loss']:.4f}")
        if "overhead" in row and row["overhead"] is not None:
            parts.append(f"overhead {row['overhead']:.0%}")
        if row.get("val_roc_auc") is not None and math.isfinite(row["val_roc_auc"]):
            of = row.get("val_model_round", rnd)
            parts.append(f"site-val AUC {row['val_roc_auc']:.3f}" + (f" (round {of} model)" if of != rnd else ""))
        if "test_roc_auc" in row:
            parts.append(f"test AUC {row['test_roc_auc']:.3f} CPM {row.get('test_cpm', float('nan')):.3f} "
                         f"acc {row['test_accuracy']:.3f}")
        if "test_op_recall" in row:
            of = row["op_model_round"]
            which = row["op_rule"] if of == rnd else f"{row['op_rule']}, round {of} model"
            parts.append(f"at threshold {row['op_threshold']:g} ({which}): acc {row['test_op_accuracy']:.3f} "
                         f"recall {row['test_op_recall']:.3f} precision {row['test_op_precision']:.3f}")
        if row.get("dp_epsilon_max") is not None:
            parts.append(f"max site epsilon {row['dp_epsilon_max']:.2f}")
        if row.get("dp_central_epsilon") is not None:
            parts.append(f"central epsilon {row['dp_central_epsilon']:.2f}")
        if row.get("failed_sites"):
            parts.append(f"failed: {', '.join(row['failed_sites'])}")
        if row.get("rejected_sites"):
            parts.append(f"rejected: {', '.join(row['rejected_sites'])}")
        log.info(" | ".join(parts))

    def model_changed(self) -> None:
        """The model changed after the last round's test (e.g. re-estimated BatchNorm
        statistics): :meth:`finish` tests it again."""
        self.last = None

    def finish(self, model: torch.nn.Module, extra: dict[str, Any] | None = None,
               operating_point: dict[str, Any] | None = None) -> dict[str, Any]:
        """Final evaluation with CIs, summary.json, plots and model_final.pt; returns the summary.

        ``operating_point``: the threshold row chosen for the final model when it differs
        from the last round's (re-estimated BatchNorm statistics); else the newest round's."""
        self._raise_writer_error(wait=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.run.save_model("model_final.pt", state, self.cfg, round=self.cfg.rounds)
        wall = time.time() - self.t_start
        # a resumed run: this session's wall time, plus the rounds earlier sessions completed (their
        # start-up and the round a crash cut short are not in any row, so this is a lower bound)
        earlier = sum(float(r.get("wall_seconds") or 0.0) for r in self.run.rounds()
                      if 0 < int(r["round"]) <= self.start_round)
        summary: dict[str, Any] = {"notice": NOTICE, "config": self.cfg.to_dict(), "rounds": self.cfg.rounds,
                                   "data_passes": self.cfg.data_passes(self.cfg.rounds),
                                   "wall_seconds": wall, "resumed_after_round": self.start_round,
                                   "wall_seconds_all_sessions": wall + earlier, **(extra or {})}
        if self.tester is not None:
            if self.last is None or self.last_round != self.cfg.rounds:
                _, logits, labels = self.tester.run(model, self.device, self.cfg.amp)
                self.last = (logits, labels)
            logits, labels = self.last
            op = operating_point or next((r for r in reversed(self.run.rounds()) if "op_threshold" in r), None)
            summary["test"] = self.tester.final(logits, labels, self.run.path, seed=self.cfg.seed, operating_point=op)
            if summary["test"].get("operating_point"):
                log.info(operating_point_line(summary["test"]))
            self.run.save_predictions(self.tester.seriesuid, self.tester.xyz, labels, logits)
            roc_curves({self.run.path.name: (labels, logits)}, self.run.path / "roc.png")
            res = self.tester.cpm(logits)
            if res is not None:
                froc.plot_froc({self.run.path.name: res}, self.run.path / "froc.png")
        rows = self.run.rounds()
        if rows:
            learning_curves({self.run.path.name: rows}, self.run.path / "learning_curves.png", NOTICE)
            events = self.run.events()
            if any(e["kind"] in ("train", "evaluate") for e in events):
                site_curves(rows, events, self.run.path / "site_curves.png", self.run.path.name)
        self.run.write_json("summary.json", summary)
        if self.sink is not None:
            self.sink.finish(summary)
        return summary

    def abandon(self) -> None:
        """The run stopped with an error: mark the tracked run failed (bounded wait)."""
        if self.sink is not None:
            self.sink.close("FAILED", timeout=10.0)


def operating_point_line(test: dict[str, Any]) -> str:
    """One line, in the reference workload's form: accuracy, recall, precision at the chosen
    operating point, at 0.5, and at the other rules' thresholds (the same validation counts)."""
    op, m = test["operating_point"], test["metrics"]
    at = op["metrics"]
    return (f"final model, test split ({test['test_scans']} scans, {test['class_ratio'].split(' ')[0]}): "
            f"{100 * at['accuracy']:.1f}% accuracy, {100 * at['recall']:.1f}% recall, "
            f"{100 * at['precision']:.1f}% precision at threshold {op['threshold']:g} ({op['rule']}, chosen from "
            f"{op['chosen_from']}); at 0.5: {100 * m['accuracy']:.1f}% / {100 * m['recall']:.1f}% / "
            f"{100 * m['precision']:.1f}%"
            + "".join(f"; {rule} ({r['threshold']:g}): {100 * r['accuracy']:.1f}% / {100 * r['recall']:.1f}% / "
                      f"{100 * r['precision']:.1f}%"
                      for rule, r in op.get("by_rule", {}).items() if rule != op["rule"]))


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
