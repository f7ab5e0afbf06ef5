"""``export``: ONNX and torch.export programs that compute what the checkpoint computes, on uint8 images of any batch;
the parity check that fails the command; the README's onnxruntime example without torch."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import FOLDER_CLASSES, ROOT, fit_args, folder_fit, invoke

from project.data import ImageDataModule, ImageFolder
from project.module import ImageClassifier

CLASSES = sorted(FOLDER_CLASSES)


@pytest.fixture(scope="module")
def trained_folder(image_folder, tmp_path_factory) -> Path:
    """One folder run for the module's tests, each of which gets a copy of it (a run moved is a run: see README)."""
    tmp = tmp_path_factory.mktemp("trained")
    assert invoke(folder_fit(tmp, image_folder, "--trainer.max_epochs=2")).returncode == 0
    return tmp / "logs"


@pytest.fixture
def folder_run(trained_folder, tmp_path) -> Path:
    shutil.copytree(trained_folder, tmp_path / "logs")
    return tmp_path / "logs" / "folder" / "version_0"


def softmax_rows(path: Path) -> dict[int, list[float]]:
    """Each test image's probabilities, per class, from a predictions.csv with every class in its top-k."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    probabilities = {}
    for row in rows:
        ranks = [("class_name", "probability")] + [(f"class_{k}", f"probability_{k}") for k in (2, 3)]
        by_class = {row[c]: row[p] for c, p in ranks}
        probabilities[int(row["index"])] = [float(by_class[c]) for c in CLASSES]
    return probabilities


@pytest.mark.slow
def test_export_computes_what_the_checkpoint_computes(folder_run, image_folder, tmp_path):
    before = sorted(p.relative_to(folder_run) for p in folder_run.rglob("*"))
    result = invoke(["export", str(folder_run)])
    assert result.returncode == 0, result.stderr
    out = folder_run / "export_0"
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt2"]
    assert sorted(p.relative_to(folder_run) for p in folder_run.rglob("*") if "export_0" not in p.parts) == before
    n = int(re.search(r"Parity on (\d+) test images", result.stdout).group(1))
    agreement = rf"\n  model.onnx .* top-1 agreement {n}/{n}\n  model.pt2 .* top-1 agreement {n}/{n}"
    assert re.search(agreement, result.stdout)
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == CLASSES and info["input"]["shape"] == ["batch", 3, 28, 28]
    assert Path(info["checkpoint"]).name.startswith("best-")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("images", "tensor(uint8)", ["batch", 3, 28, 28])
    # against predict, the same module in PyTorch: the test split's probabilities
    predict = ["predict", *folder_fit(tmp_path, image_folder)[1:], f"--ckpt_path={info['checkpoint']}",
               "--predictions.top_k=3"]  # fmt: skip
    assert invoke(predict).returncode == 0
    expected = softmax_rows(folder_run / "predict_0" / "predictions.csv")
    dm = ImageDataModule(ImageFolder(str(image_folder), image_size=28), 32, str(tmp_path / "data"), val_size=0.1)
    dm.setup("test")
    images = dm.test_set.x.numpy()
    assert len(images) == n
    program = torch.export.load(out / "model.pt2").module()
    for batch in (images, images[:1], images[3:10]):  # any batch size
        logits = session.run(None, {"images": batch})[0]
        assert torch.allclose(program(torch.from_numpy(batch)), torch.from_numpy(logits), atol=1e-4)
    probabilities = torch.from_numpy(session.run(None, {"images": images})[0]).softmax(1)
    assert torch.allclose(probabilities, torch.tensor([expected[i] for i in range(len(images))]), atol=2e-6)
    # a second export: its own directory
    assert invoke(["export", str(folder_run), "--ckpt_path=last", "--images=5"]).returncode == 0
    assert "last.ckpt" in json.loads((folder_run / "export_1" / "model.json").read_text())["checkpoint"]


@pytest.mark.slow
def test_binary_export_gives_one_logit_per_class(fashion_dir, tmp_path):
    assert invoke(fit_args(tmp_path, fashion_dir, "--data.positive_class=8")).returncode == 0
    run = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"
    result = invoke(["export", str(run), f"--out={tmp_path / 'shipped'}", "--images=64"])
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "shipped" / "model.json").read_text())
    assert info["classes"] == ["not Bag", "Bag"] and info["input"]["shape"] == ["batch", 1, 28, 28]
    model = ImageClassifier.load_from_checkpoint(info["checkpoint"]).eval()
    x = torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():  # (0, z): softmax is (1 - sigmoid(z), sigmoid(z)) of the net's one logit
        z = model.net(model.normalize(x).contiguous(memory_format=torch.channels_last))[:, 0]
        assert torch.allclose(model(x).softmax(1)[:, 1], torch.sigmoid(z), atol=1e-6)


def test_a_mismatch_fails_the_command(folder_run, monkeypatch):
    real = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: [real(self, *a, **k)[0] + 1e-2])
    result = invoke(["export", str(folder_run)])
    assert result.returncode == 1
    assert re.search(r"error: model.onnx in .*export_0 do not compute what PyTorch computes", result.stderr)
    assert "model.pt2" not in result.stderr.splitlines()[-1]
    info = json.loads((folder_run / "export_0" / "model.json").read_text())
    assert Path(info["checkpoint"]).is_absolute() and "test images of ImageDataModule" in info["parity"]["images"]


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_files(folder_run, tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "project.commands.export.check", interrupt
    )  # Ctrl+C after the files are written, before their check
    result = invoke(["export", str(folder_run)])
    assert result.returncode == 130 and "export interrupted" in result.stderr
    assert not list(folder_run.glob("export_*"))
    out = tmp_path / "shipping"
    out.mkdir()
    assert invoke(["export", str(folder_run), f"--out={out}"]).returncode == 130
    assert list(out.iterdir()) == []  # the user's directory stays; no unchecked model in it
    monkeypatch.undo()
    result = invoke(["export", str(folder_run), f"--out={out}", "--model.tta=flip"])  # and it can be used again
    assert result.returncode == 0 and "note: model.tta=flip is not part of the exported model" in result.stdout
    assert json.loads((out / "model.json").read_text())["test-time augmentation"].startswith("none")


def test_export_bad_input(folder_run, image_folder, tmp_path):
    for args, code, expected in (
        ([str(tmp_path / "nowhere")], 2, "config.yaml does not exist"),
        ([str(folder_run), "--images=0"], 2, "--images must be 1 or more"),
        ([str(folder_run), f"--ckpt_path={tmp_path / 'no.ckpt'}"], 2, "no.ckpt: no such file"),
    ):
        result = invoke(["export", *args])
        assert result.returncode == code and expected in result.stderr and "Traceback" not in result.stderr
    shutil.rmtree(folder_run / "checkpoints")
    result = invoke(["export", str(folder_run)])
    assert result.returncode == 2 and "has no checkpoint in" in result.stderr
    # a net that trains but that torch.export cannot trace (a branch on a tensor's value)
    assert invoke(folder_fit(tmp_path, image_folder, "--model.net=helpers.Branchy")).returncode == 0
    result = invoke(["export", str(tmp_path / "logs" / "folder" / "version_1")])
    assert result.returncode == 1 and "error: the net cannot be exported" in result.stderr


@pytest.mark.slow
def test_readme_onnxruntime_example_runs_without_torch(folder_run, image_folder, tmp_path):
    assert invoke(["export", str(folder_run)]).returncode == 0
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import onnxruntime" in b)
    work = tmp_path / "user"
    shutil.copytree(folder_run / "export_0", work / "logs" / "folder" / "version_0" / "export_0")
    (work / "photos" / "Bag").mkdir(parents=True)
    shutil.copy(image_folder / "bag" / "0003.png", work / "photos" / "Bag" / "0003.png")  # 28x28 RGB
    blocked = "import sys; sys.modules['torch'] = None\n"  # import torch now fails
    assert subprocess.run([sys.executable, "-c", blocked + "import torch"], capture_output=True).returncode == 1
    done = subprocess.run([sys.executable, "-c", blocked + example], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # what predict says of the same file
    predict = ["predict", *folder_fit(tmp_path, image_folder)[1:], "--ckpt_path=best",
               f"--data.predict_files={work / 'photos' / 'Bag' / '0003.png'}"]  # fmt: skip
    assert invoke(predict).returncode == 0
    with open(folder_run / "predict_0" / "predictions.csv") as f:
        (row,) = list(csv.DictReader(f))
    name, probability = done.stdout.split()
    assert name == row["class_name"] and abs(float(probability) - float(row["probability"])) < 2e-3
