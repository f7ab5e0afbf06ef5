"""Callbacks for tests that look inside child processes (importable there with tests/ on PYTHONPATH)."""

import json
from pathlib import Path

from lightning.pytorch import Callback


class DumpMetrics(Callback):
    """Each rank writes what it logged, as it saw it, to ``<directory>/rank<global_rank>.json``."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
            path = self.directory / f"rank{trainer.global_rank}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({"world_size": trainer.world_size, "global_step": trainer.global_step, **metrics})
            )
