"""What a training step costs beyond the arithmetic, in microseconds, in one run on the CPU with a tiny net:

    python benchmarks/step_cost.py            # about 2 minutes

(a) a plain PyTorch loop; (b) a bare LightningModule whose training_step returns the loss and logs nothing, under a
Trainer with every extra switched off, and (b') under Lightning's default Trainer (its logger, checkpointing, progress
bar and model summary); (c) the template's fit as it runs by default (its callbacks, logger, checkpointing and progress
bar). All three train softmax regression (one linear layer) on Fashion-MNIST batches of 64
from the template's data module, with SGD, on one thread, so that what is measured is the framework around the
step. Each figure is the least, over rounds, of the time per step between the 50th and the last step of an epoch
(the machine's own noise only ever adds).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from project.data import ImageDataModule  # noqa: E402
from project.module import Normalize  # noqa: E402

BATCH, STEPS, SKIP = 64, 800, 50
EXTRA: list[str] = []


class StepClock(Callback):
    """Seconds per step from the start of step SKIP to the start of the last one."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == SKIP:
            self.start = time.perf_counter()
        elif batch_idx == STEPS - 1:
            self.per_step = (time.perf_counter() - self.start) / (STEPS - 1 - SKIP)


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def normalizer(dm: ImageDataModule) -> Normalize:
    """What the template's model does to a batch first, which the others do too: uint8 to mean 0 and std 1."""
    normalize = Normalize(1)
    normalize.set(dm.mean, dm.std)
    return normalize


def plain(dm: ImageDataModule) -> float:
    net, normalize = linear(), normalizer(dm)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == SKIP:
            start = time.perf_counter()
        elif i == STEPS - 1:
            return (time.perf_counter() - start) / (STEPS - 1 - SKIP)
        loss = F.cross_entropy(net(normalize(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise RuntimeError("fewer batches than STEPS")


class Bare(LightningModule):
    def __init__(self, normalize: Normalize):
        super().__init__()
        self.net, self.normalize = linear(), normalize

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(self.normalize(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def bare(dm: ImageDataModule, workdir: str | None = None) -> float:
    """With ``workdir``, under a Trainer as Lightning sets it up by default (its logger, checkpointing, progress bar
    and model summary); without, under one with all of them off."""
    clock = StepClock()
    off = {} if workdir else {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                               "enable_model_summary": False}  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0,
                      default_root_dir=workdir, callbacks=[clock], **off)  # fmt: skip
    trainer.fit(Bare(normalizer(dm)), datamodule=dm)
    return clock.per_step


def template(data_dir: str, workdir: str) -> float:
    from project.cli import CLI

    clock = StepClock()
    cli = CLI(args=[f"--data.data_dir={data_dir}", f"--trainer.logger.init_args.save_dir={workdir}",
                    "--model.net=project.models.SoftmaxRegression", "--config=configs/schedulers/none.yaml",
                    "--config=configs/optimizers/sgd.yaml", "--model.optimizer.init_args.lr=0.01",
                    f"--data.batch_size={BATCH}", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
                    f"--trainer.limit_train_batches={STEPS}", "--trainer.limit_val_batches=1",
                    "--trainer.limit_test_batches=1", *EXTRA], command="step_cost")  # fmt: skip
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return clock.per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = ImageDataModule("fashion_mnist", BATCH, args.data_dir)
    dm.prepare_data()
    dm.setup("fit")
    times = {"(a) plain loop": [], "(b) bare LightningModule, Trainer extras off": [],
             "(b') bare LightningModule, Lightning's default Trainer": [], "(c) the template": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):  # interleaved: the machine's speed drifts from minute to minute
            times["(a) plain loop"].append(plain(dm))
            times["(b) bare LightningModule, Trainer extras off"].append(bare(dm))
            times["(b') bare LightningModule, Lightning's default Trainer"].append(bare(dm, workdir))
            times["(c) the template"].append(template(args.data_dir, workdir))
    median = {name: min(t) * 1e6 for name, t in times.items()}
    bare_us = median["(b) bare LightningModule, Trainer extras off"]
    print(f"\n| per training step (batch {BATCH}, 1 thread, least of {args.rounds}) | µs | vs (b) |\n|---|---|---|")
    for name, us in median.items():
        print(f"| {name} | {us:.0f} | {us / bare_us:.2f}x |")


if __name__ == "__main__":
    main()
