"""Backbones with two taps: the stage-4 map (regions, attention keys) and the pooled last stage.

The ResNets are written here, with torchvision's exact attribute names (`conv1 bn1 layer1..layer4`,
`downsample.0/.1`, `fc`), so torchvision's ImageNet checkpoint loads with `strict=True` and no key
remapping, and torchvision itself is not a dependency. `small` is a compact CNN for CPUs and for
training from scratch. Every backbone has the same `forward_features(x) -> (stage4_map, pooled)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from style_model.config import BACKBONES
from style_model.errors import ConfigError


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's parameter names; `fc` is kept so ImageNet checkpoints load strictly."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ConfigError(f"layers={layers}: expected four positive block counts")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.region_channels = 256 * block.expansion
        self.pooled_channels = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv4_x map [B, C4, H/16, W/16], pooled last stage [B, C5])."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stage4 = self.layer3(self.layer2(self.layer1(x)))
        pooled = torch.flatten(self.avgpool(self.layer4(stage4)), 1)
        return stage4, pooled

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x)[1])


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A compact VGG-style CNN (about 1.2M parameters): fast enough on a CPU to train end to end
    (its speed: docs/BENCHMARKS.md).

    Same strides as a ResNet (stage-4 map at 1/16, pooled vector from 1/32).
    """

    def __init__(self, widths: tuple[int, int, int, int, int] = (16, 32, 64, 128, 256)):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(*_conv_bn_relu(3, w0, 2), *_conv_bn_relu(w0, w0, 1))
        self.layer1 = nn.Sequential(*_conv_bn_relu(w0, w1, 2), *_conv_bn_relu(w1, w1, 1))
        self.layer2 = nn.Sequential(*_conv_bn_relu(w1, w2, 2), *_conv_bn_relu(w2, w2, 1))
        self.layer3 = nn.Sequential(*_conv_bn_relu(w2, w3, 2), *_conv_bn_relu(w3, w3, 1))
        self.layer4 = nn.Sequential(*_conv_bn_relu(w3, w4, 2), *_conv_bn_relu(w4, w4, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.region_channels = w3
        self.pooled_channels = w4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        stage4 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        pooled = torch.flatten(self.avgpool(self.layer4(stage4)), 1)
        return stage4, pooled


class ColourHistogram(nn.Module):
    """Not a learned backbone: joint RGB histograms (bins^3) per 16x16 cell and over the whole image.

    Same two taps as the CNNs, so the same heads train on it; the evaluation's colour baseline says
    whether a model learned more than colour.
    """

    def __init__(self, bins: int = 4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.bins = bins
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.region_channels = bins**3
        self.pooled_channels = bins**3

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        unit = (x * self.std + self.mean).clamp(0, 1)
        q = (unit * self.bins).long().clamp(max=self.bins - 1)
        index = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]  # [B, H, W]
        b, h, w = index.shape
        gh, gw, nbins = h // 16, w // 16, self.bins**3
        cells = index[:, : gh * 16, : gw * 16].reshape(b, gh, 16, gw, 16).permute(0, 1, 3, 2, 4)
        cells = cells.reshape(b * gh * gw, 256)
        offsets = torch.arange(b * gh * gw, device=x.device).unsqueeze(1) * nbins
        counts = torch.bincount((cells + offsets).flatten(), minlength=b * gh * gw * nbins)
        hist = counts.view(b, gh * gw, nbins).float() / 256.0  # one histogram per 16x16 cell
        stage4 = hist.transpose(1, 2).reshape(b, nbins, gh, gw)
        return stage4, hist.mean(dim=1)


def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int]) -> ResNet:
    return ResNet(block, layers)


def resnet18() -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3])


def small() -> SmallCNN:
    return SmallCNN()


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50,
    "resnet18": resnet18,
    "small": small,
    "colorhist": ColourHistogram,
}


def build_backbone(name: str) -> nn.Module:
    """A backbone by name; raises ConfigError naming the bad value."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise ConfigError(f"backbone={name!r}: expected one of {', '.join(BACKBONES)}") from None
