"""On a CUDA GPU (skipped where torch sees none): the GPU recipe as it is meant to run."""

import pytest
from conftest import cli, fit_args

pytestmark = pytest.mark.gpu


def test_gpu_recipe_trains_on_the_gpu_with_its_data_in_gpu_memory(tmp_path, fashion_dir):
    args = fit_args(tmp_path, fashion_dir, "--trainer.limit_train_batches=40", config="configs/fashion_mnist_gpu.yaml")
    c = cli([a for a in args if a != "--trainer.accelerator=cpu"])  # the recipe's own accelerator and precision
    assert c.trainer.strategy.root_device.type == "cuda" and c.trainer.precision == "bf16-mixed"
    assert c.datamodule.train_set.x.is_cuda and c.datamodule.test_set.x.is_cuda  # data.on_device
    assert next(c.model.parameters()).is_cuda
    assert c.trainer.ckpt_path == c.trainer.checkpoint_callback.best_model_path
    assert c.trainer.callback_metrics["test/acc"] > 0.5
