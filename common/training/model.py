"""The model factory: torchvision ResNets with one logit, the same for every role.

The server, every site and the centralized baseline build their model here, so weights
always match. ``norm="group"`` gives the differential-privacy variant: Opacus computes
per-sample gradients, which BatchNorm (mixing samples) forbids; GroupNorm keeps the
parameter names of the BatchNorm layers (weight, bias) and drops only their running
statistics. That variant also avoids in-place operations on tensors Opacus hooks:
torchvision's ``ReLU(inplace=True)`` and ``out += identity`` in its blocks fail in hooks
mode ("Output 0 of BackwardHookFunction is a view and is being modified inplace").

Nothing is downloaded: weights start random unless a local file is given.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import TRAIN_PARAMS


def _import_torchvision_resnet() -> types.ModuleType:
    """``torchvision.models.resnet``, imported without importing ``torch._dynamo``.

    ``import torchvision`` imports its ops, and ``torchvision/ops/roi_align.py`` (0.29) imports
    ``is_compile_supported`` from ``torch._dynamo.utils`` at the top, which loads all of dynamo
    (1.2 s of CPU per process here, 40 % of what importing torch and torchvision costs;
    more on a loaded machine): a known
    upstream cost (pytorch/vision#8436's own comment says dynamo should not be imported eagerly).
    Every process that builds a model pays it, including those that never train (the server,
    a deployed site's evaluation and handshake messages, the report tools). While torchvision
    imports, ``torch._dynamo.utils`` resolves to a stand-in whose ``is_compile_supported`` imports
    the real one on first call (roi_align's deterministic path; this project never calls it);
    the stand-in is removed right after, so any later import gets the real module. Processes that
    step an optimiser import dynamo there anyway (``torch.optim`` does, at every step)."""
    name = "torch._dynamo.utils"
    if "torchvision" not in sys.modules and name not in sys.modules:
        def is_compile_supported(*args, **kwargs):
            from torch._dynamo.utils import is_compile_supported as real

            return real(*args, **kwargs)

        stand_in = types.ModuleType(name)
        stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
        sys.modules[name] = stand_in
        try:
            import torchvision  # noqa: F401
        finally:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
    from torchvision.models import resnet as module

    return module


resnet = _import_torchvision_resnet()

log = logging.getLogger(__name__)

LAYERS = {"resnet50": (resnet.Bottleneck, [3, 4, 6, 3]), "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
          "resnet10": (resnet.BasicBlock, [1, 1, 1, 1])}


class _OutOfPlaceBottleneck(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _OutOfPlaceBasicBlock(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def build_model(arch: str = "resnet50", norm: str = "batch") -> nn.Module:
    """A ResNet with a single logit (nodule vs non-nodule), randomly initialised."""
    if arch not in LAYERS:
        raise ValueError(f"arch {arch!r}: choose one of {', '.join(LAYERS)}")
    block, layers = LAYERS[arch]
    if norm == "batch":
        return resnet.ResNet(block, layers, num_classes=1)
    if norm != "group":
        raise ValueError(f"norm {norm!r}: choose batch or group")
    oop = _OutOfPlaceBottleneck if block is resnet.Bottleneck else _OutOfPlaceBasicBlock
    model = resnet.ResNet(oop, layers, num_classes=1, norm_layer=_group_norm)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model





def set_trainable(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Choose which weights training updates; returns them (for the optimizer).

    ``norms+head``: only the normalisation layers' scales and shifts and the final
    classifier (~55 k of ResNet-50's 23.5 M weights); every convolution keeps the weights
    it was given. Under DP-SGD the noise added per step grows with the number of trained
    weights while the clipped signal does not, so training fewer weights keeps more signal.
    """
    if which not in TRAIN_PARAMS:
        raise ValueError(f"train params {which!r}: choose one of {', '.join(TRAIN_PARAMS)}")
    keep: set[int] = set()
    for m in model.modules():
        if which == "all" or isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.Linear)):
            keep.update(id(p) for p in m.parameters(recurse=False))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer of every training run (sites, centralized baseline), over the weights
    ``cfg.train_params`` selects: Adam (the reference workload) or SGD with momentum."""
    params = set_trainable(model, cfg.train_params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fusable(params) or None)
    if cfg.optimizer != "adam":
        raise ValueError(f"optimizer {cfg.optimizer!r}: choose adam or sgd")
    return adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused optimizer kernels take these weights (floating point, on CPU or CUDA)."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def adam(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with torch's fused kernel where it runs: the same update as the default (for-each)
    kernel to rounding, in one pass over the weights instead of a dozen: on this project's 2-core
    CPU a ResNet-50 step at 64 px, batch 16, took 319 ms instead of 442 ms (its 23.5 M weights made
    the for-each update ~75-120 ms of every step, the fused one 16 ms)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fusable(params) or None)


def lr_at(cfg, pass_index: int) -> float:
    """The learning rate of data pass ``pass_index`` (0-based) of ``rounds x local_epochs``.

    A pure function of the pass, the same for a site's local epoch ``e`` of round ``r``
    (pass ``(r-1) E + e``) and the centralized baseline's epoch of that number, so both
    follow one schedule and a resumed run uses exactly the rates of an uninterrupted one.
    Warm-up rises linearly to ``lr`` over ``warmup_passes``; cosine then takes each pass
    at its middle point, so the last pass still trains (at a small rate).
    """
    total, warm = cfg.rounds * cfg.local_epochs, cfg.warmup_passes
    if pass_index < warm:
        return cfg.lr * (pass_index + 1) / (warm + 1)
    if cfg.lr_schedule == "cosine":
        q = (pass_index - warm + 0.5) / max(total - warm, 1)
        return float(cfg.lr * 0.5 * (1.0 + np.cos(np.pi * min(q, 1.0))))
    if cfg.lr_schedule == "step":
        return cfg.lr * 0.1 ** sum(pass_index >= m * total for m in (0.5, 0.75))
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


def norm_keys(model: nn.Module) -> list[str]:
    """State keys of the normalisation layers (weights, biases, running statistics):
    what FedBN keeps at each site."""
    out: list[str] = []
    for name, m in strip_prefixes(dict(model.named_modules())).items():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            out += [f"{name}.{k}" for k in m.state_dict()]
    return out


def signature(model_or_state: nn.Module | Mapping[str, object]) -> str:
    """Hash of parameter names and shapes: equal signatures mean weights can be exchanged."""
    state: Mapping[str, Any] = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(f"{k}:{tuple(np.shape(state[k]))};".encode())
    return h.hexdigest()[:12]


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (Opacus ``_module.``, DataParallel ``module.``)."""
    out = {}
    for k, v in state.items():
        for p in ("_module.", "module."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint: a plain state_dict, our checkpoint (``{"model": ...}``) or
    torchvision ImageNet weights (their 1000-class head is skipped).

    Raises ValueError naming the file when it does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"--weights {path}: cannot be read as a PyTorch checkpoint ({exc})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"--weights {path}: expected a state_dict or a checkpoint with a 'model' entry")
    state = strip_prefixes(state)
    own = model.state_dict()
    skipped = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    usable = {k: v for k, v in state.items() if k in own and k not in skipped}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing:
        raise ValueError(f"--weights {path}: {len(missing)} tensor(s) of the model are missing or differ in "
                         f"shape, e.g. {missing[0]} (is it the same --arch / --norm?)")
    model.load_state_dict(usable, strict=False)
    if skipped or any(k.startswith("fc.") for k in own if k not in usable):
        log.info("--weights %s: loaded all but the classification head (new one-logit head)", path)


def get_arrays(model: nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays (without Opacus' prefix): what leaves a site.
    ``copy=False`` returns views of a CPU model's tensors, valid until it next changes."""
    out = {k: v.detach().cpu().numpy() for k, v in strip_prefixes(model.state_dict()).items()}
    return {k: v.copy() for k, v in out.items()} if copy else out


def set_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load numpy arrays into the model, casting each to the dtype of its tensor."""
    own = model.state_dict()
    prefix = "_module." if next(iter(own)).startswith("_module.") else ""
    with torch.no_grad(), warnings.catch_warnings():
        # arrays may be read-only views of a message's bytes (common.training.wire.view): only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, v in arrays.items():
            t = own[prefix + k]
            t.copy_(torch.from_numpy(np.asarray(v)).to(t.dtype))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)
