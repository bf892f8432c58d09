"""What transformers' own kernels (sdpa, eager) see of a batch: PoSE windows read whole, packed documents
kept apart beside padding. The reference is the model run on each piece of text alone, with an explicit
causal mask, so transformers' own reading of position_ids never enters it."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from harness.backends.attention import AttentionError, batch_mask
from harness.loss import CausalLMLoss
from tests.conftest import tiny_llama_config

KERNELS = ["sdpa", "eager"]


def model_with(kernel: str, **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**config)).eval()
    model.set_attn_implementation(kernel)
    model.config.use_cache = False  # as harness.model builds it: no cache, so transformers reads position_ids
    return model


def causal(length: int) -> torch.Tensor:
    return torch.ones(1, 1, length, length, dtype=torch.bool).tril()


def logits(model, ids, positions, mask=None):
    return model(input_ids=ids, position_ids=positions, attention_mask=mask).logits


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_pose_window_is_read_as_one_text(kernel):
    """Two chunks: positions 0..15, then 400..415. The second chunk must read the first (one causal
    window), as the model computes it given the causal mask itself."""
    model = model_with(kernel)
    ids = torch.randint(3, 260, (1, 32))
    positions = torch.cat([torch.arange(16), torch.arange(400, 416)])[None]
    mask = batch_mask(model, torch.ones(1, 32, dtype=torch.long), positions)
    reference = logits(model, ids, positions, causal(32) if kernel == "sdpa" else
                       torch.zeros(1, 1, 32, 32).masked_fill(~causal(32), torch.finfo(torch.float32).min))
    torch.testing.assert_close(logits(model, ids, positions, mask), reference)
    changed = ids.clone()
    changed[0, :16] = torch.randint(3, 260, (16,))
    second = slice(16, 32)
    assert not torch.allclose(logits(model, changed, positions, mask)[0, second],
                              logits(model, ids, positions, mask)[0, second])  # chunk 2 reads chunk 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_documents_beside_padding_are_read_apart(kernel):
    """Row 0: documents of 10 and 14 tokens; row 1: one document of 18 tokens, then padding. Each document's
    logits are those of the document alone."""
    model = model_with(kernel)
    ids = torch.randint(3, 260, (2, 24))
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    attention = torch.ones(2, 24, dtype=torch.long)
    attention[1, 18:] = 0
    got = logits(model, ids, positions, batch_mask(model, attention, positions))
    for row, start, stop in ((0, 0, 10), (0, 10, 24), (1, 0, 18)):
        alone = logits(model, ids[row:row + 1, start:stop], torch.arange(stop - start)[None])
        torch.testing.assert_close(got[row, start:stop], alone[0], rtol=1e-4, atol=1e-5)


def test_the_loss_reads_a_pose_window_whole():
    """CausalLMLoss passes the mask on: its loss over a PoSE window is the loss of the model given the causal
    mask itself."""
    model = model_with("sdpa")
    ids = torch.randint(3, 260, (1, 32))
    positions = torch.cat([torch.arange(16), torch.arange(400, 416)])[None]
    loss = CausalLMLoss(model, chunked=False)(ids, ids, torch.ones(1, 32, dtype=torch.long), positions)
    reference = torch.nn.functional.cross_entropy(logits(model, ids, positions, causal(32))[0, :-1], ids[0, 1:])
    torch.testing.assert_close(loss, reference)


def test_plain_batches_keep_transformers_own_mask():
    """Contiguous rows, or packed rows without padding: nothing to add (transformers' rule agrees)."""
    model = model_with("sdpa")
    ones = torch.ones(2, 8, dtype=torch.long)
    assert batch_mask(model, ones, torch.arange(8).expand(2, 8)) is None
    assert batch_mask(model, ones, torch.cat([torch.arange(3), torch.arange(5)]).expand(2, 8)) is None
    padded = ones.clone()
    padded[1, 6:] = 0
    assert batch_mask(model, padded, torch.arange(8).expand(2, 8)) is padded  # one document a row: 2-D suffices


def test_a_sliding_window_model_with_skipped_positions_is_refused():
    model = model_with("sdpa", sliding_window=16)
    model.config.sliding_window = 16
    for module in model.modules():
        if hasattr(module, "q_proj"):
            module.sliding_window = 16
    positions = torch.cat([torch.arange(8), torch.arange(100, 108)])[None]
    with pytest.raises(AttentionError, match="sliding-window layers.*attention.kernel = \"flash\""):
        batch_mask(model, torch.ones(1, 16, dtype=torch.long), positions)
