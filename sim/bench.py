"""Benchmarks: what a federation costs beyond the training it coordinates.

    python sim/bench.py                 # everything, about 30 min on a 2-core CPU
    python sim/bench.py --quick         # tiny sizes, a minute (what the tests run)
    python sim/bench.py --sections throughput,dp

Prints a table and writes JSON (``--out``, default ``bench.json``). Sections:

throughput  the ClientApp's training step (common engine, data from the patch cache,
            augmentation) against a plain PyTorch loop on the same model, examples and
            batch size in this process: images/s and their ratio
overhead    federation overhead per round, 1 - (sites' training time / parallel slots) /
            round wall time, at the demo workload and at 8, 32 and 100 simulated sites, and
            where the rest of a round goes (from the sites' own clocks in events.jsonl);
            peak memory of every process of the simulation (PSS: shared pages counted once)
wire        bytes per round per site with float32, float16 and bfloat16 updates, and each
            one's final test AUC
dp          DP-SGD (Opacus) against non-DP training throughput, same model and input size
dpsignal    will DP-SGD learn on this data? For one site of the run (--dp-epsilon, --weights):
            the clipped gradient a step keeps (per-patch gradients clipped and averaged over
            a batch) against the norm of the noise added to it, for all weights and for
            norms+head, per step and over the whole run (an optimistic bound: it assumes the
            clipped gradient keeps its direction for all steps of all sites)
cache       cache build rate on full-size (512 x 512) synthetic scans, cache read rate
            against the training rate
gpu         ResNet-50 at 224 px with AMP + channels_last, and sites sharing one GPU (only
            when CUDA is available)

Figures are measurements of this machine at this moment; rerun to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("throughput", "overhead", "wire", "dp", "dpsignal", "bnstats", "cache", "gpu")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
class MemoryWatch:
    """Peak PSS of a process and all its descendants (Ray's too), sampled every second."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_by_name = pid, 0, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total, by = 0, {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    pss = p.memory_full_info().pss
                    name = p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += pss
                by[name] = max(by.get(name, 0), pss)
            if total > self.peak:
                self.peak, self.peak_by_name = total, by
            self._stop.wait(1.0)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join(timeout=5)
        actors = {k: v for k, v in self.peak_by_name.items() if "ClientAppActor" in k or k.startswith("ray::")}
        return {"peak_pss_gib": self.peak / 2**30,
                "largest_actor_pss_gib": max(actors.values(), default=0) / 2**30,
                "by_process_gib": {k: round(v / 2**30, 3) for k, v in sorted(self.peak_by_name.items(),
                                                                              key=lambda kv: -kv[1])[:8]}}


def simulate(args: list[str], home: Path, label: str) -> dict:
    """Run sim/run.py as a user would, watching the memory of all its processes."""
    env = {**os.environ, "LUNAFL_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "sim" / "run.py"), *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = MemoryWatch(proc.pid)
    out, _ = proc.communicate()
    mem = watch.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: sim/run.py failed:\n{out[-4000:]}")
    run_dir = Path(args[args.index("--out") + 1]) / args[args.index("--run-name") + 1]
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    done = [r for r in rows if r["round"] > 0]
    n_sites = int(args[args.index("--clients") + 1])
    return {
        "label": label, "sites": n_sites, "wall_seconds": time.time() - t0,
        "rounds": len(done),
        "round_seconds_mean": sum(r["wall_seconds"] for r in done) / len(done),
        "overhead_per_round": [round(r["overhead"], 4) for r in done],
        "overhead_mean": sum(r["overhead"] for r in done) / len(done),
        "train_phase_seconds_mean": sum(r["train_phase_seconds"] for r in done) / len(done),
        "evaluate_phase_seconds_mean": sum(r["evaluate_phase_seconds"] for r in done) / len(done),
        "server_phase_seconds_mean": sum(r["server_phase_seconds"] for r in done) / len(done),
        "bytes_up_per_site_per_round": sum(r["bytes_up"] / max(r["sites_trained"], 1) for r in done) / len(done),
        "bytes_down_per_site_per_round": sum(r["bytes_down"] / max(r["sites_sampled"], 1) for r in done) / len(done),
        "final_test_auc": summary["test"]["metrics"]["roc_auc"],
        "memory": {**mem, "per_site_gib": mem["peak_pss_gib"] / n_sites},
        "time_breakdown_per_round": time_breakdown(run_dir, done),
    }


def time_breakdown(run_dir: Path, rows: list[dict]) -> dict:
    """Where a round's wall time goes (seconds, mean over rounds), from the sites' own
    clocks in events.jsonl: each site-side figure is divided over the parallel slots."""
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    parts: dict[str, list[float]] = {}
    for r in rows:
        trains = [e for e in events if e["kind"] == "train" and e["round"] == r["round"] and "started-at" in e]
        if not trains:
            continue
        slots = max(1, r.get("slots", 1))
        training = sum(e["train-seconds"] for e in trains) / slots
        val = sum(e.get("val-seconds", 0.0) for e in trains) / slots
        handler = sum(e["finished-at"] - e["started-at"] - e["train-seconds"] - e.get("val-seconds", 0.0)
                      for e in trains) / slots
        got = {"wall": r["wall_seconds"], "site training": training,
               "site evaluation in the training call": val,
               "site message handling (decode, load, encode)": handler,
               "separate site-evaluation phase": r["evaluate_phase_seconds"] or 0.0,
               "server test + checkpoint": r["server_phase_seconds"] or 0.0}
        got["transport, scheduling, aggregation, slot imbalance"] = got["wall"] - sum(
            v for k, v in got.items() if k != "wall")
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in parts.items()}


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows)


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------
def bench_throughput(cfg, reps: int) -> dict:
    """The ClientApp's training step against a plain PyTorch loop, same model and examples."""
    import numpy as np
    import torch

    from client.site import SiteData, train_site
    from common import model as model_lib
    from common.data import prepare
    from common.dataset import balanced_positions, to_float
    from common.engine import _autocast, amp_active

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
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()
        t0, n = time.perf_counter(), 0
        for _ in range(cfg.local_epochs):
            for i in range(0, len(pos) - 1, cfg.batch_size):
                x = x_all[i:i + cfg.batch_size].to(device)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                y = y_all[i:i + cfg.batch_size].to(device)
                opt.zero_grad(set_to_none=True)
                with _autocast(device, cfg.amp):
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

    from common.engine import train_one_epoch
    from common.model import build_model
    from common.privacy import LocalDP

    n = steps * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g), (torch.arange(n) % 2).float())
    out: dict = {"arch": cfg.arch, "norm": "group", "image_size": cfg.image_size, "batch_size": cfg.batch_size}
    device = torch.device("cpu")
    for label, amp in (("nodp_fp32", False), ("nodp_amp", cfg.amp)):
        model = build_model(cfg.arch, "group")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        train_one_epoch(model, DataLoader(ds, batch_size=cfg.batch_size), opt, device, amp=amp)  # warm-up
        out[label] = train_one_epoch(model, DataLoader(ds, batch_size=cfg.batch_size), opt, device,
                                     amp=amp)["images_per_s"]
    for mode in ("ghost", "hooks"):
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(cfg.arch, "group")
            dp = LocalDP("bench", n_patches=n, batches_per_epoch=steps, local_epochs=1, rounds=1, clip=1.0,
                         noise=1.0, target_epsilon=0.0, delta=1e-5, grad_sample_mode=mode,
                         ledger_path=Path(tmp) / "l.json")
            m, opt, crit, loader = dp.attach(model, torch.optim.Adam(model.parameters(), lr=1e-3),
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
    from common import model as model_lib
    from common.data import prepare
    from common.dataset import train_loader
    from common.privacy import clipped_signal, noise_norm

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


def bench_bn_statistics(run_dir: Path) -> dict:
    """BatchNorm under averaging: a finished federated run's final model on the test split
    with its averaged running statistics, against the same weights with statistics
    re-estimated at every site (a pass over the site's own training patches in train mode,
    no weight changed) and averaged by examples as the server would: what sites could
    send instead of the statistics their local training left behind."""
    import numpy as np
    import torch

    from common import model as model_lib
    from common.data import prepare
    from common.dataset import eval_loader
    from common.engine import bn_statistics
    from common.evaluation import TestSplit
    from common.results import RunDir

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


def bench_cache(cfg, n_full: int, workdir: Path, train_rate: float | None, full_size: bool = True) -> dict:
    """Build rate on full-size synthetic scans; read rate through the training loader."""
    import numpy as np

    from common.cache import build_cache
    from common.dataset import train_loader
    from common.luna16 import load_luna16
    from common.patches import PatchSpec
    from common.synthetic import make_dataset

    root = make_dataset(workdir / f"scans-{n_full}-{full_size}", n_full, seed=11, full_size=full_size, workers=2)
    luna = load_luna16(root)
    out: dict = {"scans": n_full, "full_size": full_size, "candidates": len(luna.candidates)}
    for size in sorted({cfg.image_size, 224}):
        spec = PatchSpec(size, cfg.fov_mm, cfg.hu_min, cfg.hu_max)
        t0 = time.time()
        cache = build_cache(luna, spec, workdir / f"cache-{size}", workers=cfg.workers, progress=False)
        secs = time.time() - t0
        out[f"build_patches_per_s_{size}px"] = len(cache) / secs
        positions = np.arange(len(cache))
        t0, n = time.time(), 0
        for _ in range(3):
            for x, _y in train_loader(cache, positions, batch_size=cfg.batch_size, neg_ratio=1e9, augment=True,
                                      seed=0):
                n += len(x)
        out[f"read_images_per_s_{size}px"] = n / (time.time() - t0)
        out[f"cache_mib_{size}px"] = (cache.path / "patches.u8").stat().st_size / 2**20
    if train_rate:
        out["read_vs_train_ratio"] = out[f"read_images_per_s_{cfg.image_size}px"] / train_rate
    return out


def bench_gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device on this machine"}
    from common.model import build_model

    model = build_model("resnet50").cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
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


# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (ResNet-10, 32 px, small data): a smoke run")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--scales", default="8,32,100", help="simulated sites for the overhead section")
    p.add_argument("--out", default="bench.json", help="JSON file to write (default bench.json)")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--dp-epsilon", type=float, default=8.0, help="target epsilon of the dpsignal section")
    p.add_argument("--weights", default="", help="model file the dpsignal section starts from (default: random)")
    p.add_argument("--run", default="", help="finished federated run the bnstats section reads")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if args.weights and not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file")
    from common.config import RunConfig

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="luna-bench-"))
    home = workdir / "home"
    os.environ["LUNAFL_HOME"] = str(home)
    quick = args.quick
    base = RunConfig(arch="resnet10", image_size=32, synthetic_scans=30, rounds=1, local_epochs=1) if quick \
        else RunConfig()
    scales = [int(s) for s in args.scales.split(",")] if not quick else [3]
    results: dict = {"quick": quick, "machine": {"cpus": os.cpu_count()}, "started": time.strftime("%F %T")}
    sim_common = ["--arch", base.arch, "--image-size", str(base.image_size), "--local-epochs",
                  str(base.local_epochs), "--out", str(workdir / "runs"), "--workers", "2"]

    if "throughput" in sections:
        print("throughput ...", flush=True)
        results["throughput"] = bench_throughput(base.replace(local_epochs=1), reps=1 if quick else 3)
    demo_args = [*sim_common, "--clients", str(8 if not quick else 2), "--rounds", str(base.rounds),
                 "--synthetic-scans", str(base.synthetic_scans)]
    demo = None
    if "overhead" in sections or "wire" in sections:
        print("the demo workload ...", flush=True)
        demo = simulate([*demo_args, "--run-name", "demo"], home, "demo workload")
    if "overhead" in sections:
        print("overhead and memory at scale ...", flush=True)
        runs = [demo]
        for n in scales:
            scans = max(base.synthetic_scans, int(n * 2.5 * 10 / 9) + 10)
            runs.append(simulate([*sim_common, "--clients", str(n), "--rounds", "1" if n > 8 else "2",
                                  "--synthetic-scans", str(scans), "--run-name", f"sites-{n}"], home, f"{n} sites"))
        results["overhead"] = runs
    if "wire" in sections:
        print("bytes on the wire ...", flush=True)
        wire = {}
        for dtype in ("float32", "float16", "bfloat16"):
            r = demo if dtype == "float32" else simulate([*demo_args, "--update-dtype", dtype, "--run-name",
                                                         f"wire-{dtype}"], home, f"update dtype {dtype}")
            assert r is not None
            wire[dtype] = {k: r[k] for k in ("bytes_up_per_site_per_round", "bytes_down_per_site_per_round",
                                             "final_test_auc", "wall_seconds")}
        results["wire"] = wire
    if "dp" in sections:
        print("differential privacy ...", flush=True)
        results["dp"] = bench_dp(base, steps=2 if quick else 6)
    if "dpsignal" in sections:
        print("DP signal against noise ...", flush=True)
        results["dpsignal"] = bench_dp_signal(base.replace(norm="group", dp="local", dp_epsilon=args.dp_epsilon,
                                                           weights=args.weights), n_batches=2 if quick else 4)
    if "bnstats" in sections:
        if not args.run:
            p.error("--sections bnstats needs --run RUN_DIR (a finished federated run)")
        print("BatchNorm statistics ...", flush=True)
        results["bnstats"] = bench_bn_statistics(Path(args.run))
    if "cache" in sections:
        print("cache ...", flush=True)
        rate = results.get("throughput", {}).get("clientapp_images_per_s")
        results["cache"] = bench_cache(base, 2 if quick else 6, workdir, rate, full_size=not quick)
    if "gpu" in sections:
        results["gpu"] = bench_gpu()
    results["finished"] = time.strftime("%F %T")

    from common.atomic import atomic_write_json

    atomic_write_json(args.out, results)
    print(report(results))
    print(f"\nwritten to {args.out}")
    return 0


def report(r: dict) -> str:
    lines: list[tuple[str, str]] = []
    if "throughput" in r:
        t = r["throughput"]
        setting = f"{t['arch']}, {t['image_size']} px, batch {t['batch_size']}, {t['threads']} threads"
        lines += [("ClientApp training step", f"{t['clientapp_images_per_s']:.1f} img/s ({setting})"),
                  ("plain PyTorch loop", f"{t['plain_loop_images_per_s']:.1f} img/s"),
                  ("ratio", f"{t['ratio']:.3f}")]
    for o in r.get("overhead", []):
        lines.append((f"federation, {o['label']}",
                      f"{o['round_seconds_mean']:.1f} s/round, overhead {o['overhead_mean']:.1%} "
                      f"(train phase {o['train_phase_seconds_mean']:.1f} s, site evaluation "
                      f"{o['evaluate_phase_seconds_mean']:.1f} s, server test+checkpoint "
                      f"{o['server_phase_seconds_mean']:.1f} s), peak memory {o['memory']['peak_pss_gib']:.2f} GiB "
                      f"({o['memory']['per_site_gib']:.2f} GiB/site, largest actor "
                      f"{o['memory']['largest_actor_pss_gib']:.2f} GiB)"))
        tb = o.get("time_breakdown_per_round") or {}
        for k, v in tb.items():
            if k != "wall":
                lines.append((f"  {k}", f"{v:.2f} s/round ({v / tb['wall']:.1%})"))
    for dtype, w in r.get("wire", {}).items():
        lines.append((f"updates as {dtype}", f"{w['bytes_up_per_site_per_round'] / 2**20:.1f} MiB up + "
                                            f"{w['bytes_down_per_site_per_round'] / 2**20:.1f} MiB down (train + "
                                            f"evaluate) per site per round, final test AUC {w['final_test_auc']:.3f}"))
    if "bnstats" in r:
        b = r["bnstats"]
        for k in ("averaged", "re_estimated_at_sites"):
            m, ci = b[k]["metrics"], b[k]["ci95"]
            lines.append((f"BatchNorm statistics {k.replace('_', ' ')}",
                          f"test ROC-AUC {m['roc_auc']:.3f} [{ci['roc_auc'][0]:.3f}, {ci['roc_auc'][1]:.3f}], "
                          f"CPM {m['cpm']:.3f} [{ci['cpm'][0]:.3f}, {ci['cpm'][1]:.3f}], loss {m['loss']:.4f}"))
    if "dp" in r:
        d = r["dp"]
        lines += [("non-DP (GroupNorm) fp32 / AMP", f"{d['nodp_fp32']:.1f} / {d['nodp_amp']:.1f} img/s"),
                  ("DP-SGD ghost / hooks", f"{d['dp_ghost']:.1f} / {d['dp_hooks']:.1f} img/s"),
                  ("DP ghost vs non-DP fp32 / AMP", f"{d['ratio_dp_ghost_vs_nodp_fp32']:.2f} / "
                                                    f"{d['ratio_dp_ghost_vs_nodp_amp']:.2f}")]
    if "dpsignal" in r:
        d = r["dpsignal"]
        lines.append(("DP signal vs noise", f"{d['site']}, {d['weights']}, epsilon {d['epsilon']:g}: noise "
                                            f"multiplier {d['noise_multiplier']:.2f}, clip {d['clip']:g}, batch "
                                            f"{d['batch_size']}, {d['steps_per_site']} steps x {d['sites']} sites"))
        for which in ("all", "norms+head"):
            w = d[which]
            lines.append((f"  {which} ({w['weights_trained']:,} weights)",
                          f"patch gradient norm {w['median_patch_grad_norm']:.2f} (median; {w['share_clipped']:.0%} "
                          f"clipped), clipped batch mean {w['signal']:.3f}, noise {w['noise']:.2f}: signal/noise "
                          f"{w['snr_step']:.4f} per step, at most {w['snr_run']:.2f} over the run"))
    if "cache" in r:
        c = r["cache"]
        for k, v in c.items():
            if k.startswith(("build_", "read_", "cache_mib")):
                lines.append((k.replace("_", " "), f"{v:.1f}"))
        if "read_vs_train_ratio" in c:
            lines.append(("cache read vs training rate", f"{c['read_vs_train_ratio']:.1f}x"))
    if "gpu" in r:
        g = r["gpu"]
        lines.append(("GPU", g.get("note") or f"{g['device']}: {g['resnet50_224px_amp_images_per_s']:.0f} img/s "
                                             "ResNet-50 224 px AMP"))
    return _table(lines)


if __name__ == "__main__":
    sys.exit(main())
