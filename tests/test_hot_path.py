"""What runs every training step reads no tensor value back to the host (on a GPU, a sync that drains its queue),
except at logging steps: counted on the CPU against a plain loop with the same optimizer, and on a GPU with CUDA's
sync debug mode."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import cli, fit_args
from helpers import CountReads

from project.data import ImageDataModule
from project.module import Normalize


def plain_loop_reads(fashion_dir, steps: int, positive_class: int | None) -> list[int]:
    """Reads of each step of a hand-written loop: the same data, net, optimizer and schedule as the default config."""
    from project.models import ConvNet

    dm = ImageDataModule("fashion_mnist", 32, str(fashion_dir), positive_class=positive_class)
    dm.prepare_data()
    dm.setup("fit")
    binary = positive_class is not None
    net = ConvNet((1, 28, 28), 1 if binary else 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.003, total_steps=steps)
    normalize = Normalize(1)
    normalize.set(dm.mean, dm.std)
    counter = CountReads.Mode()
    starts = []  # reads before each step, its batch's fetch included, as the template's are counted
    with counter:
        for i, (x, y) in enumerate(dm.train_dataloader()):
            starts.append(len(counter.reads))
            x = normalize(x).contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(net(x)[:, 0], y.float()) if binary else F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if i + 1 == steps:
                break
    return [b - a for a, b in itertools.pairwise(starts)]


# the tricks that run every step: an EMA update, random erasing, label smoothing (mixup and cutmix draw their mixing
# weight on the CPU, a read there but no GPU sync)
TRICKS = ["--trainer.callbacks+=project.averaging.EMA", "--data.random_erasing=0.5", "--model.label_smoothing=0.1"]


@pytest.mark.parametrize(
    ("positive_class", "tricks"), [(None, []), (9, []), (None, TRICKS)], ids=["multiclass", "binary", "tricks"]
)
def test_a_training_step_reads_back_no_more_than_a_plain_loop(tmp_path, fashion_dir, positive_class, tricks):
    out = tmp_path / "reads.json"
    counter = json.dumps({"class_path": "helpers.CountReads", "init_args": {"path": str(out)}})
    # no logging step among the 12 counted (log_every_n_steps=1000); the progress bar on, as users run it
    cli(fit_args(tmp_path, fashion_dir, "--trainer.limit_train_batches=14", "--trainer.log_every_n_steps=1000",
                 "--trainer.enable_progress_bar=true", f"--trainer.callbacks+={counter}",
                 f"--data.positive_class={json.dumps(positive_class)}", *tricks))  # fmt: skip
    template = json.loads(out.read_text())["steps"][1:]  # whole steps, from one batch's start to the next's
    plain = plain_loop_reads(fashion_dir, 14, positive_class)[1:]
    assert len(template) == 12 and template == plain, (template, plain, json.loads(out.read_text())["sample"])


@pytest.mark.gpu
def test_no_training_step_syncs_the_gpu(tmp_path, fashion_dir):
    sync = json.dumps({"class_path": "helpers.NoSyncBetweenSteps", "init_args": {"log_every_n_steps": 1000}})
    args = fit_args(tmp_path, fashion_dir, "--trainer.limit_train_batches=14", "--trainer.log_every_n_steps=1000",
                    f"--trainer.callbacks+={sync}", config="configs/fashion_mnist_gpu.yaml")  # fmt: skip
    c = cli([a for a in args if a != "--trainer.accelerator=cpu"])  # raises if a step syncs
    assert c.trainer.global_step == 14 and c.trainer.strategy.root_device.type == "cuda"
