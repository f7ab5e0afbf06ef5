from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    Accuracy,
    BinaryCalibrationError,
    F1Score,
    MulticlassCalibrationError,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    Recall,
)

from project import finetune
from project.errors import ConfigError, DataError
from project.gather import gather

# Built by jsonargparse from a config's class_path + init_args; the first arguments come from the data.
NetFactory = Callable[[tuple[int, int, int], int], nn.Module]


class Normalize(nn.Module):
    """Images as a data module serves them (``uint8`` in 0..255, or floats in [0, 1]: torchvision's two conventions)
    to what the net trains on: minus the training images' mean, over their std, per channel. The statistics are buffers,
    so they are saved in the checkpoints, restored with them and exported with the graph."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))  # until a fit sets them: images in [0, 1]
        self.register_buffer("std", torch.ones(channels))

    def set(self, mean, std) -> None:
        for name, values in (("mean", mean), ("std", std)):
            values = torch.as_tensor(values, dtype=torch.float32).flatten()
            if len(values) not in (1, len(self.mean)) or not torch.isfinite(values).all():
                raise ConfigError(f"the data's {name} {values.tolist()} is not one finite value per channel "
                                  f"({len(self.mean)} channels).")  # fmt: skip
            getattr(self, name).copy_(values.expand_as(self.mean))
        if (self.std <= 0).any():
            raise ConfigError(f"the data's std {self.std.tolist()} has a channel of 0 or less: give positive values.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scale = 255 if images.dtype == torch.uint8 else 1
        mean, std = (self.mean * scale).view(1, -1, 1, 1), (self.std * scale).view(1, -1, 1, 1)
        return (images.float() - mean) / std


class Classifier(Protocol):
    """What the template's commands and callbacks ask of a model, which :class:`ImageClassifier` and its subclasses
    (``--model FILE.Class``) meet; a run checks it when it starts (:func:`check`).

    - ``forward(images)``: logits ``(N, len(classes))`` of images as the data module serves them (``export`` exports
      the module itself);
    - ``hparams.in_shape`` and ``hparams.classes``: what it was built for, which a checkpoint is checked against and
      reports and ``predictions.csv`` name;
    - ``test_step`` returning ``{"prediction": class indices (N,), "target": labels (N,)}`` (the test report) and
      ``predict_step`` returning ``{"probabilities": (N, classes), "target": labels (N,)}`` (``predictions.csv``);
    - ``metric_names``: what it logs, which ``checkpoint.monitor`` and ``early_stopping.monitor`` may name;
    - ``build_scheduler(optimizer, total_steps, epochs)``: its learning-rate schedule, which ``lr-plot`` draws.
    """

    hparams: Any
    metric_names: set[str]

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...
    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]: ...
    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]: ...
    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: float, epochs: int): ...


def check(model) -> None:
    """One message naming what a model lacks of :class:`Classifier`."""
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    for part in ("in_shape", "classes"):
        if part not in getattr(model, "hparams", {}):
            raise ConfigError(f"the model {name} has no hyperparameter {part!r}: call self.save_hyperparameters() in "
                              "its __init__, as ImageClassifier does (project.module.Classifier).")  # fmt: skip
    for part in ("forward", "test_step", "predict_step", "build_scheduler"):
        if not callable(getattr(model, part, None)):
            raise ConfigError(f"the model {name} has no method {part} (project.module.Classifier).")
    if not isinstance(getattr(model, "metric_names", None), set | frozenset):
        raise ConfigError(
            f"the model {name}'s metric_names is not the set of names it logs (project.module.Classifier)."
        )


class ImageClassifier(LightningModule):
    """Trains any ``nn.Module`` that maps images to logits, for multiclass or binary classification: images in (as a
    data module serves them: ``uint8``, or floats in [0, 1]), one logit per class out. The module is what is deployed:
    the training images' mean and std are its buffers (:class:`Normalize`, set from the data module when a fit starts),
    and ``in_shape`` and ``classes`` its hyperparameters, so ``ImageClassifier.load_from_checkpoint(path)`` alone
    predicts as the run did, and the exported graph is this module.

    ``net`` is built here from the data's ``in_shape`` and number of ``classes`` (both linked from the data module by
    the CLI). With two classes the task is binary: the net has one output ``z``, the loss is ``BCEWithLogits``, and the
    module returns the logits ``(0, z)``; otherwise ``CrossEntropy`` over one logit per class. :meth:`loss` is the one
    place to change the objective (a subclass with a focal loss: README). Logs ``train/loss_step`` (at logging steps),
    ``train/{loss_epoch,acc}``, ``{val,test}/{loss,acc}``, ``val/acc_best``, and macro F1 and macro recall (the balanced
    accuracy; and top-5 accuracy with more than 5 classes) for val and test. ``class_weights`` weighs the training loss
    per class: ``balanced`` (the inverse of each class's share of the training images) or one weight per class.
    ``label_smoothing`` softens the training targets (the loss only; val and test losses are plain). Training batches
    may come with soft targets, class probabilities ``(N, num_classes)`` (mixup and cutmix in the data module): the
    loss takes them as they are, and an image counts in ``train/acc`` by the weight its target gives the predicted
    class. ``tta`` averages the logits of ``test`` and ``predict`` over the image and its mirror image (``flip``), and
    also the image moved one pixel up-left and down-right (``flip_translate``).
    ``channels_last`` and ``compile`` (``torch.compile``) are speed options for GPUs; precision is a Trainer flag.
    Fine-tuning (:mod:`project.finetune`): ``init_from`` a run directory or checkpoint of yours loads its net's
    weights and normalisation where names and shapes match (a head for other classes starts fresh); a net with
    ``pretrained_stats`` (a pretrained :class:`~project.models.Backbone`) normalises with them instead of the data's.
    ``freeze_epochs`` trains only the head for that many epochs (``train_bn``: the body's BatchNorm layers learn
    meanwhile); the body's rate is the optimizer's times ``body_lr_scale``, and times ``layer_decay`` per layer below
    the head; ``norm_bias_decay`` false exempts norms and biases from weight decay.
    ``calibrate`` fits a temperature on each validation's logits (temperature scaling): the checkpoints keep it, and
    ``forward`` (so ``test``, ``predict`` and the exported graph) divides the logits by it; the test logs its expected
    calibration error, ``test/ece``, either way. ``multilabel`` (from the data module, ``data.multilabel``): any number
    of classes an image, targets 0/1 rows; one sigmoid output per class, binary cross-entropy, and the classes given
    are those whose probability reaches ``threshold``, set on each validation for the best macro F1.
    Arguments without a default here take theirs from ``configs/default.yaml``.
    """

    def __init__(
        self,
        net: NetFactory,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
        scheduler_interval: Literal["epoch", "step"],
        in_shape: tuple[int, int, int],
        classes: list[str],
        channels_last: bool,
        scheduler_monitor: str = "val/loss",
        compile: bool = False,
        label_smoothing: float = 0.0,
        tta: Literal["none", "flip", "flip_translate"] = "none",
        init_from: str | None = None,
        freeze_epochs: int = 0,
        train_bn: bool = True,
        body_lr_scale: float = 1.0,
        layer_decay: float | None = None,
        norm_bias_decay: bool = True,
        class_weights: Literal["balanced"] | list[float] | None = None,
        calibrate: bool = False,
        multilabel: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing={label_smoothing}: give a value in [0, 1).")
        for key, value in (("freeze_epochs", freeze_epochs), ("body_lr_scale", body_lr_scale)):
            if value < 0:
                raise ConfigError(f"model.{key}={value} cannot be negative.")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ConfigError(f"model.layer_decay={layer_decay}: give a factor in (0, 1] (or null for none).")
        num_classes = len(classes)
        if num_classes < 2:
            raise ConfigError(f"model.classes={list(classes)}: classification needs two or more classes.")
        self.binary = num_classes == 2 and not multilabel
        if multilabel and (class_weights is not None or calibrate):
            raise ConfigError("the data is multi-label (several classes an image): model.class_weights and "
                              "model.calibrate are for one class an image; leave them unset.")  # fmt: skip
        if isinstance(class_weights, list) and (len(class_weights) != num_classes or min(class_weights) <= 0):
            raise ConfigError(f"model.class_weights={class_weights}: give one positive weight per class "
                              f"({num_classes}), or balanced.")  # fmt: skip
        # the training loss's weight per class: a buffer, so that a resumed run and its checkpoints keep it
        self.register_buffer("class_weight", torch.tensor(class_weights if isinstance(class_weights, list) else
                                                          [1.0] * num_classes, dtype=torch.float32))  # fmt: skip
        outputs = 1 if self.binary else num_classes
        self.normalize = Normalize(in_shape[0])
        self.net = _build(net, in_shape, outputs)
        if freeze_epochs or body_lr_scale != 1 or layer_decay is not None:
            finetune.head_of(self.net)  # a net without a head stops here, not at the first epoch
        if channels_last:  # NHWC convolutions: faster with tensor cores (mixed precision on recent GPUs)
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = optimizer, scheduler
        # set by whoever fits it from a checkpoint (the CLI's resume): the checkpoint's weights replace init_from's,
        # whose source need not exist any more. Lightning names the checkpoint only after setup
        self.resuming = False
        self.example_input_array = torch.zeros(2, *in_shape)

        # no argument checks: the binary ones read the labels back every step (a GPU sync); the data module has
        # checked the labels once
        task = {"task": "binary"} if self.binary else {"task": "multiclass", "num_classes": num_classes}
        task["validate_args"] = False
        # the training loss and accuracy of the epoch as running sums on the device: a torchmetrics update, or a
        # self.log(on_epoch=True), costs as much as a small net's step (and torchmetrics' binary update reads the
        # scores back on the CPU)
        self.register_buffer("train_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("train_hits", torch.zeros(()), persistent=False)  # fractional with soft targets
        self.train_seen = 0
        # macro: every class counts as much, whatever its size (recall's macro mean is the balanced accuracy)
        scores = {"acc": Accuracy(**task), "f1": F1Score(**task, average="macro"),
                  "recall": Recall(**task, average="macro")}  # fmt: skip
        if not self.binary and num_classes > 5:
            scores["acc_top5"] = Accuracy(**task, top_k=5)
        # expected calibration error: how far the test's confidences are from its accuracy (15 bins)
        ece = BinaryCalibrationError(n_bins=15) if self.binary else MulticlassCalibrationError(num_classes, n_bins=15)
        tested = {"ece": ece}
        # the class probability at and above which an image is given a class (multi-label): set on each validation
        self.register_buffer("threshold", torch.tensor(0.5))
        if multilabel:  # of the labels above the threshold; mAP of the probabilities themselves
            labels = {"num_labels": num_classes, "validate_args": False}
            scores = {"acc": MultilabelAccuracy(**labels, average="micro"), "f1": MultilabelF1Score(**labels),
                      "exact_match": MultilabelExactMatch(**labels)}  # fmt: skip
            tested = {}
        self.val_metrics = MetricCollection(scores, prefix="val/")
        self.test_metrics = MetricCollection({**scores, **tested}, prefix="test/").clone()
        ranking = (
            MetricCollection({"map": MultilabelAveragePrecision(num_classes, average="macro")}) if multilabel else None
        )
        self.val_ranking = ranking.clone(prefix="val/") if ranking is not None else None
        self.test_ranking = ranking.clone(prefix="test/") if ranking is not None else None
        # the logits' temperature (forward divides by it): 1 until calibrate fits it on a validation, then saved with
        # the checkpoint, used by test and predict and exported with the graph
        self.register_buffer("temperature", torch.ones(()))
        # a validation's logits and targets, which the temperature (calibrate) or the threshold (multi-label) is set on
        self.val_logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        # the mean over the images, whichever process has them (a mean of the processes' means would weigh them
        # alike when their counts differ: evaluation under DDP does not repeat images to even them out)
        self.val_loss, self.test_loss = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        self.val_acc_best = MaxMetric()
        # kept in state_dict so that a resumed run remembers its best epoch
        self.val_acc_best.persistent(True)

    @property
    def metric_names(self) -> set[str]:
        """Every name this module logs; callbacks may only monitor these."""
        names = {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc_best", "test/loss"}
        names |= {"val/temperature"} if self.hparams.calibrate else set()
        names |= {"val/threshold", "val/map", "test/map"} if self.hparams.multilabel else set()
        return names | set(self.val_metrics.keys()) | set(self.test_metrics.keys())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint of a run from before these buffers existed: their values then, the defaults
        for name in ("class_weight", "temperature", "threshold"):
            checkpoint.get("state_dict", {}).setdefault(name, getattr(self, name).clone())

    @property
    def num_classes(self) -> int:
        return len(self.hparams.classes)

    def setup(self, stage: str) -> None:
        # a fresh run's statistics: those of the pretrained weights, or else its data's; a resumed run's come back from
        # its checkpoint right after, as do its weights (so init_from is for a run's start only)
        data = self.trainer.datamodule if self._trainer is not None else None
        stats = getattr(self.net, "pretrained_stats", None)
        if stats is None and getattr(data, "mean", None) is not None and getattr(data, "std", None) is not None:
            stats = data.mean, data.std
        if stage == "fit" and stats is not None:
            self.normalize.set(*stats)
        if stage == "fit" and self.hparams.class_weights == "balanced" and not self.resuming:
            counts = torch.tensor(getattr(data, "class_counts", None) or [], dtype=torch.float64)
            if len(counts) != self.num_classes or (counts == 0).any():
                raise ConfigError(
                    "model.class_weights balanced weighs each class by the inverse of its training images, which the "
                    f"data module {type(data).__name__} does not give per class (class_counts: {counts.tolist()}): "
                    "give the weights as a list (model.class_weights: [w0, w1, ...])."
                )
            self.class_weight.copy_(counts.sum() / (len(counts) * counts))  # scikit-learn's "balanced"
        if stage == "fit" and self.hparams.init_from and not self.resuming:
            line = finetune.initialise(self, self.hparams.init_from)
            if self.global_rank == 0:
                print(line)
        if self.hparams.freeze_epochs and isinstance(getattr(self._trainer, "strategy", None), DDPStrategy):
            # a frozen body's parameters have no gradients for DDP to reduce: DDP must look for them each step.
            # Lightning 2.6.6 sets it only by the strategy's name (ddp_find_unused_parameters_true) or its constructor,
            # with no public setter: its private _ddp_kwargs, read when the strategy wraps the model, after setup
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_epochs:
            finetune.freeze(self.net, self.current_epoch < self.hparams.freeze_epochs, self.hparams.train_bn)

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # the scheduler's state, its length included, is the checkpoint's by now
            self._check_schedule_length(self.lr_schedulers())
        # in place, so checkpoints keep the plain module's keys; not before Lightning has traced the graph for
        # TensorBoard, which cannot trace compiled code
        if self.hparams.compile:
            self.net.compile()

    def _check_schedule_length(self, scheduler) -> None:
        """One-cycle fails past its last step: a run longer than its schedule stops before it starts. A resumed run
        keeps the length its schedule was planned for (the scheduler's state is restored), whatever the flags say."""
        if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
            return
        step = self.hparams.scheduler_interval == "step"
        needed = self.trainer.estimated_stepping_batches if step else self.trainer.max_epochs
        needed = float("inf") if needed == -1 else needed  # max_epochs -1: until early stopping
        if scheduler.total_steps >= needed:
            return
        unit = "steps" if step else "epochs"
        trains = f"{int(needed)} {unit}" if needed < float("inf") else "until early stopping"
        if self.trainer.ckpt_path:
            raise ConfigError(
                f"this run's one-cycle schedule was planned for {scheduler.total_steps} {unit}, and the trainer flags "
                f"now train {trains}: a one-cycle rate cannot be stretched once it has run. Resume with the run's "
                "trainer.max_epochs (and trainer.limit_train_batches), or train a new run for longer."
            )
        raise ConfigError(
            f"model.scheduler OneCycleLR runs {scheduler.total_steps} {unit}, and the Trainer trains {trains}: leave "
            "its total_steps and epochs unset, so that the run's length sets them."
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images as the data module serves them, over the temperature (what ``predict``
        and the exported graph give; training and validation take the net's own)."""
        return self._logits(self.normalize(images)) / self.temperature

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        # a binary net's logit z as (0, z), whose softmax is (1 - sigmoid(z), sigmoid(z))
        return torch.cat([torch.zeros_like(logits), logits], 1) if self.binary else logits

    def loss(self, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
             weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The objective: ``logits`` ``(N, num_classes)``, ``target`` labels ``(N,)`` or class probabilities ``(N,
        num_classes)`` (mixup, cutmix). Cross-entropy, or for two classes binary cross-entropy on the positive logit;
        ``weight`` per class (the training loss's ``class_weights``)."""
        if self.hparams.multilabel:  # one yes-or-no per class: smoothed towards 0.5, as the binary case
            return F.binary_cross_entropy_with_logits(
                logits, target.float() * (1 - label_smoothing) + 0.5 * label_smoothing
            )
        if self.binary:
            target = target.float() if target.ndim == 1 else target[:, 1]  # soft targets: the positive class's share
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
            if weight is None:
                return F.binary_cross_entropy_with_logits(logits[:, 1], target)
            each = weight[0] * (1 - target) + weight[1] * target  # its target's share of the two classes' weights
            loss = F.binary_cross_entropy_with_logits(logits[:, 1], target, weight=each, reduction="sum")
            return loss / each.sum()  # a weighted mean, as cross_entropy's
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)

    def _step(self, batch, logits: torch.Tensor | None = None, smoothing: float = 0.0, weight=None):
        """Loss, logits and targets of one batch, used by every stage; ``logits`` if already computed (test-time
        augmentation)."""
        x, y = batch
        if tuple(x.shape[1:]) != tuple(self.hparams.in_shape):  # sizes only: nothing is read back from the device
            raise DataError(
                f"a batch holds images of shape {tuple(x.shape[1:])}, and the model was built for the data module's "
                f"shape {tuple(self.hparams.in_shape)}: the data module's shape must be its images' (project.data."
                "ImageData)."
            )
        logits = self._logits(self.normalize(x)) if logits is None else logits
        # the weights only where they are set: a subclass's loss(logits, target, label_smoothing) stays valid
        extra = {"weight": weight} if weight is not None else {}
        return self.loss(logits, y, smoothing, **extra), logits, y

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics take: the positive class's probability for binary, the classes at or above the threshold
        for multi-label (0/1), the logits otherwise."""
        if self.hparams.multilabel:
            return (torch.sigmoid(logits) >= self.threshold).int()
        return torch.sigmoid(logits[:, 1]) if self.binary else logits

    def _update(self, metrics, ranking, logits: torch.Tensor, y: torch.Tensor) -> None:
        metrics.update(self._scores(logits), y.int() if self.hparams.multilabel else y)
        if ranking is not None:
            ranking.update(torch.sigmoid(logits), y.int())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        weight = self.class_weight if self.hparams.class_weights is not None else None
        loss, logits, y = self._step(batch, smoothing=self.hparams.label_smoothing, weight=weight)
        with torch.no_grad():
            self.train_loss_sum += loss * len(y)
            predictions = logits.argmax(1)
            # a mixed image counts as right by the share of its target that the predicted class has; a multi-label one
            # by the share of its classes that are right at 0.5
            if self.hparams.multilabel:
                hits = ((logits > 0) == y.bool()).float().mean(1)
            else:
                hits = predictions.eq(y) if y.ndim == 1 else y.gather(1, predictions[:, None])
            self.train_hits += hits.sum()
        self.train_seen += len(y)
        # logged only where the logger writes it (as Lightning's LearningRateMonitor decides): self.log costs about as
        # much as the step of a small net (Lightning issues 17988, 1986); and not on the progress bar, which would read
        # it back (a GPU sync) each step. Lightning 2.6 says whether a step is a logging step only privately
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/loss_step", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_seen:  # this process's images; the processes of a DDP run average theirs
            self.log("train/loss_epoch", self.train_loss_sum / self.train_seen, sync_dist=True)
            self.log("train/acc", self.train_hits / self.train_seen, prog_bar=True, sync_dist=True)
        self.train_loss_sum.zero_()
        self.train_hits.zero_()
        self.train_seen = 0

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        if (self.hparams.calibrate or self.hparams.multilabel) and not self.trainer.sanity_checking:
            self.val_logits.append((logits.detach().float(), y))
        self._update(self.val_metrics, self.val_ranking, logits, y)
        self.val_loss.update(loss, weight=len(y))
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log_dict(self.val_metrics, prog_bar=False)
        if self.val_ranking is not None:
            self.log_dict(self.val_ranking)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_acc_best(self.val_metrics["acc"].compute())
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        if not self.val_logits:
            return
        # every process's images (under DDP), so that every process sets the same value
        logits, y = (gather(self, torch.cat(parts)) for parts in zip(*self.val_logits, strict=True))
        self.val_logits.clear()
        if self.hparams.calibrate:
            self.temperature.fill_(fit_temperature(logits, y))
            self.log("val/temperature", self.temperature)
        if self.hparams.multilabel:  # the threshold for the next epoch's validation, and the checkpoints' test
            self.threshold.fill_(best_threshold(torch.sigmoid(logits), y))
            self.log("val/threshold", self.threshold)

    def tta_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of ``images``, averaged over the views ``tta`` names, over the temperature."""
        x = self.normalize(images)
        views = [x]
        if self.hparams.tta == "flip_translate":
            padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
            h, w = x.shape[-2:]
            views += [padded[..., :h, :w], padded[..., 2:, 2:]]
        if self.hparams.tta != "none":
            views += [v.flip(3) for v in views]
        return torch.stack([self._logits(v) for v in views]).mean(0) / self.temperature

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits, y = self._step(batch, self.tta_logits(batch[0]))
        self._update(self.test_metrics, self.test_ranking, logits, y)
        self.test_loss.update(loss, weight=len(y))
        self.log("test/loss", self.test_loss)
        self.log_dict(self.test_metrics)
        if self.test_ranking is not None:
            self.log_dict(self.test_ranking)
            return {"prediction": self._scores(logits), "target": y}  # the classes each image is given (N, classes)
        # for callbacks that report on the test set (confusion matrix, misclassified images, reliability)
        return {"prediction": logits.argmax(1), "target": y, "confidence": logits.softmax(1).amax(1)}

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Each image's probability per class (for binary: "not positive", positive; for multi-label, each class's own),
        and its label (-1 if unknown)."""
        x, y = batch
        logits = self.tta_logits(x)
        return {"target": y, "probabilities": torch.sigmoid(logits) if self.hparams.multilabel else logits.softmax(1)}

    def configure_optimizers(self):
        hp = self.hparams
        groups = finetune.param_groups(self, self.net, hp.body_lr_scale, hp.layer_decay, hp.norm_bias_decay)
        optimizer = self.optimizer(groups)
        finetune.scale_rates(optimizer)
        if self.scheduler is None:
            return optimizer
        scheduler = self.build_scheduler(optimizer, self.trainer.estimated_stepping_batches, self.trainer.max_epochs)
        self._check_schedule_length(scheduler)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": self.hparams.scheduler_monitor,
            },
        }

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: float, epochs: int):
        """The configured scheduler for a run of ``total_steps`` optimizer steps over ``epochs`` epochs (infinite and
        -1 for a run that trains until early stopping)."""
        # OneCycleLR needs the run's length, and can only cycle a momentum the optimizer has (Adagrad and
        # Adadelta have none)
        given = getattr(self.scheduler, "keywords", {})
        extra = {}
        if given.get("total_steps", 0) is None and given.get("epochs") is None:
            length = total_steps if self.hparams.scheduler_interval == "step" else epochs
            if not 1 <= length < float("inf"):
                raise ConfigError(
                    "model.scheduler OneCycleLR is planned over the run's length, and this run has none (trainer."
                    "max_epochs=-1 without trainer.max_steps): set one of them, or choose another scheduler "
                    "(--config configs/schedulers/plateau.yaml)."
                )
            extra["total_steps"] = int(length)
        if given.get("cycle_momentum") and not {"momentum", "betas"} & optimizer.defaults.keys():
            extra["cycle_momentum"] = False
        return self.scheduler(optimizer, **extra)


def best_threshold(probabilities: torch.Tensor, target: torch.Tensor) -> float:
    """The class-probability threshold, of 0.05, 0.10, ... 0.95, at which the classes given reach the best macro F1 on
    these (validation) images; the lowest of equals."""
    grid = torch.arange(1, 20, dtype=probabilities.dtype, device=probabilities.device) / 20
    given = probabilities[None] >= grid[:, None, None]  # (thresholds, images, classes)
    truth = target.bool()[None]
    tp, fp, fn = ((given & truth).sum(1), (given & ~truth).sum(1), (~given & truth).sum(1))
    f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1)).float().mean(1)
    return float(grid[int(f1.argmax())])


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the cross-entropy of ``logits / T`` (Guo et al. 2017, temperature
    scaling): LBFGS on ``log T``, outside the validation loop's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, target = logits.detach().clone().double(), target.detach().clone()
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), target)
            loss.backward()
            return loss

        optimizer.step(closure)
        return float(log_t.detach().exp().clamp(0.05, 20))


def _build(net: NetFactory, in_shape: tuple[int, int, int], outputs: int) -> nn.Module:
    """The net, built and run once on two blank images, so that a net that cannot take the data, or returns the wrong
    shape, fails here with its name instead of deep inside the loss."""
    # jsonargparse hands over a partial whose last positional argument is the configured class
    cls = next((a for a in reversed(getattr(net, "args", ())) if isinstance(a, type)), net)
    name = f"{cls.__module__}.{cls.__qualname__}" if hasattr(cls, "__qualname__") else repr(cls)
    try:
        module = net(in_shape, outputs)
    except ConfigError:  # the net's own message (a backbone's weights, names)
        raise
    except TypeError as err:
        raise ConfigError(
            f"model.net {name} cannot be built as {name}(in_shape={tuple(in_shape)}, num_outputs={outputs}): {err}. A "
            "net takes the data's image shape and the number of outputs as its first two arguments."
        ) from None
    except Exception as err:  # a net that sizes its layers by running on the data's shape (ConvNet's head)
        raise ConfigError(
            f"model.net {name} fails on a batch of images of shape {tuple(in_shape)} when it is built: {err}. Use "
            "larger images (data.source.image_size) or a net that takes these."
        ) from None
    module.eval()  # no BatchNorm statistics from blank images
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *in_shape))
    except Exception as err:  # any failure of a user's forward on the data's shape
        raise ConfigError(f"model.net {name} fails on a batch of images of shape {tuple(in_shape)}: {err}") from None
    finally:
        module.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, outputs):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.net {name} returns {got} for 2 images of shape {tuple(in_shape)}; expected logits of shape "
            f"(2, {outputs}), one row per image and one column per {'class' if outputs > 1 else 'binary logit'}."
        )
    return module
