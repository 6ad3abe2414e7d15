"""Differential privacy at a hospital: Opacus DP-SGD with an honest, cumulative budget.

**Privacy unit: one CT patch** (one candidate of one scan). A patient contributes many
patches (every candidate of their scan; about 40 in the synthetic data, up to ~850 in
LUNA16), so the guarantee for a whole patient is weaker: by group privacy, k patches of
one patient are protected at roughly k times the epsilon (and a larger delta). Say so
wherever an epsilon is reported; it is not a per-patient guarantee.

How it works (sample-level DP-SGD, Poisson sampling, RDP accountant):

- every round a site trains ``local_epochs`` epochs; each epoch draws its balanced
  training set (all positives, fresh negatives) and Opacus Poisson-samples batches from
  it with rate ``q = 1 / batches_per_epoch``. A patch is in the epoch's set with
  probability <= 1, so accounting with ``q`` is an upper bound (the extra subsampling of
  negatives can only help);
- with a target ``--dp-epsilon`` the noise multiplier is calibrated once, for all planned
  rounds x local epochs x steps of the site, not per round;
- the accountant's history lives in a small JSON ledger per site, written atomically
  after every round (and after an interrupted one: steps taken are spent). A simulated
  site's Flower Context does not survive a restart of the run, so the ledger is on disk
  in simulation too; ``--resume`` continues from it;
- before a round, a site whose next round would exceed its budget refuses to train and
  says so (Opacus itself would never stop it);
- per-sample gradient norms come from Opacus' fast gradient clipping ("ghost" mode) with a
  norm sampler for Conv2d registered here, so per-sample gradients of ResNet-50's 23.5 M
  weights are never materialised (see :func:`conv2d_norm_sample`); mixed precision is
  off under DP so the clipped norms are the norms of the gradients that are summed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.atomic import atomic_write_json

if TYPE_CHECKING:
    from opacus import PrivacyEngine

log = logging.getLogger(__name__)

PRIVACY_UNIT = ("one CT patch (a candidate of one scan); a patient contributes many patches, so a patient's "
                "protection is weaker than epsilon suggests (group privacy: k patches ~ k x epsilon)")
ACCOUNTANT = "RDP (Opacus RDPAccountant; Poisson-subsampled Gaussian)"


class BudgetExhausted(RuntimeError):
    """The site's next round would spend more than its privacy budget."""


# --------------------------------------------------------------------------------------
# A norm sampler for Conv2d: Opacus' ghost clipping has them only for Linear/Embedding and
# otherwise materialises per-sample gradients (about 1.5 GB per batch for ResNet-50).
# --------------------------------------------------------------------------------------
def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
                       ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a Conv2d without keeping per-sample gradients.

    With ``A_n`` the unfolded input (p x T) and ``B_n`` the output gradient (o x T) of
    sample n, the weight gradient is ``B_n A_n^T``. Its squared Frobenius norm is either
    computed directly (cost o*p*T, one batch of o x p matrices alive) or, when the layer's
    spatial size T is small, as ``<A_n^T A_n, B_n^T B_n>`` (cost T^2 (o + p), "ghost
    norm"); the cheaper one is taken per layer.
    """
    from opacus.utils.tensor_utils import unfold2d

    if layer.groups != 1:
        raise ValueError("conv2d_norm_sample supports groups=1 only (ResNets use no grouped convolutions)")
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    A = unfold2d(a, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                 dilation=layer.dilation)  # (n, p, T)
    T, p = A.shape[-1], A.shape[1]
    B = backprops.reshape(n, -1, T)  # (n, o, T)
    o = B.shape[1]
    # torch's stubs type a layer's weight and bias as Tensor; they are Parameters (Opacus' keys)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if T * T * (p + o) < o * p * T:
            sq = (torch.bmm(A.transpose(1, 2), A) * torch.bmm(B.transpose(1, 2), B)).sum((1, 2))
        else:
            sq = torch.bmm(B, A.transpose(1, 2)).pow(2).sum((1, 2))
        out[cast(nn.Parameter, layer.weight)] = sq.clamp_min(0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        out[cast(nn.Parameter, layer.bias)] = B.sum(2).norm(dim=1)
    return out


_registered = False


def register_norm_samplers() -> None:
    """Add :func:`conv2d_norm_sample` to Opacus' registry (once per process)."""
    global _registered  # a process-wide registry is Opacus' own design; we only add to it once
    if not _registered:
        from opacus.grad_sample import register_norm_sampler

        register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)
        _registered = True


# --------------------------------------------------------------------------------------
# Signal against noise: will DP-SGD learn on this data at all?
# --------------------------------------------------------------------------------------
def clipped_signal(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], clip: float
                   ) -> dict[str, float]:
    """What one DP-SGD step keeps of the data: per-patch gradients of the trainable weights
    (computed one patch at a time, without Opacus), each clipped to ``clip``, averaged over
    each batch. Returns the median per-patch gradient norm, the share of patches clipped and
    the mean norm of a batch's clipped average (``signal``; at most ``clip``: it is ``clip``
    only when every patch pulls the weights the same way)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    norms: list[float] = []
    signals: list[float] = []
    for x, y in batches:
        total = [torch.zeros_like(p) for p in params]
        for i in range(len(y)):
            grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]).reshape(-1), y[i:i + 1].float()), params)
            n = float(torch.sqrt(cast(torch.Tensor, sum((g.double() ** 2).sum() for g in grads))))
            norms.append(n)
            for t, g in zip(total, grads, strict=True):
                t.add_(g, alpha=min(1.0, clip / max(n, 1e-12)) / len(y))
        signals.append(float(torch.sqrt(cast(torch.Tensor, sum((t.double() ** 2).sum() for t in total)))))
    return {"median_patch_grad_norm": float(np.median(norms)),
            "share_clipped": float(np.mean([n > clip for n in norms])),
            "signal": float(np.mean(signals))}


def noise_norm(noise_multiplier: float, clip: float, batch_size: float, n_weights: int) -> float:
    """Norm of the Gaussian noise DP-SGD adds to one step's averaged gradient."""
    return noise_multiplier * clip * math.sqrt(n_weights) / batch_size


# --------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------
def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon spent by a history of (noise multiplier, sample rate, steps)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]  # type: ignore[misc]
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.005))


@dataclass
class Ledger:
    """What one site has spent, persisted as JSON beside the run (or the site's state path)."""

    site: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    clip: float
    planned_steps: int
    budget: float | None
    history: list[list[float]] = field(default_factory=list)  # [noise, rate, steps]
    rounds: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self) -> float:
        return epsilon_of([(h[0], h[1], int(h[2])) for h in self.history], self.delta)

    def epsilon_after(self, steps: int) -> float:
        extra = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []
        return epsilon_of([(h[0], h[1], int(h[2])) for h in self.history] + extra, self.delta)

    def report(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip": self.clip, "sample_rate": self.sample_rate, "steps": self.steps,
                "planned_steps": self.planned_steps, "budget": self.budget, "accountant": ACCOUNTANT,
                "unit": PRIVACY_UNIT}

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Ledger:
        return cls(**json.loads(Path(path).read_text()))


class LocalDP:
    """DP-SGD for one site and round: plan, budget check, Opacus wrapping, ledger update."""

    def __init__(self, site: str, *, n_patches: int, batches_per_epoch: int, local_epochs: int, rounds: int,
                 clip: float, noise: float, target_epsilon: float, delta: float, grad_sample_mode: str,
                 ledger_path: Path) -> None:
        if batches_per_epoch < 1:
            raise ValueError(f"[site {site}] has no training data for DP-SGD")
        self.site = site
        self.mode = grad_sample_mode
        self.path = Path(ledger_path)
        self.steps_per_round = batches_per_epoch * local_epochs
        q = 1.0 / batches_per_epoch
        delta = delta or 1.0 / (10 * max(n_patches, 1))
        if delta >= 1.0 / max(n_patches, 1):
            log.warning("[site %s] --dp-delta %g is not below 1/(training patches) = %g", site, delta,
                        1.0 / n_patches)
        planned = self.steps_per_round * rounds
        sigma = calibrate_noise(target_epsilon, delta, q, planned) if target_epsilon > 0 else noise
        budget = target_epsilon if target_epsilon > 0 else None
        if self.path.exists():
            self.ledger = Ledger.load(self.path)
            if not (math.isclose(self.ledger.delta, delta) and math.isclose(self.ledger.sample_rate, q)
                    and math.isclose(self.ledger.clip, clip)):
                raise ValueError(f"[site {site}] privacy ledger {self.path} was made with delta "
                                 f"{self.ledger.delta:g}, sample rate {self.ledger.sample_rate:g}, clip "
                                 f"{self.ledger.clip:g}; this run asks for {delta:g}, {q:g}, {clip:g}")
            self.ledger.noise_multiplier = self.ledger.noise_multiplier or sigma
        else:
            self.ledger = Ledger(site, delta, sigma, q, clip, planned, budget)
        self.engine: PrivacyEngine | None = None
        self.model: nn.Module | None = None

    def check_budget(self, server_round: int) -> None:
        """Raise :class:`BudgetExhausted` if this round's steps would pass the budget."""
        led = self.ledger
        if led.budget is None:
            return
        after = led.epsilon_after(self.steps_per_round)
        if after > led.budget * 1.001:
            raise BudgetExhausted(
                f"[site {self.site}] privacy budget reached: epsilon spent {led.epsilon():.3f}, round "
                f"{server_round} would bring it to {after:.3f} > budget {led.budget:g} (delta {led.delta:g}); "
                "this site stops training and only evaluates")

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, seed: int):
        """Opacus-wrapped (model, optimizer, criterion, loader) with the accountant's history."""
        from opacus import PrivacyEngine

        register_norm_samplers()
        model.train()  # Opacus refuses a module in eval mode (the warm model was last evaluated)
        self.engine = PrivacyEngine(accountant="rdp")
        self.engine.accountant.history = [(h[0], h[1], int(h[2])) for h in self.ledger.history]
        gen = torch.Generator().manual_seed(seed)
        out = self.engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                       criterion=nn.BCEWithLogitsLoss(), noise_multiplier=self.ledger.noise_multiplier,
                                       max_grad_norm=self.ledger.clip, poisson_sampling=True,
                                       grad_sample_mode=self.mode, noise_generator=gen)
        if self.mode == "ghost":
            dp_model, dp_opt, criterion, dp_loader = out
        else:
            dp_model, dp_opt, dp_loader = out
            criterion = nn.BCEWithLogitsLoss()
        self.model = dp_model
        return dp_model, dp_opt, criterion, dp_loader

    def loader(self, loader: DataLoader, seed: int) -> DataLoader:
        """Poisson sampling over a later epoch's balanced set."""
        from opacus.data_loader import DPDataLoader

        return DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))

    def detach(self, server_round: int) -> dict:
        """Remove Opacus' hooks from the (warm) model and write the ledger; return the report."""
        if self.model is not None:
            self.model._close()  # type: ignore[operator]
            self.model = None
        if self.engine is not None:
            history = [[float(n), float(q), int(s)] for n, q, s in self.engine.accountant.history]
            if history != self.ledger.history:
                self.ledger.rounds.append(server_round)
            self.ledger.history = history
            self.engine = None
        self.ledger.save(self.path)
        return self.ledger.report()
