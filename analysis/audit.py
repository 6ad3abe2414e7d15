"""A privacy audit: a loss-threshold membership-inference attack on a finished run.

Members are patches of the sites' training scans, non-members patches of the held-out
test scans. The attacker scores each patch by the negative BCE loss of the final global
model (members tend to have lower loss) and we report the attack's ROC-AUC and its
true-positive rate at 1% false-positive rate. Members and non-members are drawn in equal
numbers within each class, so the attack cannot win by telling nodules from
non-nodules. An AUC near 0.5 means the model's losses leak little about membership.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from common.data.cache import open_cache
from common.data.loaders import eval_loader
from common.evaluation.metrics import bce_terms, bootstrap, roc_auc, roc_curve
from common.training.engine import predict
from experiment.results import RunDir

log = logging.getLogger(__name__)


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_target: float = 0.01) -> float:
    fpr, tpr = roc_curve(y, score)
    return float(np.interp(fpr_target, fpr, tpr))


def membership_audit(run_dir: Path | str, max_per_group: int = 1000, seed: int = 0, n_boot: int = 500) -> dict:
    """Run the attack on ``run_dir``'s final model; writes and returns ``audit.json``'s content."""
    rd = RunDir.open(run_dir, needs=("sites.json", "model_final.pt"))
    cfg = rd.config()
    cache = open_cache(Path(rd.saved_entry("cache")))
    plan = rd.plan()
    model = rd.final_model(cfg)
    members = cache.rows_of([u for s in plan.sites for u in s.train])
    outsiders = cache.rows_of(plan.test)
    rng = np.random.default_rng(seed)
    chosen_m, chosen_o = [], []
    for label in (0, 1):
        m = members[cache.label[members] == label]
        o = outsiders[cache.label[outsiders] == label]
        k = min(len(m), len(o), max_per_group // 2 if label == 1 else max_per_group)
        chosen_m.append(rng.choice(m, k, replace=False))
        chosen_o.append(rng.choice(o, k, replace=False))
    pos = np.concatenate(chosen_m + chosen_o)
    is_member = np.concatenate([np.ones(sum(len(c) for c in chosen_m)), np.zeros(sum(len(c) for c in chosen_o))])
    logits, labels = predict(model, eval_loader(cache, pos), torch.device("cpu"))
    loss = bce_terms(labels, logits)
    score = -loss

    def attack_auc(i: np.ndarray) -> dict[str, float]:
        return {"auc": roc_auc(is_member[i], score[i]) if 0 < is_member[i].sum() < len(i) else np.nan}

    auc = attack_auc(np.arange(len(score)))["auc"]
    ci = bootstrap(attack_auc, np.arange(len(score)), ("auc",), n_boot=n_boot, seed=seed)["auc"]
    result = {
        "attack": "loss threshold (score = -BCE loss of the final global model)",
        "members": "patches of the sites' training scans", "non_members": "patches of the held-out test scans",
        "n_members": int(is_member.sum()), "n_non_members": int((1 - is_member).sum()),
        "attack_auc": auc, "attack_auc_ci95": list(ci),
        "tpr_at_1pct_fpr": tpr_at_fpr(is_member, score, 0.01),
        "mean_loss_members": float(loss[is_member == 1].mean()),
        "mean_loss_non_members": float(loss[is_member == 0].mean()),
        "dp": cfg.dp, "dp_epsilon_target": cfg.dp_epsilon or None,
    }
    rd.write_json("audit.json", result)
    return result
