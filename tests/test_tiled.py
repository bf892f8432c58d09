"""train.tiled_mlp against the plain MLP on the tiny QLoRA model (NF4 base, LoRA on every linear,
non-reentrant checkpointing, as training builds it): the same loss and the same LoRA gradients,
those of the attention below the MLPs included (they need the gradient the tiles pass down).

The model is in train mode, as the training loop puts it: bitsandbytes repacks a 4-bit weight for
its CPU inference kernel at the first no-grad forward of a Linear4bit in eval mode, and that
kernel's results differ from the training path's (by ~2e-4 here)."""
from __future__ import annotations

import torch

from harness.loss import CausalLMLoss
from harness.model import build_model
from harness.recipe import load_recipe
from harness.tiled import tile_mlps, tiles_for


def loss_and_gradients(tiled: bool, batch: dict):
    recipe = load_recipe("recipes/tiny_cpu.toml", ["adapter.dropout=0.0", "data.max_seq_length=256"])
    torch.manual_seed(0)
    model = build_model(recipe, training=True).model.train()  # as the loop runs it (see below)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the gradients of A something to carry
            torch.nn.init.normal_(parameter, std=0.05)
    if tiled:
        assert tile_mlps(model) == 2
    loss = CausalLMLoss(model, chunked=True)(**batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_tiled_mlp_gives_the_loss_and_lora_gradients_of_the_plain_mlp(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr("harness.tiled.TILE_FLOOR", 64)  # tiles of d = 64 tokens: 4 tiles of the 256
    torch.manual_seed(1)
    ids = torch.randint(3, 260, (2, 256))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(256).expand(2, 256)}
    plain_loss, plain = loss_and_gradients(False, batch)
    tiled_loss, tiled = loss_and_gradients(True, batch)
    assert tiles_for(256, 64, floor=64) == 4
    assert tiled.keys() == plain.keys() and any(".mlp." in name for name in plain)  # names unchanged
    torch.testing.assert_close(tiled_loss, plain_loss, atol=1e-6, rtol=0)
    for name, gradient in plain.items():
        torch.testing.assert_close(tiled[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for n, g in plain.items() if "self_attn" in n) > 0


def test_tiles_are_the_hidden_size_but_at_least_the_floor():
    assert [tiles_for(n, 576) for n in (1, 4096, 4097, 16384, 32768)] == [1, 1, 2, 4, 8]  # SmolLM2: the floor
    assert [tiles_for(n, 8192) for n in (8192, 131072)] == [1, 16]  # wider than the floor: tiles of d
