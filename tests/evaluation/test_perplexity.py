"""Perplexity protocols against a brute-force computation on the tiny random LLaMA (float64)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from harness.evaluation.perplexity import (
    EvaluationError,
    evaluate_perplexity,
    longlora_perplexity,
    longlora_windows,
    strided_perplexity,
    strided_windows,
)
from harness.evaluation.report import PplRecord, plot_ppl, ppl_table, write_ppl_json


@pytest.fixture
def model(tiny_model):
    return tiny_model.double()


@pytest.fixture
def data():
    # 150 tokens: neither 32 nor 40 divides it.
    return np.random.default_rng(0).integers(4, 260, size=150)


def token_nll(model, data, context_begin: int, t: int) -> float:
    """-log p(data[t] | data[context_begin:t]), running the model on exactly that context."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data[context_begin:t])[None]).logits[0, -1]
    return -torch.log_softmax(logits, dim=-1)[data[t]].item()


def brute_strided(model, data, seq_len, stride):
    """(NLL per token 1..n-1): token t's context starts at the first multiple of stride with begin + L > t."""
    nlls = []
    for t in range(1, len(data)):
        begin = 0
        while begin + seq_len <= t:
            begin += stride
        nlls.append(token_nll(model, data, begin, t))
    return nlls


def brute_longlora(model, data, seq_len, sliding_window):
    """NLL per window: LongLoRA eval.py starts (last dropped), each scoring tokens i+1 .. i+L-1."""
    starts = list(range(0, len(data) - seq_len, sliding_window))
    starts.pop()
    return [[token_nll(model, data, i, t) for t in range(i + 1, i + seq_len)] for i in starts]


@pytest.mark.parametrize("seq_len,stride", [(32, 31), (32, 20), (40, 7)])
def test_strided_equals_brute_force(model, data, seq_len, stride):
    nlls = brute_strided(model, data, seq_len, stride)
    result = strided_perplexity(model, data, seq_len, stride=stride, batch_size=2)
    assert result.tokens == len(data) - 1 == len(nlls)
    assert result.nll_sum == pytest.approx(sum(nlls), rel=1e-9)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-9)


def test_longlora_equals_brute_force(model, data):
    windows = brute_longlora(model, data, 32, 16)
    flat = [nll for window in windows for nll in window]
    result = longlora_perplexity(model, data, 32, sliding_window=16, batch_size=3)  # 7 windows: last batch of 1
    assert (result.windows, result.tokens) == (7, 7 * 31)
    assert result.nll_sum == pytest.approx(sum(flat), rel=1e-9)
    assert result.ppl == pytest.approx(math.exp(sum(flat) / len(flat)), rel=1e-9)


def test_averages_per_token_not_per_window_or_batch(model, data):
    # Strided windows of L=32, S=20 over 150 tokens score 31, 20, 20, 20, 20, 20, 18 tokens.
    windows = strided_windows(150, 32, 20)
    assert [w.scored for w in windows] == [31, 20, 20, 20, 20, 20, 18]
    nlls = brute_strided(model, data, 32, 20)
    per_window, start = [], 0
    for w in windows:
        per_window.append(np.mean(nlls[start:start + w.scored]))
        start += w.scored
    results = [strided_perplexity(model, data, 32, stride=20, batch_size=b) for b in (1, 2, 4)]
    for result in results:
        assert result.ppl == pytest.approx(math.exp(np.mean(nlls)), rel=1e-9)
        assert result.nll_sum == pytest.approx(results[0].nll_sum, rel=1e-12)
    assert abs(math.log(results[0].ppl) - np.mean(per_window)) > 1e-4  # the two averages differ here


def test_strided_windows_score_every_token_once():
    for n in (2, 5, 31, 64, 100):
        for seq_len in range(2, min(n, 12) + 1):
            for stride in range(1, seq_len):
                windows = strided_windows(n, seq_len, stride)
                scored = [t for w in windows for t in range(w.score_from, w.end)]
                assert scored == list(range(1, n))
                assert all(w.begin < w.score_from and w.length <= seq_len for w in windows)
                assert [w.begin for w in windows] == [k * stride for k in range(len(windows))]


def test_strided_default_stride_leaves_only_one_token_of_overlap():
    windows = strided_windows(100, 32)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 32, 1), (31, 63, 32), (62, 94, 63), (93, 100, 94)]


def test_longlora_window_arithmetic():
    # range(0, 1000 - 100, 256) = 0, 256, 512, 768; eval.py drops the last start.
    windows = longlora_windows(1000, 100, 256)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [(0, 100, 1), (256, 356, 257), (512, 612, 513)]


def test_data_types_and_max_tokens(model, data, tmp_path):
    path = tmp_path / "tokens.bin"
    data.astype(np.uint16).tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    expected = strided_perplexity(model, data[:100], 32).nll_sum
    for source in (memmap, torch.tensor(data), list(data)):
        assert strided_perplexity(model, source, 32, max_tokens=100).nll_sum == pytest.approx(expected, rel=1e-12)


def test_progress_and_dispatch(model, data):
    calls = []
    result = evaluate_perplexity(model, data, 32, protocol="longlora", sliding_window=16, batch_size=4,
                                 progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4 * 31, 7 * 31), (7 * 31, 7 * 31)]
    assert result.protocol == "longlora"


@pytest.mark.parametrize("call,match", [
    (lambda m, d: strided_perplexity(m, d, 151), r"seq_len=151 .*has 150"),
    (lambda m, d: longlora_perplexity(m, d, 100, sliding_window=64), r"seq_len=100 .*165 .*has 150"),
    (lambda m, d: strided_perplexity(m, d, 32, stride=32), r"stride=32"),
    (lambda m, d: strided_perplexity(m, d, 0), r"seq_len must be a positive integer, got 0"),
    (lambda m, d: longlora_perplexity(m, d, 1), r"seq_len=1: a window needs at least 2 tokens"),
    (lambda m, d: strided_perplexity(m, d, 32, batch_size=0), r"batch_size"),
    (lambda m, d: strided_perplexity(m, d, 32, max_tokens=-1), r"max_tokens"),
    (lambda m, d: longlora_perplexity(m, d, 32, sliding_window=0), r"sliding_window"),
    (lambda m, d: evaluate_perplexity(m, d, 32, protocol="fixed"), r"protocol"),
    (lambda m, d: strided_perplexity(m, d.reshape(10, 15), 8), r"1-D"),
])
def test_bad_arguments(model, data, call, match):
    with pytest.raises(EvaluationError, match=match):
        call(model, data)


def test_reports(tmp_path):
    records = [PplRecord("base", None, "strided", n, 10.0 * n / 64, 1000) for n in (64, 128)]
    records += [PplRecord("tuned", "runs/x/final", "strided", 64, 5.0, 1000)]
    table = ppl_table(records)
    assert [c.header for c in table.columns] == ["model", "64", "128"]
    assert table.row_count == 2
    write_ppl_json(records, tmp_path / "ppl.json")
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert rows[2] == {"model": "tuned", "adapter": "runs/x/final", "protocol": "strided", "seq_len": 64,
                       "ppl": 5.0, "tokens": 1000}
    plot_ppl(records, tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
