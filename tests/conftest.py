import contextlib
import gc
import hashlib
import io
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from project.__main__ import main
from project.cli import CLI
from project.data import registry

ROOT = Path(__file__).resolve().parents[1]
# One thread in the tests and their children: parallel workers (pytest -n) on two cores would only contend, the
# forked children below must not inherit an OpenMP pool, and runs compared bit for bit need the same thread count.
THREADS = {"OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)
os.environ.update(THREADS)  # and in every process a test starts, by whatever route
gc.freeze()  # torch's and Lightning's objects for good: the collector stops rescanning them in every test
# a short run on the CPU (the tests check CPU semantics; GPU tests say so): few batches, no progress bar or summary
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=32",
    "--data.eval_batch_size=100",
]
# any attempt to reach the network fails at once: tests never download
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """The real Fashion-MNIST, decompressed from Debian's dataset-fashion-mnist and verified."""
    data_dir = tmp_path_factory.mktemp("data")
    registry.prepare("fashion_mnist", data_dir, download=False)
    return data_dir


# Fashion-MNIST classes that a few hundred images can tell apart, as a user's folder names them
FOLDER_CLASSES = {"trouser": 1, "sneaker": 7, "bag": 8}


def write_image_folder(root: Path, fashion_dir: Path, per_class: int, splits: tuple[str, ...] = ()) -> Path:
    """Real Fashion-MNIST test images as a user's folder: one sub-folder per class (inside each of ``splits`` if
    given), PNG and JPEG, most 28x28 grayscale, every third one RGB (tinted), every fifth one resized to 40x36."""
    from torchvision.io import write_jpeg, write_png
    from torchvision.transforms.v2.functional import resize

    x, y = registry.load("fashion_mnist", fashion_dir, train=False)
    for name, label in FOLDER_CLASSES.items():
        images = x[y == label][: per_class * max(1, len(splits))]
        for i, image in enumerate(images):
            split = splits[i % len(splits)] if splits else ""
            if i % 3 == 0:
                image = (image.repeat(3, 1, 1).float() * torch.tensor([1.0, 0.8, 0.6]).view(3, 1, 1)).byte()
            if i % 5 == 0:
                image = resize(image, [40, 36], antialias=True)
            path = root / split / name / f"{i:04d}.{'jpg' if i % 4 == 0 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            (write_jpeg(image, str(path), quality=95) if i % 4 == 0 else write_png(image, str(path)))
    return root


@pytest.fixture(scope="session")
def image_folder(fashion_dir, tmp_path_factory) -> Path:
    """300 images of 3 classes in class folders (no split folders)."""
    return write_image_folder(tmp_path_factory.mktemp("images"), fashion_dir, per_class=100)


def pytest_collection_modifyitems(config, items) -> None:
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    # the long tests first: parallel workers then end together instead of one finishing a long test alone
    items.sort(key=lambda item: "slow" not in item.keywords)


def fit_args(tmp_path: Path, data_dir: Path, *extra: str, config: str | None = None) -> list[str]:
    """``fit`` of configs/default.yaml (the first config of every run), with ``config`` stacked on it if given."""
    return [
        "fit",
        *([f"--config={ROOT / config}"] if config else []),
        f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *TINY,
        *extra,
    ]


def folder_fit(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    """``fit`` of configs/folder.yaml on the image folder ``root`` at 28x28."""
    return [
        "fit",
        f"--config={ROOT / 'configs/folder.yaml'}",
        f"--data.source.root={root}",
        f"--data.data_dir={tmp_path / 'data'}",
        "--data.source.image_size=28",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *TINY,
        *extra,
    ]


def tiny_experiment(tmp_path: Path, fashion_dir: Path) -> Path:
    """An experiment directory for ``compare``: a base on the real Fashion-MNIST, an MLP and a softmax regression."""
    experiment = tmp_path / "tiny"
    experiment.mkdir()
    (experiment / "base.yaml").write_text(f"trainer:\n  max_epochs: 2\ndata:\n  data_dir: {fashion_dir}\n")
    (experiment / "mlp.yaml").write_text("model:\n  net:\n    class_path: project.models.MLP\n")
    (experiment / "linear.yaml").write_text("model:\n  net:\n    class_path: project.models.SoftmaxRegression\n")
    return experiment


def cli(args: list[str]) -> CLI:
    """Runs the CLI in this process and returns it (trainer, model and datamodule inside)."""
    return CLI(args=args)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def invoke(args: list[str]) -> Result:
    """``python -m project ARGS`` in this process, through the same entry point and error handler as the shell's;
    for the tests where a child process is not what they test."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
    return Result(code, out.getvalue(), err.getvalue())


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, **THREADS, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


class Child:
    """``python -m project ARGS`` in a process forked from this one, which has imported torch and Lightning already:
    a real process (its own signals, exit code, kill -9) that starts in milliseconds instead of seconds. Its stdout
    and stderr go to ``log``. For what a shell's ``python -m project`` must do itself, use :func:`run`."""

    def __init__(self, args: list[str], log: Path, cwd: Path = ROOT, **env: str):
        self.log = log
        self.process = multiprocessing.get_context("fork").Process(target=self._main, args=(args, log, cwd, env))
        self.process.start()
        self.pid = self.process.pid

    @staticmethod
    def _main(args: list[str], log: Path, cwd: Path, env: dict[str, str]) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.update({**OFFLINE, **THREADS, **env})  # its own children (search trials, compare runs) too
        os.chdir(cwd)
        sys.path.insert(0, str(cwd))  # as `python -m project` imports a user's files from where it runs
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # pytest's capture objects would swallow the output; this process ends with os._exit, closing nothing
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["project", *args]
        code = 0
        try:
            main(args)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not pytest's exit handlers: this process is only a copy of the test's

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise TimeoutError(f"{self.log}: still running after {timeout} s")
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def output(self) -> str:
        return self.log.read_text()


def forked(args: list[str], log: Path, cwd: Path = ROOT) -> Result:
    """:class:`Child` run to its end; its output (stdout and stderr together) as both streams."""
    child = Child(args, log, cwd)
    code = child.wait()
    return Result(code, child.output, child.output)


def run(args: list[str], timeout: float = 300, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """``python -m project ARGS`` in a child process, offline."""
    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "project", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as in the MNIST release: big-endian magic (uint8 type, ndim), dimensions, then data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _learnable_images(labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright band of rows whose position is the label, so a short fit has something to learn."""
    images = rng.integers(0, 60, (len(labels), *shape), dtype=np.uint8)
    rows = shape[-2]
    for i, label in enumerate(labels.tolist()):
        images[i, ..., label * rows // 10 : (label + 1) * rows // 10, :] = 230
    return images


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch) -> Path:
    """A small MNIST in the real IDX format; the registry's checksums are those of these files."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "data"
    raw = data_dir / "MNIST" / "raw"
    for prefix, n in (("train", 600), ("t10k", 200)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _learnable_images(labels, (28, 28), rng))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    for name in registry.DATASETS["mnist"].md5:
        monkeypatch.setitem(registry.DATASETS["mnist"].md5, name, md5(raw / name))
    return data_dir


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    """A small CIFAR-10 in the real format (pickled dicts of (N, 3072) uint8 rows, row-major RGB planes);
    the registry's and torchvision's checksums are those of these files."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "data"
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 100)
        images = _learnable_images(labels, (3, 32, 32), rng).reshape(100, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": images}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(registry.DATASETS["cifar10"].classes)}, f)
    sums = {name: md5(folder / name) for name in registry.DATASETS["cifar10"].md5}
    for name, value in sums.items():
        monkeypatch.setitem(registry.DATASETS["cifar10"].md5, name, value)
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums["batches.meta"]})
    return data_dir
