"""harness.policy: one rule per hardware-dependent choice, asked by training and the planner alike."""
from __future__ import annotations

import pytest
import torch

from harness import policy, registry
from harness.backends import attention, s2
from harness.memory import BYTES, CARDS, Card, model_shape, resolve_setup
from harness.model import weights_dtype_of
from harness.recipe import load_recipe
from harness.session import make_engine, optimizer_name, step_config_of
from tests.conftest import ROOT

V100 = CARDS["v100-32gb"].device
A100 = CARDS["a100-80gb"].device


def recipes():
    return sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


@pytest.fixture
def on_card(monkeypatch):
    """This machine seen as one CUDA card of `card` (faked at torch's level, as the V100 test below does)."""
    def become(card: Card) -> torch.device:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: card.capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: card.bf16)
        return torch.device("cuda", 0)

    return become


def engine_of(recipe, device: torch.device):
    """The recipe's engine as a run makes it, not set up (no process group), on `device`."""
    engine = make_engine(recipe)
    engine.device = device
    return engine


def autocast_of(engine) -> torch.dtype | None:
    """The dtype the engine's forward context autocasts to, None when it does not."""
    with engine.autocast():
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("recipe_name", recipes())
def test_the_planner_makes_the_choices_a_run_on_the_card_makes(card, recipe_name, on_card, monkeypatch):
    """Precision, autocast, optimizer offload and optimizer, compute and frozen-weight dtypes: the plan's
    against what a run's engine, step_config_of, optimizer_name and the backends take on that card (the S2
    group sizes are literal values in tests/test_recipe.py and tests/test_memory.py)."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes" / recipe_name)
    engine = engine_of(recipe, on_card(CARDS[card]))
    step_config = engine.step_config = step_config_of(recipe, engine)
    setup = resolve_setup(recipe, model_shape(recipe), device="cuda", card=CARDS[card], seq_len=None)
    assert setup.precision == step_config.precision
    autocast = autocast_of(engine)
    assert setup.autocast == (autocast is not None)
    if autocast is not None:
        assert setup.dtypes.attention == autocast.itemsize  # sdpa / matmul save their autocast copies
    offloaded = engine.offloads_optimizer(step_config)
    assert (setup.deepspeed is not None and setup.deepspeed.offload_optimizer) == offloaded
    assert setup.optimizer == optimizer_name(recipe, engine, step_config)  # what harness.session.make_optimizer makes
    if recipe.quantization.name == "nf4":
        quantization = registry.get("quantization", "nf4")
        config = quantization.fn(**registry.table_kwargs(quantization, recipe.quantization))
        assert setup.compute == config.bnb_4bit_compute_dtype.itemsize
    if setup.deepspeed is None and not recipe.train.fp32_frozen_weights:
        assert setup.dtypes.base_weights == BYTES[weights_dtype_of(recipe)]


@pytest.mark.parametrize("card", sorted(CARDS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_flash_is_never_chosen_below_sm80(card, dtype):
    device = CARDS[card].device
    chosen = policy.attention_kernel("auto", device, dtype, installed=True)
    if device.capability < (8, 0):
        assert chosen == "sdpa"
        with pytest.raises(policy.PolicyError, match="compute capability 8.0"):
            policy.attention_kernel("flash", device, dtype, installed=True)
    else:
        assert chosen == ("flash" if dtype != "fp32" else "sdpa")


def test_full_attention_on_a_v100_with_flash_attn_installed_uses_sdpa(tiny_model, monkeypatch):
    """The defect: kernel "auto" picked flash-attn whenever it was installed on any CUDA card,
    and flash-attn has no kernels below sm80 (V100, T4). The machine is faked at torch's level."""
    import importlib.machinery
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "flash_attn" else find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args: False)
    assert policy.Device.current() == V100
    assert attention.full_attention(tiny_model.half(), kernel="auto") == "sdpa"


@pytest.mark.parametrize("device", [policy.CPU, V100, A100, policy.Device("cuda", (7, 5), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("installed", [True, False])
def test_full_and_s2_attention_pick_kernels_by_one_rule(tiny_model, device, dtype, installed, monkeypatch):
    monkeypatch.setattr(policy.Device, "current", classmethod(lambda cls: device))
    monkeypatch.setattr(policy.Device, "of", classmethod(lambda cls, torch_device: device))
    monkeypatch.setattr(policy, "flash_installed", lambda: installed)
    full = attention.model_kernel("auto", tiny_model.to(dtype))
    assert s2._select_kernel("auto", torch.zeros(1, 2, 4, 8, dtype=dtype)) == full


@pytest.mark.parametrize("seq_len, ratio, size, expected", [
    (4096, 0.25, 0, 1024), (1000, 0.25, 0, 250), (1001, 0.25, 0, 250), (6, 0.25, 0, 2), (2, 0.25, 0, 2),
    (100, 0.5, 32, 32), (20, 0.25, 32, 20), (21, 0.25, 32, 20), (8, 1.0, 0, 8),
])
def test_s2_group_size(seq_len, ratio, size, expected):
    assert policy.s2_group_size(seq_len, ratio, size) == expected


@pytest.mark.parametrize("ratio, size, message", [(0.25, 3, "group_size = 3"), (0.25, -2, "group_size = -2"),
                                                  (1.5, 0, "group_ratio = 1.5"), (0.0, 0, "group_ratio = 0.0")])
def test_s2_group_size_refuses_bad_settings(ratio, size, message):
    with pytest.raises(policy.PolicyError, match=message):
        policy.s2_group_size(100, ratio, size)


def test_recipe_planner_and_kernel_agree_where_l_times_ratio_is_below_two(monkeypatch):
    """The defect: for L * ratio < 2 the recipe said G = 2, the kernel raised and the planner
    said min(2, L). Now all three ask policy.s2_group_size."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe("recipes/tiny_cpu.toml", ["data.max_seq_length=6"])
    setup = resolve_setup(recipe, model_shape(recipe), device="cpu", card=None, seq_len=None)
    assert recipe.resolved.group_size == setup.group == policy.s2_group_size(6, 0.25) == 2
    q = torch.randn(1, 4, 6, 8)
    module = torch.nn.Module()
    module.s2_settings = attention.S2Settings(group_ratio=0.25, kernel="eager")
    out, _ = attention.s2_attention_forward(module, q, q[:, :2], q[:, :2], None)
    expected = s2.shift_short_attention(q, q[:, :2], q[:, :2], 2, kernel="eager")
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device, name, expected", [
    (policy.CPU, "auto", "fp32"), (V100, "auto", "fp16"), (A100, "auto", "bf16"), (V100, "bf16", "bf16"),
    (policy.CPU, "bf16", "bf16"),
])
def test_compute_dtype(device, name, expected):
    assert policy.compute_dtype(name, device) == expected


@pytest.mark.parametrize("device, requested, compute, expected", [
    (policy.CPU, "auto", "bf16", "fp32"), (V100, "auto", "bf16", "fp16"), (A100, "auto", "bf16", "bf16"),
    (A100, "auto", "auto", "bf16"), (V100, "fp32", "bf16", "fp32"),
])
def test_precision(device, requested, compute, expected):
    assert policy.precision(requested, compute, device) == expected


@pytest.mark.parametrize("device, model_dtype, compute, expected", [
    (policy.CPU, "auto", "bf16", "fp32"), (V100, "auto", "auto", "fp16"), (A100, "auto", "bf16", "bf16"),
    (A100, "fp32", "bf16", "fp32"),
])
def test_frozen_weights_dtype(device, model_dtype, compute, expected):
    assert policy.frozen_weights_dtype(model_dtype, compute, device) == expected


@pytest.mark.parametrize("device, requested, offloaded, expected", [
    (policy.CPU, "auto", False, "adamw"), (A100, "auto", False, "paged_adamw_32bit"),
    (policy.CPU, "paged_adamw_32bit", False, "adamw"), (V100, "adamw", True, "deepspeed_cpu_adam"),
    (V100, "auto", True, "deepspeed_cpu_adam"), (A100, "adamw", False, "adamw"),
])
def test_optimizer(device, requested, offloaded, expected):
    assert policy.optimizer(requested, device, offloaded=offloaded) == expected


@pytest.mark.parametrize("device, dtype, gqa, masked, expected", [
    (V100, "fp16", True, False, True), (V100, "fp16", True, True, False), (V100, "fp16", False, False, False),
    (A100, "bf16", True, False, False), (A100, "fp32", True, False, True), (policy.CPU, "fp32", True, False, False),
])
def test_sdpa_math_fallback(device, dtype, gqa, masked, expected):
    assert policy.sdpa_math_fallback(device, dtype, gqa=gqa, masked=masked) is expected


@pytest.mark.parametrize("device", [policy.CPU, V100, A100])
def test_soft_capped_attention_runs_eager_unless_flash_attn_can(device):
    """SDPA cannot soft-cap (Gemma-2): "auto" takes eager there, and an explicit sdpa is refused."""
    chosen = policy.attention_kernel("auto", device, "bf16", installed=True, softcapped=True)
    assert chosen == ("flash" if device is A100 else "eager")
    with pytest.raises(policy.PolicyError, match="soft-capped"):
        policy.attention_kernel("sdpa", device, "bf16", installed=True, softcapped=True)


def test_the_planner_plans_eager_attention_for_a_soft_capped_family(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe("recipes/tiny_cpu.toml", ['attention.name="full"', 'model.init_config.model_type="gemma2"',
                                                   "model.init_config.head_dim=16"])
    shape = model_shape(recipe)
    assert shape.softcapped
    assert resolve_setup(recipe, shape, device="cpu", card=None, seq_len=None).kernel == "eager-full"
