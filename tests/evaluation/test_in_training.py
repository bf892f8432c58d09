"""Long-context evaluation during training (harness.evaluation.in_training): the losses against
transformers' own loss on each sequence and each window, S2 switched on and back, the watch."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from harness.data.collate import Collator
from harness.evaluation.in_training import LongContextEval, TransferWatch, s2_at_inference, transfer_hint, windows_of
from tests.conftest import tiny_llama_config


def packed_item(lengths: list[int], seed: int = 0) -> dict:
    """One packed row: documents of these lengths, positions restarting at each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 260, (sum(lengths),), generator=generator).tolist()
    return {"input_ids": ids, "labels": list(ids), "position_ids": [p for n in lengths for p in range(n)]}


def test_windows_restart_positions_where_a_piece_continues_a_document():
    item = packed_item([10, 6])  # positions 0..9, 0..5
    pieces = windows_of(item, 4)
    assert [p["position_ids"] for p in pieces] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]
    assert sum((p["input_ids"] for p in pieces), []) == item["input_ids"]
    last = windows_of(packed_item([9]), 4)[-1]  # the 1 token left over is dropped
    assert last["input_ids"] == packed_item([9])["input_ids"][4:8]


class HFLoss(torch.nn.Module):
    """The batch -> mean token loss interface of harness.loss.CausalLMLoss, through the model's own loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask, position_ids):
        return self.model(input_ids=input_ids, labels=labels, position_ids=position_ids).loss


def reference_nll(model, item: dict) -> tuple[float, int]:
    """Summed next-token NLL of one sequence with the positions it carries, computed here from logits."""
    ids = torch.tensor([item["input_ids"]])
    logits = model(input_ids=ids, position_ids=torch.tensor([item["position_ids"]])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


def test_target_and_window_perplexities_match_a_per_sequence_reference():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    samples = [packed_item([64]), packed_item([40, 24], seed=1)]
    evaluator = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext, lambda x: x, window=16)
    found = evaluator.run(HFLoss(model), samples)

    with torch.no_grad():
        whole = [reference_nll(model, item) for item in samples]
        pieces = [reference_nll(model, piece) for item in samples for piece in windows_of(item, 16)]
    expected = lambda parts: math.exp(sum(n for n, _ in parts) / sum(t for _, t in parts))  # noqa: E731
    assert found["eval_ppl"] == pytest.approx(expected(whole), rel=1e-5)
    assert found["eval_ppl_window"] == pytest.approx(expected(pieces), rel=1e-5)
    assert found["eval_ppl_window"] > found["eval_ppl"]  # a random model still gains from more context
    assert "eval_ppl_s2" not in found


def test_no_window_reading_without_a_window():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config()).eval()
    evaluator = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext, lambda x: x)
    assert set(evaluator.run(HFLoss(model), [packed_item([64])])) == {"eval_loss", "eval_ppl"}


def test_a_rank_without_samples_joins_every_collective_and_counts_for_nothing():
    """Two ranks, simulated: rank 1 has no sample. Each rank's all_mean averages its value with what the
    other rank gave to the same collective; both end with rank 0's own token-weighted perplexities."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = HFLoss(LlamaForCausalLM(tiny_llama_config()).eval())
    given = []
    alone = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext,
                            lambda value: given.append(value) or value, window=16)
    expected = alone.run(model, [packed_item([64])])  # one rank: all_mean is the identity

    def partnered(partner: list[float]):
        values = iter(partner)
        return lambda value: (value + next(values)) / 2

    rank0 = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext, partnered([0.0] * 4), window=16)
    rank1 = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext, partnered(given), window=16)
    assert rank0.run(model, [packed_item([64])]) == pytest.approx(expected)
    assert rank1.run(model, []) == pytest.approx(expected)  # 4 collectives, like rank 0, and the same result


def test_s2_reading_uses_s2_and_restores_full_attention():
    from transformers import LlamaForCausalLM

    from harness import registry

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    registry.get("attention", "s2").fn(model, group_ratio=0.25)
    module = HFLoss(model)
    batch = {k: v for k, v in Collator(2)([packed_item([64])]).items()}
    with torch.no_grad():
        model.train()  # S2, as in training (no dropout in this model)
        s2_loss = float(module(**batch))
        model.eval()
        full_loss = float(module(**batch))
    assert s2_loss != pytest.approx(full_loss, rel=1e-4)

    evaluator = LongContextEval(Collator(2), torch.device("cpu"), contextlib.nullcontext, lambda x: x, s2=True)
    module.train()
    found = evaluator.run(module, [packed_item([64])])
    assert found["eval_loss"] == pytest.approx(full_loss, rel=1e-5)
    assert math.log(found["eval_ppl_s2"]) == pytest.approx(s2_loss, rel=1e-5)
    assert model.training and all(not m.s2_settings.at_inference for m in model.modules()
                                      if hasattr(m, "s2_settings"))
    with s2_at_inference(torch.nn.Linear(2, 2)) as has_s2:
        assert not has_s2


def test_watch_warns_once_per_stretch_of_rises_while_the_loss_falls():
    watch = TransferWatch(1024, rises=2, hint=" Try X.")
    assert watch.add(50, 7.0, 2.0) is None
    assert watch.add(100, 7.5, 1.9) is None  # one rise
    warning = watch.add(150, 8.0, 1.8)
    assert warning == ("step 150: full-attention perplexity at 1024 tokens rose 7.00 -> 7.50 -> 8.00 over steps "
                       "50-150 while the training loss fell 2.000 -> 1.800: what the adapter learns does not hold "
                       "under full attention at this length. Try X.")
    assert watch.add(200, 8.5, 1.7) is None  # the same stretch goes on: said already
    assert watch.add(250, 8.0, 1.7) is None and watch.add(300, 8.2, 1.6) is None
    assert watch.add(350, 8.4, 1.5) is not None  # a new stretch
    assert watch.best.step == 50 and watch.best.ppl == 7.0


def test_watch_is_quiet_when_the_training_loss_rises_too_or_when_off():
    watch = TransferWatch(512)
    for step, ppl, loss in [(1, 7.0, 2.0), (2, 7.5, 2.1), (3, 8.0, 2.2)]:
        assert watch.add(step, ppl, loss) is None  # training diverges as a whole: not a transfer problem
    off = TransferWatch(512, rises=0)
    assert [off.add(s, p, 2.0 - s / 10) for s, p in [(1, 7.0), (2, 8.0), (3, 9.0)]] == [None] * 3


def test_watch_state_round_trips():
    watch = TransferWatch(1024)
    for step, ppl in [(50, 7.0), (100, 7.5), (150, 8.0)]:
        watch.add(step, ppl, 2.0 - step / 1000)
    restored = TransferWatch(1024)
    restored.load_state_dict(watch.state_dict())
    assert restored.history == watch.history and restored.warned_at == 150
    assert restored.add(200, 8.5, 1.7) is None  # already warned for this stretch before the restart


def test_hint_names_the_measured_alternative_only_for_s2_in_training():
    assert "position.name = \"yarn\" with S2 held" in transfer_hint("linear", "s2", at_inference=False)
    assert transfer_hint("yarn", "s2", at_inference=False).startswith(" Try attention.name")
    assert transfer_hint("linear", "full", at_inference=False) == ""
    assert transfer_hint("linear", "s2", at_inference=True) == ""
