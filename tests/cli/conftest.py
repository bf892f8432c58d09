"""Fixtures of the command-line tests: a saved tiny model to evaluate."""
from __future__ import annotations

import pytest


@pytest.fixture
def model_dir(tmp_path, tiny_model, byte_tokenizer):
    """The tiny random LLaMA and the byte tokenizer, saved as a Hugging Face directory."""
    path = tmp_path / "tiny"
    tiny_model.save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path
