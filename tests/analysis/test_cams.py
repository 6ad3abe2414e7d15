"""Class activation maps: they peak where the evidence is, sit on the right pixels, and a
finished run gets its grid and pointing-game scores. No Ray; tiny models and tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import cams as explain
from common.data.luna16 import CTScan, Geometry, Nodule
from common.data.patches import PatchSpec, extract_hu
from common.training.model import build_model
from tests.helpers import TINY


class BlobNet(nn.Module):
    """A bright-blob detector with ResNet's head: two stride-2 convolutions with positive,
    uniform weights (local brightness; the bias of the first cuts off the dark background),
    global average pooling, and a positive one-logit ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        conv1, conv2 = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1, bias=False)
        self.body = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 1)
        assert conv1.bias is not None
        with torch.no_grad():
            conv1.weight.fill_(1 / 27)
            nn.init.constant_(conv1.bias, 0.5)  # background (-1) -> -0.5 -> 0 after ReLU
            conv2.weight.fill_(1 / 36)
            self.fc.weight.fill_(1.0)
            self.fc.bias.fill_(-0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.body(x)), 1))


def blob_image(size: int, row: int, col: int, radius: float = 3.0) -> torch.Tensor:
    r, c = np.mgrid[:size, :size]
    img = np.where((r - row) ** 2 + (c - col) ** 2 <= radius**2, 1.0, -1.0).astype(np.float32)
    return torch.from_numpy(np.repeat(img[None, None], 3, axis=1))


@pytest.mark.parametrize("method", ["gradcam", "cam"])
def test_heatmap_of_a_blob_detector_peaks_on_the_blob(method):
    model = BlobNet()
    for row, col in ((20, 44), (45, 13)):
        x = blob_image(64, row, col)
        assert model(x).item() > 0  # the detector fires
        maps = explain.heatmaps(model, x, method=method, layer="body", stride=4)
        (peak,), (has,) = explain.peaks(maps)
        assert has
        assert np.hypot(peak[0] - row, peak[1] - col) <= 1.5, (method, (row, col), peak)


def test_heatmap_peaks_follow_the_blob_not_the_centre():
    model = BlobNet()
    x = torch.cat([blob_image(64, 8, 8), blob_image(64, 56, 40)])
    (a, b), _ = explain.peaks(explain.heatmaps(model, x, layer="body", stride=4))
    assert np.hypot(*(a - (8, 8))) <= 2 and np.hypot(*(b - (56, 40))) <= 2


def test_resnet_cells_sit_at_stride_times_index():
    """The receptive field of cell j of a torchvision ResNet stage is centred on input pixel
    stride * j (what ``upsample="aligned"`` assumes), not (j + 0.5) * stride - 0.5 (a resize)."""
    model = build_model("resnet50").eval()
    # Max pooling sends the gradient to one element per window; an average pool over the same
    # window (kernel 3, stride 2, padding 1) shows the whole window.
    model.maxpool = nn.AvgPool2d(3, 2, 1)
    with torch.no_grad():  # all-positive weights: every ReLU passes, the gradient's support is the whole field
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.01)
    size = 448
    x = torch.ones(1, 3, size, size, requires_grad=True)
    acts = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: acts.__setitem__(n, out))
             for n in ("layer2", "layer3", "layer4")]
    model(x)
    for h in hooks:
        h.remove()
    for name, j in (("layer2", 28), ("layer3", 14), ("layer4", 7)):
        (grad,) = torch.autograd.grad(acts[name][0, :, j, j].sum(), x, retain_graph=True)
        rows = np.flatnonzero(grad[0].abs().sum(dim=(0, 2)).numpy() > 0)
        assert 0 < rows[0] and rows[-1] < size - 1, f"{name}: field clipped by the border, test too small"
        assert (rows[0] + rows[-1]) / 2 == explain.RESNET_STRIDES[name] * j, name


def test_interpolation_matrices():
    maps = torch.rand(2, 4, 4)
    bilinear = explain.upsample(maps, 64, 16, "bilinear")
    torch.testing.assert_close(torch.from_numpy(bilinear), F.interpolate(maps[:, None], size=(64, 64),
                                                                         mode="bilinear", align_corners=False)[:, 0])
    m = explain.interpolation_matrix(64, 4, 16, "aligned")
    for j in range(4):
        assert m[16 * j, j] == 1.0  # cell j is exactly at pixel 16 j
    assert np.allclose(m.sum(axis=1), 1.0) and np.all(m[48:, 3] == 1.0)  # held beyond the last cell
    with pytest.raises(ValueError, match="--upsample"):
        explain.interpolation_matrix(64, 4, 16, "cubic")


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_gradcam_at_layer4_is_cam_over_cells_and_leaves_the_model_alone(norm):
    torch.manual_seed(0)
    model = build_model("resnet50", norm).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    grad = explain.low_res_maps(model, x, method="gradcam", layer="layer4")
    cam = explain.low_res_maps(model, x, method="cam", layer="layer4")
    assert grad.shape == cam.shape == (2, 2, 2)
    torch.testing.assert_close(grad, cam.clamp(min=0) / 4, rtol=1e-4, atol=1e-6)
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # eval inside: BatchNorm statistics untouched
        torch.testing.assert_close(v, before[k], msg=k)
    assert explain.heatmaps(model, x).shape == (2, 64, 64)  # auto: layer1 at 64 px
    with pytest.raises(ValueError, match="--layer"):
        explain.heatmaps(model, x, layer="layer9")
    with pytest.raises(ValueError, match="layer4"):
        explain.low_res_maps(model, x, method="cam", layer="layer3")


def test_resolve_layer():
    assert explain.resolve_layer("auto", 64) == "layer1"  # 16 x 16
    assert explain.resolve_layer("auto", 128) == "layer2"  # 16 x 16
    assert explain.resolve_layer("auto", 224) == "layer2"  # 28 x 28 (layer3: 14)
    assert explain.resolve_layer("auto", 32) == "layer1"  # the finest there is
    assert explain.resolve_layer("layer3", 64) == "layer3"
    assert explain.resolve_layer("layer2", 64, "cam") == "layer4"


def test_outline_positions_match_the_extracted_patch():
    """A bright ball in a CT volume (anisotropic voxels, flipped x axis) appears in every plane of
    an off-centre patch where :func:`explain.project` says its centre projects."""
    spacing = np.array([0.7, 0.8, 1.25])
    geometry = Geometry(np.array([100.0, -50.0, -200.0]), spacing, np.diag([-1.0, 1.0, 1.0]))
    shape = (64, 96, 96)  # z, y, x
    zi, yi, xi = np.mgrid[:shape[0], :shape[1], :shape[2]]
    world = geometry.index_to_world(np.stack([xi, yi, zi], axis=-1))
    ball = np.array([70.0, -12.0, -160.0])
    vol = np.where(np.linalg.norm(world - ball, axis=-1) <= 4.0, 100, -900).astype(np.int16)
    scan = CTScan("s", vol, geometry, None)  # type: ignore[arg-type]
    spec = PatchSpec(64, 48.0)
    centre = ball + np.array([3.0, -5.0, 2.0])
    hu = extract_hu(scan, centre[None], spec)[0]
    rc, normal = explain.project(spec, centre, ball)
    np.testing.assert_allclose(normal, [-2.0, 5.0, -3.0])  # axial: z, coronal: y, sagittal: x
    for k in (0, 2):  # planes 2 mm and 3 mm from the ball's centre (radius 4): it shows
        w = np.clip(hu[k] + 900, 0, None)
        r, c = np.mgrid[:64, :64]
        found = ((w * r).sum() / w.sum(), (w * c).sum() / w.sum())
        assert np.hypot(found[0] - rc[k, 0], found[1] - rc[k, 1]) < 0.5, (k, found, rc[k])
    assert hu[1].max() < -800  # the coronal plane is 5 mm off: it misses the ball
    out = explain.outlines(spec, centre, [Nodule("s", tuple(ball), 8.0)])
    assert [len(o) for o in out] == [1, 0, 1]


def test_pointing_game_scores_by_hand():
    spec = PatchSpec(64, 48.0)  # 0.75 mm per pixel; centre between pixels 31 and 32
    c = np.zeros(3)
    nod = Nodule("s", (3.0, 0.0, 0.0), 5.0)  # 4 px right of the centre in axial and coronal, R = 2.5 mm
    maps = np.zeros((3, 64, 64), np.float32)
    maps[0, 31, 35] = 1.0  # axial/coronal: 0.5 px from the projection; sagittal: 3.5 px = 2.6 mm > R
    maps[1, 0, 0] = 1.0  # the corner: misses everywhere
    s = explain.score_maps(spec, maps, np.zeros((3, 3)), [nod] * 3)  # maps[2] is flat: no peak, a miss
    np.testing.assert_array_equal(s["hits"], [[True, True, False], [False, False, False], [False, False, False]])
    assert s["axial"] == pytest.approx(1 / 3) and s["all_planes"] == 0.0 and s["no_peak"] == 1
    assert s["centre_baseline"]["axial"] == 0.0  # the centre is 4 px = 3 mm from the projection
    assert explain.plane_hits(spec, c, (31, 33), nod).tolist() == [True, True, True]
    lo, hi = explain.wilson(13, 13)
    assert lo == pytest.approx(0.772, abs=1e-3) and hi == 1.0


def test_shifted_centres_put_the_nodule_on_one_pixel_in_every_plane():
    spec = PatchSpec(64, 48.0)
    nods = [Nodule("s", (10.0, 20.0, 30.0), 8.0), Nodule("s", (-5.0, 0.0, 7.0), 12.0)]
    for n, c in zip(nods, explain.shifted_centres(nods, 0.8, seed=1), strict=True):
        rc, normal = explain.project(spec, c, n.xyz)
        assert np.allclose(rc, rc[0]) and np.allclose(np.abs(normal), 0.8 * n.diameter_mm / 2)
        off_mm = np.hypot(*(rc[0] - 31.5)) * 0.75
        assert off_mm == pytest.approx(np.sqrt(2) * 0.8 * n.diameter_mm / 2)


def test_select_cases():
    prob = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.3, 0.05])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    cases = explain.select_cases(prob, labels, 0.5, top_k=3, group=np.array([0, 0, 1, 2, 3, 4, 5, 6]))
    assert [c.index for c in cases["tp"]] == [0]  # 1 is the same nodule as 0
    assert [(c.index, c.category) for c in cases["fp"]] == [(2, "fp"), (5, "fp"), (6, "tn")]
    assert [c.index for c in cases["fn"]] == [4, 3]


# ----------------------------------------------------------------------------------------
# A finished run, built with the real pieces (data, cache, site plan, config, model file)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    from common.config import RunConfig
    from common.data.prepare import prepare
    from experiment.results import RunDir

    tmp = tmp_path_factory.mktemp("explain")
    cfg = RunConfig(data=str(tiny_root), cache_dir=str(tmp / "cache"), out=str(tmp / "runs"), run_name="tiny",
                    **TINY)
    prepared = prepare(cfg, progress=False)
    run = RunDir.create(cfg)
    prepared.plan.save(run.path / "sites.json")
    run.write_config(cfg, data_root=str(prepared.root), cache=str(prepared.cache.path))
    torch.manual_seed(0)
    run.save_model("model_final.pt", build_model(cfg.arch, cfg.norm).state_dict(), cfg, round=1)
    return run.path


def test_explain_run_writes_the_grid_and_scores(tiny_run):
    rep = explain.explain_run(tiny_run, top_k=2, threshold=0.0, progress=False, slices=2, stride_mm=6.0)
    assert rep.png == tiny_run / "cam_grid.png" and rep.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tiny_run / "cam_slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(rep.json.read_text())
    assert doc["settings"]["layer"] == "layer1"  # auto at 32 px: the deepest stage with 8 cells
    cats = [c["category"] for c in doc["cases"]]
    assert cats.count("tp") == 2 and cats.count("fp") == 2 and "fn" not in cats  # threshold 0: all called
    assert all(c["nodule"] is not None for c in doc["cases"] if c["category"] == "tp")
    pg = doc["scores"]["pointing_game"]
    n_pos = doc["test_positives"] - pg["unmatched_positives"]
    assert pg["positives"]["n"] == pg["true_positives"]["n"] == pg["shifted"]["n"] == n_pos > 0
    for part in ("true_positives", "positives", "shifted"):
        assert 0.0 <= pg[part]["axial"] <= 1.0 and 0.0 <= pg[part]["random_init"]["axial"] <= 1.0
        assert pg[part]["all_planes"] <= pg[part]["axial"]
    assert pg["positives"]["centre_baseline"]["axial"] > 0.8  # candidates sit on their nodules
    assert pg["shifted"]["centre_baseline"]["axial"] == 0.0  # ... and 1.13 R away after the shift
    assert doc["scores"]["pointing_game_cam"]["layer"] == "layer4"
    # the probes: every matched positive at a random position, and paired with another where both fit
    pr = pg["probes"]
    assert pr["random"]["n"] == n_pos and pr["random_true_positives"]["n"] == n_pos  # threshold 0
    assert pr["two_nodules"]["n"] + pr["pairs_skipped"] == n_pos
    assert pr["random"]["best_control"] == max(pr["random"]["controls"][k]["hit"]
                                               for k in ("centre", "random_init", "brightest"))
    head = pg["headline"]
    assert set(head) == {"shifted_true_positives", "shifted", "random_true_positives", "random", "two_nodules_any",
                         "two_nodules_each"}
    assert head["random"]["rate"] == pr["random"]["hit"]["rate"] and head["shifted"]["rate"] == pg["shifted"]["axial"]
    for h in head.values():
        assert h["margin"] == pytest.approx(h["rate"] - h["best_control"])
    sl = doc["scores"]["slices"]  # each slice runs through a nodule's centre: at least one nodule per slice
    assert sl["slices"] == len(sl["per_slice"]) == 2 and sl["nodules"] >= 2 and sl["patches"] > 0
    assert sl["found"] == sum(s["found"] for s in sl["per_slice"]) and sl["rate"] == sl["found"] / sl["nodules"]
    each = [d for s in sl["per_slice"] for d in s["each_nodule"]]  # why each was found or missed
    assert len(each) == sl["nodules"] and sum(d["found"] for d in each) == sl["found"]
    # the classifier's own call on a patch centred on each nodule, and the totals that split misses by it
    called = [d["p_at_centre"] >= sl["threshold"] for d in each]
    assert all(0.0 <= d["p_at_centre"] <= 1.0 for d in each) and sl["called_at_centre"] == sum(called)
    assert sl["found_of_called"] + sl["found_not_called"] == sl["found"]
    assert sl["found_of_called"] == sum(c and d["found"] for c, d in zip(called, each, strict=True))
    # one grid step off: a truly re-centred patch against the centred one moved by the training's shift
    assert sl["called_offset"] == sum(d["p_offset"] >= sl["threshold"] for d in each)
    assert sl["called_rolled"] == sum(d["p_rolled"] >= sl["threshold"] for d in each)
    for d in each:  # found exactly when a maximum lies within the in-plane radius (or half a grid diagonal)
        reach = max(d["radius_on_slice_mm"], sl["stride_mm"] / 2**0.5)
        assert d["dz_mm"] < d["diameter_mm"] / 2
        near = d["nearest_maximum_mm"]
        assert near <= reach + 0.01 if d["found"] else near is None or near > reach - 0.01
    assert doc["figures"] == {"grid": "cam_grid.png", "slices": "cam_slices.png"}
    pngs, scores = explain.cam_figures(tiny_run)
    assert pngs == [rep.png, tiny_run / "cam_slices.png"] and scores["pointing_game"] == pg
    assert scores["settings"]["method"] == "gradcam"


def test_explain_cli_and_its_errors(tiny_run, tmp_path, capsys):
    from sim.explain import main

    assert main([str(tiny_run), "--method", "cam", "--top-k", "1", "--shift", "0", "--slices", "0"]) == 0
    out = capsys.readouterr().out
    assert "pointing game, cam at layer4" in out and "cam_grid.png" in out and "never for diagnosis" in out
    pg = json.loads((tiny_run / "cam.json").read_text())["scores"]["pointing_game"]
    assert "shifted" not in pg and "random" in pg["headline"]
    assert main([str(tiny_run), "--top-k", "1", "--no-probes", "--slices", "1", "--stride-mm", "8"]) == 0
    out = capsys.readouterr().out
    assert "shifted 0.8 R, called positive" in out and "random position" not in out and "slice view: 1 axial" in out
    assert "probes" not in json.loads((tiny_run / "cam.json").read_text())["scores"]["pointing_game"]
    (tmp_path / "config.json").write_text((tiny_run / "config.json").read_text())
    (tmp_path / "sites.json").write_text((tiny_run / "sites.json").read_text())
    assert main([str(tmp_path)]) == 2
    assert "no model_final.pt" in capsys.readouterr().err
    assert explain.cam_figures(tmp_path) is None
    assert main([str(tiny_run), "--shift", "1.5"]) == 2
    assert "--shift" in capsys.readouterr().err
    assert main([str(tiny_run), "--stride-mm", "0"]) == 2
    assert "--stride-mm" in capsys.readouterr().err
