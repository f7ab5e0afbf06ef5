"""Run directories that two processes started at the same moment can never share."""

import contextlib
import shutil
from pathlib import Path

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from project.runs import claim


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, with three differences:

    - the next ``version_<n>`` is claimed with :func:`claim` (Lightning 2.6's private ``_get_next_version`` lists the
      directory and picks the next number, so two runs started together both write ``version_0``; no upstream issue);
    - a run that fails before it has written anything leaves no empty directory behind;
    - ``log_hyperparams(params, metrics)`` writes the HPARAMS record only: Lightning's also logs the metrics again as
      scalars at step 0, after the run's last step, which TensorBoard reads as a restart and drops the points before
      (Lightning issue 4030; still so in 2.6.6). The HPARAMS tab takes the metrics' values from the run's own scalars
      of the same names. It flattens and sanitises the parameters with Lightning's own private helpers, as its
      ``log_hyperparams`` does, and writes through the writer's private file writer, the one Lightning's writes to.
    """

    _claimed = False  # whether this process created the run directory (not a resumed run's)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "failed" and self._version is not None:  # a run that failed before it wrote a checkpoint
            version = self._version if isinstance(self._version, str) else f"version_{self._version}"
            for directory in (Path(self.log_dir), Path(self.root_dir) / version):
                if directory.is_dir() and not any(directory.rglob("*.ckpt")) and not any(directory.rglob("*.csv")):
                    # its events and hparams.yaml record nothing that ran; the directory was this run's own (claimed
                    # fresh, or an evaluation's sub-directory), and a directory with a checkpoint is kept
                    remove = (directory == Path(self.log_dir) and self.sub_dir) or self._claimed
                    if remove:
                        shutil.rmtree(directory, ignore_errors=True)
                with contextlib.suppress(OSError):  # an empty directory is removed
                    directory.rmdir()

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        super().log_hyperparams(params)  # keeps them for hparams.yaml
        if metrics:
            from torch.utils.tensorboard.summary import hparams

            flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
            writer = self.experiment._get_file_writer()
            for summary in hparams(flat, metrics):
                writer.add_summary(summary)

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # only rank 0 writes; the Trainer gives every rank rank 0's directory
            return super()._get_next_version()
        self._claimed = True
        return int(claim(Path(self.root_dir), "version").rsplit("_", 1)[1])
