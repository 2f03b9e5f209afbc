"""The four paper models: shapes, the paper's sizes, and that convert() reaches every map."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import raftorch
from raftorch.models import MODELS, build_model, check_model, model_options

TINY = {
    "mlp": dict(hidden=(16, 16), batchnorm=True),
    "vgg": dict(width_mult=1 / 16),
    "vit": dict(dim=16, depth=2, heads=2),
    "retina": dict(channels=4, bottleneck=2, kernel=3, fc=16),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_every_model_maps_images_to_logits(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **TINY[name])
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_mlp_of_the_paper_has_four_hidden_layers_of_512():
    model = build_model("mlp", (3, 32, 32), 10)
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [(3072, 512), (512, 512), (512, 512), (512, 512), (512, 10)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    bn = build_model("mlp", (3, 32, 32), 10, hidden=(512,) * 3, batchnorm=True)
    assert [type(m).__name__ for m in bn][:4] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"]


def test_vgg_follows_table_c1():
    model = build_model("vgg", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    block = model.features.block1
    assert [type(m).__name__ for m in block] == ["Conv2d", "ReLU", "BatchNorm2d"] * 2 + ["MaxPool2d"]
    assert not hasattr(model.features.block4, "pool")
    fcs = [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)]
    assert fcs == [(512, 256), (256, 10)]
    assert build_model("vgg", (3, 32, 32), 10, width_mult=0.25).widths == (16, 32, 64, 128)


def test_vit_defaults_are_the_papers_and_every_map_is_a_linear():
    model = build_model("vit", (3, 32, 32), 10)
    assert len(model.blocks) == 7 and model.blocks[0].attn.heads == 4
    assert model.patch_embed.in_features == 3 * 4 * 4 and model.patch_embed.out_features == 384
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 384)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for part in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.6.{part}" in linear
    assert {"patch_embed", "head"} <= linear
    assert not any(isinstance(m, (nn.Conv2d, nn.MultiheadAttention)) for m in model.modules())


def test_vit_attention_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    attn = build_model("vit", (1, 8, 8), 3, dim=8, depth=1, heads=2).blocks[0].attn
    x = torch.randn(2, 5, 8)
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., s])
    assert torch.allclose(attn(x), attn.proj(torch.cat(heads, -1)), atol=1e-6)


def test_retina_follows_table_c2_with_a_bottleneck_parameter():
    model = build_model("retina", (1, 32, 32), 10, bottleneck=4)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n, _ in convs] == ["retina.conv1", "retina.conv2", "vvs.conv1", "vvs.conv2", "vvs.conv3"]
    assert [(m.in_channels, m.out_channels) for _, m in convs] == [(1, 32), (32, 4), (4, 32), (32, 32), (32, 32)]
    assert all(m.kernel_size == (9, 9) and m.padding == (4, 4) for _, m in convs)
    assert model.classifier.fc1.in_features == 32 * 32 * 32 and model.classifier.fc1.out_features == 1024


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_reaches_every_weight_layer_and_keeps_the_forward(name):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 5, **TINY[name]).eval()
    converted = raftorch.convert(model, "raf", 2)
    left = [n for n, m in converted.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert left == []
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), converted(x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_models_train_every_parameter(name):
    torch.manual_seed(0)
    model = raftorch.convert(build_model(name, (1, 8, 8), 5, **TINY[name]), "raf", 2)
    loss = nn.functional.cross_entropy(model(torch.randn(6, 1, 8, 8)), torch.arange(6) % 5)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_bad_model_names_and_options_are_value_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mlp, retina, vgg, vit"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="no option.*'widht'.*width_mult"):
        build_model("vgg", (1, 8, 8), 10, widht=2)
    with pytest.raises(ValueError, match=r"patch=3 does not divide the 8x8 images; choose a patch that does \(1, 2, 4, 8\)"):
        build_model("vit", (1, 8, 8), 10, patch=3)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("vgg", (64,), 10)
    assert model_options("retina")["bottleneck"] == 32


@pytest.mark.parametrize("name, options, message", [
    ("mlp", {"hidden": [0]}, "mlp: model option hidden must be a list of positive whole numbers, got [0]"),
    ("mlp", {"hidden": [-3]}, "got [-3]"),
    ("mlp", {"hidden": "abc"}, "model option hidden must be a list of positive whole numbers, got 'abc'"),
    ("mlp", {"dropout": 1.0}, "model option dropout must be a probability in [0, 1), got 1.0"),
    ("mlp", {"batchnorm": "yes"}, "model option batchnorm must be true or false"),
    ("vgg", {"width_mult": 0}, "vgg: model option width_mult must be a finite number > 0, got 0"),
    ("vgg", {"width_mult": -0.5}, "got -0.5"),
    ("vgg", {"width_mult": "abc"}, "got 'abc'"),
    ("vgg", {"width_mult": float("inf")}, "got inf"),
    ("vgg", {"widths": []}, "model option widths must be a list of positive whole numbers (at least one)"),
    ("vit", {"patch": 0}, "vit: model option patch must be a positive whole number, got 0"),
    ("vit", {"dim": 10, "heads": 4}, "model option dim=10 must be divisible by heads=4"),
    ("vit", {"mlp_ratio": 0}, "model option mlp_ratio must be a finite number > 0"),
    ("retina", {"kernel": 0}, "retina: model option kernel must be a positive whole number, got 0"),
    ("retina", {"channels": 2.5}, "model option channels must be a positive whole number, got 2.5"),
])
def test_a_bad_model_option_is_named_with_its_value_before_anything_is_built(name, options, message):
    for call in (build_model, check_model):
        with pytest.raises(ValueError) as info:
            call(name, (1, 8, 8), 10, **options)
        assert message in str(info.value) and "--model-option" in str(info.value)


def test_images_too_small_for_the_vgg_say_the_smallest_size_that_works():
    with pytest.raises(ValueError, match=r"4x4 images are too small .* the smallest size that works is 8x8"):
        check_model("vgg", (1, 4, 4), 10)
    with pytest.raises(ValueError, match=r"smallest size that works is 16x16"):
        build_model("vgg", (1, 8, 8), 10, widths=[4, 4, 4, 4, 4])
    check_model("vgg", (1, 8, 8), 10)  # the three pools of the paper's net fit 8 x 8
    check_model("vgg", (1, 1, 1), 10, widths=[4])  # no pool: any size


def test_explicit_empty_and_zero_sized_choices_that_can_be_honoured_are_kept():
    assert [n for n, _ in build_model("mlp", (1, 8, 8), 10, hidden=[]).named_children()] == ["flatten", "out"]
    assert build_model("mlp", (1, 8, 8), 10, hidden=5).fc1.out_features == 5  # one number: one layer
    assert len(build_model("vit", (1, 8, 8), 10, dim=8, heads=2, depth=0).blocks) == 0
    assert build_model("vgg", (1, 8, 8), 10, width_mult=0.01).widths == (1, 1, 3, 5)  # rounded, never below 1


def test_vgg_bn_before_relu_swaps_only_the_order_in_every_block():
    from raftorch.models import build_model
    torch.manual_seed(0)
    table = build_model("vgg", (1, 16, 16), 10, width_mult=0.25)
    torch.manual_seed(0)
    first = build_model("vgg", (1, 16, 16), 10, width_mult=0.25, bn_before_relu=True)
    block = [n for n, _ in first.features.block1.named_children()]
    assert block == ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool"]
    assert [n for n, _ in table.features.block1.named_children()] == ["conv1", "relu1", "bn1", "conv2", "relu2", "bn2", "pool"]
    a, b = table.state_dict(), first.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same parameters, same draw
