"""Make synthetic hospitals: chest CT in LUNA16's exact format, deterministic from a seed.

    python sim/make_data.py --out data/synthetic --scans 100 --seed 0
    python sim/make_data.py --out data/demo --scans 100 --test-scans 90   # the demo's default data
    python sim/make_data.py --out data/full --scans 20 --full-size   # 512 x 512 slices

Writes subset0..9/<seriesuid>.mhd/.raw, annotations.csv, candidates_V2.csv,
annotations_excluded.csv, seriesuids.csv and scan_metadata.csv (the synthetic scanner
of each scan). Not patient data: for research and software testing only.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from common.data.synthetic import make_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sim/make_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--scans", type=int, default=100, help="number of scans (default 100)")
    p.add_argument("--test-scans", type=int, default=0,
                   help="extra test-only scans, all in --test-subset (default 0; the demo's default data adds 90)")
    p.add_argument("--test-subset", type=int, default=9, help="LUNA16 subset of the extra test scans (default 9)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); same seed, same bytes")
    p.add_argument("--full-size", action="store_true",
                   help="512 x 512 slices through the whole chest (default: a body-fitted field of view, ~300-410 "
                   "pixels at 0.80-0.98 mm, through a 56-72 mm slab)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = p.parse_args(argv)
    t0 = time.time()
    bar = tqdm(total=args.scans + max(args.test_scans, 0), desc="making scans", unit="scan", dynamic_ncols=True)
    try:
        out = make_dataset(args.out, args.scans, args.seed, test_scans=args.test_scans, test_subset=args.test_subset,
                           full_size=args.full_size, workers=args.workers,
                           progress=lambda done, total: bar.update(done - bar.n))
    except ValueError as exc:
        bar.close()
        print(f"sim/make_data.py: error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(f"{args.scans + args.test_scans} synthetic scans in {out} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())
