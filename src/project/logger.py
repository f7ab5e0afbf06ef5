"""Run directories that two processes started at the same moment can never share."""

from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger


def claim(directory: Path, prefix: str) -> str:
    """The name of a new directory ``<prefix>_<n>`` under ``directory``, created here: ``os.mkdir`` fails for all but
    one of the processes that ask for the same name, and the others take the next ``n``."""
    directory.mkdir(parents=True, exist_ok=True)
    numbers = [p.name.removeprefix(f"{prefix}_") for p in directory.glob(f"{prefix}_*")]
    n = max((int(k) for k in numbers if k.isdigit()), default=-1) + 1
    while True:
        try:
            (directory / f"{prefix}_{n}").mkdir()
            return f"{prefix}_{n}"
        except FileExistsError:
            n += 1


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, whose next ``version_<n>`` is claimed with :func:`claim` (Lightning's lists the
    directory and picks the next number, so two runs started together both write ``version_0``)."""

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # only rank 0 writes; the Trainer gives every rank rank 0's directory
            return super()._get_next_version()
        return int(claim(Path(self.root_dir), "version").rsplit("_", 1)[1])
