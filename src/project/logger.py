"""TensorBoard as the template's runs want it."""

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, whose ``log_hyperparams(params, metrics)`` writes the HPARAMS record only:
    Lightning's also logs the metrics again as scalars at step 0, after the run's last step, which TensorBoard reads as
    a restart and drops the points before (Lightning issue 4030; still so in 2.6.6). The HPARAMS tab takes the metrics'
    values from the run's own scalars of the same names. It flattens and sanitises the parameters with Lightning's own
    private helpers, as its ``log_hyperparams`` does, and writes through the writer's private file writer, the one
    Lightning's writes to. (The run's directory, its version claimed, is the CLI's: :mod:`project.runs`.)"""

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        super().log_hyperparams(params)  # keeps them for hparams.yaml
        if metrics:
            from torch.utils.tensorboard.summary import hparams

            flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
            writer = self.experiment._get_file_writer()
            for summary in hparams(flat, metrics):
                writer.add_summary(summary)
