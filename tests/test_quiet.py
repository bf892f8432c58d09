"""harness.quiet silences exactly the third-party lines it names and keeps the rest.

tests/test_first_run.py runs the README's flow and looks at its whole output; these check each
filter's edge: what it lets through.
"""
from __future__ import annotations

import logging
import warnings

import pytest

from harness import quiet
from tests.conftest import tiny_llama_config


def deepspeed_record(message: str) -> logging.LogRecord:
    return logging.LogRecord(quiet.DEEPSPEED_LOGGER, logging.WARNING, "real_accelerator.py", 213, message, None, None)


def test_deepspeeds_cpu_guess_is_dropped_only_where_torch_sees_no_accelerator(monkeypatch):
    guess = deepspeed_record("Setting accelerator to CPU. "
                             "If you have GPU or other accelerator, we were unable to detect it.")
    other = deepspeed_record("Using ZeRO stage 2")
    assert quiet._not_a_right_cpu_guess in logging.getLogger(quiet.DEEPSPEED_LOGGER).filters  # at the harness's import
    monkeypatch.setattr(quiet, "_torch_sees_an_accelerator", lambda: False)
    assert not quiet._not_a_right_cpu_guess(guess) and quiet._not_a_right_cpu_guess(other)
    monkeypatch.setattr(quiet, "_torch_sees_an_accelerator", lambda: True)  # DeepSpeed missed a GPU: say so
    assert quiet._not_a_right_cpu_guess(guess)


def test_peft_quietly_hides_the_deprecated_name_and_nothing_else():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet.peft_quietly():
            model.is_gradient_checkpointing  # what PeftModel.__init__ reads
            warnings.warn("another deprecation", FutureWarning)
        model.is_gradient_checkpointing  # the user's own code: still told
    assert [str(w.message).split(" is deprecated")[0] for w in caught] == [
        "another deprecation", "`is_gradient_checkpointing`"]


@pytest.mark.parametrize("shown", [True, False])
def test_progress_bars_are_restored(shown):
    import datasets

    datasets.enable_progress_bars()  # whatever an earlier test of this process left
    with quiet.progress_bars_if(shown):
        assert datasets.are_progress_bars_disabled() is not shown
    assert not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # and a user's own choice survives it too
    with quiet.progress_bars_if(shown):
        assert datasets.are_progress_bars_disabled()
    assert datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
