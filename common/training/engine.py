"""The one training engine: ``train_one_epoch`` and ``evaluate``.

Sites, the centralized baseline, the DP path (Opacus swaps the model, optimizer and
loader passed in) and the benchmarks all call these two functions. FedProx is only an
extra loss term (:func:`proximal_term`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.evaluation.metrics import binary_metrics

log = logging.getLogger(__name__)


class DeadlineExceeded(RuntimeError):
    """Local training ran past the round's deadline; the server has closed the round."""


def amp_active(device: torch.device, amp: bool) -> bool:
    """bfloat16 autocast runs on CUDA, and on CPUs with native bfloat16 (AVX512-BF16, AMX),
    where oneDNN makes ResNet-50 training about 1.5x faster; elsewhere it would be slower."""
    if not amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, amp: bool):
    if amp_active(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare(model: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    """Move to the device; channels_last where mixed precision runs (faster convolutions)."""
    model = model.to(device)
    if amp_active(device, amp):
        model = model.to(memory_format=torch.channels_last)
    return model


def proximal_term(model: nn.Module, mu: float) -> Callable[[nn.Module], torch.Tensor]:
    """FedProx: ``mu/2 * ||w - w_global||^2`` with ``w_global`` the weights right now."""
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def term(m: nn.Module) -> torch.Tensor:
        params = [p for p in m.parameters() if p.requires_grad]
        # sum() of tensors is typed Tensor | int (its start value 0)
        return cast(torch.Tensor, (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)))

    return term


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, *, amp: bool = False,
                    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                    deadline: float | None = None, log_prefix: str = "", progress: bool = False,
                    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, float]:
    """One pass over ``loader`` with BCE on one logit; returns loss, examples, seconds, img/s.

    ``criterion`` (mean over the batch) defaults to BCE-with-logits; DP training passes
    Opacus' wrapped criterion here, which runs both backward passes of ghost clipping.
    """
    model.train()
    criterion = criterion or nn.BCEWithLogitsLoss()
    total_loss, seen, t0 = 0.0, 0, time.perf_counter()
    channels_last = amp_active(device, amp)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=log_prefix.strip() or "train", unit="batch", leave=False,
                   dynamic_ncols=True, disable=None)  # None: off when not a terminal (logs, CI)
    for step, (x, y) in enumerate(loader):
        if deadline is not None and time.time() > deadline:
            raise DeadlineExceeded(f"{log_prefix}local training passed the round deadline after {step} steps")
        if len(y) == 0:  # Poisson sampling (DP) can draw an empty batch
            continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True).float()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(x).reshape(-1).float()
        loss = criterion(logits, y)
        data_loss = float(loss.detach())
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not math.isfinite(data_loss):
            raise FloatingPointError(f"{log_prefix}training loss became {data_loss} at step {step}; "
                                     "lower --lr or check the input data")
        loss.backward()
        optimizer.step()
        total_loss += data_loss * len(y)
        seen += len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return {"loss": total_loss / max(seen, 1), "examples": float(seen), "seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def bn_statistics(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
                  ) -> dict[str, np.ndarray]:
    """BatchNorm running statistics for the model's current weights, re-estimated over one
    pass of ``loader`` (train-mode forward passes, a cumulative average over its batches;
    no weight changes). The model's own statistics and momentum are restored afterwards.

    Under FedAvg each site's running statistics describe its *local* weights of the last
    few batches; their average does not describe the averaged weights (measured on the
    demo: test ROC-AUC 0.90 with averaged statistics, 0.99 with re-estimated ones).
    """
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for _, m in bns]
    was_training = model.training
    channels_last = amp_active(device, amp)
    try:
        for _, m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass, not an exponential one
        model.train()
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            with autocast(device, amp):
                model(x)
        return {f"{name}.{k}": getattr(m, k).detach().cpu().numpy().copy()
                for name, m in bns for k in ("running_mean", "running_var")}
    finally:
        for (_, m), (momentum, state) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.load_state_dict(state)
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every sample of ``loader`` (in loader order)."""
    model.eval()
    logits, labels = [], []
    channels_last = amp_active(device, amp)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x).reshape(-1).float()
        logits.append(out.cpu().numpy())
        labels.append(y.numpy())
    if not logits:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(logits), np.concatenate(labels)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
             ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics of :func:`common.evaluation.metrics.binary_metrics`, plus the logits and labels."""
    t0 = time.perf_counter()
    logits, labels = predict(model, loader, device, amp)
    metrics = binary_metrics(labels, logits)
    metrics["seconds"] = time.perf_counter() - t0
    return metrics, logits, labels
