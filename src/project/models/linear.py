from math import prod

from torch import nn


class SoftmaxRegression(nn.Sequential):
    """Multinomial logistic regression: one linear layer over the flattened pixels."""

    def __init__(self, in_shape: tuple[int, int, int], num_outputs: int):
        super().__init__(nn.Flatten(), nn.Linear(prod(in_shape), num_outputs))
