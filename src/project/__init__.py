"""PyTorch Lightning template for image classification (MNIST, Fashion-MNIST, CIFAR-10)."""
