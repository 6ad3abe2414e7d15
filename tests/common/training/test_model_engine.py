"""The model factory and the one engine, including a real ResNet-50 step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.training.engine import DeadlineExceeded, evaluate, prepare, proximal_term, train_one_epoch
from common.training.model import build_model, get_arrays, load_weights, set_arrays, signature


def _loader(n=8, size=32, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (torch.arange(n) % 2).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_a_real_resnet50_trains_one_step():
    torch.manual_seed(0)
    model = build_model("resnet50")
    assert sum(p.numel() for p in model.parameters()) > 23_000_000  # the real ResNet-50
    before = get_arrays(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, _loader(n=4, size=32, batch=4), opt, torch.device("cpu"))
    after = get_arrays(model)
    assert stats["examples"] == 4 and np.isfinite(stats["loss"])
    assert not np.allclose(before["fc.weight"], after["fc.weight"])
    assert model.fc.out_features == 1


def test_group_norm_variant_has_no_batchnorm_and_no_inplace_relu():
    model = build_model("resnet50", "group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    assert signature(model) != signature(build_model("resnet50", "batch"))  # running stats differ


def test_weights_round_trip_and_local_files(tmp_path):
    a, b = build_model("resnet10"), build_model("resnet10")
    set_arrays(b, get_arrays(a))
    for k, v in get_arrays(a).items():
        np.testing.assert_array_equal(v, get_arrays(b)[k])
    # our checkpoint format and a state_dict with Opacus' prefix both load
    torch.save({"model": a.state_dict()}, tmp_path / "ckpt.pt")
    torch.save({f"_module.{k}": v for k, v in a.state_dict().items()}, tmp_path / "dp.pt")
    for name in ("ckpt.pt", "dp.pt"):
        c = build_model("resnet10")
        load_weights(c, tmp_path / name)
        np.testing.assert_array_equal(get_arrays(c)["conv1.weight"], get_arrays(a)["conv1.weight"])
    # an ImageNet-style head of 1000 classes is replaced, the rest loads
    imagenet = {k: v for k, v in a.state_dict().items() if not k.startswith("fc.")}
    imagenet["fc.weight"], imagenet["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(imagenet, tmp_path / "imagenet.pt")
    load_weights(build_model("resnet10"), tmp_path / "imagenet.pt")
    with pytest.raises(ValueError, match="missing or differ in shape"):
        load_weights(build_model("resnet18"), tmp_path / "ckpt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot be read"):
        load_weights(build_model("resnet10"), tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no such file"):
        load_weights(build_model("resnet10"), tmp_path / "absent.pt")


def test_evaluate_and_deadline_and_fedprox_term():
    torch.manual_seed(0)
    model = prepare(build_model("resnet10"), torch.device("cpu"), amp=False)
    metrics, logits, labels = evaluate(model, _loader(), torch.device("cpu"))
    assert len(logits) == 8 and set(labels.tolist()) == {0.0, 1.0}
    for k in ("loss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        assert k in metrics
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(DeadlineExceeded):
        train_one_epoch(model, _loader(), opt, torch.device("cpu"), deadline=0.0)
    term = proximal_term(model, mu=2.0)
    assert float(term(model)) == 0.0  # at the anchor
    with torch.no_grad():
        model.fc.bias += 1.0
    assert float(term(model)) == pytest.approx(1.0)  # mu/2 * ||delta||^2 = 2/2 * 1


def test_the_model_builds_every_architecture_the_config_offers():
    from common.config import ARCHS
    from common.training.model import LAYERS

    assert tuple(LAYERS) == ARCHS


def test_building_a_model_does_not_import_dynamo_and_dynamo_still_imports_whole():
    """The model factory imports torchvision without ``torch._dynamo`` (2 s per process that never
    trains); the stand-in it uses is gone afterwards: the real dynamo imports, roi_align runs."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = """
import sys
from common.training.model import build_model
m = build_model("resnet10", "batch")
assert "torch._dynamo" not in sys.modules and "torch._dynamo.utils" not in sys.modules, "dynamo was imported"
import torch
from torchvision.ops import roi_align
torch.use_deterministic_algorithms(True)  # roi_align's path that asks is_compile_supported
out = roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]), 2)
assert out.shape == (1, 1, 2, 2) and torch.allclose(out, torch.ones_like(out))
import torch._dynamo.utils as u
assert hasattr(u, "counters") and "torch._dynamo" in sys.modules  # the real module, not the stand-in
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_optimizer_runs_torchs_fused_kernel_and_steps_as_the_default_kernel_does(optimizer):
    from common.config import RunConfig
    from common.training.model import make_optimizer

    cfg = RunConfig(optimizer=optimizer, lr=1e-2, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(0)
    a, b = build_model("resnet10", "group"), build_model("resnet10", "group")
    b.load_state_dict(a.state_dict())
    start = {k: v.clone() for k, v in a.named_parameters()}
    fused = make_optimizer(a, cfg)
    assert fused.defaults["fused"] is True
    # the reference: torch's default (for-each) kernel with the same settings
    kind = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    plain = kind(b.parameters(), lr=1e-2, weight_decay=1e-4, foreach=True, **extra)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 1.0, 1.0, 0.0])
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y).backward()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(pa, start[name]), name  # every weight took the three steps
