"""Differential privacy: the accountant, the budget, Opacus on our ResNets, the handshake."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.privacy.dpsgd import BudgetExhausted, LocalDP, conv2d_norm_sample, epsilon_of
from common.training.engine import train_one_epoch
from common.training.model import build_model


def rdp_sampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at an integer order (Mironov et al. 2019,
    binomial expansion), written out here independently of Opacus."""
    logs = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            for k in range(alpha + 1)]
    top = max(logs)
    return (top + math.log(sum(math.exp(v - top) for v in logs))) / (alpha - 1)


def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    best = math.inf
    for alpha in range(2, 256):
        rdp = steps * rdp_sampled_gaussian(q, sigma, alpha)
        # conversion of Balle et al. 2020 (the one Opacus uses)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


def tiny_loader(n=32, size=16, batch=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g), (torch.arange(n) % 2).float()),
                      batch_size=batch)


def dp_rounds(tmp_path, rounds_run: int, rounds_planned: int, target: float = 0.0, noise: float = 1.1,
              mode: str = "ghost"):
    model = build_model("resnet10", "group")
    reports = []
    for r in range(1, rounds_run + 1):
        dp = LocalDP("site-x", n_patches=32, batches_per_epoch=4, local_epochs=2, rounds=rounds_planned, clip=1.0,
                     noise=noise, target_epsilon=target, delta=1e-3, grad_sample_mode=mode,
                     ledger_path=tmp_path / "site-x.privacy.json")
        dp.check_budget(r)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        m, opt, crit, loader = dp.attach(model, opt, tiny_loader(), seed=r)
        train_one_epoch(m, loader, opt, torch.device("cpu"), criterion=crit)
        train_one_epoch(m, dp.loader(tiny_loader(), seed=r + 100), opt, torch.device("cpu"), criterion=crit)
        reports.append(dp.detach(r))
    return reports


def test_epsilon_after_k_rounds_equals_an_independent_rdp_computation(tmp_path):
    reports = dp_rounds(tmp_path, rounds_run=3, rounds_planned=3)
    for k, rep in enumerate(reports, 1):
        assert rep["steps"] == 8 * k  # 4 batches x 2 local epochs per round
        ours = independent_epsilon(q=0.25, sigma=1.1, steps=8 * k, delta=1e-3)
        # Opacus also searches fractional orders (1.1, 1.2, ...), which this integer-order
        # computation cannot, so its epsilon may be a few percent lower, never higher
        assert ours * 0.95 <= rep["epsilon"] <= ours * 1.0001
    assert reports[0]["epsilon"] < reports[1]["epsilon"] < reports[2]["epsilon"]  # cumulative


def test_target_epsilon_is_spent_over_all_planned_rounds_and_then_training_stops(tmp_path):
    reports = dp_rounds(tmp_path, rounds_run=2, rounds_planned=2, target=3.0)
    assert reports[0]["epsilon"] < 3.0 and reports[1]["epsilon"] == pytest.approx(3.0, abs=0.02)
    led = json.loads((tmp_path / "site-x.privacy.json").read_text())
    assert led["rounds"] == [1, 2] and led["budget"] == 3.0
    dp = LocalDP("site-x", n_patches=32, batches_per_epoch=4, local_epochs=2, rounds=2, clip=1.0, noise=1.0,
                 target_epsilon=3.0, delta=1e-3, grad_sample_mode="ghost", ledger_path=tmp_path / "site-x.privacy.json")
    with pytest.raises(BudgetExhausted, match="privacy budget reached.*stops training"):
        dp.check_budget(3)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_resnet50_trains_without_the_inplace_error(tmp_path, mode):
    model = build_model("resnet50", "group")
    dp = LocalDP("s", n_patches=4, batches_per_epoch=1, local_epochs=1, rounds=1, clip=1.0, noise=1.0,
                 target_epsilon=0.0, delta=1e-3, grad_sample_mode=mode, ledger_path=tmp_path / "l.json")
    before = model.fc.weight.detach().clone()
    m, opt, crit, loader = dp.attach(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                     tiny_loader(n=2, size=32, batch=2), seed=0)
    st = train_one_epoch(m, loader, opt, torch.device("cpu"), criterion=crit)
    dp.detach(1)
    assert np.isfinite(st["loss"])
    assert not torch.equal(before, model.fc.weight)
    assert not any(k.startswith("_module.") for k in model.state_dict())  # the warm model is left clean
    assert not model._forward_hooks and not any(mod._forward_hooks for mod in model.modules())


def test_conv_norm_sampler_matches_per_sample_gradients():
    torch.manual_seed(0)
    for conv, size in [(nn.Conv2d(3, 4, 3, padding=1, bias=True), 8), (nn.Conv2d(4, 6, 1, stride=2), 6),
                       (nn.Conv2d(5, 7, 3, stride=2, padding=1), 3)]:
        x = torch.randn(3, conv.in_channels, size, size)
        grads = []
        for i in range(3):
            conv.zero_grad()
            out = conv(x[i:i + 1])
            (out * torch.arange(out.numel()).reshape(out.shape).float().sin()).sum().backward()
            grads.append((conv.weight.grad.norm(), conv.bias.grad.norm() if conv.bias is not None else None))
        out = conv(x)
        w = torch.arange(out[0].numel()).reshape(out.shape[1:]).float().sin()
        backprops = w.expand_as(out).contiguous()
        norms = conv2d_norm_sample(conv, [x], backprops)
        for i, (gw, gb) in enumerate(grads):
            assert float(norms[conv.weight][i]) == pytest.approx(float(gw), rel=1e-4)
            if gb is not None:
                assert float(norms[conv.bias][i]) == pytest.approx(float(gb), rel=1e-4)


def test_dp_step_on_resnet50_is_the_mean_of_clipped_per_sample_gradients():
    """Ghost clipping with this project's Conv2d norm sampler on the real DP ResNet-50
    (bottlenecks, strided and 1x1 convolutions, GroupNorm): one noise-free DP-SGD step moves
    the weights by exactly the mean of per-sample gradients each clipped to the norm,
    computed here one patch at a time. Clip at the median norm: both branches occur."""
    import copy

    from opacus import PrivacyEngine

    from common.privacy.dpsgd import register_norm_samplers

    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    model = build_model("resnet50", "group")
    per_sample, norms = [], []
    for i in range(len(y)):
        model.zero_grad()
        nn.BCEWithLogitsLoss()(model(x[i:i + 1]).reshape(-1), y[i:i + 1]).backward()
        per_sample.append([p.grad.detach().clone() for p in model.parameters()])
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in per_sample[-1]))))
    clip = float(np.median(norms))
    expected = [sum(min(1.0, clip / n) * g[k] for g, n in zip(per_sample, norms, strict=True)) / len(y)
                for k in range(len(per_sample[0]))]

    register_norm_samplers()
    dp_model = copy.deepcopy(model)
    before = [p.detach().clone() for p in dp_model.parameters()]
    m, opt, crit, loader = PrivacyEngine(accountant="rdp").make_private(
        module=dp_model, optimizer=torch.optim.SGD(dp_model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)), criterion=nn.BCEWithLogitsLoss(),
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode="ghost")
    for xb, yb in loader:
        opt.zero_grad()
        crit(m(xb).reshape(-1), yb).backward()
        opt.step()
    step = [b - p.detach() for b, p in zip(before, dp_model.parameters(), strict=True)]
    err = torch.sqrt(sum(((s - e) ** 2).sum() for s, e in zip(step, expected, strict=True)))
    size = torch.sqrt(sum((e ** 2).sum() for e in expected))
    assert size > 0 and float(err / size) < 1e-3
    # the signal sim/bench.py reports (dpsignal) is this step's norm
    from common.privacy.dpsgd import clipped_signal

    sig = clipped_signal(model, [(x, y)], clip)
    assert sig["signal"] == pytest.approx(float(size), rel=1e-4)
    assert sig["share_clipped"] == pytest.approx(np.mean([n > clip for n in norms]))


def test_epsilon_of_an_empty_history_is_zero():
    assert epsilon_of([], 1e-5) == 0.0


def test_dp_sgd_training_of_norms_and_head_only_leaves_every_convolution_as_given(tmp_path):
    from common.config import RunConfig
    from common.training.model import make_optimizer, set_trainable

    model = build_model("resnet10", "group")
    optimizer = make_optimizer(model, RunConfig(optimizer="sgd", lr=0.05, momentum=0.9, train_params="norms+head"))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    assert 0 < sum(p.numel() for p in trainable) < 0.01 * sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad == any(p is t for t in trainable) for p in model.parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dp = LocalDP("s", n_patches=32, batches_per_epoch=4, local_epochs=1, rounds=1, clip=1.0, noise=1.0,
                 target_epsilon=0.0, delta=1e-3, grad_sample_mode="ghost", ledger_path=tmp_path / "l.json")
    m, opt, crit, loader = dp.attach(model, optimizer, tiny_loader(), seed=0)
    train_one_epoch(m, loader, opt, torch.device("cpu"), criterion=crit)
    dp.detach(1)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "fc.weight" in changed and "layer4.0.bn2.weight" in changed
    assert not any("conv" in k or "downsample.0" in k for k in changed)
    assert len(set_trainable(model, "all")) == len(list(model.parameters()))  # and back


def test_dp_sgd_without_noise_learns_what_plain_training_learns(tmp_path):
    """The DP path's wiring (Poisson loader, ghost-clipping loss, optimizer) carries the
    gradient's sign and size: with zero noise it fits an easy task, as plain training does."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), (torch.arange(128) % 2).float()
    x[y == 1, :, 12:20, 12:20] += 2.0  # positives carry a bright blob

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    final = {}
    for noise in (None, 0.0):
        torch.manual_seed(0)
        model = build_model("resnet10", "group")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if noise is None:
            losses = [train_one_epoch(model, loader(), opt, torch.device("cpu"))["loss"] for _ in range(3)]
        else:
            dp = LocalDP("s", n_patches=128, batches_per_epoch=8, local_epochs=3, rounds=1, clip=1.0, noise=noise,
                         target_epsilon=0.0, delta=1e-3, grad_sample_mode="ghost", ledger_path=tmp_path / "l.json")
            m, opt, crit, ld = dp.attach(model, opt, loader(), seed=0)
            losses = [train_one_epoch(m, ld if e == 0 else dp.loader(loader(), seed=e), opt, torch.device("cpu"),
                                      criterion=crit)["loss"] for e in range(3)]
            dp.detach(1)
        final[noise] = losses[-1]
        assert losses[-1] < 0.5 * losses[0], (noise, losses)
    assert final[0.0] < 0.1 and final[None] < 0.1
