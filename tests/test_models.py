import pytest
import torch

from project import models

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NETS = {
    "softmax_regression": (models.SoftmaxRegression, {}),
    "mlp": (models.MLP, {"hidden": [64, 32]}),
    "mlp_dropout_bn": (models.MLP, {"hidden": [64, 32], "dropout": 0.5, "batch_norm": True}),
    "convnet": (models.ConvNet, {}),
    "lenet": (models.LeNet, {}),
    "resnet": (models.ResNet, {"widths": [8, 16, 32], "blocks": [1, 2, 1]}),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("outputs", [10, 1], ids=["multiclass", "binary"])
@pytest.mark.parametrize("name", NETS)
def test_forward_backward_every_net_on_every_shape(name, shape, outputs):
    cls, kwargs = NETS[name]
    torch.manual_seed(0)
    net = cls(shape, outputs, **kwargs)
    x = torch.randn(4, *shape)
    logits = net(x)
    assert logits.shape == (4, outputs)
    logits.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_nets_return_logits_not_probabilities():
    # seed 000 ended its CNN with a Softmax, which CrossEntropyLoss then applies a second time
    torch.manual_seed(0)
    for cls, kwargs in NETS.values():
        net = cls((1, 28, 28), 10, **kwargs).eval()
        assert not any(isinstance(m, torch.nn.Softmax) for m in net.modules())
        out = net(torch.randn(8, 1, 28, 28) * 3)
        assert not torch.allclose(out.sum(1), torch.ones(8))


def test_convnet_is_the_seed_architecture_with_kaiming_init():
    net = models.ConvNet((3, 32, 32), 10, widths=[16, 32, 64])
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d"] * 3 + ["Flatten"]
    assert net.head[1].in_features == 64 * 4 * 4  # seed 000: nn.Linear(64*4*4, 10)
    conv = net.features[0]
    # kaiming_normal_ (fan_in, relu): std = sqrt(2 / fan_in); PyTorch's default would be ~3x smaller
    assert conv.weight.std().item() == pytest.approx((2 / (3 * 9)) ** 0.5, rel=0.25)


def test_mlp_options_build_the_seed_variants():
    plain = models.MLP((1, 28, 28), 10, hidden=[256, 128])
    dropout = models.MLP((1, 28, 28), 10, hidden=[256, 128], dropout=0.5)
    bn = models.MLP((1, 28, 28), 10, hidden=[256, 128], batch_norm=True)
    count = lambda net, kind: sum(isinstance(m, kind) for m in net.modules())  # noqa: E731
    assert (count(plain, torch.nn.Dropout), count(plain, torch.nn.BatchNorm1d)) == (0, 0)
    assert count(dropout, torch.nn.Dropout) == 2
    assert count(bn, torch.nn.BatchNorm1d) == 2
    big = models.MLP((1, 28, 28), 10, hidden=[2048, 1024, 512, 256, 128, 64])  # seed 004's big model
    assert sum(p.numel() for p in big.parameters()) == 4_403_786  # torchinfo total printed in seed 004


def test_resnet_rejects_mismatched_stages():
    with pytest.raises(ValueError, match="same length"):
        models.ResNet((3, 32, 32), 10, widths=[16, 32], blocks=[1])
