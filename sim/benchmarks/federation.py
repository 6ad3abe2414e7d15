"""What a federation costs: simulations with a process-tree memory watcher, and where a round's time goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
