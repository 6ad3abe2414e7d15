"""Check a LUNA16 root, build the patch cache once, and print the sites.

    python sim/prepare.py --data /data/luna16 --cache /data/cache --workers 8
    python sim/prepare.py                      # the default synthetic data set
    python sim/prepare.py --data /data/ours --site hospital-a   # one hospital's own folder

With ``--site`` the folder is read as that hospital's SuperNode reads it (no test split
needed; its patients split into training and validation as in a run).

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
    p.add_argument("--site", metavar="NAME", default=None,
                   help="check --data as the one hospital NAME's own folder, as its SuperNode reads it "
                        "(no test split needed)")
    add_arguments(p, only=PREP_OPTIONS)
    args = p.parse_args(argv)
    setup_logging()
    from common.data.luna16 import DataError
    if args.site is not None:
        return check_site(args)
    from common.data.partition import format_summary, save_summary, summary_rows
    from common.data.prepare import prepare

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


def check_site(args: argparse.Namespace) -> int:
    """``--site``: build one hospital's cache and split exactly as its ClientApp will."""
    from client.deploy import deployed_site
    from client.site import SiteError
    from common.data.luna16 import DataError

    try:
        cfg = from_args(args)
        if not cfg.data:
            raise ValueError("--site needs --data, the hospital's own LUNA16-format folder")
        site = deployed_site(cfg, {"site-name": args.site, "data-path": cfg.data,
                                   "cache-path": str(cfg.cache_root())})
    except (ValueError, DataError, SiteError) as exc:
        print(f"sim/prepare.py: error: {exc}", file=sys.stderr)
        return 2
    cache = site.cache
    labels = cache.label
    print(f"site:  {site.name}, data {cfg.data}")
    print(f"cache: {cache.path} ({cache.meta['rows_valid']} patches of {cfg.image_size} px)")
    for uid, why in sorted(site.skipped.items()):
        print(f"skipped scan {uid}: {why}")
    for part, rows in (("training", site.train), ("validation", site.val)):
        scans = len(set(cache.seriesuid[rows]))
        print(f"{part}: {scans} scans, {len(rows)} candidates, {int(labels[rows].sum())} nodules")
    print(f"training examples per epoch (balanced, --neg-ratio {cfg.neg_ratio}): {site.train_size(cfg)}")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())
