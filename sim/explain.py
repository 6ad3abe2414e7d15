"""Class activation maps of a finished run, and how well they point at the nodule.

    python sim/explain.py runs/<folder>                  # Grad-CAM grid + pointing game
    python sim/explain.py runs/<folder> --method cam     # plain CAM (ResNet's pooled head)
    python sim/explain.py runs/<folder> --compare        # every layer x upsampling (slower)

Writes RUN_DIR/cam_grid.png (the most confident true positives, false positives and false
negatives of the test split, and random-position and two-nodule probes: heatmap over the
axial, coronal and sagittal planes, its peak, the annotated nodule's outline),
RUN_DIR/cam_slices.png (the model slid over whole axial slices through test nodules, its
probability over the lung, nodules outlined, local maxima marked) and RUN_DIR/cam.json (the
cases shown and the scores).
The score is the pointing game: the share of positives whose heatmap peak lies within the
annotated nodule's radius (definitions in analysis/cams/), beside three controls: the
patch centre as the peak, the same heatmap of a randomly initialised model, and the
patch's densest spot. Candidates sit on their nodules, so the centred score proves little;
the headline is where the nodule is away from the centre: shifted 0.8 radii, at a random
position in the patch, and two nodules in one patch (analysis/cams/probes.py).
Research software on synthetic or public data: never for diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import sys

from analysis.cams import METHODS, RESNET_STRIDES, UPSAMPLING, explain_run, format_table

log = logging.getLogger("luna_fl")
HEADLINE_NAMES = {"shifted_true_positives": "shifted 0.8 R, called positive",
                  "shifted": "shifted 0.8 R, all positives",
                  "random_true_positives": "random position, called positive",
                  "random": "random position, all positives",
                  "two_nodules_any": "two nodules: peak in one of them",
                  "two_nodules_each": "two nodules: a local maximum in each"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sim/explain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished results folder (with model_final.pt)")
    p.add_argument("--method", choices=METHODS, default="gradcam",
                   help="gradcam (Captum's LayerGradCam) or cam (plain CAM at layer4) (default: gradcam)")
    p.add_argument("--layer", choices=("auto", *RESNET_STRIDES), default="auto",
                   help="ResNet stage Grad-CAM explains; auto = the deepest with at least 16 cells across the patch "
                        "(64 px: layer1, 224 px: layer2) (default: auto)")
    p.add_argument("--upsample", choices=UPSAMPLING, default="aligned",
                   help="aligned = cells at their receptive-field centres; bilinear = the usual image resize, half a "
                        "cell off (default: aligned)")
    p.add_argument("--top-k", type=int, default=4, help="cases per category in the grid (default: 4)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability of a positive call (default: 0.5)")
    p.add_argument("--slices", type=int, default=8,
                   help="axial slices through test nodules to slide the model over (cam_slices.png); 0 = none "
                        "(default: 8)")
    p.add_argument("--stride-mm", type=float, default=3.0,
                   help="grid step of the slice view in mm (default: 3.0)")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the random-position and two-nodule probes")
    p.add_argument("--shift", type=float, default=0.8,
                   help="off-centre score: nodule moved this fraction of its radius along the planes' shared "
                        "diagonal; 0 = skip (default: 0.8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the shift directions and the random-init control (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="(default: cpu)")
    p.add_argument("--compare", action="store_true",
                   help="also score Grad-CAM at every stage and CAM, with both upsamplings (into cam.json)")
    return p


def _line(name: str, s: dict) -> str:
    part = (f"  {name:<15} n={s['n']:<4d} axial {s['axial']:.2f} [{s['axial_ci95'][0]:.2f}, "
            f"{s['axial_ci95'][1]:.2f}]  all planes {s['all_planes']:.2f}   controls: centre "
            f"{s['centre_baseline']['axial']:.2f}, random-init {s['random_init']['axial']:.2f}, brightest "
            f"{s['intensity_baseline']['axial']:.2f}")
    if "mean_prob" in s:
        part += f"   mean p {s['mean_prob']:.2f} (centred {s['mean_prob_centred']:.2f})"
    return part


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from common.logs import setup_logging

    setup_logging()
    try:
        rep = explain_run(args.run_dir, method=args.method, layer=args.layer, upsample_mode=args.upsample,
                          top_k=args.top_k, threshold=args.threshold, shift=args.shift, seed=args.seed,
                          device=args.device, compare=args.compare,
                          probes=args.probes, slices=args.slices, stride_mm=args.stride_mm)
    except ValueError as exc:
        print(f"sim/explain.py: error: {exc}", file=sys.stderr)
        return 2
    scores = rep.scores["scores"]
    pg = scores["pointing_game"]
    if pg.get("headline"):
        print(f"\nlocalisation, {pg['method']} at {pg['layer']}: the nodule away from the patch centre "
              f"(hit = peak within the nodule; best control = the best of centre, random-init, brightest):")
        for name, h in pg["headline"].items():
            print(f"  {HEADLINE_NAMES.get(name, name):<42} n={h['n']:<4d} {h['rate']:.2f} "
                  f"[{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]   best control {h['best_control']:.2f}   "
                  f"margin {h['margin']:+.2f}")
    for key in ("pointing_game", "pointing_game_cam"):
        if key in scores:
            pg = scores[key]
            print(f"\npointing game, {pg['method']} at {pg['layer']} ({pg['upsample']} upsampling), "
                  f"hit = peak within the nodule's radius:")
            for part in ("true_positives", "positives", "shifted"):
                if part in pg:
                    print(_line(part.replace("_", " "), pg[part]))
    if scores.get("slices", {}).get("slices"):
        sl = scores["slices"]
        print(f"\nslice view: {sl['slices']} axial slices, the model slid every {sl['stride_mm']:g} mm over the lung: "
              f"{sl['found']}/{sl['nodules']} nodules at a local maximum ({sl['rate']:.2f} [{sl['ci95'][0]:.2f}, "
              f"{sl['ci95'][1]:.2f}]), {sl['false_maxima_per_slice']:.1f} false maxima per slice (p >= "
              f"{sl['threshold']:g}); the model calls {sl['called_at_centre']} of the {sl['nodules']} on a patch "
              f"centred on them in the slice's plane, the slide finds {sl['found_of_called']} of those (and "
              f"{sl['found_not_called']} "
              f"it does not call there); one grid step off their centre it calls {sl['called_offset']} on a patch "
              f"re-cut there, {sl['called_rolled']} on the centred patch moved by the training's shift; why each "
              "nodule was found or missed: cam.json, slices.per_slice")
        print("  maxima counted from p >= t up (found / false maxima per slice): " + ", ".join(
            f"{c['threshold']:g}: {c['found']}/{sl['nodules']} ({c['false_maxima_per_slice']:.1f})"
            for c in sl.get("by_threshold", [])))
    if "compare" in scores:
        print("\naxial hit rates by setting (centre / random / bright = the three controls):")
        print(format_table(scores["compare"]))
    print(f"\nWrote {rep.png}\n      {rep.json}\n  Research results on synthetic or public data; never for diagnosis.")
    return 0


if __name__ == "__main__":
    from common.fastexit import exit_now

    exit_now(main())
