"""ResNet-18 and Wide-ResNet-50-2 in plain torch, with torchvision's parameter names.

Written so that a user's torchvision (or timm, which uses the same names for these two models)
``state_dict`` loads strictly into it without torchvision being installed: ``conv1``, ``bn1``,
``layer1.0.conv1`` ..., ``layer2.0.downsample.0`` / ``.1``, ``fc``. Bottlenecks stride in the 3x3
convolution (torchvision's "ResNet v1.5"). Pure modules: ``forward`` returns the logits, ``stages``
the outputs of ``layer1`` .. ``layer4`` as far as they exist.
"""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        del base_width  # only bottlenecks are widened
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with a residual connection; ``base_width`` 128 gives the wide variant."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
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
    """torchvision-compatible ResNet.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        base_width: bottleneck width per group (64; 128 for Wide-ResNet-50-2).
        num_stages: build only ``layer1`` .. ``layer<num_stages>``; the classifier ``fc`` exists only
            with all four stages (a feature extractor for ``layer1..3`` needs ``num_stages=3``).
        num_classes: classifier outputs.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], base_width: int = 64,
                 num_stages: int = 4, num_classes: int = 1000):
        super().__init__()
        self.base_width = base_width
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.num_stages = num_stages
        for i in range(num_stages):
            planes = 64 * 2**i
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, layers[i], stride=1 if i == 0 else 2))
        self.channels = tuple(64 * 2**i * block.expansion for i in range(num_stages))
        if num_stages == 4:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of layer1 .. layer<num_stages> (strides 4, 8, 16, 32) for a normalised batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        if self.num_stages != 4:
            raise RuntimeError("this ResNet is a truncated feature extractor without a classifier")
        x = self.stages(x)[-1]
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_stages: int = 4) -> ResNet:
    """ResNet-18 (11.7 M parameters with the classifier)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_stages=num_stages)


def wide_resnet50_2(num_stages: int = 4) -> ResNet:
    """Wide-ResNet-50-2 (68.9 M parameters with the classifier)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), base_width=128, num_stages=num_stages)


RESNETS = {"resnet18": resnet18, "wide_resnet50_2": wide_resnet50_2}
