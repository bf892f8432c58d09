"""harness.merge: the merged tiny adapter computes what the trained model computed; --verify catches a wrong one."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.merge import VerifyError, verify_merged
from tests.convert.runs import Q_PROJ


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(length: int) -> torch.Tensor:
    return torch.randint(3, 260, (2, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- merge

def test_merge_round_trip_matches_the_trained_model(final, merged):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model import load_for_eval
    from harness.tokenizer import byte_tokenizer

    out = merged.out
    assert merged.verification.max_abs_diff <= merged.verification.tolerance
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 512 and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)("fish").input_ids == byte_tokenizer()("fish").input_ids

    # modules_to_save: the trained embeddings and norms are the merged model's own
    adapter = load_file(str(final / "adapter_model.safetensors"))
    weights = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        torch.testing.assert_close(weights[name], adapter[f"base_model.model.{name}"], rtol=0, atol=0)

    # The trained model itself: 4-bit NF4 base + the unmerged adapter, past the original 256 tokens.
    # bitsandbytes' CPU inference kernel (AVX512-BF16, used outside training) computes in bf16;
    # training used the dequantize-then-matmul path, which this flag selects.
    trained, _, _ = load_for_eval("", adapter=str(final), load_in_4bit=True)
    for module in trained.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ids = sample_ids(300)
    expected = logits(trained, ids)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_verify_detects_a_wrong_merged_model(final, merged, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(merged.out, corrupt)
    weights = load_file(str(corrupt / "model.safetensors"))
    weights[Q_PROJ] = weights[Q_PROJ] + 0.05
    save_file(weights, str(corrupt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerifyError, match=r"max \|diff\| .* > tolerance"):
        verify_merged(corrupt, final)
