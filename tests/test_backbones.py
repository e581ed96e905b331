"""Backbones: torchvision checkpoint names load strictly; taps have the documented shapes."""

import pytest
import torch

from style_model.backbones import build_backbone, resnet18, resnet50, small
from style_model.config import ModelConfig
from style_model.errors import ConfigError, WeightsError
from style_model.model import StyleModel
from style_model.weights import load_backbone_weights

# The ResNet architecture table (He et al. 2016, table 1): block type, blocks per stage, expansion.
TABLE = {"resnet18": ("basic", [2, 2, 2, 2], 1), "resnet50": ("bottleneck", [3, 4, 6, 3], 4)}


def _bn(prefix, c):
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_keys(name: str) -> dict[str, tuple[int, ...]]:
    """torchvision's state-dict names and shapes, written out from the table (not from torchvision)."""
    kind, blocks, expansion = TABLE[name]
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if kind == "basic":
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                keys.update(_bn(f"{p}.bn3", planes * 4))
            if b == 0 and (stage > 1 or inplanes != planes * expansion):
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * expansion))
            inplanes = planes * expansion
    keys["fc.weight"] = (1000, 512 * expansion)
    keys["fc.bias"] = (1000,)
    return keys


@pytest.mark.parametrize(("name", "count"), [("resnet18", 122), ("resnet50", 320)])
def test_torchvision_checkpoint_loads_strictly(tmp_path, name, count):
    expected = torchvision_keys(name)
    assert len(expected) == count  # torchvision's resnet18/50 state dicts have 122/320 entries
    state = {k: (torch.tensor(7) if not shape else torch.randn(shape)) for k, shape in expected.items()}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    backbone = build_backbone(name)
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    load_backbone_weights(backbone, path)
    torch.testing.assert_close(backbone.state_dict()["layer3.0.conv2.weight"], state["layer3.0.conv2.weight"])
    # the style model drops the classifier and still takes the same file
    model = StyleModel(ModelConfig(backbone=name, input_size=64, grid=4))
    load_backbone_weights(model.backbone, path)
    torch.testing.assert_close(model.backbone.state_dict()["conv1.weight"], state["conv1.weight"])


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    state = resnet18().state_dict()
    state["layer9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="layer9"):
        load_backbone_weights(resnet18(), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable"):
        load_backbone_weights(resnet18(), tmp_path / "junk.pth")


@pytest.mark.parametrize(
    ("builder", "c4", "c5"), [(resnet50, 1024, 2048), (resnet18, 256, 512), (small, 128, 256)]
)
def test_taps(builder, c4, c5):
    net = builder().eval()
    with torch.inference_mode():
        stage4, pooled = net.forward_features(torch.randn(2, 3, 64, 64))
    assert stage4.shape == (2, c4, 4, 4)  # conv4_x at 1/16 of the input
    assert pooled.shape == (2, c5)
    assert (net.region_channels, net.pooled_channels) == (c4, c5)


def test_model_outputs_are_unit_embeddings():
    config = ModelConfig(backbone="small", input_size=64, grid=2, embed_dim=16)
    model = StyleModel(config).eval()
    with torch.inference_mode():
        f_s, f_i, h_i = model.encode_scene(torch.rand(3, 3, 64, 64))
        f_p, c_p = model.encode_product(torch.rand(3, 3, 64, 64))
    assert f_s.shape == (3, 16) and f_i.shape == (3, 4, 16) and h_i.shape == (3, 4, 16)
    assert f_p.shape == (3, 16) and c_p.shape == (3, 16)
    for t in (f_s, f_i, h_i, f_p, c_p):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def test_colour_histogram_backbone_counts_pixels():
    from style_model.backbones import ColourHistogram

    hist = ColourHistogram(bins=2, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0, :, :16] = 1.0  # left half red, right half black
    stage4, pooled = hist.forward_features(x)
    assert stage4.shape == (1, 8, 2, 2)
    assert pooled[0, 0] == pytest.approx(0.5) and pooled[0, 4] == pytest.approx(0.5)  # black, red bins


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "vgg"}, "backbone='vgg'"),
        ({"attention": "positive"}, "attention='positive'"),
        ({"input_size": 100}, "input_size=100"),
        ({"input_size": 32, "grid": 4}, "grid=4"),
        ({"dropout": 1.5}, "dropout=1.5"),
    ],
)
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


def test_config_round_trips():
    config = ModelConfig(backbone="resnet18", input_size=128, grid=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_the_backbone_names_are_written_once():
    """style_model.config.BACKBONES is the CLI's choices and ModelConfig's check: every name builds, and
    every builder is named there; the fixed ones are among them."""
    from style_model.backbones import _BUILDERS
    from style_model.config import ATTENTIONS, BACKBONES, FIXED_BACKBONES

    assert tuple(_BUILDERS) == BACKBONES and set(FIXED_BACKBONES) <= set(BACKBONES)
    from ctl_app.cli import build_parser

    parser = build_parser()
    for name in BACKBONES:
        assert parser.parse_args(["train", "--data", "d", "--out", "o", "--backbone", name]).backbone == name
    for name in ATTENTIONS:
        args = parser.parse_args(["train", "--data", "d", "--out", "o", "--attention", name])
        assert args.attention == name
