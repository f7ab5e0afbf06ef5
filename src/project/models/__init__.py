"""Architectures: plain ``nn.Module``s built from ``(in_shape, num_outputs)`` that return logits.

They know nothing of Lightning; configs name them as ``model.net.class_path`` and the
:class:`~project.module.ImageClassifier` calls them with the data's shape and class count.
:class:`Backbone` is any timm or torchvision model, pretrained or not.
"""

from project.models.backbone import Backbone
from project.models.cnn import ConvNet
from project.models.lenet import LeNet
from project.models.linear import SoftmaxRegression
from project.models.mlp import MLP
from project.models.resnet import ResNet

__all__ = ["MLP", "Backbone", "ConvNet", "LeNet", "ResNet", "SoftmaxRegression"]
