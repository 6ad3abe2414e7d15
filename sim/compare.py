"""Centralized vs federated on the same model and data: one report with LUNA16's CPM.

    python sim/compare.py                              # run the standard set, then report
    python sim/compare.py --runs runs/a runs/b ...     # report on finished results folders
    python sim/compare.py --privacy                    # add DP runs (two epsilons; a public start) and audits
    python sim/compare.py --folds 0,1,2,3,4,5,6,7,8,9  # LUNA16 cross-validation of the baseline
    python sim/compare.py --seeds 0,1,2                # every arm with every seed: mean ± sd, ΔAUC per seed
    python sim/compare.py --arms centralized,fed-iid-fedavg   # only some arms of the standard set

The standard set: the centralized baseline, federated IID with the default strategy
(FedAvgM, server lr 2, no momentum) and with plain FedAvg, and federated non-IID (--non-iid,
default scanner) with the default, FedAvg and FedProx, all with the same model,
test split and number of passes over the training data (a federated run of R rounds x E
local epochs makes R x E passes; the baseline runs R x E epochs on the pooled data).
Runs whose folder already holds a summary.json are read, not rerun.

With --seeds S1,S2,...: every arm runs once per seed (folders ``<arm>-seed<S>``); the
report gives each arm's mean ± sd over seeds beside each run's bootstrap CI, and the
paired ΔAUC of each federated run against the centralized run of its seed. The seed
draws the partition, sampling and training, and (without --data) the synthetic data
set itself, so the spread covers data as well as training.

With --privacy: DP at epsilon 8 and 2 from random weights, the GroupNorm model without DP,
and DP at epsilon 8 starting from a model trained without DP on *public* data (the field's
standard recipe; --public-data, default 40 synthetic scans made with another seed, never the
sites' data).

Writes REPORT_DIR/report.md and a self-contained REPORT_DIR/report.html. With --tracking
mlflow every run is tracked, and the report is attached to each compared run that is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
PASS_THROUGH = ("clients", "rounds", "local_epochs", "image_size", "arch", "data", "seed", "synthetic_scans",
                "synthetic_test_scans", "batch_size", "lr", "cache_dir", "workers", "proximal_mu", "alpha", "tracking",
                "tracking_uri", "tracking_experiment")


def standard_runs(non_iid: str, privacy: bool) -> list[tuple[str, str, list[str]]]:
    default = ["--strategy", "fedavgm", "--server-momentum", "0", "--server-lr", "2"]  # sim/run.py's default
    runs = [("centralized", "centralized", ["--mode", "centralized"]),
            ("federated IID FedAvgM lr 2 (default)", "fed-iid-fedavgm", ["--partition", "iid", *default]),
            ("federated IID FedAvg", "fed-iid-fedavg", ["--partition", "iid", "--strategy", "fedavg"]),
            (f"federated {non_iid} FedAvgM lr 2", f"fed-{non_iid}-fedavgm", ["--partition", non_iid, *default]),
            (f"federated {non_iid} FedAvg", f"fed-{non_iid}-fedavg", ["--partition", non_iid, "--strategy", "fedavg"]),
            (f"federated {non_iid} FedProx", f"fed-{non_iid}-fedprox",
             ["--partition", non_iid, "--strategy", "fedprox"])]
    if privacy:
        for eps in (8, 2):
            runs.append((f"federated IID DP eps={eps}", f"fed-iid-dp{eps}",
                         ["--partition", "iid", "--dp", "local", "--norm", "group", "--dp-epsilon", str(eps)]))
        runs.append(("federated IID no-DP (GroupNorm)", "fed-iid-groupnorm", ["--partition", "iid", "--norm", "group"]))
    return runs


PUBLIC_SCANS, PUBLIC_EPOCHS = 40, 12


def public_model(public_data: str, seed: int, common: list[str], runs_dir: Path) -> Path:
    """A GroupNorm model trained centrally without DP on public data only: ``public_data``,
    or PUBLIC_SCANS synthetic scans made with a seed the sites' data does not use."""
    if public_data:
        data = Path(public_data)
        if not data.is_dir():
            raise SystemExit(f"sim/compare.py: --public-data {data}: no such folder")
    else:
        from common.data.synthetic import make_dataset

        data = runs_dir / f"public-data-{PUBLIC_SCANS}-seed{seed + 11}"
        print(f"  public data: {PUBLIC_SCANS} synthetic scans, seed {seed + 11} -> {data}")
        make_dataset(data, PUBLIC_SCANS, seed + 11)
    run = run_one("public-model", ["--mode", "centralized", "--norm", "group", "--data", str(data),
                                   "--rounds", str(PUBLIC_EPOCHS // 3), "--local-epochs", "3"], common, runs_dir)
    return run / "model_final.pt"


def public_dp_run(public_weights: Path, eps: int = 8) -> tuple[str, str, list[str]]:
    return (f"federated IID DP eps={eps}, public pretraining", f"fed-iid-dp{eps}-public",
            ["--partition", "iid", "--dp", "local", "--norm", "group", "--dp-epsilon", str(eps), "--weights",
             str(public_weights)])


def run_one(name: str, args: list[str], common: list[str], runs_dir: Path) -> Path:
    path = runs_dir / name
    if (path / "summary.json").exists():
        print(f"  {name}: finished earlier, reading it")
        return path
    if path.exists() and (path / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "sim" / "run.py"), "--resume", str(path)]
        print(f"  {name}: resuming")
    else:
        cmd = [sys.executable, str(ROOT / "sim" / "run.py"), *common, *args, "--out", str(runs_dir),
               "--run-name", name]
        print(f"  {name}: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"sim/compare.py: the run {name} failed (exit {proc.returncode}); see {path}/log.txt")
    return path


def main(argv: list[str] | None = None) -> int:
    from common.config import add_arguments

    p = argparse.ArgumentParser(prog="sim/compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=None, metavar="RUN_DIR",
                   help="finished results folders to compare (default: run the standard set)")
    p.add_argument("--labels", nargs="*", default=None, help="labels for --runs (default: folder names)")
    p.add_argument("--runs-dir", default="runs/compare", help="where the standard set's runs go")
    p.add_argument("--out", default="runs/compare/report", help="report folder")
    p.add_argument("--non-iid", default="scanner", choices=("scanner", "dirichlet", "subset"),
                   help="the non-IID partition of the standard set")
    p.add_argument("--privacy", action="store_true", help="also DP runs (epsilon 8 and 2 from random weights, "
                   "epsilon 8 from a model trained on public data) and membership audits")
    p.add_argument("--public-data", default="", help="LUNA16-format folder of public data for the --privacy "
                   "run with public pretraining (default: synthetic scans made with another seed)")
    p.add_argument("--seeds", default="", help="comma list of seeds: run every arm with each (overrides --seed)")
    p.add_argument("--arms", default="", help="comma list of the standard set's folder names to run "
                   "(default: all; e.g. centralized,fed-iid-fedavg)")
    p.add_argument("--folds", default="", help="comma list of LUNA16 subsets: centralized runs testing on each")
    add_arguments(p, only=PASS_THROUGH)
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected a comma list of integers")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds {args.seeds!r}: a seed is repeated")

    from analysis.report import Run, build_report

    common: list[str] = []
    for name in PASS_THROUGH:
        v = getattr(args, name)
        if v is not None and not (seeds and name == "seed"):
            common += [f"--{name.replace('_', '-')}", str(v)]
    runs: list[Run] = []
    if args.runs:
        labels = args.labels or [Path(r).name for r in args.runs]
        if len(labels) != len(args.runs):
            p.error("--labels needs one label per --runs folder")
        try:
            runs = [Run.load(lab, r) for lab, r in zip(labels, args.runs, strict=True)]
        except ValueError as exc:
            p.error(str(exc))
    else:
        runs_dir = Path(args.runs_dir)
        print(f"running the standard comparison into {runs_dir}")
        arms = standard_runs(args.non_iid, args.privacy)
        if args.arms:
            wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
            unknown = sorted(set(wanted) - {name for _, name, _ in arms})
            if unknown:
                p.error(f"--arms: unknown {', '.join(unknown)}; the standard set has "
                        f"{', '.join(name for _, name, _ in arms)}")
            arms = [a for a in arms if a[1] in wanted]
        for seed in seeds or [None]:
            tag, seeded = ("", common) if seed is None else (f"-seed{seed}", [*common, "--seed", str(seed)])
            for label, name, extra in arms:
                runs.append(Run.load(label if seed is None else f"{label} (seed {seed})",
                                     run_one(name + tag, extra, seeded, runs_dir)))
            if args.privacy:
                weights = public_model(args.public_data, seed if seed is not None else (args.seed or 0), seeded,
                                       runs_dir / f"public{tag}" if tag else runs_dir)
                label, name, extra = public_dp_run(weights)
                runs.append(Run.load(label if seed is None else f"{label} (seed {seed})",
                                     run_one(name + tag, extra, seeded, runs_dir)))
    if args.privacy or any(r.config["dp"] != "off" for r in runs):
        from analysis.audit import membership_audit

        for r in runs:
            if r.federated and r.audit is None:
                print(f"  auditing {r.label} (membership inference)")
                r.audit = membership_audit(r.path)
    folds: list[Run] = []
    if args.folds:
        runs_dir = Path(args.runs_dir)
        for k in [int(x) for x in args.folds.split(",")]:
            path = run_one(f"fold-{k}", ["--mode", "centralized", "--test-subsets", str(k)], common, runs_dir)
            folds.append(Run.load(f"fold {k}", path))
    md, page = build_report(runs, Path(args.out), folds or None)
    from experiment.mlflow_sink import log_report_to_runs

    # the report also goes to each compared run's MLflow run (those tracked: mlflow.json)
    log_report_to_runs([r.path for r in runs + folds], [md, page])
    print(f"\nreport: {md}\n        {page}")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())
