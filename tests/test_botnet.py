"""BoTNet: the 2-D window pattern, BottleneckAttention2d against explicit relative logits, the backbones
(paper's parameter counts, any input size, c2-c5 maps), their cost counts, training and the timm hook."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import longattn as la
from conftest import assert_close_to_reference, qkv
from longattn.models import BotNet, BotNetConfig, create_model
from longattn.modules import BottleneckAttention2d
from longattn.modules.bottleneck_attention import relative_table
from longattn.patterns import Geometry, get_plan

# ---- the 2-D window pattern ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("radius,height,width", [(1, 3, 4), (2, 7, 7), (1, 9, 11), (0, 5, 3), (3, 1, 97)])
def test_window_2d_definition(radius, height, width, tile):
    n = height * width
    truth = torch.zeros(n, n, dtype=torch.bool)  # row-major tokens
    for i, j in itertools.product(range(n), range(n)):
        truth[i, j] = abs(i // width - j // width) <= radius and abs(i % width - j % width) <= radius
    pattern = la.window_2d(radius, height, width, tile=tile)
    order = pattern.order()
    assert sorted(order.tolist()) == list(range(n))
    if tile is not None and height > tile:  # tile-major: the first tile's rows come first, tile-wide
        assert order[:min(tile, width)].tolist() == list(range(min(tile, width)))
        assert order[min(tile, width)].item() == width
    truth = truth[order][:, order]  # in the pattern's token order
    assert torch.equal(pattern.dense(n)[0], truth)
    for block in (16, 7):
        layout = pattern.block_layout(n, block=block)[0]
        nb = -(-n // block)
        padded = F.pad(truth, (0, nb * block - n, 0, nb * block - n))
        assert torch.equal(layout, padded.view(nb, block, nb, block).any(3).any(1))
        plan = get_plan(pattern, Geometry(n, n), block, torch.device("cpu"))
        assert plan.allowed_pairs // plan.kv_index.shape[1] == int(truth.sum())


def test_window_2d_rejects_other_lengths_and_parses():
    with pytest.raises(ValueError, match=r"a 3x4 map needs q_len = kv_len = 12 tokens"):
        la.window_2d(1, 3, 4).dense(13)
    assert la.parse_pattern("window_2d(2, 5, 6)").name == "window_2d_2_5x6"
    assert la.parse_pattern("window_2d(2, 50, 60, tile=8)").name == "window_2d_2_50x60_tile8"


def test_window_2d_tiles_cut_the_blocks_a_query_block_needs():
    # 64 x 64 map, 64-token blocks: a row-major block is one row and needs 2 radius + 1 rows of key blocks;
    # an 8 x 8 tile needs its 3 x 3 neighbouring tiles (radius <= 8)
    for radius, rows in ((3, 7), (7, 15)):
        row_major = la.window_2d(radius, 64, 64).block_layout(4096, block=64)[0]
        tiled = la.window_2d(radius, 64, 64, tile=8).block_layout(4096, block=64)[0]
        assert row_major.sum(1).max() == rows and tiled.sum(1).max() == 9
        assert la.window_2d(radius, 64, 64).density(4096) == la.window_2d(radius, 64, 64, tile=8).density(4096)


@pytest.mark.parametrize("grid,pad,tile", [((9, 11), False, None), ((25, 41), True, None), ((25, 41), True, 8)])
def test_window_2d_blocked_matches_oracle(grid, pad, tile):  # N = 99 and 1025, head dim 40
    n = grid[0] * grid[1]
    pattern = la.window_2d(2, *grid, tile=tile)
    q, k, v = qkv(2, 2, n, n, 40, torch.float32, "cpu")
    kpm = None
    keep = pattern.dense(n)
    if pad:
        kpm = torch.ones(2, n, dtype=torch.bool)
        kpm[-1, n // 2:] = False
        keep = keep & kpm[:, None, None, :]
    assert_close_to_reference("blocked", q, k, v, keep, pattern=pattern, key_padding_mask=kpm)


# ---- BottleneckAttention2d against explicit relative logits ------------------------------------------------


def naive_mhsa(m: BottleneckAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's MHSA written out in float64: every (query, key) logit with its relative embeddings, a full
    (masked for a local window) softmax, then the values; tables from ``relative_table``."""
    x = x.double()
    b, _, height, width = x.shape
    qkv = F.conv2d(x, m.qkv.weight.double(), None if m.qkv.bias is None else m.qkv.bias.double())
    q, k, v = qkv.reshape(b, 3, m.heads, m.head_dim, height * width).transpose(-1, -2).unbind(1)  # (B, h, N, d)
    th, tw = (t.double() for t in m.tables(height, width))
    rh, rw = (th.shape[0] - 1) // 2, (tw.shape[0] - 1) // 2
    ys, xs = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # key minus query, (N, N)
    rel = th[dy.clamp(-rh, rh) + rh] + tw[dx.clamp(-rw, rw) + rw]  # (N, N, d)
    logits = (torch.einsum("bhid,bhjd->bhij", q, k) + torch.einsum("bhid,ijd->bhij", q, rel)) * m.head_dim ** -0.5
    if m.radius is not None:
        logits = logits.masked_fill((dy.abs() > m.radius) | (dx.abs() > m.radius), float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(-1, -2).reshape(b, -1, height, width)
    return F.avg_pool2d(out, 2, 2, ceil_mode=True) if m.stride == 2 else out


CASES = {  # name: (map, feat_size the tables are built for, kwargs)
    "7x7": ((7, 7), 7, {}),
    "14x10": ((14, 10), (14, 10), {}),
    "14x10_from_7_interpolated": ((14, 10), 7, {}),
    "9x13_from_7_clamped": ((9, 13), 7, {"resize": "clamp"}),
    "5x3_from_7_cropped": ((5, 3), 7, {}),
    "stride2_odd": ((7, 9), 7, {"stride": 2}),
    "local_radius2": ((11, 9), 7, {"radius": 2}),
    "local_stride2_bias": ((6, 7), 7, {"radius": 1, "stride": 2, "qkv_bias": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mhsa_matches_naive_reference(case):
    (height, width), feat, kwargs = CASES[case]
    torch.manual_seed(0)
    m = BottleneckAttention2d(24, 32, heads=4, feat_size=feat, **kwargs)
    with torch.no_grad():
        m.rel_height.normal_()  # larger than the init, so the position term matters
        m.rel_width.normal_()
    x = torch.randn(2, 24, height, width, requires_grad=True)
    out = m(x)
    ref = naive_mhsa(m, x)
    assert out.shape == ref.shape == (2, 32, -(-height // m.stride), -(-width // m.stride))
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(m(x.contiguous(memory_format=torch.channels_last)), out)
    # gradients of the input and of every parameter, against the float64 reference
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, [x, *m.parameters()], grad.float())
    theirs = torch.autograd.grad(ref, [x, *m.parameters()], grad)
    for a, b in zip(ours, theirs):
        assert (a.double() - b).abs().max() < 2e-5 * max(1.0, b.abs().max().item())


def test_relative_table_resolution_change():
    table = torch.randn(2 * 6 + 1, 5)  # offsets -6..6
    assert torch.equal(relative_table(table, 3), table[3:10])  # a smaller map reads the same offsets
    grown = relative_table(table, 12)  # 25 rows spanning the same -6..6 range, linearly
    assert grown.shape == (25, 5)
    assert torch.allclose(grown[::2], table) and torch.allclose(grown[1::2], (table[:-1] + table[1:]) / 2)
    clamped = relative_table(table, 9, resize="clamp")
    assert torch.equal(clamped[3:16], table) and torch.equal(clamped[:3], table[:1].expand(3, 5))


def test_mhsa_errors():
    with pytest.raises(ValueError, match=r"dim_out \(30\) must be divisible by heads \(4\)"):
        BottleneckAttention2d(8, 30)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        BottleneckAttention2d(8, stride=3)
    with pytest.raises(ValueError, match="resize must be one of"):
        BottleneckAttention2d(8, resize="nearest")
    with pytest.raises(ValueError, match=r"x must have shape \(B, C=8, H, W\)"):
        BottleneckAttention2d(8)(torch.randn(1, 8, 16))


# ---- the backbones ------------------------------------------------------------------------------------------


def test_paper_parameter_counts():
    # Srinivas et al. 2021: ResNet-50 25.5M, BoT50 20.8M (1000 classes); torchvision's resnet50 has 25,557,032
    assert sum(p.numel() for p in create_model("resnet50").parameters()) == 25_557_032
    bot = create_model("botnet50")
    assert sum(p.numel() for p in bot.parameters()) == 20_852_008
    heads = [m.heads for m in bot.modules() if isinstance(m, BottleneckAttention2d)]
    assert heads == [4, 4, 4]  # MHSA in exactly the three c5 blocks


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (320, 320), (512, 512), (200, 301), (97, 65)])
def test_any_input_size(size):
    torch.manual_seed(0)
    model = create_model("botnet50", width=8, num_classes=7).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    for fmap, info in zip(feats.as_list(), model.feature_info):
        assert fmap.shape[1] == info["channels"]
        assert fmap.shape[2:] == tuple(-(-s // info["reduction"]) for s in size)


def test_s1_keeps_c5_at_stride_16_and_resnet_has_no_attention():
    s1 = create_model("botnet50-s1", width=8)
    assert [i["reduction"] for i in s1.feature_info] == [4, 8, 16, 16]
    with torch.no_grad():
        assert s1.forward_features(torch.randn(1, 3, 64, 96)).c5.shape == (1, 256, 4, 6)
    resnet = create_model("resnet50", width=8)
    assert not any(isinstance(m, BottleneckAttention2d) for m in resnet.modules())
    assert "layer4.0.conv2.weight" in resnet.state_dict()  # torchvision's names


def test_full_size_botnet50_forward_and_channels_last():
    torch.manual_seed(0)
    model = create_model("botnet50").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == (1, 1000) and (a - b).abs().max() < 1e-4


def test_local_radius_backbone_and_config_errors():
    model = create_model("botnet50", width=8, radius=1, num_classes=0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 96)).shape == (1, 256)  # num_classes=0: pooled features
    with pytest.raises(ValueError, match="layers must be four positive ints"):
        BotNetConfig(layers=(3, 4, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(B, in_chans=1, H, W\)"):
        create_model("resnet50", width=8, in_chans=1)(torch.randn(1, 3, 64, 64))


# ---- costs, training, CLI, timm -----------------------------------------------------------------------------


def test_multiply_adds_at_224():
    from longattn.vision.measure import multiply_adds

    assert multiply_adds(create_model("resnet50"), (224, 224)) == pytest.approx(4.089e9, rel=1e-3)
    # BoT50 at 224: c5's 3x3 convolutions (3 x 115.6M) give way to 1x1 q/k/v projections and attention
    assert multiply_adds(create_model("botnet50"), (224, 224)) == pytest.approx(4.021e9, rel=1e-3)


@pytest.mark.slow
def test_multiply_adds_at_1024_match_the_paper():
    from longattn.vision.measure import multiply_adds

    assert multiply_adds(create_model("resnet50"), (1024, 1024)) == pytest.approx(85.4e9, rel=1e-3)
    ours = multiply_adds(create_model("botnet50"), (1024, 1024))
    # The paper multiplies q with all 2W - 1 relative embeddings per axis before picking W of them; we gather
    # the W first. Adding the difference back gives its 102.98B.
    skipped = 4 * 128 * 2 * (64 * 64 * 63 + 2 * 32 * 32 * 31)
    assert ours + skipped == pytest.approx(102.98e9, rel=2e-4)


def _tiny_run(**overrides):
    from longattn.vision.train import VisionRunConfig

    base = dict(width=4, resolution=32, examples=200, steps=8, batch_size=8, eval_every=3, warmup=2)
    return VisionRunConfig(**{**base, **overrides})


def test_training_resumes_exactly(tmp_path):
    from longattn.vision.data import pathfinder_images
    from longattn.vision.train import train_vision

    cfg = _tiny_run()
    data = pathfinder_images(tmp_path / "data", resolution=32, examples=200, log=lambda *_: None)
    assert data["train"].images.shape == (160, 1, 32, 32) and len(data["test"]) == 20
    whole = train_vision(cfg, data_dir=tmp_path, out_dir=tmp_path / "whole", data=data, progress=False)
    cut = train_vision(cfg, data_dir=tmp_path, out_dir=tmp_path / "cut", data=data, progress=False, stop_after=5)
    assert cut == {"finished": False, "step": 5}
    resumed = train_vision(cfg, data_dir=tmp_path, out_dir=tmp_path / "cut", data=data, progress=False)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["test_acc"] == whole["test_acc"] and whole["images_per_second"] > 0
    loaded = BotNet.from_pretrained(tmp_path / "whole" / "model")
    assert loaded.cfg.in_chans == 1 and loaded.cfg.width == 4


def test_bf16_autocast_step(tmp_path):
    from longattn.vision.data import pathfinder_images
    from longattn.vision.train import train_vision

    data = pathfinder_images(tmp_path, resolution=32, examples=200, log=lambda *_: None)
    cfg = _tiny_run(steps=2, eval_every=2, bf16=True, model="resnet50")
    result = train_vision(cfg, data_dir=tmp_path, out_dir=tmp_path / "bf16", data=data, progress=False)
    assert result["finished"] and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])


def test_vision_cli(tmp_path, capsys):
    from longattn.cli import main

    assert main(["vision", "count", "--sizes", "64", "96x64"]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 | 25.56M | 25.50M |" in out and "| botnet50 | 20.85M | 20.80M |" in out
    assert main(["vision", "latency", "--sizes", "64", "--repeats", "1", "--json", str(tmp_path / "l.json")]) == 0
    assert "| 64x64 |" in capsys.readouterr().out
    assert main(["vision", "latency", "--sizes", "96x64", "--repeats", "1", "--radius", "1"]) == 0
    assert "botnet50 (radius 1) vs resnet50" in capsys.readouterr().out
    assert main(["vision", "count", "--sizes", "0"]) == 2
    assert main(["vision", "attention", "--maps", "5", "--radius", "1", "--min-run-time", "0.01"]) == 0
    assert "| 5x5 | 25 |" in capsys.readouterr().out
    args = ["vision", "train", "--models", "botnet50", "resnet50", "--out", str(tmp_path / "runs"), "--data-dir",
            str(tmp_path / "data"), "--width", "4", "--resolution", "32", "--examples", "200", "--steps", "3",
            "--batch-size", "8", "--eval-every", "3"]
    assert main(args) == 0
    assert "generating 200 Pathfinder images" in capsys.readouterr().out
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "| botnet50 |" in report and "| resnet50 |" in report
    result = tmp_path / "runs" / "botnet50" / "result.json"
    written = result.stat().st_mtime_ns
    assert main(args) == 0  # finished runs are reused: nothing generated or trained again
    assert "generating" not in capsys.readouterr().out and result.stat().st_mtime_ns == written


def test_timm_registration_with_a_stand_in_timm(monkeypatch):
    registry = {}
    fake = types.ModuleType("timm")
    fake.models = types.SimpleNamespace(register_model=lambda fn: registry.setdefault(fn.__name__, fn))
    monkeypatch.setitem(sys.modules, "timm", fake)
    monkeypatch.setitem(sys.modules, "timm.models", fake.models)
    from longattn.integrations import timm as timm_hook

    names = timm_hook.register()
    assert "longattn_botnet50" in names and set(names) <= set(registry)
    model = registry["longattn_botnet50"](pretrained=False, pretrained_cfg=None, num_classes=3, in_chans=1, width=8)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="no pretrained weights"):
        registry["longattn_resnet50"](pretrained=True)


def test_timm_registration_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    from longattn.integrations import timm as timm_hook

    assert timm_hook.register() == []
