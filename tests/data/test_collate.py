"""Collator: right padding with attention masks, -100 labels and continuing positions."""
from __future__ import annotations

import torch

from harness.data.collate import Collator


def test_pads_on_the_right_to_the_longest_item():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
             {"input_ids": [8], "labels": [8], "position_ids": [0]},
             {"input_ids": [9, 10], "labels": [9, 10], "position_ids": [0, 0]}]  # packed: two 1-token docs
    batch = Collator(pad_token_id=2)(items)
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2], [9, 10, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 1]]  # padding continues the last doc
