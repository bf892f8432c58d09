"""LoRA dropout's CPU masks (harness.dropout) against nn.Dropout's definition."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.dropout import CpuLoraDropout, keep_mask, use_cpu_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    count = 4_000_001  # odd: the last 64-bit draw gives one lane
    kept = keep_mask(torch.Size([count]), p).double()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    # the two lanes of one draw are independent: the keep rate of pairs is (1 - p)^2
    pairs = kept[: count - 1].view(-1, 2).prod(dim=1)
    assert abs(pairs.mean().item() - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / pairs.numel())


def test_forward_and_backward_are_dropout_of_the_mask_it_drew():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    dropout = CpuLoraDropout(0.25).train()
    state = torch.get_rng_state()
    y = dropout(x)
    torch.set_rng_state(state)
    keep = keep_mask(x.shape, 0.25)
    assert torch.equal(y, x.detach() * keep * (1 / 0.75))
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad * keep * (1 / 0.75))


def test_eval_mode_p_zero_and_one_are_nn_dropouts():
    x = torch.randn(8, 16)
    assert torch.equal(CpuLoraDropout(0.3).eval()(x), x)
    assert torch.equal(CpuLoraDropout(0.0).train()(x), x)
    assert torch.equal(CpuLoraDropout(1.0).train()(x), torch.zeros_like(x))


def test_checkpointing_recomputes_the_same_masks():
    """Gradients through a checkpointed block equal those of the same block run plainly, from the same seed."""
    torch.manual_seed(2)
    linear = nn.Linear(32, 32)
    dropout = CpuLoraDropout(0.5).train()
    block = lambda t: linear(dropout(t)).relu()  # noqa: E731
    x = torch.randn(16, 32)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        linear.zero_grad()
        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        out.sum().backward()
        grads.append(linear.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    torch.manual_seed(3)
    other = block(x)
    torch.manual_seed(4)
    assert not torch.equal(other, block(x))  # another seed, another mask


def test_every_lora_dropout_of_a_peft_model_is_swapped_and_nothing_else():
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 8))
    keys = set(model.state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.1, target_modules=["0", "2"]))
    names = set(peft_model.state_dict())
    assert use_cpu_lora_dropout(peft_model) == 2
    swapped = [m for m in peft_model.modules() if isinstance(m, CpuLoraDropout)]
    assert len(swapped) == 2 and all(m.p == 0.1 for m in swapped)
    assert type(peft_model.base_model.model[1]) is nn.Dropout  # the model's own dropout stays
    assert set(peft_model.state_dict()) == names and len(keys) == 4
