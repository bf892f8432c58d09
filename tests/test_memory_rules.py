"""harness.memory.rules: a backend the planner has no built-in rule for is planned by the rule it registers."""
from __future__ import annotations

import dataclasses

import pytest

from harness.memory import PlanError, model_shape, plan, register_memory_rule, resolve_setup, rules
from harness.recipe import load_recipe
from tests.conftest import ROOT

# recipes/tiny_cpu.toml: d = 64, I = 128, 2 layers, 4 query heads and 2 KV heads of 16 dims. One layer's
# linear weights: q 64 x 64 + k 64 x 32 + v 64 x 32 + o 64 x 64 + gate, up, down 64 x 128 each
TINY_LINEAR_ELEMENTS = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)  # = 73,728


@pytest.fixture(autouse=True)
def _own_rules(monkeypatch):
    """Rules registered by a test stay in that test."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(rules, "_RULES", {kind: dict(known) for kind, known in rules._RULES.items()})


def tiny(*overrides: str, **backends: str):
    """recipes/tiny_cpu.toml at 1024 tokens, with backends named as a recipe names them (kind=name)."""
    recipe = load_recipe("recipes/tiny_cpu.toml", ["data.max_seq_length=1024", "position.target_length=1024",
                                                   *overrides])
    for kind, name in backends.items():
        recipe = dataclasses.replace(recipe, **{kind: dataclasses.replace(getattr(recipe, kind), name=name)})
    return recipe


def test_a_registered_quantization_rule_is_used():
    register_memory_rule("quantization", "fp8", rules.QuantizationRule(
        stored_bytes=lambda elements, double_quant, element_bytes: elements, label=lambda *_: "fp8"))
    result = plan(tiny(quantization="fp8"), device="cpu")
    weights = next(part for part in result.parts if part.name == "weights (quantized linears)")
    assert weights.bytes == TINY_LINEAR_ELEMENTS == 73_728 and weights.note == "fp8"


def test_a_registered_attention_rule_is_used():
    """A backend that groups the sequence in halves plans as S2 with a 512-token group does."""
    register_memory_rule("attention", "halves", rules.AttentionRule(group_size=lambda seq_len, attention: seq_len // 2))
    halves = tiny(attention="halves")
    assert resolve_setup(halves, model_shape(halves), device="cpu", card=None, seq_len=None).group == 512
    assert plan(halves, device="cpu").to_dict() == plan(tiny("attention.group_size=512"), device="cpu").to_dict()


@pytest.mark.parametrize("kind", ["quantization", "attention", "adapter", "engine"])
def test_a_backend_without_a_rule_is_refused_by_name(kind):
    with pytest.raises(PlanError) as refused:
        plan(tiny(**{kind: "from-a-plugin"}), device="cpu")
    message = str(refused.value)
    assert f"{kind}.name = 'from-a-plugin'" in message
    assert f"register_memory_rule({kind!r}, 'from-a-plugin', harness.memory.rules." in message


def test_a_rule_of_the_wrong_kind_is_refused():
    with pytest.raises(PlanError, match="a quantization rule is a harness.memory.rules.QuantizationRule"):
        register_memory_rule("quantization", "fp8", rules.AttentionRule(group_size=lambda seq_len, attention: 0))
    with pytest.raises(PlanError, match="position backends have no memory rule"):
        register_memory_rule("position", "mine", rules.AttentionRule(group_size=lambda seq_len, attention: 0))
