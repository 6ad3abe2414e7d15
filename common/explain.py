"""Class activation maps of the nodule classifier, and how well they localise the nodule.

Two heatmaps of the one logit (nodule vs non-nodule):

- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) at any ResNet stage, computed by Captum's
  ``LayerGradCam``: ``ReLU(sum_k mean_ij(dy/dA_k) * A_k)``.
- ``cam``: plain CAM (Zhou et al. 2016) at ``layer4``, which ResNet's global-average-pool
  head allows: ``sum_k w_k * A_k`` with ``w`` the weights of ``fc`` (no ReLU). With that
  head Grad-CAM at ``layer4`` without its ReLU is exactly ``CAM / (h * w)`` (a test checks it).

Where a heatmap cell lies on the patch. Cell ``j`` of a stage with stride ``s`` is the
centre of its receptive field at input pixel ``s * j`` for torchvision's ResNets (every
stride-2 layer has an odd kernel and padding ``k // 2``), whereas the usual image resize
(``F.interpolate(mode="bilinear")``, as Captum's ``LayerAttribution.interpolate`` does with
that mode, or ``cv2.resize``, as pytorch-grad-cam does) puts it at ``s * j + (s - 1) / 2``:
half a cell down and right, 15.5 px for ``layer4`` (stride 32). ``upsample="aligned"``
(the default) interpolates between the true cell centres; ``"bilinear"`` is the usual
resize, kept to measure the difference. A patch of even size has its centre (the
candidate) between pixels ``size/2 - 1`` and ``size/2``, half a pixel from cell ``size/(2s)``.

The three channels of a patch are three planes (axial, coronal, sagittal; see
:mod:`common.patches`), so one heatmap pixel ``(row, col)`` stands for three world points,
one per plane. The grid lays the same map over every plane.

Pointing game (the localisation score). For a positive candidate whose annotated nodule
(the nearest annotation of its scan; it must contain the candidate) has centre ``n`` and
radius ``R = diameter_mm / 2``: take the heatmap's peak pixel (argmax; a map with no
peak, all values equal, is a miss) and its world point ``w_k`` in plane ``k``. The plane
``k`` is a *hit* when ``|w_k - n_k| <= R``, with ``n_k`` the orthogonal projection of ``n``
onto plane ``k`` (the plane through the candidate). Reported: ``axial`` (the axial plane
hits) and ``all_planes`` (all three hit), over the true positives (label 1 and
probability >= threshold) and over all positives, each with a 95% Wilson interval.

Controls come with every figure, because the centred score alone proves little:
``centre_baseline`` (a "heatmap" that always peaks at the patch centre) scores about 1.0,
since candidates sit on their nodule (synthetic positives lie within 0.3 R of its centre),
and ``random_init`` (the same heatmap of a randomly initialised model of the run's
architecture) scores 1.0 at ResNet-50's ``layer4`` at 64 px; ``intensity_baseline`` points at the
densest spot of the patch (:func:`intensity_maps`). The ``shifted`` score needs
real localisation: every positive is cut again from its CT scan with the nodule moved off
the centre, to the same pixel in all three planes (:func:`shifted_centres`), where the
centre baseline mostly misses.

Research software on synthetic or public data; never for diagnosis.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_json
from .cache import PatchCache, open_cache
from .config import RunConfig
from .dataset import eval_loader, to_float
from .engine import predict
from .luna16 import DataError, Nodule, load_luna16, read_scan
from .metrics import sigmoid
from .model import build_model, resolve_device, strip_prefixes
from .patches import PLANES, PatchSpec, extract

log = logging.getLogger(__name__)

METHODS = ("gradcam", "cam")
UPSAMPLING = ("aligned", "bilinear")
# Input pixels per cell of each stage of torchvision's ResNets (conv1 /2, maxpool /2, layer2-4 /2 each).
RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
AUTO_MIN_CELLS = 8
GRID_PNG = "cam_grid.png"
CAM_JSON = "cam.json"
CATEGORIES = (("tp", "true positives"), ("fp", "false positives"), ("fn", "false negatives"))


# ----------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------
class _eval_mode:
    """Evaluation mode inside the block (BatchNorm uses its running statistics and does not
    update them), the model's previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def low_res_maps(model: nn.Module, x: torch.Tensor, *, method: str = "gradcam", layer: str = "layer4"
                 ) -> torch.Tensor:
    """Heatmaps of the logit at the resolution of ``layer``'s output, shape (N, h, w), float32.

    Parameters
    ----------
    model
        A one-logit classifier; for ``method="cam"`` its head must be global average
        pooling then ``model.fc`` (as torchvision's ResNets), fed by ``layer``.
    x
        Input batch (N, C, H, W) in the model's input range (:func:`common.dataset.to_float`).
    method
        ``gradcam`` or ``cam``.
    layer
        Name of the submodule whose output is explained (``layer1`` .. ``layer4`` for ResNets).
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"--layer {layer!r}: the model has no such submodule (ResNets: "
                         f"{', '.join(RESNET_STRIDES)})") from None
    x = x.float()
    with _eval_mode(model):
        if method == "gradcam":
            from captum.attr import LayerGradCam

            maps = LayerGradCam(model, module).attribute(x, target=0, relu_attributions=True)
            return maps.detach()[:, 0].float()
        fc = getattr(model, "fc", None)
        if not isinstance(fc, nn.Linear) or fc.out_features != 1:
            raise ValueError("--method cam needs a model whose head is global average pooling then a one-logit "
                             "Linear named fc (torchvision ResNet)")
        acts: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
        try:
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
        a = acts[0].float()
        if a.shape[1] != fc.in_features:
            raise ValueError(f"--method cam explains the layer that feeds the pooled head ({fc.in_features} "
                             f"channels, layer4 for ResNets); --layer {layer} has {a.shape[1]}")
        return torch.einsum("k,nkhw->nhw", fc.weight[0].detach().float(), a)


def interpolation_matrix(size: int, cells: int, stride: float, mode: str = "aligned", offset: float = 0.0
                         ) -> np.ndarray:
    """Linear interpolation from ``cells`` heatmap cells to ``size`` pixels, shape (size, cells).

    ``aligned``: cell ``j`` sits at pixel ``stride * j + offset`` (its receptive field's
    centre). ``bilinear``: the usual resize, cell ``j`` at ``(j + 0.5) * size / cells - 0.5``,
    identical to ``F.interpolate(mode="bilinear", align_corners=False)``. Beyond the outer
    cells the values are held (clamped), never extrapolated.
    """
    if mode not in UPSAMPLING:
        raise ValueError(f"--upsample {mode!r}: choose one of {', '.join(UPSAMPLING)}")
    u = np.arange(size, dtype=np.float64)
    f = (u - offset) / stride if mode == "aligned" else (u + 0.5) * cells / size - 0.5
    f = np.clip(f, 0.0, cells - 1)
    j0 = np.floor(f).astype(int)
    j1 = np.minimum(j0 + 1, cells - 1)
    w1 = f - j0
    m = np.zeros((size, cells))
    np.add.at(m, (np.arange(size), j0), 1.0 - w1)
    np.add.at(m, (np.arange(size), j1), w1)
    return m


def upsample(maps: torch.Tensor | np.ndarray, size: int, stride: float, mode: str = "aligned",
             offset: float = 0.0) -> np.ndarray:
    """Low-resolution maps (N, h, w) to (N, size, size) float32; see :func:`interpolation_matrix`."""
    maps = np.asarray(maps.cpu().numpy() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    rows = interpolation_matrix(size, maps.shape[1], stride, mode, offset)
    cols = interpolation_matrix(size, maps.shape[2], stride, mode, offset)
    return np.einsum("rh,nhw,cw->nrc", rows, maps, cols).astype(np.float32)


def heatmaps(model: nn.Module, x: torch.Tensor, *, method: str = "gradcam", layer: str = "auto",
             upsample_mode: str = "aligned", stride: float | None = None, offset: float = 0.0) -> np.ndarray:
    """Heatmaps at input resolution (N, H, W), float32, unnormalised (larger = more evidence for "nodule").

    ``stride`` (input pixels per cell of ``layer``) is known for ResNet stages and must be
    given for other layers; ``offset`` is the pixel of cell 0's receptive-field centre.
    ``layer="auto"`` and ``method="cam"`` choose the stage as :func:`resolve_layer`.
    """
    layer = resolve_layer(layer, x.shape[-1], method)
    if stride is None:
        if layer not in RESNET_STRIDES:
            raise ValueError(f"--layer {layer!r}: stride unknown; give stride= for layers other than "
                             f"{', '.join(RESNET_STRIDES)}")
        stride = RESNET_STRIDES[layer]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square patches, got {tuple(x.shape[-2:])}")
    return upsample(low_res_maps(model, x, method=method, layer=layer), x.shape[-1], stride, upsample_mode, offset)


def resolve_layer(layer: str, size: int, method: str = "gradcam") -> str:
    """The ResNet stage to explain: ``layer4`` for CAM; for ``auto`` the deepest stage whose map
    has at least ``AUTO_MIN_CELLS`` cells across the patch (64 px: ``layer2``, 8 x 8; 224 px:
    ``layer3``, 14 x 14; 32 px: ``layer1``). Why: on the demo run (ResNet-50, 64 px) the
    pointing game over all test positives was 0.78 at layer2, 0.63 at layer3 and 0.47 at
    layer4, while a randomly initialised ResNet-50 scores 0.06, 0.39 and 1.00 (layer4's 2 x 2
    map has one cell on the patch centre, which wins for any weights): see ``cam.json``'s
    ``compare`` table and sim/explain.py --compare."""
    if method == "cam":  # the layer that feeds the pooled head (another model's own name stays)
        return "layer4" if layer == "auto" or layer in RESNET_STRIDES else layer
    if layer != "auto":
        return layer
    for name in reversed(RESNET_STRIDES):
        if math.ceil(size / RESNET_STRIDES[name]) >= AUTO_MIN_CELLS:
            return name
    return "layer1"


def peaks(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peak pixel (row, col) of each map (N, 2) and whether it has one (N,): a map whose
    values are all equal (e.g. Grad-CAM of no positive evidence) has none."""
    flat = maps.reshape(len(maps), -1)
    idx = flat.argmax(axis=1)
    rc = np.stack(np.unravel_index(idx, maps.shape[1:]), axis=1)
    return rc, flat.max(axis=1) > flat.min(axis=1)


# ----------------------------------------------------------------------------------------
# Geometry: world points and the patch's pixels (the conventions of common.patches)
# ----------------------------------------------------------------------------------------
def project(spec: PatchSpec, centre_xyz: Sequence[float], point_xyz: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Where a world point falls in each plane of the patch centred at ``centre_xyz``.

    Returns
    -------
    rc
        (3 planes, 2) fractional pixel (row, col) of the point's orthogonal projection onto
        each plane (pixel ``i`` lies at ``(i - (size - 1) / 2) * fov_mm / size`` mm).
    normal_mm
        (3,) signed distance of the point from each plane along its normal.
    """
    d = np.asarray(point_xyz, dtype=np.float64) - np.asarray(centre_xyz, dtype=np.float64)
    step = spec.fov_mm / spec.size
    mid = (spec.size - 1) / 2
    rc = np.empty((3, 2))
    normal = np.empty(3)
    for k, (_, (col_axis, row_axis), (col_sign, row_sign)) in enumerate(PLANES):
        rc[k] = (row_sign * d[row_axis] / step + mid, col_sign * d[col_axis] / step + mid)
        normal[k] = d[3 - col_axis - row_axis]
    return rc, normal


def plane_hits(spec: PatchSpec, centre_xyz: Sequence[float], peak_rc: Sequence[float], nodule: Nodule
               ) -> np.ndarray:
    """Pointing-game hit per plane (3,) bool: the peak's world point in plane k lies within
    the nodule's radius of the nodule centre's projection onto plane k."""
    rc, _ = project(spec, centre_xyz, nodule.xyz)
    dist_mm = np.hypot(rc[:, 0] - peak_rc[0], rc[:, 1] - peak_rc[1]) * spec.fov_mm / spec.size
    return dist_mm <= nodule.diameter_mm / 2


def nearest_nodule(nodules: Sequence[Nodule], xyz: Sequence[float]) -> tuple[Nodule | None, float]:
    """The nodule nearest a world point and its distance in mm (None, inf when there is none)."""
    if not nodules:
        return None, math.inf
    d = np.linalg.norm(np.array([n.xyz for n in nodules]) - np.asarray(xyz), axis=1)
    i = int(d.argmin())
    return nodules[i], float(d[i])


# ----------------------------------------------------------------------------------------
# A results folder
# ----------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """What the explanations need from a results folder: model, test patches, annotations."""

    path: Path
    cfg: RunConfig
    model: nn.Module
    device: torch.device
    cache: PatchCache
    positions: np.ndarray  # test-split positions in the cache index
    data_root: Path
    nodules: dict[str, list[Nodule]]  # annotations of the test scans, by seriesuid

    @property
    def spec(self) -> PatchSpec:
        return self.cache.spec


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Open a finished results folder: ``config.json``, ``model_final.pt``, ``sites.json``, the
    patch cache and the data set it names. ValueError names the file or entry at fault."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"RUN_DIR {path}: no such folder")
    for name in ("config.json", "model_final.pt", "sites.json"):
        if not (path / name).is_file():
            hint = " (the run has not finished; explain a run after its last round)" if name == "model_final.pt" else ""
            raise ValueError(f"RUN_DIR {path}: no {name}{hint}")
    saved = json.loads((path / "config.json").read_text())
    cfg = RunConfig.from_dict(saved["config"])
    for key in ("cache", "data_root"):
        if not saved.get(key):
            raise ValueError(f"{path / 'config.json'}: no {key!r} entry (was the run made without data, "
                             "e.g. a deployment server without --data?)")
    model = build_model(cfg.arch, cfg.norm)
    model_file = path / "model_final.pt"
    try:
        obj = torch.load(model_file, map_location="cpu", weights_only=True)
        model.load_state_dict(strip_prefixes(obj["model"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable or mismatching file gets the same clear message
        raise ValueError(f"{model_file}: cannot be loaded into {cfg.arch} (norm={cfg.norm}) from "
                         f"config.json: {exc}") from None
    try:
        cache = open_cache(Path(saved["cache"]))
    except DataError as exc:
        raise ValueError(f"{path / 'config.json'}: its patch cache cannot be opened ({exc}); rebuild it with "
                         "sim/prepare.py and the run's settings") from None
    if cache.spec.size != cfg.image_size or cache.spec.fov_mm != cfg.fov_mm:
        raise ValueError(f"{path / 'config.json'}: cache {cache.path} has {cache.spec}, the run "
                         f"--image-size {cfg.image_size} --fov-mm {cfg.fov_mm}")
    test = json.loads((path / "sites.json").read_text()).get("test") or []
    positions = cache.rows_of(test)
    if not len(positions):
        raise ValueError(f"{path / 'sites.json'}: its test split has no patches in {cache.path}")
    data_root = Path(saved["data_root"])
    try:
        luna = load_luna16(data_root)
    except DataError as exc:
        raise ValueError(f"{path / 'config.json'}: data_root {data_root} cannot be read ({exc})") from None
    keep = set(test)
    nodules: dict[str, list[Nodule]] = {}
    for n in luna.annotations:
        if n.seriesuid in keep:
            nodules.setdefault(n.seriesuid, []).append(n)
    dev = resolve_device(device)
    return LoadedRun(path, cfg, model.to(dev).eval(), dev, cache, positions, data_root, nodules)


def _batches(n: int, batch: int, desc: str, progress: bool):
    from tqdm import tqdm

    starts = range(0, n, batch)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress or n <= batch, leave=False, dynamic_ncols=True)


def maps_for(model: nn.Module, patches: np.ndarray, *, device: torch.device, method: str, layer: str,
             upsample_mode: str = "aligned", batch: int = 32, progress: bool = False) -> np.ndarray:
    """Heatmaps (N, S, S) of uint8 cache patches (N, 3, S, S), in batches."""
    out = np.empty((len(patches), patches.shape[-2], patches.shape[-1]), dtype=np.float32)
    for a in _batches(len(patches), batch, f"{method} {layer}", progress):
        x = torch.from_numpy(to_float(np.ascontiguousarray(patches[a:a + batch]))).to(device)
        out[a:a + batch] = heatmaps(model, x, method=method, layer=layer, upsample_mode=upsample_mode)
    return out


def test_probabilities(run: LoadedRun) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of every test patch (the engine's ``predict``, float32)."""
    logits, labels = predict(run.model, eval_loader(run.cache, run.positions), run.device, amp=False)
    return sigmoid(logits), labels.astype(np.int8)


# ----------------------------------------------------------------------------------------
# Pointing game
# ----------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k/n ([nan, nan] when n = 0)."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def score_maps(spec: PatchSpec, maps: np.ndarray, centres: np.ndarray, nodules: Sequence[Nodule]) -> dict[str, Any]:
    """Pointing-game figures of heatmaps (N, S, S) of patches centred at ``centres`` (N, 3),
    each with its nodule: hit rates on the axial plane and on all three planes (with 95%
    Wilson intervals), the same for the patch centre as the peak, the number of maps with
    no peak, and (keys ``hits``, ``peaks``) the per-patch hits (N, 3) and peaks (N, 2)."""
    n = len(maps)
    rc, has_peak = peaks(maps) if n else (np.zeros((0, 2), int), np.zeros(0, bool))
    mid = (spec.size - 1) / 2  # the patch centre itself (the candidate), between pixels for even sizes
    hits = np.array([plane_hits(spec, c, p, nod) & h for c, p, nod, h in zip(centres, rc, nodules, has_peak,
                                                                                strict=True)]).reshape(-1, 3)
    centre_hits = np.array([plane_hits(spec, c, (mid, mid), nod) for c, nod in zip(centres, nodules, strict=True)]
                           ).reshape(-1, 3)
    out: dict[str, Any] = {"n": n, "no_peak": int((~has_peak).sum())}
    for name, h in (("axial", hits[:, 0]), ("all_planes", hits.all(axis=1))):
        out[name] = float(h.mean()) if n else math.nan
        out[f"{name}_ci95"] = wilson(int(h.sum()), n)
    out["centre_baseline"] = {"axial": float(centre_hits[:, 0].mean()) if n else math.nan,
                              "all_planes": float(centre_hits.all(axis=1).mean()) if n else math.nan}
    out["hits"] = hits
    out["peaks"] = rc
    return out


@dataclass
class PointingSet:
    """The test split's positives matched to their nodules, ready to score: the cached
    (centred) patches, and the same positives cut again off-centre."""

    spec: PatchSpec
    nodules: list[Nodule]
    prob: np.ndarray  # of the centred patches
    tp: np.ndarray  # bool: prob >= threshold
    patches: np.ndarray  # uint8 (N, 3, S, S)
    centres: np.ndarray  # (N, 3) world mm
    unmatched: int  # positives inside no annotated nodule (left out)
    shift: float  # fraction of the radius; 0 = no shifted set
    shifted: np.ndarray | None = None
    shifted_centres: np.ndarray | None = None
    shifted_prob: np.ndarray | None = None


def shifted_centres(nodules: Sequence[Nodule], shift: float, seed: int = 0) -> np.ndarray:
    """Patch centres that put each nodule off-centre yet at the same pixel in all three planes.

    The centre moves to ``n - shift * R * s * (1, 1, -1)`` (``s`` = +1 or -1, seeded): the
    axial (x, y), coronal (x, -z) and sagittal (y, -z) planes then all show the nodule at
    pixel offset ``s * shift * R / step * (1, 1)`` from the centre, ``sqrt(2) * shift * R``
    away (1.13 R at shift 0.8: the centre is outside the nodule), and each plane cuts it
    ``shift * R`` from its centre (a cross-section of radius 0.6 R at 0.8). That is the
    picture the 2.5D model was trained on, moved; a shift within one plane would instead
    leave the other two planes without the nodule, which a 2.5D model rightly scores as
    "not a nodule here" (vessels are round in one plane only).
    """
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], size=len(nodules))
    n = np.array([nod.xyz for nod in nodules], dtype=np.float64).reshape(-1, 3)
    r = np.array([nod.diameter_mm / 2 for nod in nodules])
    return n - (shift * r * sign)[:, None] * np.array([1.0, 1.0, -1.0])


def cut_patches(run: LoadedRun, uids: np.ndarray, centres: np.ndarray, progress: bool = False) -> np.ndarray:
    """Patches (N, 3, S, S) uint8 cut from the run's CT scans around world centres (the
    preprocessing of the cache: :func:`common.patches.extract`)."""
    from tqdm import tqdm

    out = np.empty((len(centres), 3, run.spec.size, run.spec.size), dtype=np.uint8)
    luna = load_luna16(run.data_root)
    for uid in tqdm(sorted(set(uids.tolist())), desc="cutting off-centre patches", unit="scan",
                    disable=not progress, leave=False, dynamic_ncols=True):
        if uid not in luna.scans:
            raise ValueError(f"data_root {run.data_root}: scan {uid} of the test split is not there")
        sel = np.flatnonzero(uids == uid)
        out[sel] = extract(read_scan(luna.scans[uid].path, uid), centres[sel], run.spec)
    return out


def pointing_set(run: LoadedRun, *, threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                 progress: bool = False, probs: tuple[np.ndarray, np.ndarray] | None = None) -> PointingSet:
    """Match the test positives to their annotated nodules and cut their off-centre patches."""
    prob, labels = probs if probs is not None else test_probabilities(run)
    idx, nods = [], []
    unmatched = 0
    for i in np.flatnonzero(labels == 1):
        n, d = nearest_nodule(run.nodules.get(str(run.cache.seriesuid[run.positions[i]]), []),
                              run.cache.xyz[run.positions[i]])
        if n is None or d > n.diameter_mm / 2:
            unmatched += 1
            continue
        idx.append(i)
        nods.append(n)
    if unmatched:
        log.warning("%d positive test candidate(s) lie in no annotated nodule; left out of the pointing game",
                    unmatched)
    rows = run.positions[np.array(idx, dtype=np.int64)]
    ps = PointingSet(run.spec, nods, prob[idx], prob[idx] >= threshold, run.cache.get(rows), run.cache.xyz[rows],
                     unmatched, shift)
    if shift > 0 and len(rows):
        ps.shifted_centres = shifted_centres(nods, shift, seed)
        ps.shifted = cut_patches(run, run.cache.seriesuid[rows], ps.shifted_centres, progress)
        logits, _ = predict(run.model, _array_loader(ps.shifted), run.device)
        ps.shifted_prob = sigmoid(logits)
    return ps


def _array_loader(patches: np.ndarray, batch: int = 64):
    x = torch.from_numpy(to_float(patches))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=batch)


def intensity_maps(patches: np.ndarray, sigma_px: float = 2.0) -> np.ndarray:
    """The brightness control: the three planes' mean, Gaussian-smoothed (N, S, S). Its peak is
    the densest spot; a heatmap that localises only as well as this adds no knowledge."""
    from scipy import ndimage

    mean = patches.astype(np.float32).mean(axis=1)
    return ndimage.gaussian_filter(mean, sigma=(0, sigma_px, sigma_px), mode="nearest")


def random_init_model(run: LoadedRun, seed: int = 0) -> nn.Module:
    """The run's architecture with seeded random weights: the chance level of a score."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(run.cfg.arch, run.cfg.norm).to(run.device).eval()


def _public(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in scores.items() if k not in ("hits", "peaks")}


def score_set(run: LoadedRun, ps: PointingSet, *, method: str, layer: str, upsample_mode: str = "aligned",
              random_model: nn.Module | None = None) -> dict[str, Any]:
    """Pointing-game figures of one heatmap setting on a :class:`PointingSet` (see :func:`pointing_game`)."""
    layer = resolve_layer(layer, run.spec.size, method)
    parts: dict[str, tuple[np.ndarray, np.ndarray, list[Nodule]]] = {
        "true_positives": (ps.patches[ps.tp], ps.centres[ps.tp], [n for n, t in zip(ps.nodules, ps.tp, strict=True)
                                                                 if t]),
        "positives": (ps.patches, ps.centres, ps.nodules)}
    if ps.shifted is not None and ps.shifted_centres is not None:
        parts["shifted"] = (ps.shifted, ps.shifted_centres, ps.nodules)
    out: dict[str, Any] = {"method": method, "layer": layer, "upsample": upsample_mode,
                           "unmatched_positives": ps.unmatched}
    models = {"model": run.model, **({"random_init": random_model} if random_model is not None else {})}
    for part, (patches, centres, nodules) in parts.items():
        for who, model in models.items():
            maps = maps_for(model, patches, device=run.device, method=method, layer=layer,
                            upsample_mode=upsample_mode)
            s = _public(score_maps(ps.spec, maps, centres, nodules))
            if who == "model":
                out[part] = s
            else:
                out[part]["random_init"] = {"axial": s["axial"], "all_planes": s["all_planes"]}
        bright = score_maps(ps.spec, intensity_maps(patches), centres, nodules)
        out[part]["intensity_baseline"] = {"axial": bright["axial"], "all_planes": bright["all_planes"]}
    if "shifted" in out:
        assert ps.shifted_prob is not None
        out["shifted"].update(shift=ps.shift, mean_prob=float(ps.shifted_prob.mean()),
                              mean_prob_centred=float(ps.prob.mean()))
    return out


def pointing_game(run: LoadedRun | str | Path, *, method: str = "gradcam", layer: str = "auto",
                  upsample_mode: str = "aligned", threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                  progress: bool = True, pset: PointingSet | None = None) -> dict[str, Any]:
    """The pointing-game hit rates of a run's model on its test split (see the module docstring).

    Parameters
    ----------
    run
        A results folder (or one opened with :func:`load_run`).
    method, layer, upsample_mode
        Which heatmap (:func:`heatmaps`); ``method="cam"`` always explains ``layer4``;
        ``layer="auto"`` is :func:`resolve_layer`'s choice.
    threshold
        Probability from which a positive counts as a true positive.
    shift
        Off-centre distance of the ``shifted`` score as a fraction of each nodule's radius
        (:func:`shifted_centres`; 0 = skip it).
    seed
        Seeds the shift directions and the random-init control model.

    Returns
    -------
    dict
        ``true_positives`` and ``positives`` (the cached, centred patches) and ``shifted``
        (all positives, off-centre): each with ``n``, ``axial``, ``all_planes``, their
        ``*_ci95``, ``no_peak``, and three controls: ``centre_baseline`` (the patch centre
        as the peak), ``random_init`` (the same heatmap of a randomly initialised model of
        the run's architecture) and ``intensity_baseline`` (:func:`intensity_maps`);
        ``shifted`` adds ``shift`` and the mean probability of the shifted and centred
        patches (``mean_prob``, ``mean_prob_centred``); plus the settings and
        ``unmatched_positives``.
    """
    run = run if isinstance(run, LoadedRun) else load_run(run)
    ps = pset if pset is not None else pointing_set(run, threshold=threshold, shift=shift, seed=seed,
                                                    progress=progress)
    out = score_set(run, ps, method=method, layer=layer, upsample_mode=upsample_mode,
                    random_model=random_init_model(run, seed))
    out["threshold"] = threshold
    return out


def compare_settings(run: LoadedRun | str | Path, *, threshold: float = 0.5, shift: float = 0.8, seed: int = 0,
                     progress: bool = True, pset: PointingSet | None = None) -> list[dict[str, Any]]:
    """Pointing game of Grad-CAM at every ResNet stage and of CAM, each with both upsamplings
    (the measurements the default rests on). One flat row per setting: method, layer,
    upsample, cells (the map's side at the run's patch size) and, for ``tp`` (true
    positives), ``pos`` (positives) and ``shifted``: ``n``, ``axial``, ``all_planes``,
    ``centre``, ``random`` and ``bright`` (axial hit rates of the three controls)."""
    from tqdm import tqdm

    run = run if isinstance(run, LoadedRun) else load_run(run)
    ps = pset if pset is not None else pointing_set(run, threshold=threshold, shift=shift, seed=seed,
                                                    progress=progress)
    rand = random_init_model(run, seed)
    settings = [(m, layer, u) for m, layer in [*(("gradcam", k) for k in RESNET_STRIDES), ("cam", "layer4")]
                for u in UPSAMPLING]
    rows = []
    for method, layer, mode in tqdm(settings, desc="comparing settings", disable=not progress, leave=False,
                                    dynamic_ncols=True):
        s = score_set(run, ps, method=method, layer=layer, upsample_mode=mode, random_model=rand)
        row: dict[str, Any] = {"method": method, "layer": layer, "upsample": mode,
                               "cells": math.ceil(run.spec.size / RESNET_STRIDES[layer])}
        for part, short in (("true_positives", "tp"), ("positives", "pos"), ("shifted", "shifted")):
            if part in s:
                row.update({f"{short}_n": s[part]["n"], f"{short}_axial": s[part]["axial"],
                            f"{short}_all_planes": s[part]["all_planes"],
                            f"{short}_centre": s[part]["centre_baseline"]["axial"],
                            f"{short}_random": s[part]["random_init"]["axial"],
                            f"{short}_bright": s[part]["intensity_baseline"]["axial"]})
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`compare_settings` as a fixed-width text table."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[f"{r.get(k):.2f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    width = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, width, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, width, strict=True)) for line in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The grid figure and the run's cam.json
# ----------------------------------------------------------------------------------------
@dataclass
class Case:
    category: str  # tp, fp, fn; "tn" when a category had too few and the nearest below threshold fill it
    index: int  # into run.positions
    prob: float
    label: int


def select_cases(prob: np.ndarray, labels: np.ndarray, threshold: float, top_k: int,
                 group: np.ndarray | None = None) -> dict[str, list[Case]]:
    """The ``top_k`` most confident true positives and false positives (highest probability) and
    the most confidently missed positives (lowest probability), one case per ``group`` (e.g.
    per nodule: LUNA16 has several candidates on one nodule). When a run has fewer false
    positives than ``top_k`` the highest-scoring negatives below the threshold fill the column,
    marked ``tn``, so that a reader still sees what the model finds most nodule-like."""
    group = np.arange(len(prob)) if group is None else np.asarray(group)
    order = np.argsort(-prob, kind="stable")

    def first(ids) -> list[int]:
        seen: set = set()
        out: list[int] = []
        for i in ids:
            if group[i] not in seen and len(out) < top_k:
                seen.add(group[i])
                out.append(int(i))
        return out

    tp = first(i for i in order if labels[i] == 1 and prob[i] >= threshold)
    neg = first(i for i in order if labels[i] == 0)
    fn = first(i for i in order[::-1] if labels[i] == 1 and prob[i] < threshold)

    def cases(ids: list[int], cat: str) -> list[Case]:
        return [Case(cat if cat != "fp" or prob[i] >= threshold else "tn", i, float(prob[i]), int(labels[i]))
                for i in ids]

    return {"tp": cases(tp, "tp"), "fp": cases(neg, "fp"), "fn": cases(fn, "fn")}


def draw_grid(path: Path, spec: PatchSpec, columns: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Write the PNG: one column group (axial, coronal, sagittal) per category, one row per case.

    Each case dict holds ``patch`` (3, S, S) uint8, ``map`` (S, S), ``peak`` (row, col),
    ``outlines`` (per plane a list of (row, col, radius_px, cuts_plane)) and ``label`` (text).
    """
    from matplotlib import patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Circle

    from .plots import _figure, _save

    rows = max(1, max(len(v) for v in columns.values()))
    Figure = _figure()
    # constrained layout keeps each case's label clear of the row below; a colour bar column
    fig = Figure(figsize=(1.55 * 3 * len(columns) + 1.2, 1.8 * rows + 1.3), layout="constrained")
    axes = np.asarray(fig.subplots(rows, 3 * len(columns), squeeze=False))
    ten_mm = 10.0 * spec.size / spec.fov_mm  # pixels per 10 mm: a scale bar on every case
    for g, (cat, cases) in enumerate(columns.items()):
        for r in range(rows):
            for k, (plane, _, _) in enumerate(PLANES):
                ax = axes[r, 3 * g + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{dict(CATEGORIES).get(cat, cat)}\n{plane}" if k == 1 else plane, fontsize=8)
                if r >= len(cases):
                    ax.axis("off")
                    if k == 1 and r == 0:
                        ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                    continue
                c = cases[r]
                m = c["map"]
                span = float(m.max() - m.min())
                ax.imshow(c["patch"][k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                heat = (m - m.min()) / span if span > 0 else np.zeros_like(m)
                # transparent where there is little evidence, so the anatomy stays readable
                ax.imshow(heat, cmap="jet", alpha=0.6 * heat, vmin=0, vmax=1, interpolation="nearest")
                ax.plot(c["peak"][1], c["peak"][0], marker="+", color="white", ms=7, mew=1.5)
                for row_px, col_px, rad_px, cuts in c["outlines"][k]:
                    ax.add_patch(Circle((col_px, row_px), rad_px, fill=False, lw=1.1, color="lime",
                                        ls="-" if cuts else "--"))
                if k == 0:
                    y0, x0 = spec.size - 0.06 * spec.size, 0.06 * spec.size
                    halo = [patheffects.withStroke(linewidth=2.5, foreground="black")]  # readable on bone too
                    ax.plot([x0, x0 + ten_mm], [y0, y0], color="white", lw=2, solid_capstyle="butt",
                            path_effects=halo)
                    ax.text(x0 + ten_mm / 2, y0 - 0.03 * spec.size, "10 mm", color="white", fontsize=6,
                            ha="center", va="bottom", path_effects=halo)
                ax.set_xlim(-0.5, spec.size - 0.5)
                ax.set_ylim(spec.size - 0.5, -0.5)
                if k == 1:
                    ax.set_xlabel(c["label"], fontsize=7)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes[:, -1].tolist(), shrink=0.6,
                       aspect=30, pad=0.05)
    bar.set_label("heatmap, scaled per case (0 = none, 1 = its peak)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}\nPatches {spec.fov_mm:g} mm x {spec.fov_mm:g} mm ({spec.size} px), HU window "
                 f"{spec.hu_min:g}..{spec.hu_max:g}; p = the model's probability of a nodule.", fontsize=8)
    _save(fig, path)


def outlines(spec: PatchSpec, centre: Sequence[float], nodules: Sequence[Nodule], own: Nodule | None = None
             ) -> list[list[tuple]]:
    """Per plane, the outlines to draw: (row, col, radius_px, the plane cuts the nodule) of a
    circle of the annotated diameter at the projection of the nodule centre. Drawn are the
    nodules the plane cuts, and ``own`` (the candidate's nodule) in every plane."""
    out: list[list[tuple]] = [[], [], []]
    step = spec.fov_mm / spec.size
    for n in nodules:
        rc, normal = project(spec, centre, n.xyz)
        r_px = n.diameter_mm / 2 / step
        for k in range(3):
            cuts = bool(abs(normal[k]) < n.diameter_mm / 2)
            inside = -r_px <= rc[k, 0] <= spec.size + r_px and -r_px <= rc[k, 1] <= spec.size + r_px
            if inside and (cuts or n is own):
                out[k].append((float(rc[k, 0]), float(rc[k, 1]), float(r_px), cuts))
    return out


@dataclass
class CamReport:
    """What :func:`explain_run` wrote, and the scores (as in ``cam.json``)."""

    png: Path
    json: Path
    scores: dict[str, Any]


def _nodule_groups(run: LoadedRun) -> np.ndarray:
    """Per test patch, the nodule it lies in (uid and nodule index) or its own index."""
    out = np.empty(len(run.positions), dtype=object)
    for i, pos in enumerate(run.positions):
        uid = str(run.cache.seriesuid[pos])
        nods = run.nodules.get(uid, [])
        n, d = nearest_nodule(nods, run.cache.xyz[pos])
        out[i] = (uid, nods.index(n)) if n is not None and d <= n.diameter_mm / 2 else i
    return out


def explain_run(run_dir: str | Path, *, method: str = "gradcam", layer: str = "auto",
                upsample_mode: str = "aligned", top_k: int = 4, threshold: float = 0.5, shift: float = 0.8,
                seed: int = 0, device: str = "cpu", compare: bool = False, progress: bool = True) -> CamReport:
    """Heatmap grid and localisation scores of a finished run, written into its folder.

    Writes ``RUN_DIR/cam_grid.png`` (the ``top_k`` most confident true positives, false
    positives and false negatives of the test split, all three planes, heatmap, peak and
    annotated nodule outlines: solid where the plane cuts the nodule, dashed where the
    nodule lies off the plane) and ``RUN_DIR/cam.json`` (settings, the cases shown, the
    pointing game of the chosen heatmap and of plain CAM, and with ``compare`` the table of
    :func:`compare_settings`). Options as in :func:`pointing_game`; ``device`` as ``--device``.

    Returns
    -------
    CamReport
        Paths of the PNG and JSON, and ``cam.json``'s content (key ``scores``:
        ``pointing_game``, ``pointing_game_cam``, optionally ``compare``).
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if layer != "auto" and layer not in RESNET_STRIDES:
        raise ValueError(f"--layer {layer!r}: choose auto or one of {', '.join(RESNET_STRIDES)}")
    if upsample_mode not in UPSAMPLING:
        raise ValueError(f"--upsample {upsample_mode!r}: choose one of {', '.join(UPSAMPLING)}")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"--shift must be in [0, 1) (a fraction of the nodule radius; 0 = no off-centre "
                         f"score), got {shift}")
    run = load_run(run_dir, device)
    layer = resolve_layer(layer, run.spec.size, method)
    log.info("%s: %s (norm=%s), %d test patches of %d px / %g mm; %s at %s (%s upsampling)", run.path,
             run.cfg.arch, run.cfg.norm, len(run.positions), run.spec.size, run.spec.fov_mm, method, layer,
             upsample_mode)
    prob, labels = test_probabilities(run)
    chosen = select_cases(prob, labels, threshold, top_k, group=_nodule_groups(run))
    flat = [c for cases in chosen.values() for c in cases]
    rows = run.positions[np.array([c.index for c in flat], dtype=np.int64)]
    patches = run.cache.get(rows)
    maps = maps_for(run.model, patches, device=run.device, method=method, layer=layer, upsample_mode=upsample_mode)
    rc, has_peak = peaks(maps) if len(maps) else (np.zeros((0, 2), int), np.zeros(0, bool))
    columns: dict[str, list[dict[str, Any]]] = {cat: [] for cat, _ in CATEGORIES}
    shown = []
    for j, (c, pos) in enumerate(zip(flat, rows, strict=True)):
        uid, centre = str(run.cache.seriesuid[pos]), run.cache.xyz[pos]
        scan_nodules = run.nodules.get(uid, [])
        nod, dist = nearest_nodule(scan_nodules, centre)
        if nod is not None and dist > nod.diameter_mm / 2:
            nod = None  # the candidate lies in no nodule: nothing to point at
        hits = plane_hits(run.spec, centre, rc[j], nod) & has_peak[j] if nod is not None else None
        text = f"{c.category.upper()} p={c.prob:.2f}\n..{uid[-6:]}"
        if hits is not None:
            text += " hit" if hits[0] else " miss"
        columns["fp" if c.category == "tn" else c.category].append(
            {"patch": patches[j], "map": maps[j], "peak": rc[j], "label": text,
             "outlines": outlines(run.spec, centre, scan_nodules, nod)})
        shown.append({"category": c.category, "seriesuid": uid, "xyz": centre.tolist(), "prob": c.prob,
                      "label": c.label, "peak_rc": rc[j].tolist(), "has_peak": bool(has_peak[j]),
                      "nodule": None if nod is None else {"xyz": list(nod.xyz), "diameter_mm": nod.diameter_mm,
                                                          "distance_mm": dist},
                      "hits_axial_coronal_sagittal": None if hits is None else hits.tolist()})
    ps = pointing_set(run, threshold=threshold, shift=shift, seed=seed, progress=progress, probs=(prob, labels))
    log.info("pointing game over %d positives (%d true positives)%s", len(ps.nodules), int(ps.tp.sum()),
             f", also shifted {shift:g} R off-centre" if shift else "")
    scores: dict[str, Any] = {"pointing_game": pointing_game(run, method=method, layer=layer,
                                                             upsample_mode=upsample_mode, threshold=threshold,
                                                             seed=seed, pset=ps, progress=progress)}
    if method != "cam":
        scores["pointing_game_cam"] = pointing_game(run, method="cam", upsample_mode=upsample_mode,
                                                    threshold=threshold, seed=seed, pset=ps, progress=progress)
    if compare:
        scores["compare"] = compare_settings(run, threshold=threshold, seed=seed, pset=ps, progress=progress)
    pg = scores["pointing_game"]
    shifted = f", {shift:g} R off-centre {pg['shifted']['axial']:.2f}" if "shifted" in pg else ""
    title = (f"{run.path.name}: {method} at {layer} ({upsample_mode} upsampling), {run.cfg.arch} norm={run.cfg.norm}."
             f" Pointing game (axial): true positives {pg['true_positives']['axial']:.2f} "
             f"(n={pg['true_positives']['n']}), all positives {pg['positives']['axial']:.2f}{shifted}.\n"
             "One heatmap over the three planes; +: its peak; green: annotated nodules the plane cuts "
             "(dashed: the candidate's nodule, off this plane). Research software, not for diagnosis.")
    png = run.path / GRID_PNG
    draw_grid(png, run.spec, columns, title)
    doc = {"settings": {"method": method, "layer": layer, "upsample": upsample_mode, "top_k": top_k,
                        "threshold": threshold, "shift": shift, "seed": seed, "arch": run.cfg.arch,
                        "norm": run.cfg.norm, "image_size": run.spec.size, "fov_mm": run.spec.fov_mm},
           "figures": {"grid": GRID_PNG}, "cases": shown, "scores": scores,
           "test_patches": int(len(run.positions)), "test_positives": int(labels.sum())}
    atomic_write_json(run.path / CAM_JSON, doc)
    return CamReport(png, run.path / CAM_JSON, doc)


def cam_figures(run_dir: str | Path) -> tuple[list[Path], dict[str, Any]] | None:
    """For the comparison report: the run's CAM figure(s) and scores, or None when
    ``sim/explain.py`` has not been run on it (no ``cam.json``)."""
    path = Path(run_dir) / CAM_JSON
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    pngs = [Path(run_dir) / name for name in doc.get("figures", {}).values() if (Path(run_dir) / name).is_file()]
    return pngs, {"settings": doc.get("settings", {}), **doc.get("scores", {})}
