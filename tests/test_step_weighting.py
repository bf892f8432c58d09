"""Every target token of an optimizer step weighs the same, whatever micro-batch it falls in.

The reference is independent of the harness's loss: the same model's logits, one sample at a
time, summed NLL over every target token of the step divided by their count, one backward. The
harness runs the same four samples as 1 x 4, 2 x 2 and 4 x 1 (micro_batch_size x grad_accum)
through Loop.train_step; its accumulated gradient (read just before the optimizer step) and its
logged loss must equal the reference's. The samples' target counts differ 60-fold (SFT-style
masks, short and long documents): a mean per micro-batch divided by grad_accum, as before,
gave a gradient at cosine 0.45-0.52 from the reference (1 x 4, 2 x 2). Two ranks and sequence parallelism are in
tests/distributed/test_step_weighting.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_recipe

# (length, targets): the last `targets` positions carry labels, the rest are prompt (-100)
SAMPLES = [(400, 300), (24, 23), (300, 5), (9, 8)]


def samples() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for length, targets in SAMPLES:
        ids = torch.randint(3, 260, (length,), generator=generator).tolist()
        labels = [-100] * (length - targets) + ids[length - targets:]
        items.append({"input_ids": ids, "labels": labels, "position_ids": list(range(length))})
    return items


def reference(model, items: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """(token-weighted loss, its gradients): each sample alone through the model's own logits."""
    model.zero_grad(set_to_none=True)
    nll, count = 0.0, 0
    for item in items:
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor(item["labels"])
        logits = model(input_ids=ids, position_ids=torch.tensor([item["position_ids"]])).logits[0]  # (L, V)
        nll = nll + F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
    loss = nll / count
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def harness_step(loop, items: list[dict], micro_batch_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    """(logged loss, accumulated gradients) of one Loop.train_step over `items`."""
    captured, step = {}, loop.engine.step

    def capture():
        captured.update({name: p.grad.clone() for name, p in loop.built.model.named_parameters() if p.requires_grad})
        return step()

    loop.engine.step = capture
    batches = [loop.collate(items[i:i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]
    loss, _ = loop.train_step(iter(batches))
    return loss, captured


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[name].flatten() for name in sorted(a)])
    y = torch.cat([b[name].flatten() for name in sorted(a)])
    return float(F.cosine_similarity(x, y, dim=0))


@pytest.mark.parametrize("micro_batch_size,grad_accum,chunked", [(1, 4, True), (2, 2, False), (4, 1, True)])
def test_a_step_weighs_every_target_token_the_same(session_cache, micro_batch_size, grad_accum, chunked):
    from harness.loop_memory import training_loop

    recipe = tiny_recipe(f"train.micro_batch_size={micro_batch_size}", f"train.grad_accum={grad_accum}",
                         f"train.chunked_loss={str(chunked).lower()}", "adapter.dropout=0.0",
                         "attention.name=\"full\"")
    loop = training_loop(recipe)
    loop.built.model.train()
    items = samples()
    expected_loss, expected = reference(loop.built.model, items)
    loss, got = harness_step(loop, items, micro_batch_size)
    assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2  # A, B x 7 projections x 2 layers
    assert cosine(got, expected) > 0.99999
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-4, atol=1e-6 * float(gradient.abs().max()))
    assert loss == pytest.approx(expected_loss, rel=1e-5)
