"""Evaluation of a global model on the held-out test split, for every kind of run.

The same object serves the federated server (after each round) and the centralized
baseline (after each epoch): classification metrics at the natural class ratio of the
test candidates, LUNA16's CPM from the candidate probabilities, and at the end 95%
bootstrap confidence intervals over patients, the LUNA16 submission CSV and the plots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.loaders import eval_loader
from common.data.luna16 import Luna16
from common.evaluation import froc
from common.evaluation.metrics import bootstrap_ci, sigmoid
from common.training.engine import evaluate

log = logging.getLogger(__name__)


def findings(luna: Luna16, scans: list[str]) -> tuple[list[froc.Finding], list[froc.Finding]]:
    keep = set(scans)
    nod = [froc.Finding(n.seriesuid, *n.xyz, n.diameter_mm) for n in luna.annotations if n.seriesuid in keep]
    exc = [froc.Finding(n.seriesuid, *n.xyz, n.diameter_mm) for n in luna.excluded if n.seriesuid in keep]
    return nod, exc


@dataclass
class TestSplit:
    """The held-out test scans of a prepared data set."""

    positions: np.ndarray
    scans: list[str]
    seriesuid: np.ndarray
    xyz: np.ndarray
    nodules: list[froc.Finding]
    excluded: list[froc.Finding]
    loader: torch.utils.data.DataLoader

    @classmethod
    def from_prepared(cls, prepared, batch_size: int = 64) -> TestSplit:
        cache = prepared.cache
        positions = cache.rows_of(prepared.plan.test)
        nod, exc = findings(prepared.luna, prepared.plan.test)
        return cls(positions, sorted(prepared.plan.test), cache.seriesuid[positions], cache.xyz[positions],
                   nod, exc, eval_loader(cache, positions, batch_size))

    def marks(self, logits: np.ndarray) -> list[froc.Mark]:
        p = sigmoid(logits)
        return [froc.Mark(str(u), float(x), float(y), float(z), float(pr))
                for u, (x, y, z), pr in zip(self.seriesuid, self.xyz, p, strict=True)]

    def cpm(self, logits: np.ndarray, n_bootstrap: int = 0, seed: int = 0) -> froc.FROCResult | None:
        if not self.nodules or not np.isfinite(logits).all():
            if not np.isfinite(logits).all():
                log.warning("the model gives non-finite outputs on the test split; CPM is undefined")
            return None
        return froc.compute_froc(self.marks(logits), self.nodules, self.scans, self.excluded,
                                 n_bootstrap=n_bootstrap, seed=seed)

    def run(self, model: torch.nn.Module, device: torch.device, amp: bool = False
            ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """Metrics (with ``cpm``) and the logits and labels of every test candidate."""
        metrics, logits, labels = evaluate(model, self.loader, device, amp)
        res = self.cpm(logits)
        metrics["cpm"] = res.cpm if res is not None else float("nan")
        return metrics, logits, labels

    def final(self, logits: np.ndarray, labels: np.ndarray, out: Path, seed: int = 0, n_boot: int = 1000,
              operating_point: dict | None = None) -> dict:
        """Point estimates with 95% CIs over patients; writes submission.csv; returns the summary.

        ``operating_point``: a round row holding ``op_threshold`` (chosen on validation data,
        never on this split); the summary then also gives the threshold metrics there.
        """
        from common.evaluation.metrics import OP_METRICS, OPERATING_RULES, binary_metrics, choose_threshold

        point = binary_metrics(labels, logits)
        ci = bootstrap_ci(labels, logits, self.seriesuid, n_boot=n_boot, seed=seed)
        res = self.cpm(logits, n_bootstrap=n_boot, seed=seed)
        froc.write_submission(out / "submission.csv", self.marks(logits))
        summary: dict[str, Any] = {
            "metrics": point,
            "ci95": {k: list(v) for k, v in ci.items()},
            "froc": res.to_dict() if res is not None else None,
            "class_ratio": f"1:{(len(labels) - labels.sum()) / max(labels.sum(), 1):.1f} "
                           "(natural: all test candidates)",
            "test_scans": len(self.scans),
            "test_candidates": int(len(labels)),
        }
        if operating_point is not None:
            t = float(operating_point["op_threshold"])
            at = binary_metrics(labels, logits, t)
            op_ci = bootstrap_ci(labels, logits, self.seriesuid, n_boot=n_boot, seed=seed, names=OP_METRICS,
                                 threshold=t)
            n_pos, n_neg = operating_point.get("op_val_positives"), operating_point.get("op_val_negatives")
            sites = operating_point.get("op_sites")
            where = (f"{len(sites)} sites' summed validation counts" if sites else "the pooled validation split")
            summary["operating_point"] = {
                "threshold": t, "rule": operating_point.get("op_rule"),
                "chosen_from": f"{where} ({n_pos} positives, {n_neg} negatives)",
                "model_round": operating_point.get("op_model_round"),
                "model": operating_point.get("op_model", "the model of that round"),
                "sites": sites,
                "validation": {k[len("op_val_"):]: v for k, v in operating_point.items() if k.startswith("op_val_")},
                "metrics": {k: at[k] for k in OP_METRICS},
                "ci95": {k: list(v) for k, v in op_ci.items()},
            }
            counts = operating_point.get("op_counts")
            if counts:  # the same validation counts under every rule: the trade-off a user picks from
                summary["operating_point"]["by_rule"] = {
                    rule: {"threshold": float(c["threshold"]), "val_recall": c["val_recall"],
                           **{k: v for k, v in binary_metrics(labels, logits, float(c["threshold"])).items()
                              if k in OP_METRICS}}
                    for rule in OPERATING_RULES if (c := choose_threshold(counts, rule)) is not None}
        if res is not None:
            summary["metrics"]["cpm"] = res.cpm
            summary["ci95"]["cpm"] = list(res.cpm_ci) if res.cpm_ci else None
        return summary

