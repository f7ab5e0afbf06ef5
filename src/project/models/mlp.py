from math import prod

from torch import nn


class MLP(nn.Sequential):
    """Fully connected net: ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]`` per hidden width, then a linear head.

    The seeds' comparisons are options of this one class: plain (``dropout=0, batch_norm=False``),
    Dropout (``dropout=0.5``), BatchNorm (``batch_norm=True``), small vs big (``hidden``).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_outputs: int,
        hidden: list[int] = [256, 128],  # noqa: B006 (jsonargparse needs a literal default to show in --help)
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = prod(in_shape)
        for out in hidden:
            # the bias is redundant when BatchNorm re-centres the activations
            layers.append(nn.Linear(width, out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = out
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)
