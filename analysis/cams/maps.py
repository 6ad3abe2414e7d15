"""Heatmaps of the one logit: Grad-CAM and plain CAM, upsampled onto the patch (see :mod:`analysis.cams`)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


METHODS = ("gradcam", "cam")
UPSAMPLING = ("aligned", "bilinear")
# Input pixels per cell of each stage of torchvision's ResNets (conv1 /2, maxpool /2, layer2-4 /2 each).
RESNET_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
AUTO_MIN_CELLS = 16


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
        Input batch (N, C, H, W) in the model's input range (:func:`common.data.loaders.to_float`).
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
    has at least ``AUTO_MIN_CELLS`` cells across the patch (64 px: ``layer1``, 16 x 16, 3 mm a
    cell at the default 48 mm field; 128 and 224 px: ``layer2``). Why: on the demo's federated
    model of seed 0 (ResNet-50, 64 px; ``sim/explain.py RUN --compare``, 2026-12-07) Grad-CAM
    found a nodule moved 0.8 radii off the centre in 0.89 of the patches the model still calls
    positive at layer1, 0.70 at layer2, 0.31 at layer3 and 0.27 at layer4 (best control 0.27),
    and a nodule at a random position in 0.96 / 0.89 / 0.46 / 0.24 (best control 0.71); on the
    centred patches all stages score 0.97-0.99, but there the patch centre scores 1.00 and a
    randomly initialised model 0.05 (layer1), 0.09, 0.60 and 1.00 (layer4's 2 x 2 map has one
    cell on the centre, which wins for any weights). See ``cam.json``'s ``compare`` table."""

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
