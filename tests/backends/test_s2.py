"""S2-Attn kernels against an independent dense float64 reference, plus the transformers hook.

The reference below derives the (L, L) mask of each head from the stated semantics with plain
Python loops (group intervals, causality, padding, documents), then runs softmax attention.
Kernels must match it to ATOL in outputs and in query/key/value gradients.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import policy
from harness.backends import s2
from harness.backends.attention import S2Settings, s2_attention_forward
from harness.backends.token_masks import tokens_of
from harness.backends.s2 import causal_attention, flash_varlen_layout, shift_short_attention

ATOL = 1e-10  # float64 on CPU
CPU_KERNELS = ("sdpa", "eager")
CASES = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------------------- reference


def group_starts(seq_len, group_size, shift):
    """Start index of each group: 0, then every G from G - shift (G/2 for the shifted half)."""
    return [0] + list(range(group_size - shift, seq_len, group_size))


def reference_mask(seq_len, group_size, shift, valid, positions):
    """(L, L) bool for one row: j <= i, same group, same document, key j not padding."""
    starts = group_starts(seq_len, group_size, shift)
    group = [sum(start <= i for start in starts) for i in range(seq_len)]
    doc = [0] * seq_len
    for i in range(1, seq_len):
        doc[i] = doc[i - 1] + int(positions[i] == 0)
    return torch.tensor([[j <= i and group[i] == group[j] and doc[i] == doc[j] and bool(valid[j])
                          for j in range(seq_len)] for i in range(seq_len)])


def is_shifted_head(h: int, heads: int, kv_heads: int) -> bool:
    if kv_heads == 1:
        return h >= math.ceil(heads / 2)
    return h // (heads // kv_heads) >= math.ceil(kv_heads / 2)


def unshifted_heads(heads: int, kv_heads: int) -> int:
    return sum(not is_shifted_head(h, heads, kv_heads) for h in range(heads))


def reference_attention(q, k, v, group_size, valid=None, positions=None, shifted=True):
    """Dense S2 attention: q (B, H, L, D), k/v (B, H_kv, L, D) -> (B, L, H, D); padding rows zero.

    Query head h reads KV head h // (H / H_kv) and is shifted (if `shifted`) iff that KV head is
    not among the first ceil(H_kv / 2); with a single KV head, iff h is not among the first ceil(H / 2)."""
    batch, heads, seq_len, dim = q.shape
    valid = torch.ones(batch, seq_len, dtype=torch.bool) if valid is None else valid.bool()
    positions = torch.arange(seq_len).expand(batch, seq_len) if positions is None else positions.expand(batch, -1)
    rows = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            shift = group_size // 2 if shifted and is_shifted_head(h, heads, k.shape[1]) else 0
            mask = reference_mask(seq_len, group_size, shift, valid[b], positions[b].tolist())
            mask = mask | ~valid[b][:, None]  # padding query rows: anything finite, zeroed below
            kv = h // (heads // k.shape[1])
            scores = (q[b, h] @ k[b, kv].T) / math.sqrt(dim)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            per_head.append((probs @ v[b, kv]) * valid[b][:, None])
        rows.append(torch.stack(per_head, dim=1))  # (L, H, D)
    return torch.stack(rows)


# ---------------------------------------------------------------------------- strategies


@st.composite
def attention_cases(draw, padding=True, packing=True):
    """Small random problems: shapes, G, optional padding mask and packed position_ids."""
    kv_heads = draw(st.sampled_from([1, 2, 3, 4]))  # odd counts too (SmolLM2 has 3 KV heads)
    heads = kv_heads * draw(st.sampled_from([1, 2, 3] if kv_heads > 1 else [2, 3, 4]))
    seq_len = draw(st.integers(2, 20))
    case = dict(batch=draw(st.integers(1, 3)), heads=heads, kv_heads=kv_heads, seq_len=seq_len,
                dim=draw(st.integers(1, 8)), group_size=2 * draw(st.integers(1, seq_len // 2)),
                seed=draw(st.integers(0, 2**31 - 1)), valid=None, positions=None)
    if padding and draw(st.booleans()):
        case["valid"] = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len),
                                                   min_size=case["batch"], max_size=case["batch"])))
    if packing and draw(st.booleans()):
        rows = 1 if draw(st.booleans()) else case["batch"]  # (1, L) broadcasts over the batch
        case["positions"] = torch.stack([packed_positions(draw, seq_len) for _ in range(rows)])
    return case


def packed_positions(draw, seq_len):
    """(L,) positions of consecutive documents, each restarting at 0; the first may continue an
    earlier chunk (starts at an offset)."""
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(draw(st.integers(1, seq_len - sum(lengths))))
    offset = draw(st.sampled_from([0, 0, 5]))
    return torch.cat([torch.arange(n) + (offset if i == 0 else 0) for i, n in enumerate(lengths)])


def make_qkv(case, requires_grad=False):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, n, d = (case[key] for key in ("batch", "heads", "kv_heads", "seq_len", "dim"))
    return [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=requires_grad)
            for shape in ((b, h, n, d), (b, hkv, n, d), (b, hkv, n, d))]


def output_weights(case):
    """Random (B, L, H, D) weights: the loss sum(out * weights) makes every output row matter."""
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    shape = (case["batch"], case["seq_len"], case["heads"], case["dim"])
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def output_and_grads(fn, qkv, weights):
    out = fn(*qkv)
    grads = torch.autograd.grad((out * weights).sum(), qkv)
    return out, grads


def assert_matches(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------- dense reference


def reference_output_and_grads(case, qkv, weights):
    return output_and_grads(
        lambda q, k, v: reference_attention(q, k, v, case["group_size"], case["valid"], case["positions"]),
        qkv, weights)


def assert_s2_matches_reference(case, kernels):
    qkv = make_qkv(case, requires_grad=True)
    weights = output_weights(case)
    expected, expected_grads = reference_output_and_grads(case, qkv, weights)
    for kernel in kernels:
        out, grads = output_and_grads(
            lambda q, k, v: shift_short_attention(q, k, v, case["group_size"], case["valid"], case["positions"],
                                                  kernel=kernel), qkv, weights)
        assert_matches(out, expected)
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.isfinite(grad).all()
            assert_matches(grad, expected_grad)


@CASES
@given(case=attention_cases())
def test_s2_kernels_match_dense_reference(case):
    assert_s2_matches_reference(case, CPU_KERNELS)


@settings(max_examples=30, deadline=None)
@given(case=attention_cases(), piece_share=st.sampled_from([1, 3, 128]), cpu_flash=st.booleans())
def test_sdpa_piece_sizes_and_backward_paths_match_dense_reference(case, piece_share, cpu_flash):
    """Pieces from one per segment (share 1) to one KV head x one group (128 at these sizes), and
    both backward paths: torch's CPU flash pair, and recomputing through SDPA (GPUs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policy, "PIECE_SHARE", piece_share)
        patch.setattr(policy, "CPU_PIECE_FLOOR", 0)  # else these small queries are one piece per segment
        patch.setattr(s2, "_cpu_flash_available", lambda q: cpu_flash)
        assert_s2_matches_reference(case, ["sdpa"])


def test_piece_counts_of_a_small_llama_query():
    """A LLaMA-shaped 512-token query (2M elements, under two CPU floors) with G = 128. On the CPU,
    and on a GPU's fused kernels, it is cut only into its halves' segments (4 pieces: 1 unshifted,
    3 shifted). On SDPA's math fallback, into 1/PIECE_SHARE of it each: one KV head x one group,
    or two KV heads x one of the shifted half's G/2 partial groups (16 x 4 + 16 x 3 + 2 x 8)."""
    shape, group_size = (1, 32, 512, 128), 128
    tokens = tokens_of(None, None, torch.empty(shape))
    counts = {(device, fallback): len(s2._sdpa_pieces(shape, 32, group_size, tokens,
                                                      policy.piece_budget(math.prod(shape), device, fallback)))
              for device, fallback in (("cpu", False), ("cuda", False), ("cuda", True))}
    assert counts == {("cpu", False): 4, ("cuda", False): 4, ("cuda", True): 16 * 4 + 16 * 3 + 2 * 8}


GPU_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 8e-2}  # atol = rtol; values and gradients are O(1)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(case=attention_cases())
def test_cuda_kernels_match_dense_reference(case):
    """On a GPU: sdpa in fp32 and in bf16 (as training runs it), and flash where flash-attn is
    installed, against the float64 CPU reference."""
    runs = [("sdpa", torch.float32), ("sdpa", torch.bfloat16)]
    runs += [("flash", torch.bfloat16)] if importlib.util.find_spec("flash_attn") else []
    qkv = make_qkv(case, requires_grad=True)
    weights = output_weights(case)
    expected, expected_grads = reference_output_and_grads(case, qkv, weights)
    valid, positions = (None if t is None else t.cuda() for t in (case["valid"], case["positions"]))
    for kernel, dtype in runs:
        on_gpu = [t.detach().to("cuda", dtype).requires_grad_() for t in qkv]
        out, grads = output_and_grads(
            lambda q, k, v: shift_short_attention(q, k, v, case["group_size"], valid, positions, kernel=kernel),
            on_gpu, weights.to("cuda", dtype))
        tolerance = GPU_TOLERANCE[dtype]
        for actual, reference in zip((out, *grads), (expected, *expected_grads)):
            torch.testing.assert_close(actual.cpu().double(), reference, atol=tolerance, rtol=tolerance,
                                       msg=lambda m: f"{kernel} {dtype}: {m}")


@CASES
@given(case=attention_cases())
def test_causal_attention_matches_dense_reference(case):
    qkv = make_qkv(case, requires_grad=True)
    reference = lambda q, k, v: reference_attention(q, k, v, case["seq_len"], case["valid"], case["positions"],  # noqa: E731
                                                    shifted=False)
    weights = output_weights(case)
    expected, expected_grads = output_and_grads(reference, qkv, weights)
    for kernel in CPU_KERNELS:
        out, grads = output_and_grads(
            lambda q, k, v: causal_attention(q, k, v, case["valid"], case["positions"], kernel=kernel), qkv, weights)
        assert_matches(out, expected)
        for grad, expected_grad in zip(grads, expected_grads):
            assert_matches(grad, expected_grad)


def test_auto_kernel_is_sdpa_on_cpu(monkeypatch):
    """"auto" on the CPU runs the SDPA path (eager and flash would raise here) and matches the reference."""
    def refuse(*args):
        raise AssertionError("kernel='auto' on the CPU must not run this kernel")

    monkeypatch.setattr(s2, "_KERNELS", {**s2._KERNELS, "eager": refuse, "flash": refuse})
    case = dict(batch=2, heads=4, kv_heads=2, seq_len=12, dim=4, seed=0)
    q, k, v = make_qkv(case)
    assert_matches(shift_short_attention(q, k, v, 4), reference_attention(q, k, v, 4))


# ---------------------------------------------------------------------------- causality


@settings(max_examples=25, deadline=None)
@given(case=attention_cases(), data=st.data())
def test_perturbing_a_token_changes_no_earlier_output(case, data):
    j = data.draw(st.integers(0, case["seq_len"] - 1), label="perturbed token")
    assert_no_earlier_change(case, j)


@pytest.mark.parametrize("seq_len, group_size", [(12, 4), (13, 4), (10, 10)])
def test_last_token_of_shifted_heads_is_seen_by_nobody_earlier(seq_len, group_size):
    """The last (half-)group of the shifted heads: no wrap-around to the start of the sequence."""
    case = dict(batch=1, heads=4, kv_heads=2, seq_len=seq_len, dim=4, group_size=group_size, seed=3,
                valid=None, positions=None)
    for j in range(seq_len - group_size // 2, seq_len):
        assert_no_earlier_change(case, j)


def assert_no_earlier_change(case, j):
    q, k, v = make_qkv(case)
    bumped = [x.clone() for x in (q, k, v)]
    for x in bumped:
        x[:, :, j] += 1.0
    masks = dict(attention_mask=case["valid"], position_ids=case["positions"])
    for kernel in CPU_KERNELS:
        runs = [lambda *t: shift_short_attention(*t, case["group_size"], kernel=kernel, **masks),
                lambda *t: causal_attention(*t, kernel=kernel, **masks)]
        for run in runs:
            torch.testing.assert_close(run(*bumped)[:, :j], run(q, k, v)[:, :j], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_first_token_of_shifted_heads_sees_only_itself(kernel):
    """LongLoRA's torch.roll lets token 0 of the shifted heads see the sequence end; ours must not."""
    q, k, v = make_qkv(dict(batch=1, heads=2, kv_heads=2, seq_len=8, dim=4, seed=5))
    out = shift_short_attention(q, k, v, 4, kernel=kernel)  # (B, L, H, D)
    assert_matches(out[:, 0, 1], v[:, 1, 0])


# ---------------------------------------------------------------------------- full coverage


@settings(max_examples=25, deadline=None)
@given(case=attention_cases())
def test_unshifted_heads_with_one_group_equal_causal_attention(case):
    """G == L: the unshifted half of S2 is plain causal attention."""
    q, k, v = make_qkv(case)
    seq_len, heads, kv_heads = case["seq_len"] - case["seq_len"] % 2, case["heads"], case["kv_heads"]
    q, k, v = q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len]
    masks = [None if m is None else m[:, :seq_len] for m in (case["valid"], case["positions"])]
    first = unshifted_heads(heads, kv_heads)
    kv_first = slice(None) if kv_heads == 1 else slice(0, first // (heads // kv_heads))
    for kernel in CPU_KERNELS:
        s2 = shift_short_attention(q, k, v, seq_len, *masks, kernel=kernel)
        causal = causal_attention(q[:, :first], k[:, kv_first], v[:, kv_first], *masks, kernel=kernel)
        assert_matches(s2[:, :, :first], causal)


@settings(max_examples=25, deadline=None)
@given(case=attention_cases(padding=False, packing=False))
def test_causal_attention_equals_torch_sdpa_is_causal(case):
    q, k, v = make_qkv(case)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    for kernel in CPU_KERNELS:
        assert_matches(causal_attention(q, k, v, kernel=kernel), expected)


def test_sdpa_kernel_saves_no_activation_besides_its_inputs_and_output():
    """Memory: S2 by SDPA saves q, k, v, its one output and (on the CPU) the logsumexp of each
    piece: no per-call outputs or their concatenation, so its peak stays at full attention's."""
    q, k, v = (x.requires_grad_() for x in qkv_of(heads=8, kv_heads=4, seq_len=64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = shift_short_attention(q, k, v, 16, kernel="sdpa")
    allowed = {x.untyped_storage().data_ptr() for x in (q, k, v, out)}
    others = [t for t in saved if t.untyped_storage().data_ptr() not in allowed]
    assert sum(t.numel() for t in others) <= q.shape[0] * q.shape[1] * q.shape[2]  # logsumexp: (B, H, L)


# ---------------------------------------------------------------------------- errors


def qkv_of(heads=4, kv_heads=2, seq_len=8, batch=2):
    return make_qkv(dict(batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, dim=4, seed=0))


@pytest.mark.parametrize("call, message", [
    (lambda: shift_short_attention(*qkv_of(heads=1, kv_heads=1), 4), "num_heads=1"),
    (lambda: shift_short_attention(*qkv_of(heads=4, kv_heads=3), 4), "num_kv_heads=3"),
    (lambda: shift_short_attention(*qkv_of(), 10), "group size 10"),
    (lambda: shift_short_attention(*qkv_of(), 3), "group size 3"),
    (lambda: shift_short_attention(*qkv_of(), 0), "group size 0"),
    (lambda: shift_short_attention(*qkv_of(), 4, attention_mask=torch.ones(2, 7)), r"\(2, 7\)"),
    (lambda: shift_short_attention(*qkv_of(), 4, attention_mask=torch.ones(1, 2, 8, 8)), r"\(1, 2, 8, 8\)"),
    (lambda: shift_short_attention(*qkv_of(), 4, attention_mask=torch.full((2, 8), 2.0)), r"\[2.0\]"),
    (lambda: shift_short_attention(*qkv_of(), 4, position_ids=torch.zeros(3, 8)), r"\(3, 8\)"),
    (lambda: shift_short_attention(*qkv_of(), 4, kernel="triton"), "'triton'"),
    (lambda: causal_attention(*qkv_of()[:2], qkv_of(seq_len=6)[2]), r"\(2, 2, 6, 4\)"),
    (lambda: shift_short_attention(*qkv_of(), 4.0), "group size 4.0"),
])
def test_bad_input_raises_value_error_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- flash input preparation


def test_flash_varlen_layout_example():
    # row 0: two documents (restart at 3), padding at the end; row 1: padding at the start
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    indices, cu_seqlens, max_seqlen = flash_varlen_layout(valid, doc, group_size=4, shift=2)
    # shifted groups [0, 2), [2, 6): row 0 -> {0,1}, {2}, {3,4}; row 1 -> {1}, {2,3,4,5}
    assert indices.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert cu_seqlens.tolist() == [0, 2, 3, 5, 6, 10]
    assert cu_seqlens.dtype == torch.int32 and max_seqlen == 4


@CASES
@given(case=attention_cases(), shifted=st.booleans())
def test_flash_varlen_layout_reproduces_the_reference_mask(case, shifted):
    """Causal attention inside each varlen sequence allows exactly the reference's (i, j) pairs."""
    batch, seq_len, group_size = case["batch"], case["seq_len"], case["group_size"]
    shift = group_size // 2 if shifted else 0
    valid = torch.ones(batch, seq_len, dtype=torch.bool) if case["valid"] is None else case["valid"]
    positions = torch.arange(seq_len).expand(batch, -1) if case["positions"] is None else case["positions"]
    starts = positions.expand(batch, -1) == 0
    starts[:, 0] = True
    doc = starts.long().cumsum(dim=1)
    indices, cu_seqlens, max_seqlen = flash_varlen_layout(valid, doc, group_size, shift)

    sequence = torch.full((batch * seq_len,), -1)
    for n, (start, stop) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        sequence[indices[start:stop]] = n
    assert max_seqlen == (cu_seqlens.diff().max().item() if len(indices) else 0)
    for b in range(batch):
        seq = sequence[b * seq_len:(b + 1) * seq_len]
        idx = torch.arange(seq_len)
        allowed = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0) & (idx[None, :] <= idx[:, None])
        expected = reference_mask(seq_len, group_size, shift, valid[b], positions.expand(batch, -1)[b].tolist())
        expected &= valid[b][:, None]  # padding queries are not in any sequence
        assert torch.equal(allowed, expected)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_kernel_without_flash_attn_says_how_to_install():
    with pytest.raises(ImportError, match="pip install flash-attn"):
        shift_short_attention(*qkv_of(), 4, kernel="flash")


# ---------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("harness_s2", s2_attention_forward)
    AttentionMaskInterface.register("harness_s2", flash_attention_mask)
    AttentionInterface.register("reference_s2", reference_attention_forward)
    AttentionMaskInterface.register("reference_s2", flash_attention_mask)


def reference_attention_forward(module, query, key, value, attention_mask, *, scaling=None, position_ids=None,
                                **kwargs):
    """The test's dense S2 reference as a transformers attention function (the "manual" S2)."""
    group_size = module.s2_settings.group_size
    return reference_attention(query, key, value, group_size, attention_mask, position_ids), None


def tiny_models(settings_):
    """(S2 model, the same weights with transformers' sdpa attention), float64, eval mode."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    baseline = LlamaForCausalLM(tiny_llama_config()).double().eval()
    s2 = LlamaForCausalLM(tiny_llama_config()).double().eval()
    s2.load_state_dict(baseline.state_dict())
    s2.set_attn_implementation("harness_s2")
    set_s2_settings(s2, settings_)
    baseline.set_attn_implementation("sdpa")
    return s2, baseline


def set_s2_settings(model, settings_):
    for layer in model.model.layers:
        layer.self_attn.s2_settings = settings_


@pytest.fixture
def models(registered):
    return tiny_models(S2Settings(group_size=4, kernel="sdpa"))


@pytest.fixture
def ids():
    return torch.randint(3, 260, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_s2_backend_runs_the_reference_in_training_and_sdpa_in_eval(registered, ids):
    """harness.backends.attention.s2_attention (the recipe's attention.name = "s2") on a fresh model,
    with G from group_ratio (0.25 x 16 tokens = 4): train mode is the dense reference with G = 4,
    eval mode is transformers' sdpa."""
    from harness.backends.attention import s2_attention

    (_, model), (_, baseline) = tiny_models(S2Settings()), tiny_models(S2Settings())  # plain sdpa models
    assert s2_attention(model, kernel="sdpa", group_ratio=0.25) == "harness_s2"
    manual, _ = tiny_models(S2Settings(group_size=4))
    manual.set_attn_implementation("reference_s2")
    torch.testing.assert_close(model(ids).logits, baseline(ids).logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model.train()(ids).logits, manual(ids).logits, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_eval_mode_equals_transformers_sdpa(models, ids):
    s2, baseline = models
    torch.testing.assert_close(s2(ids).logits, baseline(ids).logits, atol=1e-10, rtol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_train_mode_is_s2_and_matches_manual_reference(registered, ids, kernel):
    s2, baseline = tiny_models(S2Settings(group_size=4, kernel=kernel))
    manual, _ = tiny_models(S2Settings(group_size=4))
    manual.set_attn_implementation("reference_s2")
    for model in (s2, manual):
        model.train()
    logits = s2(ids).logits
    assert (logits - baseline(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(logits, manual(ids).logits, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_at_inference_uses_s2_in_eval_mode(registered, ids):
    s2, baseline = tiny_models(S2Settings(group_size=4, kernel="sdpa", at_inference=True))
    manual, _ = tiny_models(S2Settings(group_size=4))
    manual.set_attn_implementation("reference_s2")
    logits = s2(ids).logits  # eval mode (tiny_models)
    assert not s2.training and (logits - baseline(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(logits, manual(ids).logits, atol=1e-10, rtol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("train", [False, True])
def test_right_padded_batch_equals_single_sequences(models, ids, train):
    s2, _ = models
    s2.train(train)
    lengths = [16, 11]
    mask = torch.tensor([[1] * n + [0] * (16 - n) for n in lengths])
    batched = s2(ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        torch.testing.assert_close(batched[row, :n], s2(ids[row:row + 1, :n]).logits[0], atol=1e-10, rtol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("train", [False, True])
def test_packed_documents_equal_separate_documents(models, ids, train):
    """Groups are counted from the row start; a split at a multiple of G keeps them aligned."""
    s2, _ = models
    s2.train(train)
    split = 8
    positions = torch.cat([torch.arange(split), torch.arange(16 - split)])[None]
    packed = s2(ids[:1], position_ids=positions).logits
    separate = torch.cat([s2(ids[:1, :split]).logits, s2(ids[:1, split:]).logits], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-10, rtol=1e-10)


@torch.no_grad()
def test_kv_cache_decoding_equals_transformers_sdpa(models, ids):
    """query length != key length: causal attention over the cache, here with left padding."""
    from transformers import DynamicCache

    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    prefix = 12
    logits = []
    for model in models:
        cache = DynamicCache(config=model.config)
        model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache, use_cache=True)
        logits.append(model(ids[:, prefix:], attention_mask=mask, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-10, rtol=1e-10)


def test_module_without_settings_is_a_clear_error():
    q, k, v = qkv_of()
    with pytest.raises(AttributeError, match="s2_settings"):
        s2_attention_forward(torch.nn.Module(), q, k, v, None)
