"""Benchmarks: what a federation costs beyond the training it coordinates.

    python sim/bench.py                 # everything, about 30 min on a 2-core CPU
    python sim/bench.py --quick         # tiny sizes, about 2 min (what the tests run; its 3-site
                                        # run also stands for the float16 wire run)
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
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
from sim.benchmarks.cache import bench_cache  # noqa: E402
from sim.benchmarks.federation import simulate  # noqa: E402
from sim.benchmarks.statistics import bench_bn_statistics  # noqa: E402
from sim.benchmarks.training import bench_dp, bench_dp_signal, bench_gpu, bench_throughput  # noqa: E402

SECTIONS = ("throughput", "overhead", "wire", "dp", "dpsignal", "bnstats", "cache", "gpu")



def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a.ljust(w)}  {b}" for a, b in rows)



# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (ResNet-10, 32 px, small data): a smoke run")
    p.add_argument("--sections", default="", help=f"comma list of {', '.join(SECTIONS)} (default: all; bnstats only "
                   "with --run)")
    p.add_argument("--scales", default="8,32,100", help="simulated sites for the overhead section")
    p.add_argument("--out", default="bench.json", help="JSON file to write (default bench.json)")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--dp-epsilon", type=float, default=8.0, help="target epsilon of the dpsignal section")
    p.add_argument("--weights", default="", help="model file the dpsignal section starts from (default: random)")
    p.add_argument("--run", default="", help="finished federated run the bnstats section reads")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()] or \
        [s for s in SECTIONS if s != "bnstats" or args.run]  # bnstats reads a finished run: only when named
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
    # --quick: 20 scans and 6 held-out test scans, not the demo's 100 and 90 (at true scale the 90 alone
    # are 1.1 GB of CT written, read and cut)
    base = RunConfig(arch="resnet10", image_size=32, synthetic_scans=20, synthetic_test_scans=6, rounds=1,
                     local_epochs=1) if quick \
        else RunConfig()
    scales = [int(s) for s in args.scales.split(",")] if not quick else [3]
    results: dict = {"quick": quick, "machine": {"cpus": os.cpu_count()}, "started": time.strftime("%F %T")}
    sim_common = ["--arch", base.arch, "--image-size", str(base.image_size), "--local-epochs",
                  str(base.local_epochs), "--out", str(workdir / "runs"), "--workers", "2",
                  "--synthetic-test-scans", str(base.synthetic_test_scans)]

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
            # --quick: the scale run sends float16 updates and stands for the wire section's float16
            # run (bytes per site do not depend on the number of sites): one federation less
            half = ["--update-dtype", "float16"] if quick and "wire" in sections else []
            runs.append(simulate([*sim_common, "--clients", str(n), "--rounds", "1" if n > 8 else "2",
                                  "--synthetic-scans", str(scans), *half, "--run-name", f"sites-{n}"], home,
                                 f"{n} sites" + (" (float16 updates)" if half else "")))
        results["overhead"] = runs
    if "wire" in sections:
        print("bytes on the wire ...", flush=True)
        wire = {}
        # --quick: float16 stands for both half types (bfloat16 through the Guard: tests/server)
        for dtype in ("float32", "float16") if quick else ("float32", "float16", "bfloat16"):
            if dtype == "float32":
                r = demo
            elif quick and "overhead" in sections:
                r = results["overhead"][-1]  # the float16 scale run above
            else:
                r = simulate([*demo_args, "--update-dtype", dtype, "--run-name", f"wire-{dtype}"], home,
                             f"update dtype {dtype}")
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
    from common.fastexit import exit_now

    exit_now(main())
