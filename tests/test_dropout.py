"""LoRA dropout's CPU masks (harness.dropout) against nn.Dropout's definition."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.dropout import CpuLoraDropout, drop_positions, use_cpu_lora_dropout


def _keep(count: int, p: float) -> torch.Tensor:
    """The float keep mask (1 kept, 0 dropped) that drop_positions draws for `count` elements."""
    positions = drop_positions(count, p)
    assert positions.dtype == torch.int64 and bool((positions.diff() > 0).all())  # sorted, no repeats
    assert positions.numel() == 0 or 0 <= int(positions[0]) and int(positions[-1]) < count
    return torch.ones(count, dtype=torch.float64).index_fill_(0, positions, 0)


def _assert_bernoulli(kept: torch.Tensor, p: float) -> None:
    """Keep rate 1 - p, and disjoint neighbour pairs both kept at (1 - p)^2, each to 5 sigma."""
    count = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count)
    pairs = kept[: count - count % 2].view(-1, 2).prod(dim=1)
    both = (1 - p) ** 2
    assert abs(pairs.mean().item() - both) < 5 * math.sqrt(both * (1 - both) / pairs.numel())


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_each_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    _assert_bernoulli(_keep(4_000_001, p), p)


def test_gaps_drawn_again_when_the_first_ones_fall_short_keep_the_distribution(monkeypatch):
    import harness.dropout

    monkeypatch.setattr(harness.dropout, "MARGIN_SIGMAS", -20)  # the first batch of gaps nearly always ends early
    torch.manual_seed(5)
    _assert_bernoulli(torch.cat([_keep(1000, 0.3) for _ in range(2000)]), 0.3)


def test_forward_and_backward_are_dropout_at_the_positions_it_drew():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    dropout = CpuLoraDropout(0.25).train()
    state = torch.get_rng_state()
    y = dropout(x)
    torch.set_rng_state(state)
    keep = torch.ones(x.numel()).index_fill_(0, drop_positions(x.numel(), 0.25), 0).view(x.shape)
    assert torch.equal(y, x.detach() * (1 / 0.75) * keep)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad * (1 / 0.75) * keep)


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
