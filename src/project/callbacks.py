"""Callbacks the CLI adds to every run, beside Lightning's own."""

import csv
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class CSVPredictionWriter(BasePredictionWriter):
    """After ``predict``, writes ``predictions.csv`` in the run directory: one row per test image with its
    index in the test set, true class, predicted class (number and name) and that class's probability.
    Under DDP the ranks' rows are gathered and rank 0 writes them once, in test-set order."""

    def __init__(self, filename: str = "predictions.csv"):
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        columns = {key: torch.cat([p[key] for p in predictions]) for key in ("target", "prediction", "probability")}
        columns["index"] = torch.tensor([i for batch in batch_indices[0] for i in batch], device=pl_module.device)
        # DistributedSampler pads the ranks to equal length, so gathering then dropping repeats is exact
        columns = {key: pl_module.all_gather(value).reshape(-1).cpu() for key, value in columns.items()}
        if not trainer.is_global_zero:
            return
        order = columns["index"].argsort()
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = columns["index"][order][1:] != columns["index"][order][:-1]
        rows = {key: value[order][keep].tolist() for key, value in columns.items()}
        classes = trainer.datamodule.classes
        path = Path(trainer.log_dir or ".") / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "prediction", "class_name", "probability"])
            for i, target, pred, prob in zip(
                rows["index"], rows["target"], rows["prediction"], rows["probability"], strict=True
            ):
                writer.writerow([i, target, pred, classes[pred], f"{prob:.6f}"])
        print(f"Wrote {len(rows['index'])} predictions to {path}")
