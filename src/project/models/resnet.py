import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut, as in ResNet-18/34."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, stride), nn.ReLU(inplace=True), *_conv_bn(c_out, c_out))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for small images (28x28, 32x32): a 3x3 stem, no max-pool, one stage per width, each stage
    after the first halving the resolution; global average pooling and a linear head.

    ``widths=[64, 128, 256, 512], blocks=[2, 2, 2, 2]`` is the CIFAR ResNet-18; the defaults are a
    narrower, shallower net that trains on a CPU in minutes.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_outputs: int,
        widths: list[int] = [32, 64, 128],  # noqa: B006
        blocks: list[int] = [1, 1, 1],  # noqa: B006
    ):
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"ResNet: widths {widths} and blocks {blocks} must have the same length")
        layers: list[nn.Module] = [*_conv_bn(in_shape[0], widths[0]), nn.ReLU(inplace=True)]
        channels = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(channels, width, stride=2 if i > 0 and j == 0 else 1))
                channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
