"""What Lightning, jsonargparse and torch print that a user of the template cannot act on, left out. Applied once by the
entry point (:func:`quiet`), not at import: a program that imports the template's classes sees every warning."""

import logging
import warnings

WARNINGS = (
    # the data is served from memory in whole batches: worker processes would only add copies (Lightning's docs say to
    # filter it: issue 10182)
    ".*does not have many workers.*",
    # fewer batches an epoch than trainer.log_every_n_steps: the epoch's loss and accuracy are logged all the same
    # (Lightning 2.6, since its PR 7734)
    ".*is smaller than the logging interval.*",
    # a config that switches a class (another net, optimizer or scheduler) drops the earlier class's arguments that the
    # new one does not take: that is what stacking means here, not news (jsonargparse 4.53)
    "Due to class_path change",
    # a resumed run writes into its own checkpoint directory again, as it should (Lightning 2.6, since its PR 9615)
    ".*exists and is not empty",
    # a run resumed in the middle of an epoch trains the rest of it from the start of that epoch's order, as the README
    # says (Lightning issue 18780, open)
    "You're resuming from a checkpoint that ended before the epoch ended",
    # Lightning 2.6.6 builds torch pytrees the way torch 2.14 deprecates (Lightning issue 21326)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # validate/test/predict restore the checkpoint callback into <run>/<command>_<k>, where they save nothing (a resumed
    # run that moved keeps its state: checkpoint.ModelCheckpoint.load_state_dict) (Lightning 2.6, since its PR 12045)
    "The dirpath has changed from",
    # DDP is asked to look for parameters without gradients while a body is frozen (project.finetune); once it is
    # unfrozen there are none, as planned (torch 2.14's reducer)
    ".*find_unused_parameters=True was specified in DDP constructor",
)
# an advert for Lightning's cloud logger (Lightning 2.6.1, its PR 21430; issue 21294 asks for a switch), and a note that
# the configured model summary replaces Lightning's default one
MESSAGES = ("💡 Tip", "already configured with model summary")


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in MESSAGES)


def quiet() -> None:
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_Drop())
