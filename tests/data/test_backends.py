"""The data backends are registered and take only [data] fields."""
from __future__ import annotations

import dataclasses
import inspect

from harness import registry
from harness.recipe import DataConfig


def test_backends_take_only_data_fields():
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    assert registry.names("data") == ["pretrain", "sft", "tokens"]
    for name in registry.names("data"):
        parameters = list(inspect.signature(registry.get("data", name).fn).parameters)
        assert parameters[:2] == ["tokenizer", "seed"]
        assert set(parameters[2:]) <= fields - {"name"}, name
