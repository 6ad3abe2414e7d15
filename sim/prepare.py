"""Check a LUNA16 root, build the patch cache once, and print the sites.

    python sim/prepare.py --data /data/luna16 --cache /data/cache --workers 8
    python sim/prepare.py                      # the default synthetic data set

The cache is keyed by the preprocessing settings (--image-size, --fov-mm, --hu-min,
--hu-max, --max-neg-per-scan); later runs with the same settings read only the cache.
A scan that cannot be read is skipped and reported, or fails the run (--on-bad-scan).
"""

from __future__ import annotations

import argparse
import sys

from common.config import add_arguments, from_args
from common.logs import setup_logging

PREP_OPTIONS = ("data", "workers", "on_bad_scan", "image_size", "fov_mm", "hu_min", "hu_max", "max_neg_per_scan",
                "clients", "partition", "alpha", "test_subsets", "val_fraction", "seed", "synthetic_scans",
                "synthetic_test_scans")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim/prepare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", dest="cache_dir", default=None, help="patch cache folder (default <LUNAFL_HOME>/cache)")
    add_arguments(p, only=PREP_OPTIONS)
    args = p.parse_args(argv)
    setup_logging()
    from common.data import prepare
    from common.luna16 import DataError
    from common.partition import format_summary, save_summary, summary_rows

    try:
        cfg = from_args(args)
        prep = prepare(cfg)
    except (ValueError, DataError) as exc:
        print(f"sim/prepare.py: error: {exc}", file=sys.stderr)
        return 2
    meta = prep.cache.meta
    rows = summary_rows(prep.plan, prep.infos)
    save_summary(rows, prep.cache.path.parent / f"sites-{cfg.partition}-{cfg.clients}-seed{cfg.seed}.csv")
    print(f"data:  {prep.root} ({len(prep.luna.scans)} scans, {len(prep.luna.candidates)} candidates)")
    print(f"cache: {prep.cache.path} ({meta['rows_valid']} patches of {cfg.image_size} px, "
          f"built in {meta['build_seconds']}s at {meta['patches_per_second']} patches/s)")
    for uid, why in sorted(meta["skipped_scans"].items()):
        print(f"skipped scan {uid}: {why}")
    print(f"\nsites ({cfg.partition}, {cfg.clients} sites; test split = subsets {cfg.test_subsets}):")
    print(format_summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
