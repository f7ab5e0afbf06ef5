import pytest
import torch
from conftest import fit_args, run

from project.data import ImageDataModule
from project.module import ImageClassifier


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_shards_batches_and_syncs_metrics(tmp_path, fashion_dir):
    # 2000 training images, 100 per process per step: 10 steps per epoch if each rank takes its own half of the
    # balanced sample; 2 epochs, the first with the body frozen (DDP must then find the parameters without gradients)
    args = fit_args(tmp_path, fashion_dir, "--data.val_size=58000", "--data.batch_size=100",
                    "--data.eval_batch_size=200", "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=5",
                    "--trainer.limit_test_batches=5", "--trainer.accelerator=cpu", "--trainer.devices=2",
                    "--trainer.strategy=ddp", "--trainer.max_epochs=2", "--model.freeze_epochs=1",
                    "--data.balanced=true")  # fmt: skip
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout

    logs = tmp_path / "logs" / "fashion_mnist_cnn"
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # rank 1 wrote no run of its own
    last = torch.load(logs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20
    state = next(s for s in last["callbacks"].values() if "best_model_score" in s)
    logged, best = state["best_model_score"].item(), state["best_model_path"]

    # each rank validated 5 batches of its strided half of the val set: together, its first 2000 images
    dm = ImageDataModule("fashion_mnist", 100, str(fashion_dir), val_size=58000)
    dm.setup("fit")
    x, y = dm.val_set.x[:2000], dm.val_set.y[:2000]  # uint8: the model normalises
    model = ImageClassifier.load_from_checkpoint(best, weights_only=True)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert logged == accuracy  # rank 0 logged the accuracy of both ranks, not of its own half
