import csv
from pathlib import Path

import pytest
import torch
from conftest import FOLDER_CLASSES, cli, folder_fit, invoke, run
from test_labels import imbalanced_folder


def recorded(path: Path, stage: str) -> dict[str, float]:
    with open(path) as f:
        row = next(r for r in csv.DictReader(f) if r["stage"] == stage)
    return {k: float(v) for k, v in row.items() if k.startswith(f"{stage}/") and v}


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_on_shards_and_evaluates_each_image_once(tmp_path, fashion_dir):
    # 120 images a class, of which 61 validate (odd), and 51 test images a class (153: odd): two processes evaluate
    # 31 and 30, 77 and 76 images, none twice. 299 training images, 20 per process per step, drawn by the balanced
    # sampler and sharded: 7 steps an epoch if each process takes its own half. 2 epochs, the first with the body
    # frozen (DDP must then find the parameters without gradients), a temperature fitted on every process's logits
    root = imbalanced_folder(tmp_path / "photos", fashion_dir, dict.fromkeys(FOLDER_CLASSES, 120), 51)
    one = ["--trainer.devices=1", "--trainer.strategy=auto"]
    fit = folder_fit(tmp_path, root, "--data.val_size=61", "--data.batch_size=20", "--data.eval_batch_size=16",
                     "--trainer.limit_train_batches=1.0", "--trainer.limit_val_batches=1.0",
                     "--trainer.limit_test_batches=1.0", "--trainer.max_epochs=2", "--model.freeze_epochs=1",
                     "--data.balanced=true", "--model.calibrate=true")  # fmt: skip
    result = run([*fit, "--trainer.devices=2", "--trainer.strategy=ddp"])
    assert result.returncode == 0, result.stderr[-3000:]
    logs = tmp_path / "logs" / "folder"
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # rank 1 wrote no run of its own
    trained = logs / "version_0"
    last = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 14
    state = next(s for s in last["callbacks"].values() if "best_model_score" in s)

    # one process on the same checkpoint: the same validation and test metrics, counts exactly
    config = f"--config={trained / 'config.yaml'}"
    validated = cli(["validate", config, "--ckpt_path=best", *one]).trainer.callback_metrics["val/acc"].item()
    assert validated == state["best_model_score"].item()
    assert invoke(["test", config, "--ckpt_path=best", *one]).returncode == 0
    two, single = recorded(trained / "record.csv", "test"), recorded(trained / "test_0" / "record.csv", "test")
    assert set(single) == {"test/loss", "test/acc", "test/f1", "test/recall", "test/ece"} == set(two)
    for name in ("test/acc", "test/f1", "test/recall"):
        assert single[name] == two[name], (name, single, two)
    for name in ("test/loss", "test/ece"):  # sums of floats, added in another order
        assert single[name] == pytest.approx(two[name], abs=1e-6), (name, single, two)
    reports = [(trained / sub / "test_report.csv").read_text() for sub in ("", "test_0")]
    assert reports[0] == reports[1] and ",153," in reports[0]  # every image once in the confusion matrix

    # predict: each image once, gathered from both processes in input order
    assert invoke(["predict", config, "--ckpt_path=best", *one]).returncode == 0
    result = run(["predict", config, "--ckpt_path=best"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = []
    for sub in ("predict_0", "predict_1"):
        with open(trained / sub / "predictions.csv") as f:
            rows.append([(r["index"], r["file"], r["class_name"]) for r in csv.DictReader(f)])
    assert rows[0] == rows[1] and len(rows[0]) == 153
