"""What other libraries print that is not the user's business, each line silenced where it arises
and no wider.

- DeepSpeed, imported on a machine without CUDA, logs "Setting accelerator to CPU. If you have GPU
  or other accelerator, we were unable to detect it." Where torch sees no accelerator either, the
  CPU is the right answer and the line is dropped (`install`, at the harness's import); where
  torch sees one that DeepSpeed missed, the line stays: then it is the user's business.
- peft's PeftModel asks a transformers model for `is_gradient_checkpointing`, deprecated in
  transformers 5 for `is_activation_checkpointing`: a FutureWarning about peft's code, not the
  user's. `peft_quietly()` hides that one warning around the harness's own peft calls.
- datasets draws a progress bar for every map; over a single batch it can only jump from 0 to 100%
  (`progress_bars_if`).

Every other warning, log line and progress bar of these libraries is left alone.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

DEEPSPEED_LOGGER = "DeepSpeed"
CPU_GUESS = "Setting accelerator to CPU"
PEFT_ASKS_OLD_NAME = r"`is_gradient_checkpointing` is deprecated"


def _torch_sees_an_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _not_a_right_cpu_guess(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(CPU_GUESS) or _torch_sees_an_accelerator()


def install() -> None:
    logger = logging.getLogger(DEEPSPEED_LOGGER)  # the logger deepspeed.utils.logger will be
    if _not_a_right_cpu_guess not in logger.filters:
        logger.addFilter(_not_a_right_cpu_guess)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Around a peft call: its read of transformers' deprecated `is_gradient_checkpointing` is silent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_ASKS_OLD_NAME, category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield


@contextlib.contextmanager
def progress_bars_if(shown: bool) -> Iterator[None]:
    """datasets' progress bars as they are when `shown`, else off for the duration."""
    import datasets

    if shown or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
