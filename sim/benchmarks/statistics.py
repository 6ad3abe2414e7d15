"""BatchNorm statistics under averaging: a run's final model with averaged vs site-re-estimated statistics."""

from __future__ import annotations

import json
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

    from common.data import prepare
    from common.data.loaders import eval_loader
    from common.evaluation.test_split import TestSplit
    from common.training import model as model_lib
    from experiment.results import RunDir

    run, cfg = RunDir.open_for_resume(run_dir)
    saved = json.loads(run.config_path.read_text())  # the very data and cache the run used
    cfg = cfg.replace(data=saved["data_root"], cache_dir=str(Path(saved["cache"]).parent))
    prep = prepare(cfg, progress=False)
    device = model_lib.resolve_device("cpu")
    model = model_lib.build_model(cfg.arch, cfg.norm)
    model.load_state_dict(torch.load(run.path / "model_final.pt", weights_only=True)["model"])
    test = TestSplit.from_prepared(prep)
    averaged, _, _ = test.run(model, device)
    stats: dict[str, np.ndarray] = {}
    total = 0
    for site in prep.plan.sites:
        local = model_lib.build_model(cfg.arch, cfg.norm)
        local.load_state_dict(model.state_dict())
        for m in local.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the pass, not an exponential one
        local.train()
        rows = prep.cache.rows_of(site.train)
        with torch.no_grad():
            for x, _ in eval_loader(prep.cache, rows, batch_size=64):
                local(x)
        own = local.state_dict()
        for k in own:
            if k.endswith(("running_mean", "running_var")):
                stats[k] = stats.get(k, 0) + own[k].numpy() * len(rows)
        total += len(rows)
    model_lib.set_arrays(model, {k: v / total for k, v in stats.items()})
    re_estimated, _, _ = test.run(model, device)
    keep = ("roc_auc", "cpm", "accuracy", "loss")
    return {"run": str(run.path), "averaged": {k: averaged[k] for k in keep},
            "re_estimated_at_sites": {k: re_estimated[k] for k in keep}}
