"""Each dataset recipe trains end to end, MNIST and CIFAR-10 on small files in their real formats."""

import pytest
from conftest import ROOT, cli, fit_args


@pytest.mark.parametrize(
    "config, data, extra",
    [
        ("configs/mnist_lenet.yaml", "fake_mnist", []),
        # narrowed as its header says for a CPU
        (
            "configs/cifar10_resnet.yaml",
            "fake_cifar10",
            ["--model.net.init_args.widths=[8,16]", "--model.net.init_args.blocks=[1,1]"],
        ),
        ("configs/cifar10_mlp.yaml", "fake_cifar10", []),
    ],
    ids=["mnist_lenet", "cifar10_resnet", "cifar10_mlp"],
)
def test_recipe_trains_and_tests(request, tmp_path, config, data, extra):
    data_dir = request.getfixturevalue(data)
    c = cli(fit_args(tmp_path, data_dir, *extra, "--data.val_size=100", "--trainer.max_epochs=2", config=config))
    name = (ROOT / config).stem
    assert (tmp_path / "logs" / name / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert c.trainer.ckpt_path == c.trainer.checkpoint_callback.best_model_path
    assert 0 <= c.trainer.callback_metrics["test/acc"] <= 1


def test_gpu_recipe_trains_with_its_data_held_on_the_device(tmp_path, fashion_dir):
    # on the CPU here, in fp32: the recipe's config is valid and data.on_device serves every stage
    c = cli(
        fit_args(
            tmp_path,
            fashion_dir,
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.limit_train_batches=40",
            config="configs/fashion_mnist_gpu.yaml",
        )
    )
    assert c.datamodule.hparams.on_device and c.datamodule.test_set.x.device == c.trainer.strategy.root_device
    assert c.trainer.ckpt_path == c.trainer.checkpoint_callback.best_model_path
    assert c.trainer.callback_metrics["test/acc"] > 0.5
