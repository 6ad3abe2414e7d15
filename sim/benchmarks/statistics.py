"""BatchNorm statistics under averaging: a run's final model with averaged vs site-re-estimated statistics."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_bn_statistics(run_dir: Path) -> dict:
    """BatchNorm under averaging: a finished federated run's final model on the test split
    with its averaged running statistics, against the same weights with statistics
    re-estimated at every site (a pass over the site's own training patches in train mode,
    no weight changed) and averaged by examples as the server would: what sites could
    send instead of the statistics their local training left behind."""
    import numpy as np
    import torch

    from common.data.loaders import eval_loader
    from common.data.prepare import prepare
    from common.evaluation.holdout import TestSplit
    from common.training import model as model_lib
    from common.training.engine import bn_statistics
    from experiment.results import RunDir

    run, cfg = RunDir.open_for_resume(run_dir)
    cfg = cfg.replace(bn_stats="averaged")  # the arm to compare against
    saved = json.loads(run.config_path.read_text())  # the very data and cache the run used
    cfg = cfg.replace(data=saved["data_root"], cache_dir=str(Path(saved["cache"]).parent))
    prep = prepare(cfg, progress=False)
    device = model_lib.resolve_device("cpu")
    model = model_lib.build_model(cfg.arch, cfg.norm)
    model.load_state_dict(torch.load(run.path / "model_final.pt", weights_only=True)["model"])
    test = TestSplit.from_prepared(prep)

    def tested() -> dict:  # point estimates and 95% CIs over patients, as a run's summary.json has them
        _, logits, labels = test.run(model, device)
        with tempfile.TemporaryDirectory() as tmp:
            s = test.final(logits, labels, Path(tmp), seed=cfg.seed)
        return {"metrics": {k: s["metrics"][k] for k in ("roc_auc", "cpm", "accuracy", "recall", "loss")},
                "ci95": {k: s["ci95"][k] for k in ("roc_auc", "cpm")}}

    averaged = tested()
    stats: dict[str, np.ndarray] = {}
    total = 0
    for site in prep.plan.sites:  # what each site sends under --bn-stats sites
        rows = prep.cache.rows_of(site.train)
        for k, v in bn_statistics(model, eval_loader(prep.cache, rows, batch_size=64), device).items():
            stats[k] = stats.get(k, 0) + v * len(rows)
        total += len(rows)
    model_lib.set_arrays(model, {k: v / total for k, v in stats.items()})
    return {"run": str(run.path), "averaged": averaged, "re_estimated_at_sites": tested()}
