"""Training throughput: the ClientApp's step against a plain loop, DP-SGD, the DP signal, the GPU."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_throughput(cfg, reps: int) -> dict:
    """The ClientApp's training step against a plain PyTorch loop, same model and examples."""
    import numpy as np
    import torch

    from client.site import SiteData, train_site
    from common.data.loaders import balanced_positions, to_float
    from common.data.prepare import prepare
    from common.training import model as model_lib
    from common.training.engine import amp_active, autocast

    prep = prepare(cfg, progress=False)
    site = prep.plan.sites[0]
    data = SiteData(site.name, prep.cache, prep.cache.rows_of(site.train), prep.cache.rows_of(site.val))
    device = model_lib.resolve_device(cfg.device)
    torch.manual_seed(0)
    arrays = model_lib.get_arrays(model_lib.build_model(cfg.arch, cfg.norm))
    train_site(cfg, data, arrays, 0)  # warm-up: builds the warm model, touches the cache
    ours = [train_site(cfg, data, arrays, r + 1)[1]["images-per-s"] for r in range(reps)]

    # the plain loop: tensors already in memory, no augmentation, no bookkeeping
    pos = balanced_positions(prep.cache, data.train, cfg.neg_ratio, np.random.default_rng(0))
    x_all = torch.from_numpy(to_float(prep.cache.get(pos)))
    y_all = torch.from_numpy(prep.cache.label[pos].astype(np.float32))
    model = model_lib.build_model(cfg.arch, cfg.norm).to(device)
    cl = amp_active(device, cfg.amp)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    plain = []
    for rep in range(reps + 1):
        opt = model_lib.adam(list(model.parameters()), lr=cfg.lr)
        model.train()
        t0, n = time.perf_counter(), 0
        for _ in range(cfg.local_epochs):
            for i in range(0, len(pos) - 1, cfg.batch_size):
                x = x_all[i:i + cfg.batch_size].to(device)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                y = y_all[i:i + cfg.batch_size].to(device)
                opt.zero_grad(set_to_none=True)
                with autocast(device, cfg.amp):
                    out = model(x).reshape(-1).float()
                loss_fn(out, y).backward()
                opt.step()
                n += len(y)
        if rep > 0:  # the first pass warms up
            plain.append(n / (time.perf_counter() - t0))
    o, p = float(np.median(ours)), float(np.median(plain))
    return {"arch": cfg.arch, "image_size": cfg.image_size, "batch_size": cfg.batch_size, "amp": cfg.amp,
            "threads": torch.get_num_threads(), "clientapp_images_per_s": o, "plain_loop_images_per_s": p,
            "ratio": o / p}


def bench_dp(cfg, steps: int) -> dict:
    """DP-SGD (Opacus, ghost clipping + our Conv2d norm sampler; and hooks) vs non-DP."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from common.privacy.dpsgd import LocalDP
    from common.training.engine import train_one_epoch
    from common.training.model import adam, build_model

    n = steps * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g), (torch.arange(n) % 2).float())
    out: dict = {"arch": cfg.arch, "norm": "group", "image_size": cfg.image_size, "batch_size": cfg.batch_size}
    device = torch.device("cpu")
    for label, amp in (("nodp_fp32", False), ("nodp_amp", cfg.amp)):
        model = build_model(cfg.arch, "group")
        opt = adam(list(model.parameters()), lr=1e-3)
        train_one_epoch(model, DataLoader(ds, batch_size=cfg.batch_size), opt, device, amp=amp)  # warm-up
        out[label] = train_one_epoch(model, DataLoader(ds, batch_size=cfg.batch_size), opt, device,
                                     amp=amp)["images_per_s"]
    for mode in ("ghost", "hooks"):
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(cfg.arch, "group")
            dp = LocalDP("bench", n_patches=n, batches_per_epoch=steps, local_epochs=1, rounds=1, clip=1.0,
                         noise=1.0, target_epsilon=0.0, delta=1e-5, grad_sample_mode=mode,
                         ledger_path=Path(tmp) / "l.json")
            m, opt, crit, loader = dp.attach(model, adam(list(model.parameters()), lr=1e-3),
                                             DataLoader(ds, batch_size=cfg.batch_size), seed=0)
            train_one_epoch(m, loader, opt, device, criterion=crit)  # warm-up
            st = train_one_epoch(m, dp.loader(DataLoader(ds, batch_size=cfg.batch_size), 1), opt, device,
                                 criterion=crit)
            dp.detach(1)
            out[f"dp_{mode}"] = st["images_per_s"]
    out["ratio_dp_ghost_vs_nodp_fp32"] = out["dp_ghost"] / out["nodp_fp32"]
    out["ratio_dp_ghost_vs_nodp_amp"] = out["dp_ghost"] / out["nodp_amp"]
    out["ratio_dp_hooks_vs_nodp_fp32"] = out["dp_hooks"] / out["nodp_fp32"]
    return out


def bench_dp_signal(cfg, n_batches: int) -> dict:
    """Clipped signal against DP noise for site 0 of the run, from ``cfg.weights`` or random."""
    import math

    import torch

    from client.site import SiteData, local_dp
    from common.data.loaders import train_loader
    from common.data.prepare import prepare
    from common.privacy.dpsgd import clipped_signal, noise_norm
    from common.training import model as model_lib

    prep = prepare(cfg, progress=False)
    site = prep.plan.sites[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = SiteData(site.name, prep.cache, prep.cache.rows_of(site.train), prep.cache.rows_of(site.val),
                        state_dir=Path(tmp))
        loader = train_loader(data.cache, data.train, batch_size=cfg.batch_size, neg_ratio=cfg.neg_ratio,
                              augment=False, seed=0)
        ledger = local_dp(cfg, data, len(loader)).ledger  # the calibration a site of this run makes
    batches = [b for _, b in zip(range(n_batches), loader, strict=False)]
    steps = ledger.planned_steps
    out: dict = {"site": site.name, "weights": cfg.weights or "random", "epsilon": cfg.dp_epsilon,
                 "noise_multiplier": ledger.noise_multiplier, "clip": ledger.clip, "batch_size": cfg.batch_size,
                 "steps_per_site": steps, "sites": cfg.clients, "batches_measured": len(batches)}
    torch.manual_seed(cfg.seed)
    model = model_lib.build_model(cfg.arch, "group")
    if cfg.weights:
        model_lib.load_weights(model, cfg.weights)
    for which in model_lib.TRAIN_PARAMS:  # the weights stay as loaded: only gradients are taken
        n = sum(p.numel() for p in model_lib.set_trainable(model, which))
        sig = clipped_signal(model, batches, ledger.clip)
        noise = noise_norm(ledger.noise_multiplier, ledger.clip, cfg.batch_size, n)
        out[which] = {"weights_trained": n, **sig, "noise": noise, "snr_step": sig["signal"] / noise,
                      "snr_run": sig["signal"] / noise * math.sqrt(steps * cfg.clients)}
    return out




def bench_gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device on this machine"}
    from common.training.model import adam, build_model

    model = build_model("resnet50").cuda().to(memory_format=torch.channels_last)
    opt = adam(list(model.parameters()), lr=1e-3)
    x = torch.randn(256, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = (torch.arange(256, device="cuda") % 2).float()
    for i in range(25):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return {"available": True, "device": torch.cuda.get_device_name(0),
            "resnet50_224px_amp_images_per_s": 20 * 256 / (time.time() - t0)}
