"""Train the nodule classifier across simulated hospitals (Flower on Ray), or centrally.

    python sim/run.py --clients 8                      # the demo: synthetic data, CPU
    python sim/run.py --clients 8 --data /data/luna16 --image-size 224 --rounds 20
    python sim/run.py --mode centralized               # the pooled baseline
    python sim/run.py --resume runs/<folder>           # continue a stopped run

Every option is listed by --help. Results go to --out/<run name>/ (see experiment/results.py).
Research software on synthetic or public data: never for diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry stays off by default
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from common.config import RunConfig, add_arguments, from_args  # noqa: E402
from common.logs import log_to_file, setup_logging  # noqa: E402
from experiment.results import RunDir  # noqa: E402

log = logging.getLogger("luna_fl")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sim/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="RUN_DIR", default="",
                   help="continue the run in RUN_DIR from its last complete round (same settings; "
                        "--rounds may grow)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    add_arguments(p)
    return p


def resolve_config(args: argparse.Namespace) -> RunConfig:
    if args.resume:
        _, saved = RunDir.open_for_resume(args.resume)
        return from_args(args, base=saved)
    return from_args(args)


def backend_config(cfg: RunConfig, verbose: bool) -> tuple[dict, int]:
    """Ray settings for the simulation and the number of sites that train at once."""
    init_args: dict = {"include_dashboard": False, "log_to_driver": verbose,
                       "logging_level": "INFO" if verbose else "WARNING"}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
        import ray

        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=init_args["logging_level"])
        cpus = int(ray.cluster_resources().get("CPU", 1))
    else:
        # a new local instance: never one that `ray start` left running, which plain ray.init()
        # would join (its CPUs, and the log line below would say the wrong thing)
        init_args["address"] = "local"
        cpus = os.cpu_count() or 1
        if cfg.max_parallel:
            cpus = min(cpus, int(cfg.max_parallel * cfg.cpus_per_client))
        init_args["num_cpus"] = cpus
        # Ray starts its workers at niceness 15, below everything else of the user's login session
        # (Linux schedules a session's processes as one group, where niceness counts): with any
        # other work in that session, a second run or a test beside it, the simulated sites got a
        # few percent of a core (tiny test run under load: 15 s rounds at 15, 4 s at 0). The
        # sites' training is this run's work, so they run at the user's own priority.
        init_args["_system_config"] = {"worker_niceness": 0}
        if cfg.gpus_per_client == 0:
            init_args["num_gpus"] = 0
    slots = max(1, int(cpus // cfg.cpus_per_client))
    if cfg.max_parallel:
        slots = min(slots, cfg.max_parallel)
    resources = {"num_cpus": cfg.cpus_per_client, "num_gpus": cfg.gpus_per_client}
    return {"client_resources": resources, "init_args": init_args}, min(slots, cfg.clients)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = resolve_config(args)
    except ValueError as exc:
        print(f"sim/run.py: error: {exc}", file=sys.stderr)
        return 2
    from server.federation import setup

    try:
        sr = setup(cfg, resume=args.resume)
    except ValueError as exc:
        print(f"sim/run.py: error: {exc}", file=sys.stderr)
        return 2
    log_to_file(sr.run.path / "log.txt")
    log.info("run configuration: %s", cfg.to_json())
    if cfg.mode == "centralized":
        from experiment.centralized import run_centralized

        assert sr.prepared is not None
        run_centralized(cfg, sr.run, sr.prepared, sr.checkpoint)
    else:
        from flwr.simulation import run_simulation

        from server.app import server_app_for
        from sim.faults import app as client_app  # the hospital's ClientApp, plus fault rehearsal

        backend, sr.slots = backend_config(cfg, args.verbose)
        where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "a local Ray instance"
        log.info("simulating %d sites on %s, %d training at once", cfg.clients, where, sr.slots)
        run_simulation(server_app=server_app_for(sr), client_app=client_app, num_supernodes=cfg.clients,
                       backend_config=backend, verbose_logging=args.verbose)
    summary_path = sr.run.path / "summary.json"
    if summary_path.exists():
        import json

        from experiment.tracker import operating_point_line

        test = json.loads(summary_path.read_text()).get("test") or {}
        if test.get("operating_point"):
            print("\n" + operating_point_line(test))
    print(f"\nResults: {sr.run.path}\n  summary.json, rounds.jsonl, learning_curves.png, roc.png, froc.png, "
          "submission.csv\n  Research results on synthetic or public data; never for diagnosis.")
    tracked = sr.run.path / "mlflow.json"
    if cfg.tracking == "mlflow" and tracked.exists():
        import json

        t = json.loads(tracked.read_text())
        print(f"  MLflow: run {t['run_id']} in {t['tracking_uri']} (experiment {t['experiment']})")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())  # without Python's module teardown once the results are written (common/fastexit.py)
