"""Seconds per epoch of configs/finetune.yaml (timm's ResNet-18 at 128x128, batch 32) on this machine, the body
frozen (epoch 0) and trained (epochs 1 and 2): 1,000 training images of 5 Fashion-MNIST classes written as a user's
folder, 100 validation images, weights from a local file of the right shapes (the ImageNet ones cannot be downloaded
here; the arithmetic is the same).

    python benchmarks/finetune_epoch.py      # about a minute on 2 CPU cores
"""

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import timm
from safetensors.torch import save_file
from torchvision.io import write_png

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from project.data import registry  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry.prepare("fashion_mnist", ROOT / "data", download=True)
        x, y = registry.load("fashion_mnist", ROOT / "data", train=True)
        for label in range(5):
            for i, image in enumerate(x[y == label][:224]):
                path = tmp / "photos" / f"class_{label}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(image, str(path))
        weights = tmp / "resnet18.safetensors"
        save_file(timm.create_model("resnet18").state_dict(), str(weights))
        subprocess.run(
            [sys.executable, "-m", "project", "fit", "--config=configs/finetune.yaml",
             f"--data.source.root={tmp / 'photos'}", f"--model.net.init_args.weights={weights}",
             f"--data.data_dir={tmp / 'data'}", "--data.val_size=100", "--data.test_size=20",
             "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp}",
             f"--trainer.logger.init_args.save_dir={tmp / 'logs'}"],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        with open(next((tmp / "logs").glob("*/version_0/record.csv"))) as f:
            ends = [float(row["seconds"]) for row in csv.DictReader(f) if row["stage"] == "fit"]
    epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    print("timm resnet18, 128x128 RGB, batch 32, 1,000 training + 100 validation images per epoch")
    for i, seconds in enumerate(epochs):
        print(f"  epoch {i} ({'body frozen' if i == 0 else 'all trained'}): {seconds:.1f} s, "
              f"{1000 / seconds:.1f} training images/s with the validation")  # fmt: skip


if __name__ == "__main__":
    main()
