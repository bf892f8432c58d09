"""Chunked cross-entropy equals the plain loss, in value and gradients."""
from __future__ import annotations

import pytest
import torch

from harness.loss import CausalLMLoss, chunked_cross_entropy, full_cross_entropy


@pytest.mark.parametrize("head_trains", [True, False])  # checkpointed chunks | gradient taken in the forward
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk, head_trains):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(head_trains)
    hidden = torch.randn(2, 33, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 33))
    labels[0, 5:9] = -100  # masked positions are excluded from both
    trained = [hidden, head.weight] if head_trains else [hidden]
    plain = full_cross_entropy(head(hidden), labels)
    plain_grads = torch.autograd.grad(plain * 3, trained)  # a scaled loss scales the gradient
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_tokens=chunk)
    chunked_grads = torch.autograd.grad(chunked * 3, trained)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)  # float64: equal to rounding
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["soft-capped", "bf16"])
def test_frozen_soft_capped_and_16_bit_heads_take_the_plain_loss_gradient(kind):
    """The in-place softmax gradient through a head that caps its logits, or whose output is bf16."""
    from harness.loss import SoftCapped

    torch.manual_seed(3)
    linear = torch.nn.Linear(16, 40, bias=False).requires_grad_(False)
    head = SoftCapped(linear, cap=0.5) if kind == "soft-capped" else linear.bfloat16()
    dtype = torch.float32 if kind == "soft-capped" else torch.bfloat16
    hidden = torch.randn(1, 21, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 40, (1, 21))
    labels[0, 3] = -100
    plain = full_cross_entropy(head(hidden), labels)
    (want,) = torch.autograd.grad(plain, hidden)
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_tokens=8)
    (got,) = torch.autograd.grad(chunked, hidden)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunked, plain, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_a_frozen_head_runs_once_per_chunk_and_its_gradient_once():
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    hidden = torch.randn(1, 31, 8, requires_grad=True)
    labels = torch.randint(0, 20, (1, 31))
    loss = chunked_cross_entropy(hidden, head, labels, chunk_tokens=10)
    loss.backward(retain_graph=True)
    assert len(calls) == 3  # 30 positions in chunks of 10; the checkpointed path would run 6
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_wrapper_matches_the_model_loss(tiny_model):
    ids = torch.randint(3, 260, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = tiny_model(input_ids=ids, labels=ids).loss
    for chunked in (True, False):
        got = CausalLMLoss(tiny_model, chunked=chunked, chunk_tokens=16)(input_ids=ids, labels=ids)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab, rows", [(32000, 1048), (49152, 682), (128256, 261)])  # LLaMA 2, SmolLM2, LLaMA 3
def test_one_chunk_of_fp32_logits_stays_within_128_mib(vocab, rows):
    """The logits CausalLMLoss's head really makes, chunk by chunk (their .nbytes, read by a forward hook),
    on an fp32 model with the vocabulary and a frozen head as under LoRA: each at most 128 MiB, and one
    position more would pass it; `rows` are the chunk lengths harness/loss.py's docstring states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config).requires_grad_(False)
    model.model.norm.requires_grad_(True)  # the hidden states carry a gradient, as they do under LoRA
    made = []
    model.lm_head.register_forward_hook(lambda module, args, out: made.append((out.shape, out.dtype, out.nbytes)))
    ids = torch.randint(0, vocab, (1, 2101))  # 2100 positions: two chunks or more for every vocabulary here
    CausalLMLoss(model)(input_ids=ids, labels=ids)
    largest = max(nbytes for _, _, nbytes in made)
    assert len(made) > 1 and all(dtype == torch.float32 for _, dtype, _ in made)
    assert largest <= 2**27 < largest + 4 * vocab  # 128 MiB, and not one fp32 row of logits short of it
    assert made[0][0] == (rows, vocab) and largest == rows * vocab * 4


def test_chunked_loss_soft_caps_the_logits_as_the_model_does():
    """Gemma-2 caps its logits (final_logit_softcapping): the chunked loss must too."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.02,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(3, 260, (1, 24), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids, labels=ids).loss
    got = CausalLMLoss(model, chunked=True, chunk_tokens=8)(input_ids=ids, labels=ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    model.config.final_logit_softcapping = None  # without the cap the two differ: the test can fail
    uncapped = CausalLMLoss(model, chunked=True, chunk_tokens=8)(input_ids=ids, labels=ids)
    assert abs(float(uncapped - expected)) > 1e-2  # (random logits are small: a tight cap bends them)
