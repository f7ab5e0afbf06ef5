"""The template's speed against hand-written PyTorch and against the seeds' pipeline, in one run.

    make bench                     # everything (about 25 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick   # throughput, data path, RSS and --help only (about 5 minutes)

1. data path: samples/s of a DataLoader over a TensorDataset, of the template's loader, and of slicing
   a whole tensor by a random permutation (no model); then the CPU settings the defaults were chosen by:
   images/s of the default net per batch size and thread count, and the loader with 0 or 2 workers;
2. training images/s on the same model, data, batch size, optimizer and schedule (the default config):
   (a) the template's ``fit``, (b) a hand-written loop over the same in-memory tensors, one epoch of it run right
   after each of the template's epochs in the same process (this machine's speed drifts by 10% from minute to
   minute, so only epochs timed side by side compare), (c) the seeds' pipeline (torchvision dataset + per-item
   ToTensor + DataLoader);
3. time to accuracy: wall time from process launch until a recipe first reaches 0.91 / 0.93 test accuracy
   (test set evaluated after every epoch), the template's recipes against the seeds' (seed 004's fit loop
   with Adam 1e-3, batch 200, on seed 000's CNN);
4. peak RSS of a default ``fit``, and how long ``python -m project --help`` takes.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from clocks import PairedEpochs  # benchmarks/, this script's directory
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from project.data import ImageDataModule  # noqa: E402
from project.models import ConvNet  # noqa: E402
from project.module import Normalize  # noqa: E402

DEFAULT = ROOT / "configs" / "default.yaml"
FAST = "configs/fashion_mnist_fast.yaml"  # the recipe that should reach 0.93 in 3 minutes


def default_recipe() -> dict:
    config = yaml.safe_load(DEFAULT.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return {
        "widths": model["net"]["init_args"]["widths"],
        "batch_size": data["batch_size"],
        "optimizer": model["optimizer"]["init_args"],  # its lr is also one-cycle's peak
        "channels_last": model.get("channels_last", False),
    }


def normalizer(dm: ImageDataModule) -> Normalize:
    """What the template's model does to a batch first: uint8 to the train split's mean 0 and std 1."""
    normalize = Normalize(dm.shape[0])
    normalize.set(dm.mean, dm.std)
    return normalize


def data_path(dm: ImageDataModule, batch_size: int) -> dict:
    x, y = dm.train_set.x, dm.train_set.y

    def rate(batches) -> float:
        start = time.perf_counter()
        n = sum(len(b[1]) for b in batches)
        return n / (time.perf_counter() - start)

    def sliced():
        order = torch.randperm(len(y))
        for i in range(0, len(y) - batch_size + 1, batch_size):
            yield x[order[i : i + batch_size]], y[order[i : i + batch_size]]

    dm.hparams.batch_size = batch_size
    loaders = {
        "DataLoader(TensorDataset)": lambda: DataLoader(TensorDataset(x, y), batch_size, shuffle=True),
        "template loader": dm.train_dataloader,
        "tensor[randperm] slices": sliced,
    }
    return {name: statistics.median(rate(make()) for _ in range(3)) for name, make in loaders.items()}


def net_and_optimizer(recipe: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.memory_format]:
    """The default config's net (in its memory layout) and AdamW, seeded alike for every contestant."""
    torch.manual_seed(42)
    layout = torch.channels_last if recipe["channels_last"] else torch.contiguous_format
    net = ConvNet((1, 28, 28), 10, recipe["widths"]).to(memory_format=layout)
    return net, torch.optim.AdamW(net.parameters(), **recipe["optimizer"]), layout


def step_rate(dm: ImageDataModule, recipe: dict, batch_size: int, steps: int = 25) -> float:
    """Training images/s of the default net at one batch size (median step time after 5 warm-up steps)."""
    net, optimizer, layout = net_and_optimizer(recipe)
    normalize = normalizer(dm)
    times = []
    for _ in range(steps + 5):
        idx = torch.randint(0, len(dm.train_set.y), (batch_size,))
        start = time.perf_counter()
        x = normalize(dm.train_set.x[idx]).contiguous(memory_format=layout)
        loss = F.cross_entropy(net(x), dm.train_set.y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[5:])


def cpu_settings(dm: ImageDataModule, recipe: dict) -> None:
    print("\n## CPU settings (the default net; images/s)\n\n| batch size | 1 thread | 2 threads |\n|---|---|---|")
    threads = torch.get_num_threads()
    for batch_size in (64, 128, 256, 512, 1024):
        rates = []
        for n in (1, 2):
            torch.set_num_threads(n)
            rates.append(step_rate(dm, recipe, batch_size))
        print(f"| {batch_size} | {rates[0]:.0f} | {rates[1]:.0f} |")
    torch.set_num_threads(threads)
    print("\n| template loader | samples/s |\n|---|---|")
    for workers in (0, 2):
        dm.hparams.num_workers = workers
        loader = dm.train_dataloader()
        next(iter(loader))  # workers started
        start = time.perf_counter()
        n = sum(len(b[1]) for b in loader)
        print(f"| num_workers={workers} | {n / (time.perf_counter() - start) / 1e6:.2f} M |")
    dm.hparams.num_workers = 0


class HandWritten:
    """The default config's net, AdamW + one-cycle schedule and normalisation as a plain PyTorch loop over the same
    in-memory tensors; each call trains one epoch and returns its images/s."""

    def __init__(self, dm: ImageDataModule, recipe: dict, epochs: int):
        self.x, self.y, self.batch_size = dm.train_set.x, dm.train_set.y, recipe["batch_size"]
        self.normalize = normalizer(dm)
        self.net, self.optimizer, self.layout = net_and_optimizer(recipe)
        self.steps = len(self.y) // self.batch_size
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, recipe["optimizer"]["lr"], total_steps=self.steps * epochs
        )

    def __call__(self) -> float:
        start = time.perf_counter()
        order = torch.randperm(len(self.y))
        for i in range(self.steps):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.normalize(self.x[idx]).contiguous(memory_format=self.layout)
            loss = F.cross_entropy(self.net(x), self.y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
        return self.steps * self.batch_size / (time.perf_counter() - start)


def paired_fit(data_dir: Path, epochs: int, workdir: Path, hand_written: HandWritten) -> PairedEpochs:
    """The template's ``fit`` of the default config, each epoch followed by one hand-written epoch."""
    from project.cli import CLI

    cli = CLI(
        args=[
            f"--config={DEFAULT}",
            f"--data.data_dir={data_dir}",
            f"--trainer.logger.init_args.save_dir={workdir / 'logs'}",
            f"--trainer.max_epochs={epochs}",
            "--trainer.limit_val_batches=1",
        ],
        command="bench",
    )
    clock = PairedEpochs(hand_written)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return clock


def seeds_pipeline(data_dir: Path, recipe: dict, batches: int) -> float:
    """Seed 004's loader (torchvision FashionMNIST + ToTensor, shuffled DataLoader) feeding the same net and step."""
    from torchvision import datasets, transforms

    dataset = datasets.FashionMNIST(str(data_dir), train=True, download=False, transform=transforms.ToTensor())
    net, optimizer, layout = net_and_optimizer(recipe)
    loader = DataLoader(dataset, batch_size=recipe["batch_size"], shuffle=True)
    start, seen = None, 0
    for i, (x, y) in enumerate(loader):
        if i == 5:  # warm-up batches excluded, as for the other two
            start, seen = time.perf_counter(), 0
        loss = F.cross_entropy(net(x.contiguous(memory_format=layout)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if i == batches + 5:
            break
    return seen / (time.perf_counter() - start)


def seeds_recipe(data_dir: Path, epochs: int, out: Path, targets: list[float]) -> None:
    """Seed 004's ``fit``: per epoch, train, re-evaluate the train set, evaluate the test loader; Adam 1e-3,
    batch 200, seed 000's CNN (Conv-BN-ReLU-AvgPool x3, 16/32/64) without its Softmax bug."""
    from torchvision import datasets, transforms

    torch.manual_seed(42)
    to_tensor = transforms.ToTensor()
    train = DataLoader(datasets.FashionMNIST(str(data_dir), True, to_tensor), batch_size=200, shuffle=True)
    test = DataLoader(datasets.FashionMNIST(str(data_dir), False, to_tensor), batch_size=200)
    model = ConvNet((1, 28, 28), 10, [16, 32, 64])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def evaluate(loader) -> float:
        model.eval()
        with torch.no_grad():
            hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
        return hits / len(loader.dataset)

    points = []
    for epoch in range(epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        evaluate(train)  # seed 004's train() reports the train set's loss and accuracy
        points.append(
            {"epoch": epoch, "seconds": time.time() - float(os.environ["BENCH_T0"]), "test_acc": evaluate(test)}
        )
        out.write_text(json.dumps(points))
        if points[-1]["test_acc"] >= max(targets):
            break


def launch(args: list[str], out: Path) -> tuple[list[dict], int]:
    """Runs a child with BENCH_T0 = its launch time; returns its clock points and peak RSS (KiB).

    The peak is the child's own VmHWM, read while it runs: getrusage's ru_maxrss would also count this process's
    memory, which Linux carries into a child across fork and exec."""
    env = {**os.environ, "BENCH_T0": repr(time.time()), "PYTHONPATH": str(ROOT / "benchmarks")}
    log = out.with_suffix(".stderr")
    with open(log, "w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(OSError, StopIteration):  # the child may be gone between poll and read
                lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                peak = max(peak, int(next(li for li in lines if li.startswith("VmHWM:")).split()[1]))
            time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed: {log.read_text()[-2000:]}")
    return json.loads(out.read_text()), peak


def first_reaching(points: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in points if p["test_acc"] >= target), None)


def template_recipe(config: str, data_dir: Path, workdir: Path) -> tuple[list[dict], int]:
    out = workdir / f"{Path(config).stem}.json"
    callback = json.dumps({"class_path": "clocks.TestAccuracyClock", "init_args": {"out": str(out)}})
    args = [sys.executable, "-m", "project", "fit", f"--config={ROOT / config}", f"--data.data_dir={data_dir}",
            f"--trainer.logger.init_args.save_dir={workdir / 'logs'}", f"--trainer.callbacks+={callback}"]  # fmt: skip
    return launch(args, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the time-to-accuracy runs")
    parser.add_argument("--epochs", type=int, default=7, help="paired throughput epochs (1st: warm-up)")
    parser.add_argument("--seeds-epochs", type=int, default=12, help="epochs the seeds' recipe may take")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--seeds-recipe", type=Path, help=argparse.SUPPRESS)  # the child process of part 3
    args = parser.parse_args()
    if args.seeds_recipe:
        return seeds_recipe(args.data_dir, args.seeds_epochs, args.seeds_recipe, [0.91, 0.93])

    recipe = default_recipe()
    dm = ImageDataModule("fashion_mnist", recipe["batch_size"], str(args.data_dir))
    dm.prepare_data()
    dm.setup("fit")
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"# Benchmark ({os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(f"Default config: ConvNet widths {recipe['widths']}, batch {recipe['batch_size']}, AdamW + one-cycle, "
          f"channels_last={recipe['channels_last']}.\n")  # fmt: skip

    print("## Data path (samples/s, no model)\n\n| loader | samples/s |\n|---|---|")
    for name, rate in data_path(dm, recipe["batch_size"]).items():
        print(f"| {name} | {rate / 1e6:.2f} M |")

    cpu_settings(dm, recipe)

    clock = paired_fit(args.data_dir, args.epochs, workdir, HandWritten(dm, recipe, args.epochs))
    seeds = [seeds_pipeline(args.data_dir, recipe, batches=100) for _ in range(3)]
    rates = {"template fit": clock.template[1:], "hand-written loop": clock.paired[1:], "seeds' pipeline": seeds}
    loop = statistics.median(rates["hand-written loop"])
    print("\n## Training throughput (images/s; epochs after the first, each template epoch paired with a hand-written")
    print("one right after it; the seeds' pipeline: 3 runs of 100 batches)\n")
    print("| | median images/s | each | vs hand-written |\n|---|---|---|---|")
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):.0f} | {shown} | {statistics.median(values) / loop:.3f}x |")
    ratios = [t / h for t, h in zip(clock.template[1:], clock.paired[1:], strict=True)]
    print(f"\nTemplate / hand-written, epoch by epoch: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}")  # fmt: skip

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "project", "--help"], cwd=ROOT, capture_output=True, check=True)
    print(f"\n`python -m project --help`: {time.perf_counter() - start:.2f} s")
    if args.quick:
        return

    print("\n## Time to accuracy (wall seconds from process launch; test set after every epoch)\n")
    runs = {f"template: {c}": template_recipe(c, args.data_dir, workdir) for c in ("configs/default.yaml", FAST)}
    out = workdir / "seeds.json"
    seeds = [sys.executable, __file__, f"--seeds-recipe={out}", f"--data-dir={args.data_dir}",
             f"--seeds-epochs={args.seeds_epochs}"]  # fmt: skip
    runs["seeds: seed 004 fit, Adam 1e-3, batch 200"] = launch(seeds, out)
    print("| recipe | to 0.91 | to 0.93 | best test acc (epochs) | peak RSS |\n|---|---|---|---|---|")
    for name, (points, rss) in runs.items():
        cells = [first_reaching(points, t) for t in (0.91, 0.93)]
        shown = [f"{c:.0f} s" if c else f"not in {points[-1]['seconds']:.0f} s" for c in cells]
        best = max(p["test_acc"] for p in points)
        print(f"| {name} | {shown[0]} | {shown[1]} | {best:.4f} ({len(points)}) | {rss / 1024:.0f} MiB |")
    seeds_time = first_reaching(runs["seeds: seed 004 fit, Adam 1e-3, batch 200"][0], 0.91)
    ours = first_reaching(runs["template: configs/default.yaml"][0], 0.91)
    if seeds_time and ours:
        print(f"\nTime to 0.91, seeds / template default: {seeds_time / ours:.1f}x")


if __name__ == "__main__":
    main()
