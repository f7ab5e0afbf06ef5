"""Callbacks the CLI adds to every run, beside Lightning's own."""

import csv
import io
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, callbacks
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from torchmetrics.classification import MulticlassConfusionMatrix

from project import runs
from project.errors import ConfigError
from project.files import replacing
from project.gather import gather


class EarlyStopping(callbacks.EarlyStopping):
    """Lightning's EarlyStopping, whose ``patience`` is the configured one in a resumed run too: Lightning 2.6
    restores the checkpoint's, so that ``resume RUN --early_stopping.patience N`` would change nothing."""

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience


class CSVPredictionWriter(BasePredictionWriter):
    """After ``predict``, writes ``predictions.csv`` in the run directory: one row per image, by ``index`` in the input,
    with its ``file`` (a folder's test images, ``data.predict_files``) and its true class (``target``, the test set's);
    then the ``top_k`` most probable classes, best first: ``prediction`` (number), ``class_name``, ``probability``,
    then ``class_2``, ``probability_2``, ... Under DDP the ranks' rows are gathered and rank 0 writes them once, in
    input order."""

    def __init__(self, top_k: int, filename: str = "predictions.csv"):
        if top_k < 1:
            raise ConfigError(f"predictions.top_k={top_k}: give 1 or more (the most probable classes in each row).")
        super().__init__(write_interval="epoch")
        self.top_k, self.filename = top_k, filename

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions, batch_indices) -> None:
        if not all(isinstance(p, dict) and {"target", "probabilities"} <= p.keys() for p in predictions):
            raise ConfigError(
                f"{type(pl_module).__qualname__}.predict_step returns {type(predictions[0]).__name__}: predictions.csv "
                "needs {'probabilities': (N, classes), 'target': labels (N,)}, as ImageClassifier.predict_step returns."
            )
        columns = {key: torch.cat([p[key] for p in predictions]) for key in ("target", "probabilities")}
        columns["index"] = torch.tensor([i for batch in batch_indices[0] for i in batch], device=pl_module.device)
        # Lightning's predict sampler gives each image to one rank, the ranks one image apart at most; a repeat (a
        # sampler that pads) is dropped below
        columns = {key: gather(pl_module, value).cpu() for key, value in columns.items()}
        if not trainer.is_global_zero:
            return
        order = columns["index"].argsort()
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = columns["index"][order][1:] != columns["index"][order][:-1]
        index, target, probabilities = (columns[k][order][keep] for k in ("index", "target", "probabilities"))
        k = min(self.top_k, probabilities.shape[1])
        top_p, top_i = probabilities.topk(k, dim=1)
        files = getattr(trainer.datamodule, "predict_paths", None)  # optional in a data module (project.data.ImageData)
        classes = pl_module.hparams.classes  # the checkpoint's, which the model was trained on
        labelled = bool((target >= 0).all())  # the test set's images have a class; predict_files' do not
        # multi-label: the classes at or above the model's threshold, "|"-joined (and the true ones so)
        multilabel = bool(pl_module.hparams.get("multilabel"))
        threshold = float(getattr(pl_module, "threshold", 0.5))

        def joined(row) -> str:
            return "|".join(c for c, on in zip(classes, row, strict=True) if on)

        if multilabel:
            given = [joined(row) for row in (probabilities >= threshold).tolist()]
            target = [joined(row) for row in target.tolist()] if target.ndim == 2 else target.tolist()
        header = ["index"] + (["file"] if files else []) + (["target"] if labelled else [])
        header += ["labels"] if multilabel else []
        header += ["prediction", "class_name", "probability"]
        header += [f"{name}_{rank}" for rank in range(2, k + 1) for name in ("class", "probability")]
        path = runs.directory(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            targets = target if isinstance(target, list) else target.tolist()
            for n, (i, y, ps, cs) in enumerate(
                zip(index.tolist(), targets, top_p.tolist(), top_i.tolist(), strict=True)
            ):
                row = (
                    [i] + ([files[i]] if files else []) + ([y] if labelled else []) + ([given[n]] if multilabel else [])
                )
                row += [cs[0], classes[cs[0]], f"{ps[0]:.6f}"]
                row += [value for c, p in zip(cs[1:], ps[1:], strict=True) for value in (classes[c], f"{p:.6f}")]
                writer.writerow(row)
        print(f"Wrote {len(index)} predictions to {path}")


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, drawn ``refresh_rate`` times a second (Lightning's: 100) and updated as often
    during training, not after every batch: each update costs about as much as a small net's step (Lightning 2.6.1
    made the bar faster, its PR 21321, not cheap enough to update every step). Without
    ``v_num``, the logger's version, which Lightning shows as a metric ("v_num: 0.000"): the run directory names it."""

    def __init__(self, refresh_rate: int = 10, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._shown = 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        if batch_idx + 1 < self.total_train_batches and now - self._shown < 1 / self.refresh_rate:
            return
        self._shown = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class Report(Callback):
    """After every ``test``, whatever the logger: ``test_report.csv`` in the run's (or the evaluation's) directory,
    each class's support, precision, recall and F1, then its row of the confusion matrix, and their macro means. Where
    the run has a TensorBoard logger, what TensorBoard shows beyond Lightning's scalars: the model graph (GRAPHS), the
    model summary with shapes and parameters per layer and the per-class table (TEXT), train and val curves on shared
    charts (CUSTOM SCALARS); after ``test``, a confusion matrix and the misclassified test images (IMAGES), and the
    hyperparameters with the final metrics (HPARAMS)."""

    def __init__(self, misclassified: int = 32):
        self.misclassified = misclassified

    @staticmethod
    def _logger(trainer: Trainer) -> TensorBoardLogger | None:
        """The run's TensorBoard logger, wherever it is in the list of loggers (rank 0 only)."""
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        return logger if trainer.is_global_zero else None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        resumed = (
            trainer.ckpt_path and Path(trainer.ckpt_path).resolve().parents[1] == runs.directory(trainer).resolve()
        )
        if (logger := self._logger(trainer)) is None or resumed:  # a resumed run has its report already
            return
        writer = logger.experiment
        summary = ModelSummary(pl_module, max_depth=-1)
        rows = [
            f"| {name} | {kind} | {params:,} | {shape_in} | {shape_out} |"
            for name, kind, params, shape_in, shape_out in zip(
                summary.layer_names, summary.layer_types, summary.param_nums, summary.in_sizes, summary.out_sizes,
                strict=True,
            )
            if name.startswith("net")
        ]  # fmt: skip
        table = "| layer | type | parameters | input | output |\n|---|---|---|---|---|\n" + "\n".join(rows)
        total = f"\n\n{summary.trainable_parameters:,} trainable parameters of {summary.total_parameters:,}"
        writer.add_text("model/summary", table + total)
        writer.add_scalar("model/params", summary.trainable_parameters, 0)
        # here rather than by the logger (which traces again at every test): after fit starts the net may be compiled
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # the trace's dropout draws no numbers
            # TensorBoard draws graphs from torch.jit.trace only, deprecated since torch 2.14
            warnings.filterwarnings("ignore", ".*torch.jit.trace", FutureWarning)
            writer.add_graph(pl_module, pl_module.example_input_array.to(pl_module.device))
        writer.add_custom_scalars(
            {
                "train vs val": {
                    "loss": ["Multiline", ["train/loss_epoch", "val/loss"]],
                    "accuracy": ["Multiline", ["train/acc", "val/acc"]],
                }
            }
        )

    BINS = 15  # the reliability diagram's, as test/ece's

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.confusion = MulticlassConfusionMatrix(len(pl_module.hparams.classes)).to(pl_module.device)
        # per confidence bin: images, their summed confidence, how many were right
        self.bins = torch.zeros(3, self.BINS, dtype=torch.float64, device=pl_module.device)
        # multi-label: per class, true positives, false positives, false negatives
        self.labels = torch.zeros(3, len(pl_module.hparams.classes), dtype=torch.int64, device=pl_module.device)
        self.wrong: list[tuple[torch.Tensor, int, int]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not (isinstance(outputs, dict) and {"prediction", "target"} <= outputs.keys()):
            raise ConfigError(
                f"{type(pl_module).__qualname__}.test_step returns {type(outputs).__name__}: the test report needs "
                "{'prediction': class indices (N,), 'target': labels (N,)}, as ImageClassifier.test_step returns."
            )
        prediction, target = outputs["prediction"], outputs["target"]
        if prediction.ndim == 2:  # multi-label: the classes given (0/1) against the true ones, class by class
            given, truth = prediction.bool(), target.bool()
            for row, hits in enumerate((given & truth, given & ~truth, ~given & truth)):
                self.labels[row] += hits.sum(0)
            return
        self.confusion.update(prediction, target)
        if (confidence := outputs.get("confidence")) is not None:
            which = (confidence.double() * self.BINS).long().clamp(max=self.BINS - 1)
            for row, values in enumerate((torch.ones_like(confidence), confidence, prediction == target)):
                self.bins[row].index_add_(0, which, values.double())
        for i in torch.nonzero(prediction != target).flatten()[: self.misclassified - len(self.wrong)].tolist():
            self.wrong.append((batch[0][i].cpu(), target[i].item(), prediction[i].item()))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bins = trainer.strategy.reduce(self.bins, reduce_op="sum").cpu()  # every rank takes part
        labels = trainer.strategy.reduce(self.labels, reduce_op="sum").cpu()
        multilabel = bool(pl_module.hparams.get("multilabel"))
        matrix = None if multilabel else self.confusion.compute().cpu()  # synced over DDP ranks: every rank takes part
        classes = pl_module.hparams.classes
        reliability = _reliability_figure(bins) if bins[0].sum() > 0 else None
        table = _per_label(labels, classes) if multilabel else _per_class(matrix, classes)
        if trainer.is_global_zero and not trainer.fast_dev_run:  # a dry run writes nothing
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(table)
            with replacing(runs.directory(trainer) / "test_report.csv") as f:
                f.write(text.getvalue().encode())
            if reliability is not None:
                with replacing(runs.directory(trainer) / "reliability.png") as f:
                    reliability.savefig(f, format="png", dpi=100)
        if (logger := self._logger(trainer)) is None:
            return
        writer = logger.experiment
        step = trainer.global_step
        markdown = "\n".join("| " + " | ".join(row[:5]) + " |" for row in table)
        writer.add_text("test/per_class", markdown.replace("\n", "\n|---|---|---|---|---|\n", 1), step)
        if matrix is not None:
            writer.add_figure("test/confusion_matrix", _confusion_figure(matrix, classes), step)
        if reliability is not None:
            writer.add_figure("test/reliability", reliability, step)
        if self.wrong:
            writer.add_figure("test/misclassified", _images_figure(self.wrong, classes), step)
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        best = pl_module.val_acc_best.max_value.item()  # the state itself: compute() warns after a checkpoint load
        if best > float("-inf"):  # not for a test of a checkpoint that never validated
            metrics["val/acc_best"] = best
        logger.log_hyperparams({**pl_module.hparams, **getattr(trainer.datamodule, "hparams", {})}, metrics)


def _scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each class's precision, recall and F1 from its true positives, false positives and false negatives (0 where
    a class is never predicted, or never true, as torchmetrics gives it)."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0)
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), 0)
    return precision, recall, f1


def _report_rows(classes, support: torch.Tensor, scores: tuple, extra: list | None = None) -> list[list[str]]:
    """The test report's rows: a header, one row per class (its support and scores, then its ``extra`` cells), and
    the macro means."""
    rows = [["class", "support", "precision", "recall", "f1", *([f"predicted {c}" for c in classes] if extra else [])]]
    for i, name in enumerate(map(str, classes)):
        rows.append([name, str(int(support[i])), *(f"{v[i]:.4f}" for v in scores), *(extra[i] if extra else [])])
    rows.append(["macro mean", str(int(support.sum())), *(f"{v.mean():.4f}" for v in scores)])
    return rows


def _per_label(labels: torch.Tensor, classes) -> list[list[str]]:
    """The multi-label test report: per class its support (images that have it) and the scores of giving it at the
    model's threshold."""
    tp, fp, fn = labels
    return _report_rows(classes, tp + fn, _scores(tp, fp, fn))


def _per_class(matrix: torch.Tensor, classes) -> list[list[str]]:
    """The test report, from the confusion matrix: each class's support and scores, then its row of the matrix."""
    hits = matrix.diagonal()
    scores = _scores(hits, matrix.sum(0) - hits, matrix.sum(1) - hits)
    return _report_rows(classes, matrix.sum(1), scores, [[str(int(n)) for n in row] for row in matrix.tolist()])


def _reliability_figure(bins: torch.Tensor):
    """Accuracy against confidence, bin by bin (bars, their width the bin's), the diagonal a calibrated model would
    follow, and each bin's share of the images; the title has the expected calibration error it adds up to."""
    from matplotlib.figure import Figure

    count, confidence, right = bins
    n = len(count)
    seen = count > 0
    accuracy = torch.where(seen, right / count.clamp(min=1), 0)
    mean_confidence = torch.where(seen, confidence / count.clamp(min=1), 0)
    ece = float(((accuracy - mean_confidence).abs() * count).sum() / count.sum())
    fig = Figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_axes((0.15, 0.13, 0.8, 0.77))
    edges = torch.arange(n) / n
    ax.bar(edges, accuracy, width=1 / n, align="edge", edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(edges, (count / count.sum()), width=1 / n, align="edge", color="#dd8452", alpha=0.5, label="share of images")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class's probability)", ylabel="accuracy")
    ax.set_title(f"test reliability: ECE {ece:.4f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def _confusion_figure(matrix: torch.Tensor, classes: tuple[str, ...]):
    """Rows the true classes, columns the predicted ones, each cell its count of test images: sized to its classes
    (half an inch a cell, room for the longest name), so that three classes are as readable as thirty."""
    from matplotlib.figure import Figure

    n = len(classes)
    cell = 0.5 if n <= 25 else 0.25
    names = 0.6 + 0.07 * max(len(c) for c in classes)  # inches for the tick labels beside and below
    width, height = names + cell * n + 0.3, names + cell * n + 0.5
    fig = Figure(figsize=(width, height), dpi=100)
    # margins from the sizes above: tight_layout would measure every label again (half the drawing's time)
    ax = fig.add_axes((names / width, names / height, cell * n / width, cell * n / height))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class")
    ax.set_title("test confusion matrix", fontsize=10)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    if n <= 30:  # beyond, the counts would not fit their cells
        for i in range(n):
            for j in range(n):
                count = int(matrix[i, j])
                color = "white" if count > matrix.max() / 2 else "black"
                ax.text(j, i, count, ha="center", va="center", fontsize=8 if n <= 12 else 6, color=color)
    return fig


def _images_figure(wrong: list[tuple[torch.Tensor, int, int]], classes: tuple[str, ...]):
    """The images in one grid on one axes, each captioned "true -> predicted" (an axes per image renders 5x slower)."""
    from matplotlib.figure import Figure

    cols = 8
    rows = (len(wrong) + cols - 1) // cols
    images = torch.stack(
        [(x - x.min()) / (x.max() - x.min() + 1e-8) for x in (x.float() for x, _, _ in wrong)]
    )  # to [0, 1] for display
    c, h, w = images.shape[1:]
    grid = torch.ones(rows * cols, c, h + 10, w + 2)  # white margins: a caption band above each image
    grid[: len(wrong), :, 10:, 1:-1] = images
    grid = grid.view(rows, cols, c, h + 10, w + 2).permute(0, 3, 1, 4, 2).reshape(rows * (h + 10), cols * (w + 2), c)
    fig = Figure(figsize=(cols * 1.3, rows * 1.5))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.squeeze(-1), cmap="gray", vmin=0, vmax=1)
    for k, (_, target, prediction) in enumerate(wrong):
        row, col = divmod(k, cols)
        ax.text((col + 0.5) * (w + 2), row * (h + 10) + 5, f"{classes[target]} → {classes[prediction]}",
                ha="center", va="center", fontsize=6)  # fmt: skip
    ax.axis("off")
    fig.suptitle("misclassified test images: true class → predicted class", fontsize=8, y=0.995, va="top")
    return fig
