import torch
from torch import nn


class ConvNet(nn.Module):
    """The seeds' CNN: ``(Conv3x3 -> BatchNorm -> ReLU -> AvgPool2)`` per width, then one linear head.

    Kaiming init for the ReLU convolutions; unlike seed 000 there is no Softmax at the end (the loss
    takes logits) and the head keeps PyTorch's default init instead of std 1.0.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_outputs: int,
        widths: list[int] = [16, 32, 64],  # noqa: B006
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_shape[0]
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(flat, num_outputs))
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
