"""Privacy audit of a finished run: a loss-threshold membership-inference attack.

    python sim/audit.py runs/<folder>

Prints and writes <folder>/audit.json: the attack's ROC-AUC (0.5 = no better than a coin)
with a 95% bootstrap CI and its true-positive rate at 1% false-positive rate.
"""

from __future__ import annotations

import argparse
import sys

from analysis.audit import membership_audit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim/audit.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a results folder of sim/run.py")
    p.add_argument("--max-per-group", type=int, default=1000, help="most members (and non-members) attacked")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        r = membership_audit(args.run_dir, args.max_per_group, args.seed)
    except ValueError as exc:
        print(f"sim/audit.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"membership inference on {args.run_dir} (dp: {r['dp']}):")
    print(f"  attack ROC-AUC {r['attack_auc']:.3f} (95% CI {r['attack_auc_ci95'][0]:.3f}-"
          f"{r['attack_auc_ci95'][1]:.3f}), TPR at 1% FPR {r['tpr_at_1pct_fpr']:.3f}")
    print(f"  {r['n_members']} members vs {r['n_non_members']} non-members; mean loss "
          f"{r['mean_loss_members']:.4f} vs {r['mean_loss_non_members']:.4f}")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())
