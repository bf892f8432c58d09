"""The FSDP settings a launch asks for: what is refused, and one process warned about.
(Training under FSDP on 2 ranks is tests/distributed/test_launchers.py.)"""
from __future__ import annotations

import pytest

from harness.backends import fsdp
from harness.backends.engine import EngineError

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.fixture
def launch_env(monkeypatch):
    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_CPU_RAM_EFFICIENT_LOADING",
                 "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_TRANSFORMER_CLS_TO_WRAP"):
        monkeypatch.delenv(name, raising=False)
    return set_env


def test_no_fsdp_unless_the_launch_asks(launch_env):
    assert fsdp.requested() is None
    launch_env(**FSDP2, FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer, MistralDecoderLayer")
    assert fsdp.requested().layer_classes == ("LlamaDecoderLayer", "MistralDecoderLayer")


@pytest.mark.parametrize("setting, message", [
    ({"FSDP_VERSION": "1"}, "FSDP version 1; the harness shards with FSDP2 only: set fsdp_version: 2"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "loads the base on rank 0 only"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "use train.gradient_checkpointing = true"),
])
def test_settings_the_harness_does_not_honour_are_refused(launch_env, setting, message):
    launch_env(**{**FSDP2, **setting})
    with pytest.raises(EngineError, match=message):
        fsdp.requested()


def test_a_model_without_the_named_layer_class_is_refused(tiny_config):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config)
    assert len(fsdp.decoder_layers(model, ())) == tiny_config.num_hidden_layers  # its _no_split_modules
    with pytest.raises(EngineError, match=r"no module of class \['Qwen2DecoderLayer'\].*LlamaDecoderLayer"):
        fsdp.decoder_layers(model, ("Qwen2DecoderLayer",))


def test_fsdp_over_one_process_is_warned(launch_env, capsys):
    from harness.backends.accelerate_engine import AccelerateEngine

    launch_env(**FSDP2)
    AccelerateEngine().setup()
    assert "FSDP but started one process, which shards nothing" in capsys.readouterr().err
