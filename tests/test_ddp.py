import csv

import pytest
import torch
from conftest import fit_args, folder_fit, invoke, run

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


@pytest.mark.slow
def test_two_processes_evaluate_each_image_once_and_give_the_one_process_metrics(tmp_path, fashion_dir):
    from test_labels import imbalanced_folder

    # 51 test images a class, 153 in all: two processes take 77 and 76, no image twice
    root = imbalanced_folder(tmp_path / "photos", fashion_dir, {"trouser": 60, "sneaker": 60, "bag": 60}, 51)
    assert invoke(folder_fit(tmp_path, root, "--model.calibrate=true")).returncode == 0
    trained = tmp_path / "logs" / "folder" / "version_0"
    evaluate = ["test", f"--config={trained / 'config.yaml'}", "--ckpt_path=best", "--data.eval_batch_size=16",
                "--trainer.limit_test_batches=1.0"]  # fmt: skip
    assert invoke(evaluate).returncode == 0
    result = run([*evaluate, "--trainer.devices=2", "--trainer.strategy=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]

    def metrics(sub: str) -> dict[str, float]:
        with open(trained / sub / "record.csv") as f:
            row = next(r for r in csv.DictReader(f) if r["stage"] == "test")
        return {k: float(v) for k, v in row.items() if k.startswith("test/")}

    one, two = metrics("test_0"), metrics("test_1")
    assert set(one) == {"test/loss", "test/acc", "test/f1", "test/recall", "test/ece"} and one.keys() == two.keys()
    for name in ("test/acc", "test/f1", "test/recall"):  # counts: exactly
        assert one[name] == two[name], (name, one, two)
    for name in ("test/loss", "test/ece"):  # sums of floats, added in another order
        assert one[name] == pytest.approx(two[name], abs=1e-6), (name, one, two)
    reports = [(trained / sub / "test_report.csv").read_text() for sub in ("test_0", "test_1")]
    assert reports[0] == reports[1] and ",153," in reports[0]  # every image once in the confusion matrix
    # predict: each image once, gathered from both processes in input order
    predict = ["predict", *evaluate[1:4]]
    assert invoke(predict).returncode == 0
    result = run([*predict, "--trainer.devices=2", "--trainer.strategy=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = []
    for sub in ("predict_0", "predict_1"):
        with open(trained / sub / "predictions.csv") as f:
            rows.append([(r["index"], r["file"], r["class_name"]) for r in csv.DictReader(f)])
    assert rows[0] == rows[1] and len(rows[0]) == 153
