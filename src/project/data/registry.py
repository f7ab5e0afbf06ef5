"""What the template knows about each dataset, and how its files are found, fetched and verified.

torchvision reads and downloads the files; this module adds what torchvision leaves out: a local copy
from a system package (Debian's ``dataset-fashion-mnist``), a checksum of every decompressed file
before use (torchvision checks MNIST files only for existence), and one error that says what to do.
"""

import contextlib
import gzip
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from project.errors import DataError
from project.files import digest, replacing

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetInfo:
    title: str
    torchvision_class: str
    folder: str  # where torchvision keeps the decompressed files, under data_dir
    shape: tuple[int, int, int]  # channels, height, width
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    train_size: int  # images in the official train split
    md5: dict[str, str]  # decompressed file name -> md5 of its content
    local_copy: str | None = None  # a directory of .gz files that a system package installs
    package: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        title="MNIST",
        torchvision_class="MNIST",
        folder="MNIST/raw",
        shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        classes=tuple("0123456789"),
        train_size=60000,
        md5=dict(
            zip(
                _IDX_FILES,
                (
                    "6bbc9ace898e44ae57da46a324031adb",
                    "a25bea736e30d166cdddb491f175f624",
                    "2646ac647ad5339dbf082846283269ea",
                    "27ae3e4e09519cfbb04c329615203637",
                ),
                strict=True,
            )
        ),
    ),
    "fashion_mnist": DatasetInfo(
        title="Fashion-MNIST",
        torchvision_class="FashionMNIST",
        folder="FashionMNIST/raw",
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Boot",
        ),
        train_size=60000,
        md5=dict(
            zip(
                _IDX_FILES,
                (
                    "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    "9018921c3c673c538a1fc5bad174d6f9",
                    "8181f5470baa50b63fa0f6fddb340f0a",
                    "15d484375f8d13e6eb1aabb0c3f46965",
                ),
                strict=True,
            )
        ),
        local_copy="/usr/share/datasets/fashion-mnist",
        package="dataset-fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        title="CIFAR-10",
        torchvision_class="CIFAR10",
        folder="cifar-10-batches-py",
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        train_size=50000,
        # the same sums torchvision checks in CIFAR10.train_list / test_list / meta
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
}


def prepare(name: str, data_dir: str | Path, download: bool) -> None:
    """Make every file of ``name`` present under ``data_dir`` and check its content, or raise DataError."""
    info = DATASETS[name]
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"data.data_dir {data_dir} is a file, not a directory: give a directory for the dataset files.")
    raw = Path(data_dir).resolve() / info.folder
    missing = [f for f in info.md5 if not (raw / f).exists()]
    sources = [raw] + ([Path(info.local_copy)] if info.local_copy else [])
    missing = [f for f in missing if not _gunzip_from(raw / f, sources)]
    if missing and download:
        import torchvision

        cls = getattr(torchvision.datasets, info.torchvision_class)
        try:
            for train in (True, False):
                cls(str(Path(data_dir).resolve()), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError, URLError, OSError... for the same cause
            reason = " ".join(str(err).split())  # torchvision's message spans lines, one per mirror
            raise DataError(_missing_message(info, raw, missing, f"downloading them failed ({reason})")) from None
        missing = [f for f in info.md5 if not (raw / f).exists()]
    if missing:
        raise DataError(_missing_message(info, raw, missing, "download is off (data.download: false)"))
    # a file whose checksum matched is checked again when its size or time changes: 0.15 s less at every launch
    stamp = raw / ".verified.json"
    try:
        verified = json.loads(stamp.read_text())
    except (OSError, ValueError):
        verified = {}
    seen = {}
    for file, expected in info.md5.items():
        stat = (raw / file).stat()
        seen[file] = [stat.st_size, stat.st_mtime_ns, expected]
        if verified.get(file) == seen[file]:
            continue
        actual = digest(raw / file, "md5")
        if actual != expected:
            # a bad .gz beside it would only be decompressed again
            also = f" (and {raw / file}.gz, which it came from)" if (raw / f"{file}.gz").exists() else ""
            raise DataError(
                f"{info.title} file {raw / file} is corrupt or truncated ({(raw / file).stat().st_size} bytes, "
                f"md5 {actual}, expected {expected}). Delete it{also} and run again to fetch a fresh copy"
                + (f", or reinstall the {info.package} package" if info.package else "")
                + "."
            )
    if seen != verified:
        with contextlib.suppress(OSError), replacing(stamp) as f:  # a read-only data directory checks every time
            f.write(json.dumps(seen).encode())


def load(name: str, data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official train or test split as ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels."""
    import torchvision

    info = DATASETS[name]
    ds = getattr(torchvision.datasets, info.torchvision_class)(str(data_dir), train=train, download=False)
    x, y = torch.as_tensor(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    where = Path(data_dir).resolve() / info.folder
    split = "train" if train else "test"
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != info.shape or len(x) != len(y):
        raise DataError(
            f"{info.title} {split} data in {where} has images of shape {tuple(x.shape)} ({x.dtype}) and "
            f"{len(y)} labels; expected uint8 images of shape (N, {', '.join(map(str, info.shape))}) and N labels. "
            "Replace the files with the official release."
        )
    if len(y) and (y.min() < 0 or y.max() >= len(info.classes)):
        raise DataError(
            f"{info.title} {split} labels in {where} range over [{y.min()}, {y.max()}]; expected classes "
            f"0..{len(info.classes) - 1}. Replace the files with the official release."
        )
    return x, y


def _gunzip_from(dest: Path, sources: list[Path]) -> bool:
    """Decompress ``<name>.gz`` from the first source directory that has it (a kill mid-copy leaves no truncated
    file behind)."""
    for src in (d / f"{dest.name}.gz" for d in sources):
        if src.exists():
            try:
                if src.stat().st_size == 0:
                    raise EOFError("the file is empty")
                with gzip.open(src) as fin, replacing(dest) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
                if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.errno is not None:
                    raise  # the disk, not the file
                raise DataError(
                    f"{src} is not a complete gzip file ({src.stat().st_size} bytes; {err or type(err).__name__}). "
                    "Delete it and run again: the template then fetches a fresh copy."
                ) from None
            return True
    return False


def _missing_message(info: DatasetInfo, raw: Path, missing: list[str], why: str) -> str:
    remedies = [
        "connect to the internet and run again with data.download: true",
        f"place the files (or their .gz) in {raw}",
    ]
    if info.package:
        remedies.append(f"install the Debian package ({info.package}), which puts them in {info.local_copy}")
    else:
        remedies.append("train on Fashion-MNIST instead (--data.dataset fashion_mnist), which Debian packages")
    return (
        f"{info.title} is not in {raw}: missing {', '.join(missing)}, and {why}. To fix it: {'; or '.join(remedies)}."
    )
